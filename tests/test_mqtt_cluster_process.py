"""
The MQTT face in cluster mode: three real C{twistd -n broker} nodes over
one redis-server, driven by paho-mqtt clients (both protocol versions)
and the Azure Web PubSub service SDK: the nodes behave as one MQTT broker.
"""

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.clusternodes import ClusterNodesMixin
from tests.mqttharness import ACCESS_KEY, restSendToGroup, Paho, sleep, v5props

FACES = """\
[webpubsub]
listen = ["tcp:0:interface=127.0.0.1"]
access_keys = ["%s"]
[webpubsub.hubs.mqtt]
[iot]
enabled = false
[mqtt]
enabled = true
listen = ["tcp:0:interface=127.0.0.1"]
""" % ACCESS_KEY


class MqttClusterTests(ClusterNodesMixin, TestCase):
    """
    Nodes a, b and c.
    """

    timeout = 90
    prefix = "mqttp"
    faces = FACES
    listeners = ["mqtt.listen[0]", "webpubsub.listen[0]"]

    @defer.inlineCallbacks
    def setUp(self):
        self.prepareCluster(durable=True)
        yield self.redis.start()
        yield defer.gatherResults([self.startNode(n, healthy=False) for n in "abc"],
                                  consumeErrors=True)
        for name in "abc":
            yield self.waitHealth(name, 200)
        # After the clients' own cleanups: their close handshakes end.
        self.addCleanup(sleep, 0.3)

    def nodeStarted(self, proc):
        proc.mqtt = proc.ports["mqtt.listen[0]"]
        proc.rest = proc.ports["webpubsub.listen[0]"]

    @defer.inlineCallbacks
    def client(self, node, version=5, clientId="", expiry=None, present=False, will=None,
               **kw):
        """
        A paho client connected to C{node}; C{expiry}: a persistent
        session (5.0 session expiry, 3.1.1 clean session 0) resumed if it
        exists; C{present}: the CONNACK's session present flag expected.
        """
        clean = expiry is None
        c = Paho(self, self.nodes[node].mqtt, clientId=clientId, version=version,
                 clean=clean, **kw)
        props = None
        if version == 5 and expiry is not None:
            props = v5props("CONNECT", SessionExpiryInterval=expiry)
        connack = yield c.connect(properties=props, will=will)
        self.assertEqual(connack[1], 0, (connack, self.nodes[node].text()[-3000:]))
        self.assertEqual(bool(connack[0]), present, connack)
        return c

    @defer.inlineCallbacks
    def metric(self, name, event):
        _, body = yield self.adminGet(name, "/metrics")
        line = f'broker_mqtt_events_total{{event="{event}"}} '
        for text in body.decode().splitlines():
            if text.startswith(line):
                return float(text[len(line):])
        return 0.0

    @defer.inlineCallbacks
    def metrics(self, event, names):
        values = []
        for name in names:
            values.append((yield self.metric(name, event)))
        return values

    @defer.inlineCallbacks
    def quiet(self, *clients):
        """Nothing more arrives at C{clients} for a while (duplicates would)."""
        counts = [len(c.messages) for c in clients]
        yield sleep(0.5)
        self.assertEqual([len(c.messages) for c in clients], counts)

    # -- routing ---------------------------------------------------------------

    @defer.inlineCallbacks
    def test_wildcardsAndQosAcrossNodes(self):
        """
        Subscribers on b with C{#} (3.1.1) and C{+/x} (5.0) get a publish
        made on a, at each QoS, once each, at the publisher's QoS (it
        crosses the bus with it), with its 5.0 properties; an exact
        subscriber on c too.
        """
        hashSub = yield self.client("b", 4)
        yield hashSub.subscribe("#", 2)
        plusSub = yield self.client("b", 5)
        yield plusSub.subscribe("+/x", 2)
        exact = yield self.client("c", 5)
        yield exact.subscribe("w/x", 1)
        pub = yield self.client("a", 5)
        props = v5props("PUBLISH", ContentType="text/x", UserProperty=[("k", "v")])
        for qos in (0, 1, 2):
            yield pub.publish("w/x", b"m%d" % qos, qos, properties=props)
        for sub in (hashSub, plusSub):
            got = yield sub.waitMessages(3)
            self.assertEqual(sorted((t, p, q) for t, p, q, _, _ in got),
                             [("w/x", b"m%d" % q, q) for q in (0, 1, 2)])
        got = yield exact.waitMessages(3)
        self.assertEqual(sorted((p, q) for _, p, q, _, _ in got),
                         [(b"m0", 0), (b"m1", 1), (b"m2", 1)])
        self.assertEqual(got[0][4].ContentType, "text/x")
        self.assertEqual(got[0][4].UserProperty, [("k", "v")])
        yield self.quiet(hashSub, plusSub, exact)
        self.assertNoTraceback("a", "b", "c")

    @defer.inlineCallbacks
    def test_restSendOnOneNodeReachesMqttOnAnother(self):
        """
        The Azure service SDK's send_to_group on a reaches MQTT subscribers
        of the topic and of a wildcard on b, once.
        """
        exact = yield self.client("b", 5)
        yield exact.subscribe("r/s", 1)
        wild = yield self.client("b", 4)
        yield wild.subscribe("r/#", 1)
        port = self.nodes["a"].rest
        yield restSendToGroup(port, "r/s", "from rest")
        for sub in (exact, wild):
            got = yield sub.waitMessages(1)
            self.assertEqual(got[0][:3], ("r/s", b"from rest", 1))
        yield self.quiet(exact, wild)

    @defer.inlineCallbacks
    def test_retainedAcrossNodes(self):
        """
        A retained message set on a is sent to a later subscriber on b;
        an empty retained publish on c clears it everywhere.
        """
        pub = yield self.client("a", 4)
        yield pub.publish("ret/a", b"kept", 1, retain=True)
        yield sleep(0.2)
        for node, version in (("b", 5), ("c", 4), ("a", 5)):
            late = yield self.client(node, version)
            yield late.subscribe("ret/+", 2)
            got = yield late.waitMessages(1)
            self.assertEqual(got[0][:4], ("ret/a", b"kept", 1, True))
        clearer = yield self.client("c", 5)
        yield clearer.publish("ret/a", b"", 1, retain=True)
        yield sleep(0.2)
        for node in "ab":
            later = yield self.client(node, 5)
            yield later.subscribe("ret/#", 1)
            yield pub.publish("ret/b", b"marker", 1)
            got = yield later.waitMessages(1)
            self.assertEqual([m[:2] for m in got], [("ret/b", b"marker")])

    # -- sessions --------------------------------------------------------------

    @defer.inlineCallbacks
    def test_persistentSessionMovesToAnotherNode(self):
        """
        A persistent session made on a, its client gone, receives what is
        published on b and c meanwhile (its node queues it); the client
        reconnecting on b finds its session (present) and every message
        once; both protocol versions.
        """
        for version in (5, 4):
            cid = f"p{version}"
            c = yield self.client("a", version, cid, expiry=300)
            yield c.subscribe(f"s{version}/#", 1)
            yield c.disconnect()
            pubB = yield self.client("b", 5)
            pubC = yield self.client("c", 4)
            for i in range(3):
                yield pubB.publish(f"s{version}/b", b"b%d" % i, 1)
                yield pubC.publish(f"s{version}/c", b"c%d" % i, 2)
            back = yield self.client("b", version, cid, expiry=300, present=True)
            got = yield back.waitMessages(6)
            self.assertEqual(sorted(m[1] for m in got),
                             [b"b0", b"b1", b"b2", b"c0", b"c1", b"c2"])
            # Still subscribed on b, and a lets go of it: once each.
            yield pubC.publish(f"s{version}/again", b"again", 1)
            yield back.waitMessages(7)
            yield self.quiet(back)
            yield back.disconnect()

    @defer.inlineCallbacks
    def test_takeoverAcrossNodes(self):
        """
        The same client id connecting on b while connected on a takes the
        session over: a's client is disconnected (5.0: 0x8E), b's has its
        subscriptions; a publish reaches only b's client.
        """
        first = yield self.client("a", 5, "t5", expiry=300, reconnect=False)
        yield first.subscribe("to/#", 1)
        second = yield self.client("b", 5, "t5", expiry=300, present=True, reconnect=False)
        reason = yield first.waitDisconnected()
        self.assertEqual(reason, 0x8E)
        pub = yield self.client("c", 5)
        yield pub.publish("to/x", b"after", 1)
        got = yield second.waitMessages(1)
        self.assertEqual(got[0][:2], ("to/x", b"after"))
        yield self.quiet(second)
        self.assertEqual(first.messages, [])
        old = yield self.client("a", 4, "t4", reconnect=False)
        yield self.client("c", 4, "t4", reconnect=False)
        yield old.waitDisconnected()
        handed = yield self.metrics("sessions_handed_over", "abc")
        self.assertEqual(handed, [2.0, 0.0, 0.0])

    @defer.inlineCallbacks
    def test_sharedSubscriptionOnceCluster(self):
        """
        A shared subscription with members on a and b: each message,
        published on a, b or c (which has no member), reaches exactly one
        member in the cluster; messages from c are spread over both nodes.
        """
        members = []
        for node, version in (("a", 5), ("a", 4), ("b", 5)):
            m = yield self.client(node, version)
            yield m.subscribe("$share/g/sh/#", 1)
            members.append(m)
        yield sleep(0.3)
        sent = []
        for node in "abc":
            pub = yield self.client(node, 5)
            for i in range(20):
                payload = b"%s-%d" % (node.encode(), i)
                sent.append(payload)
                yield pub.publish(f"sh/{i}", payload, 1)
        yield threads.deferToThread(
            lambda: members[0]._wait(lambda: sum(len(m.messages) for m in members) >= 60))
        yield self.quiet(*members)
        got = sorted(p for m in members for _, p, _, _, _ in m.messages)
        self.assertEqual(got, sorted(sent))
        fromC = [[p for _, p, _, _, _ in m.messages if p.startswith(b"c-")] for m in members]
        self.assertTrue(fromC[0] + fromC[1] and fromC[2], fromC)
        fromA = [[p for _, p, _, _, _ in m.messages if p.startswith(b"a-")] for m in members]
        self.assertEqual(len(fromA[0] + fromA[1]), 20)

    @defer.inlineCallbacks
    def test_nodeKilled(self):
        """
        a is killed (SIGKILL): the wills of its connected clients are
        published once by the node that reaps it; its away persistent
        sessions are adopted there and keep receiving; a session's queued
        QoS 1 messages are delivered when its client reconnects on
        another node.
        """
        watcher = yield self.client("b", 5)
        yield watcher.subscribe("will/#", 1)
        queued = yield self.client("a", 5, "k1", expiry=300)
        yield queued.subscribe("k1/#", 1)
        yield queued.disconnect()
        away = yield self.client("a", 4, "k2", expiry=300)
        yield away.subscribe("k2/+", 1)
        yield away.disconnect()
        yield self.client("a", 5, "w1", will=("will/w1", b"gone", 1, False), reconnect=False)
        pub = yield self.client("c", 5)
        for i in range(3):
            yield pub.publish("k1/x", b"q%d" % i, 1)
        yield sleep(0.2)
        yield self.kill("a")
        got = yield watcher.waitMessages(1)
        self.assertEqual(got[0][:2], ("will/w1", b"gone"))

        @defer.inlineCallbacks
        def adopted():
            while True:
                n = sum((yield self.metrics("sessions_adopted", "bc")))
                if n >= 2:
                    return n
                yield sleep(0.1)
        self.assertEqual((yield adopted()), 2.0)
        yield pub.publish("k2/y", b"while adopted", 1)
        yield sleep(0.2)
        k1 = yield self.client("b", 5, "k1", expiry=300, present=True)
        got = yield k1.waitMessages(3)
        self.assertEqual([m[1] for m in got], [b"q0", b"q1", b"q2"])
        k2 = yield self.client("c", 4, "k2", expiry=300, present=True)
        got = yield k2.waitMessages(1)
        self.assertEqual(got[0][:2], ("k2/y", b"while adopted"))
        yield self.quiet(k1, k2, watcher)
        self.assertNoTraceback("b", "c")

    @defer.inlineCallbacks
    def test_cleanStopHandsSessionsOver(self):
        """
        a stopped with SIGTERM hands its away persistent sessions to a live
        node, where they keep receiving: a client reconnecting on c finds
        its session and what was published after a stopped.
        """
        c = yield self.client("a", 5, "h1", expiry=300)
        yield c.subscribe("h1/#", 1)
        yield c.disconnect()
        proc = self.nodes["a"]
        proc.transport.signalProcess("TERM")
        yield proc.ended

        @defer.inlineCallbacks
        def adopted():
            while not sum((yield self.metrics("sessions_adopted", "bc"))):
                yield sleep(0.1)
        yield adopted()
        pub = yield self.client("b", 4)
        yield pub.publish("h1/x", b"after stop", 1)
        yield sleep(0.2)
        back = yield self.client("c", 5, "h1", expiry=300, present=True)
        got = yield back.waitMessages(1)
        self.assertEqual(got[0][:2], ("h1/x", b"after stop"))
        yield self.quiet(back)
        self.assertNoTraceback("a", "b", "c")
