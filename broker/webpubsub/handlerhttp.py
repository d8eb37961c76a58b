# -*- test-case-name: tests.test_webpubsub_handlerhttp -*-
"""
The HTTP client the broker talks to event handlers with.

Event handlers are whatever web server the application runs: Express or
ASP.NET Core answering HTTP/1.1 with keep-alive, but also Python's
C{http.server}, which answers HTTP/1.0 by default and closes the connection
after each answer even when it sends a C{Content-Length}.  Twisted's
client keeps such a connection in its pool (it only looks for
C{Connection: close}), so the next request, sent at once, goes down a
socket the handler is closing and fails: a POST is not retried, and the
client's C{connect} was refused with 500.  So:

  - an origin whose answer will not be followed by another on the same
    connection (HTTP/1.0 without C{Connection: keep-alive}, or
    C{Connection: close}) is remembered and then sent requests over
    connections of their own;
  - a request that failed because a reused connection was closed before
    the handler answered (the classic keep-alive race, also met with
    Node's 5 s idle timeout) is sent once more on a new connection;
  - each request has one deadline for the whole answer, body included, and
    the body read is bounded.
"""

from urllib.parse import urlsplit

from twisted.internet import defer, protocol
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.web.client import (Agent, HTTPConnectionPool, RequestTransmissionFailed,
                                ResponseDone, ResponseNeverReceived)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, UNKNOWN_LENGTH
from zope.interface import implementer

MAX_ANSWER = 1024 * 1024


class HandlerTimeout(Exception):
    """
    The event handler did not answer in time.
    """


class AnswerTooLarge(Exception):
    """
    The event handler's answer body was over the limit.
    """


class HandlerResponse:
    """
    A handler's whole answer.

    @ivar code: the HTTP status.
    @ivar headers: a L{Headers}.
    @ivar body: the body, bytes.
    @ivar version: e.g. C{(b"HTTP", 1, 0)}.
    """

    def __init__(self, code, headers, body, version):
        self.code = code
        self.headers = headers
        self.body = body
        self.version = version

    def header(self, name):
        """
        The first value of header C{name} (bytes, lower case), or C{None}.
        """
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


@implementer(IBodyProducer)
class _Bytes:
    def __init__(self, data):
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class _Collect(protocol.Protocol):
    transport = None

    def __init__(self, finished, limit):
        self.finished = finished
        self.limit = limit
        self.parts = []
        self.size = 0

    def dataReceived(self, data):
        if self.finished.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.finished.errback(AnswerTooLarge(f"answer over {self.limit} bytes"))
            self.transport.stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason):
        if self.finished.called:
            return
        # A body delimited by the connection's end (HTTP/1.0 without a
        # Content-Length) ends with ResponseDone or PotentialDataLoss: both
        # mean the whole body, as a browser reads it.
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(reason)


def _closesAfter(response):
    """
    Whether the server closes the connection after this answer.
    """
    tokens = set()
    for value in response.headers.getRawHeaders(b"connection", ()):
        tokens.update(t.strip().lower() for t in value.split(b","))
    if b"close" in tokens:
        return True
    return tuple(response.version[1:]) < (1, 1) and b"keep-alive" not in tokens


def _staleConnection(failure):
    """
    Whether a request failed only because its (reused) connection was
    closed by the server before any answer: safe to send again.
    """
    if not failure.check(RequestTransmissionFailed, ResponseNeverReceived):
        return False
    reasons = failure.value.reasons
    return bool(reasons) and all(r.check(ConnectionDone) for r in reasons)


def _origin(url):
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


class HandlerHTTP:
    """
    Requests to event handlers, over a keep-alive pool, or over a
    connection each for handlers that close after every answer.

    @param reactor: the reactor (connections and deadlines).
    """

    def __init__(self, reactor, maxAnswer=MAX_ANSWER, agentFactory=Agent):
        self.reactor = reactor
        self.maxAnswer = maxAnswer
        self._keepAlivePool = HTTPConnectionPool(reactor, persistent=True)
        self._keepAlive = agentFactory(reactor, pool=self._keepAlivePool)
        self._oneShotPool = HTTPConnectionPool(reactor, persistent=False)
        self._oneShot = agentFactory(reactor, pool=self._oneShotPool)
        self._closingOrigins = set()

    def closesConnections(self, url):
        """
        Whether requests to C{url}'s origin go over a connection each.
        """
        return _origin(url) in self._closingOrigins

    def request(self, method, url, headers=None, body=None, timeout=10.0):
        """
        Send one request and read the whole answer.

        @param headers: a dict of str to str (or a list of str: one header
            line each).
        @param body: bytes or C{None}.
        @return: a Deferred firing with a L{HandlerResponse}; failing with
            L{HandlerTimeout} past C{timeout} seconds, L{AnswerTooLarge},
            or the connection's error.
        """
        raw = Headers()
        for name, value in (headers or {}).items():
            for v in value if isinstance(value, list) else [value]:
                raw.addRawHeader(name.encode("latin-1"), v.encode("utf-8"))
        timedOut = []
        attempt = self._attempt(method, url, raw, body, retry=True)

        def expire():
            timedOut.append(True)
            attempt.cancel()
        call = self.reactor.callLater(timeout, expire)

        def done(result):
            if call.active():
                call.cancel()
            if isinstance(result, Failure) and result.check(
                    defer.CancelledError, ResponseNeverReceived, RequestTransmissionFailed):
                if timedOut:
                    raise HandlerTimeout(f"no answer within {timeout:g}s")
                if not result.check(defer.CancelledError) and any(
                        r.check(defer.CancelledError) for r in result.value.reasons):
                    raise defer.CancelledError()  # the caller cancelled it
            return result
        return attempt.addBoth(done)

    def _attempt(self, method, url, headers, body, retry):
        origin = _origin(url)
        agent = self._oneShot if origin in self._closingOrigins else self._keepAlive
        producer = _Bytes(body) if body is not None else None
        d = agent.request(method.encode("ascii"), url.encode("utf-8"), headers, producer)

        def answered(response):
            if _closesAfter(response):
                self._closingOrigins.add(origin)
            if response.length is not UNKNOWN_LENGTH and response.length > self.maxAnswer:
                response.deliverBody(protocol.Protocol())
                raise AnswerTooLarge(f"answer over {self.maxAnswer} bytes")
            collector = _Collect(None, self.maxAnswer)
            collector.finished = finished = defer.Deferred(
                lambda _: collector.transport and collector.transport.stopProducing())
            response.deliverBody(collector)
            return finished.addCallback(
                lambda data: HandlerResponse(response.code, response.headers, data,
                                             response.version))

        def failed(failure):
            if retry and _staleConnection(failure):
                return self._attempt(method, url, headers, body, retry=False)
            return failure
        return d.addCallbacks(answered, failed)

    def closeCachedConnections(self):
        """
        Close the idle keep-alive connections (at shutdown).
        """
        return defer.DeferredList([self._keepAlivePool.closeCachedConnections(),
                                   self._oneShotPool.closeCachedConnections()])
