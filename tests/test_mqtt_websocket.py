"""
MQTT over WebSocket framing (MQTT 5.0 section 6) with a hand-driven
autobahn client: a packet split over frames, packets sharing a frame, a
text frame, the subprotocol requirement and the hub paths.
"""

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from broker.mqtt import codec
from broker.mqtt.face import Restorer
from tests.mqttharness import PacketWaiter, sleep, startBroker
from tests.test_mqtt_bounds import connectPacket, subscribePacket


class WSClient(PacketWaiter, WebSocketClientProtocol):

    def __init__(self):
        PacketWaiter.__init__(self, 1 << 20)
        WebSocketClientProtocol.__init__(self)
        self.opened = defer.Deferred()
        self.closed = defer.Deferred()

    def onOpen(self):
        self.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.received(payload)

    def onClose(self, wasClean, code, reason):
        if not self.opened.called:
            self.opened.errback(Exception(f"refused: {reason}"))
        self.closed.callback(code)


class WebSocketTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.top, self.ports, _ = yield startBroker(self)
        self.port = self.ports["mqtt.websocket.listen[0]"]
        # autobahn's close handshake timer outlives the connection.
        self.addCleanup(sleep, 1.2)

    @defer.inlineCallbacks
    def connect(self, path="/mqtt", protocols=("mqtt",)):
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{self.port}{path}",
                                         protocols=list(protocols), reactor=reactor)
        factory.protocol = WSClient
        factory.setProtocolOptions(autoPingInterval=0, failByDrop=False)
        proto = yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(factory)
        self.addCleanup(lambda: proto.dropConnection() if proto.state != proto.STATE_CLOSED
                        else None)
        yield proto.opened
        return proto

    @defer.inlineCallbacks
    def test_packetsSpanAndShareFrames(self):
        """
        A CONNECT split over three frames is one packet; SUBSCRIBE and
        PINGREQ in one frame are two.
        """
        c = yield self.connect()
        data = connectPacket("ws1")
        for part in (data[:1], data[1:5], data[5:]):
            c.sendMessage(part, isBinary=True)
        yield c.waitFor(lambda: codec.CONNACK in c.types())
        c.sendMessage(subscribePacket(1, ["w/t"]) + b"\xc0\x00", isBinary=True)
        yield c.waitFor(lambda: codec.PINGRESP in c.types())
        self.assertEqual(c.types(), [codec.CONNACK, codec.SUBACK, codec.PINGRESP])
        self.assertEqual(c.websocket_protocol_in_use, "mqtt")

    @defer.inlineCallbacks
    def test_textFrameCloses(self):
        c = yield self.connect()
        c.sendMessage(connectPacket("ws2"), isBinary=True)
        yield c.waitFor(lambda: codec.CONNACK in c.types())
        c.sendMessage(b"hello", isBinary=False)
        yield c.closed
        self.assertEqual(c.packets[-1][0], codec.DISCONNECT)
        self.assertEqual(c.packets[-1][2][0], codec.MALFORMED_PACKET)

    @defer.inlineCallbacks
    def test_handshakeRefusals(self):
        """
        Without the mqtt subprotocol, on another path, or with a bad hub
        name, the handshake is refused.
        """
        for path, protocols in (("/mqtt", ("chat",)), ("/other", ("mqtt",)),
                                ("/clients/mqtt/hubs/9bad", ("mqtt",))):
            with self.assertRaises(Exception):
                yield self.connect(path, protocols)

    @defer.inlineCallbacks
    def test_hubFromPath(self):
        """/clients/mqtt/hubs/{hub} admits the session into {hub}."""
        c = yield self.connect("/clients/mqtt/hubs/other")
        c.sendMessage(connectPacket("ws3"), isBinary=True)
        yield c.waitFor(lambda: codec.CONNACK in c.types())
        server = next(s for s in self.top if isinstance(s, Restorer)).server
        self.assertIn(("other", "ws3"), server.sessions)
        self.assertEqual(server.core.hubs["other"].connectionCount, 1)
        info = server.sessions[("other", "ws3")].describe()
        self.assertEqual((info["clientId"], info["mqttVersion"], info["attached"]),
                         ("ws3", "5.0", True))
