# -*- test-case-name: tests.test_iot_forward -*-
"""
Device -> central store-and-forward (L{broker.iot.forward}) over real
sockets: a central that is away (no session, or a webhook answering 503
from a real HTTP upstream) gets, once back, every message, telemetry (when
forwarded) and presence event sent meanwhile, in order, with durable ids;
QUEUE_FULL at the depth limit; expiry; redelivery of what was not ACKed.
"""

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from broker.iot import frames
from broker.iot.client import FORWARDED, IoTClient
from broker.iot.forward import decodeEvent, encodeEvent
from broker.iot.frames import Payload
from broker.iot.settings import SECTION
from broker.iot.webhook import Webhooks
from tests.iotharness import SECRETS, IoTHarness, waitUntil
from tests.test_iot_webhook import WebhookTestMixin

KINDS = {frames.MESSAGE: "message", frames.TELEMETRY: "telemetry",
         frames.DEVICE_CONNECTED: "device_connected",
         frames.DEVICE_DISCONNECTED: "device_disconnected",
         frames.MESSAGE_STATUS: "message_status"}


class RecordingCentral(IoTClient):
    """
    A central client that records, in arrival order, every frame its
    devices' traffic becomes, and ACKs it (unless C{ack} is off).
    """

    def __init__(self, fleet="acme", ack=True):
        super().__init__("central", fleet, None, SECRETS[(fleet, None)])
        self.log = []
        self.ack = ack

    def _frame(self, frame):
        if self.open and frame.kind in FORWARDED:
            self.log.append(frame)
            if frame.requestId and self.ack:
                self.write(frames.ACK, frame.requestId)
            return
        super()._frame(frame)

    def events(self):
        """
        C{(kind, device, value)} of what arrived: the payload's value, but
        only the reason of a presence event (its time varies).
        """
        out = []
        for f in self.log:
            value = f.payload.value()
            if f.kind in (frames.DEVICE_CONNECTED, frames.DEVICE_DISCONNECTED):
                value = value.get("reason")
            out.append((KINDS[f.kind], f.address, value))
        return out


def script():
    """
    What the tests' devices do while the central is away, and what the
    central must then see, in order.
    """
    return [
        ("device_connected", "d1", None),
        ("message", "d1", {"n": 1}),
        ("telemetry", "d1", {"t": 20.5}),
        ("message", "d1", {"n": 2}),
        ("device_connected", "d2", None),
        ("message", "d2", "from d2"),
        ("device_disconnected", "d1", "closed"),
        ("device_disconnected", "d2", "key_revoked"),
    ]


@defer.inlineCallbacks
def runScript(h):
    """
    Play L{script} against harness C{h}; each MESSAGE is ACKed to the
    device only once stored.
    """
    d1 = yield h.device("d1")
    for rid, value in ((1, {"n": 1}), (2, None), (3, {"n": 2})):
        if value is None:
            d1.write(frames.TELEMETRY, 0, Payload.json({"t": 20.5}))
            continue
        d1.write(frames.MESSAGE, rid, Payload.json(value))
        ack = yield d1.nextFrame()
        assert (ack.kind, ack.requestId) == (frames.ACK, rid), ack
    d2 = yield h.device("d2")
    d2.write(frames.MESSAGE, 9, Payload.text("from d2"))
    ack = yield d2.nextFrame()
    assert ack.kind == frames.ACK, ack
    d1.transport.loseConnection()
    yield d1.closed
    yield waitUntil(reactor, lambda: not h.concentrator.isOnline("acme", "d1"))
    yield h.concentrator.revokeKey("acme", "d2")
    yield d2.closed


class EnvelopeTests(TestCase):
    def test_roundTrip(self):
        for payload in (Payload.json({"a": [1]}), Payload(frames.BINARY, b"\x00\xff"),
                        Payload.text("été"), frames.EMPTY):
            stored = encodeEvent(frames.MESSAGE, "dév-1", payload)
            self.assertEqual(decodeEvent(stored), (frames.MESSAGE, "dév-1", payload))


class CentralSessionTests(TestCase):
    options = dict(forwardTelemetry=True)

    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield IoTHarness(self, reactor, **self.options).start()
        self.addCleanup(self.h.stop)
        self.c = self.h.concentrator

    @defer.inlineCallbacks
    def central(self, ack=True):
        central = yield self.h.open(RecordingCentral(ack=ack))
        self.h.clients.append(central)
        yield central.authenticated
        return central

    @defer.inlineCallbacks
    def test_awayThenBack(self):
        """
        Everything sent while no central session was connected arrives,
        in order, each frame with its durable id as requestId, once the
        central connects; its ACKs empty the queue.
        """
        yield runScript(self.h)
        self.assertEqual((yield self.h.store.depth("acme", "")), len(script()))
        central = yield self.central()
        yield waitUntil(reactor, lambda: len(central.log) == len(script()))
        self.assertEqual(central.events(), script())
        ids = [f.requestId for f in central.log]
        self.assertEqual(ids, sorted(ids))
        self.assertTrue(all(0 < i < 1 << 62 for i in ids))
        yield waitUntil(reactor, lambda: self.c.stats["centralDelivered"] == len(script()))
        self.assertEqual((yield self.h.store.depth("acme", "")), 0)

    @defer.inlineCallbacks
    def test_directWhileConnected(self):
        """
        With the central connected and its queue drained, events go
        straight to it (requestId 0, nothing stored).
        """
        central = yield self.central()
        # Until its first read of the (empty) queue, events are stored.
        yield waitUntil(reactor, lambda: self.c.forwarder.boxes["acme"].idle())
        d1 = yield self.h.device("d1")
        d1.write(frames.MESSAGE, 5, Payload.text("now"))
        ack = yield d1.nextFrame()
        self.assertEqual(ack.kind, frames.ACK)
        yield waitUntil(reactor, lambda: len(central.log) == 2)
        self.assertEqual([(f.kind, f.requestId) for f in central.log],
                         [(frames.DEVICE_CONNECTED, 0), (frames.MESSAGE, 0)])
        self.assertEqual(self.c.stats["centralQueued"], 0)

    @defer.inlineCallbacks
    def test_unackedRedelivered(self):
        """
        What the central did not ACK comes again, with the same ids, on
        its next session; then the queue is drained and direct resumes.
        """
        yield runScript(self.h)
        first = yield self.central(ack=False)
        yield waitUntil(reactor, lambda: len(first.log) == len(script()))
        ids = [f.requestId for f in first.log]
        first.transport.loseConnection()
        yield first.closed
        second = yield self.central()
        yield waitUntil(reactor, lambda: len(second.log) == len(script()))
        self.assertEqual([f.requestId for f in second.log], ids)
        self.assertEqual(second.events(), script())
        yield waitUntil(reactor, lambda: self.c.stats["centralDelivered"] == len(script()))
        d1 = yield self.h.device("d1")
        yield waitUntil(reactor, lambda: len(second.log) == len(script()) + 1)
        self.assertEqual((second.log[-1].kind, second.log[-1].requestId),
                         (frames.DEVICE_CONNECTED, 0))
        d1.transport.loseConnection()

    @defer.inlineCallbacks
    def test_telemetryNotForwardedByDefault(self):
        self.c.forwarder.forwardTelemetry = False
        d1 = yield self.h.device("d1")
        d1.write(frames.TELEMETRY, 0, Payload.json({"t": 1}))
        d1.write(frames.MESSAGE, 1, Payload.json("m"))
        yield d1.nextFrame()
        central = yield self.central()
        yield waitUntil(reactor, lambda: len(central.log) == 2)
        self.assertEqual([e[0] for e in central.events()], ["device_connected", "message"])


class LimitTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield IoTHarness(self, reactor, maxCentralQueueDepth=3,
                                  queueTTL=0.6).start()
        self.addCleanup(self.h.stop)

    @defer.inlineCallbacks
    def test_queueFull(self):
        """
        A central queue at its depth refuses the device's MESSAGE with
        QUEUE_FULL (nothing is ACKed that was not stored); once expired
        entries are gone there is room again.
        """
        d1 = yield self.h.device("d1")          # 1: DEVICE_CONNECTED
        for rid in (1, 2):
            d1.write(frames.MESSAGE, rid, Payload.json(rid))
            ack = yield d1.nextFrame()
            self.assertEqual((ack.kind, ack.requestId), (frames.ACK, rid))
        d1.write(frames.MESSAGE, 3, Payload.json(3))
        error = yield d1.nextFrame()
        self.assertEqual((error.kind, error.requestId, error.payload.value()["code"]),
                         (frames.ERROR, 3, "QUEUE_FULL"))
        self.assertEqual(self.h.concentrator.stats["centralQueueFull"], 1)
        yield deferLater(reactor, 0.7, lambda: None)
        d1.write(frames.MESSAGE, 4, Payload.json(4))
        ack = yield d1.nextFrame()
        self.assertEqual((ack.kind, ack.requestId), (frames.ACK, 4))

    @defer.inlineCallbacks
    def test_expired(self):
        """
        Events older than the queue TTL are not delivered.
        """
        d1 = yield self.h.device("d1")
        d1.write(frames.MESSAGE, 1, Payload.json("old"))
        yield d1.nextFrame()
        yield deferLater(reactor, 0.7, lambda: None)
        d1.write(frames.MESSAGE, 2, Payload.json("fresh"))
        yield d1.nextFrame()
        central = yield self.h.open(RecordingCentral())
        yield central.authenticated
        yield waitUntil(reactor, lambda: central.log)
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(central.events(), [("message", "d1", "fresh")])


class NoCentralTests(TestCase):
    @defer.inlineCallbacks
    def test_fleetWithoutCentral(self):
        """
        A fleet with no central key and no webhook: NO_CENTRAL, nothing
        kept.
        """
        h = yield IoTHarness(self, reactor).start()
        self.addCleanup(h.stop)
        h.registry.central = lambda fleet: None
        d1 = yield h.device("d1")
        d1.write(frames.MESSAGE, 1, Payload.json(1))
        error = yield d1.nextFrame()
        self.assertEqual(error.payload.value()["code"], "NO_CENTRAL")
        self.assertEqual((yield h.store.depth("acme", "")), 0)


class WebhookAwayTests(WebhookTestMixin, TestCase):
    """
    The webhook answers 503 for a while (a deploy): nothing is lost, and
    once it answers 2xx it gets every event in order, each with its
    durable id as messageId and a delivery id stable across attempts.
    """

    @defer.inlineCallbacks
    def setUp(self):
        yield self.startUpstream()
        self.upstream.default = (503, b"")
        self.h = yield IoTHarness(self, reactor, forwardTelemetry=True).start()
        self.addCleanup(self.h.stop)
        settings = SECTION.check("iot", {"webhook": {
            "retries": 0, "backoff": 0.02, "max_backoff": 0.1, "fleets": {"acme": {
                "url": self.url, "signing_secret": "s"}}}})
        self.webhooks = Webhooks(reactor, settings["webhook"], persistent=False)
        self.addCleanup(self.webhooks.close)
        self.webhooks.install(self.h.concentrator)

    @defer.inlineCallbacks
    def test_webhookDownThenUp(self):
        yield runScript(self.h)
        yield waitUntil(reactor, lambda: len(self.upstream.seen) >= 3)
        self.assertTrue(all(s["event"]["kind"] == "device_connected"
                            for s in self.upstream.seen))
        self.upstream.default = (200, b"")
        yield waitUntil(reactor, lambda: self.h.concentrator.stats["centralDelivered"]
                        == len(script()))
        delivered = []
        for s in self.upstream.seen:
            e = s["event"]
            if delivered and delivered[-1]["id"] == e["id"]:
                delivered[-1] = e           # a retried attempt
            else:
                delivered.append(e)
        got = []
        for e in delivered:
            value = e["payload"]["data"]
            if e["kind"].startswith("device_"):
                value = value.get("reason")
            got.append((e["kind"], e["device"], value))
        self.assertEqual(got, script())
        self.assertEqual([e["id"] for e in delivered], [f"q{e['messageId']}" for e in delivered])
        self.assertEqual((yield self.h.store.depth("acme", "")), 0)


class RateLimitedCentralTests(TestCase):
    @defer.inlineCallbacks
    def test_acksOverTheRateHonoured(self):
        """
        A central draining a backlog faster than its inbound rate: its
        ACKs are held back, not dropped, so the whole queue drains.
        """
        h = yield IoTHarness(self, reactor, inboundRate=(100, 0, 0.2)).start()
        self.addCleanup(h.stop)
        for i in range(150):
            yield h.concentrator.centralMessage("acme", "d1", Payload.json(i))
        central = yield h.open(RecordingCentral())
        yield central.authenticated
        yield waitUntil(reactor, lambda: h.concentrator.stats["centralDelivered"] == 150,
                        timeout=10)
        self.assertEqual([f.payload.value() for f in central.log], list(range(150)))
        self.assertEqual((yield h.store.depth("acme", "")), 0)
        # The server's side may be paused (not reading): let it see the close.
        central.transport.loseConnection()
        yield waitUntil(reactor, lambda: not h.concentrator._centrals)
