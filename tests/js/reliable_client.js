// Driven by tests/test_webpubsub_reliable.py: Microsoft's
// @azure/web-pubsub-client (reliable JSON subprotocol by default) against
// the broker.  Prints one JSON line per event on stdout; reads commands
// ("send <text>", "stop") one per line on stdin.
"use strict";
const { WebPubSubClient } = require("@azure/web-pubsub-client");
const readline = require("readline");

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

async function main() {
  const client = new WebPubSubClient(process.argv[2]);
  client.on("connected", (e) => out({ event: "connected", connectionId: e.connectionId }));
  client.on("disconnected", (e) => out({ event: "disconnected" }));
  client.on("group-message", (e) =>
    out({ event: "group", group: e.message.group, data: e.message.data,
          sequenceId: e.message.sequenceId }));
  await client.start();
  await client.joinGroup("room");
  out({ event: "joined" });
  const rl = readline.createInterface({ input: process.stdin });
  for await (const line of rl) {
    if (line.startsWith("send ")) {
      await client.sendToGroup("room", line.slice(5), "text");
      out({ event: "sent", data: line.slice(5) });
    } else if (line === "stop") {
      break;
    }
  }
  rl.close();
  client.on("stopped", () => {
    out({ event: "stopped" });
    process.exit(0);
  });
  client.stop();
}

main().catch((e) => {
  out({ event: "error", message: String(e) });
  process.exit(1);
});
