# -*- test-case-name: tests.test_webpubsub_validation -*-
"""
Event-handler validation as Azure does it (L{broker.webpubsub.validation}),
the admin /healthz note for a handler that fails it, HTTP/1.0 and 1.1
handlers (L{broker.webpubsub.handlerhttp}) written with Python's own
C{http.server}, and invocations answered with the documented errors.
"""

import http.server
import threading

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from broker.admin.resource import makeAdminSite
from broker.webpubsub.face import attachEventHandlers
from tests.test_webpubsub_express import until
from tests.wsharness import KEY, BrokerHarness


class ValidateOnly(Resource):
    """
    A handler that answers C{OPTIONS} only on its C{/validate} path (404
    elsewhere), as Azure lets one; records the POSTs.
    """

    isLeaf = True

    def __init__(self, allow=True):
        super().__init__()
        self.allow = allow
        self.options = []
        self.posts = []
        self.held = []

    def render_OPTIONS(self, request):
        self.options.append((request.path.decode(), dict(
            (k.decode().lower(), v[0].decode())
            for k, v in request.requestHeaders.getAllRawHeaders())))
        if not request.path.endswith(b"/validate") or not self.allow:
            request.setResponseCode(404)
            return b""
        request.setHeader(b"webhook-allowed-origin", b"*")
        return b""

    def render_POST(self, request):
        event = request.getHeader(b"ce-eventname").decode()
        self.posts.append((request.path.decode(), event))
        if event == "hold":
            self.held.append(request)
            request.notifyFinish().addErrback(lambda _: None)
            return NOT_DONE_YET
        if event in ("connect", "connected", "disconnected"):
            return b""
        request.setHeader(b"content-type", b"text/plain")
        return b"answer:" + request.content.read()


class _Base(TestCase):
    @defer.inlineCallbacks
    def broker(self, handler, userEvents="*", extra=""):
        port = reactor.listenTCP(0, Site(handler), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = f"http://127.0.0.1:{port.getHost().port}"
        return (yield self.brokerAt(base, userEvents, extra))

    @defer.inlineCallbacks
    def brokerAt(self, base, userEvents="*", extra=""):
        toml = (f"[webpubsub]\nevent_timeout = 1.0\n{extra}\n[webpubsub.hubs.chat]\n"
                f'access_keys = ["{KEY}"]\n[[webpubsub.hubs.chat.event_handlers]]\n'
                f'url_template = "{base}/hooks/{{hub}}/{{event}}"\n'
                f'user_events = "{userEvents}"\n'
                'system_events = ["connect", "connected", "disconnected"]\n')
        harness = BrokerHarness(self, reactor, toml)
        handlers = attachEventHandlers(reactor, harness.core, harness.settings["webpubsub"],
                                       [KEY])
        handlers.validation.backoff = 0.05
        self.addCleanup(handlers.stop)
        self.addCleanup(lambda: defer.DeferredList(
            [hub.upstream.whenIdle() for hub in harness.core.hubs.values()]))
        yield harness.start()
        self.handlers = handlers
        return harness


class ValidationTests(_Base):
    @defer.inlineCallbacks
    def test_validateOnlyGetsEvents(self):
        """
        Validated once, on C{{event}=validate}, when the handlers load,
        with the headers the official middlewares look for; events then
        go to their own URLs, which never answer C{OPTIONS}.
        """
        handler = ValidateOnly()
        harness = yield self.broker(handler)
        yield until(lambda: handler.options)
        path, headers = handler.options[0]
        self.assertEqual(path, "/hooks/chat/validate")
        self.assertEqual((headers["webhook-request-origin"], headers["ce-awpsversion"]),
                         ("localhost", "1.0"))
        c = yield harness.connectJSON()
        c.send({"type": "event", "event": "ping", "dataType": "text", "data": "x",
                "ackId": 1})
        frames = [(yield c.nextJSON()), (yield c.nextJSON())]
        self.assertIn({"type": "message", "from": "server", "dataType": "text",
                       "data": "answer:x"}, frames)
        self.assertEqual([p for p, _ in handler.options], ["/hooks/chat/validate"])
        self.assertEqual(handler.posts[:2], [("/hooks/chat/connect", "connect"),
                                             ("/hooks/chat/connected", "connected")])

    @defer.inlineCallbacks
    def test_failingHandlerOnHealthzAndLoggedOnce(self):
        """
        A handler that refuses validation is named on /healthz and in one
        log line, is asked again with backoff, and gets no events; once it
        agrees (or on reload) it is validated and the note goes.
        """
        handler = ValidateOnly(allow=False)
        logged = []
        from twisted.logger import globalLogPublisher

        def observe(event):
            if "failed validation" in (event.get("log_format") or ""):
                logged.append(event)
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        harness = yield self.broker(handler)
        admin = reactor.listenTCP(0, makeAdminSite(harness.core), interface="127.0.0.1")
        self.addCleanup(admin.stopListening)
        yield until(lambda: len(handler.options) >= 3)
        self.assertEqual(len(logged), 1)
        body = yield _get(f"http://127.0.0.1:{admin.getHost().port}/healthz")
        lines = body.decode().splitlines()
        self.assertEqual(lines[0], "ok")
        self.assertIn("/hooks/chat/validate", lines[1])
        self.assertIn("failed validation: it answered 404", lines[1])
        refusal = yield harness.refused()
        self.assertIn("500", refusal)
        self.assertEqual(handler.posts, [])
        handler.allow = True
        yield self.handlers.reload()
        body = yield _get(f"http://127.0.0.1:{admin.getHost().port}/healthz")
        self.assertEqual(body, b"ok\n")
        c = yield harness.connectJSON()
        self.assertTrue(c.connectionId)


@defer.inlineCallbacks
def _get(url):
    from broker.webpubsub.handlerhttp import HandlerHTTP
    client = HandlerHTTP(reactor)
    try:
        response = yield client.request("GET", url, timeout=5)
    finally:
        yield client.closeCachedConnections()
    return response.body


def _pythonHandler(version, keepAlive, chunked, withLength):
    """
    An event handler written with Python's http.server: C{version}
    C{"HTTP/1.0"} or C{"HTTP/1.1"}, answering with or without
    C{Connection: keep-alive}, chunked or not, with or without a
    Content-Length.
    """
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = version

        def log_message(self, *args):
            pass

        def answer(self, body, headers):
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            if keepAlive:
                self.send_header("Connection", "keep-alive")
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            elif withLength:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if chunked:
                if body:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(body), body))
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.wfile.write(body)
            if not (chunked or withLength):
                self.close_connection = True

        def do_OPTIONS(self):
            self.answer(b"", {"WebHook-Allowed-Origin": "*"})

        def do_POST(self):
            data = self.rfile.read(int(self.headers.get("content-length", 0)))
            event = self.headers["ce-eventname"]
            self.server.seen.append(event)
            if event == "connect":
                self.answer(b'{"userId": "py"}', {"Content-Type": "application/json"})
            else:
                self.answer(b"re:" + data, {"Content-Type": "text/plain"})

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


class HTTPVersionTests(_Base):
    """
    Handlers answering HTTP/1.0 or 1.1, with or without keep-alive, chunked
    or not: connect, user events and notifications all arrive.
    """

    timeout = 60

    @defer.inlineCallbacks
    def check(self, version, keepAlive, chunked=False, withLength=True):
        server, thread = _pythonHandler(version, keepAlive, chunked, withLength)

        def stop():
            server.shutdown()
            server.server_close()
        self.addCleanup(lambda: task.deferLater(reactor, 0, stop))
        harness = yield self.brokerAt(f"http://127.0.0.1:{server.server_address[1]}")
        for round in range(2):
            c = yield harness.connectJSON()
            self.assertEqual(c.hello["userId"], "py")
            c.send({"type": "event", "event": "ping", "dataType": "text",
                    "data": f"d{round}", "ackId": 1})
            frames = [(yield c.nextJSON()), (yield c.nextJSON())]
            self.assertIn(f"re:d{round}", [f.get("data") for f in frames])
            c.transport.abortConnection()
        yield until(lambda: server.seen.count("disconnected") == 2)
        self.assertEqual(server.seen.count("connected"), 2)
        hub = harness.core.hub("chat")
        self.assertEqual(hub.upstream.stats["notificationsDropped"], 0)

    def test_http10(self):
        return self.check("HTTP/1.0", keepAlive=False)

    def test_http10NoLength(self):
        return self.check("HTTP/1.0", keepAlive=False, withLength=False)

    def test_http10KeepAlive(self):
        return self.check("HTTP/1.0", keepAlive=True)

    def test_http11(self):
        return self.check("HTTP/1.1", keepAlive=False)

    def test_http11Chunked(self):
        return self.check("HTTP/1.1", keepAlive=False, chunked=True)


class InvocationErrorTests(_Base):
    @defer.inlineCallbacks
    def test_errorsAndCancel(self):
        """
        An invocation no handler takes: NotFound; a bad one: BadRequest;
        a cancelled one: its upstream request is dropped and nothing is
        answered; the next is answered.
        """
        handler = ValidateOnly()
        harness = yield self.broker(handler, userEvents="ask,hold")
        c = yield harness.connectJSON()
        c.send({"type": "invoke", "invocationId": "1", "target": "event", "event": "other",
                "dataType": "text", "data": "x"})
        answer = yield c.nextJSON()
        self.assertEqual((answer["type"], answer["invocationId"], answer["success"],
                          answer["error"]["name"]), ("invokeResponse", "1", False, "NotFound"))
        c.send({"type": "invoke", "invocationId": "2", "target": "group", "event": "ask"})
        answer = yield c.nextJSON()
        self.assertEqual((answer["invocationId"], answer["error"]["name"]), ("2", "BadRequest"))
        c.send({"type": "invoke", "invocationId": "3", "event": "hold", "dataType": "text",
                "data": "x"})
        yield until(lambda: handler.held)
        c.send({"type": "cancelInvocation", "invocationId": "3"})
        yield until(lambda: handler.held[0].channel is None)
        c.send({"type": "invoke", "invocationId": "4", "event": "ask", "dataType": "json",
                "data": {"q": 1}})
        answer = yield c.nextJSON()
        self.assertEqual(answer, {"type": "invokeResponse", "invocationId": "4",
                                  "success": True, "dataType": "text",
                                  "data": 'answer:{"q":1}'})
