// Driven by tests/test_webpubsub_express.py: Microsoft's
// @azure/web-pubsub-client invokeEvent() against the broker, whose event
// handler is tests/js/express_handler.js.  Prints one JSON line per
// invocation, then {"event": "done"}.
"use strict";
const { WebPubSubClient } = require("@azure/web-pubsub-client");

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

async function invoke(client, name, data) {
  try {
    const result = await client.invokeEvent(name, data, "text");
    out({ event: "result", name, data: result.data, dataType: result.dataType,
          invocationId: result.invocationId });
  } catch (e) {
    out({ event: "error", name, errorName: e.errorDetail ? e.errorDetail.name : null,
          message: String(e.message) });
  }
}

async function main() {
  const client = new WebPubSubClient(process.argv[2]);
  client.on("connected", (e) => out({ event: "connected", connectionId: e.connectionId,
                                      userId: e.userId }));
  await client.start();
  for (const name of process.argv.slice(3)) {
    await invoke(client, name, "ping-" + name);
  }
  client.on("stopped", () => {
    out({ event: "done" });
    process.exit(0);
  });
  client.stop();
}

main().catch((e) => {
  out({ event: "failed", message: String(e) });
  process.exit(1);
});
