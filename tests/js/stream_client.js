// Driven by tests/test_webpubsub_streams.py: Microsoft's
// @azure/web-pubsub-client group streams (openGroupStream / onGroupStream),
// unchanged.  Usage: node stream_client.js SENDER_URL RECEIVER_URL FRAGMENTS PAUSE
// The receiver joins group "g" and takes every stream from its start; the
// sender opens stream "whole" and writes FRAGMENTS text fragments "f<i>"
// (PAUSE ms apart, so the test can cut its socket meanwhile), then a JSON
// and a binary one, and ends it; then opens stream "broken", writes one
// fragment and aborts it.  Prints JSON lines: "ready" (once both are
// started and joined: the test may cut sockets from then on), "written",
// "stream" (per stream the receiver completed: its fragments as
// [dataType, data] and its error), "done".
"use strict";
const { WebPubSubClient } = require("@azure/web-pubsub-client");

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  const [senderUrl, receiverUrl] = process.argv.slice(2, 4);
  const [fragments, pause] = process.argv.slice(4, 6).map(Number);
  const options = { reconnectRetryOptions: { retryDelayInMs: 100, mode: "Fixed" } };
  const receiver = new WebPubSubClient(receiverUrl, options);
  const sender = new WebPubSubClient(senderUrl, options);
  const finished = [];
  const allDone = new Promise((resolve) => {
    receiver.onGroupStream(async (stream) => {
      const parts = [];
      let error = null;
      try {
        for await (const m of stream) {
          parts.push([m.dataType, m.dataType === "binary"
            ? Buffer.from(m.data).toString("base64") : m.data, m.stream.streamSequenceId]);
        }
      } catch (e) {
        error = { name: e.name, message: e.message, userErrorCode: e.userErrorCode };
      }
      out({ event: "stream", streamId: stream.streamId, group: stream.groupName, parts, error });
      finished.push(stream.streamId);
      if (finished.length === 2) resolve();
    }, { handleFromStart: true });
  });
  await receiver.start();
  await receiver.joinGroup("g");
  await sender.start();
  out({ event: "ready" });

  const whole = await sender.openGroupStream("g", { streamId: "whole" });
  for (let i = 0; i < fragments; i++) {
    await whole.write(`f${i}`, "text");
    if (pause) await sleep(pause);
  }
  await whole.write({ n: 1 }, "json");
  await whole.write(new Uint8Array([0, 1, 255]).buffer, "binary");
  await whole.end();
  out({ event: "written", streamId: "whole" });

  const broken = await sender.openGroupStream("g", { streamId: "broken" });
  await broken.write("partial", "text");
  await broken.abort({ message: "went wrong", userErrorCode: "E42" });
  out({ event: "written", streamId: "broken" });

  await Promise.race([allDone, sleep(20000)]);
  out({ event: "done" });
  sender.stop();
  receiver.stop();
}

main().catch((e) => {
  out({ event: "failed", message: String(e && e.stack || e) });
  process.exit(1);
});
