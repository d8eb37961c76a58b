"""
MQTT flows checked byte by byte with a hand-driven client (packet ids,
DUP, session present, CONNACK codes) against a broker built in this
process, where a real client library would hide them.
"""

from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from broker.mqtt import codec
from broker.mqtt.face import Restorer
from broker.mqtt.interfaces import MqttAuthError
from broker.mqtt.noauth import AllowAll
from broker.mqtt.protocol import CONNECTED
from tests.mqttharness import ACCESS_KEY, Paho, sleep, startBroker
from tests.test_mqtt_bounds import Raw, connectPacket, subscribePacket


class Refusing(AllowAll):
    """Refuses user "bad" (0x86) and "banned" (0x87); denies topic "secret"."""

    def authenticate(self, clientId, username, password, hub):
        if username == "bad":
            return defer.fail(MqttAuthError(codec.BAD_USER_NAME_OR_PASSWORD))
        if username == "banned":
            return defer.fail(MqttAuthError(codec.NOT_AUTHORIZED))
        return AllowAll.authenticate(self, clientId, username, password, hub)

    def mayPublish(self, identity, topic):
        return topic != "secret"

    def maySubscribe(self, identity, topicFilter):
        return topicFilter != "secret"


def connectWithUser(username, version):
    flags = 0x82
    body = codec.utf8("MQTT") + bytes((version, flags)) + b"\x00\x3c"
    if version == 5:
        body += b"\x00"
    return codec.packet(0x10, body + codec.utf8("") + codec.utf8(username))


class RawBrokerCase(TestCase):
    """
    A broker in this process (its C{[mqtt]} section C{MQTT}) and
    hand-driven clients of its TCP listener.
    """

    timeout = 60
    MQTT = ""

    @defer.inlineCallbacks
    def setUp(self):
        self.top, self.ports, _ = yield startBroker(self, mqtt=self.MQTT)
        self.port = self.ports["mqtt.listen[0]"]
        self.server = next(s for s in self.top if isinstance(s, Restorer)).server
        self.addCleanup(sleep, 0.3)

    @defer.inlineCallbacks
    def raw(self, data=None, wait=codec.CONNACK):
        """A connection that wrote C{data}, once C{wait} (a packet type) came."""
        r = Raw()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), r)
        self.addCleanup(lambda: r.transport.abortConnection() if r.transport.connected
                        else None)
        if data is not None:
            r.transport.write(data)
            if wait is not None:
                yield r.waitFor(lambda: wait in r.types())
        return r


class FlowTests(RawBrokerCase):

    def first(self, r, type):
        return next((flags, body) for t, flags, body in r.packets if t == type)

    @defer.inlineCallbacks
    def test_redeliveryWithDup(self):
        """
        A QoS 1 message not acknowledged when the client went away is sent
        again with DUP and the same packet id when it comes back with its
        persistent session; session present is set.
        """
        connect = connectPacket("dup1", version=4, clean=False)
        r = yield self.raw(connect + subscribePacket(1, ["r/t"], version=4, qos=1),
                           codec.SUBACK)
        pub = Paho(self, self.port, version=4)
        yield pub.connect()
        yield pub.publish("r/t", b"once", 1)
        yield r.waitFor(lambda: codec.PUBLISH in r.types())
        flags, body = self.first(r, codec.PUBLISH)
        p = codec.decodePublish(flags, body, 4)
        self.assertFalse(p.dup)
        r.transport.loseConnection()
        yield r.lost
        again = yield self.raw(connect, codec.PUBLISH)
        self.assertEqual(self.first(again, codec.CONNACK)[1], b"\x01\x00")
        flags, body = self.first(again, codec.PUBLISH)
        q = codec.decodePublish(flags, body, 4)
        self.assertEqual((q.dup, q.packetId, q.payload), (True, p.packetId, b"once"))
        again.transport.write(codec.encodeAck(codec.PUBACK, q.packetId, 4))
        # Acknowledged: a third connection gets nothing again.
        yield sleep(0.2)
        again.transport.loseConnection()
        yield again.lost
        third = yield self.raw(connect)
        yield sleep(0.3)
        self.assertNotIn(codec.PUBLISH, third.types())

    @defer.inlineCallbacks
    def test_qos2OutboundPubrelResent(self):
        """
        Outbound QoS 2: PUBLISH, PUBREC from the client, PUBREL; a client
        that leaves before PUBCOMP gets the PUBREL again (same packet id),
        not the PUBLISH, when it comes back.
        """
        props = codec.encodeProperties({"session_expiry_interval": 60})
        connect = connectPacket("o2", clean=False, props=props)
        r = yield self.raw(connect + subscribePacket(1, ["o2/t"], qos=2), codec.SUBACK)
        pub = Paho(self, self.port, version=5)
        yield pub.connect()
        yield pub.publish("o2/t", b"two", 2)
        yield r.waitFor(lambda: codec.PUBLISH in r.types())
        flags, body = self.first(r, codec.PUBLISH)
        p = codec.decodePublish(flags, body, 5)
        self.assertEqual((p.qos, p.payload), (2, b"two"))
        r.transport.write(codec.encodeAck(codec.PUBREC, p.packetId, 5))
        yield r.waitFor(lambda: codec.PUBREL in r.types())
        r.transport.loseConnection()
        yield r.lost
        again = yield self.raw(connect, codec.PUBREL)
        self.assertNotIn(codec.PUBLISH, again.types())
        flags, body = self.first(again, codec.PUBREL)
        self.assertEqual((flags, body[:2]), (2, p.packetId.to_bytes(2, "big")))
        again.transport.write(codec.encodeAck(codec.PUBCOMP, p.packetId, 5))
        yield sleep(0.2)
        again.transport.loseConnection()
        yield again.lost
        third = yield self.raw(connect)
        yield sleep(0.3)
        self.assertEqual(third.types(), [codec.CONNACK])

    @defer.inlineCallbacks
    def test_clientMaximumPacketSize(self):
        """
        Nothing larger than a 5.0 client's maximum packet size is sent to
        it (MQTT-3.1.2-24): a QoS 1 message too large is skipped as if
        acknowledged (MQTT-3.1.2-25), the next one arrives, and counted.
        """
        props = codec.encodeProperties({"maximum_packet_size": 100})
        r = yield self.raw(connectPacket("small", props=props) +
                           subscribePacket(1, ["mp/t"], qos=1), codec.SUBACK)
        pub = Paho(self, self.port, version=4)
        yield pub.connect()
        yield pub.publish("mp/t", b"x" * 200, 1)
        yield pub.publish("mp/t", b"fits", 1)
        yield r.waitFor(lambda: codec.PUBLISH in r.types())
        yield sleep(0.2)
        seen = [codec.decodePublish(f, b, 5) for t, f, b in r.packets if t == codec.PUBLISH]
        self.assertEqual([p.payload for p in seen], [b"fits"])
        self.assertTrue(all(len(b) + 2 <= 100 for t, f, b in r.packets))
        self.assertEqual(self.server.counters["too_large_for_client"], 1)
        self.assertEqual(len(self.server.sessions[("mqtt", "small")].inflight), 1)

    @defer.inlineCallbacks
    def test_disconnectWithWill(self):
        """
        5.0 DISCONNECT with reason 0x04 publishes the will; reason 0x00
        discards it.
        """
        watcher = Paho(self, self.port, version=5)
        yield watcher.connect()
        yield watcher.subscribe("dw/#", 1)

        def withWill(clientId, topic):
            body = (codec.utf8("MQTT") + bytes((5, 0x02 | 0x04 | 0x08)) + b"\x00\x3c"
                    + b"\x00" + codec.utf8(clientId) + b"\x00" + codec.utf8(topic)
                    + codec.binary(b"will"))
            return codec.packet(0x10, body)
        for clientId, reason in (("dw1", 0x04), ("dw0", 0x00)):
            r = yield self.raw(withWill(clientId, f"dw/{clientId}"))
            r.transport.write(codec.packet(0xE0, bytes((reason,))))
            yield r.lost
        yield watcher.waitMessages(1)
        yield sleep(0.3)
        self.assertEqual([m[:2] for m in watcher.messages], [("dw/dw1", b"will")])

    @defer.inlineCallbacks
    def test_qos2InboundExactlyOnce(self):
        """
        A QoS 2 PUBLISH sent again with DUP before PUBREL is acknowledged
        (PUBREC) but routed once; PUBREL gets PUBCOMP, an unknown one
        PUBCOMP 0x92.
        """
        sub = Paho(self, self.port, version=5)
        yield sub.connect()
        yield sub.subscribe("x2/t", 2)
        r = yield self.raw(connectPacket("q2", version=5))
        pub = codec.packet(0x34, codec.utf8("x2/t") + b"\x00\x09\x00" + b"payload")
        dup = codec.packet(0x3C, codec.utf8("x2/t") + b"\x00\x09\x00" + b"payload")
        r.transport.write(pub + dup)
        yield r.waitFor(lambda: r.types().count(codec.PUBREC) == 2)
        r.transport.write(codec.encodeAck(codec.PUBREL, 9, 5) +
                          codec.encodeAck(codec.PUBREL, 10, 5))
        yield r.waitFor(lambda: r.types().count(codec.PUBCOMP) == 2)
        comps = [body for t, f, body in r.packets if t == codec.PUBCOMP]
        self.assertEqual(comps, [b"\x00\x09", b"\x00\x0a\x92"])
        yield sub.waitMessages(1)
        yield sleep(0.3)
        self.assertEqual(len(sub.messages), 1)

    @defer.inlineCallbacks
    def test_sessionExpiryAndCleanStart(self):
        """
        A 5.0 session with a 1 s expiry is gone 1.5 s after its client
        left; clean start discards a session at once.
        """
        props = codec.encodeProperties({"session_expiry_interval": 1})
        r = yield self.raw(connectPacket("exp", clean=False, props=props))
        r.transport.loseConnection()
        yield r.lost
        back = yield self.raw(connectPacket("exp", clean=False, props=props))
        self.assertEqual(self.first(back, codec.CONNACK)[1][:2], b"\x01\x00")
        back.transport.loseConnection()
        yield back.lost
        yield sleep(1.5)
        late = yield self.raw(connectPacket("exp", clean=False, props=props))
        self.assertEqual(self.first(late, codec.CONNACK)[1][:2], b"\x00\x00")
        late.transport.loseConnection()
        yield late.lost
        clean = yield self.raw(connectPacket("exp", clean=True, props=props))
        self.assertEqual(self.first(clean, codec.CONNACK)[1][:2], b"\x00\x00")

    @defer.inlineCallbacks
    def test_connackRefusals(self):
        """
        An unknown protocol level gets return code 1; a 3.1.1 empty client
        id without clean session return code 2; both closed.
        """
        bad = codec.packet(0x10, codec.utf8("MQTT") + b"\x07\x02\x00\x3c" + codec.utf8("c"))
        r = yield self.raw(bad)
        yield r.lost
        self.assertEqual(r.packets, [(codec.CONNACK, 0, b"\x00\x01")])
        r = yield self.raw(connectPacket("", version=4, clean=False))
        yield r.lost
        self.assertEqual(r.packets, [(codec.CONNACK, 0, b"\x00\x02")])

    @defer.inlineCallbacks
    def test_secondConnectClosed(self):
        r = yield self.raw(connectPacket("twice"))
        r.transport.write(connectPacket("twice"))
        yield r.lost
        type, flags, body = r.packets[-1]
        self.assertEqual((type, body[0]), (codec.DISCONNECT, codec.PROTOCOL_ERROR))
        self.assertIn(b"unexpected packet type 1", body)

    @defer.inlineCallbacks
    def test_authAndAcl(self):
        """
        An authenticator's refusals map onto both versions' CONNACK codes;
        the ACL refuses a subscription (0x87 / 0x80) and a publish (PUBACK
        0x87 on 5.0; not routed on 3.1.1).
        """
        self.server.auth = Refusing()
        for username, version, expected in (("bad", 5, b"\x00\x86"), ("banned", 5, b"\x00\x87"),
                                            ("bad", 4, b"\x00\x04"), ("banned", 4, b"\x00\x05")):
            r = yield self.raw(connectWithUser(username, version))
            yield r.lost
            self.assertEqual(self.first(r, codec.CONNACK)[1][:2], expected, (username, version))
        watcher = Paho(self, self.port, version=5)
        yield watcher.connect()
        yield watcher.subscribe("#", 1)
        for version, code in ((5, 0x87), (4, 0x80)):
            c = Paho(self, self.port, version=version)
            yield c.connect()
            self.assertEqual((yield c.subscribe("secret", 1)), [code])
        r = yield self.raw(connectPacket("acl", version=5))
        r.transport.write(codec.packet(0x32, codec.utf8("secret") + b"\x00\x01\x00" + b"x"))
        yield r.waitFor(lambda: codec.PUBACK in r.types())
        self.assertEqual(self.first(r, codec.PUBACK)[1], b"\x00\x01\x87")
        yield sleep(0.3)
        self.assertEqual(watcher.messages, [])

    @defer.inlineCallbacks
    def test_serverTopic(self):
        """
        A REST send to the whole hub reaches MQTT sessions subscribed to
        the server topic ($server) and no other.
        """
        on = Paho(self, self.port, version=5)
        yield on.connect()
        yield on.subscribe("$server", 1)
        off = Paho(self, self.port, version=5)
        yield off.connect()
        yield off.subscribe("#", 1)
        port = self.ports["webpubsub.listen[0]"]

        def send():
            from azure.messaging.webpubsubservice import WebPubSubServiceClient
            client = WebPubSubServiceClient.from_connection_string(
                f"Endpoint=http://127.0.0.1:{port};AccessKey={ACCESS_KEY};Version=1.0;",
                hub="mqtt")
            client.send_to_all("to everyone", content_type="text/plain")
        yield threads.deferToThread(send)
        got = yield on.waitMessages(1)
        self.assertEqual(got[0][:2], ("$server", b"to everyone"))
        yield sleep(0.3)
        self.assertEqual(off.messages, [])

    @defer.inlineCallbacks
    def test_outboundTopicAliases(self):
        """
        A 5.0 client allowing 1 topic alias gets its first topic with
        alias 1 and the topic, then alias 1 with an empty topic; a second
        topic goes without alias (never more than the client's maximum).
        """
        props = codec.encodeProperties({"topic_alias_maximum": 1})
        r = yield self.raw(connectPacket("al", props=props) +
                           subscribePacket(1, ["al/#"]), codec.SUBACK)
        pub = Paho(self, self.port, version=4)
        yield pub.connect()
        for t in ("al/a", "al/a", "al/b"):
            yield pub.publish(t, b"x", 0)
        yield r.waitFor(lambda: r.types().count(codec.PUBLISH) == 3)
        seen = [codec.decodePublish(f, b, 5) for t, f, b in r.packets if t == codec.PUBLISH]
        self.assertEqual([(p.topic, p.properties.get("topic_alias")) for p in seen],
                         [("al/a", 1), ("", 1), ("al/b", None)])

    @defer.inlineCallbacks
    def test_clientIdOfAnotherUser(self):
        """
        A client id held by another user's session is refused (0x85 / 2)
        and the holder keeps its connection.
        """
        def connect(username, version, clientId="owned"):
            body = codec.utf8("MQTT") + bytes((version, 0x82)) + b"\x00\x3c"
            if version == 5:
                body += b"\x00"
            return codec.packet(0x10, body + codec.utf8(clientId) + codec.utf8(username))
        owner = yield self.raw(connect("alice", 5))
        for version, code in ((5, b"\x00\x85"), (4, b"\x00\x02")):
            r = yield self.raw(connect("mallory", version))
            yield r.lost
            self.assertEqual(self.first(r, codec.CONNACK)[1][:2], code)
        self.assertTrue(owner.transport.connected)
        owner.transport.write(b"\xc0\x00")
        yield owner.waitFor(lambda: codec.PINGRESP in owner.types())

    @defer.inlineCallbacks
    def test_pubacksHoweverTheyArrive(self):
        """
        PUBACKs read together (the subscriber's common read, taken without
        the packet reader), with another packet between them, and one
        split over two reads, each end its message's flight; one for an
        identifier not in flight is ignored.
        """
        r = yield self.raw(connectPacket("acks", version=4)
                           + subscribePacket(1, ["acks/t"], version=4, qos=1), codec.SUBACK)
        session = self.server.sessions[("mqtt", "acks")]
        pub = Paho(self, self.port, version=4)
        yield pub.connect()
        for i in range(7):
            yield pub.publish("acks/t", b"%d" % i, 1)
        yield r.waitFor(lambda: r.types().count(codec.PUBLISH) == 7)
        pids = [codec.decodePublish(f, b, 4).packetId for t, f, b in r.packets
                if t == codec.PUBLISH]
        self.assertEqual(list(session.inflight), pids)
        ack = [codec.encodeAck(codec.PUBACK, pid, 4) for pid in pids]

        @defer.inlineCallbacks
        def inFlight(expected):
            for _ in range(100):
                if list(session.inflight) == expected:
                    return
                yield sleep(0.02)
            self.assertEqual(list(session.inflight), expected)
        r.transport.write(ack[0] + ack[1] + ack[2] + codec.encodeAck(codec.PUBACK, 999, 4))
        yield inFlight(pids[3:])
        r.transport.write(ack[3] + b"\xc0\x00" + ack[4])      # a PINGREQ between
        yield r.waitFor(lambda: codec.PINGRESP in r.types())
        yield inFlight(pids[5:])
        r.transport.write(ack[5][:2])
        yield sleep(0.1)
        r.transport.write(ack[5][2:] + ack[6])
        yield inFlight([])
        self.assertEqual(session.protocol.state, CONNECTED)

    @defer.inlineCallbacks
    def test_receiveMaximumOutboundAndSubscriptionIdentifier(self):
        """
        A 5.0 client with receive maximum 2 has at most two QoS 1 messages
        in flight; each PUBACK lets the next one go; each PUBLISH carries
        the subscription identifier it matched.
        """
        props = codec.encodeProperties({"receive_maximum": 2})
        sub = codec.packet(0x82, b"\x00\x01" + codec.encodeProperties(
            {"subscription_identifier": [42]}) + codec.utf8("rx/#") + b"\x01")
        r = yield self.raw(connectPacket("rx", props=props) + sub, codec.SUBACK)
        pub = Paho(self, self.port, version=4)
        yield pub.connect()
        for i in range(5):
            yield pub.publish("rx/t", b"%d" % i, 1)
        yield r.waitFor(lambda: r.types().count(codec.PUBLISH) == 2)
        yield sleep(0.3)
        self.assertEqual(r.types().count(codec.PUBLISH), 2)
        seen = []
        while len(seen) < 5:
            publishes = [codec.decodePublish(f, b, 5, fromServer=True) for t, f, b in r.packets
                         if t == codec.PUBLISH]
            for p in publishes[len(seen):]:
                seen.append(p)
                self.assertEqual(p.properties["subscription_identifier"], [42])
                r.transport.write(codec.encodeAck(codec.PUBACK, p.packetId, 5))
            if len(seen) < 5:
                n = len(seen)
                yield r.waitFor(lambda: r.types().count(codec.PUBLISH) > n)
        self.assertEqual([p.payload for p in seen], [b"0", b"1", b"2", b"3", b"4"])


class ServerKeepAliveTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_serverKeepAlive(self):
        """
        mqtt.max_keep_alive replaces a 5.0 client's keep alive of 0 (none)
        and tells it in CONNACK (server keep alive).
        """
        top, ports, _ = yield startBroker(self, mqtt="max_keep_alive = 5\n")
        self.addCleanup(sleep, 0.3)
        r = Raw()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                 ports["mqtt.listen[0]"]), r)
        self.addCleanup(r.transport.abortConnection)
        r.transport.write(connectPacket("ka", keepAlive=0))
        yield r.waitFor(lambda: codec.CONNACK in r.types())
        body = r.packets[0][2]
        props, _ = codec._properties(body, 2, set(codec.PROPERTIES))
        self.assertEqual(props["server_keep_alive"], 5)
