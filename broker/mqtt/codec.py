# -*- test-case-name: tests.test_mqtt_codec -*-
"""
MQTT 3.1.1 and 5.0 packets: a bounded stream reader and struct-based
decoders and encoders for both versions.

Hand-written on purpose (measured, see the commit that added it): the two
maintained codecs on PyPI, C{mqtt5} (Rust) and C{moat-lib-mqtt} (sans-io),
only speak MQTT 5.0 (both refuse a 3.1.1 CONNECT and misread a 3.1.1
PUBLISH), so 3.1.1 needs this code anyway; and the fan-out hot path encodes
a PUBLISH once per message, protocol version and QoS and then only patches
the packet identifier per subscriber (L{PublishTemplate}), which neither
library offers.

Errors: L{MalformedPacket} (5.0 reason 0x81) and L{ProtocolError} (0x82);
the adapter closes the connection on either, with a DISCONNECT on 5.0.
"""

import struct

# Control packet types.
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = (
    8, 9, 10, 11, 12, 13, 14, 15)

V311 = 4
V5 = 5

# Reason codes used by the broker (MQTT 5.0 section 2.4).
SUCCESS = 0x00
GRANTED_QOS_1 = 0x01
GRANTED_QOS_2 = 0x02
DISCONNECT_WITH_WILL = 0x04
NO_MATCHING_SUBSCRIBERS = 0x10
NO_SUBSCRIPTION_EXISTED = 0x11
UNSPECIFIED_ERROR = 0x80
MALFORMED_PACKET = 0x81
PROTOCOL_ERROR = 0x82
IMPLEMENTATION_SPECIFIC_ERROR = 0x83
UNSUPPORTED_PROTOCOL_VERSION = 0x84
CLIENT_IDENTIFIER_NOT_VALID = 0x85
BAD_USER_NAME_OR_PASSWORD = 0x86
NOT_AUTHORIZED = 0x87
SERVER_UNAVAILABLE = 0x88
SERVER_BUSY = 0x89
SERVER_SHUTTING_DOWN = 0x8B
BAD_AUTHENTICATION_METHOD = 0x8C
KEEP_ALIVE_TIMEOUT = 0x8D
SESSION_TAKEN_OVER = 0x8E
TOPIC_FILTER_INVALID = 0x8F
TOPIC_NAME_INVALID = 0x90
PACKET_IDENTIFIER_IN_USE = 0x91
PACKET_IDENTIFIER_NOT_FOUND = 0x92
RECEIVE_MAXIMUM_EXCEEDED = 0x93
TOPIC_ALIAS_INVALID = 0x94
PACKET_TOO_LARGE = 0x95
MESSAGE_RATE_TOO_HIGH = 0x96
QUOTA_EXCEEDED = 0x97
ADMINISTRATIVE_ACTION = 0x98
PAYLOAD_FORMAT_INVALID = 0x99
RETAIN_NOT_SUPPORTED = 0x9A
QOS_NOT_SUPPORTED = 0x9B
SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
CONNECTION_RATE_EXCEEDED = 0x9F
MAXIMUM_CONNECT_TIME = 0xA0
SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2

# 3.1.1 CONNACK return codes.
RC311_ACCEPTED = 0
RC311_BAD_VERSION = 1
RC311_IDENTIFIER_REJECTED = 2
RC311_SERVER_UNAVAILABLE = 3
RC311_BAD_CREDENTIALS = 4
RC311_NOT_AUTHORIZED = 5

# 5.0 CONNACK reason -> 3.1.1 return code.
CONNACK_311 = {
    SUCCESS: RC311_ACCEPTED, UNSUPPORTED_PROTOCOL_VERSION: RC311_BAD_VERSION,
    CLIENT_IDENTIFIER_NOT_VALID: RC311_IDENTIFIER_REJECTED,
    BAD_USER_NAME_OR_PASSWORD: RC311_BAD_CREDENTIALS, NOT_AUTHORIZED: RC311_NOT_AUTHORIZED,
}
# Any other refusal is "server unavailable" to a 3.1.1 client.

# Properties (MQTT 5.0 section 2.2.2.2): id -> (name, kind).
_BYTE, _U16, _U32, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
PROPERTIES = {
    0x01: ("payload_format_indicator", _BYTE),
    0x02: ("message_expiry_interval", _U32),
    0x03: ("content_type", _UTF8),
    0x08: ("response_topic", _UTF8),
    0x09: ("correlation_data", _BINARY),
    0x0B: ("subscription_identifier", _VARINT),
    0x11: ("session_expiry_interval", _U32),
    0x12: ("assigned_client_identifier", _UTF8),
    0x13: ("server_keep_alive", _U16),
    0x15: ("authentication_method", _UTF8),
    0x16: ("authentication_data", _BINARY),
    0x17: ("request_problem_information", _BYTE),
    0x18: ("will_delay_interval", _U32),
    0x19: ("request_response_information", _BYTE),
    0x1A: ("response_information", _UTF8),
    0x1C: ("server_reference", _UTF8),
    0x1F: ("reason_string", _UTF8),
    0x21: ("receive_maximum", _U16),
    0x22: ("topic_alias_maximum", _U16),
    0x23: ("topic_alias", _U16),
    0x24: ("maximum_qos", _BYTE),
    0x25: ("retain_available", _BYTE),
    0x26: ("user_property", _PAIR),
    0x27: ("maximum_packet_size", _U32),
    0x28: ("wildcard_subscription_available", _BYTE),
    0x29: ("subscription_identifier_available", _BYTE),
    0x2A: ("shared_subscription_available", _BYTE),
}
_PROPERTY_IDS = {name: (pid, kind) for pid, (name, kind) in PROPERTIES.items()}
# Which properties each packet may carry (5.0 section 2.2.2.2); others are
# a protocol error.
_PUBLISH_PROPS = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26})
_ALLOWED = {
    CONNECT: frozenset({0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x26, 0x27}),
    "will": frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26}),
    PUBLISH: _PUBLISH_PROPS - {0x0B},   # a client may not send a subscription id
    PUBACK: frozenset({0x1F, 0x26}),
    PUBREC: frozenset({0x1F, 0x26}),
    PUBREL: frozenset({0x1F, 0x26}),
    PUBCOMP: frozenset({0x1F, 0x26}),
    SUBSCRIBE: frozenset({0x0B, 0x26}),
    UNSUBSCRIBE: frozenset({0x26}),
    DISCONNECT: frozenset({0x11, 0x1C, 0x1F, 0x26}),
    AUTH: frozenset({0x15, 0x16, 0x1F, 0x26}),
}

_H = struct.Struct("!H")
_I = struct.Struct("!I")


class MalformedPacket(Exception):
    """The bytes do not follow the packet format (5.0 reason 0x81)."""

    reasonCode = MALFORMED_PACKET


class ProtocolError(Exception):
    """Well formed, but not allowed here (5.0 reason 0x82)."""

    reasonCode = PROTOCOL_ERROR


class PacketTooLarge(Exception):
    """An inbound packet over the broker's maximum packet size (0x95)."""

    reasonCode = PACKET_TOO_LARGE


# -- primitives --------------------------------------------------------------

def encodeVarint(n):
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _varint(data, pos):
    """Decode a variable byte integer at C{pos}: C{(value, newPos)}."""
    value = 0
    shift = 0
    for i in range(4):
        try:
            b = data[pos + i]
        except IndexError:
            raise MalformedPacket("truncated variable byte integer")
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos + i + 1
        shift += 7
    raise MalformedPacket("variable byte integer longer than 4 bytes")


def _u16(data, pos):
    if pos + 2 > len(data):
        raise MalformedPacket("truncated two byte integer")
    return _H.unpack_from(data, pos)[0], pos + 2


def _u32(data, pos):
    if pos + 4 > len(data):
        raise MalformedPacket("truncated four byte integer")
    return _I.unpack_from(data, pos)[0], pos + 4


def _binary(data, pos):
    n, pos = _u16(data, pos)
    if pos + n > len(data):
        raise MalformedPacket("truncated string or binary data")
    return bytes(data[pos:pos + n]), pos + n


def _utf8(data, pos):
    raw, pos = _binary(data, pos)
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("string is not valid UTF-8")
    # MQTT-1.5.4-2: no U+0000; surrogates cannot survive decode().
    if "\x00" in s:
        raise MalformedPacket("string holds U+0000")
    return s, pos


def utf8(s):
    raw = s.encode("utf-8")
    return _H.pack(len(raw)) + raw


def binary(b):
    return _H.pack(len(b)) + b


def _properties(data, pos, allowed):
    """
    Decode a property block: C{(dict, newPos)}.  C{user_property} is a list
    of pairs, C{subscription_identifier} a list; others appear once
    (MQTT-2.2.2-...: repeating them is a protocol error).
    """
    length, pos = _varint(data, pos)
    end = pos + length
    if end > len(data):
        raise MalformedPacket("property length beyond the packet")
    props = {}
    while pos < end:
        pid, pos = _varint(data, pos)
        spec = PROPERTIES.get(pid)
        if spec is None:
            raise MalformedPacket(f"unknown property 0x{pid:02x}")
        if pid not in allowed:
            raise ProtocolError(f"property {spec[0]} not allowed here")
        name, kind = spec
        if kind == _BYTE:
            if pos >= end:
                raise MalformedPacket("truncated property")
            value = data[pos]
            pos += 1
        elif kind == _U16:
            value, pos = _u16(data, pos)
        elif kind == _U32:
            value, pos = _u32(data, pos)
        elif kind == _VARINT:
            value, pos = _varint(data, pos)
        elif kind == _UTF8:
            value, pos = _utf8(data, pos)
        elif kind == _BINARY:
            value, pos = _binary(data, pos)
        else:
            k, pos = _utf8(data, pos)
            v, pos = _utf8(data, pos)
            value = (k, v)
        if pos > end:
            raise MalformedPacket("property beyond its block")
        if name == "user_property":
            props.setdefault(name, []).append(value)
        elif name == "subscription_identifier":
            props.setdefault(name, []).append(value)
        elif name in props:
            raise ProtocolError(f"property {name} repeated")
        else:
            props[name] = value
    return props, end


def encodeProperties(props):
    """
    The property block (length prefixed) for C{props}, a dict as
    L{_properties} returns; C{None} values are left out.
    """
    if not props:
        return b"\x00"
    out = bytearray()
    for name, value in props.items():
        if value is None:
            continue
        pid, kind = _PROPERTY_IDS[name]
        if name in ("user_property", "subscription_identifier"):
            values = value
        else:
            values = (value,)
        for v in values:
            out.append(pid)
            if kind == _BYTE:
                out.append(v)
            elif kind == _U16:
                out += _H.pack(v)
            elif kind == _U32:
                out += _I.pack(v)
            elif kind == _VARINT:
                out += encodeVarint(v)
            elif kind == _UTF8:
                out += utf8(v)
            elif kind == _BINARY:
                out += binary(v)
            else:
                out += utf8(v[0]) + utf8(v[1])
    return encodeVarint(len(out)) + bytes(out)


def packet(first, body):
    """A whole packet: the first byte, the remaining length, the body."""
    return bytes((first,)) + encodeVarint(len(body)) + body


# -- the stream reader -------------------------------------------------------

class PacketReader:
    """
    Splits a byte stream into packets, never holding more than one packet
    over C{maxPacketSize} bytes: the size is known from the fixed header,
    so an oversize packet is refused before its body arrives.
    """

    def __init__(self, maxPacketSize):
        self.maxPacketSize = maxPacketSize
        self._buffer = bytearray()

    def feed(self, data):
        """
        Add C{data}; return the complete packets now available as
        C{[(type, flags, body)]} (C{body} bytes).

        @raise MalformedPacket: a bad remaining length.
        @raise PacketTooLarge: a packet over the maximum.
        """
        buf = self._buffer
        buf += data
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            first = buf[pos]
            length = 0
            shift = 0
            i = pos + 1
            while True:
                if i >= n:
                    length = None
                    break
                b = buf[i]
                i += 1
                length |= (b & 0x7F) << shift
                if not b & 0x80:
                    break
                shift += 7
                if shift >= 28:
                    raise MalformedPacket("remaining length longer than 4 bytes")
            if length is None:
                break
            total = i - pos + length
            if total > self.maxPacketSize:
                raise PacketTooLarge(total)
            if n < i + length:
                break
            out.append((first >> 4, first & 0x0F, bytes(buf[i:i + length])))
            pos = i + length
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self):
        return len(self._buffer)


# -- decoded packets -----------------------------------------------------------

class Connect:
    """A decoded CONNECT."""

    __slots__ = ("version", "clientId", "cleanStart", "keepAlive", "username", "password",
                 "properties", "will")

    def __repr__(self):
        return (f"<Connect v{self.version} {self.clientId!r} clean={self.cleanStart} "
                f"keepAlive={self.keepAlive}>")


class Will:
    """The will message of a CONNECT."""

    __slots__ = ("topic", "payload", "qos", "retain", "properties")

    def __init__(self, topic, payload, qos, retain, properties):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = properties


class Publish:
    """A decoded PUBLISH."""

    __slots__ = ("topic", "payload", "qos", "retain", "dup", "packetId", "properties")

    def __init__(self, topic, payload, qos=0, retain=False, dup=False, packetId=None,
                 properties=None):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.packetId = packetId
        self.properties = properties if properties is not None else {}

    def __repr__(self):
        return f"<Publish {self.topic!r} qos={self.qos} id={self.packetId} {len(self.payload)}B>"


class Subscription:
    """One topic filter of a SUBSCRIBE with its options."""

    __slots__ = ("filter", "qos", "noLocal", "retainAsPublished", "retainHandling")

    def __init__(self, filter, qos, noLocal=False, retainAsPublished=False, retainHandling=0):
        self.filter = filter
        self.qos = qos
        self.noLocal = noLocal
        self.retainAsPublished = retainAsPublished
        self.retainHandling = retainHandling


class Subscribe:
    __slots__ = ("packetId", "subscriptions", "properties")

    def __init__(self, packetId, subscriptions, properties):
        self.packetId = packetId
        self.subscriptions = subscriptions
        self.properties = properties


class Unsubscribe:
    __slots__ = ("packetId", "filters", "properties")

    def __init__(self, packetId, filters, properties):
        self.packetId = packetId
        self.filters = filters
        self.properties = properties


class Ack:
    """PUBACK, PUBREC, PUBREL or PUBCOMP."""

    __slots__ = ("type", "packetId", "reasonCode", "properties")

    def __init__(self, type, packetId, reasonCode=SUCCESS, properties=None):
        self.type = type
        self.packetId = packetId
        self.reasonCode = reasonCode
        self.properties = properties or {}


class Disconnect:
    __slots__ = ("reasonCode", "properties")

    def __init__(self, reasonCode=SUCCESS, properties=None):
        self.reasonCode = reasonCode
        self.properties = properties or {}


def decodeConnect(flags, body):
    """
    Decode a CONNECT (either version).

    @raise UnsupportedVersion: a protocol name or level other than MQTT 4/5
        (the caller answers CONNACK 0x84 / 1 and closes).
    """
    if flags != 0:
        raise MalformedPacket("CONNECT reserved flags")
    name, pos = _binary(body, 0)
    if pos >= len(body):
        raise MalformedPacket("truncated CONNECT")
    level = body[pos]
    pos += 1
    if name != b"MQTT" or level not in (V311, V5):
        raise UnsupportedVersion(level if name == b"MQTT" else 0)
    c = Connect()
    c.version = level
    if pos + 3 > len(body):
        raise MalformedPacket("truncated CONNECT")
    cflags = body[pos]
    pos += 1
    if cflags & 0x01:
        raise MalformedPacket("CONNECT reserved flag set")        # MQTT-3.1.2-3
    c.keepAlive, pos = _u16(body, pos)
    c.properties = {}
    if level == V5:
        c.properties, pos = _properties(body, pos, _ALLOWED[CONNECT])
    c.cleanStart = bool(cflags & 0x02)
    c.clientId, pos = _utf8(body, pos)
    willFlag = bool(cflags & 0x04)
    willQos = (cflags >> 3) & 3
    willRetain = bool(cflags & 0x20)
    if not willFlag and (willQos or willRetain):
        raise MalformedPacket("will QoS or retain without a will")   # MQTT-3.1.2-11/13
    if willQos == 3:
        raise MalformedPacket("will QoS 3")                            # MQTT-3.1.2-12
    c.will = None
    if willFlag:
        wprops = {}
        if level == V5:
            wprops, pos = _properties(body, pos, _ALLOWED["will"])
        topic, pos = _utf8(body, pos)
        payload, pos = _binary(body, pos)
        c.will = Will(topic, payload, willQos, willRetain, wprops)
    c.username = c.password = None
    if cflags & 0x80:
        c.username, pos = _utf8(body, pos)
    if cflags & 0x40:
        if level == V311 and not cflags & 0x80:
            raise MalformedPacket("password without user name")        # 3.1.1: MQTT-3.1.2-22
        c.password, pos = _binary(body, pos)
    if pos != len(body):
        raise MalformedPacket("bytes after the CONNECT payload")
    return c


class UnsupportedVersion(Exception):
    def __init__(self, level):
        Exception.__init__(self, level)
        self.level = level


def decodePublish(flags, body, version, fromServer=False):
    """
    The hot path of every inbound message: the common case (a topic, no
    properties) is decoded inline.

    @param fromServer: decode as a client would (a subscription identifier
        is then allowed): for tests and tools.
    """
    qos = (flags >> 1) & 3
    if qos == 3:
        raise MalformedPacket("PUBLISH QoS 3")                         # MQTT-3.3.1-4
    dup = bool(flags & 0x08)
    if dup and qos == 0:
        raise MalformedPacket("DUP on a QoS 0 PUBLISH")                # MQTT-3.3.1-2
    n = len(body)
    if n < 2:
        raise MalformedPacket("truncated topic name")
    pos = 2 + ((body[0] << 8) | body[1])
    if pos > n:
        raise MalformedPacket("truncated topic name")
    try:
        topic = body[2:pos].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("topic name is not valid UTF-8")
    if "\x00" in topic:
        raise MalformedPacket("topic name holds U+0000")
    packetId = None
    if qos:
        if pos + 2 > n:
            raise MalformedPacket("truncated packet identifier")
        packetId = (body[pos] << 8) | body[pos + 1]
        pos += 2
        if packetId == 0:
            raise MalformedPacket("packet identifier 0")
    props = {}
    if version == V5:
        if pos < n and body[pos] == 0:
            pos += 1
        else:
            props, pos = _properties(body, pos, _PUBLISH_PROPS if fromServer
                                     else _ALLOWED[PUBLISH])
    return Publish(topic, body[pos:], qos, bool(flags & 0x01), dup, packetId, props)


def decodeSubscribe(flags, body, version):
    if flags != 0x02:
        raise MalformedPacket("SUBSCRIBE reserved flags")              # MQTT-3.8.1-1
    packetId, pos = _u16(body, 0)
    if packetId == 0:
        raise MalformedPacket("packet identifier 0")
    props = {}
    if version == V5:
        props, pos = _properties(body, pos, _ALLOWED[SUBSCRIBE])
    subs = []
    while pos < len(body):
        f, pos = _utf8(body, pos)
        if pos >= len(body):
            raise MalformedPacket("topic filter without options")
        o = body[pos]
        pos += 1
        if version == V5:
            if o & 0xC0 or (o & 3) == 3 or ((o >> 4) & 3) == 3:
                raise MalformedPacket("bad subscription options")      # MQTT-3.8.3-5
            subs.append(Subscription(f, o & 3, bool(o & 0x04), bool(o & 0x08), (o >> 4) & 3))
        else:
            if o & 0xFC or o == 3:
                raise MalformedPacket("bad requested QoS")             # 3.1.1: MQTT-3.8.3-4
            subs.append(Subscription(f, o))
    if not subs:
        raise ProtocolError("SUBSCRIBE without a topic filter")        # MQTT-3.8.3-2
    return Subscribe(packetId, subs, props)


def decodeUnsubscribe(flags, body, version):
    if flags != 0x02:
        raise MalformedPacket("UNSUBSCRIBE reserved flags")            # MQTT-3.10.1-1
    packetId, pos = _u16(body, 0)
    if packetId == 0:
        raise MalformedPacket("packet identifier 0")
    props = {}
    if version == V5:
        props, pos = _properties(body, pos, _ALLOWED[UNSUBSCRIBE])
    filters = []
    while pos < len(body):
        f, pos = _utf8(body, pos)
        filters.append(f)
    if not filters:
        raise ProtocolError("UNSUBSCRIBE without a topic filter")      # MQTT-3.10.3-2
    return Unsubscribe(packetId, filters, props)


def decodeAck(type, flags, body, version):
    want = 0x02 if type == PUBREL else 0
    if flags != want:
        raise MalformedPacket("reserved flags of an acknowledgement")
    packetId, pos = _u16(body, 0)
    reason = SUCCESS
    props = {}
    if version == V5 and pos < len(body):
        reason = body[pos]
        pos += 1
        if pos < len(body):
            props, pos = _properties(body, pos, _ALLOWED[type])
    if pos != len(body):
        raise MalformedPacket("bytes after an acknowledgement")
    return Ack(type, packetId, reason, props)


def decodeDisconnect(flags, body, version):
    if flags != 0:
        raise MalformedPacket("DISCONNECT reserved flags")
    if version != V5 or not body:
        if body:
            raise MalformedPacket("3.1.1 DISCONNECT with a body")
        return Disconnect()
    reason = body[0]
    props = {}
    if len(body) > 1:
        props, pos = _properties(body, 1, _ALLOWED[DISCONNECT])
        if pos != len(body):
            raise MalformedPacket("bytes after DISCONNECT properties")
    return Disconnect(reason, props)


# -- encoders ----------------------------------------------------------------

PINGRESP_BYTES = b"\xd0\x00"


def encodeConnack(version, sessionPresent, reasonCode, properties=None):
    if version == V5:
        body = bytes((1 if sessionPresent else 0, reasonCode)) + encodeProperties(properties)
        return packet(0x20, body)
    return packet(0x20, bytes((1 if sessionPresent else 0,
                               CONNACK_311.get(reasonCode, RC311_SERVER_UNAVAILABLE))))


def encodeAck(type, packetId, version, reasonCode=SUCCESS, properties=None):
    first = (type << 4) | (0x02 if type == PUBREL else 0)
    if version == V5 and (reasonCode != SUCCESS or properties):
        body = _H.pack(packetId) + bytes((reasonCode,))
        if properties:
            body += encodeProperties(properties)
        return packet(first, body)
    return bytes((first, 2)) + _H.pack(packetId)


def encodeSuback(packetId, codes, version, properties=None):
    body = _H.pack(packetId)
    if version == V5:
        body += encodeProperties(properties)
    return packet(0x90, body + bytes(codes))


def encodeUnsuback(packetId, codes, version, properties=None):
    if version == V5:
        return packet(0xB0, _H.pack(packetId) + encodeProperties(properties) + bytes(codes))
    return b"\xb0\x02" + _H.pack(packetId)


def encodeDisconnect(reasonCode, properties=None):
    """A 5.0 DISCONNECT (3.1.1 has no server DISCONNECT)."""
    return packet(0xE0, bytes((reasonCode,)) + encodeProperties(properties))


def encodePublish(topic, payload, qos, retain, packetId, version, properties=None, dup=False,
                  topicBytes=None):
    """One whole PUBLISH; L{PublishTemplate} for the fan-out path."""
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    body = topicBytes if topicBytes is not None else utf8(topic)
    if qos:
        body += _H.pack(packetId)
    if version == V5:
        body += encodeProperties(properties)
    return packet(first, body + payload)


class PublishTemplate:
    """
    A PUBLISH encoded once for many receivers: C{head} (fixed header and
    topic), then the packet identifier (QoS > 0 only), then C{tail}
    (properties and payload).  A receiver costs one concatenation.
    """

    __slots__ = ("head", "tail", "qos", "size", "topic", "_args", "_aliased")

    def __init__(self, topic, payload, qos, retain, version, properties=None):
        topicBytes = utf8(topic)
        tail = encodeProperties(properties) + payload if version == V5 else payload
        remaining = len(topicBytes) + (2 if qos else 0) + len(tail)
        first = 0x30 | (qos << 1) | (1 if retain else 0)
        self.head = bytes((first,)) + encodeVarint(remaining) + topicBytes
        self.tail = tail
        self.qos = qos
        self.size = len(self.head) + (2 if qos else 0) + len(tail)
        self.topic = topic
        self._args = (payload, retain, version, properties)
        self._aliased = None

    def bytes(self, packetId=None, dup=False):
        if not self.qos:
            return self.head + self.tail
        head = self.head
        if dup:
            head = bytes((head[0] | 0x08,)) + head[1:]
        return head + _H.pack(packetId) + self.tail

    def aliased(self, alias, withTopic):
        """
        The same PUBLISH with 5.0 topic alias C{alias}, carrying the topic
        (C{withTopic}: the alias is being set) or an empty one; cached, as
        receivers mostly number their aliases alike.
        """
        key = (alias, withTopic)
        cache = self._aliased
        if cache is None:
            cache = self._aliased = {}
        t = cache.get(key)
        if t is None:
            payload, retain, version, properties = self._args
            props = dict(properties or {})
            props["topic_alias"] = alias
            t = cache[key] = PublishTemplate(self.topic if withTopic else "", payload,
                                             self.qos, retain, version, props)
        return t
