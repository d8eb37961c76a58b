# -*- test-case-name: tests.test_webpubsub_reliable -*-
"""
The reliable subprotocol (L{broker.webpubsub.reliable}) over real sockets:
sequence ids, acknowledgements, recovery after a dropped socket, and the
official Python and JavaScript client SDKs recovering without losing a
message.
"""

import json
import threading

from twisted.internet import defer, protocol, reactor, task, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.python import log
from twisted.trial.unittest import TestCase

from broker.core.message import TEXT, Message, Target
from broker.webpubsub.reliable import ACK_WINDOW, RecentAckIds, ReliableLinks
from tests.nodejs import JSONLines, requireNode, spawnNode
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

    @defer.inlineCallbacks
    def test_ackIdsSurviveRecovery(self):
        """
        The ackIds a reliable client used belong to its connection, not to
        the socket: the same ackId sent again after a recovery is answered
        C{Duplicate} and not published again; a plain JSON connection's
        ackIds are its own.
        """
        rx = yield self.broker.connectJSON(groups=["g"])
        c = yield self.broker.connect(protocols=(RELIABLE,), userId="alice",
                                      roles=("webpubsub.sendToGroup",))
        hello = yield c.nextJSON()

        ack = yield c.publish("g", 7)
        self.assertTrue(ack["success"])
        self.assertEqual((yield rx.nextJSON())["data"], "m7")
        c.transport.abortConnection()
        yield c.closed
        back = yield self.broker.connect(
            protocols=(RELIABLE,), userId="alice", roles=("webpubsub.sendToGroup",),
            query=f"awps_connection_id={hello['connectionId']}"
                  f"&awps_reconnection_token={hello['reconnectionToken']}")
        self.assertEqual((yield back.nextJSON())["connectionId"], hello["connectionId"])
        dup = yield back.publish("g", 7)
        self.assertEqual((dup["ackId"], dup["success"], dup["error"]["name"]),
                         (7, False, "Duplicate"))
        self.assertTrue((yield back.publish("g", 8))["success"])
        self.assertEqual((yield rx.nextJSON())["data"], "m8")
        # Another connection (plain JSON) has ackIds of its own.
        other = yield self.broker.connectJSON(roles=["webpubsub.sendToGroup"])
        self.assertTrue((yield other.publish("g", 7))["success"])
        self.assertEqual((yield rx.nextJSON())["data"], "m7")
        yield later(0.1)
        self.assertEqual(rx.frames, [])

    def test_ackWindow(self):
        """
        A connection remembers the ackIds of its last ACK_WINDOW accepted
        requests, oldest forgotten first; a link taken over starts with the
        ackIds handed to it.
        """
        acks = RecentAckIds(limit=3)
        for a in (1, 2, 3, 4):
            acks.add(a)
        self.assertEqual((list(acks), 1 in acks, 4 in acks), ([2, 3, 4], False, True))
        self.assertEqual(list(RecentAckIds(range(10), limit=3)), [7, 8, 9])
        self.assertEqual(RecentAckIds().limit, ACK_WINDOW)
        links = ReliableLinks(reactor, 1.0, 1024)
        link = links.new("chat", "c1", None, ackIds=[5, 6])
        self.addCleanup(link.close, 1000, "done")
        self.assertEqual(list(link.recentAcks), [5, 6])
        self.assertIsNone(links.new("chat", "c2", None).recentAcks)
        links.get("chat", "c2").close(1000, "done")


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




class _Downstream(protocol.Protocol):
    """
    L{_AckCuttingProxy}'s side of a client's TCP connection: its bytes go on
    to the broker over a connection of the proxy's own.
    """

    def connectionMade(self):
        self.upstream = None
        self._early = []
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.factory.brokerPort)
        upstream = protocol.Factory.forProtocol(_Upstream)
        upstream.down = self
        endpoint.connect(upstream).addCallbacks(self._connected,
                                                lambda f: self.transport.abortConnection())

    def _connected(self, upstream):
        self.upstream = upstream
        for data in self._early:
            upstream.transport.write(data)
        self._early = None

    def dataReceived(self, data):
        if self.upstream is None:
            self._early.append(data)
        else:
            self.upstream.transport.write(data)

    def connectionLost(self, reason):
        if self.upstream is not None:
            self.upstream.transport.abortConnection()


class _Upstream(protocol.Protocol):
    def dataReceived(self, data):
        down = self.factory.down
        proxy = down.factory
        if proxy.armed and b'"type":"ack"' in data:
            # The broker has done these requests; their acks never arrive.
            proxy.armed = False
            proxy.cuts += 1
            self.transport.abortConnection()
            down.transport.abortConnection()
            return
        down.transport.write(data)

    def connectionLost(self, reason):
        self.factory.down.transport.abortConnection()


class _AckCuttingProxy(protocol.Factory):
    """
    A TCP proxy to the broker that, once armed, resets both sides of the
    connection instead of passing on the next bytes from the broker that
    carry an ack: the requests were carried out, the client never hears
    so, as when a connection dies with acks in flight.
    """

    protocol = _Downstream

    def __init__(self, brokerPort):
        self.brokerPort = brokerPort
        self.armed = False
        self.cuts = 0


@defer.inlineCallbacks
def until(predicate, timeout=20.0, step=0.05):
    for _ in range(int(timeout / step)):
        if predicate():
            return
        yield later(step)
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
        requireNode("@azure/web-pubsub-client")
        broker = yield BrokerHarness(self, reactor, TOML).start()
        hub = broker.core.hub("chat")
        url = f"{broker.url}/client/hubs/chat?access_token=" + broker.token(
            userId="js", roles=("webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"))
        node = JSONLines()
        process = spawnNode(self, node, "reliable_client.js", url)

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

    @defer.inlineCallbacks
    def test_noDuplicateAfterResets(self):
        """
        The SDK publishes 400 messages (20 awaiting their ack at once, each
        retried with its own ackId until acked, as its README advises)
        through a proxy that resets the TCP connection five times while
        acks are on their way: every message reaches the group exactly
        once, those whose ack was lost being answered C{Duplicate} when the
        client sends them again after recovering.
        """
        requireNode("@azure/web-pubsub-client")
        count, resets = 400, 5
        broker = yield BrokerHarness(self, reactor, TOML).start()
        hub = broker.core.hub("chat")
        rx = yield broker.connectJSON(groups=["room"])
        proxy = _AckCuttingProxy(broker.port.getHost().port)
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(proxy)
        self.addCleanup(listening.stopListening)
        url = f"ws://127.0.0.1:{listening.getHost().port}/client/hubs/chat?access_token=" + \
            broker.token(userId="js", roles=("webpubsub.sendToGroup",))
        node = JSONLines()
        spawnNode(self, node, "reliable_publisher.js", url, str(count), "20", "20")

        def received():
            return [json.loads(p)["data"] for p, _ in rx.frames]
        try:
            yield until(lambda: node.events("connected") or node.events("error"))
            self.assertEqual(node.events("error"), [])
            link = hub.session(node.events("connected")[0]["connectionId"]).connection
            for k in range(resets):
                yield until(lambda: len(received()) >= (k + 1) * count // (resets + 2),
                            step=0.005)
                old = link.protocol
                proxy.armed = True
                yield until(lambda: proxy.cuts == k + 1, step=0.005)
                yield until(lambda: link.protocol not in (None, old))
            yield until(lambda: node.events("done") or node.events("error"), timeout=60)
            self.assertEqual(node.events("error"), [])
            yield until(lambda: len(received()) >= count)
            yield later(0.3)
        except AssertionError as e:
            raise AssertionError(f"{e}: node said {node.lines[-5:]}; stderr {node.stderr!r}")
        got = received()
        repeated = sorted({d for d in got if got.count(d) > 1})
        self.assertEqual(repeated, [], f"published twice after {resets} resets")
        self.assertEqual(sorted(got), sorted(f"m{i}" for i in range(count)))
        acked = node.events("acked")
        self.assertEqual(sorted(e["i"] for e in acked), list(range(count)))
        # Each reset lost at least one ack of a message already published.
        duplicates = sum(e["isDuplicated"] for e in acked)
        self.assertGreaterEqual(duplicates, resets)
        log.msg(f"{duplicates} of {count} acks were Duplicate")
        # The same connection all along: recovered, never replaced.
        self.assertEqual(len(node.events("connected")), 1)
        status = yield node.ended
        self.assertEqual(status.exitCode, 0)
