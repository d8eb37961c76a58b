# -*- test-case-name: tests.test_peergroups -*-
"""
The two wires of C{peergroup.v1}, both thin: WebSocket text frames (for
browsers) and 4-byte big-endian length-prefixed UTF-8 JSON over TCP or TLS
(for devices).  Each decodes one JSON value per frame and hands it to a
L{PeerSession}; everything else is the session's business.
"""

import json
import os
import struct

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.web.resource import Resource
from zope.interface import implementer

from broker.core import jsonstrict
from broker.core.limits import ALLOW, CLOSE, PER_ADDRESS, InboundLimiter, peerHost
from broker.core.directwrite import DirectOutput, noDelay
from broker.net.wsframe import serverFrame
from broker.core.output import BoundedOutput
from broker.logs import peerAddress, refuseHandshake
from broker.net.http import NO_BODY, BoundedSite, Routes
from broker.net.wscompact import CompactFactory, CompactProtocol
from broker.peergroups.constants import PROTOCOL
from broker.peergroups.errors import PeerError
from broker.peergroups.interfaces import IPeerTransport
from broker.peergroups.session import PeerSession

log = Logger()

WS_PATH = "/peergroups/v1"


def _encode(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _writeBatch(protocol):
    core = protocol.factory.peergroups.core
    return core.writeBatch if core is not None else None


def _fit(protocol, obj):
    """
    C{obj} encoded, if it fits in C{max_message_size}.  An answer that does
    not is replaced by an C{E_MESSAGE_TOO_LARGE} error with its id (the
    peer's call fails instead of waiting for ever); anything else (an
    event) is dropped.  Both are logged (rate-limited) and counted.

    @return: the bytes to send, or C{None}.
    """
    data = _encode(obj)
    limit = protocol.factory.maxMessageSize
    if len(data) <= limit:
        return data
    pg = protocol.factory.peergroups
    answer = isinstance(obj, dict) and "id" in obj
    kind = "answer" if answer else "event"
    pg.counters.oversized[kind] += 1
    pg.quietLog.info((FACE, "oversized", kind),
                     "peer {addr}: {kind} of {n} bytes over max_message_size ({limit}): "
                     "{what}", addr=protocol.address, kind=kind, n=len(data), limit=limit,
                     what="answered E_MESSAGE_TOO_LARGE" if answer else "dropped")
    if not answer:
        return None
    return _encode({"id": obj["id"], "error": PeerError(
        "E_MESSAGE_TOO_LARGE", f"the answer is {len(data)} bytes, over "
        f"peergroups.max_message_size ({limit})").toJSON()})


def _address(transport):
    # The broker's one address format (host:port, [v6]:port): peers are
    # shown it too.
    return peerAddress(transport)


# Reasons to close after what was written (WebSocket close codes): the
# broker stopping, or starting again from its store.
GRACEFUL = {"broker shutting down": 1001, "store failure": 1011}


def _slowPeer(protocol):
    """
    Drop a peer (either transport) that let more than the output limit wait.
    """
    log.warn("peer {addr}: not reading, dropped", addr=protocol.address)
    protocol.factory.peergroups.counters.dropped["slow_consumer"] += 1
    protocol.abort("slow consumer")


FACE = "peergroups"
# A dropped frame is parsed for its id only up to this size.
ID_PEEK = 4096


class _Limited:
    """
    What both wires share of the face's limits: one slot of the source
    address while connected, and the session's inbound rate.  A frame over
    the rate is dropped, answered E_OUTOFMEMORY (when its id can be read
    cheaply), and reading pauses until the bucket has room (TCP holds the
    peer back); a peer that keeps exceeding is closed.
    """

    _address = None
    _rate = None
    _rateClosing = False

    @property
    def maxMessageSize(self):
        return self.factory.maxMessageSize

    def memoryReleaser(self):
        core = self.factory.peergroups.core
        return core.memory if core is not None else None

    def _takeAddress(self):
        """
        @return: whether the source address had a free slot.
        """
        pg = self.factory.peergroups
        host = peerHost(self.transport)
        if not pg.admission.acquire(PER_ADDRESS, host):
            pg.limits.refused(FACE, "", PER_ADDRESS)
            pg.quietLog.info((FACE, "admission", PER_ADDRESS),
                             "peer {addr}: refused: {limit} connections from this address",
                             addr=host, limit=pg.admission.limit(PER_ADDRESS, host))
            return False
        self._address = host
        messages, octets, burst = pg.inboundRate
        self._rate = InboundLimiter.build(pg.clock.seconds, messages, octets, burst,
                                          minBytes=self.factory.maxMessageSize)
        return True

    def _releaseAddress(self):
        if self._rate is not None:
            self._rate.stop()
        host, self._address = self._address, None
        if host is not None:
            self.factory.peergroups.admission.release(PER_ADDRESS, host)

    def _overRate(self, payload):
        """
        @return: true if C{payload} was dropped (the caller stops there).
        """
        rate = self._rate
        if rate is None:
            return False
        verdict = rate.check(len(payload))
        if verdict == ALLOW:
            return False
        if self._rateClosing:
            return True
        pg = self.factory.peergroups
        session = self.session
        hub = session.app.hub.name if session is not None and session.app is not None \
            and session.app.hub is not None else ""
        if verdict == CLOSE:
            self._rateClosing = True
            pg.limits.limited(FACE, hub, "closed")
            pg.quietLog.info((FACE, "rate", "closed"), "peer {addr}: closed: it keeps "
                             "sending over its inbound rate limit", addr=self.address)
            self.sendObject({"id": None, "error": PeerError(
                "E_OUTOFMEMORY", "inbound rate limit exceeded; closing").toJSON()})
            self._rateClose()
            return True
        pg.limits.limited(FACE, hub, "dropped")
        rid = None
        if len(payload) <= ID_PEEK:
            why, obj = _decode(payload)
            if why is None and isinstance(obj, dict):
                rid = obj.get("id")
                if isinstance(rid, bool) or not isinstance(rid, (int, str)) or \
                        (isinstance(rid, str) and len(rid) > 64):
                    rid = None
        self.sendObject({"id": rid, "error": PeerError(
            "E_OUTOFMEMORY", "over the session's inbound rate limit; the request was "
            "dropped").toJSON()})
        if self.transport is not None:
            rate.holdReading(pg.reactor, len(payload), self.transport.pauseProducing,
                             self._rateResume)
        return True

    def _rateResume(self):
        if self.transport is not None and self.session is not None:
            self.transport.resumeProducing()


def _decode(payload):
    """
    C{(None, value)} for one UTF-8 JSON value, else C{(why, None)}.
    """
    try:
        return None, jsonstrict.loads(payload)
    except jsonstrict.JSONError as e:
        return f"a frame must be one strict JSON value: {e}", None


@implementer(IPeerTransport)
class PeerWebSocketProtocol(_Limited, DirectOutput, BoundedOutput, CompactProtocol,
                            WebSocketServerProtocol):
    """
    A peer over WebSocket with subprotocol C{peergroup.v1} on
    C{/peergroups/v1}.
    """

    session = None
    address = "?"

    def connectionMade(self):
        self.factory.peergroups.connections.add(self)
        super().connectionMade()

    def onConnect(self, request):
        if request.path.rstrip("/") != WS_PATH:
            raise ConnectionDeny(404, f"no such endpoint; use {WS_PATH}")
        if PROTOCOL not in request.protocols:
            raise ConnectionDeny(400, f"the {PROTOCOL} subprotocol is required")
        if not self._takeAddress():
            raise ConnectionDeny(429, "Too Many Requests: per address connection limit reached")
        self.address = _address(self.transport)
        return PROTOCOL

    def failHandshake(self, reason, code=400, responseHeaders=None):
        """
        A refused handshake: counted on /metrics, logged at most once a
        minute per source address (broker/logs.py).
        """
        core = self.factory.peergroups.core
        refuseHandshake(self, "peergroups", core.refusals if core is not None else None,
                        reason, code, responseHeaders)

    def onOpen(self):
        # An idle peer keeps little of its own (broker.net.wscompact).
        self.compact()
        self.address = _address(self.transport)
        self.registerAsProducer(self.transport)
        self.session = PeerSession(self.factory.peergroups, self)
        self.session.hello()

    def onMessage(self, payload, isBinary):
        if self.session is None or self._overRate(payload):
            return
        why, obj = ("text frames only", None) if isBinary else _decode(payload)
        if why is not None:
            self.session._badFrame(None, why)
            return
        self.session.received(obj)

    def onClose(self, wasClean, code, reason):
        session, self.session = self.session, None
        if session is not None:
            session.lost(f"closed ({code})")

    def connectionLost(self, reason):
        self.factory.peergroups.connections.discard(self)
        super().connectionLost(reason)
        self._releaseAddress()

    def _rateClose(self):
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(1008, b"inbound rate limit exceeded", isReply=False)

    def sendObject(self, obj):
        if self.state != self.STATE_OPEN:
            return
        data = _fit(self, obj)
        if data is None or self.overLimit(len(data), self.factory.peergroups.maxOutputBuffer):
            return
        if self._perMessageCompress is None and not self.send_queue:
            # Straight to the socket (directwrite), past autobahn's logging.
            self.writeDirect(serverFrame(data))
        else:
            self.sendMessage(data, False)

    def sendData(self, data, sync=False, chopsize=None):
        # Every other frame (pongs, close) after what was kept this turn.
        self.flushOutput()
        super().sendData(data, sync, chopsize)

    def writeBatch(self):
        return _writeBatch(self)

    def slowConsumer(self):
        _slowPeer(self)

    def abort(self, reason):
        if self.transport is not None:
            code = GRACEFUL.get(reason)
            if code is not None and self.state == self.STATE_OPEN:
                self.sendCloseFrame(code, reason.encode(), isReply=False)
            else:
                self.transport.abortConnection()


class PeerWebSocketFactory(CompactFactory, WebSocketServerFactory):
    protocol = PeerWebSocketProtocol

    def __init__(self, peergroups, maxMessageSize, reactor=None):
        super().__init__(reactor=reactor)
        self.peergroups = peergroups
        self.maxMessageSize = maxMessageSize
        self.setProtocolOptions(
            maxFramePayloadSize=maxMessageSize, maxMessagePayloadSize=maxMessageSize,
            openHandshakeTimeout=10, closeHandshakeTimeout=5, failByDrop=False,
            autoPingInterval=0)


class BrowserClient(Resource):
    """
    C{/peergroups/<file>}: the browser peer library (C{peergroup.js} and
    the ES modules it imports) and the browser demo (C{demo.html}), so a
    page can import it from the broker it talks to.  Any origin may load
    them: they hold no secret.  The files are read once, at start.
    """

    isLeaf = True
    directory = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
    TYPES = {".js": b"text/javascript; charset=utf-8", ".html": b"text/html; charset=utf-8"}

    def __init__(self, name="peergroup.js"):
        super().__init__()
        self.path = os.path.join(self.directory, name)
        self.contentType = self.TYPES[os.path.splitext(name)[1]]
        with open(self.path, "rb") as f:
            self.body = f.read()

    @classmethod
    def files(cls):
        """
        @return: the names of the files served (those of C{web/}).
        """
        return sorted(n for n in os.listdir(cls.directory)
                      if os.path.splitext(n)[1] in cls.TYPES)

    def render_GET(self, request):
        request.setHeader(b"content-type", self.contentType)
        request.setHeader(b"access-control-allow-origin", b"*")
        request.setHeader(b"cache-control", b"max-age=3600")
        return self.body


def makeSite(factory, headerTimeout=10.0, idleTimeout=60.0, stats=None):
    """
    A site with the peer WebSocket at C{/peergroups/v1}, the browser
    library at C{/peergroups/peergroup.js} (with its modules) and the
    browser demo at C{/peergroups/demo.html}; no path takes a request body.

    @param stats: the listener's L{broker.net.listeners.ListenerStats}.
    """
    root = Resource()
    pg = Resource()
    root.putChild(b"peergroups", pg)
    pg.putChild(b"v1", WebSocketResource(factory))
    for name in BrowserClient.files():
        pg.putChild(name.encode("ascii"), BrowserClient(name))
    routes = Routes([(WS_PATH.encode("ascii"), {b"GET": 0})] +
                    [(b"/peergroups/" + name.encode("ascii"), NO_BODY)
                     for name in BrowserClient.files()])
    return BoundedSite(root, reactor=factory.reactor, bodyLimit=routes,
                       headerTimeout=headerTimeout, idleTimeout=idleTimeout, stats=stats,
                       name="peergroups.listen")


@implementer(IPeerTransport)
class PeerStreamProtocol(_Limited, DirectOutput, BoundedOutput, Int32StringReceiver):
    """
    A peer over TCP or TLS: each message a 4-byte big-endian length, then
    that many bytes of UTF-8 JSON.  A length over the limit is answered
    with an error and the connection is closed (the stream cannot be
    resynchronised).
    """

    session = None
    address = "?"

    def connectionMade(self):
        self.factory.peergroups.connections.add(self)
        noDelay(self.transport)
        self.MAX_LENGTH = self.factory.maxMessageSize
        self.address = _address(self.transport)
        if not self._takeAddress():
            self.sendObject({"id": None, "error": PeerError(
                "PEER_E_CONNECTION_REFUSED",
                "too many connections from this address (limit)").toJSON()})
            self.loseConnection()
            return
        self.registerAsProducer(self.transport)
        self.session = PeerSession(self.factory.peergroups, self)
        self.session.hello()

    def stringReceived(self, payload):
        if self.session is None or self._overRate(payload):
            return
        why, obj = _decode(payload)
        if why is not None:
            self.session._badFrame(None, why)
            return
        self.session.received(obj)

    def lengthLimitExceeded(self, length):
        log.info("peer {addr}: message of {n} bytes over the limit, closed",
                 addr=self.address, n=length)
        self.sendObject({"id": None, "error": PeerError(
            "E_INVALIDARG", f"message of {length} bytes over {self.MAX_LENGTH}").toJSON()})
        self.loseConnection()
        self.session, session = None, self.session
        if session is not None:
            session.lost("oversized message")

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.factory.peergroups.connections.discard(self)
        self._releaseAddress()
        session, self.session = self.session, None
        if session is not None:
            session.lost("connection lost")

    def _rateClose(self):
        self.loseConnection()
        session, self.session = self.session, None
        if session is not None:
            session.lost("inbound rate limit exceeded")

    def sendObject(self, obj):
        data = _fit(self, obj)
        if data is None or self.overLimit(len(data) + 4, self.factory.peergroups.maxOutputBuffer):
            return
        self.writeDirect(struct.pack(self.structFormat, len(data)) + data)

    def writeBatch(self):
        return _writeBatch(self)

    def loseConnection(self):
        """
        Close once what was kept this turn has been written.
        """
        self.flushOutput()
        self.transport.loseConnection()

    def slowConsumer(self):
        _slowPeer(self)

    def abort(self, reason):
        if self.transport is not None:
            if reason in GRACEFUL:
                self.loseConnection()
            else:
                self.transport.abortConnection()


class PeerStreamFactory(Factory):
    protocol = PeerStreamProtocol

    def __init__(self, peergroups, maxMessageSize):
        self.peergroups = peergroups
        self.maxMessageSize = maxMessageSize
