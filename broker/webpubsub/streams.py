# -*- test-case-name: tests.test_webpubsub_streams -*-
"""
Group streams (C{WebPubSubClient.openGroupStream} / C{onGroupStream} of
C{@azure/web-pubsub-client} 1.1, a preview in Azure): one client sends a
group an ordered sequence of fragments that the group's members receive
as one stream.  JSON subprotocols only (the SDK's).

The sender opens a stream with a C{sendToGroup} frame that carries
C{stream} and no data, then sends numbered fragments and ends it::

    {"type": "sendToGroup", "group": "g", "noEcho": false,
     "stream": {"streamId": "s1", "idleTimeoutMs": 60000}}
    {"type": "streamData", "streamId": "s1", "streamSequenceId": 1,
     "dataType": "text", "data": "hello "}
    {"type": "streamData", "streamId": "s1"}                  (keep-alive)
    {"type": "streamEnd", "streamId": "s1"}                   (or with an
     "error": {"message": ..., "userErrorCode": ...}: aborted)

The broker answers the sender with C{{"type": "streamAck", "streamId",
"expectedSequenceId"}} (the next fragment it expects: 1 accepts the
start, then cumulative), C{streamNack} (a fragment out of order: its
C{name}, C{message} and the C{expectedSequenceId}; a fragment already
received, as a client sends again after recovering, is acknowledged, not
published twice) and C{streamClosed} (the stream is over; with an
C{error} of C{name} and C{message} when the broker closed it).

Each fragment reaches the group as a group message with a C{stream} field,
C{{"streamId", "streamSequenceId"}}; the stream's end is one more message,
C{text} and empty, whose C{stream} says C{"endOfStream": true} (and
carries the C{error} when it was aborted, timed out, or its sender went
away).  Receivers with another subprotocol get the fragments as plain
group messages, and the end as an empty text message.

Error names: C{Aborted} (the sender's C{streamEnd} with an error: its
message and C{userErrorCode} pass through), C{IdleTimeout} (nothing,
not even a keep-alive, within the stream's idle timeout), C{ConnectionClosed}
(the sender's connection ended for good), C{NotFound} (no such stream),
C{BadRequest} (an invalid frame, a duplicate C{streamId}), C{LimitExceeded}
(more than L{MAX_OPEN_STREAMS} open on one connection), C{OutOfOrder}, and
those of the publish itself (C{Forbidden} without the C{sendToGroup}
permission, C{ServiceUnavailable} in cluster mode without Redis).

A reliable connection's streams outlive its socket, so a client that
recovers goes on where it stopped; they end with the connection.  Each
fragment is a group publish like a C{sendToGroup}: it counts against the
inbound rate, the frame size and the fan-out backpressure the same way.
"""

from twisted.logger import Logger

from broker.core.errors import BadRequest, BrokerError
from broker.core.message import TEXT, Message
from broker.webpubsub import frames

log = Logger()

START = frames.STREAM_START     # a sendToGroup frame with "stream" (frames.parseRequest)
DATA = "streamData"
END = "streamEnd"
KINDS = (START, DATA, END)

MAX_STREAM_ID = 256
MAX_OPEN_STREAMS = 64
MAX_ERROR_TEXT = 1024
DEFAULT_IDLE_TIMEOUT = 300.0
MIN_IDLE_TIMEOUT = 1.0
MAX_IDLE_TIMEOUT = 3600.0
# The bus kind of a stream fragment (cluster mode).
BUS_KIND = "wps.stream"


class StreamMessage(Message):
    """
    A group message that is a fragment (or the end) of a group stream.

    @ivar stream: C{(streamId, streamSequenceId, endOfStream, error)},
        C{error} a dict (C{name}, C{message}, maybe C{userErrorCode}) or
        C{None}.
    """

    __slots__ = ("stream",)

    def __init__(self, dataType, data, stream):
        Message.__init__(self, dataType, data)
        self.stream = stream

    def streamField(self):
        """
        The C{stream} field of the JSON message frame (bytes).
        """
        streamId, sequenceId, end, error = self.stream
        field = {"streamId": streamId, "streamSequenceId": sequenceId}
        if end:
            field["endOfStream"] = True
        if error is not None:
            field["error"] = error
        return frames._s(field)

    def busState(self):
        return BUS_KIND, list(self.stream)

    @classmethod
    def fromBus(cls, dataType, data, state):
        streamId, sequenceId, end, error = state
        return cls(dataType, data, (streamId, sequenceId, end, error))

    def __repr__(self):
        return f"<StreamMessage {self.stream[0]!r} #{self.stream[1]} {len(self.data)} bytes>"


class StreamRequest:
    """
    A parsed stream frame, shaped as L{frames.Request} for the protocol.
    """

    __slots__ = ("type", "ackId", "streamId", "group", "noEcho", "idleTimeout", "sequenceId",
                 "message", "error")

    def __init__(self, type, streamId, ackId=None, group=None, noEcho=False, idleTimeout=None,
                 sequenceId=None, message=None, error=None):
        self.type = type
        self.streamId = streamId
        self.ackId = ackId
        self.group = group
        self.noEcho = noEcho
        self.idleTimeout = idleTimeout
        self.sequenceId = sequenceId
        self.message = message
        self.error = error


class InvalidStreamFrame(frames.InvalidRequest):
    """
    An invalid stream frame; answered with C{streamClosed} (C{BadRequest})
    when its C{streamId} could be read, else with a failed ack when it has
    an ackId.
    """

    def __init__(self, message, streamId=None, ackId=None):
        super().__init__(message, ackId)
        self.streamId = streamId


def _streamId(value, ackId=None):
    if not isinstance(value, str) or not value or len(value) > MAX_STREAM_ID:
        raise InvalidStreamFrame(
            f"streamId must be a non-empty string of at most {MAX_STREAM_ID} characters",
            ackId=ackId)
    return value


def _text(value, what, streamId):
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_ERROR_TEXT:
        raise InvalidStreamFrame(f"{what} must be a string of at most {MAX_ERROR_TEXT} "
                                 f"characters", streamId)
    return value


def parse(kind, obj):
    """
    Parse a stream frame (a JSON object): C{kind} is L{START} for a
    C{sendToGroup} with C{stream}, else the frame's type.

    @raise InvalidStreamFrame: when it is not a valid one.
    """
    if kind == START:
        ackId = obj.get("ackId")
        stream = obj["stream"]
        if not isinstance(stream, dict):
            raise InvalidStreamFrame("stream must be an object", ackId=ackId)
        streamId = _streamId(stream.get("streamId"), ackId)
        group = obj.get("group")
        if not isinstance(group, str) or not group:
            raise InvalidStreamFrame("group must be a non-empty string", streamId, ackId)
        noEcho = obj.get("noEcho", False)
        if not isinstance(noEcho, bool):
            raise InvalidStreamFrame("noEcho must be a boolean", streamId, ackId)
        if "data" in obj or "dataType" in obj:
            raise InvalidStreamFrame("a stream's opening frame carries no data: send it "
                                     "as its first streamData", streamId, ackId)
        idle = stream.get("idleTimeoutMs")
        if idle is None:
            idleTimeout = DEFAULT_IDLE_TIMEOUT
        elif isinstance(idle, bool) or not isinstance(idle, (int, float)) or idle != idle:
            raise InvalidStreamFrame("idleTimeoutMs must be a number", streamId, ackId)
        else:
            idleTimeout = min(MAX_IDLE_TIMEOUT, max(MIN_IDLE_TIMEOUT, idle / 1000.0))
        return StreamRequest(START, streamId, ackId=ackId, group=group, noEcho=noEcho,
                             idleTimeout=idleTimeout)
    streamId = _streamId(obj.get("streamId"))
    if kind == DATA:
        sequenceId = obj.get("streamSequenceId")
        if sequenceId is None and "data" not in obj:
            return StreamRequest(DATA, streamId)            # a keep-alive
        if isinstance(sequenceId, bool) or not isinstance(sequenceId, int) or sequenceId < 1:
            raise InvalidStreamFrame("streamSequenceId must be a positive integer", streamId)
        if "data" not in obj:
            raise InvalidStreamFrame("data is required", streamId)
        try:
            message = Message.fromJSONField(obj.get("dataType", "json"), obj["data"])
        except BadRequest as e:
            raise InvalidStreamFrame(e.message, streamId)
        return StreamRequest(DATA, streamId, sequenceId=sequenceId, message=message)
    error = obj.get("error")
    if error is not None:
        if not isinstance(error, dict):
            raise InvalidStreamFrame("error must be an object", streamId)
        error = {"name": "Aborted",
                 "message": _text(error.get("message"), "error.message", streamId)
                 or "the sender aborted the stream",
                 "userErrorCode": _text(error.get("userErrorCode"), "error.userErrorCode",
                                        streamId)}
        if error["userErrorCode"] is None:
            del error["userErrorCode"]
    return StreamRequest(END, streamId, error=error)


frames.EXTENSIONS.update({START: parse, DATA: parse, END: parse})


# -- frames to the sender ----------------------------------------------------


def streamAck(streamId, expected):
    return frames._s({"type": "streamAck", "streamId": streamId,
                      "expectedSequenceId": expected})


def streamNack(streamId, name, message, expected):
    return frames._s({"type": "streamNack", "streamId": streamId, "name": name,
                      "message": message, "expectedSequenceId": expected})


def streamClosed(streamId, error=None):
    frame = {"type": "streamClosed", "streamId": streamId}
    if error is not None:
        frame["error"] = {"name": error["name"], "message": error.get("message", "")}
    return frames._s(frame)


def _error(name, message):
    return {"name": name, "message": message}


class _Stream:
    __slots__ = ("streamId", "group", "noEcho", "idleTimeout", "expected", "timer")

    def __init__(self, streamId, group, noEcho, idleTimeout):
        self.streamId = streamId
        self.group = group
        self.noEcho = noEcho
        self.idleTimeout = idleTimeout
        self.expected = 1
        self.timer = None


class OpenStreams:
    """
    The open outbound streams of one client connection: its reliable link
    when it has one (they outlive its sockets), else its socket's.

    @param owner: the L{broker.webpubsub.reliable.ReliableLink} or the
        L{broker.webpubsub.protocol.ClientProtocol}; its C{session} is the
        core session the fragments are published as, and (a link) its
        C{protocol} the socket the broker's answers go to.
    """

    def __init__(self, owner, reactor, isLink):
        self.owner = owner
        self.reactor = reactor
        self.isLink = isLink
        self.streams = {}

    def __len__(self):
        return len(self.streams)

    # -- the sender's frames -----------------------------------------------

    def received(self, protocol, request):
        """
        Handle a stream frame C{protocol} read.
        """
        kind = request.type
        if kind == START:
            self._start(protocol, request)
            return
        stream = self.streams.get(request.streamId)
        if stream is None:
            self._send(streamClosed(request.streamId, _error(
                "NotFound", f"no open stream {request.streamId!r} on this connection")))
            return
        self._touch(stream)
        if kind == END:
            self._close(stream, request.error, tellSender=True)
            return
        if request.sequenceId is None:
            return                                          # a keep-alive
        sequenceId = request.sequenceId
        if sequenceId < stream.expected:
            # Sent again after a recovery: already published.
            self._send(streamAck(stream.streamId, stream.expected))
            return
        if sequenceId > stream.expected:
            self._send(streamNack(stream.streamId, "OutOfOrder",
                                  f"fragment {sequenceId} arrived before "
                                  f"{stream.expected}", stream.expected))
            return
        message = request.message
        fragment = StreamMessage(message.dataType, message.data,
                                 (stream.streamId, sequenceId, False, None))
        if not self._publish(stream, fragment):
            return
        stream.expected = sequenceId + 1
        self._send(streamAck(stream.streamId, stream.expected))
        protocol._throttle()

    def _start(self, protocol, request):
        streamId = request.streamId
        if streamId in self.streams:
            self._send(streamClosed(streamId, _error(
                "BadRequest", f"stream {streamId!r} is already open")))
            protocol._ack(request.ackId, BadRequest(f"stream {streamId!r} is already open"))
            return
        if len(self.streams) >= MAX_OPEN_STREAMS:
            self._send(streamClosed(streamId, _error(
                "LimitExceeded", f"at most {MAX_OPEN_STREAMS} streams may be open on one "
                                 f"connection")))
            return
        session = self.owner.session
        try:
            session.checkSendToGroup(request.group)
        except BrokerError as e:
            self._send(streamClosed(streamId, _error(e.name, e.message)))
            protocol._ack(request.ackId, e)
            return
        stream = self.streams[streamId] = _Stream(streamId, request.group, request.noEcho,
                                                   request.idleTimeout)
        self._touch(stream)
        protocol._ack(request.ackId)
        self._send(streamAck(streamId, 1))

    def invalid(self, protocol, error):
        """
        Answer an invalid stream frame.
        """
        if error.streamId is not None:
            self._send(streamClosed(error.streamId, _error("BadRequest", error.message)))
        protocol._ack(error.ackId, error)

    # -- closing -------------------------------------------------------------

    def closeAll(self, name, message):
        """
        The connection ended for good: every open stream ends, with
        C{name} and C{message} as its error, for the group.
        """
        for stream in list(self.streams.values()):
            self._close(stream, _error(name, message), tellSender=False)

    def _close(self, stream, error, tellSender):
        """
        End C{stream}: its end goes to the group, and to the sender a
        C{streamClosed} (with the error when the broker closed it).
        """
        if self.streams.pop(stream.streamId, None) is None:
            return
        if stream.timer is not None and stream.timer.active():
            stream.timer.cancel()
        stream.timer = None
        end = StreamMessage(TEXT, b"", (stream.streamId, stream.expected, True, error))
        self._publish(stream, end, closing=True)
        if tellSender:
            senderError = error if error is not None and error["name"] != "Aborted" else None
            self._send(streamClosed(stream.streamId, senderError))

    def _publish(self, stream, message, closing=False):
        """
        Publish C{message} to C{stream}'s group as the connection; a
        refusal closes the stream with that error.  C{False} if it was
        refused at once.
        """
        session = self.owner.session
        if session is None:
            return False
        try:
            d = session.sendToGroup(stream.group, message, stream.noEcho)
        except BrokerError as e:
            if not closing:
                self._close(stream, _error(e.name, e.message), tellSender=True)
            return False
        if not d.called or d.result is not None:
            d.addErrback(self._failed, stream, closing)
        return True

    def _failed(self, failure, stream, closing):
        if not failure.check(BrokerError):
            log.failure("group stream {sid}: publishing failed", failure, sid=stream.streamId)
            error = _error("InternalServerError", "internal error")
        else:
            error = _error(failure.value.name, failure.value.message)
        if not closing:
            self._close(stream, error, tellSender=True)
        return None

    # -- idle timeouts -------------------------------------------------------

    def _touch(self, stream):
        timer = stream.timer
        if timer is not None and timer.active():
            timer.reset(stream.idleTimeout)
        else:
            stream.timer = self.reactor.callLater(stream.idleTimeout, self._idle, stream)

    def _idle(self, stream):
        stream.timer = None
        if self.streams.get(stream.streamId) is stream:
            self._close(stream, _error(
                "IdleTimeout", f"nothing was received for {stream.idleTimeout:g}s"),
                tellSender=True)

    # -- answers -------------------------------------------------------------

    def _send(self, frame):
        """
        Send the sender C{frame} on its socket (a link's current one; none
        while it is away: the client learns what it missed from the acks
        that follow).
        """
        protocol = self.owner.protocol if self.isLink else self.owner
        if protocol is not None and protocol.session is not None \
                and protocol.state == protocol.STATE_OPEN:
            protocol.sendMessage(frame)
