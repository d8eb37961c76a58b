# -*- test-case-name: tests.test_webpubsub_client_aio -*-
"""
The asynchronous client of Microsoft's client SDK
(C{azure.messaging.webpubsubclient.aio}, aiohttp's WebSocket), as an
asyncio application uses it: the reliable protocol by default, with its
socket cut and recovered, and the plain JSON protocol; groups, acked
sends, server messages, and the connected/disconnected/stopped callbacks.
The client runs on an asyncio loop of its own (L{tests.asyncioloop}).
"""

from azure.messaging.webpubsubclient.aio import WebPubSubClient, WebPubSubClientCredential
from azure.messaging.webpubsubclient.models import WebPubSubProtocolType
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from broker.core.errors import CloseCode
from broker.core.message import TEXT, Message, Target
from tests.asyncioloop import LoopThread
from tests.wsharness import BrokerHarness

ROLES = ("webpubsub.joinLeaveGroup", "webpubsub.sendToGroup")
TOML = """
[webpubsub]
recovery_window = 5.0
"""


def later(seconds=0.05):
    return task.deferLater(reactor, seconds, lambda: None)


class AsyncClientTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield BrokerHarness(self, reactor, TOML).start()
        self.hub = self.broker.core.hub("chat")
        self.loop = LoopThread()
        self.events = []

    def url(self, userId):
        return f"{self.broker.url}/client/hubs/chat?access_token=" + self.broker.token(
            userId=userId, roles=ROLES)

    def client(self, userId, credential=None, **kw):
        """
        A client of C{userId} (or of C{credential}), made on the loop, that
        records its group and server messages and its lifecycle callbacks
        in C{self.events}; closed (and the loop stopped) when the test ends.
        """
        url = self.url(userId)
        events = self.events

        async def make():
            client = WebPubSubClient(credential or url, **kw)

            async def onGroup(e):
                events.append(("group", e.group, e.data))

            async def onServer(e):
                events.append(("server", e.data))

            async def onConnected(e):
                events.append(("connected", e.connection_id, e.user_id))

            async def onDisconnected(e):
                events.append(("disconnected", e.connection_id))

            async def onStopped(*args):
                events.append(("stopped",))
            await client.subscribe("group-message", onGroup)
            await client.subscribe("server-message", onServer)
            await client.subscribe("connected", onConnected)
            await client.subscribe("disconnected", onDisconnected)
            await client.subscribe("stopped", onStopped)
            return client
        client = self.loop.wait(make())
        self.addCleanup(self.loop.close, client.close())
        return client

    def messages(self):
        return [e for e in self.events if e[0] in ("group", "server")]

    @defer.inlineCallbacks
    def until(self, predicate, timeout=20):
        for _ in range(int(timeout / 0.05)):
            if predicate():
                return
            yield later()
        self.fail(f"timed out; events: {self.events}")

    @defer.inlineCallbacks
    def test_reliableRecovery(self):
        """
        The default (reliable) protocol: acked group sends and server
        messages arrive in order; with the socket cut under the client,
        what was published meanwhile arrives once, on the same connection.
        """
        client = self.client("aio")
        yield self.loop.run(client.open())
        yield self.until(lambda: any(e[0] == "connected" for e in self.events))
        (session,) = self.hub.sessions()
        cid = session.connectionId
        self.assertIn(("connected", cid, "aio"), self.events)
        yield self.loop.run(client.join_group("g"))
        yield self.loop.run(client.send_to_group("g", "m1", "text"))
        self.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"m2"))
        self.hub.send(Target(Target.USER, "aio"), Message(TEXT, b"s1"))
        yield self.until(lambda: len(self.messages()) == 3)
        session.connection.protocol.transport.abortConnection()
        for i in (3, 4):
            self.hub.send(Target(Target.GROUP, "g"), Message(TEXT, f"m{i}".encode()))
        # Sent while the client reconnects: retried until acked.
        yield self.loop.run(client.send_to_group("g", "m5", "text"))
        yield self.until(lambda: len(self.messages()) == 6)
        yield later(0.3)
        self.assertEqual(self.messages(), [
            ("group", "g", "m1"), ("group", "g", "m2"), ("server", "s1"),
            ("group", "g", "m3"), ("group", "g", "m4"), ("group", "g", "m5")])
        (after,) = self.hub.sessions()
        self.assertEqual(after.connectionId, cid)
        # Recovered, not reconnected: no second connected event.
        self.assertEqual(len([e for e in self.events if e[0] == "connected"]), 1)

    @defer.inlineCallbacks
    def test_reconnectAndRejoin(self):
        """
        Closed by the service (as a REST C{closeConnection} closes it),
        the connection cannot be recovered: the client asks its credential
        for a fresh URL, connects again as a new connection, joins its
        groups again itself, and goes on receiving.
        """
        minted = []

        async def provide():
            minted.append(1)
            return self.url("again")
        client = self.client(None, WebPubSubClientCredential(provide),
                             reconnect_retry_backoff_factor=0.1)
        yield self.loop.run(client.open())
        (first,) = self.hub.sessions()
        yield self.loop.run(client.join_group("g"))
        yield self.hub.close(Target(Target.CONNECTION, first.connectionId),
                             CloseCode.POLICY_VIOLATION, "closed by the server")
        yield self.until(lambda: len([e for e in self.events if e[0] == "connected"]) == 2)
        yield self.until(lambda: [s.groups for s in self.hub.sessions()] == [{"g"}])
        (second,) = self.hub.sessions()
        self.assertNotEqual(second.connectionId, first.connectionId)
        self.assertEqual(len(minted), 2)
        self.assertIn(("disconnected", first.connectionId), self.events)
        self.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"after"))
        yield self.until(lambda: self.messages())
        self.assertEqual(self.messages(), [("group", "g", "after")])

    @defer.inlineCallbacks
    def test_jsonProtocol(self):
        """
        The plain JSON protocol: join, an acked send the sender sees
        (no_echo off) and one it does not, leave; closing stops the client
        and the broker sees the connection go.
        """
        client = self.client("plain", protocol_type=WebPubSubProtocolType.JSON,
                             auto_reconnect=False)
        yield self.loop.run(client.open())
        (session,) = self.hub.sessions()
        yield self.loop.run(client.join_group("g"))
        self.assertEqual(session.groups, {"g"})
        yield self.loop.run(client.send_to_group("g", {"n": 1}, "json"))
        yield self.loop.run(client.send_to_group("g", "quiet", "text", no_echo=True))
        yield self.loop.run(client.leave_group("g"))
        self.assertEqual(session.groups, set())
        yield self.until(lambda: self.messages())
        yield self.loop.run(client.close())
        yield self.until(lambda: ("stopped",) in self.events)
        yield self.until(lambda: not list(self.hub.sessions()))
        self.assertEqual(self.messages(), [("group", "g", {"n": 1})])

