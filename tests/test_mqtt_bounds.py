"""
The MQTT face's bounds, crossed the way a hostile client would (raw
sockets writing packets built by hand), each asserting the refusal, its
counter on /metrics, and that well-behaved clients (paho-mqtt) lost
nothing.
"""

import re

import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from broker.mqtt import codec
from tests.mqttharness import PacketWaiter, Paho, sleep, startBroker, v5props


def connectPacket(clientId="raw", version=5, keepAlive=60, clean=True, props=b"\x00"):
    body = (codec.utf8("MQTT") + bytes((version, 0x02 if clean else 0))
            + keepAlive.to_bytes(2, "big"))
    if version == 5:
        body += props
    return codec.packet(0x10, body + codec.utf8(clientId))


def subscribePacket(pid, filters, version=5, qos=0):
    body = pid.to_bytes(2, "big") + (b"\x00" if version == 5 else b"")
    for f in filters:
        body += codec.utf8(f) + bytes((qos,))
    return codec.packet(0x82, body)


class Raw(PacketWaiter, Protocol):
    """A hand-driven MQTT client: what it receives, parsed into packets."""

    def __init__(self):
        super().__init__(1 << 28)
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.received(data)

    def connectionLost(self, reason):
        self.lost.callback(None)
        self.releaseWaiters()


class BoundsTests(TestCase):
    timeout = 60
    MQTT = """
max_packet_size = 4096
max_output_buffer = 65536
max_subscriptions = 3
max_queued_messages = 5
max_connections_per_address = 50
receive_maximum = 4
max_persistent_sessions = 2
max_retained_messages = 3
max_retained_bytes = 3000
"""

    @defer.inlineCallbacks
    def setUp(self):
        self.top, self.ports, self.directory = yield startBroker(self, mqtt=self.MQTT)
        self.port = self.ports["mqtt.listen[0]"]
        self.addCleanup(sleep, 0.3)

    @defer.inlineCallbacks
    def raw(self, connect=True, version=5, **kw):
        r = Raw()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), r)
        self.addCleanup(lambda: r.transport.abortConnection() if r.transport.connected
                        else None)
        if connect:
            r.transport.write(connectPacket(version=version, **kw))
            yield r.waitFor(lambda: codec.CONNACK in r.types())
        return r

    @defer.inlineCallbacks
    def paho(self, version=5, **kw):
        c = Paho(self, self.port, version=version, **kw)
        connack = yield c.connect()
        self.assertEqual(connack[1], 0)
        return c

    @defer.inlineCallbacks
    def metricsText(self):
        response = yield treq.get(f"http://127.0.0.1:{self.ports['admin.listen[0]']}/metrics",
                                  reactor=reactor, persistent=False)
        return (yield treq.content(response)).decode()

    @defer.inlineCallbacks
    def metric(self, event):
        text = yield self.metricsText()
        m = re.search(r'^broker_mqtt_events_total\{event="%s"\} (\S+)$' % event, text, re.M)
        return float(m.group(1)) if m else 0.0

    @defer.inlineCallbacks
    def assertGoodPeersFine(self):
        sub = yield self.paho(4)
        yield sub.subscribe("ok/t", 1)
        pub = yield self.paho(5)
        yield pub.publish("ok/t", b"fine", 1)
        got = yield sub.waitMessages(1)
        self.assertEqual(got[0][:2], ("ok/t", b"fine"))

    def disconnectReason(self, r):
        for type, flags, body in r.packets:
            if type == codec.DISCONNECT:
                return body[0]
        return None

    @defer.inlineCallbacks
    def test_oversizeHeaderRefusedBeforeBody(self):
        """
        A PUBLISH whose fixed header announces 100 MB is refused (5.0:
        DISCONNECT 0x95) before any of its body arrives.
        """
        r = yield self.raw()
        r.transport.write(b"\x30" + codec.encodeVarint(100 * 1024 * 1024))
        yield r.lost
        self.assertEqual(self.disconnectReason(r), codec.PACKET_TOO_LARGE)
        self.assertEqual((yield self.metric("too_large")), 1)
        yield self.assertGoodPeersFine()

    @defer.inlineCallbacks
    def test_oversizeInManySmallWrites(self):
        """
        A 3.1.1 PUBLISH over max_packet_size dribbled a byte at a time is
        closed at its header; 5.0 CONNACK states the maximum.
        """
        r = yield self.raw(version=4)
        header = b"\x30" + codec.encodeVarint(5000)
        for b in header:
            r.transport.write(bytes((b,)))
            yield sleep(0.01)
        yield r.lost
        self.assertEqual((yield self.metric("too_large")), 1)
        c = yield self.paho(5)
        self.assertEqual(c.connack[2].MaximumPacketSize, 4096)

    @defer.inlineCallbacks
    def test_malformed(self):
        """
        Malformed packets (bad flags, bad UTF-8, a 5-byte length, packet
        type 0) close the connection, 5.0 with DISCONNECT 0x81; a packet
        before CONNECT closes it at once; the broker goes on serving.
        """
        bad = [
            b"\x83\x05\x00\x01\x00\x01a",                         # SUBSCRIBE flags 3
            codec.packet(0x30, b"\x00\x02\xff\xfe\x00"),           # topic not UTF-8
            b"\x30\xff\xff\xff\xff\x7f",                           # 5-byte length
            b"\x00\x00",                                           # type 0
        ]
        for data in bad:
            r = yield self.raw()
            r.transport.write(data)
            yield r.lost
            self.assertIn(self.disconnectReason(r), (codec.MALFORMED_PACKET,
                                                     codec.PROTOCOL_ERROR), data)
        early = yield self.raw(connect=False)
        early.transport.write(b"\xc0\x00")                         # PINGREQ first
        yield early.lost
        self.assertEqual(early.packets, [])
        self.assertGreaterEqual((yield self.metric("malformed")), 3)
        yield self.assertGoodPeersFine()

    @defer.inlineCallbacks
    def test_maxSubscriptions(self):
        c = yield self.paho(5)
        codes = []
        for f in ("s/1", "s/2", "s/3", "s/4", "s/#"):
            codes.extend((yield c.subscribe(f, 1)))
        self.assertEqual(codes, [1, 1, 1, 0x97, 0x97])
        self.assertEqual((yield self.metric("subscriptions_refused")), 2)

    @defer.inlineCallbacks
    def test_receiveMaximumInbound(self):
        """
        More unreleased QoS 2 publishes than the receive maximum (4):
        DISCONNECT 0x93.
        """
        r = yield self.raw()
        for pid in range(1, 7):
            r.transport.write(codec.packet(0x34, codec.utf8("rm/t") + pid.to_bytes(2, "big")
                                           + b"\x00x"))
        yield r.lost
        self.assertEqual(self.disconnectReason(r), codec.RECEIVE_MAXIMUM_EXCEEDED)
        yield self.assertGoodPeersFine()

    @defer.inlineCallbacks
    def test_offlineQueueBounded(self):
        """
        An offline persistent session queues at most max_queued_messages
        (5); the rest are dropped and counted; it gets the five.
        """
        c = Paho(self, self.port, clientId="q1", version=5, clean=False)
        yield c.connect(properties=v5props("CONNECT", SessionExpiryInterval=600))
        yield c.subscribe("qb/t", 1)
        yield c.disconnect()
        pub = yield self.paho(5)
        for i in range(8):
            yield pub.publish("qb/t", b"%d" % i, 1)
        self.assertEqual((yield self.metric("queue_full")), 3)
        back = Paho(self, self.port, clientId="q1", version=5, clean=False)
        yield back.connect(properties=v5props("CONNECT", SessionExpiryInterval=600))
        yield back.waitMessages(5)
        yield sleep(0.3)
        self.assertEqual([m[1] for m in back.messages], [b"0", b"1", b"2", b"3", b"4"])

    @defer.inlineCallbacks
    def test_persistentSessionsBounded(self):
        """
        Two persistent sessions exist (one away): a third is refused (5.0
        0x97, 3.1.1 3), its owners come back, a clean session still works.
        """
        expiry = codec.encodeProperties({"session_expiry_interval": 60})
        away = yield self.raw(clientId="ps1", version=4, clean=False)
        away.transport.loseConnection()
        yield away.lost
        yield self.raw(clientId="ps2", clean=False, props=expiry)
        for version, code in ((5, b"\x00\x97"), (4, b"\x00\x03")):
            r = yield self.raw(clientId="ps3", version=version, clean=False, props=expiry)
            yield r.lost
            self.assertEqual(r.packets[0][2][:2], code)
        self.assertEqual((yield self.metric("persistent_sessions_refused")), 2)
        back = yield self.raw(clientId="ps1", version=4, clean=False)
        self.assertEqual(back.packets[0][2], b"\x01\x00")
        yield self.raw(clientId="ps4", version=4)

    @defer.inlineCallbacks
    def test_retainedBounded(self):
        """
        Past 3 retained messages (or 3000 bytes) in the hub a new one is
        routed but not kept; replacing or deleting one still works.
        """
        pub = yield self.paho(5)
        live = yield self.paho(5)
        yield live.subscribe("rt/#", 0)     # QoS 0: max_queued_messages is 5 here
        for i in range(5):
            yield pub.publish(f"rt/{i}", b"v", 1, retain=True)
        yield pub.publish("rt/0", b"w" * 2999, 1, retain=True)     # over the bytes
        yield pub.publish("rt/1", b"", 1, retain=True)              # deletes
        yield pub.publish("rt/5", b"v", 1, retain=True)             # fits again
        yield live.waitMessages(8)
        self.assertEqual((yield self.metric("retained_refused")), 3)
        late = yield self.paho(4)
        yield late.subscribe("rt/#", 1)
        yield late.waitMessages(3)
        yield sleep(0.3)
        self.assertEqual(sorted((m[0], m[1]) for m in late.messages),
                         [("rt/0", b"v"), ("rt/2", b"v"), ("rt/5", b"v")])

    @defer.inlineCallbacks
    def test_slowConsumerDropped(self):
        """
        A subscriber that never reads is dropped once more than
        max_output_buffer waits for it; a good subscriber gets every
        message.
        """
        slow = yield self.raw()
        slow.transport.write(subscribePacket(1, ["sc/#"]))
        yield slow.waitFor(lambda: codec.SUBACK in slow.types())
        slow.transport.pauseProducing()
        good = yield self.paho(5)
        yield good.subscribe("sc/#", 0)
        pub = yield self.paho(5)
        # Beyond what the loopback socket buffers absorb (a few MB).
        n = 4000
        for i in range(n - 1):
            yield pub.publish("sc/t", b"%04d" % i + b"x" * 4000, 0)
        yield pub.publish("sc/t", b"%04d" % (n - 1), 1)
        yield good.waitMessages(n, timeout=40)
        self.assertEqual([m[1][:4] for m in good.messages], [b"%04d" % i for i in range(n)])
        self.assertEqual((yield self.metric("slow_consumers")), 1)
        # Counted on the hub too, as every face counts its slow consumers.
        text = yield self.metricsText()
        self.assertRegex(text, r'(?m)^broker_slow_consumer_drops_total\{[^}]*hub="mqtt"[^}]*\} 1\.0$')
        slow.transport.resumeProducing()
        yield slow.lost

    @defer.inlineCallbacks
    def test_keepAlive(self):
        """Silent for 1.5 x keep alive: DISCONNECT 0x8D and closed."""
        r = yield self.raw(keepAlive=1)
        yield r.lost
        self.assertEqual(self.disconnectReason(r), codec.KEEP_ALIVE_TIMEOUT)
        self.assertEqual((yield self.metric("keepalive_timeouts")), 1)


class RateTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.top, self.ports, _ = yield startBroker(
            self, mqtt="max_inbound_messages_per_second = 100.0\ninbound_burst = 0.5\n"
                       "max_connections_per_address = 3\n")
        self.port = self.ports["mqtt.listen[0]"]
        self.addCleanup(sleep, 0.3)

    @defer.inlineCallbacks
    def test_floodHeldNotLost(self):
        """
        300 QoS 0 publishes in one write: reading is held to the rate
        (counted on /metrics as held), and the subscriber still gets all
        of them in order.
        """
        sub = Paho(self, self.port, version=5)
        yield sub.connect()
        yield sub.subscribe("fl/t", 0)
        r = Raw()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), r)
        self.addCleanup(r.transport.abortConnection)
        data = connectPacket() + b"".join(
            codec.packet(0x30, codec.utf8("fl/t") + b"\x00" + b"%03d" % i) for i in range(300))
        r.transport.write(data)
        yield sub.waitMessages(300, timeout=30)
        self.assertEqual([m[1] for m in sub.messages], [b"%03d" % i for i in range(300)])
        response = yield treq.get(f"http://127.0.0.1:{self.ports['admin.listen[0]']}/metrics",
                                  reactor=reactor, persistent=False)
        text = (yield treq.content(response)).decode()
        self.assertRegex(text, r'broker_rate_limited_total\{action="held",face="mqtt",'
                               r'hub="mqtt"\} [1-9]')

    @defer.inlineCallbacks
    def test_admissionPerAddress(self):
        """A fourth connection from one address is reset; three work."""
        clients = []
        for i in range(3):
            c = Paho(self, self.port, version=4)
            yield c.connect()
            clients.append(c)
        r = Raw()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), r)
        r.transport.write(connectPacket())
        yield r.lost
        self.assertEqual(r.packets, [])
        response = yield treq.get(f"http://127.0.0.1:{self.ports['admin.listen[0]']}/metrics",
                                  reactor=reactor, persistent=False)
        text = (yield treq.content(response)).decode()
        self.assertIn('broker_admission_refused_total{face="mqtt",hub="",reason="per_address"} '
                      '1.0', text)
        yield clients[0].publish("still/ok", b"x", 1)
