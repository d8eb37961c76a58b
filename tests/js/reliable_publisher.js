// Driven by tests/test_webpubsub_reliable.py: Microsoft's
// @azure/web-pubsub-client (reliable JSON subprotocol by default) publishes
// COUNT text messages "m<i>" to group "room", up to WINDOW of them awaiting
// their ack at once, each sender pausing PAUSE ms after each ack (so the
// test can cut the socket mid-stream), while the test cuts its socket.  Each message has its
// own ackId (i + 1) and is retried with that same ackId until it is acked,
// as the SDK's README says to do so that the service can de-duplicate.
// Prints one JSON line per event on stdout: "connected", "acked" (with
// isDuplicated), "done".
"use strict";
const { WebPubSubClient } = require("@azure/web-pubsub-client");

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  const url = process.argv[2];
  const [count, window, pause] = process.argv.slice(3, 6).map(Number);
  const client = new WebPubSubClient(url, {
    messageRetryOptions: { maxRetries: 3, retryDelayInMs: 100, mode: "Fixed" },
    reconnectRetryOptions: { retryDelayInMs: 100, mode: "Fixed" },
  });
  client.on("connected", (e) => out({ event: "connected", connectionId: e.connectionId }));
  client.on("disconnected", () => out({ event: "disconnected" }));
  await client.start();

  async function publish(i) {
    // Bounded: 300 attempts of up to 4 tries 100 ms apart is a minute.
    for (let attempt = 0; attempt < 300; attempt++) {
      try {
        const result = await client.sendToGroup("room", `m${i}`, "text", { ackId: i + 1 });
        out({ event: "acked", i, isDuplicated: result.isDuplicated, attempt });
        return;
      } catch (e) {
        await sleep(50);
      }
    }
    throw new Error(`message ${i} was never acknowledged`);
  }

  let next = 0;
  async function worker() {
    while (next < count) {
      await publish(next++);
      await sleep(pause);
    }
  }
  await Promise.all(Array.from({ length: window }, worker));
  out({ event: "done" });
  client.on("stopped", () => process.exit(0));
  client.stop();
}

main().catch((e) => {
  out({ event: "error", message: String(e) });
  process.exit(1);
});
