// Driven by tests/test_webpubsub_jsservice.py: Microsoft's @azure/web-pubsub
// (the service SDK) against the broker's REST API.  Usage:
//   node service_client.js <connection string> <hub>
// Reads one JSON call a line on stdin, {"id", "op", "args", "group"}: the
// SDK method `op` of the hub client (or, with "group", of
// client.group(group)) called with `args`.  Answers one JSON line each on
// stdout: {"id", "ok": true, "result"} or {"id", "ok": false, "error":
// {"name", "statusCode", "code", "message"}}.  Paged results (an async
// iterator) are read to the end and answered as a list.
"use strict";
const { WebPubSubServiceClient } = require("@azure/web-pubsub");
const readline = require("readline");

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

const [connectionString, hub] = process.argv.slice(2);
// The test broker listens on plain http (loopback): the SDK must be told.
const client = new WebPubSubServiceClient(connectionString, hub,
                                          { allowInsecureConnection: true });

async function call({ id, op, args, group }) {
  const target = group === undefined ? client : client.group(group);
  try {
    // A listing comes as a promise of an async iterator (the SDK wraps it
    // in a tracing span): awaited, then read to the end.
    let result = await target[op](...(args || []));
    if (result && typeof result[Symbol.asyncIterator] === "function") {
      const items = [];
      for await (const item of result) {
        items.push(item);
      }
      result = items;
    }
    out({ id, ok: true, result: result === undefined ? null : result });
  } catch (e) {
    out({ id, ok: false,
          error: { name: e.name, statusCode: e.statusCode, code: e.code, message: e.message } });
  }
}

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  call(JSON.parse(line));
});
rl.on("close", () => process.exit(0));
out({ ready: true, apiVersion: client.apiVersion });
