// pgstore.js: identities and the groups they joined, kept in this origin's
// IndexedDB (database "peergroup.v1") so that a page reloaded, or a browser
// restarted, is the same peer and reopens its groups without a new
// invitation, as a Windows identity lives on in the machine's store.
//
// A private key is a WebCrypto CryptoKey, stored as such: IndexedDB's
// structured clone keeps a non-extractable key usable for signing while
// no script can read its bytes. Only an identity generated (or imported)
// with {extractable: true} can be exported for backup (toPEM /
// exportIdentity); any other refuses with PEER_E_NO_KEY_ACCESS.

import {PeerError} from "./pgerrors.js";
import {b64, makeIdentityInfo, peerName, signWith, unb64} from "./pgcrypto.js";

const DB_NAME = "peergroup.v1";
const IDENTITIES = "identities";
const GROUPS = "groups";
let opened = null;

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function openDB() {
  if (!opened) {
    opened = new Promise((resolve, reject) => {
      if (typeof indexedDB === "undefined") {
        reject(new PeerError("E_UNEXPECTED", "this page has no IndexedDB to keep identities in"));
        return;
      }
      const req = indexedDB.open(DB_NAME, 1);
      req.onupgradeneeded = () => {
        const db = req.result;
        db.createObjectStore(IDENTITIES, {keyPath: "peerName"});
        const groups = db.createObjectStore(GROUPS, {keyPath: ["identity", "groupPeerName"]});
        groups.createIndex("identity", "identity");
      };
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(new PeerError("E_UNEXPECTED",
                                               `cannot open IndexedDB: ${req.error}`));
    });
    opened.catch(() => { opened = null; });
  }
  return opened;
}

// Run fn(store) in one transaction; resolves fn's result once committed
// (durability "strict": on disk before the promise resolves).
async function transact(storeName, mode, fn) {
  const db = await openDB();
  const tx = db.transaction(storeName, mode, {durability: "strict"});
  const result = fn(tx.objectStore(storeName));
  await new Promise((resolve, reject) => {
    tx.oncomplete = resolve;
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error || new Error("transaction aborted"));
  });
  return result instanceof IDBRequest ? result.result : result;
}

function checkClassifier(classifier) {
  if (typeof classifier !== "string" || !classifier || classifier.length > 149 ||
      /[\s.]/.test(classifier)) {
    throw new PeerError("PEER_E_INVALID_CLASSIFIER",
                        "a classifier is 1-149 characters, no spaces or dots");
  }
  return classifier;
}

function checkFriendlyName(name) {
  if (name === undefined || name === null) return "";
  if (typeof name !== "string" || name.length > 255) {
    throw new PeerError("PEER_E_INVALID_FRIENDLY_NAME", "at most 255 characters");
  }
  return name;
}

// PKCS#8 PEM, as Identity.toPEM in Python writes it (and fromPEM reads).
function toPEMText(der) {
  const lines = b64(der).match(/.{1,64}/g).join("\n");
  return `-----BEGIN PRIVATE KEY-----\n${lines}\n-----END PRIVATE KEY-----\n`;
}

function fromPEMText(pem) {
  const m = /-----BEGIN PRIVATE KEY-----([A-Za-z0-9+/=\s]+)-----END PRIVATE KEY-----/.exec(pem);
  if (!m) throw new PeerError("E_INVALIDARG", "not a PKCS#8 PEM private key");
  return unb64(m[1].replace(/\s+/g, ""));
}

export class Identity {
  constructor({privateKey, publicKey, classifier, friendlyName, peerName: name,
               extractable = false, persisted = false}) {
    this.privateKey = privateKey;
    this.publicKey = publicKey;
    this.classifier = classifier;
    this.friendlyName = friendlyName;
    this.peerName = name;
    this.extractable = extractable;
    this.persisted = persisted;
  }

  // PeerIdentityCreate: a new Ed25519 key, kept in IndexedDB unless
  // {persist: false}. {extractable: true} allows exporting it (toPEM).
  static async generate(classifier = "peer", friendlyName = "",
                        {extractable = false, persist = true} = {}) {
    checkClassifier(classifier);
    friendlyName = checkFriendlyName(friendlyName);
    const keyPair = await crypto.subtle.generateKey({name: "Ed25519"}, extractable,
                                                    ["sign", "verify"]);
    const publicKey = new Uint8Array(await crypto.subtle.exportKey("raw", keyPair.publicKey));
    const identity = new Identity({
      privateKey: keyPair.privateKey, publicKey, classifier, friendlyName, extractable,
      peerName: await peerName(publicKey, classifier)});
    if (persist) await identity.save();
    return identity;
  }

  // Identity.fromPEM (PeerIdentityImport): a PKCS#8 Ed25519 key, from
  // Python's toPEM or this library's.
  static async fromPEM(pem, classifier = "peer", friendlyName = "",
                       {extractable = false, persist = true} = {}) {
    checkClassifier(classifier);
    friendlyName = checkFriendlyName(friendlyName);
    const der = fromPEMText(pem);
    let jwk;
    try {
      // WebCrypto derives no public key from a private one: read it from
      // the JWK form of a transient extractable import.
      const transient = await crypto.subtle.importKey("pkcs8", der, {name: "Ed25519"}, true,
                                                      ["sign"]);
      jwk = await crypto.subtle.exportKey("jwk", transient);
    } catch (e) {
      throw new PeerError("E_INVALIDARG", `not an Ed25519 private key: ${e}`);
    }
    const privateKey = await crypto.subtle.importKey("pkcs8", der, {name: "Ed25519"},
                                                     extractable, ["sign"]);
    const publicKey = unb64(jwk.x.replace(/-/g, "+").replace(/_/g, "/") + "=");
    const identity = new Identity({privateKey, publicKey, classifier, friendlyName, extractable,
                                   peerName: await peerName(publicKey, classifier)});
    if (persist) await identity.save();
    return identity;
  }

  // The stored identity of that peer name, or PEER_E_IDENTITY_NOT_FOUND.
  static async load(name) {
    const row = await transact(IDENTITIES, "readonly", (s) => s.get(name));
    if (!row) throw new PeerError("PEER_E_IDENTITY_NOT_FOUND", `no identity ${name} here`);
    return new Identity({...row, persisted: true});
  }

  async save() {
    const row = {peerName: this.peerName, classifier: this.classifier,
                 friendlyName: this.friendlyName, publicKey: this.publicKey,
                 privateKey: this.privateKey, extractable: this.extractable,
                 created: Date.now()};
    await transact(IDENTITIES, "readwrite", (s) => s.put(row));
    this.persisted = true;
  }

  // PeerIdentitySetFriendlyName.
  async setFriendlyName(friendlyName) {
    this.friendlyName = checkFriendlyName(friendlyName);
    if (this.persisted) await this.save();
  }

  sign(bytes) {
    return signWith(this.privateKey, bytes);
  }

  // PeerIdentityGetXML: what an administrator needs to invite this peer.
  identityInfo() {
    return makeIdentityInfo(this.privateKey, this.publicKey, this.classifier,
                            this.friendlyName);
  }

  // PeerIdentityExport: the private key as PKCS#8 PEM (Identity.fromPEM in
  // Python reads it). PEER_E_NO_KEY_ACCESS unless made extractable.
  async toPEM() {
    if (!this.extractable || !this.privateKey.extractable) {
      throw new PeerError("PEER_E_NO_KEY_ACCESS", "this identity's key was made not " +
                          "extractable (Identity.generate without {extractable: true}): " +
                          "it cannot leave this browser");
    }
    return toPEMText(new Uint8Array(await crypto.subtle.exportKey("pkcs8", this.privateKey)));
  }
}

// PeerEnumIdentities: [{peerName, friendlyName, classifier, extractable}].
export async function enumIdentities() {
  const rows = await transact(IDENTITIES, "readonly", (s) => s.getAll());
  return rows.map(({peerName: name, friendlyName, classifier, extractable}) => (
    {peerName: name, friendlyName, classifier, extractable}));
}

// PeerIdentityExport by peer name.
export async function exportIdentity(name) {
  return (await Identity.load(name)).toPEM();
}

// PeerIdentityDelete: the key and the identity's group entries.
export async function deleteIdentity(name) {
  await Identity.load(name);
  for (const g of await enumGroups(name)) await forgetGroup(name, g.groupPeerName);
  await transact(IDENTITIES, "readwrite", (s) => s.delete(name));
}

// PeerEnumGroups: the groups this browser holds for an identity:
// [{groupPeerName, friendlyName, application, role, chain, created, groupKey?}].
export async function enumGroups(identity) {
  return transact(GROUPS, "readonly", (s) => s.index("identity").getAll(identity));
}

export async function loadGroup(identity, groupPeerName) {
  return transact(GROUPS, "readonly", (s) => s.get([identity, groupPeerName]));
}

// Merge `fields` into the identity's entry for the group.
export async function saveGroup(identity, groupPeerName, fields) {
  const db = await openDB();
  const tx = db.transaction(GROUPS, "readwrite", {durability: "strict"});
  const store = tx.objectStore(GROUPS);
  const old = await request(store.get([identity, groupPeerName]));
  store.put({...(old || {}), ...fields, identity, groupPeerName});
  await new Promise((resolve, reject) => {
    tx.oncomplete = resolve;
    tx.onerror = () => reject(tx.error);
  });
}

export async function forgetGroup(identity, groupPeerName) {
  await transact(GROUPS, "readwrite", (s) => s.delete([identity, groupPeerName]));
}

