# -*- test-case-name: tests.test_fasthttp -*-
"""
A lean HTTP/1.1 request path for the APIs' plain requests.

Profiled under keep-alive load, twisted.web's request machinery (the
line-by-line head parser, L{twisted.web.http_headers.Headers}, resource
traversal, chunked answers, the per-request objects) was over half of the
broker's CPU for a REST send or an IoT held request: more than the
routing, the token check and the device round trip together.  A
L{BoundedSite} given C{fast} routes serves its connections with
L{FastChannel}, which answers the plain requests those routes take itself
and hands anything else to twisted.web:

  - Plain means: a complete head in one piece of at most L{MAX_HEAD}
    bytes, C{HTTP/1.1}, CRLF line ends, token header names, no
    C{Transfer-Encoding}, C{Expect} or C{Upgrade}, at most one
    C{Content-Length}, a body the route takes (method and size, from the
    site's C{bodyLimit}) and a path under a fast route.
  - Anything else (a WebSocket upgrade, a chunked body, a body over its
    limit or on a method the route refuses, a malformed head, HTTP/1.0)
    is handed over, with every byte received since the last answer, to
    the site's ordinary L{broker.net.http.BoundedChannel}, which then
    serves the connection for the rest of its life: its refusals,
    limits and errors are exactly twisted.web's and L{BoundedSite}'s.

The bounds hold on the lean path too: a head must be complete within the
site's C{headerTimeout} (408 and close, counted), a connection silent for
C{timeOut} between requests is closed (counted), a body is read only up
to the C{Content-Length} the route allows, and while a request is being
answered at most L{MAX_PIPELINED} bytes of what follows are read before
the connection is paused.

L{FastRequest} offers the part of twisted.web's request the broker's API
resources use (C{render(request)} returning bytes or C{NOT_DONE_YET},
C{setHeader}, C{write}, C{finish}, C{notifyFinish}...).  Its answer is one
write: the head built from a list, the body with a C{Content-Length}.
"""

from io import BytesIO
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.http import RESPONSES, datetimeToString, parse_qs
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET, version as SERVER_VERSION

from broker.core.directwrite import sendNow, socketTransport
from broker.net.bounds import HEADER_TIMEOUT, IDLE_TIMEOUT, LINGER, LINGER_BYTES

log = Logger()

# The largest request head served here; a longer one goes to twisted.web.
MAX_HEAD = 16384
# Bytes read ahead (pipelined requests) while a request is answered.
MAX_PIPELINED = 16384

_NO_BODY_CODES = (204, 304)
_CRLF = b"\r\n"
_HEAD_END = b"\r\n\r\n"
# Request headers that send a request to twisted.web.
_HANDED_OVER = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"http2-settings"))
_CANONICAL = {}
# Header names as sent -> lower case, for names already found to be tokens.
_NAMES = {}
# Header lines already parsed (a client sends the same Host, Authorization,
# Content-Type on every request) -> (lower-case name, value); short lines
# only, at most 1024 of them (under half a MiB).
_LINES = {}
_LINE_KEPT = 256


_STATUS_LINES = {}


def _statusLine(code):
    """
    C{HTTP/1.1 200 OK\r\nServer: ...\r\nDate: }, built once per status.
    """
    line = _STATUS_LINES.get(code)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\nServer: %s\r\nDate: " % (
            code, RESPONSES.get(code, b"Unknown Status"), SERVER_VERSION)
        if len(_STATUS_LINES) < 1024:
            _STATUS_LINES[code] = line
    return line


def _canonical(name):
    """
    C{content-type} -> C{Content-Type}, as twisted.web writes header names.
    """
    canonical = _CANONICAL.get(name)
    if canonical is None:
        canonical = b"-".join(p.capitalize() for p in name.split(b"-"))
        if len(_CANONICAL) < 1024:
            _CANONICAL[name] = canonical
    return canonical


class FastRequest:
    """
    One request on the lean path: what the API resources read and call.

    @ivar postpath: the path's segments (percent-decoded) after the fast
        route's prefix, as twisted.web's traversal would leave them.
    """

    code = 200
    finished = False
    _disconnected = False
    startedWriting = False
    sentLength = 0
    clientproto = b"HTTP/1.1"
    defaultContentType = b"text/html"

    def __init__(self, channel, method, uri, headers, body, prepath, postpath):
        self.channel = channel
        self.method = method
        self.uri = uri
        self.path = uri.split(b"?", 1)[0]
        self._requestHeaders = headers
        self.content = BytesIO(body)
        self.prepath = prepath
        self.postpath = postpath
        self._headers = {}
        self._body = []
        self._notify = None

    @property
    def args(self):
        args = self.__dict__.get("_args")
        if args is None:
            parts = self.uri.split(b"?", 1)
            args = parse_qs(parts[1], 1) if len(parts) > 1 else {}
            self._args = args
        return args

    # -- reading ------------------------------------------------------------

    def getHeader(self, name):
        if isinstance(name, str):
            value = self._requestHeaders.get(name.lower().encode("latin-1"))
            return None if value is None else value.decode("latin-1")
        return self._requestHeaders.get(name.lower())

    def getAllHeaders(self):
        return dict(self._requestHeaders)

    def isSecure(self):
        return self.channel.secure

    def getClientAddress(self):
        return self.channel.transport.getPeer()

    def getHost(self):
        return self.channel.transport.getHost()

    # -- answering ----------------------------------------------------------

    def setResponseCode(self, code, message=None):
        self.code = code

    def setHeader(self, name, value):
        if type(name) is bytes and type(value) is bytes:
            self._headers[name.lower()] = value
            return
        if isinstance(name, str):
            name = name.encode("latin-1")
        if isinstance(value, str):
            value = value.encode("latin-1")
        self._headers[name.lower()] = value

    @property
    def responseHeaders(self):
        # A copy, for code written against twisted.web (set with setHeader).
        return Headers({k: [v] for k, v in self._headers.items()})

    def write(self, data):
        if self.finished or self._disconnected:
            return
        self.startedWriting = True
        if data:
            self._body.append(data)

    def finish(self):
        """
        Send the answer (once; never after the connection was lost).
        """
        if self.finished or self._disconnected:
            return
        self.finished = True
        self.channel._answer(self)
        notify, self._notify = self._notify, None
        if notify:
            for d in notify:
                if isinstance(d, Deferred):
                    d.callback(None)

    def notifyFinish(self):
        d = Deferred()
        if self.finished:
            d.callback(None)
        elif self._disconnected:
            d.errback(self._lostReason)
        else:
            if self._notify is None:
                self._notify = []
            self._notify.append(d)
        return d

    def notifyLost(self, f):
        """
        Call C{f(reason)} if the connection is lost before the answer is
        sent (at once if it already was): what C{notifyFinish().addErrback(f)}
        does, without a Deferred per request.
        """
        if self.finished:
            return
        if self._disconnected:
            f(self._lostReason)
            return
        if self._notify is None:
            self._notify = []
        self._notify.append(f)

    def _connectionLost(self, reason):
        self._disconnected = True
        self._lostReason = reason
        notify, self._notify = self._notify, None
        if notify:
            for d in notify:
                if isinstance(d, Deferred):
                    d.errback(reason)
                else:
                    d(reason)


class FastChannel(Protocol):
    """
    A connection of a L{BoundedSite} with C{fast} routes (see the module).

    @ivar current: the request being answered, or C{None}.
    """

    current = None
    secure = False
    _serving = False
    _closing = False
    _paused = False
    _handedOver = None
    _headerCall = None
    _idleCall = None
    _lingerCall = None
    _dateSecond = None
    _date = b""
    _socketTransport = None

    def __init__(self, site, addr):
        self.site = site
        self.addr = addr
        self.reactor = site.reactor
        self._buffer = b""

    # -- connection ---------------------------------------------------------

    def connectionMade(self):
        self.secure = ISSLTransport.providedBy(self.transport)
        # The TCP transport under the listener's counting wrapper (None for
        # TLS): an answer goes straight to its socket when nothing is queued.
        self._socketTransport = socketTransport(self.transport)
        self._lastData = self.reactor.seconds()
        self._startHeaderTimer()
        if self.site.timeOut:
            self._idleCall = self.reactor.callLater(self.site.timeOut, self._idleCheck)

    def dataReceived(self, data):
        self._lastData = self.reactor.seconds()
        if self._buffer:
            self._buffer += data
        else:
            self._buffer = data
        if self.current is not None:
            if len(self._buffer) > MAX_PIPELINED and not self._paused:
                self._paused = True
                self.transport.pauseProducing()
            return
        self._serve()

    def connectionLost(self, reason):
        self._cancelTimers()
        if self._lingerCall is not None and self._lingerCall.active():
            self._lingerCall.cancel()
        self._lingerCall = None
        request, self.current = self.current, None
        if request is not None and not request.finished:
            request._connectionLost(reason)

    # -- requests -----------------------------------------------------------

    def _serve(self):
        """
        Answer every complete plain request in the buffer, in order.
        """
        self._serving = True
        try:
            self._serveAll()
        finally:
            self._serving = False

    def _serveAll(self):
        while self.current is None and self._buffer and not self._closing:
            buffer = self._buffer
            end = buffer.find(_HEAD_END)
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self._handOver()
                elif self._headerCall is None:
                    # A request head has begun.
                    self._startHeaderTimer()
                return
            parsed = self._parseHead(buffer, end)
            if parsed is None:
                self._handOver()
                return
            method, uri, headers, length, resource, prepath, postpath, close = parsed
            need = end + 4 + length
            self._cancelHeaderTimer()
            if len(buffer) < need:
                # The rest of the body is on its way (the idle timer runs).
                return
            body = buffer[end + 4:need]
            self._buffer = buffer[need:]
            request = FastRequest(self, method, uri, headers, body, prepath, postpath)
            request._close = close
            self.current = request
            self._render(resource, request)

    def _parseHead(self, buffer, end):
        """
        @return: C{(method, uri, headers, length, resource, prepath,
            postpath, close)} for a plain request this path serves, else
            C{None} (twisted.web takes it).
        """
        if end > MAX_HEAD:
            return None
        head = buffer[:end]
        lines = head.split(_CRLF)
        # Every CR and LF is part of a CRLF line end.
        ends = len(lines) - 1
        if head.count(b"\n") != ends or head.count(b"\r") != ends:
            return None
        requestLine = lines[0].split(b" ")
        if len(requestLine) != 3 or requestLine[2] != b"HTTP/1.1":
            return None
        method, uri = requestLine[0], requestLine[1]
        if not method.isalpha() or not method.isupper() or uri[:1] != b"/":
            return None
        headers = {}
        length = None
        close = False
        names = _NAMES
        known = _LINES
        for line in lines[1:]:
            parsed = known.get(line)
            if parsed is not None:
                name, value = parsed
            else:
                raw, sep, value = line.partition(b":")
                if not sep:
                    return None
                name = names.get(raw)
                if name is None:
                    if not raw.replace(b"-", b"").isalnum():
                        return None
                    name = raw.lower()
                    if len(names) < 1024:
                        names[raw] = name
                value = value.strip(b" \t")
                if len(line) <= _LINE_KEPT and len(known) < 1024:
                    known[line] = (name, value)
            if name in _HANDED_OVER:
                return None
            if name == b"content-length":
                if length is not None or not value.isdigit():
                    return None
                length = int(value)
            elif name == b"connection":
                tokens = [t.strip() for t in value.lower().split(b",")]
                if b"upgrade" in tokens:
                    return None
                close = b"close" in tokens
            headers[name] = value
        length = length or 0
        path = uri.split(b"?", 1)[0]
        site = self.site
        maxBody, allow = site.bodyLimit(method, path)
        if length and (allow is not None or length > maxBody):
            return None
        found = site.fastRoute(path)
        if found is None:
            return None
        resource, prepath, postpath = found
        return method, uri, headers, length, resource, prepath, postpath, close

    def _render(self, resource, request):
        try:
            body = resource.render(request)
        except Exception:
            log.failure("{method} {uri} failed", method=request.method, uri=request.uri)
            request._headers.clear()
            request._body = []
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            body = b"internal error\n"
        if body is NOT_DONE_YET:
            return
        if not request.finished and not request._disconnected:
            request.write(body)
            request.finish()

    def _answer(self, request):
        """
        Write C{request}'s answer in one piece, then go on with the next
        request (or close, when either side asked for it).
        """
        code = request.code
        headers = request._headers
        body = b"".join(request._body)
        noBody = code in _NO_BODY_CODES or request.method == b"HEAD"
        if not noBody:
            if body and b"content-type" not in headers:
                headers[b"content-type"] = request.defaultContentType
            headers[b"content-length"] = b"%d" % len(body)
        elif code not in _NO_BODY_CODES and b"content-length" not in headers:
            # The length a GET would have had, 0 for the REST API's
            # HEAD-only queries (as Azure answers them): without it,
            # aiohttp reads the answer as delimited by the connection's
            # close and opens a new connection for the next request.
            headers[b"content-length"] = b"%d" % len(body)
        close = request._close or headers.get(b"connection", b"").lower() == b"close"
        if close:
            headers[b"connection"] = b"close"
        now = self.reactor.seconds()
        second = int(now)
        if second != self._dateSecond:
            self._dateSecond = second
            self._date = datetimeToString(now)
        head = [_statusLine(code), self._date]
        canonical = _CANONICAL
        for name, value in headers.items():
            head.append(b"\r\n")
            head.append(canonical.get(name) or _canonical(name))
            head.append(b": ")
            head.append(value)
        head.append(b"\r\n\r\n")
        if noBody:
            body = b""
        request.sentLength = len(body)
        if body:
            head.append(body)
        self._write(b"".join(head))
        self.site.log(request)
        self.current = None
        self._lastData = now
        if close:
            self._closing = True
            self._cancelTimers()
            self.transport.loseConnection()
            return
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        if self._buffer and not self._serving:
            # Answered from a later reactor turn (a held request): go on
            # with what was pipelined behind it.
            self._serve()

    def _write(self, data):
        """
        Write C{data} straight to the socket when nothing is queued before
        it (L{broker.core.directwrite.sendNow}): the answer leaves now, not
        on the reactor's next turn; what the socket does not take goes
        through Twisted's buffered write, in order.
        """
        sendNow(self.transport, self._socketTransport, data)

    # -- handing over to twisted.web ---------------------------------------

    def _handOver(self):
        """
        Let the site's twisted.web channel serve this connection from the
        request at the start of the buffer on.
        """
        self._cancelTimers()
        channel = self.site.twistedChannel(self.addr)
        self._handedOver = channel
        self.dataReceived = channel.dataReceived
        self.connectionLost = channel.connectionLost
        channel.makeConnection(self.transport)
        data, self._buffer = self._buffer, b""
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        if data:
            channel.dataReceived(data)

    # -- timers -------------------------------------------------------------

    def _startHeaderTimer(self):
        timeout = self.site.headerTimeout
        if timeout and not self._closing:
            self._headerCall = self.reactor.callLater(timeout, self._headerTimedOut)

    def _cancelHeaderTimer(self):
        if self._headerCall is not None:
            if self._headerCall.active():
                self._headerCall.cancel()
            self._headerCall = None

    def _cancelTimers(self):
        self._cancelHeaderTimer()
        if self._idleCall is not None:
            if self._idleCall.active():
                self._idleCall.cancel()
            self._idleCall = None

    def _headerTimedOut(self):
        self._headerCall = None
        self.site.stats.refuse("http", HEADER_TIMEOUT)
        self._hangUp(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n"
                     b"Connection: close\r\n\r\n")

    def _idleCheck(self):
        """
        The idle timer, lazily: it re-arms itself for what is left of
        C{timeOut} since the last byte, and never fires while a request is
        being answered.
        """
        self._idleCall = None
        timeout = self.site.timeOut
        now = self.reactor.seconds()
        left = self._lastData + timeout - now
        if self.current is not None:
            left = timeout
        if left > 0:
            self._idleCall = self.reactor.callLater(left, self._idleCheck)
            return
        self.site.stats.refuse("http", IDLE_TIMEOUT)
        self._hangUp(b"")

    def _hangUp(self, answer):
        """
        Write C{answer} and close, as L{BoundedChannel._hangUp} does: half
        closed, what the client still sends dropped unread up to
        C{LINGER_BYTES} bytes and C{LINGER} seconds, then reset.
        """
        if self._closing:
            return
        self._closing = True
        self._cancelTimers()
        self._buffer = b""
        self.dataReceived = self._drop
        self._dropped = 0
        transport = self.transport
        if answer:
            transport.write(answer)
        if self.secure or not hasattr(transport, "loseWriteConnection"):
            transport.loseConnection()
        else:
            transport.loseWriteConnection()
        self._lingerCall = self.reactor.callLater(LINGER, transport.abortConnection)

    def _drop(self, data):
        self._dropped += len(data)
        if self._dropped > LINGER_BYTES:
            self.transport.abortConnection()


def fastRoutes(routes):
    """
    The C{fastRoute(path)} of a L{BoundedSite}: C{routes} is a list of
    C{(prefix, resource)}, C{prefix} a tuple of path segments (bytes, as
    decoded), C{()} for every path.

    @return: C{callable(path) -> (resource, prepath, postpath) or None}.
    """
    routes = [(list(prefix), len(prefix), resource) for prefix, resource in routes]

    def fastRoute(path):
        segments = path[1:].split(b"/")
        if b"%" in path:
            segments = [unquote_to_bytes(s) for s in segments]
        for prefix, n, resource in routes:
            if segments[:n] == prefix:
                return resource, segments[:n], segments[n:]
        return None
    return fastRoute

