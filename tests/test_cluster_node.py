# -*- test-case-name: tests.test_cluster_node -*-
"""
The cluster node over a real redis-server: broadcasts reach every other
node once, direct messages reach their node (this one included), and a
node that stops heartbeating is reaped by exactly one survivor.
"""

from twisted.internet import defer, reactor
from twisted.trial import unittest

from broker.cluster.node import Cluster
from broker.cluster.redis import RedisClient
from tests.redisserver import RedisServer
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
        c._beat.stop()
        c.redis._upHooks = []
        yield waitFor(lambda: dead, timeout=5)
        yield waitFor(lambda: a.reaped + b.reaped == 1)
        self.assertEqual(len(dead), 1)
        self.assertEqual(dead[0][1], "c")
        self.assertEqual(sorted((yield a.liveNodes())), ["a", "b"])
