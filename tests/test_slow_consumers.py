# -*- test-case-name: tests.test_slow_consumers -*-
"""
Output bounds crossed the way a hostile or stalled peer crosses them: a
peer that never reads is sent many small frames (never one large one), on
every face, over real loopback sockets.  Each test asserts the drop, the
counter, that the broker's buffer for the peer never grew far past the
bound, and that a well-behaved peer on the same path lost nothing.
"""

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from broker.iot import errors, frames
from broker.iot.face import IoTCollector
from broker.iot.frames import Payload
from tests.iotharness import IoTHarness, waitUntil
from tests.wsharness import BrokerHarness

# A small bound, so the kernel's socket buffers (several MiB on loopback)
# dominate what is written before the drop; the publishers' batches stay
# well under it, since a burst written in one reactor turn waits in the
# broker's buffer whether or not the peer reads.
LIMIT = 256 * 1024
# Loopback sockets absorb up to ~10 MiB (send and receive buffers) before
# the broker's own buffer starts filling; past this the bound did not hold.
CEILING = 64 * 1024 * 1024


def buffered(transport):
    """
    Bytes a TCP transport holds that the kernel has not taken yet.
    """
    return len(transport.dataBuffer) - getattr(transport, "offset", 0) + sum(
        len(d) for d in transport._tempDataBuffer)


class BufferWatch:
    """
    Samples the largest output buffer of a server-side transport while a
    test floods it.
    """

    def __init__(self):
        self.peak = 0

    def sample(self, transport):
        if transport is not None and hasattr(transport, "dataBuffer"):
            self.peak = max(self.peak, buffered(transport))


def _turn():
    return deferLater(reactor, 0, lambda: None)


class WebPubSubSlowConsumerTests(unittest.TestCase):
    """
    Web PubSub: json, plain and reliable subscribers that never read, fed
    many 1 KiB messages by a real publishing client.
    """

    # No inbound rate limit: the ack flood must meet the output bound.
    toml = f"[webpubsub]\nmax_output_buffer = {LIMIT}\nmax_inbound_messages_per_second = 0\n" \
           "[webpubsub.hubs.chat]\nplain_mode = \"sendToGroup\"\nplain_group = \"g\"\n"

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield BrokerHarness(self, reactor, self.toml).start()
        self.hub = self.broker.core.hub("chat")

    def serverSide(self, connectionId):
        session = self.hub.localSession(connectionId)
        return None if session is None else session.connection

    @defer.inlineCallbacks
    def flood(self, slowId, fast, publisher, done, batch=32, size=1024):
        """
        Publish C{size}-byte messages to group g from C{publisher} (a real
        client) in batches, letting C{fast} read everything between
        batches, until C{done()} or L{CEILING} bytes.  Returns what C{fast}
        received and the peak of the slow peer's server-side buffer.
        """
        watch = BufferWatch()
        conn = self.serverSide(slowId)
        conn = getattr(conn, "protocol", conn)      # a reliable link's socket
        server = conn.transport
        sent = got = 0
        text = "x" * size
        ackId = 0
        while not done() and sent * size < CEILING:
            for _ in range(batch):
                ackId += 1
                publisher.send({"type": "sendToGroup", "group": "g", "dataType": "text",
                                "data": text, "noEcho": True})
            sent += batch
            while got < sent and not done():
                yield _turn()
                watch.sample(server)
                while fast.frames:
                    payload, _ = fast.frames.pop(0)
                    got += 1
            watch.sample(server)
        # Whatever is still in flight to the fast subscriber.
        for _ in range(2000):
            if got >= sent:
                break
            yield deferLater(reactor, 0.005, lambda: None)
            while fast.frames:
                fast.frames.pop(0)
                got += 1
        return sent, got, watch.peak

    @defer.inlineCallbacks
    def _check(self, slow, slowId):
        fast = yield self.broker.connectJSON(groups=["g"])
        publisher = yield self.broker.connectJSON(roles=["webpubsub.sendToGroup"])
        slow.transport.pauseProducing()     # never reads again
        server = getattr(self.serverSide(slowId), "protocol", None) or self.serverSide(slowId)
        server = server.transport
        sent, got, peak = yield self.flood(
            slowId, fast, publisher, lambda: self.hub.stats.slowConsumerDrops > 0)
        self.assertEqual(self.hub.stats.slowConsumerDrops, 1,
                         f"no drop after {sent} messages of 1 KiB")
        self.assertFalse(self.hub.connectionExists(slowId))
        # The bound: the limit, Twisted's 64 KiB high-water mark, a frame.
        self.assertLess(peak, LIMIT + 65536 + 2048)
        self.assertEqual(got, sent, "the well-behaved subscriber lost messages")
        self.assertTrue(self.hub.connectionExists(fast.connectionId))
        slow.transport.resumeProducing()
        yield slow.closed
        yield waitUntil(reactor, lambda: not server.connected)
        # What was queued for it is released with the connection, not when
        # a garbage collection reaches the protocol's reference cycles.
        self.assertEqual(buffered(server), 0)

    @defer.inlineCallbacks
    def test_jsonSubscriber(self):
        slow = yield self.broker.connectJSON(groups=["g"])
        yield self._check(slow, slow.connectionId)

    @defer.inlineCallbacks
    def test_plainSubscriber(self):
        before = {s.connectionId for s in self.hub.sessions()}
        slow = yield self.broker.connect(protocols=())
        [slowId] = {s.connectionId for s in self.hub.sessions()} - before
        self.hub.addConnectionToGroup(slowId, "g")
        yield self._check(slow, slowId)

    @defer.inlineCallbacks
    def test_ackFlood(self):
        """
        A client that floods requests asking for acks and never reads them
        is dropped like one that never reads deliveries.
        """
        slow = yield self.broker.connectJSON(roles=["webpubsub.joinLeaveGroup"])
        slow.transport.pauseProducing()
        n = 0
        while not self.hub.stats.slowConsumerDrops and n < 2_000_000:
            for _ in range(100):
                n += 1
                slow.send({"type": "joinGroup", "group": "g", "ackId": n})
            yield _turn()
        self.assertEqual(self.hub.stats.slowConsumerDrops, 1)
        self.assertFalse(self.hub.connectionExists(slow.connectionId))
        slow.transport.resumeProducing()
        yield slow.closed

    @defer.inlineCallbacks
    def test_reliableSubscriber(self):
        """
        A reliable subscriber that never reads (so never acknowledges) is
        closed by its link's bound on unacknowledged bytes, the same
        C{max_output_buffer}.
        """
        slow = yield self.broker.connect(protocols=("json.reliable.webpubsub.azure.v1",))
        hello = yield slow.nextJSON()
        self.hub.addConnectionToGroup(hello["connectionId"], "g")
        yield self._check(slow, hello["connectionId"])
        self.assertEqual(self.broker.factory.links.slowConsumers, 1)


class IoTSlowConsumerTests(unittest.TestCase):
    """
    IoT: a device that never reads, sent many small direct messages and
    its group's publishes, is dropped; a device beside it gets them all.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield IoTHarness(self, reactor, maxOutputBuffer=LIMIT).start()
        self.c = self.h.concentrator

    @defer.inlineCallbacks
    def test_neverReadingDevice(self):
        slow = yield self.h.device("d1")
        fast = yield self.h.device("d2")
        server = self.c._device("acme", "d1").transport
        watch = BufferWatch()
        slow.transport.pauseProducing()
        payload = Payload(frames.BINARY, b"x" * 1024)
        sent = 0
        while self.c.isOnline("acme", "d1") and sent < CEILING // 1024:
            for _ in range(32):
                sent += 1
                yield self.c.send("acme", "d2", payload, queue=False)
                try:
                    yield self.c.send("acme", "d1", payload, queue=False)
                except errors.DeviceOffline:
                    break
            watch.sample(server)
            yield _turn()
        self.assertEqual(self.h.factory.counters.slowConsumers, 1,
                         f"no drop after {sent} messages of 1 KiB")
        metrics = {m.name: m for m in IoTCollector(self.c, self.h.factory, None).collect()}
        self.assertEqual(metrics["broker_iot_slow_consumers"].samples[0].value, 1)
        self.assertLess(watch.peak, LIMIT + 65536 + 2048)
        yield waitUntil(reactor, lambda: len(fast.inbox.pending) >= sent)
        got = [fast.inbox.pending.pop(0) for _ in range(len(fast.inbox.pending))]
        self.assertEqual([f.kind for f in got], [frames.MESSAGE] * sent)
        slow.transport.resumeProducing()
        yield slow.closed
        yield waitUntil(reactor, lambda: not server.connected)
        self.assertEqual(buffered(server), 0)
        # And a collection follows, for what cycles through its session.
        yield waitUntil(reactor, lambda: self.h.core.memory.collections == 1, timeout=3)
