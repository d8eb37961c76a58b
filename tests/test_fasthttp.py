# -*- test-case-name: tests.test_fasthttp -*-
"""
Tests for L{broker.net.fasthttp}: the lean HTTP/1.1 path of a
L{BoundedSite} with fast routes, over real sockets on 127.0.0.1: what it
serves itself, what it hands to twisted.web, and its bounds (header and
idle timeouts, read-ahead while a request is held).  The faces' own tests
(REST API, IoT HTTP API, the listener bounds) run over it too.
"""

import json

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from broker.net.fasthttp import MAX_PIPELINED, FastChannel, FastRequest
from broker.net.http import BoundedRequest, BoundedSite, Routes
from tests.test_http_bounds import Raw, sleep, status, withTimeout

HEADER_TIMEOUT = 0.5
IDLE_TIMEOUT = 0.8


class Echo(Resource):
    """
    C{/api/...}: answers what it was asked, as JSON; C{/api/hold} is held
    until the test finishes it; C{/api/raise} raises.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []
        self.held = []

    def render(self, request):
        self.requests.append(request)
        if request.postpath[:1] == [b"raise"]:
            raise ValueError("boom")
        if request.postpath[:1] == [b"hold"]:
            self.held.append(request)
            return NOT_DONE_YET
        if request.postpath[:1] == [b"big"]:
            n = int(request.args[b"n"][0])
            return b"".join(b"%09d\n" % i for i in range(n))
        if request.postpath[:1] == [b"gone"]:
            request.setResponseCode(204)
            return b""
        if request.postpath[:1] == [b"empty"]:
            return b""
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({
            "method": request.method.decode(), "postpath": [p.decode() for p in request.postpath],
            "args": {k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()},
            "type": request.getHeader(b"content-type") and request.getHeader(
                b"content-type").decode(),
            "body": request.content.read().decode()}).encode()


class LeanPathTests(TestCase):
    def setUp(self):
        self.echo = Echo()
        root = Resource()
        root.putChild(b"api", self.echo)
        other = Resource()
        other.isLeaf = True
        other.render = lambda request: b"twisted " + request.uri
        root.putChild(b"other", other)
        self.site = BoundedSite(
            root, reactor=reactor, headerTimeout=HEADER_TIMEOUT, idleTimeout=IDLE_TIMEOUT,
            bodyLimit=Routes([(b"/api", {b"POST": 100, b"GET": 0, b"HEAD": 0}),
                              (b"/other", {b"GET": 0, b"POST": 100})]),
            fast=[((b"api",), self.echo)])
        self.channels = []
        build = self.site.buildProtocol

        def buildProtocol(addr):
            p = build(addr)
            self.channels.append(p)
            return p
        self.site.buildProtocol = buildProtocol
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.clients = []
        self.addCleanup(self._drop)

    def _drop(self):
        for request in self.echo.held:
            if not request.finished and not request._disconnected:
                request.finish()
        for c in self.clients:
            if c.open:
                c.transport.abortConnection()
        return defer.DeferredList([c.closed for c in self.clients])

    @defer.inlineCallbacks
    def connect(self):
        client = Raw()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                 self.port.getHost().port), client)
        self.clients.append(client)
        return client

    def answers(self, client, n):
        return withTimeout(client.until(lambda d: d.count(b"HTTP/1.") >= n), 5,
                           f"fewer than {n} answers")

    def refused(self, reason):
        return self.site.stats.count("http", reason)

    @defer.inlineCallbacks
    def test_keepAlive(self):
        """
        Plain requests on one kept-alive connection are served on the lean
        path: method, path segments (percent-decoded, after the route),
        query, headers and body as twisted.web gives them; each answer has
        its Content-Length, Server and Date.
        """
        c = yield self.connect()
        c.send(b"POST /api/a/b%2Fc?x=1&x=2&y=%C3%BC HTTP/1.1\r\nHost: h\r\n"
               b"Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello")
        yield self.answers(c, 1)
        c.send(b"GET /api/ HTTP/1.1\r\nHost: h\r\n\r\n")
        data = yield self.answers(c, 2)
        first, second = data.split(b"HTTP/1.1 ")[1:]
        self.assertTrue(first.startswith(b"200 OK\r\n"))
        head, body = first.split(b"\r\n\r\n", 1)
        self.assertIn(b"Content-Length: %d" % len(body), head)
        self.assertIn(b"Content-Type: application/json", head)
        self.assertIn(b"Server: TwistedWeb", head)
        self.assertIn(b"Date: ", head)
        self.assertEqual(json.loads(body), {
            "method": "POST", "postpath": ["a", "b/c"],
            "args": {"x": ["1", "2"], "y": ["\u00fc"]}, "type": "text/plain", "body": "hello"})
        self.assertEqual(json.loads(second.split(b"\r\n\r\n", 1)[1])["postpath"], [""])
        self.assertTrue(all(isinstance(r, FastRequest) for r in self.echo.requests))
        self.assertIsInstance(self.channels[0], FastChannel)
        self.assertTrue(c.open)
        # Each request has its access-log line, held for the batch.
        self.assertIs(self.site._logFile, self.site.accessLog)
        lines = self.site.accessLog._lines
        self.assertEqual(len(lines), 2)
        self.assertIn('"POST /api/a/b%2Fc?x=1&x=2&y=%C3%BC HTTP/1.1" 200 ', lines[0])

    @defer.inlineCallbacks
    def test_headerCachesBounded(self):
        """
        The parsed header lines and names the lean path remembers stay
        bounded when a client sends a new header on every request (3,000
        requests, each with its own name and value): a repeated line is
        still parsed the same, and every request is answered.
        """
        from broker.net import fasthttp

        self.patch(fasthttp, "_LINES", {})
        self.patch(fasthttp, "_NAMES", {})
        c = yield self.connect()
        n = 3000
        for i in range(0, n, 100):
            c.send(b"".join(b"GET /api/ HTTP/1.1\r\nHost: h\r\nX-Junk-%d: %d\r\n\r\n" % (j, j)
                            for j in range(i, i + 100)))
            yield self.answers(c, i + 100)
        self.assertLessEqual(len(fasthttp._LINES), 1024)
        self.assertLessEqual(len(fasthttp._NAMES), 1024)
        self.assertTrue(all(len(line) <= fasthttp._LINE_KEPT for line in fasthttp._LINES))
        c.send(b"POST /api/ HTTP/1.1\r\nHost: h\r\nContent-Type: text/x-late\r\n"
               b"Content-Length: 2\r\n\r\nok")
        data = yield self.answers(c, n + 1)
        self.assertEqual(json.loads(data.rsplit(b"\r\n\r\n", 1)[1])["type"], "text/x-late")

    @defer.inlineCallbacks
    def test_bodyInPieces(self):
        """
        A head and body arriving in several pieces are put together.
        """
        c = yield self.connect()
        raw = (b"POST /api/p HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123456789")
        for i in range(0, len(raw), 7):
            c.send(raw[i:i + 7])
            yield sleep(0.01)
        data = yield self.answers(c, 1)
        self.assertEqual(json.loads(data.split(b"\r\n\r\n", 1)[1])["body"], "0123456789")

    @defer.inlineCallbacks
    def test_pipelinedInOrder(self):
        """
        Requests sent together are answered in order, a held one first:
        the ones behind it wait for it.
        """
        c = yield self.connect()
        c.send(b"GET /api/hold HTTP/1.1\r\nHost: h\r\n\r\n"
               b"GET /api/one HTTP/1.1\r\nHost: h\r\n\r\n"
               b"HEAD /api/two HTTP/1.1\r\nHost: h\r\n\r\n")
        yield sleep(0.1)
        self.assertEqual(c.data, b"")
        self.assertEqual(len(self.echo.requests), 1)
        held = self.echo.held[0]
        held.setHeader(b"content-type", b"text/plain")
        held.write(b"held ")
        held.write(b"answer")
        held.finish()
        data = yield self.answers(c, 3)
        answers = data.split(b"HTTP/1.1 ")[1:]
        self.assertTrue(answers[0].endswith(b"\r\n\r\nheld answer"))
        self.assertIn(b'"postpath": ["one"]', answers[1])
        # HEAD: the head of the answer, no body.
        self.assertTrue(answers[2].endswith(b"\r\n\r\n"), answers[2])
        self.assertIn(b"Content-Length: ", answers[2])

    @defer.inlineCallbacks
    def test_emptyHeadAnswerSaysItsLength(self):
        """
        A HEAD answered with nothing says C{Content-Length: 0}: a client on
        llhttp (aiohttp) would otherwise read it as ending at the close
        and not reuse the connection.  A 204 says no length at all.
        """
        c = yield self.connect()
        c.send(b"HEAD /api/empty HTTP/1.1\r\nHost: h\r\n\r\n"
               b"HEAD /api/gone HTTP/1.1\r\nHost: h\r\n\r\n")
        data = yield self.answers(c, 2)
        empty, gone = data.split(b"HTTP/1.1 ")[1:]
        self.assertTrue(empty.startswith(b"200 "), empty)
        self.assertIn(b"\r\nContent-Length: 0\r\n", empty)
        self.assertTrue(gone.startswith(b"204 "), gone)
        self.assertNotIn(b"Content-Length", gone)

    @defer.inlineCallbacks
    def test_readAheadBounded(self):
        """
        While a request is held, at most MAX_PIPELINED bytes of what
        follows are read before the connection stops being read; it is
        read again once the answer is written.
        """
        c = yield self.connect()
        c.send(b"GET /api/hold HTTP/1.1\r\nHost: h\r\n\r\n")
        yield sleep(0.1)
        channel = self.channels[0]
        one = b"GET /api/next HTTP/1.1\r\nHost: h\r\n\r\n"
        n = (4 * MAX_PIPELINED) // len(one)
        c.send(one * n)
        yield sleep(0.2)
        self.assertTrue(channel._paused)
        self.assertLessEqual(len(channel._buffer), MAX_PIPELINED + 65536)
        self.echo.held[0].finish()
        yield withTimeout(c.until(lambda d: d.count(b"HTTP/1.1 200") >= n + 1), 10,
                          "the pipelined requests were not all answered")
        self.assertFalse(channel._paused)

    @defer.inlineCallbacks
    def test_answerLargerThanTheSocketTakes(self):
        """
        An answer written straight to the socket that the socket does not
        take whole (the client is not reading) is finished by Twisted's
        buffered write, in order: the answers that follow come after it,
        every byte intact.
        """
        c = yield self.connect()
        c.transport.pauseProducing()
        n = 1200000  # 12 MB: more than loopback socket buffers hold
        c.send(b"GET /api/big?n=%d HTTP/1.1\r\nHost: h\r\n\r\n" % n
               + b"GET /api/after HTTP/1.1\r\nHost: h\r\n\r\n"
               + b"GET /api/big?n=10 HTTP/1.1\r\nHost: h\r\n\r\n")
        yield sleep(0.3)
        server = self.channels[0]._socketTransport
        self.assertIsNotNone(server)
        self.assertGreater(len(server.dataBuffer) + server._tempDataLen, 0)
        c.transport.resumeProducing()
        data = yield withTimeout(c.until(lambda d: d.count(b"HTTP/1.1 200") >= 3
                                         and d.endswith(b"000000009\n")), 10, "not all answers")
        first, second, third = data.split(b"HTTP/1.1 200 OK\r\n")[1:]
        body = first.split(b"\r\n\r\n", 1)[1]
        self.assertEqual(body, b"".join(b"%09d\n" % i for i in range(n)))
        self.assertIn(b'"postpath": ["after"]', second)
        self.assertTrue(third.endswith(b"\r\n\r\n" + b"".join(b"%09d\n" % i for i in range(10))))

    @defer.inlineCallbacks
    def test_clientGoneWhileHeld(self):
        """
        A held request learns that its client went away (notifyFinish
        fails); finishing it then writes nothing and raises nothing.
        """
        c = yield self.connect()
        c.send(b"GET /api/hold HTTP/1.1\r\nHost: h\r\n\r\n")
        yield sleep(0.1)
        held = self.echo.held[0]
        gone = held.notifyFinish()
        c.transport.loseConnection()
        yield withTimeout(self.assertFailure(gone, Exception), 5, "notifyFinish never failed")
        self.assertTrue(held._disconnected)
        held.write(b"late")
        held.finish()
        self.assertFalse(held.finished)

    @defer.inlineCallbacks
    def test_notifyLost(self):
        """
        C{notifyLost(f)} calls C{f(reason)} once when the client goes away
        before the answer (at once when it already has), and never once
        the answer was sent; C{notifyFinish} Deferreds of the same request
        still fire.
        """
        c = yield self.connect()
        c.send(b"GET /api/hold HTTP/1.1\r\nHost: h\r\n\r\n")
        c.send(b"GET /api/hold HTTP/1.1\r\nHost: h\r\n\r\n")
        yield sleep(0.1)
        answered = self.echo.held[0]
        calls = []
        answered.notifyLost(calls.append)
        finished = answered.notifyFinish()
        answered.finish()
        yield finished
        yield self.answers(c, 1)
        yield sleep(0.1)
        held = self.echo.held[1]
        held.notifyLost(calls.append)
        gone = held.notifyFinish()
        c.transport.loseConnection()
        yield withTimeout(self.assertFailure(gone, Exception), 5, "notifyFinish never failed")
        self.assertEqual(len(calls), 1)
        held.notifyLost(calls.append)
        self.assertEqual(len(calls), 2)
        self.assertIs(calls[0], calls[1])
        answered.notifyLost(calls.append)
        self.assertEqual(len(calls), 2)

    @defer.inlineCallbacks
    def test_connectionClose(self):
        """
        C{Connection: close} is answered with it, and the server closes.
        """
        c = yield self.connect()
        c.send(b"GET /api/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        yield withTimeout(c.closed, 5, "not closed")
        self.assertEqual(status(c.data), 200)
        self.assertIn(b"\r\nConnection: close\r\n", c.data)

    @defer.inlineCallbacks
    def test_renderRaises(self):
        """
        A resource that raises gets a 500 (logged); the connection goes on.
        """
        c = yield self.connect()
        c.send(b"GET /api/raise HTTP/1.1\r\nHost: h\r\n\r\n")
        yield self.answers(c, 1)
        self.assertEqual(status(c.data), 500)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        c.send(b"GET /api/gone HTTP/1.1\r\nHost: h\r\n\r\n")
        data = yield self.answers(c, 2)
        second = data.split(b"HTTP/1.1 ")[2]
        self.assertTrue(second.startswith(b"204 "))
        self.assertNotIn(b"Content-Length", second)

    @defer.inlineCallbacks
    def test_handedOverToTwisted(self):
        """
        What the lean path does not serve goes, with its bytes, to
        twisted.web, which then serves the connection: a path outside the
        fast routes, a chunked body, HTTP/1.0; and a bare LF line end,
        which twisted.web refuses (400).
        """
        cases = [
            (b"GET /other/x HTTP/1.1\r\nHost: h\r\n\r\n", 200),
            (b"POST /api/c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"3\r\nabc\r\n0\r\n\r\n", 200),
            (b"GET /api/old HTTP/1.0\r\nHost: h\r\n\r\n", 200),
            (b"GET /api/lf HTTP/1.1\nHost: h\r\n\r\n", 400),
            (b"GET /api/nocolon HTTP/1.1\r\nHost: h\r\nHost\r\n\r\n", 400),
            (b"GET /api/cr HTTP/1.1\r\nHost: h\rX\r\n\r\n", 400),
        ]
        answers = []
        for raw, code in cases:
            c = yield self.connect()
            c.send(raw)
            yield self.answers(c, 1)
            self.assertEqual(status(c.data), code, raw)
            self.assertIsNotNone(self.channels[-1]._handedOver, raw)
            answers.append(c.data)
        self.assertTrue(answers[0].endswith(b"\r\n\r\ntwisted /other/x"), answers[0])
        served = self.echo.requests
        self.assertEqual(len(served), 2)
        self.assertTrue(all(isinstance(r, BoundedRequest) for r in served))
        self.assertIn(b'"body": "abc"', answers[1])

    @defer.inlineCallbacks
    def test_leanThenTwistedOnOneConnection(self):
        """
        A connection served on the lean path is handed over at its first
        request that path does not serve; later plain requests are
        twisted.web's too.
        """
        c = yield self.connect()
        c.send(b"GET /api/1 HTTP/1.1\r\nHost: h\r\n\r\n")
        yield self.answers(c, 1)
        c.send(b"GET /other/2 HTTP/1.1\r\nHost: h\r\n\r\nGET /api/3 HTTP/1.1\r\nHost: h\r\n\r\n")
        data = yield self.answers(c, 3)
        self.assertIn(b"twisted /other/2", data)
        self.assertIsInstance(self.echo.requests[0], FastRequest)
        self.assertIsInstance(self.echo.requests[1], BoundedRequest)
        self.assertTrue(c.open)

    @defer.inlineCallbacks
    def test_refusalsAreTwisted(self):
        """
        A body over the route's limit, or on a method the route does not
        take, is refused by the site's twisted.web channel, at the head,
        counted, and the connection closed.
        """
        for raw, code, reason in [
                (b"POST /api/x HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n", 413,
                 "body_too_large"),
                (b"PUT /api/x HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n", 405,
                 "method_not_allowed")]:
            c = yield self.connect()
            c.send(raw)
            yield withTimeout(c.closed, 5, "not closed")
            self.assertEqual(status(c.data), code)
            self.assertEqual(self.refused(reason), 1)
        self.assertEqual(self.echo.requests, [])

    @defer.inlineCallbacks
    def test_tricklingHeadCutOff(self):
        """
        A head that is not complete within header_timeout of its first
        byte (of connecting, for the first) is answered 408 and closed,
        counted; on a kept-alive connection too.
        """
        c = yield self.connect()
        c.send(b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")
        yield self.answers(c, 1)
        yield sleep(HEADER_TIMEOUT * 1.2)
        self.assertTrue(c.open)
        started = reactor.seconds()
        for byte in b"GET /api/slow HTTP/1.1\r\n":
            if not c.open:
                break
            c.send(bytes([byte]))
            yield sleep(0.05)
        yield withTimeout(c.closed, 5, "a trickling head was never cut off")
        self.assertLess(reactor.seconds() - started, HEADER_TIMEOUT + 0.5)
        self.assertIn(b"HTTP/1.1 408", c.data)
        self.assertEqual(self.refused("header_timeout"), 1)

    @defer.inlineCallbacks
    def test_idleClosedButNotWhileHeld(self):
        """
        A connection silent for idle_timeout after its answer is closed
        and counted; a request held longer than that is not cut.
        """
        c = yield self.connect()
        c.send(b"GET /api/hold HTTP/1.1\r\nHost: h\r\n\r\n")
        yield sleep(IDLE_TIMEOUT * 1.5)
        self.assertTrue(c.open)
        self.echo.held[0].finish()
        yield self.answers(c, 1)
        answered = reactor.seconds()
        yield withTimeout(c.closed, 5, "idle connection kept")
        self.assertGreaterEqual(reactor.seconds() - answered, IDLE_TIMEOUT * 0.9)
        self.assertEqual(self.refused("idle_timeout"), 1)
        self.assertEqual(self.refused("header_timeout"), 0)
