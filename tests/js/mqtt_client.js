// MQTT.js (npm "mqtt") against the broker's MQTT face: subscribes, then
// publishes one message per QoS to itself and reports what arrives, as
// JSON lines on stdout.  Usage: node mqtt_client.js URL VERSION
//   URL: mqtt://127.0.0.1:PORT or ws://127.0.0.1:PORT/mqtt
//   VERSION: 4 (MQTT 3.1.1) or 5
const mqtt = require("mqtt");

const [url, version] = process.argv.slice(2);
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const client = mqtt.connect(url, { protocolVersion: Number(version), reconnectPeriod: 0 });
const topic = `js/${version}/${url.startsWith("ws") ? "ws" : "tcp"}`;
const seen = [];

client.on("error", (e) => { out({ event: "error", message: String(e) }); process.exit(1); });
client.on("connect", () => {
  out({ event: "connected" });
  client.subscribe(topic, { qos: 2 }, (err, granted) => {
    if (err) { out({ event: "error", message: String(err) }); process.exit(1); }
    out({ event: "subscribed", qos: granted[0].qos });
    for (const qos of [0, 1, 2]) {
      client.publish(topic, `m${qos}`, { qos }, (e) => {
        if (e) out({ event: "error", message: String(e) });
        else out({ event: "published", qos });
      });
    }
  });
});
client.on("message", (t, payload, packet) => {
  seen.push(packet.qos);
  out({ event: "message", topic: t, payload: payload.toString(), qos: packet.qos });
  if (seen.length === 3) client.end(false, () => process.exit(0));
});
