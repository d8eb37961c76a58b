// peergroup.js: a browser peer for the broker's peer-groups face
// (protocol peergroup.v1, docs/peergroups-protocol.md). Served by the
// broker at /peergroups/peergroup.js with its modules (pgerrors.js,
// pgcrypto.js, pgstore.js, pgpaging.js); ES modules, no dependencies.
//
// Everything broker.peergroups.client (Python) does, with the same method
// names and the same errors (PeerError: name = the HRESULT name, hr = its
// value): create, join, passwordJoin, open, connect, close, delete,
// invitations, issueCredentials (from identity info or an enumMembers
// entry), members, properties, records (listings follow the broker's
// cursors), events, direct connections, export/import (chunked when large).
// Identities and the groups they joined live in IndexedDB (pgstore.js), so
// a reloaded page reopens its groups with no new invitation:
//
//   import {Identity, PeerGroupClient, EVENT, enumIdentities} from "/peergroups/peergroup.js";
//   const [known] = await enumIdentities();
//   const me = known ? await Identity.load(known.peerName)
//                    : await Identity.generate("alice", "Alice");
//   const pg = await PeerGroupClient.connect("wss://broker.example/peergroups/v1");
//   await pg.startup("chat");
//   await pg.registerIdentity(me);
//   const h = await pg.create("Team");            // or pg.join(invitation), pg.open(name)
//   const reg = await pg.registerEvent(h, [EVENT.STATUS_CHANGED, EVENT.RECORD_CHANGED]);
//   await pg.connect(h);
//   await pg.nextEvent(reg, EVENT.STATUS_CHANGED);
//
// FILETIMEs that a JavaScript number cannot hold exactly (certificate ends)
// are BigInts; peerTime() is a BigInt; any FILETIME parameter may be either.

import {HRESULTS, PeerError} from "./pgerrors.js";
import {
  Certificate, INFINITE_TICKS, ROLE, TICKS, authMessage, b64, canonicalText, chainFromJSON,
  makeVerifier,
  parseIdentityInfo, parseJSON, passwordAuthMessage, passwordProof, peerName, toFiletime,
  unb64, wireJSON,
} from "./pgcrypto.js";
import {Identity, deleteIdentity, enumGroups, enumIdentities, exportIdentity, forgetGroup,
        loadGroup, saveGroup} from "./pgstore.js";
import {collectPages, exportChunks, importChunks} from "./pgpaging.js";

export {HRESULTS, PeerError, Identity, ROLE, b64, unb64, Certificate, enumIdentities,
        enumGroups, exportIdentity, deleteIdentity, loadGroup, parseJSON, canonicalText};

export const PROTOCOL = "peergroup.v1";
export const HIGHEST_VERSION = 0x0101;

export const EVENT = Object.freeze({
  STATUS_CHANGED: 1, PROPERTY_CHANGED: 2, RECORD_CHANGED: 3, DIRECT_CONNECTION: 4,
  NEIGHBOR_CONNECTION: 5, INCOMING_DATA: 6, MEMBER_CHANGED: 8, CONNECTION_FAILED: 10,
  AUTHENTICATION_FAILED: 11,
});

export const STATUS = Object.freeze({LISTENING: 0x1, HAS_CONNECTIONS: 0x2});
export const STORE_CREDENTIALS = 0x1;
export const MEMBER_PRESENT = 0x1;
export const CONNECTION = Object.freeze({NEIGHBOR: 0x1, DIRECT: 0x2});
export const GMC_AUTHENTICATION = 0x1;
export const PASSWORD_AUTHENTICATION = 0x2;

const EPOCH_MS = 11644473600000;

// Record data travels as base64; pages get bytes.
function decodeRecord(record) {
  return {...record, data: unb64(record.data || "")};
}

export class PeerGroupClient {
  constructor(socket, hello) {
    this.socket = socket;
    this.hello = hello;
    this.challenge = unb64(hello.challenge);
    // Peer time is the broker's clock: how far this page's is off, in ms.
    this.peerTimeOffsetMs = Number(toFiletime(hello.peerTime) / 10000n) -
      (Date.now() + EPOCH_MS);
    this.application = "default";
    this.identity = null;
    this.issuerKey = null;
    this.nextId = 1;
    this.pending = new Map();
    this.pings = new Map();
    this.handles = new Map();    // handle -> {gpn, password?, salt?, iterations?, challenge?}
    this.queues = new Map();     // registration -> events not yet taken
    this.waiters = new Map();    // registration -> [{match, resolve, reject}]
    this.allEvents = [];
    this.closed = new Promise((resolve) => { this._closed = resolve; });
    socket.onmessage = (m) => this._received(parseJSON(m.data));
    socket.onclose = (e) => this._lost(`closed (${e.code})`);
  }

  // A session with the broker at `url` (ws[s]://host:port/peergroups/v1),
  // once its hello has arrived.
  static connect(url) {
    return new Promise((resolve, reject) => {
      let socket;
      try {
        socket = new WebSocket(url, [PROTOCOL]);
      } catch (e) {
        reject(new PeerError("PEER_E_CONNECTION_FAILED", `cannot connect to ${url}: ${e}`));
        return;
      }
      socket.onerror = () => reject(new PeerError("PEER_E_CONNECTION_FAILED",
                                                  `cannot connect to ${url}`));
      socket.onclose = (e) => reject(new PeerError("PEER_E_CONNECTION_REFUSED",
                                                   `handshake refused (${e.code})`));
      socket.onmessage = (m) => {
        const msg = parseJSON(m.data);
        if (msg.hello) resolve(new PeerGroupClient(socket, msg.hello));
      };
    });
  }

  // -- wire -----------------------------------------------------------------

  _received(msg) {
    if (msg === null || typeof msg !== "object") return;
    if (msg.hello) { this.hello = msg.hello; this.challenge = unb64(msg.hello.challenge); return; }
    if (msg.event) { this._event(msg.event); return; }
    if (msg.ping !== undefined) { this._send({pong: msg.ping}); return; }
    if (msg.pong !== undefined) {
      const resolve = this.pings.get(msg.pong);
      this.pings.delete(msg.pong);
      if (resolve) resolve();
      return;
    }
    const waiting = this.pending.get(msg.id);
    if (!waiting) return;
    this.pending.delete(msg.id);
    if (msg.error) waiting.reject(PeerError.fromJSON(msg.error));
    else waiting.resolve({hr: msg.hr || 0, result: msg.result || {}});
  }

  _lost(reason) {
    const error = () => new PeerError("PEER_E_CONNECTION_FAILED", `connection lost: ${reason}`);
    for (const {reject} of this.pending.values()) reject(error());
    this.pending.clear();
    for (const waiters of this.waiters.values()) for (const w of waiters) w.reject(error());
    this.waiters.clear();
    this._closed(reason);
  }

  _send(obj) {
    if (this.socket.readyState !== WebSocket.OPEN) {
      throw new PeerError("PEER_E_CONNECTION_FAILED", "the connection is closed");
    }
    this.socket.send(wireJSON(obj));
  }

  // Any method of the protocol: resolves {hr, result} or rejects PeerError.
  callHR(method, params = {}) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, {resolve, reject});
      try {
        this._send({id, method, params});
      } catch (e) {
        this.pending.delete(id);
        reject(e);
      }
    });
  }

  async call(method, params = {}) {
    return (await this.callHR(method, params)).result;
  }

  // A round trip: once it resolves, everything the broker wrote to this
  // session before (events included) has been received.
  sync() {
    const token = this.nextId++;
    return new Promise((resolve) => {
      this.pings.set(token, resolve);
      this._send({ping: token});
    });
  }

  // Drop the connection; the broker sees the session end.
  disconnect() {
    this.socket.close(1000);
    return this.closed;
  }

  // -- events ---------------------------------------------------------------

  _event(event) {
    this.allEvents.push(event);
    const info = this.handles.get(event.handle);
    if (info && event.passwordChallenge) info.challenge = event.passwordChallenge;
    const waiters = this.waiters.get(event.registration) || [];
    const i = waiters.findIndex((w) => w.match(event));
    if (i >= 0) { waiters.splice(i, 1)[0].resolve(event); return; }
    if (!this.queues.has(event.registration)) this.queues.set(event.registration, []);
    this.queues.get(event.registration).push(event);
  }

  // PeerGroupGetEventData: {hr: S_OK, event} for the oldest queued event
  // of the registration, or {hr: PEER_S_NO_EVENT_DATA, event: null}.
  getEventData(registration) {
    const queue = this.queues.get(registration);
    if (queue && queue.length) return {hr: HRESULTS.S_OK, event: queue.shift()};
    return {hr: HRESULTS.PEER_S_NO_EVENT_DATA, event: null};
  }

  queued(registration) {
    return [...(this.queues.get(registration) || [])];
  }

  // The next event of `registration` of `eventType` (any when undefined)
  // whose payload has `fields` (matched at the top or one level down),
  // queued or to come.
  nextEvent(registration, eventType, fields = {}) {
    const match = (event) => {
      if (eventType !== undefined && eventType !== null && event.eventType !== eventType) {
        return false;
      }
      return Object.entries(fields).every(([k, v]) => {
        if (k in event) return event[k] === v;
        return Object.values(event).some((sub) => sub && typeof sub === "object" &&
                                                 k in sub && sub[k] === v);
      });
    };
    const queue = this.queues.get(registration) || [];
    const i = queue.findIndex(match);
    if (i >= 0) return Promise.resolve(queue.splice(i, 1)[0]);
    return new Promise((resolve, reject) => {
      if (!this.waiters.has(registration)) this.waiters.set(registration, []);
      this.waiters.get(registration).push({match, resolve, reject});
    });
  }

  // PeerGroupRegisterEvent: event types, [eventType, typeGUID] pairs or
  // {eventType, type} objects. Resolves the registration id.
  async registerEvent(handle, registrations) {
    const entries = registrations.map((r) => {
      if (typeof r === "number") return {eventType: r};
      if (Array.isArray(r)) return {eventType: r[0], type: r[1]};
      return r;
    });
    return (await this.call("registerEvent", {handle, registrations: entries})).registration;
  }

  unregisterEvent(registration) {
    return this.call("unregisterEvent", {registration});
  }

  // -- start-up and identity ------------------------------------------------

  async startup(application = "default", version = HIGHEST_VERSION) {
    const result = await this.call("startup", {application, version});
    this.application = application;
    if (result.issuerKey) this.issuerKey = unb64(result.issuerKey);
    return result;
  }

  shutdown() {
    return this.call("shutdown");
  }

  // Prove this session holds `identity`'s key (signs the broker's one-time
  // challenge). Resolves the peer name.
  async registerIdentity(identity) {
    const signature = await identity.sign(authMessage(this.challenge, this.application,
                                                      identity.publicKey));
    const result = await this.call("registerIdentity", {
      identityInfo: await identity.identityInfo(), signature: b64(signature)});
    if (result.challenge) this.challenge = unb64(result.challenge);
    this.identity = identity;
    return result.peerName;
  }

  // Peer time now (the broker's clock), a FILETIME BigInt at ms resolution.
  peerTime() {
    return BigInt(Date.now() + EPOCH_MS + this.peerTimeOffsetMs) * 10000n;
  }

  // -- the identity's groups, kept for reopening -------------------------------

  async _remember(groupPeerName, fields) {
    if (this.identity && this.identity.persisted) {
      await saveGroup(this.identity.peerName, groupPeerName,
                      {application: this.application, ...fields, lastUsed: Date.now()});
    }
  }

  _requireIdentity() {
    if (!this.identity) throw new PeerError("PEER_E_NOT_INITIALIZED", "no identity registered");
    return this.identity;
  }

  // -- groups ---------------------------------------------------------------

  // PeerGroupCreate: a new group key (non-extractable, kept in IndexedDB
  // with the group's entry), its root certificate and the creator's
  // infinite administrator GMC, signed here. A password group (password
  // given) sends the broker only a SCRAM verifier. Resolves the handle.
  async create(friendlyName = "", {classifier = "group", password, passwordRole = ROLE.MEMBER,
                                   ...properties} = {}) {
    const me = this._requireIdentity();
    const groupKeys = await crypto.subtle.generateKey({name: "Ed25519"}, false,
                                                      ["sign", "verify"]);
    const groupPub = new Uint8Array(await crypto.subtle.exportKey("raw", groupKeys.publicKey));
    const gpn = await peerName(groupPub, classifier);
    const notBefore = this.peerTime() - 3600n * TICKS;
    const notAfter = notBefore + INFINITE_TICKS;
    const grc = await Certificate.make(groupKeys.privateKey, groupPub, "GRC", gpn, groupPub,
                                       gpn, [ROLE.ADMIN], notBefore, notAfter, {friendlyName});
    const gmc = await Certificate.make(groupKeys.privateKey, groupPub, "GMC", gpn, me.publicKey,
                                       me.peerName, [ROLE.ADMIN], notBefore, notAfter,
                                       {friendlyName: me.friendlyName});
    const props = {...properties, friendlyName, classifier};
    const params = {chain: [grc.toJSON(), gmc.toJSON()]};
    if (password !== undefined && password !== null) {
      if (!this.issuerKey) throw new PeerError("E_UNEXPECTED", "startup gave no issuer key");
      if (props.authenticationSchemes === undefined) {
        props.authenticationSchemes = GMC_AUTHENTICATION | PASSWORD_AUTHENTICATION;
      }
      props.passwordVerifier = await makeVerifier(password);
      props.groupPasswordRole = passwordRole;
      const issuerRole = passwordRole === ROLE.ADMIN ? ROLE.ADMIN : ROLE.INVITING_MEMBER;
      const issuer = await Certificate.make(
        me.privateKey, me.publicKey, "GMC", gpn, this.issuerKey,
        await peerName(this.issuerKey, "broker"), [issuerRole], notBefore, notAfter,
        {friendlyName: "broker"});
      params.issuer = [grc.toJSON(), gmc.toJSON(), issuer.toJSON()];
    }
    const result = await this.call("create", {properties: props, ...params});
    this.handles.set(result.handle, {gpn: result.groupPeerName});
    await this._remember(result.groupPeerName, {
      friendlyName, role: ROLE.ADMIN, chain: params.chain, groupKey: groupKeys.privateKey,
      created: true});
    return result.handle;
  }

  // PeerGroupJoin with an invitation made for this identity.
  async join(invitation) {
    const result = await this.call("join", {invitation});
    this.handles.set(result.handle, {gpn: result.groupPeerName});
    let fields = {};
    try {
      const inv = parseJSON(invitation).PEERINVITATION;
      const chain = chainFromJSON(inv.gmc);
      fields = {friendlyName: inv.groupFriendlyName || "", chain: inv.gmc,
                role: chain[chain.length - 1].role};
    } catch (e) {
      // The broker took it, so it parses; keep the name only if not.
    }
    await this._remember(result.groupPeerName, fields);
    return result.handle;
  }

  // PeerGroupPasswordJoin: the password stays in this page; connect sends
  // only a proof bound to the broker's challenge. Resolves {hr, handle}
  // (hr = PEER_S_ALREADY_A_MEMBER for a member).
  async passwordJoin(invitation, password) {
    const {hr, result} = await this.callHR("passwordJoin", {invitation});
    const info = {gpn: result.groupPeerName};
    if (result.passwordChallenge) {
      Object.assign(info, {password, salt: unb64(result.salt), iterations: result.iterations,
                           challenge: result.passwordChallenge});
    }
    this.handles.set(result.handle, info);
    let friendlyName = "";
    try { friendlyName = parseJSON(invitation).PEERINVITATION.groupFriendlyName || ""; }
    catch (e) { /* the broker took it */ }
    await this._remember(result.groupPeerName, {friendlyName, password: true});
    return {hr, handle: result.handle};
  }

  // PeerGroupOpen: a group this identity is a member of (after a reload:
  // Identity.load, registerIdentity, then open; no invitation needed).
  async open(groupPeerName) {
    const result = await this.call("open", {groupPeerName});
    this.handles.set(result.handle, {gpn: groupPeerName});
    await this._remember(groupPeerName, {});
    return result.handle;
  }

  // PeerGroupConnect: asynchronous as in Windows: success or failure
  // arrives as STATUS_CHANGED or CONNECTION_FAILED. Resolves {hr, result}.
  async connect(handle) {
    const info = this.handles.get(handle) || {};
    const params = {handle};
    if (info.password !== undefined && this.identity) {
      const message = passwordAuthMessage(unb64(info.challenge), info.gpn,
                                          this.identity.peerName);
      params.passwordProof = b64(await passwordProof(info.password, info.salt,
                                                     info.iterations, message));
    }
    return this.callHR("connect", params);
  }

  close(handle) {
    return this.call("close", {handle});
  }

  // PeerGroupDelete: this identity's membership, here and at the broker.
  async delete(groupPeerName) {
    await this.call("delete", {groupPeerName});
    if (this.identity && this.identity.persisted) {
      await forgetGroup(this.identity.peerName, groupPeerName);
    }
  }

  groupPeerName(handle) {
    const info = this.handles.get(handle);
    if (!info) throw new PeerError("PEER_E_INVALID_GROUP", `no handle ${handle} here`);
    return info.gpn;
  }

  getStatus(handle) {
    return this.call("getStatus", {handle}).then((r) => r.status);
  }

  // The credentials in effect: {chain, credentialInfo}; the chain is kept
  // with the group's entry.
  async getCredentials(handle) {
    const result = await this.call("getCredentials", {handle});
    const info = this.handles.get(handle);
    if (info) {
      const chain = chainFromJSON(result.chain);
      await this._remember(info.gpn, {chain: result.chain, role: chain[chain.length - 1].role});
    }
    return result;
  }

  // PeerEnumGroups at the broker: the groups of this application the
  // registered identity may open ({groupPeerName, friendlyName, roles,
  // validityEnd, pendingRoles, status, ...}), every page. The groups kept
  // in this browser are the module's enumGroups(peerName).
  enumGroups({count} = {}) {
    return collectPages((m, p) => this.call(m, p), "enumGroups", {}, "groups", {count});
  }

  // Release a listing's cursor before its last page (the library's own
  // listings follow every page, so this is for callers paging by hand).
  endEnumeration(cursor) { return this.call("endEnumeration", {cursor}); }

  // -- invitations and credentials --------------------------------------------

  // A GMC for `subject` (identity info string, enumMembers entry, or its
  // credentialInfo) signed with this identity's key under its own chain.
  async _signFor(handle, subject, roles, expiration, validityStart) {
    const me = this._requireIdentity();
    const creds = await this.call("getCredentials", {handle});
    const chain = chainFromJSON(creds.chain);
    const mine = chain[chain.length - 1];
    let info;
    if (typeof subject === "string") {
      info = await parseIdentityInfo(subject);
    } else {
      const ci = subject && (subject.credentialInfo || subject);
      if (!ci || typeof ci.publicKey !== "string" || typeof ci.peerName !== "string") {
        throw new PeerError("PEER_E_INVALID_CREDENTIAL_INFO",
                            "not an identity info, member entry or credential info");
      }
      info = {publicKey: unb64(ci.publicKey), peerName: ci.peerName,
              friendlyName: ci.friendlyName || subject.friendlyName || ""};
    }
    const now = this.peerTime() - 60n * TICKS;
    const notBefore = validityStart !== undefined && validityStart !== null
      ? toFiletime(validityStart) : (mine.notBefore > now ? mine.notBefore : now);
    const notAfter = expiration !== undefined && expiration !== null
      ? toFiletime(expiration) : mine.notAfter;
    const classifiers = roles.length === 1 && roles[0] === ROLE.MEMBER ? ["participant"] : [];
    return Certificate.make(me.privateKey, me.publicKey, "GMC", chain[0].group, info.publicKey,
                            info.peerName, roles, notBefore, notAfter,
                            {friendlyName: info.friendlyName, classifiers});
  }

  // PeerGroupCreateInvitation: `expiration` undefined = this member's
  // remaining lifetime. Resolves the invitation string.
  async createInvitation(handle, identityInfo, {expiration, roles = [ROLE.MEMBER],
                                                validityStart} = {}) {
    const cert = await this._signFor(handle, identityInfo, roles, expiration, validityStart);
    return (await this.call("createInvitation", {handle, certificate: cert.toJSON()})).invitation;
  }

  // PeerGroupIssueCredentials: for an identity info or an enumMembers entry;
  // flags STORE_CREDENTIALS publishes them (effective at the subject's next
  // connect). Resolves the invitation.
  async issueCredentials(handle, subject, {roles = [ROLE.MEMBER], expiration, validityStart,
                                           flags = 0} = {}) {
    const cert = await this._signFor(handle, subject, roles, expiration, validityStart);
    return (await this.call("issueCredentials", {handle, certificate: cert.toJSON(),
                                                 flags})).invitation;
  }

  async createPasswordInvitation(handle) {
    return (await this.call("createPasswordInvitation", {handle})).invitation;
  }

  // -- members, properties ----------------------------------------------------

  async enumMembers(handle, {flags = 0, identity} = {}) {
    const params = {handle, flags};
    if (identity !== undefined) params.identity = identity;
    return (await this.call("enumMembers", params)).members;
  }

  async getProperties(handle) {
    return (await this.call("getProperties", {handle})).properties;
  }

  setProperties(handle, properties) {
    return this.call("setProperties", {handle, properties});
  }

  async setPassword(handle, password) {
    await this.call("setProperties", {handle, properties: {
      passwordVerifier: await makeVerifier(password)}});
  }

  // -- records ----------------------------------------------------------------

  // PeerGroupAddRecord: `data` bytes (Uint8Array or string, UTF-8);
  // expiration = peer time + `lifetime` seconds unless given. Resolves the id.
  async addRecord(handle, recordType, data = new Uint8Array(0),
                  {expiration, attributes = "", lifetime = 3600, ...extra} = {}) {
    if (expiration === undefined || expiration === null) {
      expiration = this.peerTime() + BigInt(lifetime) * TICKS;
    }
    const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
    const record = {...extra, type: recordType, data: b64(bytes),
                    expiration: toFiletime(expiration), attributes};
    return (await this.call("addRecord", {handle, record})).id;
  }

  // PeerGroupUpdateRecord: `record` as getRecord gave it, changed (data as
  // bytes). Resolves the new version, data as bytes.
  async updateRecord(handle, record) {
    const wire = {...record};
    if (wire.data instanceof Uint8Array) wire.data = b64(wire.data);
    else if (typeof wire.data === "string") wire.data = b64(new TextEncoder().encode(wire.data));
    return decodeRecord((await this.call("updateRecord", {handle, record: wire})).record);
  }

  deleteRecord(handle, recordId) {
    return this.call("deleteRecord", {handle, id: recordId});
  }

  async getRecord(handle, recordId) {
    return decodeRecord((await this.call("getRecord", {handle, id: recordId})).record);
  }

  // PeerGroupEnumRecords: every record (of `recordType` if given), all pages.
  async enumRecords(handle, recordType, {count} = {}) {
    const params = {handle};
    if (recordType !== undefined && recordType !== null) params.type = recordType;
    const records = await collectPages((m, p) => this.call(m, p), "enumRecords", params,
                                       "records", {count});
    return records.map(decodeRecord);
  }

  async searchRecords(handle, criteria, {count} = {}) {
    const records = await collectPages((m, p) => this.call(m, p), "searchRecords",
                                       {handle, criteria}, "records", {count});
    return records.map(decodeRecord);
  }

  // PeerGroupExportDatabase: the sealed database string (every part).
  exportDatabase(handle) {
    return exportChunks((m, p) => this.call(m, p), handle);
  }

  // PeerGroupImportDatabase (not connected): in parts when larger than a
  // message. Resolves {imported}.
  importDatabase(handle, database) {
    return importChunks((m, p) => this.call(m, p), handle, database,
                        (this.hello && this.hello.limits) || {});
  }

  // -- direct connections -------------------------------------------------------

  async openDirectConnection(handle, identity) {
    return (await this.call("openDirectConnection", {handle, identity})).connectionId;
  }

  closeDirectConnection(handle, connectionId) {
    return this.call("closeDirectConnection", {handle, connectionId});
  }

  sendData(handle, connectionId, dataType, data) {
    const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
    return this.call("sendData", {handle, connectionId, type: dataType, data: b64(bytes)});
  }

  async enumConnections(handle, flags = CONNECTION.DIRECT | CONNECTION.NEIGHBOR) {
    return (await this.call("enumConnections", {handle, flags})).connections;
  }
}
