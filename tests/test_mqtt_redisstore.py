"""
The MQTT face's Redis store (L{broker.mqtt.redisstore}) against a real
redis-server: what one node writes, another reads back; who holds a
session; wills and shared-subscription members kept per node.
"""

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from broker.cluster.node import Cluster
from broker.cluster.redis import RedisClient
from broker.mqtt.message import MqttMessage
from broker.mqtt.redisstore import RedisStore
from broker.mqtt.session import OutMessage, RELEASED, SubOptions
from tests.redisserver import RedisServer
from tests.test_cluster_redis import waitFor


class FakeSession:
    """The fields of an L{broker.mqtt.session.MqttSession} a store reads."""

    def __init__(self, hub, clientId, userId="u1"):
        self.hubName = hub
        self.clientId = clientId
        self.userId = userId
        self.version = 5
        self.expiryInterval = 300
        self.online = False
        self.subs = {}


class RedisStoreTests(TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        self.server = RedisServer(self, reactor)
        yield self.server.start()
        self.a = yield self.makeStore("a")
        self.b = yield self.makeStore("b")

    @defer.inlineCallbacks
    def makeStore(self, name):
        client = RedisClient(reactor, self.server.url, maxDelay=0.3)
        node = Cluster(reactor, client, prefix="t", nodeId=name)
        client.startService()
        self.addCleanup(client.stopService)
        yield waitFor(lambda: client.connected)
        return RedisStore(reactor, node)

    @defer.inlineCallbacks
    def test_sessionAndQueueReadByAnotherNode(self):
        """
        A session, its subscriptions and its queue (in order, with the
        in-flight state of a message) written by node a are what node b
        loads; removed messages are gone.
        """
        s = FakeSession("hub:x", "c:1")
        s.subs["a/+"] = SubOptions("a/+", "a/+", None, 1, subId=7, wild=True)
        s.subs["$share/g/b"] = SubOptions("$share/g/b", "b", "g", 2)
        self.a.saveSession(s)
        outs = [OutMessage(f"a/{i}", b"\x00payload%d" % i, 1 + i % 2, i == 0,
                           {"correlation_data": b"\xff", "user_property": [("k", "v")]},
                           None if i else 12345.5, (7,)) for i in range(4)]
        for out in outs:
            self.a.addMessage(s, out)
        outs[0].pid, outs[0].state = 9, RELEASED
        self.a.updateMessage(s, outs[0])
        self.a.removeMessage(s, outs[2])
        yield self.a.whenFlushed()
        self.assertEqual(self.a.failures, 0)
        row, messages = yield self.b.loadSession("hub:x", "c:1")
        self.assertEqual(row[:6], ("hub:x", "c:1", "u1", 5, 300, row[5]))
        self.assertIsInstance(row[5], float)
        self.assertEqual(sorted(v[0] for v in __import__("json").loads(row[6])),
                         ["$share/g/b", "a/+"])
        self.assertEqual([m[3] for m in messages], ["a/0", "a/1", "a/3"])
        first = messages[0]
        self.assertEqual(first[4], b"\x00payload0")
        self.assertEqual((first[5], first[6], first[8], first[10], first[11]),
                         (1, True, 12345.5, 9, RELEASED))
        self.assertIn('"correlation_data": "/w=="', first[7])
        self.assertEqual((messages[1][10], messages[1][11]), (None, 0))
        # A session with the same client id in another hub is another session.
        other, none = yield self.b.loadSession("hub", "x:c:1")
        self.assertEqual((other, none), (None, []))
        self.a.deleteSession(s)
        yield self.a.whenFlushed()
        row, messages = yield self.b.loadSession("hub:x", "c:1")
        self.assertEqual((row, messages), (None, []))

    @defer.inlineCallbacks
    def test_queueOrderAcrossNodes(self):
        """
        Messages queued for one session by a, then (after a take-over) by
        b, then by a again, load in the order they were queued (one
        cluster-wide counter), each under its own id.
        """
        s = FakeSession("h", "c")
        self.a.saveSession(s)
        self.a.addMessage(s, OutMessage("t", b"1", 1, False, {}, None))
        yield self.a.whenFlushed()
        self.b.addMessage(s, OutMessage("t", b"2", 1, False, {}, None))
        yield self.b.whenFlushed()
        self.a.addMessage(s, OutMessage("t", b"3", 1, False, {}, None))
        yield self.a.whenFlushed()
        _, messages = yield self.b.loadSession("h", "c")
        self.assertEqual([m[4] for m in messages], [b"1", b"2", b"3"])
        self.assertEqual(len({m[0] for m in messages}), 3)

    @defer.inlineCallbacks
    def test_retained(self):
        """
        Retained messages of every hub load on any node; an empty one
        deletes.
        """
        self.a.setRetained("h1", "x/y", MqttMessage(b"on", 1, True, {"content_type": "t"}))
        self.a.setRetained("h2", "z", MqttMessage(b"\x01", 0, True, {}, 99.0))
        self.a.setRetained("h1", "gone", MqttMessage(b"1", 0, True))
        self.a.setRetained("h1", "gone", None)
        yield self.a.whenFlushed()
        rows = yield self.b.loadRetained()
        self.assertEqual(rows, [("h1", "x/y", b"on", 1, '{"content_type": "t"}', None),
                                ("h2", "z", b"\x01", 0, "{}", 99.0)])

    @defer.inlineCallbacks
    def test_ownership(self):
        """
        A claim says who held the session; an adoption from a node that
        no longer holds it fails; a node disowns only what it holds.
        """
        self.assertEqual((yield self.a.claim("h", "c")), "")
        self.assertEqual((yield self.a.claim("h", "c")), "a")
        self.assertEqual((yield self.b.claim("h", "c")), "a")
        self.assertEqual((yield self.a.held("a")), [])
        self.assertEqual((yield self.a.held("b")), [("h", "c")])
        self.assertFalse((yield self.a.adopt(self.a.entry("h", "c"), "a")))
        self.a.disown("h", "c")
        yield self.a.whenFlushed()
        self.assertEqual((yield self.a.held("b")), [("h", "c")])
        self.assertTrue((yield self.a.adopt(self.a.entry("h", "c"), "b")))
        self.assertEqual((yield self.a.holders()), ["a"])
        self.a.disown("h", "c")
        yield self.a.whenFlushed()
        self.assertEqual((yield self.b.claim("h", "c")), "")

    @defer.inlineCallbacks
    def test_willsAndShares(self):
        """
        A node's wills are taken once; shared-subscription members are
        kept per node and a dead node's dropped.
        """
        self.a.setWill("h", "c", {"topic": "w"})
        self.a.setWill("h", "d", {"topic": "v"})
        self.a.clearWill("h", "d")
        self.a.setShare("h", "g", "t/#", True)
        self.b.setShare("h", "g", "t/#", True)
        self.b.setShare("h", "g2", "u", True)
        self.b.setShare("h", "g2", "u", False)
        yield defer.gatherResults([self.a.whenFlushed(), self.b.whenFlushed()])
        self.assertEqual((yield self.b.takeWills("a")), [(("h", "c"), {"topic": "w"})])
        self.assertEqual((yield self.b.takeWills("a")), [])
        self.assertEqual(sorted((yield self.b.shares())),
                         [("h", "g", "t/#", "a"), ("h", "g", "t/#", "b")])
        self.assertEqual((yield self.b.dropShares("a")), [("h", "g", "t/#", "a")])
        self.assertEqual((yield self.b.shares()), [("h", "g", "t/#", "b")])

    @defer.inlineCallbacks
    def test_unreachable(self):
        """
        With Redis gone, a write is counted as a failure and whenFlushed
        still fires (a PUBACK is not held for ever).
        """
        yield self.server.kill()
        yield waitFor(lambda: not self.a.redis.connected)
        s = FakeSession("h", "c")
        self.a.saveSession(s)
        self.a.addMessage(s, OutMessage("t", b"1", 1, False, {}, None))
        yield self.a.whenFlushed()
        self.assertEqual(self.a.failures, 2 + 1)
