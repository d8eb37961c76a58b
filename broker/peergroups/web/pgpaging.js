// pgpaging.js: answers of any size (docs/peergroups-protocol.md, "Answers
// of any size"): following the cursors of paged listings, reading a
// chunked export and uploading a chunked import. A broker that predates
// paging answers in one message without a cursor, which these functions
// take as the whole answer, so they work against either.
//
// `call(method, params)` is PeerGroupClient.call; `limits` is the hello's
// `limits` ({maxMessageSize, inboundMessagesPerSecond,
// inboundBytesPerSecond, inboundBurst}; absent or 0 = no limit).

import {PeerError} from "./pgerrors.js";

// Every item of a paged listing: the first page with `params`, then the
// next with `cursor` until an answer has none. `key` names the list in the
// result ("records", "groups"). A failed page releases the broker's
// cursor (any error does, docs/peergroups-protocol.md).
export async function collectPages(call, method, params, key, {count} = {}) {
  const first = {...params};
  if (count !== undefined) first.count = count;
  let result = await call(method, first);
  const items = [...(result[key] || [])];
  const next = {};
  if (params.handle !== undefined) next.handle = params.handle;
  if (count !== undefined) next.count = count;
  while (result.cursor) {
    const cursor = result.cursor;
    result = await call(method, {...next, cursor});
    for (const item of result[key] || []) items.push(item);
  }
  return items;
}

// The whole sealed database string of a (possibly chunked) export.
export async function exportChunks(call, handle) {
  let result = await call("exportDatabase", {handle});
  const parts = [result.database];
  while (result.cursor) {
    result = await call("exportDatabase", {handle, cursor: result.cursor});
    parts.push(result.database);
  }
  const database = parts.join("");
  if (result.size !== undefined && database.length !== result.size) {
    throw new PeerError("E_UNEXPECTED",
                        `export of ${database.length} characters, announced ${result.size}`);
  }
  return database;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Room left in a message for the database part: the request's envelope
// (id, method, handle, cursor, more) is well under this.
const ENVELOPE = 512;

// Import `database` (the sealed string), in one request when it fits in
// `limits.maxMessageSize`, else in parts paced under the inbound rate.
// Resolves the last answer ({imported}).
export async function importChunks(call, handle, database, limits = {}) {
  const max = (limits && limits.maxMessageSize) || 0;
  if (!max || database.length + ENVELOPE <= max) {
    return call("importDatabase", {handle, database});
  }
  const partSize = Math.max(1, max - ENVELOPE);
  const bytesPerSecond = limits.inboundBytesPerSecond || 0;
  const messagesPerSecond = limits.inboundMessagesPerSecond || 0;
  let cursor;
  let sent = 0;
  const started = Date.now();
  let messages = 0;
  for (let at = 0; at < database.length; at += partSize) {
    const part = database.slice(at, at + partSize);
    const more = at + partSize < database.length;
    const params = {handle, database: part};
    if (more) params.more = true;
    if (cursor !== undefined) params.cursor = cursor;
    // Stay under the session's inbound rate: wait until what was sent,
    // plus this part, is within the allowance since the first part.
    const need = Math.max(bytesPerSecond ? (sent + part.length) / bytesPerSecond : 0,
                          messagesPerSecond ? (messages + 1) / messagesPerSecond : 0);
    const wait = need * 1000 - (Date.now() - started);
    if (wait > 0 && at > 0) await sleep(wait);
    // An error releases the upload at the broker: nothing was applied.
    const result = await call("importDatabase", params);
    sent += part.length;
    messages += 1;
    if (!more) return result;
    cursor = result.cursor;
  }
  throw new PeerError("E_UNEXPECTED", "empty database");
}
