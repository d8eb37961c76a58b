# -*- test-case-name: tests.test_webpubsub -*-
"""
The Web PubSub client face over real loopback WebSockets.
"""

import base64

import treq
from twisted.internet import defer, reactor
from twisted.trial import unittest

from broker.auth.tokens import makeClientToken
from broker.core.errors import CloseCode
from broker.core.message import Message, Target
from tests.wsharness import BrokerHarness

JOIN = "webpubsub.joinLeaveGroup"
SEND = "webpubsub.sendToGroup"


class _Base(unittest.TestCase):
    toml = ""

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield BrokerHarness(self, reactor, self.toml).start()

    def hub(self, name="chat"):
        return self.broker.core.hub(name)


class HandshakeTests(_Base):
    @defer.inlineCallbacks
    def _status(self, path, headers=None):
        h = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
             "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode()}
        h.update(headers or {})
        r = yield treq.get(self.broker.url.replace("ws:", "http:") + path, headers=h,
                           reactor=reactor, persistent=False)
        yield treq.content(r)
        return r.code

    @defer.inlineCallbacks
    def test_noToken(self):
        self.assertEqual((yield self._status("/client/hubs/chat")), 401)

    @defer.inlineCallbacks
    def test_badSignature(self):
        tok = makeClientToken("another-key", "http://x/client/hubs/chat")
        self.assertEqual((yield self._status("/client/hubs/chat?access_token=" + tok)), 401)

    @defer.inlineCallbacks
    def test_expired(self):
        tok = self.broker.token(lifetime=-60)
        self.assertEqual((yield self._status("/client/hubs/chat?access_token=" + tok)), 401)

    @defer.inlineCallbacks
    def test_wrongAudience(self):
        tok = self.broker.token(hub="other")
        self.assertEqual((yield self._status("/client/hubs/chat?access_token=" + tok)), 401)

    @defer.inlineCallbacks
    def test_garbageToken(self):
        self.assertEqual((yield self._status("/client/hubs/chat?access_token=not.a.jwt")), 401)
        self.assertEqual(self.broker.core.stats()["connectionsRejected"], 1)
        self.assertNotIn("chat", self.broker.core.hubs, "a refused client created a hub")

    @defer.inlineCallbacks
    def test_bearerHeader(self):
        c = yield self.broker.connect(token=None,
                                      headers={"Authorization": "Bearer " + self.broker.token()})
        hello = yield c.nextJSON()
        self.assertEqual(hello["event"], "connected")

    @defer.inlineCallbacks
    def test_badHubName(self):
        self.assertEqual((yield self._status("/client/hubs/9bad-name")), 404)

    @defer.inlineCallbacks
    def test_connectedMessage(self):
        c = yield self.broker.connect(userId="alice")
        hello = yield c.nextJSON()
        self.assertEqual(hello["type"], "system")
        self.assertEqual(hello["event"], "connected")
        self.assertEqual(hello["userId"], "alice")
        self.assertTrue(self.hub().connectionExists(hello["connectionId"]))
        self.assertEqual(c.response.protocol, "json.webpubsub.azure.v1")

    @defer.inlineCallbacks
    def test_initialGroups(self):
        c = yield self.broker.connectJSON(userId="a", groups=["g1", "g2"])
        self.assertEqual(self.hub().session(c.connectionId).groups, {"g1", "g2"})

    @defer.inlineCallbacks
    def test_disconnectRemoves(self):
        c = yield self.broker.connectJSON(userId="a", groups=["g1"])
        c.sendClose(1000)
        yield c.closed
        yield _settle()
        self.assertFalse(self.hub().connectionExists(c.connectionId))
        self.assertFalse(self.hub().groupExists("g1"))
        self.assertFalse(self.hub().userExists("a"))


class JSONSubprotocolTests(_Base):
    @defer.inlineCallbacks
    def test_joinWithoutPermission(self):
        c = yield self.broker.connectJSON()
        c.send({"type": "joinGroup", "group": "g", "ackId": 1})
        ack = yield c.nextJSON()
        self.assertEqual(ack["type"], "ack")
        self.assertEqual(ack["ackId"], 1)
        self.assertFalse(ack["success"])
        self.assertEqual(ack["error"]["name"], "Forbidden")
        self.assertFalse(self.hub().groupExists("g"))

    @defer.inlineCallbacks
    def test_joinSendLeave(self):
        a = yield self.broker.connectJSON(userId="a", roles=[JOIN, SEND])
        b = yield self.broker.connectJSON(userId="b", roles=[f"{JOIN}.g", f"{SEND}.g"])
        for c in (a, b):
            c.send({"type": "joinGroup", "group": "g", "ackId": 1})
            self.assertEqual((yield c.nextJSON()), {"type": "ack", "ackId": 1, "success": True})
        b.send({"type": "sendToGroup", "group": "g", "ackId": 2, "dataType": "json",
                "data": {"hello": ["world", 1]}})
        frames = [(yield b.nextJSON()), (yield b.nextJSON())]
        self.assertIn({"type": "ack", "ackId": 2, "success": True}, frames)
        expected = {"type": "message", "from": "group", "group": "g", "fromUserId": "b",
                    "dataType": "json", "data": {"hello": ["world", 1]}}
        self.assertIn(expected, frames)
        self.assertEqual((yield a.nextJSON()), expected)
        a.send({"type": "leaveGroup", "group": "g", "ackId": 3})
        self.assertEqual((yield a.nextJSON())["success"], True)
        b.send({"type": "sendToGroup", "group": "g", "ackId": 4, "dataType": "text",
                "data": "only b", "noEcho": True})
        self.assertEqual((yield b.nextJSON()), {"type": "ack", "ackId": 4, "success": True})
        yield _settle()
        self.assertEqual(a.frames, [])

    @defer.inlineCallbacks
    def test_groupScopedRole(self):
        c = yield self.broker.connectJSON(roles=[f"{JOIN}.only", f"{SEND}.only"])
        c.send({"type": "joinGroup", "group": "other", "ackId": 1})
        self.assertEqual((yield c.nextJSON())["error"]["name"], "Forbidden")
        c.send({"type": "sendToGroup", "group": "other", "ackId": 2, "data": "x",
                "dataType": "text"})
        self.assertEqual((yield c.nextJSON())["error"]["name"], "Forbidden")
        c.send({"type": "joinGroup", "group": "only", "ackId": 3})
        self.assertTrue((yield c.nextJSON())["success"])

    @defer.inlineCallbacks
    def test_sendWithoutPermissionDeliversNothing(self):
        rx = yield self.broker.connectJSON(groups=["g"])
        tx = yield self.broker.connectJSON()
        tx.send({"type": "sendToGroup", "group": "g", "ackId": 1, "data": "x",
                 "dataType": "text"})
        self.assertEqual((yield tx.nextJSON())["error"]["name"], "Forbidden")
        yield _settle()
        self.assertEqual(rx.frames, [])
        self.assertEqual(self.hub().stats.messagesOut, 0)

    @defer.inlineCallbacks
    def test_dataTypes(self):
        rx = yield self.broker.connectJSON(groups=["g"])
        tx = yield self.broker.connectJSON(roles=[SEND])
        blob = base64.b64encode(bytes(range(256))).decode()
        cases = [("text", "héllo"), ("json", [1, {"a": None}]), ("json", "a string"),
                 ("binary", blob)]
        for dataType, data in cases:
            tx.send({"type": "sendToGroup", "group": "g", "dataType": dataType, "data": data})
            msg = yield rx.nextJSON()
            self.assertEqual((msg["dataType"], msg["data"]), (dataType, data))
            self.assertNotIn("fromUserId", msg)

    @defer.inlineCallbacks
    def test_duplicateAckId(self):
        rx = yield self.broker.connectJSON(groups=["g"])
        tx = yield self.broker.connectJSON(roles=[SEND])
        for _ in range(2):
            tx.send({"type": "sendToGroup", "group": "g", "ackId": 7, "data": "once",
                     "dataType": "text"})
        self.assertTrue((yield tx.nextJSON())["success"])
        dup = yield tx.nextJSON()
        self.assertFalse(dup["success"])
        self.assertEqual(dup["error"]["name"], "Duplicate")
        self.assertEqual((yield rx.nextJSON())["data"], "once")
        yield _settle()
        self.assertEqual(rx.frames, [])

    @defer.inlineCallbacks
    def test_invalidRequests(self):
        c = yield self.broker.connectJSON(roles=[JOIN, SEND])
        bad = [
            {"type": "bogus", "ackId": 1},
            {"type": "joinGroup", "ackId": 2},
            {"type": "sendToGroup", "group": "g", "ackId": 3},
            {"type": "sendToGroup", "group": "g", "ackId": 4, "dataType": "binary",
             "data": "!!!notbase64"},
            {"type": "sendToGroup", "group": "g", "ackId": 5, "dataType": "text", "data": 5},
            {"type": "sendToGroup", "group": "g", "ackId": 6, "dataType": "xml", "data": ""},
            {"type": "event", "ackId": 7, "data": "x"},
            {"type": "joinGroup", "group": "x" * 1025, "ackId": 8},
        ]
        for req in bad:
            c.send(req)
            ack = yield c.nextJSON()
            self.assertEqual((ack["ackId"], ack["success"], ack["error"]["name"]),
                             (req["ackId"], False, "BadRequest"), req)
        c.send({"type": "joinGroup", "group": "still-alive", "ackId": 9})
        self.assertTrue((yield c.nextJSON())["success"])

    @defer.inlineCallbacks
    def test_malformedJSONCloses(self):
        c = yield self.broker.connectJSON()
        c.sendMessage(b"{not json")
        msg = yield c.nextJSON()
        self.assertEqual((msg["type"], msg["event"]), ("system", "disconnected"))
        code, _ = yield c.closed
        self.assertEqual(code, CloseCode.INVALID_PAYLOAD)

    @defer.inlineCallbacks
    def test_binaryFrameCloses(self):
        c = yield self.broker.connectJSON()
        c.sendMessage(b"\x00\x01", isBinary=True)
        code, _ = yield c.closed
        self.assertEqual(code, CloseCode.UNSUPPORTED_DATA)

    @defer.inlineCallbacks
    def test_eventWithoutUpstreamAcked(self):
        c = yield self.broker.connectJSON()
        c.send({"type": "event", "event": "hello", "ackId": 1, "dataType": "text", "data": "x"})
        self.assertEqual((yield c.nextJSON()), {"type": "ack", "ackId": 1, "success": True})

    @defer.inlineCallbacks
    def test_eventToUpstreamWithReply(self):
        seen = []

        class Upstream:
            def userEvent(self, session, event, message):
                seen.append((session.userId, event, message))
                return defer.succeed(Message.json({"echo": event}))

        self.hub().upstream = Upstream()
        c = yield self.broker.connectJSON(userId="u")
        c.send({"type": "event", "event": "hello", "ackId": 1, "dataType": "json",
                "data": {"x": 1}})
        frames = [(yield c.nextJSON()), (yield c.nextJSON())]
        self.assertIn({"type": "message", "from": "server", "dataType": "json",
                       "data": {"echo": "hello"}}, frames)
        self.assertIn({"type": "ack", "ackId": 1, "success": True}, frames)
        self.assertEqual(seen, [("u", "hello", Message.json({"x": 1}))])

    @defer.inlineCallbacks
    def test_serverMessages(self):
        a = yield self.broker.connectJSON(userId="u1", groups=["g"])
        b = yield self.broker.connectJSON(userId="u2")
        hub = self.hub()
        yield hub.send(Target(Target.USER, "u2"), Message.text("to user"))
        self.assertEqual((yield b.nextJSON()), {"type": "message", "from": "server",
                                                 "dataType": "text", "data": "to user"})
        yield hub.send(Target(Target.HUB, excluded=[b.connectionId]), Message.text("all"))
        self.assertEqual((yield a.nextJSON())["data"], "all")
        yield hub.send(Target(Target.GROUP, "g"), Message.binary(b"\xff"))
        msg = yield a.nextJSON()
        self.assertEqual((msg["from"], msg["group"], msg["data"]), ("group", "g", "/w=="))
        yield hub.send(Target(Target.CONNECTION, b.connectionId), Message.json(None))
        self.assertEqual((yield b.nextJSON())["data"], None)
        yield _settle()
        self.assertEqual((a.frames, b.frames), ([], []))

    @defer.inlineCallbacks
    def test_serverClose(self):
        c = yield self.broker.connectJSON()
        self.hub().session(c.connectionId).close(CloseCode.POLICY_VIOLATION, "bye now")
        msg = yield c.nextJSON()
        self.assertEqual(msg, {"type": "system", "event": "disconnected", "message": "bye now"})
        code, reason = yield c.closed
        self.assertEqual((code, reason), (CloseCode.POLICY_VIOLATION, "bye now"))


class FrameLimitTests(_Base):
    toml = "[webpubsub]\nmax_frame_size = 1024\n"

    @defer.inlineCallbacks
    def test_oversizedFrameClosed(self):
        c = yield self.broker.connectJSON(roles=[SEND])
        c.send({"type": "sendToGroup", "group": "g", "dataType": "text", "data": "x" * 2000})
        code, _ = yield c.closed
        self.assertEqual(code, CloseCode.MESSAGE_TOO_BIG)

    @defer.inlineCallbacks
    def test_underLimitFine(self):
        c = yield self.broker.connectJSON(roles=[SEND])
        c.send({"type": "sendToGroup", "group": "g", "dataType": "text", "data": "x" * 900,
                "ackId": 1})
        self.assertTrue((yield c.nextJSON())["success"])


class PlainClientTests(_Base):
    toml = """
[webpubsub.hubs.events]
plain_mode = "sendEvent"
[webpubsub.hubs.rooms]
plain_mode = "sendToGroup"
plain_group = "lobby"
"""

    @defer.inlineCallbacks
    def test_sendEventWithoutUpstreamCloses(self):
        c = yield self.broker.connect("events", protocols=())
        self.assertIsNone(c.response.protocol)
        c.sendMessage(b"hello")
        code, _ = yield c.closed
        self.assertEqual(code, CloseCode.POLICY_VIOLATION)

    @defer.inlineCallbacks
    def test_sendEventToUpstream(self):
        got = []

        class Upstream:
            def userEvent(self, session, event, message):
                got.append((event, message))
                return defer.succeed(Message.text("reply"))

        self.hub("events").upstream = Upstream()
        c = yield self.broker.connect("events", protocols=("custom.v1",))
        self.assertEqual(c.response.protocol, "custom.v1")
        c.sendMessage(b"\x01\x02", isBinary=True)
        self.assertEqual((yield c.next()), (b"reply", False))
        self.assertEqual(got, [("message", Message.binary(b"\x01\x02"))])

    @defer.inlineCallbacks
    def test_sendToGroupMode(self):
        rx = yield self.broker.connect("rooms", protocols=(), groups=["lobby"])
        json_rx = yield self.broker.connectJSON("rooms", groups=["lobby"])
        tx = yield self.broker.connect("rooms", protocols=(), roles=[f"{SEND}.lobby"])
        tx.sendMessage(b"text frame")
        tx.sendMessage(b"\x00bin", isBinary=True)
        self.assertEqual((yield rx.next()), (b"text frame", False))
        self.assertEqual((yield rx.next()), (b"\x00bin", True))
        msg = yield json_rx.nextJSON()
        self.assertEqual((msg["dataType"], msg["data"]), ("text", "text frame"))
        self.assertEqual((yield json_rx.nextJSON())["dataType"], "binary")

    @defer.inlineCallbacks
    def test_sendToGroupModeForbidden(self):
        """
        A plain client without the permission may listen, but its first
        frame closes it: there is no ack to refuse it with.
        """
        tx = yield self.broker.connect("rooms", protocols=())
        tx.sendMessage(b"nope")
        code, _ = yield tx.closed
        self.assertEqual(code, CloseCode.POLICY_VIOLATION)


class SlowConsumerTests(_Base):
    toml = "[webpubsub]\nmax_output_buffer = 16384\n"

    @defer.inlineCallbacks
    def test_slowConsumerClosedAndCounted(self):
        slow = yield self.broker.connectJSON(groups=["g"])
        fast = yield self.broker.connectJSON(groups=["g"])
        slow.transport.pauseProducing()          # stop reading: a consumer that stalls
        hub = self.hub()
        # Loopback sockets absorb several MiB in kernel buffers before the
        # broker's own buffer fills, so push well past that.
        payload = Message.text("x" * 65536)
        fastGot = 0
        for i in range(1000):
            hub.send(Target(Target.GROUP, "g"), payload)
            if hub.stats.slowConsumerDrops:
                break
            # Let the reactor flush sockets, as a real publisher would.
            yield _settle()
            while fast.frames:
                fast.frames.pop()
                fastGot += 1
        self.assertEqual(hub.stats.slowConsumerDrops, 1)
        self.assertFalse(hub.connectionExists(slow.connectionId))
        self.assertTrue(hub.connectionExists(fast.connectionId))
        self.assertGreater(fastGot, 0)
        slow.transport.resumeProducing()
        code, _ = yield slow.closed
        self.assertIn(code, (CloseCode.SLOW_CONSUMER, None, 1006))


def _settle(n=3):
    """
    Let the reactor run a few turns so frames in flight arrive.
    """
    d = defer.succeed(None)
    for _ in range(n):
        d.addCallback(lambda _: _sleep(0.01))
    return d


def _sleep(t):
    d = defer.Deferred()
    reactor.callLater(t, d.callback, None)
    return d


class TLSTests(unittest.TestCase):
    """
    The same face behind a real TLS listener (wss://), with a throwaway
    certificate.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield BrokerHarness(self, reactor, tls=True).start()

    @defer.inlineCallbacks
    def test_pubSubOverTLS(self):
        rx = yield self.broker.connectJSON(groups=["g"])
        tx = yield self.broker.connectJSON(roles=[SEND])
        tx.send({"type": "sendToGroup", "group": "g", "ackId": 1, "dataType": "text",
                 "data": "secret"})
        self.assertEqual((yield tx.nextJSON())["success"], True)
        self.assertEqual((yield rx.nextJSON())["data"], "secret")
        hub = self.broker.core.hub("chat")
        self.assertEqual(hub.connectionCount, 2)


class HandshakeRefusalTests(_Base):
    toml = """
[webpubsub.hubs.rooms]
plain_mode = "sendToGroup"
plain_group = "lobby"
"""

    @defer.inlineCallbacks
    def test_badUserIdInToken(self):
        why = yield self.broker.refused(userId="u" * 2000)
        self.assertIn("400", why)
        self.assertEqual(self.hub().connectionCount, 0)

    @defer.inlineCallbacks
    def test_refusedHandshakeCreatesNoHub(self):
        why = yield self.broker.refused(hub="rooms", userId="u" * 2000)
        self.assertIn("400", why)
        self.assertNotIn("rooms", self.broker.core.hubs)


class PingAndRetryTests(_Base):
    @defer.inlineCallbacks
    def test_ping(self):
        c = yield self.broker.connectJSON()
        c.send({"type": "ping"})
        self.assertEqual((yield c.nextJSON()), {"type": "pong"})

    @defer.inlineCallbacks
    def test_refusedAckIdMayBeRetried(self):
        c = yield self.broker.connectJSON()
        c.send({"type": "joinGroup", "group": "g", "ackId": 1})
        self.assertEqual((yield c.nextJSON())["error"]["name"], "Forbidden")
        self.hub().session(c.connectionId).permissions.grant("joinLeaveGroup")
        c.send({"type": "joinGroup", "group": "g", "ackId": 1})
        self.assertTrue((yield c.nextJSON())["success"])


class PublisherBackpressureTests(_Base):
    toml = "[webpubsub]\nfanout_chunk = 2\n"

    @defer.inlineCallbacks
    def test_floodingPublisherThrottledNothingLost(self):
        """
        A publisher faster than the fan-out is paused while the backlog
        drains; every receiver still gets every message, in order.
        """
        receivers = []
        for _ in range(10):
            receivers.append((yield self.broker.connect(protocols=(), groups=["g"])))
        pub = yield self.broker.connectJSON(roles=[SEND])
        n = 200
        for i in range(n):
            pub.send({"type": "sendToGroup", "group": "g", "dataType": "text", "data": str(i)})
        for r in receivers:
            got = []
            for _ in range(n):
                payload, _ = yield r.next()
                got.append(payload)
            self.assertEqual(got, [str(i).encode() for i in range(n)])
        hub = self.hub()
        self.assertGreater(hub.stats.publishersThrottled, 0)
        self.assertEqual(self.broker.core.fanout.backlog, 0)
