"""
The MQTT face's cluster glue (L{broker.mqtt.clustered}) in one process:
two nodes (Cluster, RedisEngine, Core, MqttServer, RedisStore) on one real
redis-server.  What the process tests cannot reach: each node's own
retained bounds, and the choice of the one node delivering to a share
group.
"""

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from broker.cluster.engine import RedisEngine
from broker.cluster.node import Cluster
from broker.cluster.redis import RedisClient
from broker.core.message import Delivery, FROM_GROUP
from broker.core.router import Core
from broker.mqtt.clustered import ClusteredMqtt
from broker.mqtt.message import MqttMessage
from broker.mqtt.noauth import AllowAll
from broker.mqtt.protocol import MqttFactory
from broker.mqtt.redisstore import RedisStore
from broker.mqtt.server import MqttServer
from tests.mqttharness import Paho
from tests.redisserver import RedisServer
from tests.test_cluster_redis import waitFor


class TwoNodesTests(TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(self, reactor)
        yield self.redis.start()
        self.a = self.node("a", maxRetained=100, maxRetainedBytes=10_000)
        self.b = self.node("b", maxRetained=2, maxRetainedBytes=10)
        yield defer.gatherResults([n.clustered.ready for n in (self.a, self.b)])
        for n in (self.a, self.b):
            yield self.subscribed(n.clustered.cluster)

    @defer.inlineCallbacks
    def subscribed(self, cluster):
        """
        Fire once the node hears the bus: a message to its own channel
        (subscribed after the bus, on the same connection) came back.
        """
        heard = []
        cluster.onMessage("hello", lambda origin, payload: heard.append(payload))
        yield waitFor(lambda: cluster.healthy)
        yield cluster.send(cluster.nodeId, "hello", b"1")
        yield waitFor(lambda: heard)

    def node(self, name, **bounds):
        client = RedisClient(reactor, self.redis.url, maxDelay=0.2)
        cluster = Cluster(reactor, client, prefix="t", nodeId=name, heartbeat=0.1,
                          deadAfter=0.5)
        engine = RedisEngine(cluster)
        core = Core(reactor, engine=engine)
        store = RedisStore(reactor, cluster)
        server = MqttServer(reactor, core, AllowAll(), store, **bounds)
        server.clustered = ClusteredMqtt(reactor, server, cluster, store, engine)
        client.startService()
        cluster.startService()
        core.startService()

        @defer.inlineCallbacks
        def stop():
            core.stopService()
            if cluster.running:
                yield cluster.stopService()
            yield client.stopService()
        self.addCleanup(stop)
        return server

    @defer.inlineCallbacks
    def test_connectRefusedWithoutRedis(self):
        """
        With Redis unreachable, a CONNECT whose session may be on another
        node is refused with CONNACK 0x88 (3.1.1: 3) and counted; the node
        goes on.
        """
        port = reactor.listenTCP(0, MqttFactory(reactor, self.a), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        yield self.redis.kill()
        yield waitFor(lambda: not self.a.clustered.cluster.redis.connected)
        # paho reports the 3.1.1 return code 3 as 0x88 too.
        for version in (5, 4):
            c = Paho(self, port.getHost().port, clientId=f"c{version}", version=version,
                     reconnect=False)
            connack = yield c.connect()
            self.assertEqual(connack[1], 0x88)
            yield c.stop()
        self.assertEqual(self.a.counters["cluster_unavailable"], 2)
        self.assertEqual(self.a.sessions, {})

    @defer.inlineCallbacks
    def test_retainedBoundsOnEveryNode(self):
        """
        Retained messages another node accepted are kept within this
        node's own bounds (count and bytes): past them refused and counted,
        those kept before intact; a clear reaches every node.
        """
        a, b = self.a, self.b
        for i in range(4):
            a.retain("h", f"t/{i}", MqttMessage(b"x%d" % i, 1, True))
        yield waitFor(lambda: b.counters["retained_refused"] == 2)
        self.assertEqual(sorted(b.routing("h").retained), ["t/0", "t/1"])
        self.assertEqual(len(a.routing("h").retained), 4)
        a.retain("h", "t/0", MqttMessage(b"", 1, True))
        yield waitFor(lambda: "t/0" not in b.routing("h").retained)
        a.retain("h", "big", MqttMessage(b"y" * 9, 1, True))
        yield waitFor(lambda: b.counters["retained_refused"] == 3)
        self.assertEqual(sorted(b.routing("h").retained), ["t/1"])
        self.assertEqual(b.routing("h").retainedBytes, 2)
        self.assertIn("big", a.routing("h").retained)

    @defer.inlineCallbacks
    def test_restartLoadsRetained(self):
        """
        A node joining later loads the retained messages from Redis.
        """
        self.a.retain("h", "r", MqttMessage(b"kept", 1, True, {"content_type": "c"}))
        yield self.a.store.whenFlushed()
        c = self.node("c")
        yield c.clustered.ready
        kept = c.routing("h").retained["r"]
        self.assertEqual((kept.data, kept.qos, kept.properties), (b"kept", 1,
                                                                  {"content_type": "c"}))

    def test_shareChoice(self):
        """
        For a share group with members on several nodes, every node makes
        the same choice: the publishing node when it has members, else one
        node per message, spread over them.
        """
        ca, cb = self.a.clustered, self.b.clustered
        for c in (ca, cb):
            c.shareNodes[("h", "g", "s/#")] = {"a", "b"}

        def chosen(origin, data):
            delivery = Delivery(MqttMessage(data, 1), FROM_GROUP, "s/x")
            picks = []
            for c, name in ((ca, "a"), (cb, "b")):
                c.engine.delivering = (origin, delivery)
                try:
                    if c.accept("h", "s/x", ("g", "s/#")):
                        picks.append(name)
                finally:
                    c.engine.delivering = None
            return picks

        self.assertEqual(chosen("a", b"m"), ["a"])
        self.assertEqual(chosen("b", b"m"), ["b"])
        picks = [chosen("c", b"m%d" % i) for i in range(40)]
        self.assertEqual({len(p) for p in picks}, {1})
        self.assertEqual({p[0] for p in picks}, {"a", "b"})
        # One node with members: it takes every message.
        ca.shareNodes[("h", "g", "s/#")] = {"a"}
        self.assertTrue(ca.accept("h", "s/x", ("g", "s/#")))
