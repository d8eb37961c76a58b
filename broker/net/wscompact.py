# -*- test-case-name: tests.test_wscompact -*-
"""
Idle WebSocket connections that cost little memory.

An open autobahn connection keeps about a hundred attributes in its
instance dictionary (3.3 KiB): copies of the factory's thirty-odd options,
and state flags that hold their initial value for the whole life of a quiet
connection.  A broker holding 100k idle subscribers pays that 100k times.

So:

  - L{CompactFactory} gives its protocol class the factory's options as
    class attributes (autobahn only copies an option onto a connection that
    does not already have it);
  - L{CompactProtocol.dataReceived} reads whole small data frames itself
    (L{broker.net.wsread}) and skips the debug-log arguments autobahn
    formats on every read; C{onMessageEnd} skips the event autobahn fires
    for observers nobody adds;
  - L{CompactProtocol.compact}, called once the connection is open, deletes
    every instance attribute that holds its class default: reads fall
    through to the class (same value), and a later write simply recreates
    the instance attribute.  It also swaps per-connection objects that an
    open, quiet connection never uses for shared or smaller ones.
"""

from types import FunctionType

from autobahn.websocket.protocol import TrafficStats

from broker.net import wsmask
from broker.net.wsread import canReadFast, readWholeFrames

_MISSING = object()

#: autobahn's per-connection state, at the value it keeps on a connection
#: that is open and quiet (autobahn 26.x's WebSocketProtocol._connectionMade
#: and the server handshake).  Each name becomes a class attribute of
#: L{CompactProtocol} with this value.
STATE_DEFAULTS = {
    "_perMessageCompress": None,
    "trackedTimings": None,
    "send_state": 0,
    "data": b"",
    "triggered": False,
    "wasMaxFramePayloadSizeExceeded": False,
    "wasMaxMessagePayloadSizeExceeded": False,
    "closedByMe": False,
    "failedByMe": False,
    "droppedByMe": False,
    "wasClean": False,
    "wasNotCleanReason": None,
    "wasServerConnectionDropTimeout": False,
    "wasOpenHandshakeTimeout": False,
    "wasCloseHandshakeTimeout": False,
    "wasServingFlashSocketPolicyFile": False,
    "localCloseCode": None,
    "localCloseReason": None,
    "remoteCloseCode": None,
    "remoteCloseReason": None,
    "openHandshakeTimeoutCall": None,
    "closeHandshakeTimeoutCall": None,
    "autoPingTimeoutCall": None,
    "autoPingPending": None,
    "autoPingPendingSeq": 0,
    "autoPingPendingSent": None,
    "http_request_data": None,
    "http_status_line": None,
    "http_headers": None,
    "http_request_uri": None,
    "http_request_path": None,
    "http_request_params": None,
    "http_request_host": None,
    "http_response_data": None,
    "websocket_version": 13,
    "websocket_origin": None,
    "websocket_extensions": None,
    "websocket_protocols": None,
    "websocket_protocol_in_use": None,
    "websocket_extensions_in_use": (),
    "inside_message": False,
    "current_frame": None,
    # txaio's ObservableMixin: no listeners, nothing to record.
    "_valid_events": None,
    "_results": None,
    "_wskey": None,
}

#: Handshake data nothing reads once the connection is open (the raw
#: request, the offered subprotocols, the client's key), cleared so that
#: L{CompactProtocol.compact} can drop them.
HANDSHAKE = ("http_request_data", "http_status_line", "http_headers", "http_request_uri",
             "http_request_path", "http_request_params", "http_request_host",
             "http_response_data", "websocket_origin", "websocket_extensions",
             "websocket_protocols", "_wskey")


class SendQueue(list):
    """
    autobahn's send queue (a C{deque}, 600 bytes even when empty) as a
    list: it is used only for chopped or synchronous sends, which the
    broker never makes, so it stays empty.
    """

    __slots__ = ()

    def popleft(self):
        return self.pop(0)

    def appendleft(self, item):
        self.insert(0, item)


def _same(value, default):
    return type(value) is type(default) and value == default


class CompactProtocol:
    """
    Mixin for an autobahn server protocol whose connections stay open and
    quiet for long: call L{compact} once it is open (from C{onOpen}).

    A subclass may list its own attributes and their class defaults in
    C{compactDefaults}.
    """

    compactDefaults = {}
    _transport_details = None

    def dataReceived(self, data):
        if canReadFast(self):
            data = readWholeFrames(self, data)
            if not data:
                return
        # autobahn's formats a debug log line's arguments (hltype, hlval)
        # on every read, logged or not.
        self._dataReceived(data)

    def onMessageEnd(self):
        """
        A whole message in: to C{onMessage}.  autobahn's own also fires its
        C{message} event for observers the broker never adds, a Deferred
        and a callback pair per message; with an observer it still does.
        """
        if self._listeners is not None:
            super().onMessageEnd()
            return
        if not self.failedByMe:
            data = self.message_data
            payload = data[0] if len(data) == 1 else b"".join(data)
            if self.trackedTimings:
                self.trackedTimings.track("onMessage")
            self._onMessage(payload, self.message_is_binary)
        self.message_data = None

    def compact(self):
        d = self.__dict__
        for name in HANDSHAKE:
            if name in d:
                d[name] = None
        if "_listeners" not in d:
            d.pop("_valid_events", None)
            d.pop("_results", None)
        queue = d.get("send_queue")
        if queue is not None and not queue and type(queue) is not SendQueue:
            d["send_queue"] = SendQueue()
        stats = getattr(self.factory, "sharedTrafficStats", None)
        if stats is not None and not self.trackTimings:
            # One object for every connection of the factory: nothing reads
            # the per-connection figures, autobahn only adds to them.
            d["trafficStats"] = stats
        if d.get("websocket_extensions_in_use") == []:
            d["websocket_extensions_in_use"] = ()
        if self.state == self.STATE_OPEN:
            # Read by autobahn's _onOpen, before onOpen, and not after.
            d.pop("_transport_details", None)
        cls = type(self)
        for defaults in (STATE_DEFAULTS, self.compactDefaults):
            for name, default in defaults.items():
                value = d.get(name, _MISSING)
                if value is not _MISSING and _same(value, default) \
                        and _same(getattr(cls, name, _MISSING), default):
                    del d[name]
        # A dictionary never shrinks its table: a fresh one fits the few
        # entries left (a third of the size).
        self.__dict__ = dict(d)


for _name, _value in STATE_DEFAULTS.items():
    setattr(CompactProtocol, _name, _value)
del _name, _value


class CompactFactory:
    """
    Mixin for an autobahn server factory: its protocol is a subclass of
    C{protocol} holding the factory's options as class attributes, rebuilt
    whenever they change, so connections do not each copy them.  Small
    client frames are unmasked without a C object each (L{wsmask}).
    """

    sharedTrafficStats = None

    def setProtocolOptions(self, *args, **kwargs):
        super().setProtocolOptions(*args, **kwargs)
        self._compactProtocol()

    def _compactProtocol(self):
        wsmask.install()
        base = self.protocol
        base = getattr(base, "_compactBase", base)
        options = {}
        for name in base.CONFIG_ATTRS:
            if hasattr(self, name):
                value = getattr(self, name)
                # A function as a class attribute would become a method.
                options[name] = staticmethod(value) if isinstance(value, FunctionType) else value
        options["_compactBase"] = base
        self.protocol = type(base.__name__, (base,), options)
        self.sharedTrafficStats = TrafficStats()
