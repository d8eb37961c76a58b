# -*- test-case-name: tests.test_limits_faces -*-
"""
Admission and rate limits of the IoT and peer-groups faces, over real
sockets, crossed the way an attacker crosses them.
"""

import socket

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial import unittest

from broker.core.limits import PER_ADDRESS, PER_HUB, AdmissionLimits
from broker.iot import frames
from broker.iot.client import AuthFailed
from broker.iot.frames import Payload
from broker.peergroups.client import Identity
from tests.iotharness import IoTHarness, waitUntil
from tests.pgharness import PeerBroker
from tests.test_limits import _Metrics


class _Silent(Protocol):
    """
    A TCP client that never says HELLO.
    """

    def __init__(self):
        self.closed = defer.Deferred()

    def connectionLost(self, reason):
        self.closed.callback(None)


class IoTAdmissionTests(_Metrics, unittest.TestCase):
    @defer.inlineCallbacks
    def start(self, **limits):
        self.h = yield IoTHarness(self, reactor,
                                  admission=AdmissionLimits(limits)).start()

    @defer.inlineCallbacks
    def silent(self):
        p = yield self.h.open(_Silent())
        self.addCleanup(lambda: p.transport.abortConnection())
        return p

    @defer.inlineCallbacks
    def test_unauthenticatedPerAddress(self):
        """
        With two sessions from one address waiting to authenticate, a third
        is refused with LIMIT and counted; one that authenticates frees its
        slot for another.
        """
        yield self.start(**{PER_ADDRESS: 2})
        s1 = yield self.silent()
        yield self.silent()
        e = yield self.assertFailure(self.h.device("d1"), AuthFailed)
        self.assertEqual(e.code, "LIMIT")
        text = yield self.metrics(self.h.core)
        self.assertMetric(text, 'broker_admission_refused_total'
                                '{face="iot",hub="",reason="per_address"} 1.0')
        s1.transport.loseConnection()
        yield s1.closed
        yield waitUntil(reactor, lambda: self.h.factory.admission.count(
            PER_ADDRESS, "127.0.0.1") == 1)
        yield self.h.device("d1")          # authenticated: no longer pending
        yield self.h.device("d2")

    @defer.inlineCallbacks
    def test_perFleet(self):
        """
        A fleet's sessions beyond its limit are refused with LIMIT after the
        proof; another fleet is not affected; a slot freed is usable.
        """
        yield self.start(**{PER_HUB: 2})
        yield self.h.central()
        d1 = yield self.h.device("d1")
        e = yield self.assertFailure(self.h.device("d2"), AuthFailed)
        self.assertEqual(e.code, "LIMIT")
        yield self.h.device("x1", fleet="other")
        text = yield self.metrics(self.h.core)
        self.assertMetric(text, 'broker_admission_refused_total'
                                '{face="iot",hub="acme",reason="per_hub"} 1.0')
        d1.transport.loseConnection()
        yield d1.closed
        yield self.h.device("d2")


class IoTRateTests(_Metrics, unittest.TestCase):
    @defer.inlineCallbacks
    def test_floodClosedOthersServed(self):
        """
        A device flooding PINGs gets LIMIT errors for the dropped ones, then
        a LIMIT close; another device of the fleet keeps its answers.
        """
        self.h = yield IoTHarness(self, reactor, inboundRate=(50, 0, 1.0)).start()
        flood = yield self.h.device("d1")
        good = yield self.h.device("d2")
        central = yield self.h.central()
        central.onRequest = None
        good.onRequest = lambda frame: Payload.json("pong")
        data = b"".join(frames.encode(frames.PING, i + 1, Payload.json(i))
                        for i in range(2000))
        flood.transport.write(data)
        yield flood.closed
        got = []
        while flood.inbox.pending:
            got.append(flood.inbox.pending.pop(0))
        codes = [f.payload.value()["code"] for f in got
                 if f.kind in (frames.ERROR, frames.CLOSE)]
        self.assertIn("LIMIT", codes)
        self.assertEqual(got[-1].kind, frames.CLOSE)
        self.assertEqual(got[-1].payload.value()["code"], "LIMIT")
        pongs = [f for f in got if f.kind == frames.PONG]
        self.assertGreaterEqual(len(pongs), 40)     # the burst, less HELLO and PROOF
        self.assertLess(len(pongs), 200)
        for i in range(20):
            answer = yield central.request(Payload.json(i), address="d2")
            self.assertEqual(answer.value(), "pong")
        text = yield self.metrics(self.h.core)
        self.assertMetric(text, 'broker_rate_limited_total'
                                '{action="closed",face="iot",hub="acme"} 1.0')

    @defer.inlineCallbacks
    def test_udpPerSource(self):
        """
        Datagrams from one source over its rate are dropped before they
        are even decoded, and counted.
        """
        self.h = yield IoTHarness(self, reactor, udpRate=20).start()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        counts = self.h.udp.counts
        for _ in range(10):
            # In batches the socket buffer can take: lost datagrams prove nothing.
            before = counts["malformed"] + counts["rate_limited"]
            for _ in range(50):
                sock.sendto(b"\x01garbage", self.h.udpAddress)
            yield waitUntil(reactor, lambda: counts["malformed"] + counts["rate_limited"]
                            == before + 50)
        self.assertGreater(counts["rate_limited"], 450)
        self.assertLess(counts["malformed"], 50)
        text = yield self.metrics(self.h.core)
        self.assertIn('broker_rate_limited_total{action="dropped",face="iot",hub=""}', text)


    @defer.inlineCallbacks
    def test_udpSourcesTrackedAreBounded(self):
        """
        A flood from many source addresses (as a spoofing attacker sends)
        keeps at most C{maxSources} per-source buckets, forgetting the
        least recently heard; a source flooding throughout is still held
        to its rate.
        """
        self.h = yield IoTHarness(self, reactor, udpRate=20).start()
        self.h.udp.maxSources = 8
        counts = self.h.udp.counts
        flooder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        flooder.bind(("127.0.0.2", 0))
        self.addCleanup(flooder.close)
        socks = []
        for i in range(40):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((f"127.0.1.{i + 1}", 0))
            self.addCleanup(sock.close)
            socks.append(sock)
        sent = 0
        for sock in socks:
            for _ in range(5):
                flooder.sendto(b"\x01garbage", self.h.udpAddress)
            sock.sendto(b"\x01garbage", self.h.udpAddress)
            sent += 6
            yield waitUntil(reactor, lambda: counts["malformed"] + counts["rate_limited"]
                            == sent)
            self.assertLessEqual(len(self.h.udp._sources), 8)
        # The flooder sent 200 at once; its bucket holds 20 (burst 1 s).
        self.assertGreater(counts["rate_limited"], 150)


class PeerGroupsLimitTests(_Metrics, unittest.TestCase):
    @defer.inlineCallbacks
    def start(self, toml):
        self.b = yield PeerBroker(self, reactor, toml).start()

    @defer.inlineCallbacks
    def test_perAddress(self):
        """
        A connection beyond the per-address limit is refused: 429 on the
        WebSocket, PEER_E_CONNECTION_REFUSED on TCP; a freed slot is usable.
        """
        yield self.start("max_connections_per_address = 2\n")
        first = yield self.b.peer("ws", name="a")
        yield self.b.peer("tcp", name="b")
        yield self.assertFailure(self.b.connect("ws"), Exception)
        raw = _Lines()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                 self.b.tcpPort.getHost().port), raw)
        yield raw.closed
        self.assertIn(b"PEER_E_CONNECTION_REFUSED", raw.data)
        text = yield self.metrics(self.b.core)
        self.assertMetric(text, 'broker_admission_refused_total'
                                '{face="peergroups",hub="",reason="per_address"} 2.0')
        first.disconnect()
        yield first.closed
        yield waitUntil(reactor, lambda: self.b.pg.admission.count(
            PER_ADDRESS, "127.0.0.1") == 1)
        yield self.b.peer("ws", name="c")

    @defer.inlineCallbacks
    def test_perIdentityAndApplication(self):
        """
        registerIdentity beyond an identity's or an application's sessions
        fails with PEER_E_CONNECTION_REFUSED; others go on.
        """
        yield self.start("max_connections_per_identity = 1\n"
                         "max_connections_per_application = 2\n")
        alice = Identity.generate("alice", "alice")
        yield self.b.peer(identity=alice)
        c = yield self.b.connect()
        yield c.startup()
        e = yield self.assertFailure(c.registerIdentity(alice), Exception)
        self.assertIn("PEER_E_CONNECTION_REFUSED", str(e))
        yield self.b.peer(name="bob")
        e = yield self.assertFailure(self.b.peer(name="carol"), Exception)
        self.assertIn("PEER_E_CONNECTION_REFUSED", str(e))
        yield self.b.peer(application="other", name="carol")
        text = yield self.metrics(self.b.core)
        self.assertMetric(text, 'broker_admission_refused_total'
                                '{face="peergroups",hub="pg.default",reason="per_user"} 1.0')
        self.assertMetric(text, 'broker_admission_refused_total'
                                '{face="peergroups",hub="pg.default",reason="per_hub"} 1.0')

    @defer.inlineCallbacks
    def test_rateFloodClosed(self):
        """
        A TCP peer flooding requests is answered E_OUTOFMEMORY for the
        dropped ones and closed; a peer of the same application still gets
        its answers.
        """
        yield self.start("max_inbound_messages_per_second = 50\ninbound_burst = 1.0\n")
        good = yield self.b.peer("ws", name="good")
        raw = _Lines()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                 self.b.tcpPort.getHost().port), raw)
        body = b'{"id": 1, "method": "getStatus", "params": {}}'
        raw.transport.write((len(body).to_bytes(4, "big") + body) * 2000)
        yield raw.closed
        self.assertIn(b"E_OUTOFMEMORY", raw.data)
        for _ in range(10):
            yield good.startup()
        text = yield self.metrics(self.b.core)
        self.assertMetric(text, 'broker_rate_limited_total'
                                '{action="closed",face="peergroups",hub=""} 1.0')


class _Lines(Protocol):
    def __init__(self):
        self.data = b""
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.closed.callback(None)
