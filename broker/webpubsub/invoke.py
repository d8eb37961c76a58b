# -*- test-case-name: tests.test_webpubsub_invoke -*-
"""
Client invocations of upstream events (C{WebPubSubClient.invokeEvent}):
the request-response form of a custom event.

The client sends::

    {"type": "invoke", "invocationId": "<id>", "target": "event",
     "event": "<name>", "dataType": "text", "data": "..."}

The event goes to the hub's event handler as a user event (the same
CloudEvents request a C{type: event} frame makes) and the handler's answer
comes back as::

    {"type": "invokeResponse", "invocationId": "<id>", "success": true,
     "dataType": "text", "data": "..."}

or, when it fails, with C{"success": false} and an C{error} of C{name} and
C{message}: C{NotFound} (no event handler takes that event), C{Timeout}
(the handler did not answer within C{event_timeout}), C{BadRequest} (an
invalid invoke frame, or an invocationId already pending), or
C{InternalServerError} (the handler failed, answered an error status or
invalid JSON, or is not validated).  C{{"type": "cancelInvocation",
"invocationId": "<id>"}} abandons a pending invocation: its request to the
handler is cancelled and no answer is sent.

Invocations share the connection's bound on events in flight
(C{max_events_in_flight}, L{broker.webpubsub.protocol.ClientProtocol._sendEvent}).
"""

from twisted.internet import defer
from twisted.python.failure import Failure

from broker.core.errors import BadRequest, BrokerError, NotFound
from broker.core.session import NoUpstream
from broker.core.message import Message
from broker.webpubsub import frames

INVOKE = "invoke"
CANCEL = "cancelInvocation"
KINDS = (INVOKE, CANCEL)
MAX_INVOCATION_ID = 1024


class Invocation:
    """
    A parsed C{invoke} or C{cancelInvocation} frame, shaped as
    L{frames.Request} for the protocol (no ackId).
    """

    ackId = None

    def __init__(self, type, invocationId, event=None, message=None):
        self.type = type
        self.invocationId = invocationId
        self.event = event
        self.message = message


class InvalidInvocation(frames.InvalidRequest):
    """
    An invalid C{invoke} frame; answered with an C{invokeResponse} when its
    C{invocationId} could be read.
    """

    def __init__(self, message, invocationId=None):
        super().__init__(message)
        self.invocationId = invocationId


def parse(kind, obj):
    """
    Parse an C{invoke} or C{cancelInvocation} frame (a JSON object).

    @raise InvalidInvocation: when it is not a valid one.
    """
    invocationId = obj.get("invocationId")
    if not isinstance(invocationId, str) or not invocationId \
            or len(invocationId) > MAX_INVOCATION_ID:
        raise InvalidInvocation(
            f"invocationId must be a non-empty string of at most {MAX_INVOCATION_ID} "
            f"characters")
    if kind == CANCEL:
        return Invocation(CANCEL, invocationId)
    target = obj.get("target", "event")
    if target != "event":
        raise InvalidInvocation("target must be 'event' (the only invocation target)",
                                invocationId)
    event = obj.get("event")
    if not isinstance(event, str) or not event:
        raise InvalidInvocation("event must be a non-empty string", invocationId)
    if obj.get("data") is None:
        message = Message.text("")
    else:
        try:
            message = Message.fromJSONField(obj.get("dataType", "json"), obj["data"])
        except BadRequest as e:
            raise InvalidInvocation(e.message, invocationId)
    return Invocation(INVOKE, invocationId, event, message)


def response(invocationId, reply=None, error=None):
    """
    An C{invokeResponse} frame: the handler's C{reply} (a L{Message} or
    C{None}), or C{error} (a L{BrokerError}).
    """
    if error is not None:
        return frames._s({"type": "invokeResponse", "invocationId": invocationId,
                          "success": False,
                          "error": {"name": error.name, "message": error.message}})
    head = b'{"type":"invokeResponse","invocationId":' + frames._s(invocationId) \
        + b',"success":true'
    if reply is None:
        return head + b"}"
    return (head + b',"dataType":"' + reply.dataType.encode("ascii") + b'","data":'
            + reply.jsonField() + b"}")


frames.EXTENSIONS.update({INVOKE: parse, CANCEL: parse})


class Invocations:
    """
    The pending invocations of one client connection.

    @param protocol: the L{broker.webpubsub.protocol.ClientProtocol}.
    """

    def __init__(self, protocol):
        self.protocol = protocol
        self.pending = {}
        # Cancelled by the client: whatever they end with is not answered.
        self._abandoned = set()

    def received(self, request):
        if request.type == CANCEL:
            d = self.pending.pop(request.invocationId, None)
            if d is not None:
                self._abandoned.add(d)
                d.cancel()
            return
        invocationId = request.invocationId
        if invocationId in self.pending:
            self._answer(response(invocationId, error=BadRequest(
                f"invocationId {invocationId} is already pending")))
            return
        protocol = self.protocol
        d = protocol._sendEvent(protocol.session, request.event, request.message)
        self.pending[invocationId] = d
        d.addBoth(self._done, invocationId, d)

    def invalid(self, error):
        """
        Answer an invalid C{invoke} frame whose id could be read.
        """
        if error.invocationId is not None:
            self._answer(response(error.invocationId, error=error))

    def _done(self, result, invocationId, d):
        if self.pending.get(invocationId) is d:
            del self.pending[invocationId]
        if d in self._abandoned:
            self._abandoned.discard(d)
            return None
        if isinstance(result, Failure):
            if result.check(defer.CancelledError):
                return None  # the client cancelled it (or went away)
            if result.check(NoUpstream):
                error = NotFound(result.value.message)
            elif result.check(BrokerError):
                error = result.value
            else:
                self.protocol._warnOnce(f"invocation failed: {result.getErrorMessage()}")
                error = BrokerError("internal error")
            self._answer(response(invocationId, error=error))
            return None
        self._answer(response(invocationId, reply=result))
        return None

    def _answer(self, frame):
        protocol = self.protocol
        if protocol.session is not None and protocol.state == protocol.STATE_OPEN:
            protocol.sendMessage(frame)

    def cancelAll(self):
        """
        The connection went: abandon every pending invocation.
        """
        pending, self.pending = self.pending, {}
        for d in pending.values():
            self._abandoned.add(d)
            d.cancel()
