# -*- test-case-name: tests.test_webpubsub_protobuf -*-
"""
The C{protobuf.webpubsub.azure.v1} and C{protobuf.reliable.webpubsub.azure.v1}
subprotocols: client requests and server frames as protocol buffers.

The same requests and answers as the JSON subprotocol (L{frames}), in the
messages of C{proto/webpubsub.proto} (Microsoft's published field numbers),
encoded and decoded by the C{protobuf} runtime through the generated
C{proto/webpubsub_pb2}.  Each frame is one binary WebSocket message.  A
request decodes to the L{frames.Request} the JSON subprotocol builds, so
the connection handles both alike (L{broker.webpubsub.protocol}).

Payloads map onto the core's data types: C{text_data} is C{text},
C{binary_data} C{binary}, C{json_data} C{json} (validated as strict JSON)
and C{protobuf_data}, a C{google.protobuf.Any}, C{protobuf}: other
protobuf clients get it back as C{protobuf_data}, JSON clients as base64
with C{"dataType": "protobuf"}, plain clients as a binary frame.
"""

from google.protobuf.message import DecodeError

from broker.core import jsonstrict
from broker.core.message import BINARY, FROM_GROUP, JSON, PROTOBUF, TEXT, Message
from broker.webpubsub.frames import InvalidRequest, Request
from broker.webpubsub.proto import webpubsub_pb2 as pb

PROTOBUF_V1 = "protobuf.webpubsub.azure.v1"
PROTOBUF_RELIABLE_V1 = "protobuf.reliable.webpubsub.azure.v1"

Upstream = pb.UpstreamMessage
Downstream = pb.DownstreamMessage
MessageData = pb.MessageData

PONG = Downstream(pong_message=Downstream.PongMessage()).SerializeToString()


def parseRequest(payload):
    """
    Decode one binary frame into a L{Request}.

    @raise ValueError: when the frame is not an C{UpstreamMessage} (the
        connection is closed: nothing can be acknowledged).
    @raise InvalidRequest: for a message that decodes but is not a valid
        request (no request set, an empty group or event, no data, a
        C{json_data} that is not strict JSON).
    """
    upstream = Upstream()
    try:
        upstream.ParseFromString(payload)
    except DecodeError as e:
        raise ValueError(f"not a protobuf UpstreamMessage: {e}")
    kind = upstream.WhichOneof("message")
    if kind == "join_group_message" or kind == "leave_group_message":
        m = getattr(upstream, kind)
        ackId = _ackId(m)
        return Request("joinGroup" if kind == "join_group_message" else "leaveGroup",
                       ackId, group=_group(m, ackId))
    if kind == "send_to_group_message":
        m = upstream.send_to_group_message
        ackId = _ackId(m)
        return Request("sendToGroup", ackId, group=_group(m, ackId), noEcho=m.no_echo,
                       message=_message(m, ackId))
    if kind == "event_message":
        m = upstream.event_message
        ackId = _ackId(m)
        if not m.event:
            raise InvalidRequest("event must be a non-empty string", ackId)
        return Request("event", ackId, event=m.event, message=_message(m, ackId))
    if kind == "sequence_ack_message":
        return Request("sequenceAck", sequenceId=upstream.sequence_ack_message.sequence_id)
    if kind == "ping_message":
        return Request("ping")
    # Nothing set, or a request this definition does not know (group
    # streaming): the fields are unknown, so the oneof is empty.
    raise InvalidRequest("no supported request in the UpstreamMessage")


def _ackId(m):
    return m.ack_id if m.HasField("ack_id") else None


def _group(m, ackId):
    if not m.group:
        raise InvalidRequest("group must be a non-empty string", ackId)
    return m.group


def _message(m, ackId):
    if not m.HasField("data"):
        raise InvalidRequest("data is required", ackId)
    try:
        return toMessage(m.data)
    except ValueError as e:
        raise InvalidRequest(str(e), ackId)


def toMessage(data):
    """
    The core's L{Message} for a C{MessageData}.

    @raise ValueError: when no payload is set, or C{json_data} is not
        strict JSON.
    """
    which = data.WhichOneof("data")
    if which == "text_data":
        return Message(TEXT, data.text_data.encode("utf-8"))
    if which == "binary_data":
        return Message(BINARY, data.binary_data)
    if which == "json_data":
        text = data.json_data
        jsonstrict.loads(text)
        return Message(JSON, text.encode("utf-8"))
    if which == "protobuf_data":
        return Message(PROTOBUF, data.protobuf_data.SerializeToString())
    raise ValueError("data has no payload set")


def _fillData(data, message):
    kind = message.dataType
    if kind == TEXT:
        data.text_data = message.data.decode("utf-8")
    elif kind == BINARY:
        data.binary_data = message.data
    elif kind == JSON:
        data.json_data = message.data.decode("utf-8")
    else:
        data.protobuf_data.ParseFromString(message.data)


# -- server frames ------------------------------------------------------


def ack(ackId, error=None):
    """
    An C{AckMessage}; C{error} is a L{broker.core.errors.BrokerError} or None.
    """
    down = Downstream()
    m = down.ack_message
    m.ack_id = ackId
    m.success = error is None
    if error is not None:
        m.error.name = error.name
        m.error.message = error.message
    return down.SerializeToString()


def connected(connectionId, userId, reconnectionToken=None):
    down = Downstream()
    m = down.system_message.connected_message
    m.connection_id = connectionId
    if userId is not None:
        m.user_id = userId
    if reconnectionToken is not None:
        m.reconnection_token = reconnectionToken
    return down.SerializeToString()


def disconnected(reason):
    down = Downstream()
    down.system_message.disconnected_message.reason = reason
    return down.SerializeToString()


def messageFrame(delivery, sequenceId=None):
    """
    The C{DataMessage} for a delivery (from a group or from the server),
    numbered for the reliable subprotocol when C{sequenceId} is given.
    """
    down = Downstream()
    m = down.data_message
    if delivery.source == FROM_GROUP:
        m.group = delivery.group
        setattr(m, "from", "group")
    else:
        setattr(m, "from", "server")
    _fillData(m.data, delivery.message)
    if sequenceId is not None:
        m.sequence_id = sequenceId
    return down.SerializeToString()


def peekAckId(payload):
    """
    The ackId of a request, or C{None}: enough decoding to answer a
    dropped frame.
    """
    upstream = Upstream()
    try:
        upstream.ParseFromString(payload)
    except DecodeError:
        return None
    kind = upstream.WhichOneof("message")
    if kind is None or kind in ("sequence_ack_message", "ping_message"):
        return None
    return _ackId(getattr(upstream, kind))
