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
from broker.iot.auth import tokenKey
from broker.iot.client import IoTClient
from broker.iot.udp import (ACCEPTED, BAD_MAC, EXPIRED, MALFORMED, REPLAYED, UNKNOWN,
                            TelemetryListener, TokenBook)
from tests.iotharness import SECRETS
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
        self.send(d.datagram(Payload.json({"temp": 19.5}), tokens[0]))
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
        datagram = d.datagram(Payload(frames.ASCII, b"t=1"), tokens[0])
        self.send(datagram)
        yield self.counted(ACCEPTED, 1)
        self.send(datagram)
        yield self.counted(REPLAYED, 1)
        self.send(frames.encodeDatagram(b"\x00" * 16, Payload(frames.ASCII, b"t=1"),
                                        b"k" * 32))
        yield self.counted(UNKNOWN, 1)
        mac = b"m" * 16
        for bad in [b"", b"\x02short", b"\x03" + tokens[1] + b"\x01" + mac,
                    b"\x02" + tokens[1] + b"\x09" + mac, b"\x02" + tokens[1] + b"\x02\xff" + mac,
                    b"\x02" + tokens[1] + b"\x04{" + mac, b"\x02" + b"x" * 3000,
                    # Version 1 (no MAC) is not accepted by default.
                    b"\x01" + tokens[1] + b"\x01\x01"]:
            self.send(bad)
        yield self.counted("malformed", 8)
        # A malformed datagram does not spend the token it carries.
        self.send(d.datagram(Payload(frames.BINARY, b"\x01"), tokens[1]))
        yield self.counted(ACCEPTED, 2)
        self.assertEqual(self.h.udp.counts, {"accepted": 2, "replayed": 1, "unknown": 1,
                                             "expired": 0, "malformed": 8,
                                             "rate_limited": 0, "bad_mac": 0})

    @defer.inlineCallbacks
    def test_refill(self):
        """
        Spending half the batch brings a new TOKENS frame topping it up.
        """
        d = yield self.h.device("d1")
        tokens = list((yield d.waitTokens(8)))
        for t in tokens[:4]:
            self.send(d.datagram(Payload.json(1), t))
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
        oldDatagram = d.datagram(Payload.json(1), old[0])
        d.transport.loseConnection()
        yield d.closed
        d = yield self.h.device("d1")
        new = yield d.waitTokens(8)
        self.assertEqual(len(new), 8)
        self.assertFalse(set(old) & set(new))
        self.assertEqual(self.h.concentrator.tokens.outstanding("acme", "d1"), 8)
        self.send(oldDatagram)
        yield self.counted(UNKNOWN, 1)
        self.send(d.datagram(Payload.json(1), new[0]))
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
        self.send(d2.datagram(Payload.json({"from": "d1?"}), tokens[0]))
        f = yield central.nextFrame()
        self.assertEqual(f.address, "d2")


    @defer.inlineCallbacks
    def test_swappedPayloadDropped(self):
        """
        A datagram whose payload was swapped on the way (its token and the
        MAC of the original kept) is dropped and counted bad_mac; its token
        is not spent, so the genuine datagram is then accepted, and only
        it reaches the central.
        """
        central = yield self.h.central()
        d = yield self.h.device("d1")
        tokens = yield d.waitTokens(8)
        genuine = d.datagram(Payload.json({"valve": "closed"}), tokens[0])
        swapped = genuine[:18] + b'{"valve":"open!"}' + genuine[-16:]
        self.send(swapped)
        yield self.counted(BAD_MAC, 1)
        self.assertEqual(self.h.concentrator.tokens.outstanding("acme", "d1"), 8)
        self.send(genuine)
        yield self.counted(ACCEPTED, 1)
        f = yield central.nextFrame()
        self.assertEqual((f.kind, f.payload.value()), (frames.TELEMETRY, {"valve": "closed"}))
        self.send(genuine)
        yield self.counted(REPLAYED, 1)
        self.assertEqual((self.h.udp.counts[BAD_MAC], self.h.udp.counts[ACCEPTED]), (1, 1))

    @defer.inlineCallbacks
    def test_strangerCannotSpendTokens(self):
        """
        A stranger who saw tokens on the wire (but has no key) sends
        datagrams with them: a made-up MAC, the MAC stripped (version 1):
        none is accepted, none spends a token, and the device's own
        datagrams with those tokens are accepted afterwards.
        """
        d = yield self.h.device("d1")
        tokens = list((yield d.waitTokens(8)))
        for t in tokens[:4]:
            self.send(frames.encodeDatagram(t, Payload.json({"forged": True}), b"\x00" * 32))
            self.send(frames.encodeDatagram(t, Payload.json({"forged": True})))
        yield self.counted(BAD_MAC, 4)
        yield self.counted(MALFORMED, 4)
        self.assertEqual(self.h.concentrator.tokens.outstanding("acme", "d1"), 8)
        for t in tokens[:4]:
            self.send(d.datagram(Payload.json({"mine": True}), t))
        yield self.counted(ACCEPTED, 4)
        self.assertEqual(self.h.udp.counts[BAD_MAC], 4)

    @defer.inlineCallbacks
    def test_versionOneDeviceGetsNoTokens(self):
        """
        A device that does not announce UDP version 2 is served over TCP
        but gets no tokens by default (WELCOME says udp 0, TOKENS empty).
        """
        client = IoTClient("device", "acme", "d1", SECRETS[("acme", "d1")], udpVersion=1)
        yield self.h.open(client)
        welcome = yield client.authenticated
        self.assertEqual(welcome["udp"], 0)
        client.write(frames.TOKENS)
        yield waitUntil(reactor, lambda: client.tokenTTL is not None)
        self.assertEqual((client.tokens, client.udpKey), ([], None))
        self.assertEqual(self.h.concentrator.tokens.outstanding("acme", "d1"), 0)

    @defer.inlineCallbacks
    def test_versionOneAcceptedWhenConfigured(self):
        """
        With legacy datagrams accepted (iot.udp.accept_version_1), a
        version 1 device's datagrams are accepted without a MAC; a version
        2 device's tokens still refuse a datagram without one.
        """
        self.h.concentrator.tokens.legacy = True
        old = IoTClient("device", "acme", "d1", SECRETS[("acme", "d1")], udpVersion=1)
        yield self.h.open(old)
        welcome = yield old.authenticated
        self.assertEqual(welcome["udp"], 1)
        tokens = yield old.waitTokens(8)
        self.send(old.datagram(Payload.json({"v": 1}), tokens[0]))
        yield self.counted(ACCEPTED, 1)
        new = yield self.h.device("d2")
        newTokens = yield new.waitTokens(8)
        self.send(frames.encodeDatagram(newTokens[0], Payload.json({"stripped": True})))
        yield self.counted(BAD_MAC, 1)
        self.send(new.datagram(Payload.json({"v": 2}), newTokens[0]))
        yield self.counted(ACCEPTED, 2)


def boundBook(**kw):
    """
    A token book whose devices f/d and f/e have sessions with UDP keys.
    """
    book = TokenBook(**kw)
    book.bindKey("f", "d", b"d" * 32)
    book.bindKey("f", "e", b"e" * 32)
    return book


class TokenBookTests(SynchronousTestCase):

    def test_badMacKeepsToken(self):
        """
        redeem refuses a token whose datagram does not verify, and leaves
        it live; the verifier is given the token's own key.
        """
        book = boundBook()
        (t,) = book.issue("f", "d", 1)
        seen = []
        self.assertEqual(book.redeem(t, lambda k: seen.append(k) or False),
                         (BAD_MAC, None, None))
        self.assertEqual(seen, [tokenKey(b"d" * 32, t)])
        self.assertEqual(book.outstanding("f", "d"), 1)
        self.assertEqual(book.redeem(t, lambda k: True), (ACCEPTED, "f", "d"))
        self.assertEqual(book.redeem(t, lambda k: True), (REPLAYED, None, None))

    def test_noKeyNoTokens(self):
        """
        A device whose session bound no UDP key gets no tokens, unless
        legacy tokens are allowed; unbinding another session's key keeps
        the current one.
        """
        book = TokenBook()
        self.assertEqual(book.issue("f", "x", 3), [])
        book.legacy = True
        self.assertEqual(len(book.issue("f", "x", 3)), 3)
        book = boundBook()
        book.unbindKey("f", "d", b"other")
        self.assertEqual(len(book.issue("f", "d", 1)), 1)
        book.unbindKey("f", "d", b"d" * 32)
        self.assertEqual(book.issue("f", "d", 1), [])

    def test_expiry(self):
        clock = Clock()
        book = boundBook(ttl=10, clock=clock.seconds)
        a, b, c = book.issue("f", "d", 3)
        self.assertEqual(book.redeem(a), (ACCEPTED, "f", "d"))
        clock.advance(10)
        self.assertEqual(book.redeem(b), (EXPIRED, None, None))
        self.assertEqual(book.purge(), 1)
        self.assertEqual(book.redeem(c), (UNKNOWN, None, None))
        self.assertEqual(book.redeem(a), (REPLAYED, None, None))
        self.assertEqual((len(book), book.outstanding("f", "d")), (0, 0))

    def test_revoke(self):
        book = boundBook()
        t = book.issue("f", "d", 2)
        other = book.issue("f", "e", 1)
        book.revoke("f", "d")
        self.assertEqual(book.redeem(t[0])[0], UNKNOWN)
        self.assertEqual(book.redeem(other[0])[0], ACCEPTED)

    def test_tokensAreRandom128Bits(self):
        tokens = boundBook().issue("f", "d", 1000)
        self.assertEqual(len(set(tokens)), 1000)
        self.assertTrue(all(len(t) == 16 for t in tokens))

    def test_spentMemoryBounded(self):
        book = boundBook(spentMemory=2)
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
        self.c.tokens.bindKey("acme", "d1", b"k" * 32)
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
