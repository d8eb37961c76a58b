"""
The MQTT face in a real C{twistd broker} process: persistent sessions and
retained messages across a SIGKILL, and the clients the issue names
besides paho: Debian's C{mosquitto_pub}/C{mosquitto_sub} and npm C{mqtt}
(MQTT.js) over TCP and WebSocket.
"""

import shutil

import treq
from twisted.internet import defer, reactor, utils
from twisted.trial.unittest import TestCase

from tests.mqttharness import MQTT_SECTION, Paho, sleep, v5props
from tests.nodejs import JSONLines, requireNode, spawnNode
from tests.test_tap import TwistdTestsMixin, configFile
from tests.tools import requireTool

LISTENERS = ["mqtt.listen[0]", "mqtt.websocket.listen[0]", "admin.listen[0]"]


class DefaultsTests(TestCase):

    def test_embeddedDefault(self):
        """
        The embedded configuration serves MQTT on loopback: TCP 1883,
        WebSocket 8083, TLS 8883, hub "mqtt", persistence on.
        """
        from broker import config
        mqtt = config.parse(config.defaultText())["mqtt"]
        self.assertTrue(mqtt["enabled"])
        self.assertEqual((mqtt["listen"], mqtt["websocket"]["listen"], mqtt["tls"]["listen"]),
                         (["tcp:1883:interface=127.0.0.1"], ["tcp:8083:interface=127.0.0.1"],
                          ["tcp:8883:interface=127.0.0.1"]))
        self.assertEqual((mqtt["hub"], mqtt["persistence"]), ("mqtt", True))


def writeConfig(testCase):
    return configFile(testCase,
                      '[admin]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                      '[webpubsub]\nenabled = false\n[iot]\nenabled = false\n'
                      + MQTT_SECTION.format(mqtt="").replace(
                          '[mqtt.tls]\nlisten = ["tcp:0:interface=127.0.0.1"]\n', ""))


class ProcessTests(TwistdTestsMixin, TestCase):
    timeout = 120

    def setUp(self):
        self.directory, self.config = writeConfig(self)
        self.addCleanup(sleep, 0.3)

    @defer.inlineCallbacks
    def start(self):
        proc = self.spawn(["-n", "--pidfile=", "broker", "--config", self.config.path],
                          self.directory, LISTENERS)
        ports = yield proc.listening
        return proc, ports

    @defer.inlineCallbacks
    def persistent(self, port, clientId, version):
        c = Paho(self, port, clientId=clientId, version=version, clean=False)
        props = v5props("CONNECT", SessionExpiryInterval=3600) if version == 5 else None
        connack = yield c.connect(properties=props)
        return c, connack

    @defer.inlineCallbacks
    def test_persistentSessionAcrossSigkill(self):
        """
        Persistent sessions (3.1.1 clean session 0; 5.0 session expiry)
        keep their subscriptions and their queued QoS 1 and 2 messages
        across a SIGKILL of the broker; QoS 0 is not queued; retained
        messages survive too.
        """
        proc, ports = yield self.start()
        port = ports["mqtt.listen[0]"]
        for clientId, version in (("p311", 4), ("p5", 5)):
            c, connack = yield self.persistent(port, clientId, version)
            self.assertFalse(connack[0])
            yield c.subscribe("d/#", 2 if version == 4 else 1)
            yield c.disconnect()
        pub = Paho(self, port, version=5)
        yield pub.connect()
        yield pub.publish("d/x", b"m0", 0)
        yield pub.publish("d/x", b"m1", 1)
        yield pub.publish("d/x", b"m2", 2)
        yield pub.publish("ret/x", b"kept", 1, retain=True)
        yield pub.stop()
        proc.transport.signalProcess("KILL")
        yield proc.ended
        proc, ports = yield self.start()
        port = ports["mqtt.listen[0]"]
        for clientId, version, qos2 in (("p311", 4, 2), ("p5", 5, 1)):
            c, connack = yield self.persistent(port, clientId, version)
            self.assertTrue(connack[0], clientId)
            yield c.waitMessages(2)
            yield sleep(0.3)
            self.assertEqual([m[:3] for m in c.messages],
                             [("d/x", b"m1", 1), ("d/x", b"m2", qos2)], clientId)
            yield c.stop()
        late = Paho(self, port, version=4)
        yield late.connect()
        yield late.subscribe("ret/#", 1)
        got = yield late.waitMessages(1)
        self.assertEqual(got[0][:4], ("ret/x", b"kept", 1, True))
        yield late.stop()
        self.assertNotIn("Traceback", proc.text())

    @defer.inlineCallbacks
    def test_mosquittoClients(self):
        """
        C{mosquitto_sub} receives what C{mosquitto_pub} sends at each QoS,
        both protocol versions, and a retained message.
        """
        sub, pub = shutil.which("mosquitto_sub"), shutil.which("mosquitto_pub")
        requireTool(sub is not None and pub is not None,
                    "mosquitto-clients is not installed (scripts/test installs it)")
        proc, ports = yield self.start()
        port = str(ports["mqtt.listen[0]"])
        for version in ("mqttv311", "mqttv5"):
            topic = f"mosq/{version}"
            received = utils.getProcessOutputAndValue(
                sub, ["-h", "127.0.0.1", "-p", port, "-V", version, "-q", "2", "-t", topic,
                      "-C", "3", "-v", "-W", "20", "-i", f"sub-{version}"])
            # mosquitto_sub has subscribed once its topic is a group of
            # the hub (/metrics).
            yield self.waitForGroups(ports, 1)
            for qos in ("0", "1", "2"):
                out, err, code = yield utils.getProcessOutputAndValue(
                    pub, ["-h", "127.0.0.1", "-p", port, "-V", version, "-q", qos, "-t", topic,
                          "-m", f"q{qos}"])
                self.assertEqual(code, 0, err)
            out, err, code = yield received
            self.assertEqual(code, 0, err)
            self.assertEqual(out.decode().splitlines(),
                             [f"{topic} q0", f"{topic} q1", f"{topic} q2"])
        out, err, code = yield utils.getProcessOutputAndValue(
            pub, ["-h", "127.0.0.1", "-p", port, "-q", "1", "-r", "-t", "mosq/ret",
                  "-m", "kept"])
        self.assertEqual(code, 0, err)
        out, err, code = yield utils.getProcessOutputAndValue(
            sub, ["-h", "127.0.0.1", "-p", port, "-t", "mosq/#", "-C", "1", "-v", "-W", "10",
                  "--retained-only"])
        self.assertEqual((code, out.decode().strip()), (0, "mosq/ret kept"), err)

    @defer.inlineCallbacks
    def waitForGroups(self, ports, n):
        url = f"http://127.0.0.1:{ports['admin.listen[0]']}/metrics"
        for _ in range(200):
            response = yield treq.get(url, reactor=reactor, persistent=False)
            text = (yield treq.content(response)).decode()
            if f'broker_groups{{hub="mqtt"}} {float(n)}' in text:
                return
            yield sleep(0.05)
        self.fail("the subscription never showed up")

    @defer.inlineCallbacks
    def test_mqttJs(self):
        """
        MQTT.js (npm mqtt), 3.1.1 and 5.0, over TCP and WebSocket: each
        QoS to itself.
        """
        requireNode("mqtt")
        proc, ports = yield self.start()
        urls = [f"mqtt://127.0.0.1:{ports['mqtt.listen[0]']}",
                f"ws://127.0.0.1:{ports['mqtt.websocket.listen[0]']}/mqtt"]
        for url in urls:
            for version in ("4", "5"):
                p = JSONLines()
                spawnNode(self, p, "mqtt_client.js", url, version)
                yield p.ended
                self.assertEqual(p.events("error"), [], p.stderr)
                self.assertEqual(sorted(e["qos"] for e in p.events("message")), [0, 1, 2],
                                 (url, version, p.lines, p.stderr))
                self.assertEqual(p.events("subscribed"), [{"event": "subscribed", "qos": 2}])

    @defer.inlineCallbacks
    def test_drainOnSigterm(self):
        """
        SIGTERM: a 5.0 client is told DISCONNECT 0x8B (server shutting
        down), a 3.1.1 client is closed, and the broker ends cleanly.
        """
        proc, ports = yield self.start()
        v5 = Paho(self, ports["mqtt.listen[0]"], version=5)
        yield v5.connect()
        v4 = Paho(self, ports["mqtt.listen[0]"], version=4)
        yield v4.connect()
        proc.transport.signalProcess("TERM")
        reason = yield v5.waitDisconnected()
        self.assertEqual(reason, 0x8B)
        yield v4.waitDisconnected()
        yield proc.ended
        self.assertNotIn("Traceback", proc.text())
