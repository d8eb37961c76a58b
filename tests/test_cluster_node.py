# -*- test-case-name: tests.test_cluster_node -*-
"""
The cluster node over a real redis-server: broadcasts reach every other
node once, direct messages reach their node (this one included), and a
node that stops heartbeating is reaped by exactly one survivor.
"""

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from broker.cluster.node import Cluster
from broker.cluster.redis import RedisClient
from tests.redisserver import RedisServer, silence
from tests.test_cluster_redis import waitFor


class ClusterNodeTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(self, reactor)
        yield self.redis.start()
        self.nodes = []
        for name in ("a", "b", "c"):
            self.nodes.append(self.makeNode(name))
        yield waitFor(lambda: all(n.healthy for n in self.nodes))

    def makeNode(self, name):
        client = RedisClient(reactor, self.redis.url, maxDelay=0.3)
        node = Cluster(reactor, client, prefix="t", nodeId=name, heartbeat=0.1, deadAfter=0.4)
        client.startService()
        node.startService()
        self.addCleanup(client.stopService)
        self.addCleanup(lambda: node.stopService() if node.running else None)
        return node

    @defer.inlineCallbacks
    def test_broadcastAndSend(self):
        got = {n.nodeId: [] for n in self.nodes}
        for n in self.nodes:
            n.onMessage("x", lambda origin, payload, n=n: got[n.nodeId].append((origin, payload)))
        a, b, c = self.nodes
        yield a.broadcast("x", b"hello")
        yield a.send("a", "x", b"self")
        yield a.send("c", "x", b"direct")
        yield waitFor(lambda: len(got["c"]) == 2 and got["a"] and got["b"])
        self.assertEqual(got["a"], [("a", b"self")])
        self.assertEqual(got["b"], [("a", b"hello")])
        self.assertEqual(got["c"], [("a", b"hello"), ("a", b"direct")])

    @defer.inlineCallbacks
    def test_silentNodeReapedOnce(self):
        dead = []
        a, b, c = self.nodes
        for n in (a, b):
            n.onNodeDead(lambda node, n=n: dead.append((n.nodeId, node)))
        self.assertEqual(sorted((yield a.liveNodes())), ["a", "b", "c"])
        # Silence c without a clean leave: its alive key simply expires.
        silence(c)
        yield waitFor(lambda: dead, timeout=5)
        yield waitFor(lambda: a.reaped + b.reaped == 1)
        self.assertEqual(len(dead), 1)
        self.assertEqual(dead[0][1], "c")
        self.assertEqual(sorted((yield a.liveNodes())), ["a", "b"])

    @defer.inlineCallbacks
    def test_restartUnderSameId(self):
        """
        A node that dies without leaving and starts again under its id
        before the others give it up for dead removes what its earlier run
        held (its own dead-node hooks, once, before it is reported
        connected and so before it takes any cluster-wide request), then
        registers again; nobody
        else reaps it, and it can still be reaped once it dies for good.
        """
        a, b, c = self.nodes
        dead, events = [], []
        for n in (a, b):
            n.onNodeDead(lambda node, n=n: dead.append((n.nodeId, node)))
        silence(c)
        again = self.makeNode("c")
        again.onNodeDead(lambda node: events.append(("dead", node)))
        again.onResync(lambda: events.append(("resync",)))
        yield waitFor(lambda: ("dead", "c") in events, timeout=5)
        yield waitFor(lambda: events[-1] == ("resync",))
        # Well past dead_after: the earlier run is buried once, by this one.
        yield deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(events, [("dead", "c"), ("resync",)])
        self.assertEqual(dead, [])
        self.assertEqual(sorted((yield a.liveNodes())), ["a", "b", "c"])
        again._beat.stop()
        again.redis._upHooks = []
        yield waitFor(lambda: dead, timeout=5)
        self.assertEqual([node for _, node in dead], ["c"])

    @defer.inlineCallbacks
    def test_oneTurnOneBatchInOrder(self):
        """
        Messages made in one reactor turn travel together, in the order
        they were made, across topics and channels.
        """
        got = []
        a, b, c = self.nodes
        for topic in ("x", "y"):
            b.onMessage(topic, lambda origin, payload, t=topic: got.append((t, payload)))
        publishes = []
        monitor = a.redis.execute
        a.redis.execute = lambda *args, **kw: (publishes.append(args[1]), monitor(*args, **kw))[1]
        ds = [a.broadcast("x", b"1"), a.broadcast("y", b"2"), a.send("b", "x", b"3"),
              a.broadcast("x", b"4"), a.broadcast("x", b"5")]
        results = yield defer.gatherResults(ds)
        yield waitFor(lambda: len(got) == 5)
        self.assertEqual(got, [("x", b"1"), ("y", b"2"), ("x", b"3"), ("x", b"4"), ("x", b"5")])
        self.assertEqual(publishes, ["t:bus", "t:node:b", "t:bus"])
        self.assertEqual(results, [3, 3, 1, 3, 3])

    @defer.inlineCallbacks
    def test_malformedDropped(self):
        got = []
        a, b, c = self.nodes
        b.onMessage("x", lambda origin, payload: got.append(payload))
        yield self.redis_publish("t:bus", b"a\n*\n\x00\x00\x00\x09short")
        yield self.redis_publish("t:bus", b"no-newline")
        yield a.broadcast("x", b"fine")
        yield waitFor(lambda: got == [b"fine"])
        self.assertEqual(b.badMessages, 2)

    def redis_publish(self, channel, message):
        return self.nodes[2].redis.execute("PUBLISH", channel, message)
