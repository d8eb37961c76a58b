# -*- test-case-name: tests.test_iot_frames -*-
"""
The IoT wire format, version 1 (docs/iot-protocol.md is its specification).

Every TCP frame is::

    length     u32 big-endian: the number of bytes that follow (>= 12)
    version    u8   1
    kind       u8   one of KINDS
    requestId  u64 big-endian: correlates a request with its response,
               a message with its ack, a ping with its pong
    ptype      u8   payload type: 0 none, 1 binary, 2 ascii, 3 utf8, 4 json
    addrLen    u8   length of the address that follows (0..255)
    address    addrLen bytes of UTF-8: who the frame is for or from
    payload    the rest, validated against ptype

A UDP telemetry datagram is (version 2)::

    version u8 2 | token 16 bytes | ptype u8 | payload | mac 16 bytes

    mac = HMAC-SHA256(tokenKey, every byte before the mac)[:16]

(L{broker.iot.auth.tokenKey}); version 1 has no mac and is accepted only
from devices that did not announce version 2, if configured.

The format is small on purpose: a microcontroller can build a frame with a
few C{memcpy}s, and the length prefix lets the server refuse an oversized
frame before buffering it.
"""

import hmac
import struct

from broker.core import jsonstrict
from broker.core.message import Message

VERSION = 1

HELLO = 0x01
CHALLENGE = 0x02
PROOF = 0x03
WELCOME = 0x04
REQUEST = 0x10
RESPONSE = 0x11
MESSAGE = 0x12
ACK = 0x13
ERROR = 0x14
PING = 0x20
PONG = 0x21
TOKENS = 0x30
TELEMETRY = 0x31
# Server -> central presence events (broker.iot.forward).
DEVICE_CONNECTED = 0x32
DEVICE_DISCONNECTED = 0x33
# Server -> central delivery feedback of a device's queued message
# (broker.iot.feedback).
MESSAGE_STATUS = 0x34
CLOSE = 0x3F

KINDS = {
    HELLO: "hello", CHALLENGE: "challenge", PROOF: "proof", WELCOME: "welcome",
    REQUEST: "request", RESPONSE: "response", MESSAGE: "message", ACK: "ack",
    ERROR: "error", PING: "ping", PONG: "pong", TOKENS: "tokens",
    TELEMETRY: "telemetry", DEVICE_CONNECTED: "device_connected",
    DEVICE_DISCONNECTED: "device_disconnected", MESSAGE_STATUS: "message_status",
    CLOSE: "close",
}

NONE = "none"
BINARY = "binary"
ASCII = "ascii"
UTF8 = "utf8"
JSON = "json"
PAYLOAD_TYPES = {0: NONE, 1: BINARY, 2: ASCII, 3: UTF8, 4: JSON}
PAYLOAD_CODES = {v: k for k, v in PAYLOAD_TYPES.items()}

HEADER = struct.Struct(">BBQBB")     # after the length prefix
LENGTH = struct.Struct(">I")
DATAGRAM_HEADER_SIZE = 1 + 16 + 1
TOKEN_SIZE = 16
# The datagram versions: 1 token only (legacy), 2 with a MAC of MAC_SIZE
# bytes (a truncated HMAC-SHA256: 128 bits, one try per datagram).
DATAGRAM_V1 = 1
DATAGRAM_V2 = 2
MAC_SIZE = 16
MAX_ADDRESS = 255
DEFAULT_MAX_FRAME = 1024 * 1024

class FrameError(Exception):
    """
    A frame or payload that breaks the format.

    @ivar code: the error code sent back (see L{broker.iot.errors}).
    """

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message
        self.requestId = 0


class Payload:
    """
    A typed payload: C{type} is one of C{"binary"}, C{"ascii"}, C{"utf8"},
    C{"json"} (or C{"none"}, empty), C{data} is bytes, validated on
    construction so that a Payload in hand is always well-formed:
    ASCII has no byte >= 0x80, UTF-8 decodes, JSON parses.
    """

    __slots__ = ("type", "data")

    def __init__(self, type, data=b""):
        if type not in PAYLOAD_CODES:
            raise FrameError("BAD_PAYLOAD", f"unknown payload type {type!r}")
        if not isinstance(data, bytes):
            raise TypeError("Payload data must be bytes")
        if type == ASCII:
            if not data.isascii():
                raise FrameError("BAD_PAYLOAD", "ascii payload has a byte >= 0x80")
        elif type == UTF8:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                raise FrameError("BAD_PAYLOAD", "utf8 payload is not valid UTF-8")
        elif type == JSON:
            try:
                jsonstrict.loads(data)
            except jsonstrict.JSONError as e:
                raise FrameError("BAD_PAYLOAD", f"json payload is not JSON: {e}")
        elif type == NONE and data:
            raise FrameError("BAD_PAYLOAD", "payload type none with data")
        self.type = type
        self.data = data

    @classmethod
    def trusted(cls, type, data):
        """
        A payload whose C{data} this process has just made well-formed
        (e.g. C{jsonstrict.dumps} of a parsed value): not validated again.
        """
        payload = cls.__new__(cls)
        payload.type = type
        payload.data = data
        return payload

    @classmethod
    def json(cls, value):
        return cls(JSON, jsonstrict.dumps(value).encode("utf-8"))

    @classmethod
    def text(cls, s):
        return cls(UTF8, s.encode("utf-8"))

    def value(self):
        """
        The payload as Python: parsed JSON, str for text, bytes for binary.
        """
        if self.type == JSON:
            return jsonstrict.loads(self.data)
        if self.type in (ASCII, UTF8):
            return self.data.decode("utf-8")
        return self.data

    def toMessage(self):
        """
        This payload as a core L{broker.core.message.Message}.
        """
        if self.type == JSON:
            return Message("json", self.data)
        if self.type in (ASCII, UTF8):
            return Message("text", self.data)
        return Message("binary", self.data)

    def __eq__(self, other):
        if not isinstance(other, Payload):
            return NotImplemented
        return (self.type, self.data) == (other.type, other.data)

    def __hash__(self):
        return hash((self.type, self.data))

    def __repr__(self):
        return f"<Payload {self.type} {len(self.data)} bytes>"


EMPTY = Payload(NONE)


class Frame:
    """
    One decoded frame.
    """

    __slots__ = ("kind", "requestId", "address", "payload")

    def __init__(self, kind, requestId=0, payload=EMPTY, address=""):
        self.kind = kind
        self.requestId = requestId
        self.payload = payload
        self.address = address

    def __eq__(self, other):
        if not isinstance(other, Frame):
            return NotImplemented
        return ((self.kind, self.requestId, self.address, self.payload)
                == (other.kind, other.requestId, other.address, other.payload))

    def __repr__(self):
        return (f"<Frame {KINDS.get(self.kind, self.kind)} id={self.requestId} "
                f"to={self.address!r} {self.payload!r}>")


def encode(kind, requestId=0, payload=EMPTY, address=""):
    """
    The bytes of one frame, length prefix included.
    """
    addr = address.encode("utf-8")
    if len(addr) > MAX_ADDRESS:
        raise FrameError("BAD_FRAME", "address longer than 255 bytes")
    body = HEADER.pack(VERSION, kind, requestId, PAYLOAD_CODES[payload.type], len(addr))
    return LENGTH.pack(len(body) + len(addr) + len(payload.data)) + body + addr + payload.data


def decodeBody(body):
    """
    Decode a frame without its length prefix.

    @raise FrameError: for an unknown version, kind or payload type, an
        address that is not UTF-8, or a payload that breaks its type.
    """
    if len(body) < HEADER.size:
        raise FrameError("BAD_FRAME", "frame shorter than its header")
    version, kind, requestId, ptype, addrLen = HEADER.unpack_from(body)
    if version != VERSION:
        raise FrameError("UNSUPPORTED_VERSION", f"protocol version {version} is not supported")
    if kind not in KINDS:
        raise FrameError("BAD_FRAME", f"unknown frame kind 0x{kind:02x}")
    if ptype not in PAYLOAD_TYPES:
        raise FrameError("BAD_PAYLOAD", f"unknown payload type {ptype}")
    end = HEADER.size + addrLen
    if end > len(body):
        raise FrameError("BAD_FRAME", "address runs past the frame")
    try:
        address = body[HEADER.size:end].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("BAD_FRAME", "address is not UTF-8")
    payload = Payload(PAYLOAD_TYPES[ptype], bytes(body[end:]))
    return Frame(kind, requestId, payload, address)


class FrameReader:
    """
    Splits a byte stream into frame bodies, refusing a frame larger than
    C{maxFrame} as soon as its length prefix is read.
    """

    def __init__(self, maxFrame=DEFAULT_MAX_FRAME):
        self.maxFrame = maxFrame
        self._buffer = bytearray()

    def feed(self, data):
        """
        Add C{data}; return the complete frames, each a L{Frame} or, when
        its content is bad, a L{FrameError} carrying its C{requestId}.

        @raise FrameError: when a length prefix is out of bounds (the
            stream cannot be followed any further: close the session).
        """
        buf = self._buffer
        if not buf and len(data) >= 4:
            (length,) = LENGTH.unpack_from(data)
            if len(data) == 4 + length and HEADER.size <= length <= self.maxFrame:
                # The common case, one whole frame in one read: decoded
                # straight from it, without the buffer.
                body = bytes(data[4:])
                try:
                    return [decodeBody(body)]
                except FrameError as e:
                    e.requestId = HEADER.unpack_from(body)[2]
                    return [e]
        buf += data
        frames = []
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (length,) = LENGTH.unpack_from(buf, pos)
            if length > self.maxFrame:
                raise FrameError("FRAME_TOO_LARGE",
                                 f"frame of {length} bytes exceeds {self.maxFrame}")
            if length < HEADER.size:
                raise FrameError("BAD_FRAME", "frame shorter than its header")
            if n - pos - 4 < length:
                break
            body = bytes(buf[pos + 4:pos + 4 + length])
            pos += 4 + length
            try:
                frames.append(decodeBody(body))
            except FrameError as e:
                # The frame is delimited, so the stream is still usable:
                # hand the error back with the request id, for an answer.
                e.requestId = HEADER.unpack_from(body)[2]
                frames.append(e)
        if pos:
            del buf[:pos]
        return frames


def datagramMac(tokenKey, signed):
    """
    The MAC of a version 2 datagram: HMAC-SHA256 of everything before it,
    truncated to L{MAC_SIZE} bytes.
    """
    return hmac.digest(tokenKey, signed, "sha256")[:MAC_SIZE]


def encodeDatagram(token, payload, tokenKey=None):
    """
    A version 2 datagram authenticated with C{tokenKey} (the token's key,
    L{broker.iot.auth.tokenKey}); without one, a legacy version 1
    datagram.
    """
    if len(token) != TOKEN_SIZE:
        raise ValueError("a token is 16 bytes")
    version = DATAGRAM_V1 if tokenKey is None else DATAGRAM_V2
    signed = bytes((version,)) + token + bytes((PAYLOAD_CODES[payload.type],)) + payload.data
    if tokenKey is None:
        return signed
    return signed + datagramMac(tokenKey, signed)


class Datagram:
    """
    A decoded datagram, its MAC not yet checked: L{verify} with the key of
    the token it names, before the token is spent.
    """

    __slots__ = ("version", "token", "payload", "signed", "mac")

    def __init__(self, version, token, payload, signed, mac):
        self.version = version
        self.token = token
        self.payload = payload
        self.signed = signed
        self.mac = mac

    def verify(self, tokenKey):
        """
        Whether this datagram is what the holder of C{tokenKey} sent: a
        version 2 datagram whose MAC matches, or a version 1 datagram
        for a token issued without a key (a legacy session).  A token
        issued with a key never accepts a version 1 datagram, so the MAC
        cannot be stripped.
        """
        if tokenKey is None:
            return self.version == DATAGRAM_V1
        return self.version == DATAGRAM_V2 and hmac.compare_digest(
            datagramMac(tokenKey, self.signed), self.mac)


def decodeDatagram(data, legacy=False):
    """
    @param legacy: also decode version 1 datagrams (no MAC).
    @return: a L{Datagram}.
    @raise FrameError: when the datagram is malformed.
    """
    version = data[0] if data else None
    if version == DATAGRAM_V2:
        if len(data) < DATAGRAM_HEADER_SIZE + MAC_SIZE:
            raise FrameError("BAD_FRAME", "datagram shorter than its header and MAC")
        signed, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
    elif version == DATAGRAM_V1 and legacy:
        if len(data) < DATAGRAM_HEADER_SIZE:
            raise FrameError("BAD_FRAME", "datagram shorter than its header")
        signed, mac = data, b""
    elif version is None:
        raise FrameError("BAD_FRAME", "empty datagram")
    else:
        raise FrameError("UNSUPPORTED_VERSION", f"datagram version {version}")
    ptype = PAYLOAD_TYPES.get(signed[17])
    if ptype is None:
        raise FrameError("BAD_PAYLOAD", f"unknown payload type {signed[17]}")
    return Datagram(version, signed[1:17], Payload(ptype, signed[18:]), signed, mac)


def encodeTokens(ttl, tokens):
    """
    A TOKENS payload: u32 lifetime in seconds, then the 16-byte tokens.
    """
    return Payload(BINARY, struct.pack(">I", int(ttl)) + b"".join(tokens))


def decodeTokens(payload):
    data = payload.data
    if payload.type != BINARY or len(data) < 4 or (len(data) - 4) % TOKEN_SIZE:
        raise FrameError("BAD_PAYLOAD", "tokens payload is not u32 ttl + 16-byte tokens")
    (ttl,) = struct.unpack_from(">I", data)
    return ttl, [data[i:i + TOKEN_SIZE] for i in range(4, len(data), TOKEN_SIZE)]
