# -*- test-case-name: tests.test_webpubsub_reliable -*-
"""
The reliable subprotocol (L{broker.webpubsub.reliable}) over real sockets:
sequence ids, acknowledgements, recovery after a dropped socket, and the
official Python and JavaScript client SDKs recovering without losing a
message.
"""

import json
import os
import shutil
import threading

from twisted.internet import defer, protocol, reactor, task, threads
from twisted.trial.unittest import TestCase

from broker.core.message import TEXT, Message, Target
from tests.tools import killAtCleanup, requireTool
from tests.wsharness import BrokerHarness, ConnectionRefusedByServer

RELIABLE = "json.reliable.webpubsub.azure.v1"
TOML = """
[webpubsub]
recovery_window = 5.0
"""


def later(seconds=0.05):
    return task.deferLater(reactor, seconds, lambda: None)


class ReliableTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield BrokerHarness(self, reactor, TOML).start()
        self.hub = self.broker.core.hub("chat")

    def toUser(self, userId, text):
        self.hub.send(Target(Target.USER, userId), Message(TEXT, text.encode()))

    @defer.inlineCallbacks
    def connect(self, userId="alice", query=""):
        c = yield self.broker.connect(protocols=(RELIABLE,), userId=userId, query=query)
        hello = yield c.nextJSON()
        self.assertEqual(c.response.protocol, RELIABLE)
        return c, hello

    @defer.inlineCallbacks
    def test_sequenceAndRecovery(self):
        """
        Messages carry sequence ids; after a dropped socket the client comes
        back to the same connection and gets every unacknowledged message
        again, in order, including those sent while it was away.
        """
        c, hello = yield self.connect()
        self.assertEqual(hello["event"], "connected")
        token = hello["reconnectionToken"]
        self.assertGreater(len(token), 30)
        cid = hello["connectionId"]
        self.toUser("alice", "one")
        self.toUser("alice", "two")
        first = [(yield c.nextJSON()), (yield c.nextJSON())]
        self.assertEqual([(f["sequenceId"], f["data"]) for f in first], [(1, "one"), (2, "two")])
        c.send({"type": "sequenceAck", "sequenceId": 1})
        yield later()
        c.transport.abortConnection()
        yield c.closed
        yield later()
        # Still a member of its hub, and still addressed, while away.
        self.assertTrue(self.hub.connectionExists(cid))
        self.toUser("alice", "three")
        back, again = yield self.connect(
            query=f"awps_connection_id={cid}&awps_reconnection_token={token}")
        self.assertEqual((again["connectionId"], again["userId"]), (cid, "alice"))
        resent = [(yield back.nextJSON()), (yield back.nextJSON())]
        self.assertEqual([(f["sequenceId"], f["data"]) for f in resent],
                         [(2, "two"), (3, "three")])
        self.toUser("alice", "four")
        self.assertEqual((yield back.nextJSON())["sequenceId"], 4)
        self.assertEqual(len(self.hub.sessions()), 1)

    @defer.inlineCallbacks
    def test_groupsSurviveRecovery(self):
        c, hello = yield self.connect()
        self.hub.addConnectionToGroup(hello["connectionId"], "g")
        c.transport.abortConnection()
        yield c.closed
        yield later()
        self.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"while away"))
        back, _ = yield self.connect(query=f"awps_connection_id={hello['connectionId']}"
                                           f"&awps_reconnection_token={hello['reconnectionToken']}")
        frame = yield back.nextJSON()
        self.assertEqual((frame["group"], frame["data"], frame["sequenceId"]),
                         ("g", "while away", 1))

    @defer.inlineCallbacks
    def test_refusedRecoveries(self):
        """
        A wrong token, another user's connection or an unknown id is refused
        (404); so is a recovery on the plain JSON subprotocol.
        """
        c, hello = yield self.connect()
        cid, token = hello["connectionId"], hello["reconnectionToken"]
        c.transport.abortConnection()
        yield c.closed
        for userId, query in (("alice", f"awps_connection_id={cid}&awps_reconnection_token=x"),
                              ("mallory", f"awps_connection_id={cid}&awps_reconnection_token={token}"),
                              ("alice", f"awps_connection_id=nope&awps_reconnection_token={token}")):
            e = yield self.assertFailure(
                self.broker.connect(protocols=(RELIABLE,), userId=userId, query=query),
                ConnectionRefusedByServer)
            self.assertIn("404", str(e))
        e = yield self.assertFailure(
            self.broker.connect(userId="alice",
                                query=f"awps_connection_id={cid}&awps_reconnection_token={token}"),
            ConnectionRefusedByServer)
        self.assertIn("404", str(e))

    @defer.inlineCallbacks
    def test_windowEnds(self):
        """
        After the recovery window the connection is removed and cannot be
        recovered.
        """
        links = self.broker.factory.links
        links.window = 0.2
        c, hello = yield self.connect()
        c.transport.abortConnection()
        yield c.closed
        yield later(0.5)
        self.assertFalse(self.hub.connectionExists(hello["connectionId"]))
        yield self.assertFailure(
            self.connect(query=f"awps_connection_id={hello['connectionId']}"
                               f"&awps_reconnection_token={hello['reconnectionToken']}"),
            ConnectionRefusedByServer)

    @defer.inlineCallbacks
    def test_normalCloseEnds(self):
        c, hello = yield self.connect()
        c.sendClose(1000)
        yield c.closed
        yield later()
        self.assertFalse(self.hub.connectionExists(hello["connectionId"]))

    @defer.inlineCallbacks
    def test_serverCloseEnds(self):
        """
        The server closing the connection (the REST API's close) ends it for
        good, with the disconnected message.
        """
        c, hello = yield self.connect()
        self.hub.closeConnections([self.hub.session(hello["connectionId"])], 1000, "bye")
        frame = yield c.nextJSON()
        self.assertEqual((frame["event"], frame["message"]), ("disconnected", "bye"))
        yield c.closed
        self.assertFalse(self.hub.connectionExists(hello["connectionId"]))

    @defer.inlineCallbacks
    def test_unacknowledgedBound(self):
        """
        A client that never acknowledges is closed as a slow consumer once
        its unacknowledged messages pass the output buffer limit.
        """
        self.broker.factory.links.maxBuffered = 4096
        c, hello = yield self.connect()
        for i in range(100):
            self.toUser("alice", "x" * 100)
        yield c.closed
        self.assertEqual(c.closeCode, 1013)
        self.assertFalse(self.hub.connectionExists(hello["connectionId"]))
        self.assertEqual(self.broker.factory.links.slowConsumers, 1)


class OfficialClientSDKTests(TestCase):
    """
    C{azure-messaging-webpubsubclient} with its default, reliable protocol:
    the socket is cut under it and it recovers the same connection without
    losing a message.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_recoverAfterDroppedSocket(self):
        from azure.messaging.webpubsubclient import WebPubSubClient

        broker = yield BrokerHarness(self, reactor, TOML).start()
        hub = broker.core.hub("chat")
        url = f"{broker.url}/client/hubs/chat?access_token=" + broker.token(
            userId="sdk", roles=("webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"))
        client = WebPubSubClient(url)
        got = []
        enough = threading.Event()

        def onGroup(e):
            got.append(e.data)
            if len(got) >= 6:
                enough.set()
        client.subscribe("group-message", onGroup)
        yield threads.deferToThread(client.open)
        self.addCleanup(threads.deferToThread, client.close)
        yield threads.deferToThread(client.join_group, "g")
        yield threads.deferToThread(client.send_to_group, "g", "m1", "text")
        for i in (2, 3):
            hub.send(Target(Target.GROUP, "g"), Message(TEXT, f"m{i}".encode()))
        yield later(0.3)
        (session,) = hub.sessions()
        cid = session.connectionId
        # Cut the socket under the client, then publish while it is away.
        session.connection.protocol.transport.abortConnection()
        for i in (4, 5):
            hub.send(Target(Target.GROUP, "g"), Message(TEXT, f"m{i}".encode()))
        for _ in range(200):
            link = session.connection
            if link.protocol is not None and link.protocol.state == link.protocol.STATE_OPEN \
                    and link.protocol.transport is not None:
                break
            yield later()
        yield threads.deferToThread(client.send_to_group, "g", "m6", "text")
        ok = yield threads.deferToThread(enough.wait, 20)
        self.assertTrue(ok, got)
        self.assertEqual(got, ["m1", "m2", "m3", "m4", "m5", "m6"])
        (after,) = hub.sessions()
        self.assertEqual(after.connectionId, cid)


JS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js")
NODE = shutil.which("node")


class _NodeClient(protocol.ProcessProtocol):
    """
    tests/js/reliable_client.js under node: its JSON lines, as they come.
    """

    def __init__(self):
        self.lines = []
        self.ended = defer.Deferred()
        self._buffer = b""
        self.stderr = b""

    def outReceived(self, data):
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self.lines.append(json.loads(line))

    def errReceived(self, data):
        self.stderr += data

    def processEnded(self, reason):
        self.ended.callback(reason.value)

    def events(self, kind):
        return [e for e in self.lines if e["event"] == kind]


@defer.inlineCallbacks
def until(predicate, timeout=20.0):
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        yield later()
    raise AssertionError("timed out")


class OfficialJavaScriptClientTests(TestCase):
    """
    Microsoft's npm C{@azure/web-pubsub-client} (reliable protocol by
    default), installed by scripts/test into tests/js/node_modules and run
    by node: the socket is cut under it and it recovers the same connection
    without losing or repeating a message.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_recoverAfterDroppedSocket(self):
        requireTool(NODE is not None, "node is not installed (scripts/test installs nodejs)")
        requireTool(os.path.isdir(os.path.join(JS_DIR, "node_modules", "@azure",
                                               "web-pubsub-client")),
                    "@azure/web-pubsub-client is not in tests/js (scripts/test runs npm ci)")
        broker = yield BrokerHarness(self, reactor, TOML).start()
        hub = broker.core.hub("chat")
        url = f"{broker.url}/client/hubs/chat?access_token=" + broker.token(
            userId="js", roles=("webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"))
        node = _NodeClient()
        process = reactor.spawnProcess(
            node, NODE, [NODE, os.path.join(JS_DIR, "reliable_client.js"), url],
            env={"PATH": os.environ.get("PATH", "")}, path=JS_DIR)
        killAtCleanup(self, process, node.ended)

        def publish(text):
            hub.send(Target(Target.GROUP, "room"), Message(TEXT, text.encode()))
        try:
            yield until(lambda: node.events("joined") or node.events("error"))
            self.assertEqual(node.events("error"), [])
            cid = node.events("connected")[0]["connectionId"]
            process.write(b"send j1\n")
            yield until(lambda: node.events("sent"))
            publish("j2")
            yield until(lambda: len(node.events("group")) == 2)
            link = hub.session(cid).connection
            yield until(lambda: link.unacknowledged == 0)
            old = link.protocol
            old.transport.abortConnection()
            for i in (3, 4):
                publish(f"j{i}")
            yield until(lambda: link.protocol not in (None, old))
            publish("j5")
            yield until(lambda: len(node.events("group")) == 5)
        except AssertionError as e:
            raise AssertionError(f"{e}: node said {node.lines}; stderr {node.stderr!r}")
        got = node.events("group")
        self.assertEqual([g["data"] for g in got], [f"j{i}" for i in range(1, 6)])
        self.assertEqual([g["sequenceId"] for g in got], [1, 2, 3, 4, 5])
        self.assertEqual(len(node.events("connected")), 1)
        self.assertTrue(hub.connectionExists(cid))
        process.write(b"stop\n")
        status = yield node.ended
        self.assertEqual(status.exitCode, 0)
        self.assertEqual(node.events("stopped"), [{"event": "stopped"}])
        yield until(lambda: not hub.connectionExists(cid))
