# -*- test-case-name: tests.test_webpubsub_frames -*-
"""
The C{json.webpubsub.azure.v1} subprotocol: parsing client requests and
building server frames.

Message frames are built by byte concatenation around the payload's raw JSON
field (L{broker.core.message.Message.jsonField}), so a JSON payload is never
parsed and re-serialised on its way through, and the frame is built once per
fan-out.
"""

import json

from broker.core import jsonstrict
from broker.core.errors import BadRequest
from broker.core.message import FROM_GROUP, Message
from broker.webpubsub.history import parsePosition

JSON_V1 = "json.webpubsub.azure.v1"
JSON_RELIABLE_V1 = "json.reliable.webpubsub.azure.v1"
PONG = b'{"type":"pong"}'
# Request types parsed elsewhere: type -> parse(type, obj) (invoke.py,
# streams.py; a sendToGroup frame with "stream" under STREAM_START).
EXTENSIONS = {}
STREAM_START = "streamStart"

# ackId is a uint64.
MAX_ACK_ID = 2 ** 64 - 1

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _s(value):
    return _dumps(value).encode("utf-8")


class Request:
    """
    One parsed client request.

    @ivar type: C{joinGroup}, C{leaveGroup}, C{sendToGroup}, C{event},
        C{sequenceAck} or C{ping}.
    @ivar ackId: the uint64 ackId or None.
    """

    __slots__ = ("type", "ackId", "group", "event", "noEcho", "message", "sequenceId",
                 "history")

    def __init__(self, type, ackId=None, group=None, event=None, noEcho=False,
                 message=None, sequenceId=None, history=None):
        self.type = type
        self.ackId = ackId
        self.group = group
        self.event = event
        self.noEcho = noEcho
        self.message = message
        self.sequenceId = sequenceId
        # joinGroup's (epoch, offset) for recovery (broker/webpubsub/history.py).
        self.history = history


class InvalidRequest(BadRequest):
    """
    A request that parsed as JSON but is not a valid request.

    @ivar ackId: the request's ackId when one could be read, so the error can
        be acknowledged.
    """

    def __init__(self, message, ackId=None):
        super().__init__(message)
        self.ackId = ackId


def parseRequest(payload):
    """
    Parse one text frame.

    @raise ValueError: when the frame is not strict JSON (L{jsonstrict}:
        no NaN, nesting of at most L{jsonstrict.MAX_DEPTH} levels, no
        duplicate key) or not an object (the connection is closed: nothing
        can be acknowledged).
    @raise InvalidRequest: for a JSON object that is not a valid request.
    """
    obj = jsonstrict.loads(payload)
    if not isinstance(obj, dict):
        raise ValueError("frame is not a JSON object")
    ackId = obj.get("ackId")
    if ackId is not None and (isinstance(ackId, bool) or not isinstance(ackId, int)
                              or not 0 <= ackId <= MAX_ACK_ID):
        raise InvalidRequest("ackId must be an unsigned 64-bit integer")
    kind = obj.get("type")
    if kind in ("joinGroup", "leaveGroup"):
        history = None
        if kind == "joinGroup" and "history" in obj:
            try:
                history = parsePosition(obj["history"])
            except BadRequest as e:
                raise InvalidRequest(e.message, ackId)
        return Request(kind, ackId, group=_group(obj, ackId), history=history)
    if kind == "sendToGroup":
        if obj.get("stream") is not None and STREAM_START in EXTENSIONS:
            return EXTENSIONS[STREAM_START](STREAM_START, obj)
        noEcho = obj.get("noEcho", False)
        if not isinstance(noEcho, bool):
            raise InvalidRequest("noEcho must be a boolean", ackId)
        return Request(kind, ackId, group=_group(obj, ackId), noEcho=noEcho,
                       message=_message(obj, ackId))
    if kind == "event":
        event = obj.get("event")
        if not isinstance(event, str) or not event:
            raise InvalidRequest("event must be a non-empty string", ackId)
        return Request(kind, ackId, event=event, message=_message(obj, ackId))
    if kind == "sequenceAck":
        seq = obj.get("sequenceId")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise InvalidRequest("sequenceId must be a non-negative integer", ackId)
        return Request(kind, ackId, sequenceId=seq)
    if kind == "ping":
        return Request(kind, ackId)
    if kind in EXTENSIONS:
        return EXTENSIONS[kind](kind, obj)
    if not isinstance(kind, str):
        raise InvalidRequest("type must be a string", ackId)
    raise InvalidRequest(f"unknown type {kind!r}", ackId)


def _group(obj, ackId):
    group = obj.get("group")
    if not isinstance(group, str) or not group:
        raise InvalidRequest("group must be a non-empty string", ackId)
    return group


def _message(obj, ackId):
    if "data" not in obj:
        raise InvalidRequest("data is required", ackId)
    try:
        return Message.fromJSONField(obj.get("dataType", "json"), obj["data"])
    except BadRequest as e:
        raise InvalidRequest(e.message, ackId)


# -- server frames --------------------------------------------------------


def ack(ackId, error=None):
    """
    An ack frame; C{error} is a L{broker.core.errors.BrokerError} or None.
    """
    if error is None:
        return b'{"type":"ack","ackId":%d,"success":true}' % ackId
    return _s({"type": "ack", "ackId": ackId, "success": False,
               "error": {"name": error.name, "message": error.message}})


def connected(connectionId, userId, reconnectionToken=None):
    frame = {"type": "system", "event": "connected", "connectionId": connectionId,
             "userId": userId}
    if reconnectionToken is not None:
        frame["reconnectionToken"] = reconnectionToken
    return _s(frame)


def disconnected(reason):
    return _s({"type": "system", "event": "disconnected", "message": reason})


def messageFrame(delivery, sequenceId=None):
    """
    The C{message} frame for a delivery (from a group or from the server),
    numbered for the reliable subprotocol when C{sequenceId} is given.
    """
    msg = delivery.message
    parts = [b'{"type":"message"']
    if sequenceId is not None:
        parts.append(b',"sequenceId":%d' % sequenceId)
    if delivery.source == FROM_GROUP:
        parts.append(b',"from":"group","group":' + _s(delivery.group))
        if delivery.fromUserId is not None:
            parts.append(b',"fromUserId":' + _s(delivery.fromUserId))
    else:
        parts.append(b',"from":"server"')
    if delivery.history is not None:
        epoch, offset = delivery.history
        parts.append(b',"history":{"epoch":%s,"offset":%d}' % (_s(epoch), offset))
    parts.append(b',"dataType":"' + msg.dataType.encode("ascii") + b'","data":')
    parts.append(msg.jsonField())
    if msg.stream is not None:
        parts.append(b',"stream":' + msg.streamField())
    parts.append(b"}")
    return b"".join(parts)
