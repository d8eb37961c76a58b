"""
Tests for L{broker.iot.protocol} and L{broker.iot.concentrator} over real
TCP (and TLS) sockets: both session kinds, every frame kind, each
authentication failure, requests, messages, keepalive, isolation.
"""

import os
import random

from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from broker.iot import auth, errors, frames
from broker.iot.client import AuthFailed
from broker.iot.concentrator import telemetryGroup
from broker.iot.frames import Payload
from broker.iot.interfaces import ICentralLink
from tests.iotharness import SECRETS, IoTHarness, waitUntil
from tests.recorder import RecordingConnection


class RawPeer(Protocol):
    """
    Writes bytes as told and records what comes back, for replays and
    malformed input.
    """

    def __init__(self):
        self.received = b""
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(None)

    def frames(self):
        out = frames.FrameReader().feed(self.received)
        return [f for f in out if isinstance(f, frames.Frame)]


def errorCodes(peer):
    return [f.payload.value()["code"] for f in peer.frames() if f.kind == frames.ERROR]


@implementer(ICentralLink)
class RecordingLink:
    """
    A fallback central link answering every device request with C{answer}.
    """

    def __init__(self, answer=None):
        self.answer = answer
        self.requests, self.messages, self.telemetries, self.events = [], [], [], []

    def deviceRequest(self, fleet, deviceId, payload):
        self.requests.append((fleet, deviceId, payload))
        if self.answer is None:
            return defer.Deferred()
        return defer.succeed(self.answer)

    def message(self, fleet, deviceId, payload):
        self.messages.append((fleet, deviceId, payload))

    def telemetry(self, fleet, deviceId, payload):
        self.telemetries.append((fleet, deviceId, payload))

    def forwardEvent(self, fleet, kind, deviceId, payload, messageId):
        """
        An event of the central queue: a message is recorded with the
        direct ones, presence and telemetry in C{events}.
        """
        if kind == "message":
            self.messages.append((fleet, deviceId, payload))
        else:
            self.events.append((kind, deviceId, payload.value()))
        return defer.succeed(None)


class HarnessMixin:
    tls = False
    options = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield IoTHarness(self, reactor, tls=self.tls, **self.options).start()
        self.c = self.h.concentrator


class AuthenticationTests(HarnessMixin, TestCase):
    options = {"authTimeout": 1.0}

    @defer.inlineCallbacks
    def test_deviceAndCentral(self):
        """
        A device and a central authenticate; WELCOME carries the server's
        proof (checked by the client) and both are online.
        """
        d = yield self.h.device("d1")
        central = yield self.h.central("acme")
        self.assertTrue(d.open and central.open)
        self.assertTrue(self.c.isOnline("acme", "d1"))
        self.assertEqual(self.c.onlineCount(), (1, 1))
        self.assertEqual(self.h.factory.counters.authOk, 2)

    @defer.inlineCallbacks
    def assertRefused(self, connect, code):
        c = yield connect()
        e = yield self.assertFailure(c.authenticated, AuthFailed)
        self.assertEqual(e.code, code)
        yield c.closed
        self.assertEqual(self.h.factory.counters.authFailures[code], 1)
        self.assertFalse(self.c.isOnline("acme", "d1"))

    def test_unknownDevice(self):
        return self.assertRefused(lambda: self.h.device("nope", secret="x",
                                                        authenticate=False), "UNKNOWN_DEVICE")

    def test_wrongKey(self):
        return self.assertRefused(lambda: self.h.device("d1", secret="wrong",
                                                        authenticate=False), "BAD_PROOF")

    def test_otherFleetsKey(self):
        """
        A device's key does not open a device of the same name elsewhere.
        """
        return self.assertRefused(
            lambda: self.h.device("d1", secret=SECRETS[("acme", "d2")], authenticate=False),
            "BAD_PROOF")

    def test_unknownCentral(self):
        return self.assertRefused(lambda: self.h.central("ghost", secret="x", authenticate=False),
                                  "UNKNOWN_CENTRAL")

    def test_centralWrongKey(self):
        return self.assertRefused(
            lambda: self.h.central("acme", secret=SECRETS[("other", None)], authenticate=False),
            "BAD_PROOF")

    @defer.inlineCallbacks
    def test_authTimeout(self):
        """
        A session that does not authenticate within the deadline is
        refused with AUTH_TIMEOUT and closed.
        """
        peer = yield self.h.open(RawPeer())
        yield peer.closed
        self.assertEqual(errorCodes(peer), ["AUTH_TIMEOUT"])
        self.assertEqual(self.h.factory.counters.authFailures["AUTH_TIMEOUT"], 1)

    @defer.inlineCallbacks
    def test_authTimeoutAfterHello(self):
        peer = yield self.h.open(RawPeer())
        peer.transport.write(frames.encode(frames.HELLO, 0, Payload.json(
            {"role": "device", "fleet": "acme", "id": "d1", "nonce": os.urandom(16).hex()})))
        yield peer.closed
        self.assertEqual([f.kind for f in peer.frames()], [frames.CHALLENGE, frames.ERROR])
        self.assertEqual(errorCodes(peer), ["AUTH_TIMEOUT"])

    @defer.inlineCallbacks
    def test_replayedSession(self):
        """
        The bytes of a successful handshake, replayed on a new connection,
        are refused: the HELLO nonce was already used (REPLAY).  With a new
        nonce, the recorded proof does not match the new challenge
        (BAD_PROOF).
        """
        nonce = os.urandom(32)
        key = auth.keyBytes(SECRETS[("acme", "d1")])
        hello = frames.encode(frames.HELLO, 0, Payload.json(
            {"role": "device", "fleet": "acme", "id": "d1", "nonce": nonce.hex()}))
        first = yield self.h.open(RawPeer())
        first.transport.write(hello)
        yield waitUntil(reactor, lambda: first.frames())
        challenge = first.frames()[0]
        self.assertEqual(challenge.kind, frames.CHALLENGE)
        proof = frames.encode(frames.PROOF, 0, Payload(frames.BINARY, auth.proof(
            key, "client", "device", "acme", "d1", nonce, challenge.payload.data)))
        first.transport.write(proof)
        yield waitUntil(reactor, lambda: len(first.frames()) >= 2)
        self.assertEqual(first.frames()[1].kind, frames.WELCOME)

        replay = yield self.h.open(RawPeer())
        replay.transport.write(hello + proof)
        yield replay.closed
        self.assertEqual(errorCodes(replay), ["REPLAY"])

        fresh = yield self.h.open(RawPeer())
        fresh.transport.write(frames.encode(frames.HELLO, 0, Payload.json(
            {"role": "device", "fleet": "acme", "id": "d1", "nonce": os.urandom(32).hex()}))
            + proof)
        yield fresh.closed
        self.assertEqual(errorCodes(fresh), ["BAD_PROOF"])
        counts = self.h.factory.counters.authFailures
        self.assertEqual((counts["REPLAY"], counts["BAD_PROOF"]), (1, 1))
        first.transport.loseConnection()
        yield first.closed

    @defer.inlineCallbacks
    def test_serverMustProve(self):
        """
        A client refuses a server that does not know its key: the WELCOME
        proof is checked (here the registry holds another key for d1 than
        the one the client was given, and the client was told to trust
        only its own).
        """
        expected = auth.proof(b"k", "server", "device", "acme", "d1", b"n" * 16, b"s" * 32)
        other = auth.proof(b"j", "server", "device", "acme", "d1", b"n" * 16, b"s" * 32)
        self.assertNotEqual(expected, other)
        self.assertNotEqual(
            auth.proof(b"k", "client", "device", "acme", "d1", b"n" * 16, b"s" * 32), expected)
        c = yield self.h.device("d1", authenticate=False)
        c._frame(frames.Frame(frames.CHALLENGE, 0, Payload(frames.BINARY, b"s" * 32)))
        c._frame(frames.Frame(frames.WELCOME, 0, Payload.json({"proof": other.hex()})))
        e = yield self.assertFailure(c.authenticated, AuthFailed)
        self.assertEqual(e.code, "BAD_SERVER_PROOF")

    @defer.inlineCallbacks
    def test_badHello(self):
        for hello in [Payload(frames.UTF8, b"hi"), Payload.json({"role": "device"}),
                      Payload.json({"role": "robot", "fleet": "acme", "nonce": "00" * 16}),
                      Payload.json({"role": "device", "fleet": "acme", "id": "d1",
                                    "nonce": "00"})]:
            peer = yield self.h.open(RawPeer())
            peer.transport.write(frames.encode(frames.HELLO, 0, hello))
            yield peer.closed
            self.assertEqual(errorCodes(peer), ["BAD_HELLO"], hello)

    @defer.inlineCallbacks
    def test_frameBeforeHello(self):
        peer = yield self.h.open(RawPeer())
        peer.transport.write(frames.encode(frames.REQUEST, 5, Payload.json(1)))
        yield peer.closed
        self.assertEqual(errorCodes(peer), ["AUTH_REQUIRED"])

    @defer.inlineCallbacks
    def test_revokedBetweenHelloAndProof(self):
        c = yield self.h.device("d2", authenticate=False)
        yield waitUntil(reactor, lambda: hasattr(c, "_serverNonce") or c.authenticated.called)
        # Whatever the race, a revoked key opens no session afterwards.
        yield self.c.revokeKey("acme", "d2")
        yield waitUntil(reactor, lambda: not c.transport.connected)
        self.assertFalse(self.c.isOnline("acme", "d2"))
        again = yield self.h.device("d2", authenticate=False)
        e = yield self.assertFailure(again.authenticated, AuthFailed)
        self.assertEqual(e.code, "UNKNOWN_DEVICE")


class TLSAuthenticationTests(AuthenticationTests):
    tls = True


class RequestTests(HarnessMixin, TestCase):
    options = {"requestTimeout": 0.3}

    @defer.inlineCallbacks
    def test_centralToDevice(self):
        """
        A central's REQUEST to a device id reaches the device with the
        broker's id; the device's RESPONSE comes back under the central's
        id, every payload type intact.
        """
        d = yield self.h.device("d1")
        d.onRequest = lambda f: Payload(f.payload.type, f.payload.data)
        central = yield self.h.central()
        for p in [Payload(frames.BINARY, b"\x00\xff"), Payload(frames.ASCII, b"AT+OK"),
                  Payload.text("d\u00e9j\u00e0"), Payload.json({"on": True}), frames.EMPTY]:
            answer = yield central.request(p, address="d1")
            self.assertEqual(answer, p)

    @defer.inlineCallbacks
    def test_apiRequest(self):
        d = yield self.h.device("d1")
        d.onRequest = lambda f: Payload.json({"echo": f.payload.value()})
        answer = yield self.c.request("acme", "d1", Payload.json(7))
        self.assertEqual(answer.value(), {"echo": 7})

    @defer.inlineCallbacks
    def test_deviceRefuses(self):
        d = yield self.h.device("d1")

        def refuse(frame):
            raise errors.Refused("not now", "BUSY")
        d.onRequest = refuse
        e = yield self.assertFailure(self.c.request("acme", "d1", Payload.json(1)),
                                     errors.Refused)
        self.assertEqual((e.code, e.message), ("BUSY", "not now"))

    @defer.inlineCallbacks
    def test_timeout(self):
        """
        A device that never answers: the request fails with TIMEOUT after
        the timeout; a late answer is refused as unknown.
        """
        d = yield self.h.device("d1")
        central = yield self.h.central()
        e = yield self.assertFailure(central.request(Payload.json(1), address="d1"),
                                     errors.Refused)
        self.assertEqual(e.code, "TIMEOUT")
        self.assertEqual(self.c.stats["requestTimeouts"], 1)
        request = yield d.nextFrame()
        self.assertEqual(request.kind, frames.REQUEST)
        d.write(frames.RESPONSE, request.requestId, Payload.json("late"))
        error = yield d.nextFrame()
        self.assertEqual((error.kind, error.payload.value()["code"]),
                         (frames.ERROR, "BAD_REQUEST"))

    @defer.inlineCallbacks
    def test_offlineAndUnknown(self):
        central = yield self.h.central()
        e = yield self.assertFailure(central.request(Payload.json(1), address="d2"),
                                     errors.Refused)
        self.assertEqual(e.code, "DEVICE_OFFLINE")
        e = yield self.assertFailure(central.request(Payload.json(1), address="ghost"),
                                     errors.Refused)
        self.assertEqual(e.code, "UNKNOWN_DEVICE")

    @defer.inlineCallbacks
    def test_deviceDisconnectsMidRequest(self):
        d = yield self.h.device("d1")
        pending = self.c.request("acme", "d1", Payload.json(1), timeout=10)
        yield d.nextFrame()
        d.transport.loseConnection()
        yield self.assertFailure(pending, errors.DeviceOffline)

    @defer.inlineCallbacks
    def test_deviceToCentralSession(self):
        """
        A device's REQUEST goes to the connected central, addressed with
        the device id; the central's RESPONSE comes back to the device.
        """
        central = yield self.h.central()
        central.onRequest = lambda f: Payload.json({"for": f.address, "got": f.payload.value()})
        d = yield self.h.device("d1")
        answer = yield d.request(Payload.json("hello"))
        self.assertEqual(answer.value(), {"for": "d1", "got": "hello"})

    @defer.inlineCallbacks
    def test_deviceToFallback(self):
        link = RecordingLink(Payload.json("from webhook"))
        self.c.setCentralFallback("acme", link)
        d = yield self.h.device("d1")
        answer = yield d.request(Payload(frames.ASCII, b"ping"))
        self.assertEqual(answer.value(), "from webhook")
        self.assertEqual(link.requests, [("acme", "d1", Payload(frames.ASCII, b"ping"))])

    @defer.inlineCallbacks
    def test_deviceToCentralTimeoutAndNone(self):
        d = yield self.h.device("d1")
        e = yield self.assertFailure(d.request(Payload.json(1)), errors.Refused)
        self.assertEqual(e.code, "NO_CENTRAL")
        self.c.setCentralFallback("acme", RecordingLink())
        e = yield self.assertFailure(d.request(Payload.json(1)), errors.Refused)
        self.assertEqual(e.code, "TIMEOUT")

    @defer.inlineCallbacks
    def test_deviceMayNotAddressOthers(self):
        """
        A device cannot address another device, another fleet, or a group
        its entry does not allow; a central only reaches its own fleet.
        """
        d = yield self.h.device("d1")
        for address in ("d2", "other/x1"):
            e = yield self.assertFailure(d.request(Payload.json(1), address=address),
                                         errors.Refused)
            self.assertEqual(e.code, "FORBIDDEN")
        d.write(frames.MESSAGE, 9, Payload.json(1), "group/secret")
        f = yield d.nextFrame()
        self.assertEqual((f.kind, f.requestId, f.payload.value()["code"]),
                         (frames.ERROR, 9, "FORBIDDEN"))
        d.write(frames.MESSAGE, 10, Payload.json(1), "d2")
        f = yield d.nextFrame()
        self.assertEqual(f.payload.value()["code"], "FORBIDDEN")
        x1 = yield self.h.device("x1", fleet="other")
        x1.onRequest = lambda f: Payload.json("leak")
        central = yield self.h.central("acme")
        e = yield self.assertFailure(central.request(Payload.json(1), address="x1"),
                                     errors.Refused)
        self.assertEqual(e.code, "UNKNOWN_DEVICE")
        e = yield self.assertFailure(self.c.request("other", "d1", Payload.json(1)),
                                     errors.UnknownDevice)
        other = yield self.h.central("other")
        got = []
        other.onRequest = lambda f: got.append(f) or Payload.json(0)
        yield self.assertFailure(d.request(Payload.json(1)), errors.Refused)
        self.assertEqual(got, [])


class TLSRequestTests(RequestTests):
    tls = True


class MessageTests(HarnessMixin, TestCase):

    @defer.inlineCallbacks
    def test_groupMessage(self):
        """
        A device's MESSAGE to an allowed group is published in its fleet's
        hub and ACKed.
        """
        hub = self.h.core.hub("acme")
        watcher = RecordingConnection("w")
        hub.admit(watcher, groups=["alerts"])
        d = yield self.h.device("d1")
        d.write(frames.MESSAGE, 4, Payload.json({"smoke": True}), "group/alerts")
        ack = yield d.nextFrame()
        self.assertEqual((ack.kind, ack.requestId), (frames.ACK, 4))
        yield waitUntil(reactor, lambda: watcher.payloads)
        self.assertEqual(watcher.payloads, [b'{"smoke":true}'])
        self.assertEqual(watcher.deliveries[0].group, "alerts")

    @defer.inlineCallbacks
    def test_messageToCentral(self):
        central = yield self.h.central()
        d = yield self.h.device("d1")
        d.write(frames.MESSAGE, 1, Payload.text("hi"))
        ack = yield d.nextFrame()
        self.assertEqual(ack.kind, frames.ACK)
        m = yield central.nextFrame()
        self.assertEqual((m.kind, m.address, m.payload), (frames.MESSAGE, "d1",
                                                          Payload.text("hi")))

    @defer.inlineCallbacks
    def test_messageToFallback(self):
        link = RecordingLink()
        self.c.setCentralFallback("acme", link)
        d = yield self.h.device("d1")
        d.write(frames.MESSAGE, 1, Payload.text("hi"))
        ack = yield d.nextFrame()
        self.assertEqual((ack.kind, ack.requestId), (frames.ACK, 1))
        yield waitUntil(reactor, lambda: link.messages)
        self.assertEqual(link.messages, [("acme", "d1", Payload.text("hi"))])
        self.assertEqual(link.events[0][:2], ("device_connected", "d1"))

    @defer.inlineCallbacks
    def test_centralMessageOnline(self):
        """
        A central's MESSAGE to an online device: ACKed to the central with
        the message id, delivered, removed from the queue on the device's
        ACK.
        """
        d = yield self.h.device("d1")
        central = yield self.h.central()
        central.write(frames.MESSAGE, 3, Payload(frames.ASCII, b"reboot"), "d1")
        ack = yield central.nextFrame()
        self.assertEqual((ack.kind, ack.requestId), (frames.ACK, 3))
        self.assertFalse(ack.payload.value()["queued"])
        m = yield d.nextFrame()
        self.assertEqual((m.kind, m.payload, str(m.requestId)),
                         (frames.MESSAGE, Payload(frames.ASCII, b"reboot"),
                          ack.payload.value()["messageId"]))
        self.assertEqual((yield self.c.queueDepth("acme", "d1")), 1)
        d.write(frames.ACK, m.requestId)
        yield waitUntil(reactor, lambda: self.c.stats["messagesAcked"] == 1)
        self.assertEqual((yield self.c.queueDepth("acme", "d1")), 0)

    @defer.inlineCallbacks
    def test_directMessage(self):
        d = yield self.h.device("d1")
        messageId, queued = yield self.c.send("acme", "d1", Payload.json(1), queue=False)
        self.assertFalse(queued)
        m = yield d.nextFrame()
        self.assertEqual(str(m.requestId), messageId)
        self.assertEqual((yield self.c.queueDepth("acme", "d1")), 0)
        yield self.assertFailure(self.c.send("acme", "d2", Payload.json(1), queue=False),
                                 errors.DeviceOffline)

    @defer.inlineCallbacks
    def test_devicesList(self):
        d = yield self.h.device("d1")
        yield self.c.send("acme", "d2", Payload.json(1))
        listed = yield self.c.devices("acme")
        self.assertEqual(listed, [{"id": "d1", "online": True, "queueDepth": 0},
                                  {"id": "d2", "online": False, "queueDepth": 1}])
        self.assertEqual([x["id"] for x in (yield self.c.devices("other"))], ["x1"])
        d.transport.loseConnection()

    @defer.inlineCallbacks
    def test_issueAndRevokeKey(self):
        """
        An issued key opens a session; a new key closes the old session
        and the old key no longer works; a revoked key closes the session.
        """
        secret = yield self.c.issueKey("acme", "d9")
        d = yield self.h.device("d9", secret=secret)
        secret2 = yield self.c.issueKey("acme", "d9")
        yield d.closed
        old = yield self.h.device("d9", secret=secret, authenticate=False)
        e = yield self.assertFailure(old.authenticated, AuthFailed)
        self.assertEqual(e.code, "BAD_PROOF")
        d = yield self.h.device("d9", secret=secret2)
        yield self.c.revokeKey("acme", "d9")
        yield d.closed
        self.assertFalse(self.c.isOnline("acme", "d9"))
        yield self.assertFailure(self.c.revokeKey("acme", "d9"), errors.UnknownDevice)
        rows = yield self.h.store.keys()
        self.assertEqual(rows, [("acme", "d9", None)])

    @defer.inlineCallbacks
    def test_newSessionReplacesOld(self):
        first = yield self.h.device("d1")
        second = yield self.h.device("d1")
        yield first.closed
        close = [f for f in first.inbox.pending if f.kind == frames.CLOSE]
        self.assertEqual(close[0].payload.value()["code"], "REPLACED")
        self.assertTrue(self.c.isOnline("acme", "d1"))
        second.transport.loseConnection()


class KeepaliveTests(HarnessMixin, TestCase):
    options = {"pingInterval": 0.2, "pingTimeout": 0.8}

    @defer.inlineCallbacks
    def test_pingAnswered(self):
        """
        An idle session is pinged and stays open while it answers.
        """
        d = yield self.h.device("d1")
        pings = []
        original = d._frame

        def spy(frame):
            if frame.kind == frames.PING:
                pings.append(frame)
            original(frame)
        d._frame = spy
        yield deferLater(reactor, 1.5, lambda: None)
        self.assertGreaterEqual(len(pings), 2)
        self.assertTrue(d.transport.connected)
        self.assertEqual(self.h.factory.counters.deadSessions, 0)

    @defer.inlineCallbacks
    def test_deadClosed(self):
        d = yield self.h.device("d1")
        d.answerPings = False
        yield d.closed
        self.assertEqual(self.h.factory.counters.deadSessions, 1)
        yield waitUntil(reactor, lambda: not self.c.isOnline("acme", "d1"))
        close = [f for f in d.inbox.pending if f.kind == frames.CLOSE]
        self.assertEqual(close[0].payload.value()["code"], "DEAD")

    @defer.inlineCallbacks
    def test_clientPing(self):
        d = yield self.h.device("d1")
        d.write(frames.PING, 77, Payload(frames.BINARY, b"t"))
        pong = yield d.nextFrame()
        self.assertEqual((pong.kind, pong.requestId, pong.payload.data), (frames.PONG, 77, b"t"))
        d.write(frames.PONG, 1)
        d.write(frames.CLOSE, 0, Payload.json({"code": "BYE", "reason": ""}))
        yield d.closed
        yield waitUntil(reactor, lambda: not self.c.isOnline("acme", "d1"))


class MalformedTests(HarnessMixin, TestCase):
    options = {"maxFrame": 1024}

    @defer.inlineCallbacks
    def test_badPayloadsAnswered(self):
        """
        A delimited frame with a bad payload gets an ERROR with its request
        id, and the session goes on.
        """
        d = yield self.h.device("d1")
        body = frames.HEADER.pack(1, frames.MESSAGE, 12, 2, 0) + b"caf\xc3\xa9"   # ascii
        d.transport.write(frames.LENGTH.pack(len(body)) + body)
        body = frames.HEADER.pack(1, frames.MESSAGE, 13, 4, 0) + b"{nope"         # json
        d.transport.write(frames.LENGTH.pack(len(body)) + body)
        body = frames.HEADER.pack(1, frames.MESSAGE, 14, 3, 0) + b"\xff\xfe"       # utf8
        d.transport.write(frames.LENGTH.pack(len(body)) + body)
        body = frames.HEADER.pack(2, frames.MESSAGE, 15, 0, 0)                    # version
        d.transport.write(frames.LENGTH.pack(len(body)) + body)
        body = frames.HEADER.pack(1, 0x77, 16, 0, 0)                              # kind
        d.transport.write(frames.LENGTH.pack(len(body)) + body)
        got = []
        for _ in range(5):
            f = yield d.nextFrame()
            got.append((f.requestId, f.payload.value()["code"]))
        self.assertEqual(got, [(12, "BAD_PAYLOAD"), (13, "BAD_PAYLOAD"), (14, "BAD_PAYLOAD"),
                               (15, "UNSUPPORTED_VERSION"), (16, "BAD_FRAME")])
        d.write(frames.PING, 1)
        pong = yield d.nextFrame()
        self.assertEqual(pong.kind, frames.PONG)
        self.assertEqual(self.h.factory.counters.badFrames, 5)

    @defer.inlineCallbacks
    def test_oversizedClosed(self):
        d = yield self.h.device("d1")
        d.write(frames.MESSAGE, 1, Payload(frames.BINARY, b"x" * 2000))
        yield d.closed
        codes = [f.payload.value()["code"] for f in d.inbox.pending if f.kind == frames.ERROR]
        self.assertEqual(codes, ["FRAME_TOO_LARGE"])

    @defer.inlineCallbacks
    def test_wrongKindsForRole(self):
        central = yield self.h.central()
        central.write(frames.TELEMETRY, 2, Payload.json(1))
        central.write(frames.HELLO, 3, Payload.json(1))
        for rid in (2, 3):
            f = yield central.nextFrame()
            self.assertEqual((f.kind, f.requestId, f.payload.value()["code"]),
                             (frames.ERROR, rid, "BAD_REQUEST"))

    def randomFrames(self, seed, n):
        """
        C{n} delimited frames with random header fields and payloads (the
        Hypothesis strategies of tests.test_iot_frames drive the unit-level
        fuzzing; here the same shapes go through a real socket).
        """
        rnd = random.Random(seed)
        # Not CLOSE: that one legitimately ends the session.
        kinds = sorted(set(frames.KINDS) - {frames.CLOSE}) + [0, 0x7F, 0xFF]
        out = []
        for _ in range(n):
            address = rnd.choice([b"", b"d2", b"group/alerts", b"\xff\xfe",
                                  bytes(rnd.randrange(256) for _ in range(4))])
            payload = bytes(rnd.randrange(256) for _ in range(rnd.randrange(40)))
            body = frames.HEADER.pack(rnd.choice([1, 1, 1, 0, 2]), rnd.choice(kinds),
                                      rnd.randrange(2 ** 62), rnd.randrange(7),
                                      len(address)) + address + payload
            out.append(frames.LENGTH.pack(len(body)) + body)
        return out

    @defer.inlineCallbacks
    def test_randomFramesBothRoles(self):
        """
        Hundreds of random (mostly invalid) frames on an authenticated
        device session and central session: answered or ignored, never
        fatal; both sessions still answer a PING afterwards.
        """
        d = yield self.h.device("d1")
        central = yield self.h.central()
        for seed, peer in [(1, d), (2, central)]:
            for chunk in self.randomFrames(seed, 300):
                peer.transport.write(chunk)
            peer.write(frames.PING, 4242)
        for peer in (d, central):
            while True:
                f = yield peer.nextFrame()
                if isinstance(f, frames.Frame) and f.kind == frames.PONG and \
                        f.requestId == 4242:
                    break
            self.assertTrue(peer.transport.connected)
        self.assertGreater(self.h.factory.counters.badFrames, 100)

    @defer.inlineCallbacks
    def test_garbageBeforeAuth(self):
        peer = yield self.h.open(RawPeer())
        peer.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        yield peer.closed
        self.assertEqual(errorCodes(peer), ["FRAME_TOO_LARGE"])
        d = yield self.h.device("d1")
        self.assertTrue(d.open)


class TelemetryTests(HarnessMixin, TestCase):
    options = {"tokenBatch": 8}

    @defer.inlineCallbacks
    def test_tcpTelemetry(self):
        """
        TELEMETRY over TCP reaches the device's telemetry group in its
        fleet's hub and the central, addressed with the device id.
        """
        watcher = RecordingConnection("w")
        self.h.core.hub("acme").admit(watcher, groups=[telemetryGroup("d1")])
        central = yield self.h.central()
        d = yield self.h.device("d1")
        d.write(frames.TELEMETRY, 0, Payload.json({"t": 21.5}))
        f = yield central.nextFrame()
        self.assertEqual((f.kind, f.address, f.payload.value()), (frames.TELEMETRY, "d1",
                                                                  {"t": 21.5}))
        yield waitUntil(reactor, lambda: watcher.payloads)
        self.assertEqual(watcher.payloads, [b'{"t":21.5}'])

    @defer.inlineCallbacks
    def test_tokensOnWelcomeAndOnDemand(self):
        d = yield self.h.device("d1")
        tokens = yield d.waitTokens(8)
        self.assertEqual(len(tokens), 8)
        self.assertEqual(len(set(tokens)), 8)
        self.assertTrue(all(len(t) == 16 for t in tokens))
        self.assertEqual(d.tokenTTL, 300)
        d.write(frames.TOKENS)
        # Already full: asking again gives nothing more than the batch.
        d.write(frames.PING, 5)
        yield d.nextFrame()
        self.assertEqual(len(d.tokens), 8)


class LimitsTests(HarnessMixin, TestCase):
    options = {"maxInFlight": 2, "maxOutputBuffer": 16 * 1024, "requestTimeout": 5}

    @defer.inlineCallbacks
    def test_busy(self):
        """
        A peer with C{maxInFlight} requests unanswered gets BUSY for the
        next, and may go on once one is answered.
        """
        central = yield self.h.central()
        d = yield self.h.device("d1")
        first, second = d.request(Payload.json(1)), d.request(Payload.json(2))
        e = yield self.assertFailure(d.request(Payload.json(3)), errors.Refused)
        self.assertEqual(e.code, "BUSY")
        request = yield central.nextFrame()
        central.write(frames.RESPONSE, request.requestId, Payload.json("one"))
        self.assertEqual((yield first).value(), "one")
        third = d.request(Payload.json(4))
        for _ in range(2):
            request = yield central.nextFrame()
            central.write(frames.RESPONSE, request.requestId, Payload.json("ok"))
        yield second
        yield third

    @defer.inlineCallbacks
    def test_slowConsumer(self):
        """
        A device that stops reading is dropped once more than
        C{maxOutputBuffer} bytes wait for it, instead of the broker
        buffering without bound.
        """
        d = yield self.h.device("d1")
        d.transport.pauseProducing()
        chunk = Payload(frames.BINARY, b"x" * 60000)
        for _ in range(2000):
            if not self.c.isOnline("acme", "d1"):
                break
            try:
                yield self.c.send("acme", "d1", chunk, queue=False)
            except errors.DeviceOffline:
                break
            if _ % 50 == 0:
                yield deferLater(reactor, 0, lambda: None)
        self.assertEqual(self.h.factory.counters.slowConsumers, 1)
        d.transport.resumeProducing()
        yield d.closed
        yield waitUntil(reactor, lambda: not self.c.isOnline("acme", "d1"))
