# -*- test-case-name: tests.test_cluster_engine -*-
"""
The Redis engine: the engine conformance suite over three nodes sharing one
real redis-server, then what only a cluster has: a node that dies, Redis
going away and coming back, a bus message that is not ours.
"""

from twisted.internet import defer, reactor
from twisted.trial import unittest

from broker.cluster.engine import RedisEngine, decodeDelivery, encodeDelivery
from broker.cluster.node import Cluster
from broker.cluster.redis import RedisClient
from broker.core.errors import Unavailable
from broker.core.message import Delivery, Message, Target
from broker.core.router import Core
from tests.recorder import RecordingConnection
from tests.redisserver import RedisServer, silence
from tests.test_cluster_redis import waitFor
from tests.test_engine import EngineConformanceMixin, texts


class RedisNodes:
    """
    Builds cluster nodes (RedisClient + Cluster + RedisEngine + Core) on one
    redis-server for a test, stopped at its cleanup.
    """

    def __init__(self, testCase, heartbeat=0.1, deadAfter=0.5):
        self.testCase = testCase
        self.heartbeat = heartbeat
        self.deadAfter = deadAfter
        self.redis = RedisServer(testCase, reactor)
        self.cores = []

    @defer.inlineCallbacks
    def start(self, n):
        yield self.redis.start()
        for i in range(n):
            self.add(f"n{i}")
        yield waitFor(lambda: all(c.engine.healthy() for c in self.cores))
        return self.cores

    def add(self, nodeId):
        client = RedisClient(reactor, self.redis.url, maxDelay=0.2)
        cluster = Cluster(reactor, client, prefix="t", nodeId=nodeId,
                          heartbeat=self.heartbeat, deadAfter=self.deadAfter)
        core = Core(reactor, engine=RedisEngine(cluster))
        core.cluster = cluster
        marks = []
        cluster.onMessage("settle", lambda origin, payload: marks.append(payload))
        core.settleMarks = marks
        client.startService()
        cluster.startService()
        core.startService()
        self.testCase.addCleanup(self.stop, core)
        self.cores.append(core)
        return core

    @defer.inlineCallbacks
    def stop(self, core):
        if core.running:
            core.stopService()
        if core.cluster.running:
            yield core.cluster.stopService()
        yield core.cluster.redis.stopService()

    @defer.inlineCallbacks
    def settle(self):
        """
        Fire once everything each node sent has been handled by every node:
        a PING from each node (its commands have reached Redis), then a
        marker each node sends itself (Redis hands a subscriber messages in
        the order it took them, so everything before it has arrived).
        """
        live = [c for c in self.cores if c.cluster.redis.connected]
        yield defer.gatherResults([c.cluster.redis.execute("PING") for c in live])
        for c in live:
            mark = str(len(c.settleMarks)).encode()
            yield c.cluster.send(c.cluster.nodeId, "settle", mark)
            yield waitFor(lambda c=c, mark=mark: mark in c.settleMarks, step=0.002)


class RedisEngineConformanceTests(EngineConformanceMixin, unittest.TestCase):
    def makeCores(self):
        self.nodes = RedisNodes(self)
        return self.nodes.start(3)

    def settle(self):
        return self.nodes.settle()


class BusFormatTests(unittest.TestCase):
    def test_roundTrip(self):
        d = Delivery(Message.binary(b"\n\x00x"), "group", "g", "u", "c")
        d.history = (3, 7)
        payload = encodeDelivery("hub", Target(Target.GROUP, "g", ["x"], "f"), d)
        hub, target, got = decodeDelivery(payload)
        self.assertEqual((hub, target.kind, target.name, target.excluded, target.filter),
                         ("hub", "group", "g", frozenset(["x"]), "f"))
        self.assertEqual((got.message, got.source, got.group, got.fromUserId,
                          got.fromConnectionId, got.history),
                         (d.message, "group", "g", "u", "c", (3, 7)))

    def test_malformed(self):
        self.assertRaises(ValueError, decodeDelivery, b"no newline")

    def test_faceMessageKind(self):
        """
        A face's message (an MQTT publish) crosses with its own fields
        once its kind is registered, and as a plain message of its data
        type where it is not.
        """
        from broker.cluster import engine
        from broker.mqtt.message import MqttMessage
        m = MqttMessage(b"\x00p", 2, True, {"correlation_data": b"\xff",
                                            "user_property": [("k", "v")]}, 1234.5)
        payload = encodeDelivery("hub", Target(Target.GROUP, "t"), Delivery(m, "group", "t"))
        self.patch(engine, "_kinds", {})
        _, _, plain = decodeDelivery(payload)
        self.assertEqual((type(plain.message), plain.message.dataType, plain.message.data),
                         (Message, m.dataType, b"\x00p"))
        engine.registerMessageKind("mqtt", MqttMessage.fromBus)
        _, _, got = decodeDelivery(payload)
        self.assertIsInstance(got.message, MqttMessage)
        self.assertEqual((got.message.data, got.message.qos, got.message.retain,
                          got.message.properties, got.message.expiresAt),
                         (b"\x00p", 2, True, m.properties, 1234.5))


class ClusterLifeTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.nodes = RedisNodes(self)
        self.a, self.b = yield self.nodes.start(2)
        self.ha, self.hb = self.a.hub("h"), self.b.hub("h")

    @defer.inlineCallbacks
    def test_deadNodeLeavesPresence(self):
        self.hb.admit(RecordingConnection("b1", "u"), "u", (), ["g"])
        yield self.nodes.settle()
        self.assertTrue((yield self.ha.findConnection("b1")))
        # b stops heartbeating without leaving: as after SIGKILL.
        silence(self.b.cluster)
        start = reactor.seconds()
        yield waitFor(lambda: self.a.engine.reapedConnections == 1, timeout=5)
        bound = self.nodes.deadAfter + 2 * self.nodes.heartbeat + 0.5
        self.assertLess(reactor.seconds() - start, bound)
        self.assertFalse((yield self.ha.findConnection("b1")))
        self.assertFalse((yield self.ha.findGroup("g")))
        self.assertFalse((yield self.ha.findUser("u")))

    @defer.inlineCallbacks
    def test_redisOutage(self):
        ra = RecordingConnection("a1")
        rb = RecordingConnection("b1")
        self.ha.admit(ra, None, (), ["g"])
        self.hb.admit(rb, None, (), ["g"])
        yield self.nodes.settle()
        yield self.nodes.redis.kill()
        yield waitFor(lambda: not self.a.engine.healthy() and not self.b.engine.healthy())
        # Local delivery goes on; what could not leave the node is counted.
        yield self.ha.send(Target(Target.GROUP, "g"), Message.text("during"))
        self.assertEqual(texts(ra), ["during"])
        self.assertEqual(self.a.engine.publishesLocalOnly, 1)
        # Cluster-wide verbs are refused, clearly.
        yield self.assertFailure(self.ha.findConnection("b1"), Unavailable)
        yield self.assertFailure(self.ha.addUserToGroup("u", "g"), Unavailable)
        self.assertFalse(self.a.stats()["engineHealthy"])
        # A connection admitted while Redis is away is registered once it
        # is back (Redis lost everything: it restarted empty).
        self.ha.admit(RecordingConnection("a2", "late"), "late", (), ["g2"])
        yield self.nodes.redis.start()
        yield waitFor(lambda: self.a.engine.healthy() and self.b.engine.healthy())
        yield self.nodes.settle()
        for hub in (self.ha, self.hb):
            self.assertTrue((yield hub.findConnection("a1")))
            self.assertTrue((yield hub.findConnection("b1")))
            self.assertEqual((yield hub.listGroupConnections("g2")), [("a2", "late")])
        yield self.hb.send(Target(Target.GROUP, "g"), Message.text("after"))
        yield self.nodes.settle()
        self.assertEqual(texts(ra), ["during", "after"])
        self.assertEqual(texts(rb), ["after"])

    @defer.inlineCallbacks
    def test_foreignBusMessagesDropped(self):
        r = RecordingConnection("a1")
        self.ha.admit(r, None, (), ["g"])
        yield self.nodes.settle()
        yield self.b.cluster.broadcast("pub", b"not json\nxx")
        yield self.b.cluster.broadcast("cmd", b"[1]")
        yield self.nodes.settle()
        self.assertEqual(self.a.engine.badMessages, 2)
        yield self.hb.send(Target(Target.GROUP, "g"), Message.text("ok"))
        yield self.nodes.settle()
        self.assertEqual(texts(r), ["ok"])

    @defer.inlineCallbacks
    def test_cleanStopLeavesAtOnce(self):
        self.hb.admit(RecordingConnection("b1"), None, (), ["g"])
        yield self.nodes.settle()
        yield self.nodes.stop(self.b)
        # Its core closed its sessions on the way out: gone from the directory.
        yield waitFor(lambda: self.nodes.redis.command("HLEN", "t:h:1:h:c") == b":0\r\n")
        self.assertFalse((yield self.ha.findConnection("b1")))


class UserGroupsAfterOutageTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_admittedDuringOutageJoinsLater(self):
        """
        A connection admitted while Redis is away joins its user's groups
        once the node has registered again.
        """
        nodes = RedisNodes(self)
        nodes.redis = RedisServer(self, reactor, durable=True)
        a, b = yield nodes.start(2)
        yield a.hub("h").addUserToGroup("u", "g")
        yield nodes.redis.stop()
        yield waitFor(lambda: not b.engine.healthy())
        session = b.hub("h").admit(RecordingConnection("late", "u"), "u")
        self.assertEqual(session.groups, set())
        yield nodes.redis.start()
        yield waitFor(lambda: a.engine.healthy() and b.engine.healthy())
        yield waitFor(lambda: session.groups == {"g"})
        yield nodes.settle()
        self.assertEqual((yield a.hub("h").listGroupConnections("g")), [("late", "u")])


class RestartTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_sameIdReapedAgainAfterRestart(self):
        """
        A node that stopped cleanly and came back under the same id is
        reaped like any other when it then dies.
        """
        nodes = RedisNodes(self)
        a, b = yield nodes.start(2)
        yield nodes.stop(b)
        b = nodes.add("n1")
        yield waitFor(lambda: b.engine.healthy())
        b.hub("h").admit(RecordingConnection("b1"), None, (), ["g"])
        yield nodes.settle()
        self.assertTrue((yield a.hub("h").findConnection("b1")))
        silence(b.cluster)
        yield waitFor(lambda: a.engine.reapedConnections == 1, timeout=5)
        self.assertFalse((yield a.hub("h").findConnection("b1")))


class BuildTests(unittest.TestCase):
    def test_singleNodeByDefault(self):
        from broker import config
        from broker.cluster.build import buildCluster
        self.assertIsNone(buildCluster(reactor, config.parse("")))

    def test_badURLNamesTheKey(self):
        from broker import config
        from broker.cluster.build import buildCluster
        settings = config.parse('[cluster]\nredis_url = "http://h"\n')
        e = self.assertRaises(config.ConfigError, buildCluster, reactor, settings)
        self.assertEqual(e.key, "cluster.redis_url")

    def test_clusterSettings(self):
        from broker import config
        from broker.cluster.build import buildCluster
        cluster = buildCluster(reactor, config.parse(
            '[cluster]\nredis_url = "redis://:pw@h:7/2"\nprefix = "p"\nnode_id = "n1"\n'
            'heartbeat = 0.5\ndead_after = 3\n'))
        self.assertEqual((cluster.nodeId, cluster.prefix, cluster.heartbeat, cluster.deadAfter),
                         ("n1", "p", 0.5, 3.0))
        self.assertEqual((cluster.redis.host, cluster.redis.port, cluster.redis.password,
                          cluster.redis.db), ("h", 7, "pw", 2))


class MalformedDeliveryTests(unittest.TestCase):
    def test_everyKindIsValueError(self):
        for raw in (b"x", b"[1]\nx", b'["h",["group","g",[],null],"group","g",null,null,'
                    b'"nonsense",null]\nx', b'["h",["what","g",[],null],"group","g",null,'
                    b'null,"text",null]\nx', b"\xff\nx"):
            self.assertRaises(ValueError, decodeDelivery, raw)
