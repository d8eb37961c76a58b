"""
Tests for L{broker.net}: the bounds of every HTTP listener (body limits
decided at the head, header and idle timeouts) and the connection cap of
every listener, over real sockets on a broker built by
L{broker.tap.buildService} with every face enabled and small limits.
"""

import json
import resource
import tempfile

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.service import IServiceCollection
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase
from twisted.web import http as twhttp

from broker import config, tap

HEADER_TIMEOUT = 1.0
IDLE_TIMEOUT = 1.5
REST_LIMIT = 4096            # webpubsub.max_frame_size
ECDN_LIMIT = 4096
IOT_LIMIT = 256 * 1024       # over the 100 kB twisted.web spools to a file

CONFIG = f"""
[broker]
state_dir = "{{state}}"
[admin]
listen = ["tcp:0:interface=127.0.0.1"]
header_timeout = {HEADER_TIMEOUT}
idle_timeout = {IDLE_TIMEOUT}
max_connections = 4
[webpubsub]
listen = ["tcp:0:interface=127.0.0.1"]
max_frame_size = {REST_LIMIT}
header_timeout = {HEADER_TIMEOUT}
idle_timeout = {IDLE_TIMEOUT}
[webpubsub.hubs.sandbox]
allow_anonymous = true
[ecdn]
enabled = true
listen = ["tcp:0:interface=127.0.0.1"]
max_body = {ECDN_LIMIT}
header_timeout = {HEADER_TIMEOUT}
idle_timeout = {IDLE_TIMEOUT}
[iot]
enabled = true
listen = ["tcp:0:interface=127.0.0.1"]
max_connections = 2
[iot.udp]
port = 0
[iot.http]
listen = ["tcp:0:interface=127.0.0.1"]
max_body = {IOT_LIMIT}
header_timeout = {HEADER_TIMEOUT}
idle_timeout = {IDLE_TIMEOUT}
[peergroups]
enabled = true
listen = ["tcp:0:interface=127.0.0.1"]
tcp_listen = ["tcp:0:interface=127.0.0.1"]
header_timeout = {HEADER_TIMEOUT}
idle_timeout = {IDLE_TIMEOUT}
"""

HTTP_LISTENERS = ("admin.listen", "webpubsub.listen", "ecdn.listen", "iot.http.listen",
                  "peergroups.listen")


class Raw(Protocol):
    """
    A raw client: what it received, and when the server closed.
    """

    def __init__(self):
        self.data = b""
        self.closed = defer.Deferred()
        self.open = True
        self._waiting = []

    def dataReceived(self, data):
        self.data += data
        waiting, self._waiting = self._waiting, []
        for pred, d in waiting:
            if pred(self.data):
                d.callback(self.data)
            else:
                self._waiting.append((pred, d))

    def connectionLost(self, reason):
        self.open = False
        self.closed.callback(None)

    def until(self, pred):
        d = defer.Deferred()
        if pred(self.data):
            d.callback(self.data)
        else:
            self._waiting.append((pred, d))
        return d

    def send(self, data):
        if self.open:
            self.transport.write(data)


def status(data):
    return int(data.split(b" ", 2)[1])


def body(data):
    return data.split(b"\r\n\r\n", 1)[1]


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


def withTimeout(d, seconds, what):
    return d.addTimeout(seconds, reactor).addErrback(
        lambda f: f.trap(defer.TimeoutError) and defer.fail(AssertionError(what)))


class WSClient(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onClose(self, wasClean, code, reason):
        self.factory.closedAt = reactor.seconds()
        self.factory.closed.callback(None)
        if not self.factory.opened.called:
            self.factory.opened.errback(AssertionError(f"refused: {code} {reason}"))


class BoundsTests(TestCase):
    def setUp(self):
        directory = FilePath(self.mktemp())
        directory.makedirs()
        path = directory.child("broker.toml")
        path.setContent(CONFIG.format(state=directory.child("state").path).encode())
        self.top = tap.buildService(config.load(path.path), reactor)
        self.top.privilegedStartService()
        self.top.startService()
        self.addCleanup(self.top.stopService)
        self.clients = []
        self.addCleanup(self._dropClients)

    def _dropClients(self):
        for c in self.clients:
            if c.open:
                c.transport.abortConnection()
        return defer.DeferredList([c.closed for c in self.clients])

    def port(self, key):
        listener = IServiceCollection(self.top).getServiceNamed(key + "[0]")
        return listener._waitingForPort.result.getHost().port

    @defer.inlineCallbacks
    def connect(self, key):
        client = Raw()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port(key)), client)
        self.clients.append(client)
        return client

    @defer.inlineCallbacks
    def metrics(self):
        client = yield self.connect("admin.listen")
        client.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        yield client.closed
        found = {}
        for line in body(client.data).decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                found[name] = float(value)
        return found

    def refused(self, metrics, listener, reason, family="broker_http_refused_total"):
        return metrics.get(f'{family}{{listener="{listener}",reason="{reason}"}}', 0)

    # -- (a) declared bodies: refused at the head ---------------------------

    @defer.inlineCallbacks
    def test_declaredBodyRefusedAtOnce(self):
        """
        A head declaring a 300 MB body gets its 413 or 405 at once, in the
        face's error format, though the client sends no byte of the body;
        the connection is then closed.  Each refusal is counted on
        /metrics by listener and reason.
        """
        cases = [
            ("admin.listen", b"POST /healthz", 405, b"", b"allow: GET, HEAD"),
            ("admin.listen", b"GET /metrics", 413, b"", None),
            ("webpubsub.listen", b"POST /api/hubs/chat/:send?api-version=2024-01-01", 413,
             b'"code": "PayloadTooLarge"', b"x-ms-error-code: PayloadTooLarge"),
            ("webpubsub.listen", b"PATCH /api/hubs/chat/users/u", 405,
             b'"code": "MethodNotAllowed"', b"allow: DELETE, GET, HEAD, POST, PUT"),
            ("webpubsub.listen", b"POST /client/hubs/chat", 405, b"MethodNotAllowed",
             b"allow: GET"),
            ("ecdn.listen", b"POST /v1/get-peering-group", 413,
             b'{"result":null,"error":"the request body is over 4096 bytes"}',
             b"access-control-allow-origin: https://meet.google.com"),
            ("iot.http.listen", b"POST /v1/fleets/demo/devices/d1/requests", 413,
             b'{"error":{"code":"TOO_LARGE"', None),
            ("iot.http.listen", b"GET /v1/fleets/demo/devices/d1/messages", 405,
             b'"code":"METHOD_NOT_ALLOWED"', b"allow: POST"),
            ("iot.http.listen", b"PUT /v1/fleets/demo/devices/d1/key", 413, b"TOO_LARGE", None),
            ("peergroups.listen", b"POST /peergroups/v1", 405, b"", b"allow: GET"),
            ("peergroups.listen", b"GET /peergroups/peergroup.js", 413, b"", None),
        ]
        for key, line, code, inBody, header in cases:
            client = yield self.connect(key)
            client.send(line + b" HTTP/1.1\r\nHost: x\r\nOrigin: https://meet.google.com\r\n"
                        b"Content-Length: 300000000\r\n\r\n")
            # The body is never sent: the answer must come without it.
            yield withTimeout(client.closed, 5, f"{key} {line}: no answer to the head")
            self.assertEqual(status(client.data), code, (key, line, client.data))
            self.assertIn(inBody, body(client.data), (key, line))
            self.assertIn(b"connection: close", client.data.lower())
            if header is not None:
                self.assertIn(header.lower(), client.data.lower())
        m = yield self.metrics()
        self.assertEqual(self.refused(m, "admin.listen", "method_not_allowed"), 1)
        self.assertEqual(self.refused(m, "admin.listen", "body_too_large"), 1)
        self.assertEqual(self.refused(m, "webpubsub.listen", "body_too_large"), 1)
        self.assertEqual(self.refused(m, "webpubsub.listen", "method_not_allowed"), 2)
        self.assertEqual(self.refused(m, "ecdn.listen", "body_too_large"), 1)
        self.assertEqual(self.refused(m, "iot.http.listen", "body_too_large"), 2)
        self.assertEqual(self.refused(m, "iot.http.listen", "method_not_allowed"), 1)
        self.assertEqual(self.refused(m, "peergroups.listen", "method_not_allowed"), 1)
        self.assertEqual(self.refused(m, "peergroups.listen", "body_too_large"), 1)

    # -- (b) streamed bodies: refused once the limit is crossed -------------

    @defer.inlineCallbacks
    def stream(self, key, line, limit, chunk=1024):
        """
        Send a chunked body, C{chunk} bytes every 5 ms, until the server
        answers or closes; return the client and the bytes sent by then.
        """
        client = yield self.connect(key)
        client.send(line + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")
        sent = 0
        while client.open and not client.data and sent < 40 * limit:
            client.send(b"%x\r\n%s\r\n" % (chunk, b" " * chunk))
            sent += chunk
            yield sleep(0.005)
        answeredAfter = sent
        # Keep sending: the server reads no more and closes.
        while client.open and sent < 400 * limit:
            client.send(b"%x\r\n%s\r\n" % (chunk, b" " * chunk))
            sent += chunk
            yield sleep(0.001)
        yield withTimeout(client.closed, 5, f"{key}: still open")
        return client, answeredAfter

    @defer.inlineCallbacks
    def test_streamedBodyRefusedWhenItCrossesTheLimit(self):
        """
        A chunked body is answered 413 as soon as what was received crosses
        the route's limit, while the client is still sending, and the
        connection is closed.
        """
        cases = [
            ("webpubsub.listen", b"POST /api/hubs/chat/:send?api-version=2024-01-01",
             REST_LIMIT, b"PayloadTooLarge"),
            ("ecdn.listen", b"POST /v1/get-peering-group", ECDN_LIMIT, b'"error":'),
            ("iot.http.listen", b"POST /v1/fleets/demo/devices/d1/messages", IOT_LIMIT,
             b"TOO_LARGE"),
        ]
        for key, line, limit, inBody in cases:
            client, answeredAfter = yield self.stream(key, line, limit,
                                                      chunk=1024 if limit < 10000 else 32768)
            self.assertEqual(status(client.data), 413, (key, client.data))
            self.assertIn(inBody, body(client.data))
            # Answered once the limit was crossed, long before the client
            # was done (it meant to send 40 times the limit).
            self.assertLess(answeredAfter, limit + 20 * 32768, key)
        m = yield self.metrics()
        for key, *_ in cases:
            self.assertEqual(self.refused(m, key, "body_too_large"), 1, key)

    # -- (c) no temporary file, memory bounded ------------------------------

    @defer.inlineCallbacks
    def test_noTemporaryFile(self):
        """
        Bodies are never spooled to disk: with temporary files made to fail,
        a legitimate chunked body over twisted.web's 100 kB threshold is
        still read and handled, and many oversized streams leave the
        process's peak memory where it was.
        """
        def refuse(*args, **kwargs):
            raise AssertionError("a request body went to a temporary file")
        self.patch(tempfile, "TemporaryFile", refuse)
        self.patch(twhttp.tempfile, "TemporaryFile", refuse)
        client = yield self.connect("iot.http.listen")
        payload = json.dumps({"payload": {"type": "utf8", "data": "x" * 150000}}).encode()
        client.send(b"POST /v1/fleets/demo/devices/d1/messages HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                    b"Connection: close\r\n\r\n")
        for i in range(0, len(payload), 10000):
            part = payload[i:i + 10000]
            client.send(b"%x\r\n%s\r\n" % (len(part), part))
        client.send(b"0\r\n\r\n")
        yield withTimeout(client.closed, 5, "no answer")
        # Read in full and parsed: the API got as far as authentication.
        self.assertEqual(status(client.data), 401, client.data)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        streams = [self.stream("iot.http.listen", b"POST /v1/fleets/demo/devices/d1/requests",
                               IOT_LIMIT, chunk=65536) for _ in range(6)]
        results = yield defer.gatherResults(streams)
        for c, _ in results:
            self.assertEqual(status(c.data), 413)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        # 6 streams of up to 100 MB each; each held at most its limit.
        self.assertLess(grown, 64 * 1024, f"peak memory grew by {grown} KiB")

    # -- (d) slow heads ----------------------------------------------------

    @defer.inlineCallbacks
    def test_tricklingHeadCutOff(self):
        """
        A client trickling its request head (a byte every 0.25 s, each of
        which resets twisted.web's idle timer) is answered 408 and closed
        once header_timeout has passed since it connected, on every HTTP
        listener, and counted.
        """
        clients = []
        for key in HTTP_LISTENERS:
            c = yield self.connect(key)
            c.started = reactor.seconds()
            clients.append(c)
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        for i in range(len(head)):
            if not any(c.open for c in clients):
                break
            for c in clients:
                c.send(head[i:i + 1])
            yield sleep(0.25)
        for key, c in zip(HTTP_LISTENERS, clients):
            yield withTimeout(c.closed, 5, f"{key}: a trickling head was never cut off")
            self.assertEqual(status(c.data), 408, key)
        m = yield self.metrics()
        for key in HTTP_LISTENERS:
            self.assertEqual(self.refused(m, key, "header_timeout"), 1, key)

    @defer.inlineCallbacks
    def test_silentConnectionCutOff(self):
        """
        A connection that sends nothing is closed after header_timeout.
        """
        c = yield self.connect("webpubsub.listen")
        started = reactor.seconds()
        yield withTimeout(c.closed, 5, "never closed")
        self.assertGreaterEqual(reactor.seconds() - started, HEADER_TIMEOUT * 0.9)
        self.assertEqual(status(c.data), 408)

    # -- (e) idle keep-alive connections -----------------------------------

    @defer.inlineCallbacks
    def test_idleKeepAliveClosed(self):
        """
        A keep-alive connection that sends no further request is closed
        after idle_timeout (not header_timeout: the next head has not
        begun), and counted; one that keeps sending requests is served.
        """
        cases = [("admin.listen", b"/healthz"), ("webpubsub.listen", b"/api/health"),
                 ("peergroups.listen", b"/peergroups/peergroup.js")]
        clients = []
        for key, path in cases:
            c = yield self.connect(key)
            for i in range(3):
                if i:
                    yield sleep(HEADER_TIMEOUT * 0.6)
                n = c.data.count(b"HTTP/1.1 200")
                c.send(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                yield withTimeout(c.until(lambda d, n=n: d.count(b"HTTP/1.1 200") > n), 5, key)
            c.idleSince = reactor.seconds()
            self.assertTrue(c.open)
            clients.append(c)
        for (key, _), c in zip(cases, clients):
            yield withTimeout(c.closed, 5, f"{key}: idle connection kept")
            self.assertGreaterEqual(reactor.seconds() - c.idleSince, IDLE_TIMEOUT * 0.9, key)
        m = yield self.metrics()
        for key, _ in cases:
            self.assertEqual(self.refused(m, key, "idle_timeout"), 1, key)

    # -- (f) connection caps -----------------------------------------------

    @defer.inlineCallbacks
    def test_connectionCapHTTP(self):
        """
        admin.max_connections is 4: a fifth connection is reset at once and
        counted; the four keep working, and once one goes a new one works.
        """
        held = []
        for _ in range(4):
            held.append((yield self.connect("admin.listen")))
        extra = yield self.connect("admin.listen")
        yield withTimeout(extra.closed, 2, "a fifth connection was accepted")
        self.assertEqual(extra.data, b"")
        stats = self.top.listeners.get("admin.listen")
        self.assertEqual(stats.count("connection", "max_connections"), 1)
        self.assertEqual(stats.connections, 4)
        held[0].send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        yield held[0].closed
        self.assertEqual(status(held[0].data), 200)
        m = yield self.metrics()
        self.assertEqual(self.refused(m, "admin.listen", "max_connections",
                                      "broker_connections_refused_total"), 1)
        self.assertEqual(m['broker_listener_connections{listener="admin.listen"}'], 4)

    @defer.inlineCallbacks
    def test_connectionCapRawTCP(self):
        """
        iot.max_connections is 2: a third device connection is reset at
        once and counted; the first two stay open.
        """
        a = yield self.connect("iot.listen")
        b = yield self.connect("iot.listen")
        c = yield self.connect("iot.listen")
        yield withTimeout(c.closed, 2, "a third connection was accepted")
        yield sleep(0.3)
        self.assertTrue(a.open and b.open)
        m = yield self.metrics()
        self.assertEqual(self.refused(m, "iot.listen", "max_connections",
                                      "broker_connections_refused_total"), 1)
        self.assertEqual(m['broker_listener_connections{listener="iot.listen"}'], 2)
        a.transport.loseConnection()
        yield a.closed
        yield sleep(0.1)
        d = yield self.connect("iot.listen")
        yield sleep(0.3)
        self.assertTrue(d.open)

    # -- (g) WebSocket sessions outlive the HTTP timers ----------------------

    @defer.inlineCallbacks
    def test_webSocketsOutliveHTTPTimeouts(self):
        """
        Upgraded connections belong to autobahn: neither header_timeout nor
        idle_timeout cuts them.
        """
        factories = []
        for key, path, protocols in [
                ("webpubsub.listen", "/client/hubs/sandbox", []),
                ("peergroups.listen", "/peergroups/v1", ["peergroup.v1"])]:
            url = f"ws://127.0.0.1:{self.port(key)}{path}"
            f = WebSocketClientFactory(url, protocols=protocols)
            f.protocol = WSClient
            # No client-side timers: the test is about the server's.
            f.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=0,
                                 closeHandshakeTimeout=0)
            f.opened = defer.Deferred()
            f.closed = defer.Deferred()
            f.closedAt = None
            yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.port(key)).connect(f)
            proto = yield withTimeout(f.opened, 5, key)
            self.addCleanup(lambda p=proto, f=f: p.sendClose(1000) or f.closed)
            factories.append((key, f))
        yield sleep(HEADER_TIMEOUT + IDLE_TIMEOUT + 0.5)
        for key, f in factories:
            self.assertIsNone(f.closedAt, f"{key}: the WebSocket was closed")
        self.assertEqual(self.top.listeners.get("webpubsub.listen").connections, 1)
