# -*- test-case-name: tests.test_webpubsub_protobuf -*-
"""
The PubSub subprotocols a client may choose, and the wire format (codec)
each one speaks.

A connection on any of them does the same things (join, leave, publish,
events, acks, and for the reliable ones sequence numbers and recovery);
only the encoding differs: JSON text frames (L{frames}) or protobuf binary
frames (L{protobuf}).  The connection (L{broker.webpubsub.protocol}) and
the reliable link (L{broker.webpubsub.reliable}) hold a L{Codec} and never
test which one it is.
"""


from broker.core import jsonstrict
from broker.webpubsub import frames, protobuf


def _peekJSONAckId(payload):
    """
    The ackId of a JSON request, or C{None}: just enough parsing to
    answer a dropped frame.
    """
    try:
        ackId = jsonstrict.loads(payload).get("ackId")
    except (ValueError, AttributeError):
        return None
    if isinstance(ackId, int) and not isinstance(ackId, bool) and 0 <= ackId < 1 << 64:
        return ackId
    return None


class Codec:
    """
    One wire format of the PubSub subprotocols.

    @ivar name: the key of its frames in a L{broker.core.message.Delivery}'s
        encoding cache (a fan-out frames a message once per format).
    @ivar label: its name in messages (close reasons).
    @ivar binary: true when its frames are binary WebSocket messages.
    @ivar wrongFrame: the close reason for a frame of the other kind (text
        or binary).
    @ivar parseRequest: C{payload -> Request}, raising C{ValueError} for a
        frame that does not decode and L{frames.InvalidRequest} for an
        invalid request.
    @ivar ack, connected, disconnected, messageFrame: the server frames,
        with the signatures of L{frames}' functions of those names.
    @ivar pong: the answer to a ping request.
    @ivar peekAckId: C{payload -> ackId or None}, cheap, never raising.
    """

    def __init__(self, name, label, binary, wrongFrame, parseRequest, ack, connected,
                 disconnected, messageFrame, pong, peekAckId):
        self.name = name
        self.label = label
        self.binary = binary
        self.wrongFrame = wrongFrame
        self.parseRequest = parseRequest
        self.ack = ack
        self.connected = connected
        self.disconnected = disconnected
        self.messageFrame = messageFrame
        self.pong = pong
        self.peekAckId = peekAckId

    def __repr__(self):
        return f"<Codec {self.name}>"


JSON = Codec("json", "JSON", False, f"binary frames are not allowed with {frames.JSON_V1}",
             frames.parseRequest, frames.ack, frames.connected,
             frames.disconnected, frames.messageFrame, frames.PONG, _peekJSONAckId)
PROTOBUF = Codec("protobuf", "protobuf", True,
                 f"text frames are not allowed with {protobuf.PROTOBUF_V1}", protobuf.parseRequest, protobuf.ack, protobuf.connected,
                 protobuf.disconnected, protobuf.messageFrame, protobuf.PONG,
                 protobuf.peekAckId)
CODECS = {c.name: c for c in (JSON, PROTOBUF)}

# subprotocol -> (codec, reliable), in the order the broker prefers them
# when a client offers several.
SUBPROTOCOLS = {
    frames.JSON_RELIABLE_V1: (JSON, True),
    frames.JSON_V1: (JSON, False),
    protobuf.PROTOBUF_RELIABLE_V1: (PROTOBUF, True),
    protobuf.PROTOBUF_V1: (PROTOBUF, False),
}


def choose(offered):
    """
    The PubSub subprotocol to agree among those a client offers, or
    C{None} when it offers none (a plain client).
    """
    for name in SUBPROTOCOLS:
        if name in offered:
            return name
    return None
