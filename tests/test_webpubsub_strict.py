# -*- test-case-name: tests.test_webpubsub_strict -*-
"""
Strict JSON (L{broker.core.jsonstrict}) and typed token claims on every
input of the Web PubSub face, over real sockets: client frames of both
JSON subprotocols, REST bodies, event handlers' answers, and the JWTs of
the client endpoint and the REST API.
"""

import json
import time

import jwt
import treq
from twisted.internet import defer, reactor
from twisted.trial import unittest

from broker.core.errors import CloseCode
from tests import test_webpubsub_upstream
from tests.test_webpubsub_upstream import Upstream
from tests.wsharness import KEY, BrokerHarness, ConnectionRefusedByServer, rawToken

# Each text that Python's json.loads takes and RFC 8259 does not, and the
# reason the broker gives.
NOT_JSON = [
    (b"NaN", "NaN is not JSON"),
    (b"Infinity", "Infinity is not JSON"),
    (b"-Infinity", "-Infinity is not JSON"),
    (b"1e400", "number out of range"),
    (b'{"x":1,"x":2}', "duplicate key 'x'"),
    (b"[" * 65 + b"]" * 65, "nesting deeper than 64 levels"),
    (b"[" * 100000 + b"]" * 100000, "nesting deeper than 64 levels"),
    (b'"\\ud800"', "lone surrogate"),
    (b"\xef\xbb\xbf{}", "byte order mark"),
]


def inFrame(value):
    """
    A sendToGroup frame carrying C{value} (raw JSON bytes) as its data.
    """
    return b'{"type":"sendToGroup","group":"g","ackId":1,"dataType":"json","data":' + \
        value + b"}"


class _Base(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield BrokerHarness(self, reactor).start()


class FrameTests(_Base):
    @defer.inlineCallbacks
    def assertClosedInvalid(self, protocols, frame, why):
        """
        The sender of C{frame} gets a disconnected message saying why and
        the close code 1007 (not a dropped TCP connection); a member of the
        group receives nothing of it.
        """
        stats = self.broker.core.hub("chat").stats
        before = stats.messagesIn
        watcher = yield self.broker.connectJSON(roles=["webpubsub.joinLeaveGroup"])
        watcher.send({"type": "joinGroup", "group": "g", "ackId": 1})
        self.assertTrue((yield watcher.nextJSON())["success"])
        c = yield self.broker.connectJSON(
            protocols=protocols, roles=["webpubsub.sendToGroup", "webpubsub.joinLeaveGroup"])
        c.sendMessage(frame)
        msg = yield c.nextJSON()
        self.assertEqual((msg["type"], msg["event"]), ("system", "disconnected"))
        self.assertIn(why, msg["message"])
        code, _ = yield c.closed
        self.assertEqual(code, CloseCode.INVALID_PAYLOAD)
        other = yield self.broker.connectJSON(roles=["webpubsub.sendToGroup"])
        other.send({"type": "sendToGroup", "group": "g", "dataType": "text", "data": "ok"})
        got = yield watcher.nextJSON()
        self.assertEqual((got["type"], got["data"]), ("message", "ok"))
        self.assertEqual(stats.messagesIn, before + 1)
        watcher.sendClose()
        other.sendClose()
        yield defer.DeferredList([watcher.closed, other.closed])

    @defer.inlineCallbacks
    def test_notJSONFrames(self):
        """
        Every kind of not-quite-JSON, as the whole frame and as its data,
        closes with 1007 on json.webpubsub.azure.v1; a frame nested 100,000
        levels deep too, with no RecursionError.
        """
        for text, why in NOT_JSON:
            yield self.assertClosedInvalid(("json.webpubsub.azure.v1",), text, why)
            if not text.startswith(b"\xef"):
                yield self.assertClosedInvalid(("json.webpubsub.azure.v1",), inFrame(text), why)

    @defer.inlineCallbacks
    def test_justUnderTheDepthLimit(self):
        """
        A frame of 64 levels (its data 63) is delivered.
        """
        watcher = yield self.broker.connectJSON(roles=["webpubsub.joinLeaveGroup"])
        watcher.send({"type": "joinGroup", "group": "g", "ackId": 1})
        yield watcher.nextJSON()
        c = yield self.broker.connectJSON(roles=["webpubsub.sendToGroup"])
        c.sendMessage(inFrame(b"[" * 63 + b"]" * 63))
        self.assertEqual((yield c.nextJSON())["success"], True)
        got = yield watcher.nextJSON()
        self.assertEqual(json.dumps(got["data"]), "[" * 63 + "]" * 63)

    @defer.inlineCallbacks
    def test_reliableSubprotocol(self):
        for text, why in NOT_JSON[:1] + NOT_JSON[4:7]:
            yield self.assertClosedInvalid(("json.reliable.webpubsub.azure.v1",), text, why)


class ClientTokenTests(_Base):
    """
    The client endpoint refuses (401) a token whose claims have the wrong
    types, exactly as a bad token.
    """

    @defer.inlineCallbacks
    def status(self, token):
        url = self.broker.url.replace("ws:", "http:")
        h = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
             "Sec-WebSocket-Key": "MDEyMzQ1Njc4OWFiY2RlZg=="}
        r = yield treq.get(f"{url}/client/hubs/chat?access_token={token}", headers=h,
                           reactor=reactor, persistent=False)
        yield treq.content(r)
        return r.code

    @defer.inlineCallbacks
    def test_claimTypes(self):
        aud = self.broker.url.replace("ws:", "http:") + "/client/hubs/chat"
        exp = int(time.time() + 60)
        bad = [{"exp": str(exp)}, {"exp": True}, {"exp": None}, {"exp": [exp]},
               {"exp": exp, "nbf": None}, {"exp": exp, "nbf": "0"}, {"exp": exp, "nbf": True},
               {"exp": exp, "iat": "0"}, {"exp": exp, "iat": False},
               {"exp": exp, "iat": time.time() + 600},
               {"exp": exp, "role": [1]}, {"exp": exp, "role": {"a": "b"}},
               {"exp": exp, "role": 5}, {"exp": exp, "role": ["ok", None]},
               {"exp": exp, "webpubsub.group": [["g"]]}, {"exp": exp, "sub": 5},
               {"exp": exp, "sub": ""}]
        for claims in bad:
            token = jwt.encode(dict(claims, aud=aud), KEY, algorithm="HS256")
            self.assertEqual((yield self.status(token)), 401, claims)
        a = json.dumps(aud).encode()
        for raw in (b'{"aud":%s,"exp":NaN}' % a, b'{"aud":%s,"exp":Infinity}' % a,
                    b'{"aud":%s,"exp":1e400}' % a,
                    b'{"aud":%s,"exp":%d,"exp":%d}' % (a, exp, exp),
                    b'{"aud":%s,"exp":%d,"sub":"a","sub":"b"}' % (a, exp),
                    b'{"aud":%s,"exp":%d,"role":' % (a, exp) + b"[" * 100 + b"]" * 100 + b"}"):
            self.assertEqual((yield self.status(rawToken(raw))), 401, raw[:60])
        good = jwt.encode({"aud": aud, "exp": exp + 0.5, "nbf": time.time() - 1.5,
                           "iat": int(time.time()), "role": ["webpubsub.sendToGroup"],
                           "sub": "ann"}, KEY, algorithm="HS256")
        c = yield self.broker.connectJSON(token=good)
        self.assertEqual(c.hello["userId"], "ann")


class RestTests(_Base):
    SEND = "/api/hubs/chat/:send?api-version=2024-12-01"

    @defer.inlineCallbacks
    def request(self, body, token=None, ctype="application/json"):
        url = f"http://127.0.0.1:{self.broker.port.getHost().port}{self.SEND}"
        if token is None:
            token = jwt.encode({"aud": url, "exp": int(time.time() + 60)}, KEY,
                               algorithm="HS256")
        elif callable(token):
            token = token(url)
        r = yield treq.post(url, data=body, reactor=reactor, persistent=False,
                            headers={"Authorization": "Bearer " + token,
                                     "Content-Type": ctype})
        content = yield r.content()
        return r.code, json.loads(content) if r.code >= 400 else None

    @defer.inlineCallbacks
    def test_bodies(self):
        """
        Each not-quite-JSON body is 400 BadRequest naming why; a JSON client
        of the hub receives none of them.
        """
        watcher = yield self.broker.connectJSON()
        for text, why in NOT_JSON:
            code, error = yield self.request(text)
            self.assertEqual((code, error["code"]), (400, "BadRequest"), text[:20])
            self.assertIn(why, error["message"])
        code, error = yield self.request(b'"\xff"')
        self.assertEqual((code, error["code"]), (400, "BadRequest"))
        code, _ = yield self.request(b'{"ok":1}')
        self.assertEqual(code, 202)
        got = yield watcher.nextJSON()
        self.assertEqual((got["type"], got["data"]), ("message", {"ok": 1}))

    @defer.inlineCallbacks
    def test_claimTypes(self):
        """
        The REST API refuses tokens whose time claims are not numbers, and
        NaN or duplicate claims, as any bad token: 401.
        """
        exp = int(time.time() + 60)
        bad = [{"exp": str(exp)}, {"exp": True}, {"exp": None}, {"exp": exp, "nbf": None},
               {"exp": exp, "nbf": "0"}, {"exp": exp, "nbf": True}, {"exp": exp, "iat": "0"},
               {"exp": exp, "iat": None}, {"exp": exp, "iat": time.time() + 600}]
        for claims in bad:
            code, error = yield self.request(b"{}", lambda url: jwt.encode(
                dict(claims, aud=url), KEY, algorithm="HS256"))
            self.assertEqual((code, error["code"]), (401, "Unauthorized"), claims)
        for raw in (b'{"aud":%s,"exp":NaN}', b'{"aud":%s,"exp":-Infinity}',
                    b'{"aud":%%s,"exp":%d,"exp":1}' % exp):
            code, error = yield self.request(
                b"{}", lambda url: rawToken(raw % json.dumps(url).encode()))
            self.assertEqual((code, error["code"]), (401, "Unauthorized"), raw)
        code, _ = yield self.request(b"{}", lambda url: jwt.encode(
            {"aud": url, "exp": exp + 0.5, "iat": time.time(), "nbf": 0}, KEY,
            algorithm="HS256"))
        self.assertEqual(code, 202)


class HandlerAnswerTests(unittest.TestCase):
    """
    An event handler answering what is not strict JSON is a failed handler.
    """

    broker = test_webpubsub_upstream.UpstreamTests.broker

    @defer.inlineCallbacks
    def test_connectAnswer(self):
        upstream = Upstream()
        harness = yield self.broker([("/e", "", ["connect"])], upstream)
        for text, _ in NOT_JSON:
            upstream.answers["connect"] = (200, {b"content-type": b"application/json"}, text)
            e = yield self.assertFailure(harness.connect(), ConnectionRefusedByServer)
            self.assertIn("500", str(e))
        self.assertEqual(harness.core.hubs["chat"].stats.connectionsAccepted, 0)
        self.assertEqual(harness.core.hubs["chat"].upstream.stats["failed"], len(NOT_JSON))
        upstream.answers["connect"] = (200, {}, b'{"userId":"ann"}')
        c = yield harness.connectJSON()
        self.assertEqual(c.hello["userId"], "ann")

    @defer.inlineCallbacks
    def test_userEventAnswer(self):
        """
        The answer to a user event is embedded as it is in the client's
        frame: a NaN answer is an error ack instead, and nothing reaches
        the client but that ack.
        """
        upstream = Upstream()
        harness = yield self.broker([("/e", "*", [])], upstream)
        c = yield harness.connectJSON()
        for n, (text, _) in enumerate(NOT_JSON):
            upstream.answers["message"] = (200, {b"content-type": b"application/json"}, text)
            c.send({"type": "event", "event": "message", "dataType": "text", "data": "x",
                    "ackId": n})
            ack = yield c.nextJSON()
            self.assertEqual((ack["type"], ack["ackId"], ack["success"]), ("ack", n, False))
            self.assertEqual(ack["error"]["message"], "event handler answered invalid JSON")
        upstream.answers["message"] = (200, {b"content-type": b"application/json"}, b"[1]")
        c.send({"type": "event", "event": "message", "dataType": "text", "data": "x",
                "ackId": 99})
        frames = [(yield c.nextJSON()), (yield c.nextJSON())]
        self.assertIn({"type": "message", "from": "server", "dataType": "json", "data": [1]},
                      frames)
