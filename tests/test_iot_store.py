"""
Tests for store-and-forward: one conformance suite run against
L{broker.iot.store} on a real SQLite file and L{broker.iot.redisstore} on a
real redis-server, and queued delivery over real TCP sessions (order, ack,
TTL, depth).
"""

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from broker.iot import errors, frames
from broker.iot.frames import Payload
from broker.iot.interfaces import IMessageStore
from broker.cluster.node import Cluster
from broker.cluster.redis import RedisClient
from broker.iot.redisstore import RedisMessageStore
from broker.iot.store import SQLiteMessageStore
from tests.iotharness import IoTHarness, waitUntil
from tests.redisserver import RedisServer
from tests.test_cluster_redis import waitFor


class FakeTime:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class StoreConformanceMixin:
    """
    What every L{IMessageStore} must do; C{setUp} sets C{self.time} (a
    L{FakeTime} the store reads) and C{self.store}.
    """

    def test_interface(self):
        self.assertTrue(IMessageStore.providedBy(self.store))

    @defer.inlineCallbacks
    def test_orderAndAck(self):
        ids = []
        for i in range(5):
            ids.append((yield self.store.push("f", "d", Payload.json(i), 60, 10)))
        self.assertEqual(ids, sorted(ids))
        rows = yield self.store.pending("f", "d", 0, 3)
        self.assertEqual([p.value() for _, p in rows], [0, 1, 2])
        rows = yield self.store.pending("f", "d", rows[-1][0], 10)
        self.assertEqual([p.value() for _, p in rows], [3, 4])
        self.assertTrue((yield self.store.ack("f", "d", ids[0])))
        self.assertFalse((yield self.store.ack("f", "d", ids[0])))
        self.assertFalse((yield self.store.ack("f", "other", ids[1])))
        self.assertEqual((yield self.store.depth("f", "d")), 4)
        self.assertEqual((yield self.store.depths("f")), {"d": 4})
        self.assertEqual((yield self.store.depths("g")), {})

    @defer.inlineCallbacks
    def test_groupCommit(self):
        """
        Pushes made in one reactor turn are committed together and each
        gets its own outcome, in order: ids while there is room, then
        QueueFull.
        """
        ds = [self.store.push("f", "d", Payload.json(i), 60, 3) for i in range(5)]
        ds.append(self.store.push("f", "e", Payload.json("e"), 60, 3))
        results = yield defer.DeferredList(ds, consumeErrors=True)
        ok = [r for success, r in results if success]
        self.assertEqual(len(ok), 4)
        self.assertEqual(ok[:3], sorted(ok[:3]))
        self.assertEqual([success for success, _ in results], [True] * 3 + [False] * 2 + [True])
        self.assertTrue(all(r.check(errors.QueueFull) for s, r in results if not s))
        rows = yield self.store.pending("f", "d", 0, 10)
        self.assertEqual([p.value() for _, p in rows], [0, 1, 2])

    @defer.inlineCallbacks
    def test_ttl(self):
        yield self.store.push("f", "d", Payload.json("old"), 10, 10)
        self.time.now += 5
        yield self.store.push("f", "d", Payload.json("new"), 10, 10)
        self.time.now += 6
        rows = yield self.store.pending("f", "d", 0, 10)
        self.assertEqual([p.value() for _, p in rows], ["new"])
        self.assertEqual((yield self.store.depth("f", "d")), 1)
        purged = yield self.store.purgeExpired()
        self.assertEqual(len(purged), 1)
        self.assertEqual(purged[0][:2], ("f", "d"))
        self.assertEqual((yield self.store.purgeExpired()), [])

    @defer.inlineCallbacks
    def test_depthLimit(self):
        """
        A full queue first drops its expired messages; if none expired,
        the push fails with QueueFull and nothing is lost.
        """
        yield self.store.push("f", "d", Payload.json(1), 10, 2)
        yield self.store.push("f", "d", Payload.json(2), 100, 2)
        yield self.assertFailure(self.store.push("f", "d", Payload.json(3), 100, 2),
                                 errors.QueueFull)
        yield self.store.push("f", "e", Payload.json("other device"), 100, 2)
        self.time.now += 20
        yield self.store.push("f", "d", Payload.json(3), 100, 2)
        rows = yield self.store.pending("f", "d", 0, 10)
        self.assertEqual([p.value() for _, p in rows], [2, 3])

    @defer.inlineCallbacks
    def test_everyPayloadType(self):
        for p in [Payload(frames.BINARY, b"\x00\xff"), Payload(frames.ASCII, b"A"),
                  Payload.text("\u00e9"), Payload.json([1]), frames.EMPTY]:
            yield self.store.push("f", "d", p, 60, 10)
        rows = yield self.store.pending("f", "d", 0, 10)
        self.assertEqual([p.type for _, p in rows], ["binary", "ascii", "utf8", "json", "none"])

    @defer.inlineCallbacks
    def test_keys(self):
        yield self.store.setKey("f", "d", "s1")
        yield self.store.setKey("f", "d", "s2")
        yield self.store.setKey("f", "e", None)
        self.assertEqual(sorted((yield self.store.keys())),
                         [("f", "d", "s2"), ("f", "e", None)])

    @defer.inlineCallbacks
    def test_listQueued(self):
        """
        The queue's ids, payload sizes, enqueue and expiry times, oldest
        first, expired ones until purged.
        """
        a = yield self.store.push("f", "d", Payload(frames.BINARY, b"\x00" * 7), 10, 10)
        self.time.now += 1
        b = yield self.store.push("f", "d", Payload.text("\u00e9"), 100, 10)
        yield self.store.push("f", "e", Payload.json(1), 100, 10)
        self.assertEqual((yield self.store.listQueued("f", "d", 10)),
                         [(a, 7, 1000.0, 1010.0), (b, 2, 1001.0, 1101.0)])
        self.assertEqual([r[0] for r in (yield self.store.listQueued("f", "d", 1))], [a])
        self.time.now += 20
        self.assertEqual([r[0] for r in (yield self.store.listQueued("f", "d", 10))], [a, b])
        self.assertEqual((yield self.store.purgeExpired()), [("f", "d", a)])
        self.assertEqual([r[0] for r in (yield self.store.listQueued("f", "d", 10))], [b])
        self.assertEqual((yield self.store.listQueued("f", "nobody", 10)), [])

    @defer.inlineCallbacks
    def test_remove(self):
        """
        remove deletes the given messages of one device (or all of them)
        and says which were there.
        """
        ids = []
        for i in range(4):
            ids.append((yield self.store.push("f", "d", Payload.json(i), 60, 10)))
        other = yield self.store.push("f", "e", Payload.json("e"), 60, 10)
        self.assertEqual((yield self.store.remove("f", "d", [ids[1], other])), [ids[1]])
        self.assertEqual((yield self.store.remove("f", "d", [ids[1]])), [])
        self.assertEqual([p.value() for _, p in (yield self.store.pending("f", "d", 0, 10))],
                         [0, 2, 3])
        self.assertEqual((yield self.store.remove("f", "d")), [ids[0], ids[2], ids[3]])
        self.assertEqual((yield self.store.depth("f", "d")), 0)
        self.assertEqual((yield self.store.depth("f", "e")), 1)
        self.assertEqual((yield self.store.remove("f", "d")), [])
        self.assertFalse((yield self.store.ack("f", "d", ids[0])))

    @defer.inlineCallbacks
    def test_purgeAcrossFleets(self):
        yield self.store.push("f", "d", Payload.json(1), 10, 10)
        yield self.store.push("g", "d", Payload.json(2), 10, 10)
        yield self.store.push("g", "e", Payload.json(3), 100, 10)
        self.time.now += 20
        self.assertEqual(sorted(r[:2] for r in (yield self.store.purgeExpired())),
                         [("f", "d"), ("g", "d")])
        self.assertEqual((yield self.store.depths("g")), {"e": 1})
        self.assertEqual((yield self.store.depths("f")), {})


class SQLiteStoreTests(StoreConformanceMixin, TestCase):

    def setUp(self):
        self.time = FakeTime()
        self.path = self.mktemp() + "/q.sqlite"
        self.store = SQLiteMessageStore.open(reactor, self.path, clock=self.time)
        self.store.runner.start()
        self.addCleanup(lambda: self.store.runner.close())

    @defer.inlineCallbacks
    def test_survivesReopen(self):
        yield self.store.push("f", "d", Payload.json("kept"), 60, 10)
        yield self.store.setKey("f", "d", "s1")
        yield self.store.setKey("f", "d", "s2")
        yield self.store.runner.close()
        again = SQLiteMessageStore.open(reactor, self.path, clock=self.time)
        again.runner.start()
        self.addCleanup(again.runner.close)
        rows = yield again.pending("f", "d", 0, 10)
        self.assertEqual([p.value() for _, p in rows], ["kept"])
        self.assertEqual((yield again.keys()), [("f", "d", "s2")])


@defer.inlineCallbacks
def redisStore(testCase, server, nodeId, **kw):
    """
    A L{RedisMessageStore} of node C{nodeId} on C{server}, connected; its
    client stops when C{testCase} ends.
    """
    client = RedisClient(reactor, server.url, maxDelay=0.3)
    # The Cluster subscribes its channels before the client connects.
    store = RedisMessageStore(Cluster(reactor, client, prefix="t", nodeId=nodeId), **kw)
    client.startService()
    testCase.addCleanup(client.stopService)
    yield waitFor(lambda: client.connected)
    return store


class RedisStoreTests(StoreConformanceMixin, TestCase):
    """
    The same suite on a real redis-server, plus what only a shared store
    has: two nodes' stores see one queue, and an outage refuses pushes.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.time = FakeTime()
        self.server = RedisServer(self, reactor)
        yield self.server.start()
        self.store = yield self.makeStore("a")

    def makeStore(self, nodeId):
        return redisStore(self, self.server, nodeId, clock=self.time)

    @defer.inlineCallbacks
    def test_sharedAcrossNodes(self):
        """
        A message pushed through one node is pending on another, ids keep
        increasing whichever node pushes, and an ack on either removes it.
        """
        other = yield self.makeStore("b")
        first = yield self.store.push("f", "d", Payload.json("via a"), 60, 10)
        second = yield other.push("f", "d", Payload.json("via b"), 60, 10)
        self.assertGreater(second, first)
        rows = yield other.pending("f", "d", 0, 10)
        self.assertEqual([p.value() for _, p in rows], ["via a", "via b"])
        self.assertTrue((yield other.ack("f", "d", first)))
        self.assertEqual((yield self.store.depth("f", "d")), 1)

    @defer.inlineCallbacks
    def test_idsIncreaseWhenRedisLosesTheCounter(self):
        """
        Ids keep increasing when Redis loses the counter (restarted empty,
        or an older replica took over): they are at least the pushing
        node's clock in microseconds and above every id that node has
        seen, and such large ids round-trip exactly (pending, ack).
        """
        first = yield self.store.push("f", "d", Payload.json(1), 60, 10)
        self.assertGreater(first, int(self.time.now * 1e6))
        rows = yield self.store.pending("f", "d", 0, 10)
        self.assertEqual([i for i, _ in rows], [first])
        self.server.command("FLUSHALL")
        self.time.now += 0.001
        other = yield self.makeStore("b")
        second = yield other.push("f", "d", Payload.json(2), 60, 10)
        self.assertGreater(second, first)
        # The counter goes back behind what node a has seen, and a's clock
        # is behind too: its ids still pass what it has seen.
        self.server.command("SET", "t:iot:ids", "3")
        self.time.now -= 10
        third = yield self.store.push("f", "d", Payload.json(3), 60, 10)
        self.assertGreater(third, first)
        rows = yield other.pending("f", "d", first, 10)
        self.assertEqual(sorted(i for i, _ in rows), sorted([second, third]))
        self.assertTrue((yield other.ack("f", "d", second, third)))
        self.assertEqual((yield self.store.depth("f", "d")), 0)

    @defer.inlineCallbacks
    def test_idsWithColons(self):
        """
        Ids are escaped in key names: fleet "a:q" and fleet "a" with a
        device "q:..." never share a queue.
        """
        yield self.store.push("a:q", "b", Payload.json(1), 60, 10)
        yield self.store.push("a", "q:b", Payload.json(2), 60, 10)
        self.assertEqual((yield self.store.depths("a:q")), {"b": 1})
        self.assertEqual((yield self.store.depths("a")), {"q:b": 1})

    @defer.inlineCallbacks
    def test_outageRefusesPush(self):
        """
        With Redis gone a push fails at once with Unavailable (refused, not
        parked); once Redis is back pushes succeed again.
        """
        client = self.store.redis
        yield self.server.stop()
        yield waitFor(lambda: not client.connected)
        e = yield self.assertFailure(self.store.push("f", "d", Payload.json(1), 60, 10),
                                     errors.Unavailable)
        self.assertIn("unreachable", e.message)
        yield self.assertFailure(self.store.depths("f"), errors.Unavailable)
        yield self.server.start()
        yield waitFor(lambda: client.connected)
        yield self.store.push("f", "d", Payload.json(2), 60, 10)
        rows = yield self.store.pending("f", "d", 0, 10)
        self.assertEqual([p.value() for _, p in rows], [2])


class QueuedDeliveryTests(TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield IoTHarness(self, reactor, maxQueueDepth=5, window=2).start()
        self.c = self.h.concentrator

    @defer.inlineCallbacks
    def test_offlineThenConnect(self):
        """
        Messages sent while the device is offline are queued, delivered in
        order when it connects (a window of 2 unacknowledged at a time),
        and removed only as it acknowledges them.
        """
        sent = []
        for i in range(5):
            messageId, queued = yield self.c.send("acme", "d1", Payload.json(i))
            self.assertTrue(queued)
            sent.append(messageId)
        yield self.assertFailure(self.c.send("acme", "d1", Payload.json(5)), errors.QueueFull)
        self.assertEqual(self.c.stats["queueFull"], 1)
        d = yield self.h.device("d1")
        got = []
        window = [(yield d.nextFrame()), (yield d.nextFrame())]
        # Nothing beyond the window arrives before an ack.
        yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(d.inbox.pending, [])
        for m in window:
            got.append((str(m.requestId), m.payload.value()))
            d.write(frames.ACK, m.requestId)
        for i in range(3):
            m = yield d.nextFrame()
            self.assertEqual(m.kind, frames.MESSAGE)
            got.append((str(m.requestId), m.payload.value()))
            d.write(frames.ACK, m.requestId)
        self.assertEqual(got, list(zip(sent, range(5))))
        yield waitUntil(reactor, lambda: self.c.stats["messagesAcked"] == 5)
        self.assertEqual((yield self.c.queueDepth("acme", "d1")), 0)

    @defer.inlineCallbacks
    def test_unackedRedelivered(self):
        """
        A message delivered but not acknowledged is delivered again, with
        the same id, on the next session; an acknowledged one never is.
        """
        first, _ = yield self.c.send("acme", "d1", Payload.json("a"))
        second, _ = yield self.c.send("acme", "d1", Payload.json("b"))
        d = yield self.h.device("d1")
        m1 = yield d.nextFrame()
        yield d.nextFrame()
        d.write(frames.ACK, m1.requestId)
        yield waitUntil(reactor, lambda: self.c.stats["messagesAcked"] == 1)
        d.transport.loseConnection()
        yield d.closed
        yield waitUntil(reactor, lambda: not self.c.isOnline("acme", "d1"))
        d = yield self.h.device("d1")
        m = yield d.nextFrame()
        self.assertEqual((str(m.requestId), m.payload.value()), (second, "b"))
        d.write(frames.PING, 1)
        pong = yield d.nextFrame()
        self.assertEqual(pong.kind, frames.PONG)

    @defer.inlineCallbacks
    def test_queuedWhileOnline(self):
        d = yield self.h.device("d1")
        for i in range(4):
            _, queued = yield self.c.send("acme", "d1", Payload.json(i))
            self.assertFalse(queued)
        d.autoAck = True
        got = []
        for i in range(4):
            m = yield d.nextFrame()
            d.write(frames.ACK, m.requestId)
            got.append(m.payload.value())
        self.assertEqual(got, [0, 1, 2, 3])

    @defer.inlineCallbacks
    def test_foreignAckIgnored(self):
        """
        A device cannot acknowledge (remove) another device's message.
        """
        theirs, _ = yield self.c.send("acme", "d2", Payload.json("theirs"))
        d = yield self.h.device("d1")
        d.write(frames.ACK, int(theirs))
        d.write(frames.PING, 1)
        yield d.nextFrame()
        self.assertEqual((yield self.c.queueDepth("acme", "d2")), 1)
