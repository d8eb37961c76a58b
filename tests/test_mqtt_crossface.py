"""
One routing core: MQTT and the other faces reach each other through core
groups (an MQTT topic is a group of the hub): a REST send to a group, a
Web PubSub client, IoT telemetry; real clients on every side (paho-mqtt,
the Azure Web PubSub service SDK, autobahn with the Web PubSub JSON
subprotocol, the IoT reference client).
"""

import base64

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from broker import config, tap

from broker.auth.tokens import makeClientToken
from broker.iot import frames
from broker.iot.client import IoTClient
from broker.iot.frames import Payload
from tests.mqttharness import ACCESS_KEY, restSendToGroup, LISTENERS, Paho, sleep, writeConfig
from tests.test_iot_face import listeningPort
from tests.wsharness import Client

REGISTRY = """
[fleets.acme]
central_key = "central-secret"
[fleets.acme.devices.d1]
key = "d1-secret"
"""


class CrossFaceTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        reg = FilePath(self.mktemp())
        reg.setContent(REGISTRY.encode())
        extra = (f'[iot]\nenabled = true\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                 f'registry_file = "{reg.path}"\n[iot.udp]\nenabled = false\n'
                 '[iot.http]\nenabled = false\n[iot.tls]\nlisten = []\n')
        self.top, self.ports, self.directory = yield self._start(extra)
        self.port = self.ports["mqtt.listen[0]"]
        self.addCleanup(sleep, 0.3)

    @defer.inlineCallbacks
    def _start(self, iot):
        """The harness's broker with the IoT face enabled."""
        directory, path = writeConfig(self)
        text = path.getContent().decode().replace("[iot]\nenabled = false\n", iot)
        path.setContent(text.encode())
        top = tap.buildService(config.load(path.path), reactor)
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        ports = {}
        for key in LISTENERS + ("iot.listen[0]",):
            port = yield listeningPort(top.getServiceNamed(key))
            ports[key] = port.getHost().port
        return top, ports, directory

    @defer.inlineCallbacks
    def mqtt(self, version=5, **kw):
        c = Paho(self, kw.pop("port", self.port), version=version, **kw)
        connack = yield c.connect()
        self.assertEqual(connack[1], 0)
        return c

    @defer.inlineCallbacks
    def webPubSub(self, groups=()):
        port = self.ports["webpubsub.listen[0]"]
        token = makeClientToken(ACCESS_KEY, f"http://127.0.0.1:{port}/client/hubs/mqtt",
                                roles=["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"],
                                groups=list(groups))
        factory = WebSocketClientFactory(
            f"ws://127.0.0.1:{port}/client/hubs/mqtt?access_token={token}",
            protocols=["json.webpubsub.azure.v1"], reactor=reactor)
        factory.protocol = Client
        factory.setProtocolOptions(autoPingInterval=0, failByDrop=False)
        proto = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        yield proto.opened
        hello = yield proto.nextJSON()
        self.assertEqual(hello["event"], "connected")
        self.addCleanup(lambda: proto.dropConnection() if proto.state != proto.STATE_CLOSED
                        else None)
        return proto

    @defer.inlineCallbacks
    def test_restSendReachesMqtt(self):
        """
        The Azure service SDK's send_to_group("a/b") reaches MQTT
        subscribers of C{a/b} and of C{a/+}, with the configured QoS (1)
        capped by theirs; a text send carries payload format indicator 1.
        """
        exact = yield self.mqtt(5)
        yield exact.subscribe("a/b", 2)
        wild = yield self.mqtt(4)
        yield wild.subscribe("a/+", 0)
        port = self.ports["webpubsub.listen[0]"]
        yield restSendToGroup(port, "a/b", "from rest")
        got = yield exact.waitMessages(1)
        self.assertEqual(got[0][:3], ("a/b", b"from rest", 1))
        self.assertEqual(got[0][4].PayloadFormatIndicator, 1)
        got = yield wild.waitMessages(1)
        self.assertEqual(got[0][:3], ("a/b", b"from rest", 0))

    @defer.inlineCallbacks
    def test_mqttPublishReachesWebPubSub(self):
        """
        An MQTT publish to C{a/b} reaches a Web PubSub member of group
        C{a/b} as a binary message (text with payload format indicator 1);
        the Web PubSub client's sendToGroup reaches an MQTT subscriber.
        """
        wps = yield self.webPubSub(groups=["a/b"])
        pub = yield self.mqtt(4)
        yield pub.publish("a/b", b"\x00\x01bin", 1)
        frame = yield wps.nextJSON()
        self.assertEqual((frame["type"], frame["from"], frame["group"], frame["dataType"]),
                         ("message", "group", "a/b", "binary"))
        self.assertEqual(base64.b64decode(frame["data"]), b"\x00\x01bin")
        sub = yield self.mqtt(5)
        yield sub.subscribe("a/#", 1)
        wps.send({"type": "sendToGroup", "group": "a/b", "dataType": "json",
                  "data": {"x": 1}, "noEcho": True})
        got = yield sub.waitMessages(1)
        self.assertEqual(got[0][:2], ("a/b", b'{"x":1}'))
        self.assertEqual(got[0][4].ContentType, "application/json")

    @defer.inlineCallbacks
    def test_iotTelemetryReachesMqtt(self):
        """
        A device's TELEMETRY goes to group C{telemetry.<device>} of its
        fleet's hub: an MQTT client of that hub (the WebSocket path
        /clients/mqtt/hubs/acme) subscribed to the topic gets it.
        """
        sub = yield self.mqtt(5, transport="websockets",
                              port=self.ports["mqtt.websocket.listen[0]"],
                              path="/clients/mqtt/hubs/acme")
        yield sub.subscribe("telemetry.d1", 1)
        wild = yield self.mqtt(4, transport="websockets",
                               port=self.ports["mqtt.websocket.listen[0]"],
                               path="/clients/mqtt/hubs/acme")
        yield wild.subscribe("#", 1)
        device = IoTClient("device", "acme", "d1", "d1-secret")
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                 self.ports["iot.listen[0]"]), device)
        yield device.authenticated
        self.addCleanup(device.transport.abortConnection)
        device.write(frames.TELEMETRY, 0, Payload.json({"t": 21.5}))
        for c in (sub, wild):
            got = yield c.waitMessages(1)
            self.assertEqual(got[0][:2], ("telemetry.d1", b'{"t":21.5}'))
        for c in (sub, wild):
            yield c.disconnect()
        yield sleep(1.2)
