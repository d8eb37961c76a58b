"""
The MQTT face with the real C{paho-mqtt} client, both protocol versions,
over TCP, TLS and WebSocket, against a broker built in this process.
"""

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.mqttharness import Paho, sleep, startBroker, v5props


class PahoTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.top, self.ports, self.directory = yield startBroker(self)
        self.port = self.ports["mqtt.listen[0]"]
        # Runs after the clients' own cleanups: their close handshakes end.
        self.addCleanup(sleep, 0.3)

    @defer.inlineCallbacks
    def client(self, version=5, clientId="", **kw):
        c = Paho(self, kw.pop("port", self.port), clientId=clientId, version=version, **kw)
        connack = yield c.connect()
        self.assertEqual(connack[1], 0, connack)
        return c

    @defer.inlineCallbacks
    def test_qosBothWays(self):
        """
        Every QoS, both versions, as publisher and subscriber: the
        subscriber gets min(publish QoS, subscription QoS), every payload
        once, in order.
        """
        for subVersion in (4, 5):
            for pubVersion in (4, 5):
                for subQos in (0, 1, 2):
                    sub = yield self.client(subVersion)
                    topic = f"q/{subVersion}/{pubVersion}/{subQos}"
                    granted = yield sub.subscribe(topic, subQos)
                    self.assertEqual(granted, [subQos])
                    pub = yield self.client(pubVersion)
                    for qos in (0, 1, 2):
                        yield pub.publish(topic, b"m%d" % qos, qos)
                    got = yield sub.waitMessages(3)
                    self.assertEqual([(t, p, q) for t, p, q, r, _ in got],
                                     [(topic, b"m%d" % q, min(q, subQos)) for q in (0, 1, 2)])
                    yield sub.disconnect()
                    yield pub.disconnect()

    @defer.inlineCallbacks
    def test_retained(self):
        """
        A retained message is delivered on subscribe with the retain flag,
        to live subscribers without it; an empty retained message deletes.
        """
        pub = yield self.client(4)
        live = yield self.client(5)
        yield live.subscribe("r/#", 1)
        yield pub.publish("r/a", b"kept", 1, retain=True)
        got = yield live.waitMessages(1)
        self.assertEqual(got[0][:4], ("r/a", b"kept", 1, False))
        for version in (4, 5):
            late = yield self.client(version)
            yield late.subscribe("r/+", 2)
            got = yield late.waitMessages(1)
            self.assertEqual(got[0][:4], ("r/a", b"kept", 1, True))
        yield pub.publish("r/a", b"", 1, retain=True)
        later = yield self.client(5)
        yield later.subscribe("r/#", 1)
        yield pub.publish("r/b", b"marker", 1)
        got = yield later.waitMessages(1)
        self.assertEqual([m[:2] for m in got], [("r/b", b"marker")])

    @defer.inlineCallbacks
    def test_retainAsPublishedAndHandling(self):
        """
        5.0 retain handling 2 sends no retained message; retain as
        published keeps the flag on live messages; no local skips the
        client's own publishes.
        """
        pub = yield self.client(5)
        yield pub.publish("h/a", b"old", 1, retain=True)
        c = yield self.client(5)
        yield c.subscribe("h/a", 1, retainHandling=2, retainAsPublished=True, noLocal=True)
        yield c.publish("h/a", b"own", 1)
        yield pub.publish("h/a", b"new", 1, retain=True)
        yield c.waitMessages(1)
        yield sleep(0.3)
        self.assertEqual([m[:4] for m in c.messages], [("h/a", b"new", 1, True)])

    @defer.inlineCallbacks
    def test_will(self):
        """
        A connection lost without DISCONNECT publishes its will; one that
        sends DISCONNECT does not.
        """
        watcher = yield self.client(5)
        yield watcher.subscribe("will/#", 1)
        for version in (4, 5):
            c = Paho(self, self.port, version=version)
            yield c.connect(will=(f"will/{version}", b"gone", 1, False))
            yield c.drop()
        quiet = Paho(self, self.port, version=5)
        yield quiet.connect(will=("will/quiet", b"never", 1, False))
        yield quiet.disconnect()
        yield watcher.waitMessages(2)
        yield sleep(0.3)
        self.assertEqual(sorted(m[:2] for m in watcher.messages),
                         [("will/4", b"gone"), ("will/5", b"gone")])

    @defer.inlineCallbacks
    def test_willDelay(self):
        """
        5.0 will delay: a client back before the delay suppresses its will.
        """
        watcher = yield self.client(5)
        yield watcher.subscribe("wd/#", 1)
        props = v5props("WILLMESSAGE", WillDelayInterval=2)
        c = Paho(self, self.port, clientId="wd1", version=5, clean=False)
        c.client.will_set("wd/x", b"late", 1, False, properties=props)
        yield c.connect(properties=v5props("CONNECT", SessionExpiryInterval=60))
        yield c.drop()
        back = Paho(self, self.port, clientId="wd1", version=5, clean=False)
        connack = yield back.connect(properties=v5props("CONNECT", SessionExpiryInterval=60))
        self.assertTrue(connack[0])
        yield sleep(2.5)
        self.assertEqual(watcher.messages, [])

    @defer.inlineCallbacks
    def test_wildcardsAndDollar(self):
        """
        C{+} and C{#} match levels; a filter starting with a wildcard does
        not match a C{$} topic.
        """
        c = yield self.client(5)
        yield c.subscribe("w/+/x", 0)
        yield c.subscribe("#", 0)
        yield c.subscribe("$SYS/#", 0)
        pub = yield self.client(4)
        for t in ("w/a/x", "w/a/b/x", "$SYS/info"):
            yield pub.publish(t, t.encode(), 1)
        yield c.waitMessages(3)
        yield sleep(0.3)
        # w/a/x matches w/+/x and # (delivered once); w/a/b/x only #;
        # $SYS/info only $SYS/#.
        self.assertEqual(sorted(m[0] for m in c.messages), ["$SYS/info", "w/a/b/x", "w/a/x"])

    @defer.inlineCallbacks
    def test_sharedSubscription(self):
        """
        C{$share/g/f}: each message goes to one member, round robin.
        """
        members = []
        for i in range(3):
            m = yield self.client(5)
            yield m.subscribe("$share/g/s/#", 1)
            members.append(m)
        pub = yield self.client(5)
        for i in range(9):
            yield pub.publish("s/t", b"%d" % i, 1)
        for m in members:
            yield m.waitMessages(3)
        yield sleep(0.3)
        self.assertEqual([len(m.messages) for m in members], [3, 3, 3])
        self.assertEqual(sorted(int(x[1]) for m in members for x in m.messages), list(range(9)))

    @defer.inlineCallbacks
    def test_unsubscribe(self):
        c = yield self.client(5)
        yield c.subscribe("u/a", 1)
        codes = yield c.unsubscribe("u/a")
        self.assertEqual(codes, [0])
        codes = yield c.unsubscribe("u/none")
        self.assertEqual(codes, [0x11])
        yield c.subscribe("u/b", 1)
        pub = yield self.client(4)
        yield pub.publish("u/a", b"no", 1)
        yield pub.publish("u/b", b"yes", 1)
        yield c.waitMessages(1)
        yield sleep(0.2)
        self.assertEqual([m[:2] for m in c.messages], [("u/b", b"yes")])

    @defer.inlineCallbacks
    def test_userPropertiesAndExpiry(self):
        """
        5.0 user properties, content type and correlation data pass
        through; the message expiry interval is counted down.
        """
        c = yield self.client(5)
        yield c.subscribe("p/x", 1)
        pub = yield self.client(5)
        props = v5props("PUBLISH", UserProperty=[("k", "v"), ("k", "w")],
                        ContentType="text/plain", CorrelationData=b"\x00\x01",
                        MessageExpiryInterval=100, PayloadFormatIndicator=1)
        yield pub.publish("p/x", "héllo".encode(), 1, properties=props)
        got = yield c.waitMessages(1)
        p = got[0][4]
        self.assertEqual(p.UserProperty, [("k", "v"), ("k", "w")])
        self.assertEqual((p.ContentType, p.CorrelationData, p.PayloadFormatIndicator),
                         ("text/plain", b"\x00\x01", 1))
        self.assertTrue(98 <= p.MessageExpiryInterval <= 100, p.MessageExpiryInterval)

    @defer.inlineCallbacks
    def test_topicAlias(self):
        """A 5.0 client's topic alias is honoured on later publishes."""
        c = yield self.client(5)
        yield c.subscribe("alias/t", 1)
        pub = yield self.client(5)
        self.assertEqual(pub.connack[2].TopicAliasMaximum, 16)
        yield pub.publish("alias/t", b"1", 1, properties=v5props("PUBLISH", TopicAlias=3))
        yield pub.publish("", b"2", 1, properties=v5props("PUBLISH", TopicAlias=3))
        got = yield c.waitMessages(2)
        self.assertEqual([m[:2] for m in got], [("alias/t", b"1"), ("alias/t", b"2")])

    @defer.inlineCallbacks
    def test_assignedClientIdentifierAndTakeover(self):
        """
        An empty 5.0 client id is assigned one; a second connection with a
        client id takes the session over (the first hears 0x8E).
        """
        c = yield self.client(5)
        self.assertTrue(c.connack[2].AssignedClientIdentifier.startswith("auto-"))
        first = yield self.client(5, clientId="same")
        second = yield self.client(5, clientId="same")
        reason = yield first.waitDisconnected()
        self.assertEqual(reason, 0x8E)
        yield second.subscribe("t/o", 0)

    @defer.inlineCallbacks
    def test_websocketAndTLS(self):
        """
        The same broker over WebSocket (/mqtt and the Azure-style path)
        and TLS.
        """
        ws = yield self.client(5, transport="websockets",
                               port=self.ports["mqtt.websocket.listen[0]"])
        yield ws.subscribe("x/#", 1)
        azure = yield self.client(4, transport="websockets",
                                  port=self.ports["mqtt.websocket.listen[0]"],
                                  path="/clients/mqtt/hubs/mqtt")
        yield azure.subscribe("x/#", 2)
        cert = self.directory.child("state").child("mqtt-tls-cert.pem").path
        tls = yield self.client(5, port=self.ports["mqtt.tls.listen[0]"], tls=cert)
        yield tls.publish("x/y", b"z" * 70000, 2)
        for c in (ws, azure):
            got = yield c.waitMessages(1)
            self.assertEqual(got[0][:3], ("x/y", b"z" * 70000, 1 if c is ws else 2))
        for c in (ws, azure):
            yield c.disconnect()
        # autobahn's close handshake timer (1 s) outlives the connection.
        yield sleep(1.2)
