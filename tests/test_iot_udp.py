"""
Tests for L{broker.iot.udp}: telemetry datagrams over a real UDP socket,
spending tokens issued over a real TCP session.
"""

from hypothesis import given, settings, strategies as st
from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker.core.router import Core
from broker.iot import frames
from broker.iot.frames import Payload
from broker.iot.udp import (ACCEPTED, EXPIRED, REPLAYED, UNKNOWN, TelemetryListener,
                            TokenBook)
from tests.iotharness import IoTHarness, waitUntil
from tests.wsharness import BrokerHarness


class Sender(DatagramProtocol):
    pass


class TelemetryOverUDPTests(TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        self.wps = yield BrokerHarness(self, reactor).start()
        self.h = yield IoTHarness(self, reactor, core=self.wps.core, tokenBatch=8).start()
        self.sender = Sender()
        port = reactor.listenUDP(0, self.sender, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

    def send(self, data):
        self.sender.transport.write(data, self.h.udpAddress)

    def counted(self, outcome, n):
        return waitUntil(reactor, lambda: self.h.udp.counts[outcome] >= n)

    @defer.inlineCallbacks
    def test_acceptedToWebSocketAndCentral(self):
        """
        A datagram with a live token is published to the device's
        telemetry group, where a Web PubSub client receives it, and to the
        central.
        """
        ws = yield self.wps.connectJSON(hub="acme", roles=["webpubsub.joinLeaveGroup"])
        ws.send({"type": "joinGroup", "group": "telemetry.d1", "ackId": 1})
        ack = yield ws.nextJSON()
        self.assertTrue(ack["success"])
        central = yield self.h.central()
        d = yield self.h.device("d1")
        tokens = yield d.waitTokens(8)
        self.send(frames.encodeDatagram(tokens[0], Payload.json({"temp": 19.5})))
        message = yield ws.nextJSON()
        self.assertEqual((message["type"], message["group"], message["data"]),
                         ("message", "telemetry.d1", {"temp": 19.5}))
        f = yield central.nextFrame()
        self.assertEqual((f.kind, f.address, f.payload.value()),
                         (frames.TELEMETRY, "d1", {"temp": 19.5}))
        self.assertEqual(self.h.udp.counts[ACCEPTED], 1)

    @defer.inlineCallbacks
    def test_replayUnknownMalformed(self):
        d = yield self.h.device("d1")
        tokens = yield d.waitTokens(8)
        datagram = frames.encodeDatagram(tokens[0], Payload(frames.ASCII, b"t=1"))
        self.send(datagram)
        yield self.counted(ACCEPTED, 1)
        self.send(datagram)
        yield self.counted(REPLAYED, 1)
        self.send(frames.encodeDatagram(b"\x00" * 16, Payload(frames.ASCII, b"t=1")))
        yield self.counted(UNKNOWN, 1)
        for bad in [b"", b"\x01short", b"\x02" + tokens[1] + b"\x01",
                    b"\x01" + tokens[1] + b"\x09", b"\x01" + tokens[1] + b"\x02\xff",
                    b"\x01" + tokens[1] + b"\x04{", b"\x01" + b"x" * 3000]:
            self.send(bad)
        yield self.counted("malformed", 7)
        # A malformed datagram does not spend the token it carries.
        self.send(frames.encodeDatagram(tokens[1], Payload(frames.BINARY, b"\x01")))
        yield self.counted(ACCEPTED, 2)
        self.assertEqual(self.h.udp.counts, {"accepted": 2, "replayed": 1, "unknown": 1,
                                             "expired": 0, "malformed": 7,
                                             "rate_limited": 0})

    @defer.inlineCallbacks
    def test_refill(self):
        """
        Spending half the batch brings a new TOKENS frame topping it up.
        """
        d = yield self.h.device("d1")
        tokens = list((yield d.waitTokens(8)))
        for t in tokens[:4]:
            self.send(frames.encodeDatagram(t, Payload.json(1)))
        yield waitUntil(reactor, lambda: len(d.tokens) >= 12)
        self.assertEqual(len(set(d.tokens)), 12)
        self.assertEqual(self.h.concentrator.tokens.outstanding("acme", "d1"), 8)

    @defer.inlineCallbacks
    def test_newSessionNewTokens(self):
        """
        A device that reconnects gets a fresh batch; the tokens of its
        previous session no longer count.
        """
        d = yield self.h.device("d1")
        old = list((yield d.waitTokens(8)))
        d.transport.loseConnection()
        yield d.closed
        d = yield self.h.device("d1")
        new = yield d.waitTokens(8)
        self.assertEqual(len(new), 8)
        self.assertFalse(set(old) & set(new))
        self.assertEqual(self.h.concentrator.tokens.outstanding("acme", "d1"), 8)
        self.send(frames.encodeDatagram(old[0], Payload.json(1)))
        yield self.counted(UNKNOWN, 1)
        self.send(frames.encodeDatagram(new[0], Payload.json(1)))
        yield self.counted(ACCEPTED, 1)

    @defer.inlineCallbacks
    def test_tokenNamesItsDevice(self):
        """
        A token issued to one device publishes as that device only: a
        datagram cannot claim another identity.
        """
        central = yield self.h.central()
        d2 = yield self.h.device("d2")
        tokens = yield d2.waitTokens(1)
        self.send(frames.encodeDatagram(tokens[0], Payload.json({"from": "d1?"})))
        f = yield central.nextFrame()
        self.assertEqual(f.address, "d2")


class TokenBookTests(SynchronousTestCase):

    def test_expiry(self):
        clock = Clock()
        book = TokenBook(ttl=10, clock=clock.seconds)
        a, b, c = book.issue("f", "d", 3)
        self.assertEqual(book.redeem(a), (ACCEPTED, "f", "d"))
        clock.advance(10)
        self.assertEqual(book.redeem(b), (EXPIRED, None, None))
        self.assertEqual(book.purge(), 1)
        self.assertEqual(book.redeem(c), (UNKNOWN, None, None))
        self.assertEqual(book.redeem(a), (REPLAYED, None, None))
        self.assertEqual((len(book), book.outstanding("f", "d")), (0, 0))

    def test_revoke(self):
        book = TokenBook()
        t = book.issue("f", "d", 2)
        other = book.issue("f", "e", 1)
        book.revoke("f", "d")
        self.assertEqual(book.redeem(t[0])[0], UNKNOWN)
        self.assertEqual(book.redeem(other[0])[0], ACCEPTED)

    def test_tokensAreRandom128Bits(self):
        tokens = TokenBook().issue("f", "d", 1000)
        self.assertEqual(len(set(tokens)), 1000)
        self.assertTrue(all(len(t) == 16 for t in tokens))

    def test_spentMemoryBounded(self):
        book = TokenBook(spentMemory=2)
        t = book.issue("f", "d", 3)
        for x in t:
            book.redeem(x)
        self.assertEqual(book.redeem(t[0])[0], UNKNOWN)
        self.assertEqual(book.redeem(t[2])[0], REPLAYED)


class FuzzTests(SynchronousTestCase):
    """
    Hypothesis-generated datagrams never raise out of the listener and are
    only ever counted.
    """

    def setUp(self):
        from tests.iotharness import fleets
        from broker.iot.auth import Registry
        from broker.iot.concentrator import Concentrator
        self.clock = Clock()
        core = Core(self.clock)
        self.c = Concentrator(self.clock, core, Registry(fleets()), store=None)
        self.listener = TelemetryListener(self.c, 512)
        self.live = self.c.tokens.issue("acme", "d1", 1)[0]

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(
        st.binary(max_size=600),
        st.tuples(st.sampled_from([0, 1, 2, 255]), st.binary(min_size=16, max_size=16),
                  st.integers(0, 255), st.binary(max_size=64)).map(
            lambda t: bytes([t[0]]) + t[1] + bytes([t[2]]) + t[3])))
    def test_anything(self, data):
        before = sum(self.listener.counts.values())
        self.listener.datagramReceived(data, ("127.0.0.1", 1))
        self.assertEqual(sum(self.listener.counts.values()), before + 1)
