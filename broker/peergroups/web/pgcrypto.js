// pgcrypto.js: the signed formats of peergroup.v1, byte for byte as
// broker/peergroups/credentials.py makes and checks them: canonical JSON,
// identity infos, GRC/GMC certificates, and the SCRAM-SHA-256 password
// verifier and proof. WebCrypto does the Ed25519, SHA, HMAC and PBKDF2.
//
// FILETIMEs: an "infinite" certificate ends about 3.2e20 ticks, past what a
// JavaScript number holds exactly, so such values are BigInts here (parseJSON
// keeps any integer a number would round as a BigInt, canonical() and
// wireJSON() write BigInts as plain digits).

import {PeerError} from "./pgerrors.js";

export const TEXT = new TextEncoder();
export const GMC_CONTEXT = TEXT.encode("peergroup.v1 certificate\0");
export const AUTH_CONTEXT = TEXT.encode("peergroup.v1 authentication\0");
export const IDENTITY_CONTEXT = TEXT.encode("peergroup.v1 identity\0");
export const TICKS = 10000000n;
export const INFINITE_TICKS = 1000n * 31556952n * TICKS;
export const PASSWORD_ITERATIONS = 100000;

export const ROLE = Object.freeze({
  ADMIN: "04387127-aa56-450a-8ce5-4f565c6790f4",
  INVITING_MEMBER: "4370fd89-dc18-4cfb-8dbf-9853a8a9f905",
  MEMBER: "f12dc4c7-0857-4ca0-93fc-b1bb19a3d8c2",
});

export function b64(bytes) {
  let s = "";
  const u = new Uint8Array(bytes);
  for (let i = 0; i < u.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, u.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

export function unb64(text) {
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

export function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

export function hex(bytes) {
  return Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, "0")).join("");
}

export async function sha1hex(bytes) {
  return hex(await crypto.subtle.digest("SHA-1", bytes));
}

export async function peerName(publicKey, classifier) {
  return `${await sha1hex(publicKey)}.${classifier}`;
}

// JSON.parse, but an integer a number cannot hold exactly becomes a BigInt
// (Chromium, Firefox and Safari pass the source text to the reviver).
export function parseJSON(text) {
  return JSON.parse(text, (key, value, context) => {
    // Compared as BigInts: String(value) is the shortest round-trip form,
    // which may print the source's digits for a double of another value.
    if (typeof value === "number" && context && context.source !== undefined &&
        /^-?\d+$/.test(context.source) && !Number.isSafeInteger(value) &&
        BigInt(value) !== BigInt(context.source)) {
      return BigInt(context.source);
    }
    return value;
  });
}

// JSON.stringify for the wire, writing BigInts as integers.
export function wireJSON(obj) {
  return JSON.stringify(obj, (key, value) =>
    (typeof value === "bigint" ? JSON.rawJSON(value.toString()) : value));
}

function codePointCompare(a, b) {
  const x = Array.from(a, (c) => c.codePointAt(0));
  const y = Array.from(b, (c) => c.codePointAt(0));
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    if (x[i] !== y[i]) return x[i] - y[i];
  }
  return x.length - y.length;
}

// Python's json.dumps(obj, sort_keys=True, separators=(",", ":"),
// ensure_ascii=False): keys sorted by code point, strings escaped as
// JSON.stringify does (the same escapes), integers only.
export function canonicalText(obj) {
  if (obj === null) return "null";
  if (typeof obj === "boolean") return obj ? "true" : "false";
  if (typeof obj === "bigint") return obj.toString();
  if (typeof obj === "number") {
    if (!Number.isSafeInteger(obj)) {
      throw new PeerError("E_INVALIDARG", `${obj} is not an exact integer (use a BigInt)`);
    }
    return String(obj);
  }
  if (typeof obj === "string") {
    if (!obj.isWellFormed()) throw new PeerError("E_INVALIDARG", "a lone surrogate in a string");
    return JSON.stringify(obj);
  }
  if (Array.isArray(obj)) return `[${obj.map(canonicalText).join(",")}]`;
  const keys = Object.keys(obj).filter((k) => obj[k] !== undefined).sort(codePointCompare);
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalText(obj[k])}`).join(",")}}`;
}

export function canonical(obj) {
  return TEXT.encode(canonicalText(obj));
}

export function toFiletime(value) {
  if (typeof value === "bigint") return value;
  if (!Number.isInteger(value)) throw new PeerError("E_INVALIDARG", `${value} is not a FILETIME`);
  return BigInt(value);
}

export async function signWith(privateKey, bytes) {
  return new Uint8Array(await crypto.subtle.sign({name: "Ed25519"}, privateKey, bytes));
}

export async function verify(publicKey, signature, bytes) {
  try {
    const key = await crypto.subtle.importKey("raw", publicKey, {name: "Ed25519"}, false,
                                              ["verify"]);
    return await crypto.subtle.verify({name: "Ed25519"}, key, signature, bytes);
  } catch (e) {
    return false;
  }
}

// PeerIdentityGetXML's analogue: the self-signed statement of a public key,
// classifier and friendly name.
export async function makeIdentityInfo(privateKey, publicKey, classifier, friendlyName) {
  const body = canonical({version: "1.0", publicKey: b64(publicKey), classifier, friendlyName});
  const signature = await signWith(privateKey, concat(IDENTITY_CONTEXT, body));
  return JSON.stringify({PEERIDENTITYINFO: {body: b64(body), signature: b64(signature)}});
}

// credentials.parseIdentityInfo: {publicKey, classifier, friendlyName,
// peerName}, or PEER_E_INVALID_CREDENTIAL_INFO.
export async function parseIdentityInfo(text) {
  let info, body, signature;
  try {
    const outer = JSON.parse(text).PEERIDENTITYINFO;
    body = unb64(outer.body);
    signature = unb64(outer.signature);
    info = JSON.parse(new TextDecoder("utf-8", {fatal: true}).decode(body));
    info.publicKey = unb64(info.publicKey);
    if (typeof info.classifier !== "string") throw new TypeError("classifier");
  } catch (e) {
    throw new PeerError("PEER_E_INVALID_CREDENTIAL_INFO", "malformed identity info");
  }
  if (!(await verify(info.publicKey, signature, concat(IDENTITY_CONTEXT, body)))) {
    throw new PeerError("PEER_E_INVALID_CREDENTIAL_INFO", "identity info signature is wrong");
  }
  return {publicKey: info.publicKey, classifier: info.classifier,
          friendlyName: info.friendlyName || "",
          peerName: await peerName(info.publicKey, info.classifier)};
}

export function authMessage(challenge, application, publicKey) {
  return concat(AUTH_CONTEXT, challenge, TEXT.encode(`\0${application}\0`), publicKey);
}

// One signed certificate (GRC or GMC): `raw` is the signed body, the
// parsed fields are properties (subject and issuer as bytes, times as
// BigInts).
export class Certificate {
  constructor(raw, signature) {
    this.raw = raw;
    this.signature = signature;
    const body = parseJSON(new TextDecoder("utf-8", {fatal: true}).decode(raw));
    this.kind = body.type;
    this.group = body.group;
    this.subject = unb64(body.subject);
    this.subjectName = body.subjectName;
    this.friendlyName = body.friendlyName || "";
    this.issuer = unb64(body.issuer);
    this.roles = body.roles;
    this.notBefore = toFiletime(body.notBefore);
    this.notAfter = toFiletime(body.notAfter);
    this.serial = body.serial;
    this.classifiers = body.classifiers || [];
  }

  // Certificate.make in credentials.py: the same fields, the same bytes.
  static async make(privateKey, issuerPublicKey, kind, group, subject, subjectName, roles,
                    notBefore, notAfter, {friendlyName = "", classifiers = []} = {}) {
    const serial = hex(crypto.getRandomValues(new Uint8Array(16)));
    const raw = canonical({
      type: kind, group, subject: b64(subject), subjectName, friendlyName,
      issuer: b64(issuerPublicKey), roles: [...roles], notBefore: toFiletime(notBefore),
      notAfter: toFiletime(notAfter), serial, classifiers: [...classifiers]});
    return new Certificate(raw, await signWith(privateKey, concat(GMC_CONTEXT, raw)));
  }

  static fromJSON(obj) {
    return new Certificate(unb64(obj.body), unb64(obj.signature));
  }

  toJSON() {
    return {body: b64(this.raw), signature: b64(this.signature)};
  }

  signedBy(publicKey) {
    return verify(publicKey, this.signature, concat(GMC_CONTEXT, this.raw));
  }

  // The role ranked highest, as Certificate.role.
  get role() {
    const rank = {[ROLE.ADMIN]: 3, [ROLE.INVITING_MEMBER]: 2, [ROLE.MEMBER]: 1};
    let best = null;
    for (const r of this.roles) if (rank[r] && (!best || rank[r] > rank[best])) best = r;
    return best;
  }
}

export function chainFromJSON(list) {
  try {
    if (!Array.isArray(list) || !list.length) throw new TypeError("empty chain");
    return list.map((c) => Certificate.fromJSON(c));
  } catch (e) {
    if (e instanceof PeerError) throw e;
    throw new PeerError("PEER_E_INVITATION_NOT_TRUSTED", `malformed certificate chain: ${e}`);
  }
}

// -- passwords (SCRAM-SHA-256, as credentials.py) ---------------------------

async function hmac(key, message) {
  const k = await crypto.subtle.importKey("raw", key, {name: "HMAC", hash: "SHA-256"}, false,
                                          ["sign"]);
  return new Uint8Array(await crypto.subtle.sign("HMAC", k, message));
}

async function saltedPassword(password, salt, iterations) {
  const k = await crypto.subtle.importKey("raw", TEXT.encode(password), "PBKDF2", false,
                                          ["deriveBits"]);
  return new Uint8Array(await crypto.subtle.deriveBits(
    {name: "PBKDF2", hash: "SHA-256", salt, iterations}, k, 256));
}

export async function makeVerifier(password, iterations = PASSWORD_ITERATIONS, salt = null) {
  if (typeof password !== "string" || password.length < 1) {
    throw new PeerError("PEER_E_PASSWORD_DOES_NOT_MEET_POLICY", "empty password");
  }
  salt = salt || crypto.getRandomValues(new Uint8Array(16));
  const salted = await saltedPassword(password, salt, iterations);
  const clientKey = await hmac(salted, TEXT.encode("Client Key"));
  return {salt: b64(salt), iterations,
          storedKey: b64(await crypto.subtle.digest("SHA-256", clientKey)),
          serverKey: b64(await hmac(salted, TEXT.encode("Server Key")))};
}

export function passwordAuthMessage(challenge, groupPeerName, joinerPeerName) {
  return concat(TEXT.encode("peergroup.v1 password\0"), challenge,
                TEXT.encode(`\0${groupPeerName}\0${joinerPeerName}`));
}

export async function passwordProof(password, salt, iterations, message) {
  const salted = await saltedPassword(password, salt, iterations);
  const clientKey = await hmac(salted, TEXT.encode("Client Key"));
  const storedKey = new Uint8Array(await crypto.subtle.digest("SHA-256", clientKey));
  const signature = await hmac(storedKey, message);
  return clientKey.map((b, i) => b ^ signature[i]);
}
