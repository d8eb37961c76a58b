// peergroup.js: a browser peer for the broker's peer-groups face
// (protocol peergroup.v1, docs/peergroups-protocol.md). Served by the
// broker at /peergroups/peergroup.js; an ES module with no dependencies.
//
// The identity is an Ed25519 key pair made with WebCrypto; its private key
// is not extractable and never leaves the page. A browser peer joins with
// an invitation an administrator made for its identity info, then uses the
// group like any other peer:
//
//   import {Identity, PeerGroupClient, EVENT} from "/peergroups/peergroup.js";
//   const me = await Identity.generate("alice", "Alice");
//   const pg = await PeerGroupClient.connect("wss://broker.example/peergroups/v1");
//   await pg.startup("chat");
//   await pg.registerIdentity(me);
//   send(await me.identityInfo());              // to an administrator, out of band
//   const h = await pg.join(invitation);
//   const reg = await pg.registerEvent(h, [EVENT.STATUS_CHANGED, EVENT.RECORD_CHANGED]);
//   await pg.connect(h);
//   await pg.nextEvent(reg, EVENT.STATUS_CHANGED);
//   const id = await pg.addRecord(h, type, new TextEncoder().encode("hi"));

export const PROTOCOL = "peergroup.v1";

export const EVENT = Object.freeze({
  STATUS_CHANGED: 1, PROPERTY_CHANGED: 2, RECORD_CHANGED: 3, DIRECT_CONNECTION: 4,
  NEIGHBOR_CONNECTION: 5, INCOMING_DATA: 6, MEMBER_CHANGED: 8, CONNECTION_FAILED: 10,
  AUTHENTICATION_FAILED: 11,
});

const TEXT = new TextEncoder();
const DAY_TICKS = 864000000000;

// Now as a FILETIME (100 ns ticks since 1601-01-01 UTC) by this page's clock.
function localFiletime() {
  return (Date.now() + 11644473600000) * 10000;
}

export function b64(bytes) {
  let s = "";
  for (const b of new Uint8Array(bytes)) s += String.fromCharCode(b);
  return btoa(s);
}

export function unb64(text) {
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

async function sha1hex(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-1", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

// A failed request: the Windows HRESULT name and value.
export class PeerError extends Error {
  constructor(error) {
    super(`${error.name}: ${error.message || ""}`);
    this.name = "PeerError";
    this.hrName = error.name;
    this.hr = error.hr;
    this.detail = error.message;
  }
}

export class Identity {
  constructor(keyPair, publicKey, classifier, friendlyName, peerName) {
    this.keyPair = keyPair;
    this.publicKey = publicKey;
    this.classifier = classifier;
    this.friendlyName = friendlyName;
    this.peerName = peerName;
  }

  static async generate(classifier = "peer", friendlyName = "") {
    const keyPair = await crypto.subtle.generateKey({name: "Ed25519"}, false,
                                                    ["sign", "verify"]);
    const publicKey = new Uint8Array(await crypto.subtle.exportKey("raw", keyPair.publicKey));
    const peerName = `${await sha1hex(publicKey)}.${classifier}`;
    return new Identity(keyPair, publicKey, classifier, friendlyName, peerName);
  }

  async sign(bytes) {
    return new Uint8Array(await crypto.subtle.sign({name: "Ed25519"},
                                                   this.keyPair.privateKey, bytes));
  }

  // PeerIdentityGetXML: what an administrator needs to invite this peer.
  async identityInfo() {
    // Canonical JSON: keys sorted, no spaces.
    const body = TEXT.encode(JSON.stringify({
      classifier: this.classifier, friendlyName: this.friendlyName,
      publicKey: b64(this.publicKey), version: "1.0"}));
    const signature = await this.sign(concat(TEXT.encode("peergroup.v1 identity\0"), body));
    return JSON.stringify({PEERIDENTITYINFO: {body: b64(body), signature: b64(signature)}});
  }
}

export class PeerGroupClient {
  constructor(socket, hello) {
    this.socket = socket;
    this.challenge = unb64(hello.challenge);
    // Peer time is the broker's clock: remember how far this page's is off.
    this.peerTimeOffset = hello.peerTime - localFiletime();
    // The broker's frame limit and inbound rate (docs: "Answers of any size").
    this.limits = hello.limits || {maxMessageSize: 4 * 1024 * 1024};
    this.application = "default";
    this.nextId = 1;
    this.pending = new Map();
    this.queues = new Map();     // registration -> events not yet taken
    this.waiters = new Map();    // registration -> [{eventType, resolve}]
    this.closed = new Promise((resolve) => { this._closed = resolve; });
    socket.onmessage = (m) => this._received(JSON.parse(m.data));
    socket.onclose = (e) => {
      for (const {reject} of this.pending.values()) {
        reject(new Error(`connection closed (${e.code})`));
      }
      this.pending.clear();
      this._closed(e.code);
    };
  }

  static connect(url) {
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(url, [PROTOCOL]);
      socket.onerror = () => reject(new Error(`cannot connect to ${url}`));
      socket.onmessage = (m) => {
        const msg = JSON.parse(m.data);
        if (msg.hello) resolve(new PeerGroupClient(socket, msg.hello));
      };
    });
  }

  _received(msg) {
    if (msg.ping !== undefined) { this.socket.send(JSON.stringify({pong: msg.ping})); return; }
    if (msg.hello) { this.challenge = unb64(msg.hello.challenge); return; }
    if (msg.event) { this._event(msg.event); return; }
    const waiting = this.pending.get(msg.id);
    if (!waiting) return;
    this.pending.delete(msg.id);
    if (msg.error) waiting.reject(new PeerError(msg.error));
    else waiting.resolve({hr: msg.hr, result: msg.result});
  }

  _event(event) {
    const waiters = this.waiters.get(event.registration) || [];
    const i = waiters.findIndex((w) => w.eventType === undefined ||
                                       w.eventType === event.eventType);
    if (i >= 0) { waiters.splice(i, 1)[0].resolve(event); return; }
    if (!this.queues.has(event.registration)) this.queues.set(event.registration, []);
    this.queues.get(event.registration).push(event);
  }

  // Any method of the protocol: resolves {hr, result} or rejects PeerError.
  callHR(method, params = {}) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, {resolve, reject});
      this.socket.send(JSON.stringify({id, method, params}));
    });
  }

  async call(method, params = {}) {
    return (await this.callHR(method, params)).result;
  }

  // The next event of a registration (of one type, when given), queued or to come.
  nextEvent(registration, eventType) {
    const queue = this.queues.get(registration) || [];
    const i = queue.findIndex((e) => eventType === undefined || e.eventType === eventType);
    if (i >= 0) return Promise.resolve(queue.splice(i, 1)[0]);
    return new Promise((resolve) => {
      if (!this.waiters.has(registration)) this.waiters.set(registration, []);
      this.waiters.get(registration).push({eventType, resolve});
    });
  }

  async startup(application = "default") {
    this.application = application;
    return this.call("startup", {application});
  }

  async registerIdentity(identity) {
    const message = concat(TEXT.encode("peergroup.v1 authentication\0"), this.challenge,
                           TEXT.encode("\0" + this.application + "\0"), identity.publicKey);
    const result = await this.call("registerIdentity", {
      identityInfo: await identity.identityInfo(), signature: b64(await identity.sign(message))});
    this.challenge = unb64(result.challenge);
    return result.peerName;
  }

  async join(invitation) {
    return (await this.call("join", {invitation})).handle;
  }

  async open(groupPeerName) {
    return (await this.call("open", {groupPeerName})).handle;
  }

  async registerEvent(handle, eventTypes) {
    const registrations = eventTypes.map((e) => (typeof e === "number" ? {eventType: e} : e));
    return (await this.call("registerEvent", {handle, registrations})).registration;
  }

  connect(handle) { return this.call("connect", {handle}); }

  close(handle) { return this.call("close", {handle}); }

  peerTime() {
    return localFiletime() + this.peerTimeOffset;
  }

  async addRecord(handle, type, data, {attributes = "", expirationDays = 1} = {}) {
    const expiration = this.peerTime() + expirationDays * DAY_TICKS;
    const result = await this.call("addRecord", {handle, record: {
      type, expiration, attributes, data: b64(data)}});
    return result.id;
  }

  async getRecord(handle, id) {
    const record = (await this.call("getRecord", {handle, id})).record;
    return {...record, data: unb64(record.data)};
  }

  async openDirectConnection(handle, identity) {
    return (await this.call("openDirectConnection", {handle, identity})).connectionId;
  }

  sendData(handle, connectionId, type, data) {
    return this.call("sendData", {handle, connectionId, type, data: b64(data)});
  }

  // -- answers of any size: each follows the broker's cursors (see the
  // functions pagedCall, exportDatabaseParts, importDatabaseParts below).

  enumRecords(handle, type) {
    return pagedCall(this, "enumRecords", type ? {handle, type} : {handle}, "records");
  }

  searchRecords(handle, criteria) {
    return pagedCall(this, "searchRecords", {handle, criteria}, "records");
  }

  // PeerEnumGroups: the groups the registered identity may open.
  enumGroups() { return pagedCall(this, "enumGroups", {}, "groups"); }

  endEnumeration(cursor) { return this.call("endEnumeration", {cursor}); }

  exportDatabase(handle) { return exportDatabaseParts(this, handle); }

  importDatabase(handle, database) { return importDatabaseParts(this, handle, database); }

  disconnect() {
    this.socket.close(1000);
    return this.closed;
  }
}

// -- answers of any size (docs/peergroups-protocol.md) ------------------------

// Room left in an import part's message for the rest of the request.
const IMPORT_ENVELOPE = 1024;

// Every page of a paged listing, following its cursor.
export async function pagedCall(client, method, params, key) {
  let result = await client.call(method, params);
  const items = [...result[key]];
  while (result.cursor) {
    const next = {cursor: result.cursor};
    if (params.handle !== undefined) next.handle = params.handle;
    result = await client.call(method, next);
    items.push(...result[key]);
  }
  return items;
}

// The sealed database: its parts, as the broker sends them, joined.
export async function exportDatabaseParts(client, handle) {
  let result = await client.call("exportDatabase", {handle});
  const parts = [result.database];
  while (result.cursor) {
    result = await client.call("exportDatabase", {handle, cursor: result.cursor});
    parts.push(result.database);
  }
  return parts.join("");
}

// An import in one message when it fits, else in parts (the database is
// ASCII), paced under the session's inbound byte rate (hello.limits) at 85%
// so that no part is dropped; the broker applies it at the last part.
export async function importDatabaseParts(client, handle, database) {
  const limits = client.limits || {};
  const chunk = Math.max((limits.maxMessageSize || 4 * 1024 * 1024) - IMPORT_ENVELOPE, 1024);
  if (TEXT.encode(database).length <= chunk) {
    return client.call("importDatabase", {handle, database});
  }
  const rate = (limits.inboundBytesPerSecond || 0) * 0.85;
  const capacity = Math.max((limits.inboundBytesPerSecond || 0) * (limits.inboundBurst || 2),
                            limits.maxMessageSize || 0) * 0.85;
  let tokens = capacity;
  let last = Date.now();
  let cursor;
  let result;
  for (let at = 0; at < database.length; at += chunk) {
    const part = database.slice(at, at + chunk);
    if (rate) {
      const now = Date.now();
      tokens = Math.min(capacity, tokens + ((now - last) / 1000) * rate) - part.length -
               IMPORT_ENVELOPE;
      last = now;
      if (tokens < 0) await new Promise((r) => setTimeout(r, (-tokens / rate) * 1000));
    }
    const params = {handle, database: part, more: at + chunk < database.length};
    if (cursor) params.cursor = cursor;
    result = await client.call("importDatabase", params);
    cursor = result.cursor;
  }
  return result;
}
