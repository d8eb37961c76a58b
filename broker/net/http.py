# -*- test-case-name: tests.test_http_bounds -*-
"""
The bounded HTTP site every HTTP listener of the broker serves through.

twisted.web reads a whole request body before any resource sees it,
spooling one over 100 kB to a temporary file, and its only timeout is an
idle one that every received byte resets, so a client trickling its
request head holds a socket for ever.  L{BoundedSite} closes both:

  - Bodies.  As soon as a request head is in, the site looks up how large
    a body that method may send to that path (L{BoundedSite.bodyLimit}, a
    declarative route table, no body by default).  A method the route does
    not take is answered 405 with C{Allow}, a declared C{Content-Length}
    over the limit 413, at once, without reading the body; a chunked body
    is answered 413 as soon as the bytes received cross the limit.  After
    a refusal nothing more is parsed: the answer is written, the
    connection half-closed, and reset once the client has sent
    L{LINGER_BYTES} more bytes or after L{LINGER} seconds.  A body is only
    ever held in memory, never beyond its limit.
  - Header timeout.  A connection must deliver a complete request head
    within C{headerTimeout} seconds of connecting, or of the first byte of
    its next request; else it gets a 408 and is closed.
  - Idle timeout.  A keep-alive connection silent for C{idleTimeout}
    seconds between requests is closed (Twisted's own idle timer, counted
    here).  Neither timer runs while a request is being answered, nor
    after a WebSocket upgrade (the connection then belongs to autobahn).

Each face keeps its own error format: the site takes C{refusal(request,
status, reason, message) -> bytes}, which may set headers on C{request}.
Every refusal is counted on the listener's L{ListenerStats}.
"""

import json
import re
from io import BytesIO

from twisted.internet.interfaces import ISSLTransport
from twisted.python import log as legacyLog
from twisted.web import server
from twisted.web.http import (NO_BODY_CODES, RESPONSES, HTTPChannel,
                              _GenericHTTPChannelProtocol)

from broker.net.accesslog import AccessLog, combinedLine
from broker.net.bounds import (BODY_TOO_LARGE, HEADER_TIMEOUT, IDLE_TIMEOUT, LINGER,  # noqa: F401
                               LINGER_BYTES, METHOD_NOT_ALLOWED)
from broker.net.fasthttp import FastChannel, fastRoutes
from broker.net.listeners import ListenerStats

NO_BODY = {b"GET": 0, b"HEAD": 0}


class Routes:
    """
    How large a body each method may send to each path, declared as a list
    of C{(pattern, {method: maxBody})}, first match wins.  A pattern is a
    path (C{b"/api"}: that path and everything under it), a
    C{callable(path) -> bool}, or a compiled C{re} pattern of bytes matched
    against the whole path.  Methods are upper-case bytes.

    A matching route's other methods are refused with 405 when they carry
    a body; a path no route matches takes no body at all.
    """

    def __init__(self, routes=()):
        self.routes = []
        for pattern, methods in routes:
            methods = {m.upper(): n for m, n in methods.items()}
            if isinstance(pattern, bytes):
                base = pattern.rstrip(b"/")
                match = (lambda base: lambda path: path == base
                         or path.startswith(base + b"/"))(base)
            elif callable(pattern):
                match = pattern
            else:
                match = pattern.fullmatch
            self.routes.append((match, methods))

    def __call__(self, method, path):
        """
        @return: C{(maxBody, allow)}: C{allow} is C{None}, or the sorted
            methods the route takes when C{method} is not one of them.
        """
        for match, methods in self.routes:
            if match(path):
                if method in methods:
                    return methods[method], None
                return 0, sorted(methods)
        return 0, None


def plainRefusal(request, status, reason, message):
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return message.encode("utf-8") + b"\n"


class BoundedRequest(server.Request):
    """
    A request whose body is kept in memory and never beyond C{maxBody}
    bytes (set by L{BoundedChannel} from the route when the head is in).
    """

    maxBody = 0
    refused = False
    _received = 0

    def gotLength(self, length):
        # Never a temporary file: the channel refused anything over the
        # limit already, and the limit bounds what a chunked body may add.
        self.content = BytesIO()

    def handleContentChunk(self, data):
        if self.refused:
            return
        self._received += len(data)
        if self._received > self.maxBody:
            self.channel.refuse(self, 413, BODY_TOO_LARGE,
                                f"the request body is over {self.maxBody} bytes")
            return
        self.content.write(data)

    def write(self, data):
        # twisted.web answers a HEAD whose resource rendered nothing without
        # a Content-Length; clients on llhttp (aiohttp) then read the answer
        # as ending at the close and drop the connection.  Say 0, as the
        # lean path (fasthttp) does.
        if (not self.startedWriting and self.method == b"HEAD"
                and self.code not in NO_BODY_CODES
                and not self.responseHeaders.hasHeader(b"content-length")):
            self.setHeader(b"content-length", b"0")
        super().write(data)

    def requestReceived(self, command, path, version):
        # A refused request's end may still be in the buffer being parsed:
        # it is never processed.
        if not self.refused:
            super().requestReceived(command, path, version)


def _discard(*args):
    pass


class BoundedChannel(HTTPChannel):
    """
    An L{HTTPChannel} applying its site's body limits and timeouts.
    """

    _headerCall = None
    _lingerCall = None
    _awaitingHead = True
    _closing = False

    def connectionMade(self):
        super().connectionMade()
        self._startHeaderTimer()

    def dataReceived(self, data):
        if self._awaitingHead and self._headerCall is None and data:
            # The first byte of the next request on a kept-alive connection.
            self._startHeaderTimer()
        super().dataReceived(data)

    def _startHeaderTimer(self):
        timeout = self.site.headerTimeout
        if timeout and not self._closing:
            self._headerCall = self.callLater(timeout, self._headerTimedOut)

    def _cancelHeaderTimer(self):
        if self._headerCall is not None:
            if self._headerCall.active():
                self._headerCall.cancel()
            self._headerCall = None

    def allHeadersReceived(self):
        self._cancelHeaderTimer()
        self._awaitingHead = False
        request = self.requests[-1]
        method = self._command.upper()
        maxBody, allow = self.site.bodyLimit(method, self._path.split(b"?", 1)[0])
        request.maxBody = maxBody
        length = self.length
        hasBody = length is None or length > 0
        if hasBody and allow is not None:
            request.setHeader(b"allow", b", ".join(allow))
            self.refuse(request, 405, METHOD_NOT_ALLOWED,
                        f"{method.decode('latin-1')} is not allowed here; use "
                        f"{', '.join(m.decode('latin-1') for m in allow)}")
        elif hasBody and (length is None and maxBody == 0
                          or length is not None and length > maxBody):
            self.refuse(request, 413, BODY_TOO_LARGE,
                        f"the request body is over {maxBody} bytes" if maxBody
                        else "this resource takes no request body")
        else:
            super().allHeadersReceived()

    def refuse(self, request, status, reason, message):
        """
        Answer C{request} with C{status} (the site's refusal body) without
        reading any more of it, and close the connection.
        """
        request.refused = True
        site = self.site
        site.stats.refuse("http", reason)
        try:
            body = site.refusal(request, status, reason, message)
        except Exception:
            body = plainRefusal(request, status, reason, message)
        head = [b"HTTP/1.1 %d %s" % (status, RESPONSES.get(status, b"Refused"))]
        for name, values in request.responseHeaders.getAllRawHeaders():
            if name.lower() not in (b"content-length", b"connection"):
                head.extend(name + b": " + v for v in values)
        head.append(b"Content-Length: %d" % len(body))
        head.append(b"Connection: close")
        self._hangUp(b"\r\n".join(head) + b"\r\n\r\n" + body)

    def _headerTimedOut(self):
        self._headerCall = None
        self.site.stats.refuse("http", HEADER_TIMEOUT)
        self._hangUp(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n"
                     b"Connection: close\r\n\r\n")

    def timeoutConnection(self):
        # Twisted's idle timer; its own version logs a line per connection.
        self.site.stats.refuse("http", IDLE_TIMEOUT)
        self._hangUp(b"")

    def _hangUp(self, answer):
        """
        Write C{answer} and close; the rest of the request is never parsed.
        A plain connection is half-closed, so that a client still sending
        reads the answer (closing with its bytes unread would reset the
        connection and could lose the answer): what it sends meanwhile is
        dropped unparsed, up to L{LINGER_BYTES} bytes and L{LINGER}
        seconds, then the connection is reset.
        """
        if self._closing:
            return
        self._closing = True
        self._cancelHeaderTimer()
        self.setTimeout(None)
        self.lineReceived = self.rawDataReceived = _discard
        self.dataReceived = self._drop
        self._dropped = 0
        transport = self.transport
        if transport is None:
            return
        if answer:
            transport.write(answer)
        if ISSLTransport.providedBy(transport) or not hasattr(transport, "loseWriteConnection"):
            transport.loseConnection()
        else:
            transport.loseWriteConnection()
        self._lingerCall = self.callLater(LINGER, transport.abortConnection)

    def _drop(self, data):
        self._dropped += len(data)
        if self._dropped > LINGER_BYTES and self.transport is not None:
            self.transport.abortConnection()

    def _respondToBadRequestAndDisconnect(self):
        # A malformed end of a request already refused is not answered twice.
        if not self._closing:
            super()._respondToBadRequestAndDisconnect()

    def requestDone(self, request):
        # Set before the buffered next request (if any) is parsed.
        self._awaitingHead = True
        super().requestDone(request)
        if self._awaitingHead and self._headerCall is None and self._buffer \
                and self.persistent and not self._closing:
            self._startHeaderTimer()

    def connectionLost(self, reason):
        self._cancelHeaderTimer()
        if self._lingerCall is not None and self._lingerCall.active():
            self._lingerCall.cancel()
        self._lingerCall = None
        super().connectionLost(reason)


def _channel(factory):
    return _GenericHTTPChannelProtocol(BoundedChannel())


class BoundedSite(server.Site):
    """
    A L{server.Site} whose requests are bounded (see the module).

    @param bodyLimit: C{callable(method, path) -> (maxBody, allow)}, e.g.
        a L{Routes}; by default no path takes a body.
    @param refusal: C{callable(request, status, reason, message) -> bytes},
        the body of a 405 or 413 refusal in the face's error format.
    @param headerTimeout: seconds a request head may take; 0: no limit.
    @param idleTimeout: seconds a connection may sit silent between
        requests; C{None}: no limit.
    @param stats: the listener's L{ListenerStats}, where refusals count.
    @param fast: C{[(prefix, resource)]}: the paths (C{prefix} a tuple of
        decoded path segments, C{()} for all) whose plain requests are
        served by the lean path (L{broker.net.fasthttp}), the resource
        rendering them as twisted.web would; everything else, and every
        connection when C{fast} is empty, by twisted.web.
    """

    protocol = _channel
    requestFactory = BoundedRequest

    def __init__(self, resource, reactor=None, bodyLimit=None, refusal=plainRefusal,
                 headerTimeout=10.0, idleTimeout=60.0, stats=None, name="http", fast=(),
                 **kwargs):
        kwargs.setdefault("parsePOSTFormSubmission", False)
        kwargs.setdefault("logFormatter", combinedLine)
        super().__init__(resource, reactor=reactor, timeout=idleTimeout, **kwargs)
        self.bodyLimit = bodyLimit if bodyLimit is not None else Routes()
        self.refusal = refusal
        self.headerTimeout = headerTimeout
        self.stats = stats if stats is not None else ListenerStats(name, self.reactor)
        self.displayTracebacks = False
        self.accessLog = AccessLog(self.reactor)
        self.fastRoute = fastRoutes(fast) if fast else None

    def buildProtocol(self, addr):
        if self.fastRoute is not None:
            return FastChannel(self, addr)
        return super().buildProtocol(addr)

    def twistedChannel(self, addr):
        """
        The twisted.web channel a L{FastChannel} hands a connection to.
        """
        return super().buildProtocol(addr)

    def startFactory(self):
        super().startFactory()
        # Twisted's lines go to the broker's log batched (broker.net.accesslog);
        # a log file of the site's own (logPath) is written as Twisted does.
        if self._logFile is legacyLog.logfile:
            self._logFile = self.accessLog

    def stopFactory(self):
        # Twisted closes a log file that is not log.logfile: the AccessLog's
        # close flushes it.
        super().stopFactory()

    # Paths whose requests write no access-log line (the admin probes,
    # scraped every few seconds).
    quietPaths = frozenset()

    def log(self, request):
        if request.path in self.quietPaths:
            return
        super().log(request)


def jsonBody(obj):
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def pathPattern(regex):
    """
    A compiled bytes pattern for L{Routes}.
    """
    return re.compile(regex.encode("ascii") if isinstance(regex, str) else regex)
