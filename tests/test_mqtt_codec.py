"""
Unit tests of the MQTT codec (L{broker.mqtt.codec}), of topic names,
filters and the subscription trie (L{broker.mqtt.topics}), and of the
core's group resolver hook they rely on.
"""

from hypothesis import given, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from broker.core.message import Message
from broker.core.router import Core
from broker.mqtt import codec
from broker.mqtt.topics import (SubscriptionTrie, TopicError, checkFilter, checkTopicName,
                                matches, parseShared)
from tests.recorder import RecordingConnection


class CodecTests(TestCase):

    @given(st.integers(min_value=0, max_value=268435455))
    def test_varint(self, n):
        data = codec.encodeVarint(n)
        self.assertLessEqual(len(data), 4)
        self.assertEqual(codec._varint(data, 0), (n, len(data)))

    def test_readerSplitsAndJoins(self):
        """
        Packets split across writes, and several in one write, come out
        whole and in order.
        """
        a = codec.encodePublish("a", b"x" * 300, 1, False, 7, codec.V5)
        b = codec.PINGRESP_BYTES
        stream = a + b + a
        for cut in (1, 2, 3, 150, len(a), len(a) + 1):
            r = codec.PacketReader(1024)
            got = r.feed(stream[:cut]) + r.feed(stream[cut:])
            self.assertEqual([p[0] for p in got], [codec.PUBLISH, codec.PINGRESP, codec.PUBLISH])
            self.assertEqual(r.buffered, 0)

    def test_readerRefusesAtHeader(self):
        r = codec.PacketReader(100)
        e = self.assertRaises(codec.PacketTooLarge, r.feed, b"\x30" + codec.encodeVarint(200))
        self.assertEqual(e.args[0], 203)
        self.assertRaises(codec.MalformedPacket, codec.PacketReader(100).feed,
                          b"\x30\x80\x80\x80\x80\x01")

    def test_publishRoundTrip(self):
        props = {"user_property": [("a", "b")], "content_type": "t",
                 "correlation_data": b"\x01", "message_expiry_interval": 9,
                 "payload_format_indicator": 1, "response_topic": "r"}
        for version in (codec.V311, codec.V5):
            for qos in (0, 1, 2):
                data = codec.encodePublish("t/x", b"pay", qos, True, 5 if qos else None, version,
                                           props, dup=bool(qos))
                (type, flags, body), = codec.PacketReader(1000).feed(data)
                p = codec.decodePublish(flags, body, version)
                self.assertEqual((p.topic, p.payload, p.qos, p.retain, p.dup, p.packetId),
                                 ("t/x", b"pay", qos, True, bool(qos), 5 if qos else None))
                self.assertEqual(p.properties, props if version == codec.V5 else {})

    def test_templateMatchesEncoder(self):
        """A template with its packet id patched is the encoder's packet."""
        for version in (codec.V311, codec.V5):
            for qos in (0, 1, 2):
                t = codec.PublishTemplate("a/b", b"data", qos, False, version,
                                          {"user_property": [("k", "v")]})
                pid = 300 if qos else None
                self.assertEqual(t.bytes(pid), codec.encodePublish(
                    "a/b", b"data", qos, False, pid, version, {"user_property": [("k", "v")]}))
                self.assertEqual(t.size, len(t.bytes(pid)))
                if qos:
                    self.assertEqual(t.bytes(pid, dup=True)[0] & 0x08, 0x08)

    def test_connect(self):
        body = (codec.utf8("MQTT") + bytes((5, 0xC6 | 0x08)) + b"\x00\x3c"
                + codec.encodeProperties({"session_expiry_interval": 10})
                + codec.utf8("cid") + codec.encodeProperties({"will_delay_interval": 5})
                + codec.utf8("w/t") + codec.binary(b"bye") + codec.utf8("u")
                + codec.binary(b"p"))
        c = codec.decodeConnect(0, body)
        self.assertEqual((c.version, c.clientId, c.cleanStart, c.keepAlive, c.username,
                          c.password), (5, "cid", True, 60, "u", b"p"))
        self.assertEqual(c.properties, {"session_expiry_interval": 10})
        self.assertEqual((c.will.topic, c.will.payload, c.will.qos, c.will.properties),
                         ("w/t", b"bye", 1, {"will_delay_interval": 5}))

    def test_malformed(self):
        """Each decoder refuses what the spec calls malformed."""
        cases = [
            (codec.decodeConnect, (0, codec.utf8("MQTT") + b"\x04\x03\x00\x00" + codec.utf8(""))),
            (codec.decodeConnect, (0, codec.utf8("MQTT") + b"\x04\x10\x00\x00" + codec.utf8(""))),
            (codec.decodePublish, (0x06, codec.utf8("t") + b"\x00\x01", 4)),
            (codec.decodePublish, (0x08, codec.utf8("t"), 4)),
            (codec.decodePublish, (0x02, codec.utf8("t") + b"\x00\x00", 4)),
            (codec.decodePublish, (0, codec.utf8("t") + b"\x05\x63\x00", 5)),
            (codec.decodeSubscribe, (0x02, b"\x00\x01" + b"\x00" + codec.utf8("t") + b"\xc0", 5)),
            (codec.decodeSubscribe, (0x02, b"\x00\x01" + codec.utf8("t") + b"\x03", 4)),
            (codec.decodeUnsubscribe, (0, b"\x00\x01" + codec.utf8("t"), 4)),
            (codec.decodeAck, (codec.PUBREL, 0, b"\x00\x01", 4)),
        ]
        for f, args in cases:
            self.assertRaises((codec.MalformedPacket, codec.ProtocolError), f, *args)
        self.assertRaises(codec.UnsupportedVersion, codec.decodeConnect, 0,
                          codec.utf8("MQTT") + b"\x03\x02\x00\x00" + codec.utf8("c"))
        self.assertRaises(codec.ProtocolError, codec.decodeSubscribe, 0x02, b"\x00\x01\x00", 5)
        # A property the packet may not carry, one given twice.
        self.assertRaises(codec.ProtocolError, codec.decodePublish, 0,
                          codec.utf8("t") + codec.encodeProperties({"receive_maximum": 1}), 5)
        twice = b"\x0a" + b"\x02\x00\x00\x00\x01" * 2
        self.assertRaises(codec.ProtocolError, codec.decodePublish, 0,
                          codec.utf8("t") + twice, 5)

    @given(st.binary(max_size=64))
    def test_garbageNeverCrashes(self, body):
        """Arbitrary bodies raise only the codec's own errors."""
        for decode in (lambda: codec.decodeConnect(0, body),
                       lambda: codec.decodePublish(0x02, body, 5),
                       lambda: codec.decodeSubscribe(0x02, body, 5),
                       lambda: codec.decodeUnsubscribe(0x02, body, 5),
                       lambda: codec.decodeAck(codec.PUBACK, 0, body, 5),
                       lambda: codec.decodeDisconnect(0, body, 5)):
            try:
                decode()
            except (codec.MalformedPacket, codec.ProtocolError, codec.UnsupportedVersion):
                pass


class TopicTests(TestCase):

    def test_names(self):
        for bad in ("", "a/+", "#", "a/#/b"):
            self.assertRaises(TopicError, checkTopicName, bad)
        self.assertEqual(checkTopicName("a//b"), "a//b")

    def test_filters(self):
        self.assertFalse(checkFilter("a/b"))
        for wild in ("+", "#", "a/+/b", "a/#", "+/+"):
            self.assertTrue(checkFilter(wild))
        for bad in ("", "a/#/b", "a+", "a/b#", "#/a"):
            self.assertRaises(TopicError, checkFilter, bad)

    def test_shared(self):
        self.assertEqual(parseShared("$share/g/a/#"), ("g", "a/#"))
        self.assertEqual(parseShared("a/b"), (None, "a/b"))
        for bad in ("$share/g", "$share//a", "$share/g+/a", "$share/g/"):
            self.assertRaises(TopicError, parseShared, bad)

    def test_matches(self):
        yes = [("a/+", "a/b"), ("a/#", "a"), ("a/#", "a/b/c"), ("#", "a"), ("+/+", "/x"),
               ("+", ""), ("$SYS/#", "$SYS/x"), ("a/+/c", "a//c")]
        no = [("a/+", "a/b/c"), ("a/+", "a"), ("#", "$SYS/x"), ("+/x", "$SYS/x"),
              ("a/b", "a/c")]
        for f, t in yes:
            self.assertTrue(matches(f, t), (f, t))
        for f, t in no:
            self.assertFalse(matches(f, t), (f, t))

    @given(st.lists(st.sampled_from(["a", "b", "+", "$x", ""]), min_size=1, max_size=4),
           st.lists(st.sampled_from(["a", "b", "c", "$x", ""]), min_size=1, max_size=4),
           st.booleans())
    def test_trieAgreesWithMatches(self, flevels, tlevels, hashTail):
        """The trie finds exactly the filters L{matches} accepts."""
        f = "/".join(flevels + (["#"] if hashTail else []))
        t = "/".join(tlevels)
        trie = SubscriptionTrie()
        s = _Session("s1")
        trie.add(f, s)
        self.assertEqual(bool(trie.match(t)), matches(f, t), (f, t))
        trie.remove(f, s)
        self.assertEqual((trie.count, trie._root.children), (0, {}))

    def test_sharedRoundRobin(self):
        trie = SubscriptionTrie()
        members = [_Session(f"s{i}") for i in range(3)]
        for m in members:
            trie.add("a/#", m, share="g")
        picked = [next(iter(trie.match("a/b"))) for _ in range(6)]
        self.assertEqual(picked, ["s0", "s1", "s2", "s0", "s1", "s2"])
        members[1].online = False
        picked = [next(iter(trie.match("a/b"))) for _ in range(4)]
        self.assertNotIn("s1", picked)


class _Session:
    def __init__(self, cid):
        self.connectionId = cid
        self.online = True


class GroupResolverTests(TestCase):
    """L{broker.core.hub.Hub.addGroupResolver}: extra receivers of group sends."""

    def test_resolverAddsReceiversOnce(self):
        core = Core(Clock())
        hub = core.hub("h")
        member = RecordingConnection("m")
        extra = RecordingConnection("x")
        hub.admit(member, groups=["a/b"])
        hub.admit(extra)
        resolver = lambda group: {"m": member, "x": extra} if group == "a/b" else None
        hub.addGroupResolver(resolver)
        hub.send(_group("a/b"), Message.text("hi"))
        hub.send(_group("other"), Message.text("no"))
        self.assertEqual((len(member.deliveries), len(extra.deliveries)), (1, 1))
        hub.removeGroupResolver(resolver)
        hub.send(_group("a/b"), Message.text("again"))
        self.assertEqual((len(member.deliveries), len(extra.deliveries)), (2, 1))

    def test_resolverReceiverStandsInForMember(self):
        """
        A resolver's receiver for a connection already in the group is
        delivered to in its place (how the MQTT face says which shared
        groups chose a session), once.
        """
        core = Core(Clock())
        hub = core.hub("h")
        member = RecordingConnection("m")
        other = RecordingConnection("o")
        hub.admit(member, groups=["a/b"])
        hub.admit(other, groups=["a/b"])
        standIn = RecordingConnection("m")
        hub.addGroupResolver(lambda group: {"m": standIn})
        hub.send(_group("a/b"), Message.text("hi"))
        self.assertEqual((len(member.deliveries), len(standIn.deliveries),
                          len(other.deliveries)), (0, 1, 1))


def _group(name):
    from broker.core.message import Target
    return Target(Target.GROUP, name)
