# -*- test-case-name: tests.test_mqtt_browser -*-
"""
MQTT.js in a real browser (headless Chromium), from a page of another
origin, over the browser's own WebSocket: the MQTT face's C{/mqtt} path
(MQTT 3.1.1 and 5.0) and Azure Web PubSub's MQTT endpoint
C{/clients/mqtt/hubs/{hub}} with an access token in the URL, as a web
application connects.  Each client subscribes at QoS 2 and publishes to
itself at QoS 0, 1 and 2; the page reports what arrived.
"""

import json
import os

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase
from twisted.web.server import Site
from twisted.web.static import File

from broker.auth.tokens import makeClientToken
from tests.mqttharness import ACCESS_KEY, startBroker
from tests.nodejs import JS_DIR, requireNode
from tests.tools import Page, PageReports, startChromium

PAGE = """<!doctype html>
<html><body><script src="/mqtt.min.js"></script><script>
let seq = 0;
const report = (e) => fetch("/event", {method: "POST",
                                       body: JSON.stringify({seq: seq++, ...e})});
function run(name, url, version) {
  const client = mqtt.connect(url, {protocolVersion: version, reconnectPeriod: 0,
                                    clientId: "browser-" + name});
  const topic = "browser/" + name;
  const seen = [];
  client.on("error", (e) => report({event: "error", name, message: String(e)}));
  client.on("connect", () => {
    client.subscribe(topic, {qos: 2}, (err, granted) => {
      if (err) { report({event: "error", name, message: String(err)}); return; }
      report({event: "subscribed", name, qos: granted[0].qos});
      for (const qos of [0, 1, 2]) {
        client.publish(topic, "m" + qos, {qos}, (e) => {
          if (e) report({event: "error", name, message: String(e)});
        });
      }
    });
  });
  client.on("message", (t, payload, packet) => {
    seen.push(packet.qos);
    report({event: "message", name, topic: t, payload: payload.toString(), qos: packet.qos});
    if (seen.length === 3) client.end(false, {}, () => report({event: "ended", name}));
  });
}
for (const [name, url, version] of %(clients)s) run(name, url, version);
</script></body></html>
"""


class BrowserMqttTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_mqttJsInTheBrowser(self):
        requireNode("mqtt")
        top, ports, _ = yield startBroker(self)
        ws = f"ws://127.0.0.1:{ports['mqtt.websocket.listen[0]']}"
        azure = f"{ws}/clients/mqtt/hubs/mqtt"
        token = makeClientToken(ACCESS_KEY, azure, "browser-user",
                                ["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"])
        clients = [["v4", f"{ws}/mqtt", 4], ["v5", f"{ws}/mqtt", 5],
                   ["azure", f"{azure}?access_token={token}", 5]]
        root = Page(PAGE % {"clients": json.dumps(clients)})
        events = PageReports()
        root.putChild(b"event", events)
        root.putChild(b"mqtt.min.js", File(os.path.join(JS_DIR, "node_modules", "mqtt", "dist",
                                                        "mqtt.min.js"),
                                           defaultType="text/javascript"))
        root.putChild(b"", root)
        site = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(site.stopListening)
        browser = startChromium(self, reactor, f"http://localhost:{site.getHost().port}/")

        for _ in range(600):
            if len(events.events("ended")) == len(clients) or events.events("error"):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(events.events("error"), [], browser.tail())
        for name, _, _ in clients:
            got = [e for e in events.events("message") if e["name"] == name]
            self.assertEqual(sorted((e["qos"], e["payload"], e["topic"]) for e in got),
                             [(q, f"m{q}", f"browser/{name}") for q in (0, 1, 2)],
                             (name, events.events(), browser.tail()))
            self.assertEqual([e["qos"] for e in events.events("subscribed")
                              if e["name"] == name], [2])
        self.assertEqual(len(events.events("ended")), len(clients))
