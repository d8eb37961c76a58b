# -*- test-case-name: tests.test_webpubsub_rest_aio -*-
"""
The Web PubSub REST API driven by the asynchronous client of Microsoft's
service SDK (C{azure.messaging.webpubsubservice.aio}, over aiohttp), as an
asyncio backend (FastAPI, aiohttp servers) uses it: another HTTP client
than the synchronous SDK's C{requests}, with its own headers, keep-alive
pool and streamed bodies.

The SDK runs on an asyncio loop in a thread of its own for the whole test
(L{tests.asyncioloop}: one client, one connection pool, as an application
keeps them).
"""

import base64

from azure.core.exceptions import HttpResponseError
from azure.messaging.webpubsubservice.aio import WebPubSubServiceClient
from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.asyncioloop import LoopThread
from tests.test_webpubsub_rest import JOIN, SEND, _ServerConnections
from tests.wsharness import KEY, BrokerHarness


async def streamed(*pieces):
    """
    An asynchronous iterable body: aiohttp sends it with the chunked
    transfer coding, one chunk a piece, without a Content-Length.
    """
    for piece in pieces:
        yield piece


class AsyncSDK:
    """
    One C{aio.WebPubSubServiceClient} on its own asyncio loop and thread.
    """

    def __init__(self, endpoint, hub="chat", key=KEY):
        self.loop = LoopThread()

        async def make():
            return WebPubSubServiceClient.from_connection_string(
                f"Endpoint={endpoint};AccessKey={key};Version=1.0;", hub=hub)
        self.client = self.loop.wait(make(), 10)

    def call(self, name, *args, **kw):
        """
        Call the client's coroutine method C{name}; a Deferred of its result.
        """
        return self.loop.run(getattr(self.client, name)(*args, **kw))

    def close(self):
        """
        Close the client (its aiohttp session), then stop the loop.
        """
        return self.loop.close(self.client.close())


class AsyncSDKTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield BrokerHarness(self, reactor).start()
        self.connections = _ServerConnections(self.broker.site)
        self.endpoint = f"http://127.0.0.1:{self.broker.port.getHost().port}"
        self.sdk = AsyncSDK(self.endpoint)
        self.addCleanup(self.connections.abort)
        self.addCleanup(self.sdk.close)

    @defer.inlineCallbacks
    def nextMessage(self, client):
        frame = yield client.nextJSON()
        self.assertEqual(frame["type"], "message", frame)
        return frame

    @defer.inlineCallbacks
    def test_sendEverywhere(self):
        """
        Every send operation, every content type, with excluded connections
        and filters, reaches exactly the connections it names.
        """
        a = yield self.broker.connectJSON(userId="a", groups=["g"])
        b = yield self.broker.connectJSON(userId="b")
        sdk = self.sdk
        yield sdk.call("send_to_all", {"hello": ["world", 1]})
        # Non-ASCII text as bytes: the async pipeline (azure-core) declares
        # a str body's Content-Length in characters (docs/webpubsub.md).
        yield sdk.call("send_to_all", "texte é".encode("utf-8"), content_type="text/plain",
                       excluded=[b.connectionId])
        yield sdk.call("send_to_all", "ascii", content_type="text/plain",
                       excluded=[b.connectionId])
        yield sdk.call("send_to_all", b"\x00\x01\xff", content_type="application/octet-stream",
                       filter="userId eq 'b'")
        yield sdk.call("send_to_group", "g", {"n": 1})
        yield sdk.call("send_to_user", "b", "to b", content_type="text/plain")
        yield sdk.call("send_to_connection", a.connectionId, "to a", content_type="text/plain")
        f = yield self.nextMessage(a)
        self.assertEqual((f["from"], f["dataType"], f["data"]),
                         ("server", "json", {"hello": ["world", 1]}))
        self.assertEqual((yield self.nextMessage(a))["data"], "texte é")
        self.assertEqual((yield self.nextMessage(a))["data"], "ascii")
        f = yield self.nextMessage(a)
        self.assertEqual((f["from"], f["group"], f["data"]), ("group", "g", {"n": 1}))
        self.assertEqual((yield self.nextMessage(a))["data"], "to a")
        self.assertEqual((yield self.nextMessage(b))["data"], {"hello": ["world", 1]})
        f = yield self.nextMessage(b)
        self.assertEqual((f["dataType"], base64.b64decode(f["data"])),
                         ("binary", b"\x00\x01\xff"))
        self.assertEqual((yield self.nextMessage(b))["data"], "to b")

    @defer.inlineCallbacks
    def test_streamedBody(self):
        """
        A body the application streams (an asynchronous iterable: chunked
        transfer coding, no Content-Length) is read whole.
        """
        a = yield self.broker.connectJSON()
        payload = bytes(range(256)) * 300
        yield self.sdk.call("send_to_all", streamed(payload[:1000], payload[1000:]),
                            content_type="application/octet-stream")
        f = yield self.nextMessage(a)
        self.assertEqual((f["dataType"], base64.b64decode(f["data"])), ("binary", payload))

    @defer.inlineCallbacks
    def test_groupsAndQueries(self):
        """
        Membership changes, existence checks (a 404 is C{False}, not an
        error), permissions and closing, as the generated async client
        sends them.
        """
        a = yield self.broker.connectJSON(userId="u")
        sdk = self.sdk
        self.assertFalse((yield sdk.call("group_exists", "g")))
        yield sdk.call("add_connection_to_group", "g", a.connectionId)
        self.assertTrue((yield sdk.call("group_exists", "g")))
        self.assertTrue((yield sdk.call("connection_exists", a.connectionId)))
        self.assertTrue((yield sdk.call("user_exists", "u")))
        self.assertFalse((yield sdk.call("user_exists", "nobody")))
        yield sdk.call("grant_permission", "sendToGroup", a.connectionId, target_name="g")
        self.assertTrue((yield sdk.call("has_permission", "sendToGroup", a.connectionId,
                                        target_name="g")))
        self.assertFalse((yield sdk.call("has_permission", "joinLeaveGroup",
                                         a.connectionId, target_name="g")))
        yield sdk.call("remove_connection_from_group", "g", a.connectionId)
        self.assertFalse((yield sdk.call("group_exists", "g")))
        e = yield self.assertFailure(sdk.call("grant_permission", "fly", a.connectionId),
                                     HttpResponseError)
        self.assertEqual(e.status_code, 400)
        yield sdk.call("close_connection", a.connectionId, reason="bye")
        yield a.closed
        self.assertFalse((yield sdk.call("connection_exists", a.connectionId)))

    @defer.inlineCallbacks
    def test_clientAccessToken(self):
        """
        The async client signs the client's URL itself; the broker takes
        the token with its user, roles and groups.
        """
        answer = yield self.sdk.call("get_client_access_token", user_id="zoe",
                                     roles=[JOIN, SEND], groups=["start"])
        self.assertTrue(answer["url"].startswith(
            f"ws://127.0.0.1:{self.broker.port.getHost().port}/client/hubs/chat?access_token="))
        c = yield self.broker.connectJSON(token=answer["token"])
        self.assertEqual(c.hello["userId"], "zoe")
        self.assertEqual(self.broker.core.hub("chat").session(c.connectionId).groups,
                         {"start"})

    @defer.inlineCallbacks
    def test_keepAlive(self):
        """
        Forty calls, answered 202, 200 and 404 (HEAD queries among them),
        travel over the one keep-alive connection aiohttp opened, also
        after a streamed body moved that connection to twisted.web's
        channel: no answer makes it drop the connection and open another.
        """
        a = yield self.broker.connectJSON()
        before = len(self.connections.protocols)      # the WebSocket's
        for i in range(10):
            if i == 5:
                yield self.sdk.call("send_to_all", streamed(b"stream", b"ed"),
                                    content_type="application/octet-stream")
            yield self.sdk.call("send_to_all", str(i), content_type="text/plain")
            yield self.sdk.call("connection_exists", a.connectionId)
            yield self.sdk.call("group_exists", "none")
            yield self.sdk.call("send_to_all", {"i": i})
        self.assertEqual(len(self.connections.protocols), before + 1)
        for i in range(10):
            if i == 5:
                self.assertEqual(base64.b64decode((yield self.nextMessage(a))["data"]),
                                 b"streamed")
            self.assertEqual((yield self.nextMessage(a))["data"], str(i))
            self.assertEqual((yield self.nextMessage(a))["data"], {"i": i})
