# -*- test-case-name: tests.test_webpubsub_upstream -*-
"""
Web PubSub event handlers (L{broker.webpubsub.upstream}) against a real
twisted.web upstream: the validation handshake, the blocking connect
event, user events and their answers, notifications and signatures.
"""

import hashlib
import hmac
import json

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from broker.webpubsub.face import attachEventHandlers
from tests.wsharness import KEY, BrokerHarness, ConnectionRefusedByServer


class Upstream(Resource):
    """
    An application's event handler: records every request; C{answers}
    maps an event name to C{(status, headers, body)}.
    """

    isLeaf = True

    def __init__(self, allowOrigin=b"*"):
        super().__init__()
        self.allowOrigin = allowOrigin
        self.requests = []
        self.validations = []
        self.answers = {}
        self.waiting = {}
        self.hold = set()

    def render_OPTIONS(self, request):
        self.validations.append(request.getHeader(b"webhook-request-origin"))
        if self.allowOrigin is not None:
            request.setHeader(b"webhook-allowed-origin", self.allowOrigin)
        return b""

    def render_POST(self, request):
        event = request.getHeader(b"ce-eventname").decode()
        headers = {k.decode().lower(): v[0].decode()
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        body = request.content.read()
        self.requests.append((request.path.decode(), headers, body))
        for d in self.waiting.pop(event, []):
            d.callback((request.path.decode(), headers, body))
        if event in self.hold:
            return NOT_DONE_YET
        status, hdrs, answer = self.answers.get(event, (200, {}, b""))
        if callable(status):
            status = status()
        request.setResponseCode(status)
        for k, v in hdrs.items():
            request.setHeader(k, v)
        return answer

    def wait(self, event):
        d = defer.Deferred()
        self.waiting.setdefault(event, []).append(d)
        return d


class UpstreamTests(TestCase):
    @defer.inlineCallbacks
    def broker(self, handlers, upstream=None, extra=""):
        upstream = upstream or Upstream()
        port = reactor.listenTCP(0, Site(upstream), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = f"http://127.0.0.1:{port.getHost().port}"
        lines = []
        for url, user, system, *presence in handlers:
            lines.append("[[webpubsub.hubs.chat.event_handlers]]\n"
                         f'url_template = "{base}{url}"\nuser_events = "{user}"\n'
                         f"system_events = {json.dumps(system)}\n"
                         + (f"group_presence_events = {json.dumps(presence[0])}\n"
                            if presence else ""))
        toml = (f"[webpubsub]\nevent_retries = 2\n{extra}\n[webpubsub.hubs.chat]\n"
                f'access_keys = ["{KEY}"]\n' + "".join(lines))
        harness = BrokerHarness(self, reactor, toml)
        pool = attachEventHandlers(reactor, harness.core, harness.settings["webpubsub"], [KEY])
        self.addCleanup(pool.closeCachedConnections)
        # Runs after the harness has closed its clients: their disconnected
        # notifications finish first.
        self.addCleanup(lambda: defer.DeferredList(
            [hub.upstream.whenIdle() for hub in harness.core.hubs.values()]))
        yield harness.start()
        for hub in harness.core.hubs.values():
            hub.upstream.backoff = 0.01
        self.upstream = upstream
        return harness

    def assertSigned(self, headers):
        expected = "sha256=" + hmac.new(KEY.encode(), headers["ce-connectionid"].encode(),
                                        hashlib.sha256).hexdigest()
        self.assertIn(expected, headers["ce-signature"].split(","))

    @defer.inlineCallbacks
    def test_connectAnswerAndCloudEventHeaders(self):
        """
        The connect handler's answer sets the userId, groups and roles; the
        request carries the CloudEvents headers, the signature and the
        client's query (never its token).
        """
        upstream = Upstream()
        upstream.answers["connect"] = (200, {b"content-type": b"application/json",
                                             b"ce-connectionState": b"c3RhdGU="},
                                       json.dumps({"userId": "alice", "groups": ["g1"],
                                                   "roles": ["webpubsub.sendToGroup"]}).encode())
        harness = yield self.broker([("/events/{event}/{hub}", "*",
                                      ["connect", "connected", "disconnected"])], upstream)
        c = yield harness.connectJSON(query="room=blue")
        self.assertEqual(c.hello["userId"], "alice")
        path, headers, body = upstream.requests[0]
        self.assertEqual(path, "/events/connect/chat")
        self.assertEqual(headers["ce-type"], "azure.webpubsub.sys.connect")
        self.assertEqual(headers["ce-specversion"], "1.0")
        self.assertEqual(headers["ce-hub"], "chat")
        self.assertEqual(headers["ce-eventname"], "connect")
        self.assertEqual(headers["ce-source"], f"/hubs/chat/client/{c.connectionId}")
        self.assertEqual(headers["ce-connectionid"], c.connectionId)
        self.assertEqual(headers["webhook-request-origin"], "localhost")
        self.assertSigned(headers)
        payload = json.loads(body)
        self.assertEqual(payload["query"], {"room": ["blue"]})
        self.assertEqual(payload["subprotocols"], ["json.webpubsub.azure.v1"])
        self.assertNotIn("access_token", body.decode())
        # Validated once, before the first event.
        self.assertEqual(upstream.validations, [b"localhost"])
        # Group from the answer, role from the answer: sending to g1 works.
        c.send({"type": "sendToGroup", "group": "g1", "data": "hi", "ackId": 1})
        frames = [(yield c.nextJSON()), (yield c.nextJSON())]
        self.assertIn({"type": "ack", "ackId": 1, "success": True}, frames)
        # connected carries the state the connect answer set.
        path, headers, _ = yield (upstream.wait("connected")
                                  if len(upstream.requests) < 2 else
                                  defer.succeed(upstream.requests[1]))
        self.assertEqual(headers["ce-connectionstate"], "c3RhdGU=")
        self.assertEqual(headers["ce-userid"], "alice")
        disconnected = upstream.wait("disconnected")
        c.sendClose()
        path, headers, body = yield disconnected
        self.assertEqual(path, "/events/disconnected/chat")
        self.assertEqual(headers["ce-type"], "azure.webpubsub.sys.disconnected")

    @defer.inlineCallbacks
    def test_connectRefused(self):
        """
        401 and 403 from the connect handler refuse the handshake with that
        status; another failure with 500.
        """
        upstream = Upstream()
        harness = yield self.broker([("/e", "", ["connect"])], upstream)
        for status, expected in ((401, 401), (403, 403), (500, 500), (404, 500)):
            upstream.answers["connect"] = (status, {}, b"")
            e = yield self.assertFailure(harness.connect(), ConnectionRefusedByServer)
            self.assertIn(str(expected), str(e))
        upstream.answers["connect"] = (200, {}, b"not json")
        yield self.assertFailure(harness.connect(), ConnectionRefusedByServer)
        self.assertEqual(harness.core.hubs["chat"].stats.connectionsAccepted, 0)

    @defer.inlineCallbacks
    def test_unvalidatedHandlerNeverCalled(self):
        """
        A handler URL that does not allow our origin is never sent events:
        connect then fails closed (500), user events are refused.
        """
        upstream = Upstream(allowOrigin=b"https://someone-else.example")
        harness = yield self.broker([("/e", "*", ["connect"])], upstream)
        yield self.assertFailure(harness.connect(), ConnectionRefusedByServer)
        self.assertEqual(upstream.requests, [])
        self.assertEqual(len(upstream.validations), 1)

    @defer.inlineCallbacks
    def test_messageRoundTrip(self):
        """
        A user event goes up with its content type; the handler's answer
        comes back to the client, typed by its content type.
        """
        upstream = Upstream()
        upstream.answers["message"] = (200, {b"content-type": b"application/json"},
                                       b'{"echo":true}')
        harness = yield self.broker([("/e/{event}", "message,custom", [])], upstream)
        c = yield harness.connectJSON(userId="bob")
        c.send({"type": "event", "event": "message", "dataType": "json",
                "data": {"n": 1}, "ackId": 7})
        frames = [(yield c.nextJSON()), (yield c.nextJSON())]
        self.assertIn({"type": "ack", "ackId": 7, "success": True}, frames)
        reply = [f for f in frames if f["type"] == "message"][0]
        self.assertEqual((reply["from"], reply["dataType"], reply["data"]),
                         ("server", "json", {"echo": True}))
        path, headers, body = upstream.requests[-1]
        self.assertEqual(path, "/e/message")
        self.assertEqual(headers["ce-type"], "azure.webpubsub.user.message")
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(headers["ce-userid"], "bob")
        self.assertEqual(json.loads(body), {"n": 1})
        self.assertSigned(headers)
        # An event no handler takes is acked and dropped, as Azure does.
        c.send({"type": "event", "event": "other", "dataType": "text", "data": "x", "ackId": 8})
        self.assertEqual((yield c.nextJSON()), {"type": "ack", "ackId": 8, "success": True})
        self.assertEqual(len(upstream.requests), 1)

    @defer.inlineCallbacks
    def test_plainClientSendEvent(self):
        """
        Frames of a plain client in sendEvent mode become message events;
        the answer is sent back as a frame.
        """
        upstream = Upstream()
        upstream.answers["message"] = (200, {b"content-type": b"text/plain"}, b"pong")
        harness = yield self.broker([("/e", "*", [])], upstream)
        c = yield harness.connect(protocols=())
        c.sendMessage(b"ping")
        payload, isBinary = yield c.next()
        self.assertEqual((payload, isBinary), (b"pong", False))
        self.assertEqual(upstream.requests[-1][2], b"ping")
        self.assertEqual(upstream.requests[-1][1]["content-type"], "text/plain; charset=utf-8")

    @defer.inlineCallbacks
    def test_failingUserEvent(self):
        upstream = Upstream()
        upstream.answers["message"] = (500, {}, b"")
        harness = yield self.broker([("/e", "*", [])], upstream)
        c = yield harness.connectJSON()
        c.send({"type": "event", "event": "message", "dataType": "text", "data": "x",
                "ackId": 3})
        ack = yield c.nextJSON()
        self.assertEqual((ack["ackId"], ack["success"]), (3, False))

    @defer.inlineCallbacks
    def test_notificationRetries(self):
        """
        A failing connected notification is retried with backoff, then
        dropped and counted; the client is never held up by it.
        """
        upstream = Upstream()
        codes = iter([503, 502, 200])
        upstream.answers["connected"] = (lambda: next(codes), {}, b"")
        harness = yield self.broker([("/e", "", ["connected"])], upstream)
        yield harness.connectJSON()
        for _ in range(200):
            if len(upstream.requests) >= 3:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(upstream.requests), 3)
        hub = harness.core.hubs["chat"]
        self.assertEqual(hub.upstream.stats["notificationsDropped"], 0)
        upstream.answers["connected"] = (500, {}, b"")
        yield harness.connectJSON()
        for _ in range(200):
            if hub.upstream.stats["notificationsDropped"]:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(hub.upstream.stats["notificationsDropped"], 1)
        self.assertEqual(len(upstream.requests), 6)

    @defer.inlineCallbacks
    def test_slowConnectTimesOut(self):
        upstream = Upstream()
        upstream.hold.add("connect")
        harness = yield self.broker([("/e", "", ["connect"])], upstream,
                                    extra="event_timeout = 0.3")
        e = yield self.assertFailure(harness.connect(), ConnectionRefusedByServer)
        self.assertIn("500", str(e))


class _HoldingUpstream(Upstream):
    """
    Holds every user event (or every event whose C{ce-type} starts with
    C{holding}) unanswered, keeping the requests to answer.
    """

    def __init__(self, holding=b"azure.webpubsub.user."):
        super().__init__()
        self.holding = holding
        self.held = []

    def render_POST(self, request):
        if request.getHeader(b"ce-type").startswith(self.holding):
            self.requests.append(request.content.read())
            self.held.append(request)
            return NOT_DONE_YET
        return super().render_POST(request)

    def answerAll(self):
        held, self.held = self.held, []
        for request in held:
            if not request._disconnected:
                request.finish()


class EventsInFlightTests(TestCase):
    """
    A client flooding user events at a handler that does not answer gets
    at most C{max_events_in_flight} requests under way; the rest wait,
    unread, and each goes out once as answers come (up to four at once over
    the pool's connections, so they may arrive in any order).
    """

    broker = UpstreamTests.broker

    @defer.inlineCallbacks
    def _flood(self, client, send, n=500):
        upstream = self.upstream
        self.addCleanup(upstream.answerAll)
        for i in range(n):
            send(client, i)
        for _ in range(50):
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(upstream.held), 4)
        sent = 4
        while sent < n:
            upstream.answerAll()
            for _ in range(500):
                if len(upstream.held) or len(upstream.requests) == n:
                    break
                yield task.deferLater(reactor, 0.005, lambda: None)
            self.assertLessEqual(len(upstream.held), 4)
            sent = len(upstream.requests)
        return upstream.requests

    @defer.inlineCallbacks
    def test_plainClient(self):
        harness = yield self.broker([("/e/{event}", "*", [])], _HoldingUpstream(),
                                    extra="max_events_in_flight = 4")
        c = yield harness.connect(protocols=())
        bodies = yield self._flood(c, lambda c, i: c.sendMessage(b"m%d" % i))
        self.assertEqual(sorted(bodies), sorted(b"m%d" % i for i in range(500)))

    @defer.inlineCallbacks
    def test_jsonClient(self):
        harness = yield self.broker([("/e/{event}", "*", [])], _HoldingUpstream(),
                                    extra="max_events_in_flight = 4")
        c = yield harness.connectJSON()
        bodies = yield self._flood(c, lambda c, i: c.send(
            {"type": "event", "event": "e", "dataType": "text", "data": f"m{i}"}))
        self.assertEqual(sorted(bodies), sorted(b"m%d" % i for i in range(500)))


class NotificationsBoundTests(TestCase):
    """
    A client joining and leaving groups as fast as it can, each a group
    presence notification, at a handler that does not answer: at most
    C{MAX_NOTIFYING} are in flight and C{MAX_WAITING} wait (made 4 and 20
    here); the rest are dropped and counted, the client is served all
    along, and those kept all go out once the handler answers.
    """

    broker = UpstreamTests.broker

    @defer.inlineCallbacks
    def test_presenceFlood(self):
        from broker.webpubsub import upstream as upstreamModule
        self.patch(upstreamModule, "MAX_NOTIFYING", 4)
        self.patch(upstreamModule, "MAX_WAITING", 20)
        handler = _HoldingUpstream(holding=b"azure.webpubsub.gp.")
        self.addCleanup(handler.answerAll)
        harness = yield self.broker([("/h/{event}", "", [], ["joined", "left"])], handler,
                                    extra="event_timeout = 30.0")
        c = yield harness.connectJSON(userId="j", roles=("webpubsub.joinLeaveGroup",))
        for i in range(30):
            c.send({"type": "joinGroup", "group": f"g{i}", "ackId": 2 * i + 1})
            c.send({"type": "leaveGroup", "group": f"g{i}", "ackId": 2 * i + 2})
        acks = []
        for _ in range(60):
            acks.append((yield c.nextJSON()))
        self.assertEqual([(a["ackId"], a["success"]) for a in acks],
                         [(i + 1, True) for i in range(60)])
        upstream = harness.core.hub("chat").upstream
        for _ in range(100):
            if len(handler.held) == 4:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual((len(handler.held), len(upstream._pending), len(upstream._waiting)),
                         (4, 4, 20))
        self.assertEqual(upstream.stats["notificationsOverflowed"], 60 - 24)
        from prometheus_client import generate_latest
        from prometheus_client.registry import CollectorRegistry
        from broker.webpubsub.upstream import UpstreamCollector
        registry = CollectorRegistry()
        registry.register(UpstreamCollector(lambda: {"chat": upstream}))
        text = generate_latest(registry).decode()
        self.assertIn('broker_webpubsub_event_handler_notifications_dropped_total'
                      '{hub="chat",reason="overflow"} 36.0', text)
        self.assertIn('broker_webpubsub_event_handler_notifications_waiting{hub="chat"} 20.0',
                      text)
        # The handler answers: what waited goes out, four at a time.
        for _ in range(200):
            handler.answerAll()
            if len(handler.requests) == 24 and not handler.held:
                break
            self.assertLessEqual(len(handler.held), 4)
            yield task.deferLater(reactor, 0.01, lambda: None)
        yield upstream.whenIdle()
        # The first 24 (12 joins and their leaves) were kept, the later
        # dropped; four connections carry them, so in any order.
        groups = sorted(json.loads(b)["group"] for b in handler.requests)
        self.assertEqual(groups, sorted([f"g{i}" for i in range(12)] * 2))
