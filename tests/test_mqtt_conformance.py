"""
MQTT 5.0 conformance, sections 1 to 3.3 of the specification: the
normative statements (C{[MQTT-x.y.z-n]}) the face's other tests do not
already cover, checked byte by byte with a hand-driven client against a
broker built in this process.  Each test's docstring names the statements
it covers; docs/mqtt-conformance.md points each statement at its test.
Section 3.3 is in L{tests.test_mqtt_conformance_publish}, sections 3.4
to 4 in L{tests.test_mqtt_conformance_flows}.
"""

from twisted.internet import defer

from broker.mqtt import codec
from broker.mqtt.noauth import AllowAll
from tests.mqttharness import sleep
from tests.test_mqtt_protocol import RawBrokerCase, Refusing


# -- packets built by hand ----------------------------------------------------

def connect(clientId="c", version=5, clean=True, keepAlive=60, props=None, will=None,
            username=None, password=None, flags=0):
    """
    A CONNECT; C{will} is C{(topic, payload, qos, retain, properties)};
    C{flags} is or-ed into the connect flags (to break them).
    """
    cflags = (0x02 if clean else 0) | flags
    payload = codec.utf8(clientId)
    if will is not None:
        topic, message, qos, retain, wprops = will
        cflags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        if version == 5:
            payload += codec.encodeProperties(wprops)
        payload += codec.utf8(topic) + codec.binary(message)
    if username is not None:
        cflags |= 0x80
        payload += codec.utf8(username)
    if password is not None:
        cflags |= 0x40
        payload += codec.binary(password)
    body = codec.utf8("MQTT") + bytes((version, cflags)) + keepAlive.to_bytes(2, "big")
    if version == 5:
        body += codec.encodeProperties(props)
    return codec.packet(0x10, body + payload)


def publish(topic, payload=b"x", qos=0, pid=None, retain=False, dup=False, props=None,
            version=5):
    return codec.encodePublish(topic, payload, qos, retain, pid, version, props, dup)


def subscribe(pid, *subs, props=None, version=5):
    """C{subs}: C{(filter, options byte)} pairs."""
    body = pid.to_bytes(2, "big")
    if version == 5:
        body += codec.encodeProperties(props)
    for f, options in subs:
        body += codec.utf8(f) + bytes((options,))
    return codec.packet(0x82, body)


def unsubscribe(pid, *filters, version=5):
    body = pid.to_bytes(2, "big") + (b"\x00" if version == 5 else b"")
    for f in filters:
        body += codec.utf8(f)
    return codec.packet(0xA2, body)


def rawString(data):
    """A length-prefixed string of raw bytes (to send ill-formed UTF-8)."""
    return len(data).to_bytes(2, "big") + data


def ack(type, pid, reason=None):
    body = pid.to_bytes(2, "big") + (bytes((reason,)) if reason is not None else b"")
    return codec.packet((type << 4) | (0x02 if type == codec.PUBREL else 0), body)


# Options bytes of a 5.0 subscription.
NO_LOCAL, RAP = 0x04, 0x08


def rh(n):
    return n << 4


# -- reading what the broker sent ----------------------------------------------

def publishes(r, version=5):
    return [codec.decodePublish(f, b, version, fromServer=True)
            for t, f, b in r.packets if t == codec.PUBLISH]


def connack(r):
    """C{(flags, code, properties)} of the first CONNACK (5.0)."""
    flags, body = next((f, b) for t, f, b in r.packets if t == codec.CONNACK)
    props = codec._properties(body, 2, set(codec.PROPERTIES))[0] if len(body) > 2 else {}
    return body[0], body[1], props


def disconnectOf(r):
    """C{(reason, properties)} of the DISCONNECT received, or C{None}."""
    for t, f, body in r.packets:
        if t == codec.DISCONNECT:
            props = codec._properties(body, 1, set(codec.PROPERTIES))[0] if len(body) > 1 else {}
            return body[0], props
    return None


def bodies(r, type):
    return [b for t, f, b in r.packets if t == type]


class Recording(AllowAll):
    """Allows everyone; records what each CONNECT gave the authenticator."""

    def __init__(self):
        self.seen = []

    def authenticate(self, clientId, username, password, hub):
        self.seen.append((clientId, username, password))
        return AllowAll.authenticate(self, clientId, username, password, hub)


class ConformanceCase(RawBrokerCase):
    """A broker in this process and hand-driven clients of its TCP listener."""

    @defer.inlineCallbacks
    def watcher(self, *subs, clientId="watcher", version=5, props=None):
        """A connected client subscribed to C{subs} (filter, options)."""
        r = yield self.raw(connect(clientId, version=version, props=props)
                           + subscribe(1, *subs, version=version), codec.SUBACK)
        return r

    def waitPublishes(self, r, n, version=5):
        return r.waitFor(lambda: len(publishes(r, version)) >= n)

    @defer.inlineCallbacks
    def closedWith(self, r, reason):
        """C{r} is closed by the broker after a DISCONNECT with C{reason}."""
        yield r.lost
        got = disconnectOf(r)
        self.assertIsNotNone(got, r.packets)
        self.assertEqual(got[0], reason, r.packets)
        self.assertEqual(r.packets[-1][0], codec.DISCONNECT)

    @defer.inlineCallbacks
    def refusedAfterConnect(self, data, reason):
        """A fresh connected client sends C{data}: DISCONNECT C{reason}, closed."""
        r = yield self.raw(connect("bad"))
        r.transport.write(data)
        yield self.closedWith(r, reason)
        return r

    @defer.inlineCallbacks
    def closedSilently(self, data):
        """C{data} before any CONNACK: closed with nothing sent back."""
        r = yield self.raw(data, wait=None)
        yield r.lost
        self.assertEqual(r.packets, [])


class DataRepresentationTests(ConformanceCase):
    """Section 1.5: UTF-8 strings, variable byte integers, string pairs."""

    @defer.inlineCallbacks
    def test_illFormedUtf8IsMalformed(self):
        """
        MQTT-1.5.4-1, MQTT-1.5.7-1, MQTT-3.3.2-1, MQTT-3.3.2-13, MQTT-3.3.2-19,
        MQTT-3.8.3-1, MQTT-3.10.3-1, MQTT-3.1.3-4, MQTT-3.1.3-11, MQTT-3.1.3-12:
        a UTF-8 string that is ill-formed (here a UTF-16 surrogate, U+D800,
        encoded as UTF-8) is a Malformed Packet wherever it appears: topic
        name, content type, response topic, either string of a user
        property, topic filters, client identifier, will topic, user name.
        """
        surrogate = b"\xed\xa0\x80"
        topic = codec.utf8("t")
        connected = [
            codec.packet(0x30, rawString(b"a" + surrogate) + b"\x00x"),
            codec.packet(0x30, topic + bytes((3 + len(surrogate),)) + b"\x03"
                         + rawString(surrogate) + b"x"),
            codec.packet(0x30, topic + bytes((3 + len(surrogate),)) + b"\x08"
                         + rawString(surrogate) + b"x"),
            codec.packet(0x30, topic + bytes((6 + len(surrogate),)) + b"\x26"
                         + codec.utf8("k") + rawString(surrogate) + b"x"),
            codec.packet(0x30, topic + bytes((6 + len(surrogate),)) + b"\x26"
                         + rawString(surrogate) + codec.utf8("v") + b"x"),
            codec.packet(0x82, b"\x00\x01\x00" + rawString(surrogate) + b"\x00"),
            codec.packet(0xA2, b"\x00\x01\x00" + rawString(surrogate)),
        ]
        for data in connected:
            yield self.refusedAfterConnect(data, codec.MALFORMED_PACKET)
        head = codec.utf8("MQTT") + b"\x05"
        for cflags, payload in (
                (0x02, rawString(surrogate)),
                (0x06, codec.utf8("c") + b"\x00" + rawString(surrogate) + codec.binary(b"w")),
                (0x82, codec.utf8("c") + rawString(surrogate))):
            yield self.closedSilently(codec.packet(
                0x10, head + bytes((cflags,)) + b"\x00\x3c\x00" + payload))
        self.assertGreaterEqual(self.server.counters["malformed"], len(connected) + 3)

    @defer.inlineCallbacks
    def test_nullCharacterIsMalformed(self):
        """
        MQTT-1.5.4-2, MQTT-4.7.3-2: U+0000 in a topic name or a topic filter
        is a Malformed Packet.
        """
        yield self.refusedAfterConnect(publish("a\x00b"), codec.MALFORMED_PACKET)
        yield self.refusedAfterConnect(subscribe(1, ("a\x00b", 0)), codec.MALFORMED_PACKET)

    @defer.inlineCallbacks
    def test_byteOrderMarkKept(self):
        """
        MQTT-1.5.4-3: 0xEF 0xBB 0xBF is U+FEFF, not stripped: a topic
        starting with it is a topic of its own, delivered with it.
        """
        w = yield self.watcher(("\ufeffbom/t", 0), ("bom/t", 0))
        p = yield self.raw(connect("p"))
        p.transport.write(publish("\ufeffbom/t", b"1") + publish("bom/t", b"2"))
        yield self.waitPublishes(w, 2)
        yield sleep(0.2)
        self.assertEqual([(m.topic, m.payload) for m in publishes(w)],
                         [("\ufeffbom/t", b"1"), ("bom/t", b"2")])

    def test_variableByteIntegerMinimal(self):
        """
        MQTT-1.5.5-1: the broker encodes every Variable Byte Integer (the
        remaining length, property lengths, subscription identifiers) in
        the fewest bytes.
        """
        for value, size in ((0, 1), (127, 1), (128, 2), (16383, 2), (16384, 3),
                            (2097151, 3), (2097152, 4), (268435455, 4)):
            self.assertEqual(len(codec.encodeVarint(value)), size, value)
        t = codec.PublishTemplate("t", b"x" * 200, 1, False, codec.V5,
                                  {"subscription_identifier": [200]})
        data = t.bytes(1)
        self.assertEqual(data[1:3], codec.encodeVarint(len(data) - 3))


class PacketFormatTests(ConformanceCase):
    """Section 2: fixed header flags, packet identifiers, property length."""

    @defer.inlineCallbacks
    def test_reservedFlagsMalformed(self):
        """
        MQTT-2.1.3-1, MQTT-3.6.1-1, MQTT-3.8.1-1, MQTT-3.10.1-1, MQTT-3.14.1-1,
        MQTT-3.3.1-4, MQTT-4.13.1-1: a fixed header whose reserved flags are
        not the listed values (PUBREL, SUBSCRIBE, UNSUBSCRIBE not 0010;
        PUBACK, PINGREQ, DISCONNECT not 0000; PUBLISH with both QoS bits)
        is malformed: DISCONNECT 0x81, closed.
        """
        for data in (b"\x60\x02\x00\x01",                          # PUBREL flags 0
                     codec.packet(0x80, b"\x00\x01\x00" + codec.utf8("t") + b"\x00"),
                     codec.packet(0xA0, b"\x00\x01\x00" + codec.utf8("t")),
                     b"\x42\x02\x00\x01",                          # PUBACK flags 2
                     b"\xc1\x00",                                  # PINGREQ flags 1
                     b"\xe1\x00",                                  # DISCONNECT flags 1
                     codec.packet(0x36, codec.utf8("t") + b"\x00\x01\x00x")):
            yield self.refusedAfterConnect(data, codec.MALFORMED_PACKET)

    @defer.inlineCallbacks
    def test_packetIdentifiers(self):
        """
        MQTT-2.2.1-2, MQTT-2.2.1-4, MQTT-2.2.1-5, MQTT-2.2.1-6, MQTT-3.3.1-2,
        MQTT-4.3.1-1, MQTT-4.3.2-1, MQTT-4.3.2-2, MQTT-4.3.3-1, MQTT-4.3.3-2:
        a QoS 0 PUBLISH from the broker has no packet identifier and DUP 0;
        each new QoS 1 / 2 PUBLISH it sends has a non-zero identifier no
        other unacknowledged one holds, DUP 0; PUBACK, PUBREC and PUBCOMP
        carry the PUBLISH's (PUBREL's) identifier, SUBACK and UNSUBACK the
        SUBSCRIBE's and UNSUBSCRIBE's.
        """
        w = yield self.raw(connect("w") + subscribe(0x1234, ("pi/#", 2)), codec.SUBACK)
        self.assertEqual(bodies(w, codec.SUBACK)[0][:2], b"\x12\x34")
        p = yield self.raw(connect("p"))
        p.transport.write(publish("pi/0", b"zero", 0) + publish("pi/1", b"one", 1, 0x0701)
                          + publish("pi/2", b"two", 2, 0x0802))
        yield p.waitFor(lambda: codec.PUBREC in p.types())
        p.transport.write(ack(codec.PUBREL, 0x0802))
        yield p.waitFor(lambda: codec.PUBCOMP in p.types())
        self.assertEqual(bodies(p, codec.PUBACK), [b"\x07\x01"])
        self.assertEqual(bodies(p, codec.PUBREC), [b"\x08\x02"])
        self.assertEqual(bodies(p, codec.PUBCOMP), [b"\x08\x02"])
        for i in range(6):
            p.transport.write(publish("pi/more", b"%d" % i, 1 + i % 2, 100 + i))
        yield self.waitPublishes(w, 9)
        seen = publishes(w)
        self.assertEqual((seen[0].qos, seen[0].packetId, seen[0].dup), (0, None, False))
        raw0 = next(b for t, f, b in w.packets if t == codec.PUBLISH)
        # Topic, property length 0, payload: no identifier between them.
        self.assertEqual(raw0, codec.utf8("pi/0") + b"\x00zero")
        ids = [m.packetId for m in seen[1:]]
        self.assertNotIn(0, ids)
        self.assertEqual(len(set(ids)), len(ids))
        self.assertFalse(any(m.dup for m in seen))
        w.transport.write(unsubscribe(0x4321, "pi/#"))
        yield w.waitFor(lambda: codec.UNSUBACK in w.types())
        self.assertEqual(bodies(w, codec.UNSUBACK)[0][:2], b"\x43\x21")

    @defer.inlineCallbacks
    def test_noPropertiesIsZeroLength(self):
        """
        MQTT-2.2.2-1: a packet with no properties has a Property Length of
        zero (SUBACK, UNSUBACK, a PUBLISH without properties).
        """
        w = yield self.raw(connect("w") + subscribe(5, ("np/t", 1)), codec.SUBACK)
        self.assertEqual(bodies(w, codec.SUBACK), [b"\x00\x05\x00\x01"])
        p = yield self.raw(connect("p"))
        p.transport.write(publish("np/t", b"data", 1, 3))
        yield self.waitPublishes(w, 1)
        m = publishes(w)[0]
        self.assertEqual(bodies(w, codec.PUBLISH)[0],
                         codec.utf8("np/t") + m.packetId.to_bytes(2, "big") + b"\x00data")
        w.transport.write(unsubscribe(6, "np/t"))
        yield w.waitFor(lambda: codec.UNSUBACK in w.types())
        self.assertEqual(bodies(w, codec.UNSUBACK), [b"\x00\x06\x00\x00"])


class ConnectTests(ConformanceCase):
    """Section 3.1: CONNECT."""

    @defer.inlineCallbacks
    def test_protocolNameAndVersion(self):
        """
        MQTT-3.1.2-1, MQTT-3.1.2-2: a protocol name other than "MQTT" or a
        level the broker does not speak gets a CONNACK refusal (the 3.1.1
        "unacceptable protocol version" every version reads) and is closed.
        """
        for name, level in (("MQIsdp", 3), ("MQTX", 5), ("MQTT", 6)):
            r = yield self.raw(codec.packet(0x10, codec.utf8(name) + bytes((level,))
                                            + b"\x02\x00\x3c" + codec.utf8("c")), wait=None)
            yield r.lost
            self.assertEqual(r.packets, [(codec.CONNACK, 0, b"\x00\x01")], name)

    @defer.inlineCallbacks
    def test_malformedConnectClosedSilently(self):
        """
        MQTT-3.1.2-3, MQTT-3.1.2-11, MQTT-3.1.2-12, MQTT-3.1.2-13,
        MQTT-3.1.2-16, MQTT-3.1.2-17, MQTT-3.1.2-19, MQTT-3.1.3-1,
        MQTT-3.1.3-3, MQTT-3.1.4-1, MQTT-3.14.0-1: a CONNECT not in the
        format of 3.1 (reserved flag set, will QoS or will retain without
        the will flag, will QoS 3, a user name flag without the user name,
        a password flag without the password, a user name without its
        flag, no client identifier, reserved fixed-header flags) closes the
        connection with nothing sent: no DISCONNECT before a CONNACK.
        """
        head = codec.utf8("MQTT") + b"\x05"

        def bad(cflags, payload, first=0x10):
            return codec.packet(first, head + bytes((cflags,)) + b"\x00\x3c\x00" + payload)
        cid = codec.utf8("c")
        for data in (bad(0x03, cid),                    # reserved flag
                     bad(0x0A, cid),                    # will QoS 1 without will
                     bad(0x22, cid),                    # will retain without will
                     bad(0x1E, cid + b"\x00" + codec.utf8("w") + codec.binary(b"x")),
                     bad(0x82, cid),                    # user name flag, no user name
                     bad(0x42, cid),                    # password flag, no password
                     bad(0x02, cid + codec.utf8("u")),  # user name, no flag
                     bad(0x02, b""),                    # no client identifier
                     bad(0x02, cid, first=0x11)):       # fixed header flags
            yield self.closedSilently(data)
        self.assertEqual(self.server.counters["connections"], 0)

    @defer.inlineCallbacks
    def test_userNameAndPassword(self):
        """
        MQTT-3.1.2-16, MQTT-3.1.2-17, MQTT-3.1.2-18, MQTT-3.1.2-19,
        MQTT-3.1.3-1: the user name and password are read from the payload
        exactly when their flags say so, in their order after the client
        identifier and the will (5.0 allows a password without a user name).
        """
        auth = self.server.auth = Recording()
        will = ("w/t", b"bye", 0, False, None)
        for kw in ({"username": "u", "password": b"p", "will": will}, {"password": b"p"},
                   {"username": "u"}, {}):
            r = yield self.raw(connect("up", **kw))
            self.assertEqual(connack(r)[1], codec.SUCCESS)
            r.transport.write(b"\xe0\x00")
            yield r.lost
        self.assertEqual(auth.seen, [("up", "u", b"p"), ("up", None, b"p"),
                                     ("up", "u", None), ("up", None, None)])

    @defer.inlineCallbacks
    def test_willRetainFlag(self):
        """
        MQTT-3.1.2-7, MQTT-3.1.2-8, MQTT-3.1.2-14, MQTT-3.1.2-15: a will is
        kept with the session and published when the connection is lost:
        retain 0 as a non-retained message, retain 1 as a retained one (a
        later subscriber gets it).
        """
        w = yield self.watcher(("wr/#", 1 | RAP))
        for clientId, retain in (("w0", False), ("w1", True)):
            r = yield self.raw(connect(clientId, will=(f"wr/{clientId}", b"gone", 1, retain,
                                                       None)))
            r.transport.abortConnection()
            yield r.lost
        yield self.waitPublishes(w, 2)
        self.assertEqual(sorted((m.topic, m.retain) for m in publishes(w)),
                         [("wr/w0", False), ("wr/w1", True)])
        late = yield self.watcher(("wr/#", 1), clientId="late")
        yield self.waitPublishes(late, 1)
        yield sleep(0.2)
        self.assertEqual([(m.topic, m.retain) for m in publishes(late)], [("wr/w1", True)])

    @defer.inlineCallbacks
    def test_willUserPropertiesOrder(self):
        """
        MQTT-3.1.3-10: the will's user properties are published in the
        order they were given.
        """
        pairs = [("z", "1"), ("a", "2"), ("z", "0")]
        w = yield self.watcher(("wo/#", 0))
        r = yield self.raw(connect("wo", will=("wo/t", b"w", 0, False,
                                               {"user_property": pairs})))
        r.transport.abortConnection()
        yield self.waitPublishes(w, 1)
        self.assertEqual(publishes(w)[0].properties["user_property"], pairs)

    @defer.inlineCallbacks
    def test_clientIdentifiers(self):
        """
        MQTT-3.1.3-2, MQTT-3.1.3-3, MQTT-3.1.3-5, MQTT-3.1.3-6, MQTT-3.1.3-7,
        MQTT-3.2.2-16: a 23-byte client identifier of 0-9a-zA-Z is accepted
        and names its session; an empty one is given a unique identifier,
        returned as the Assigned Client Identifier, under which the session
        is kept.
        """
        long = "aZ09" * 5 + "xyz"
        self.assertEqual(len(long), 23)
        r = yield self.raw(connect(long))
        self.assertEqual(connack(r)[1], codec.SUCCESS)
        self.assertNotIn("assigned_client_identifier", connack(r)[2])
        self.assertIsNotNone(self.server.sessions[("mqtt", long)].protocol)
        assigned = []
        for i in range(2):
            r = yield self.raw(connect(""))
            flags, code, props = connack(r)
            self.assertEqual(code, codec.SUCCESS)
            assigned.append(props["assigned_client_identifier"])
            self.assertIn(("mqtt", assigned[-1]), self.server.sessions)
        self.assertNotEqual(assigned[0], assigned[1])

    @defer.inlineCallbacks
    def test_refusedConnectProcessesNothing(self):
        """
        MQTT-3.1.4-6, MQTT-3.2.2-6, MQTT-3.2.2-7, MQTT-4.13.2-1: a refused
        CONNECT (0x87 here, for a client identifier with a session) gets
        Session Present 0, the connection is closed, and what the client
        sent after it (a SUBSCRIBE, a PUBLISH) is not processed.
        """
        expiry = {"session_expiry_interval": 60}
        first = yield self.raw(connect("rc", clean=False, props=expiry))
        first.transport.write(b"\xe0\x00")
        yield first.lost
        self.server.auth = Refusing()
        w = yield self.watcher(("rc/#", 0))
        r = yield self.raw(connect("rc", clean=False, props=expiry, username="banned")
                           + subscribe(1, ("rc/#", 0)) + publish("rc/t", b"no"), wait=None)
        yield r.lost
        self.assertEqual(r.packets, [(codec.CONNACK, 0, b"\x00\x87\x00")])
        yield sleep(0.2)
        self.assertEqual(publishes(w), [])

    @defer.inlineCallbacks
    def test_authenticationMethodRefused(self):
        """
        MQTT-4.12.0-1: a CONNECT with an Authentication Method (enhanced
        authentication, not supported) gets CONNACK 0x8C and is closed.
        """
        r = yield self.raw(connect("am", props={"authentication_method": "SCRAM-SHA-1"}),
                           wait=None)
        yield r.lost
        self.assertEqual(r.packets, [(codec.CONNACK, 0, b"\x00\x8c\x00")])


class ConnackTests(ConformanceCase):
    """Section 3.2: CONNACK."""

    @defer.inlineCallbacks
    def test_connackFirstAndOnce(self):
        """
        MQTT-3.1.4-5, MQTT-3.2.0-1, MQTT-3.2.0-2, MQTT-3.2.2-1, MQTT-3.12.4-1,
        MQTT-4.12.0-6: packets sent with the CONNECT are answered after
        CONNACK 0x00, whose flag bits 7-1 are 0 and which carries no
        Authentication Method; PINGREQ gets PINGRESP; a second CONNECT
        gets no second CONNACK (DISCONNECT 0x82).
        """
        r = yield self.raw(connect("cf") + subscribe(1, ("cf/t", 0)) + b"\xc0\x00",
                           codec.PINGRESP)
        self.assertEqual(r.types(), [codec.CONNACK, codec.SUBACK, codec.PINGRESP])
        flags, code, props = connack(r)
        self.assertEqual((flags & 0xFE, code), (0, codec.SUCCESS))
        self.assertNotIn("authentication_method", props)
        r.transport.write(connect("cf"))
        yield self.closedWith(r, codec.PROTOCOL_ERROR)
        self.assertEqual(r.types().count(codec.CONNACK), 1)
        self.assertNotIn(codec.AUTH, r.types())

    @defer.inlineCallbacks
    def test_fullQosAndRetainAvailable(self):
        """
        MQTT-3.2.2-9, MQTT-3.2.2-10, MQTT-3.2.2-12, MQTT-3.2.2-13: the broker
        supports QoS 1 and 2 and retained messages, so CONNACK carries
        neither Maximum QoS nor Retain Available (both then mean
        "supported"); SUBSCRIBE with QoS 0, 1, 2 is granted as asked, and a
        retained QoS 2 will is accepted and published as such.
        """
        r = yield self.raw(connect("fq", will=("fq/w", b"w", 2, True, None)))
        flags, code, props = connack(r)
        self.assertEqual(code, codec.SUCCESS)
        self.assertNotIn("maximum_qos", props)
        self.assertNotIn("retain_available", props)
        w = yield self.raw(connect("fw") + subscribe(2, ("fq/0", 0), ("fq/1", 1), ("fq/w", 2)),
                           codec.SUBACK)
        self.assertEqual(bodies(w, codec.SUBACK)[0][3:], b"\x00\x01\x02")
        r.transport.abortConnection()
        yield self.waitPublishes(w, 1)
        m = publishes(w)[0]
        self.assertEqual((m.topic, m.qos), ("fq/w", 2))
        self.assertIn("fq/w", self.server.routings["mqtt"].retained)

    @defer.inlineCallbacks
    def test_connackWithinMaximumPacketSize(self):
        """
        MQTT-3.1.2-24: a client whose Maximum Packet Size (10 or 5 bytes)
        cannot hold the full CONNACK gets one without the broker's optional
        limits; one that cannot hold even the Assigned Client Identifier
        (6 bytes, empty client identifier) is closed unanswered, with no
        will published.
        """
        for size in (10, 5):
            r = yield self.raw(connect(f"tiny{size}", props={"maximum_packet_size": size}))
            flags, code, props = connack(r)
            self.assertEqual(code, codec.SUCCESS)
            self.assertLessEqual(len(r.packets[0][2]) + 2, size)
            self.assertNotIn("topic_alias_maximum", props)
        r.transport.write(b"\xc0\x00")
        yield r.waitFor(lambda: codec.PINGRESP in r.types())
        w = yield self.watcher(("tw/#", 0))
        r = yield self.raw(connect("", props={"maximum_packet_size": 6},
                                   will=("tw/t", b"w", 0, False, None)), wait=None)
        yield r.lost
        self.assertEqual(r.packets, [])
        self.assertEqual(self.server.counters["too_large_for_client"], 1)
        yield sleep(0.2)
        self.assertEqual(publishes(w), [])

    @defer.inlineCallbacks
    def test_requestInformation(self):
        """
        MQTT-3.1.2-28, MQTT-3.1.2-29: no Response Information in CONNACK
        (the broker never sends it); with Request Problem Information 0, a
        refused PUBLISH's PUBACK, a refused SUBSCRIBE's SUBACK and an
        UNSUBACK carry no Reason String and no User Property.
        """
        self.server.auth = Refusing()
        for asked in (0, 1):
            r = yield self.raw(connect(f"ri{asked}", props={
                "request_response_information": 1, "request_problem_information": asked}))
            self.assertNotIn("response_information", connack(r)[2])
            r.transport.write(publish("secret", b"x", 1, 7) + subscribe(8, ("secret", 1))
                              + unsubscribe(9, "none"))
            yield r.waitFor(lambda: codec.UNSUBACK in r.types())
            self.assertEqual(bodies(r, codec.PUBACK), [b"\x00\x07\x87"])
            self.assertEqual(bodies(r, codec.SUBACK), [b"\x00\x08\x00\x87"])
            self.assertEqual(bodies(r, codec.UNSUBACK), [b"\x00\x09\x00\x11"])

