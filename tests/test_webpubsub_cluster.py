# -*- test-case-name: tests.test_webpubsub_cluster -*-
"""
The Web PubSub face in cluster mode over a real redis-server: two nodes
(two cores, two Clusters over one Redis, each with its own WebSocket
listener) in one process.  Group history is shared (published on one node,
recovered on the other); a reliable client whose socket dropped on one node
resumes on the other without losing or repeating a message; Redis outages
and dead nodes are answered honestly.

The engine is not cluster-wide here: each node's publishes reach only its
own connections, so cross-node deliveries go through this face's own code
(the shared history, the hand-over's forwarding).
"""

import json
import time

import jwt
import treq
import txredisapi
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from broker.cluster.node import Cluster
from broker.cluster.redis import RedisClient
from broker.core.interfaces import IHubObserver
from broker.core.router import Core
from broker.core.message import BINARY, FROM_GROUP, TEXT, Delivery, Message, Target
from broker.webpubsub.handover import RELEASE, Overlap
from broker.webpubsub.site import makeFactory, makeSite
from tests.redisserver import RedisServer
from tests.test_cluster_redis import waitFor
from tests.wsharness import KEY, BrokerHarness, ConnectionRefusedByServer

RELIABLE = "json.reliable.webpubsub.azure.v1"
TOML = """
[webpubsub]
recovery_window = 5.0

[webpubsub.hubs.chat]
history_messages = 100
"""


def later(seconds=0.05):
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def frames(client, n):
    out = []
    for _ in range(n):
        out.append((yield client.nextJSON()))
    return out


@implementer(IHubObserver)
class Events:
    """
    The connected / disconnected events a Web PubSub observer (upstream,
    event listeners) reports: none for a link moving between nodes.
    """

    def __init__(self):
        self.seen = []
        # Group joins and leaves, as group presence events report them.
        self.membership = []

    def connectionAdded(self, hub, session):
        if not getattr(session.connection, "moving", False):
            self.seen.append(("connected", session.connectionId))

    def connectionRemoved(self, hub, session, reason):
        if not getattr(session.connection, "moving", False):
            self.seen.append(("disconnected", session.connectionId))

    def clientEvent(self, hub, session, event, message):
        pass

    def membershipChanged(self, hub, session, group, joined):
        if not getattr(session.connection, "moving", False):
            self.membership.append(("joined" if joined else "left", session.connectionId,
                                    group))


try:
    from broker.cluster.engine import RedisEngine
except ImportError:
    RedisEngine = None


class Node(BrokerHarness):
    """
    One broker node: the test harness's core and site, built with a
    L{Cluster} over the shared Redis; with C{engine}, the core's engine is
    the cluster-wide L{RedisEngine} too.
    """

    def __init__(self, testCase, redisURL, nodeId, engine=False):
        super().__init__(testCase, reactor, TOML)
        self.client = RedisClient(reactor, redisURL, maxDelay=0.3)
        self.cluster = Cluster(reactor, self.client, prefix="t", nodeId=nodeId,
                               heartbeat=0.1, deadAfter=0.4)
        if engine:
            self.core = Core(reactor, engine=RedisEngine(self.cluster),
                             fanoutChunk=self.settings["webpubsub"]["fanout_chunk"])

    @defer.inlineCallbacks
    def start(self):
        self.client.startService()
        self.cluster.startService()
        self.testCase.addCleanup(self._stopCluster)
        wps = self.settings["webpubsub"]
        self.factory = makeFactory(self.core, wps, [KEY], reactor, cluster=self.cluster)
        self.site = makeSite(self.factory)
        self.core.startService()
        self.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.site)
        self.testCase.addCleanup(self.stop)
        self.testCase.addCleanup(self.factory.links.stop)
        self.hub = self.core.hub("chat")
        self.events = Events()
        self.hub.addObserver(self.events)
        yield waitFor(lambda: self.cluster.healthy)
        return self

    @defer.inlineCallbacks
    def _stopCluster(self):
        if self.cluster.running:
            yield self.cluster.stopService()
        # A heartbeat cut by the client's stop is logged as a failure by
        # node.py: let the one in flight end first.
        yield waitFor(lambda: not self.cluster._beating)
        yield self.client.stopService()


class ClusterTestCase(TestCase):
    engine = False

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(self, reactor)
        yield self.redis.start()
        self.a = yield Node(self, self.redis.url, "a", self.engine).start()
        self.b = yield Node(self, self.redis.url, "b", self.engine).start()


class HistoryTests(ClusterTestCase):
    @defer.inlineCallbacks
    def join(self, client, group, position, ackId):
        client.send({"type": "joinGroup", "group": group, "ackId": ackId, "history": position})
        frame = yield client.nextJSON()
        self.assertEqual(frame["event"], "groupHistory")
        return frame

    @defer.inlineCallbacks
    def test_publishedOnARecoveredOnB(self):
        """
        One history per group for the whole cluster: offsets continue
        across the nodes' publishes, and a joinGroup on B recovers what was
        published on A, with the positions A's receivers saw.
        """
        x = yield self.a.connectJSON(userId="x", roles=["webpubsub.joinLeaveGroup"])
        start = yield self.join(x, "g", {}, 1)
        self.assertEqual(start["offset"], 0)
        self.assertEqual((yield x.nextJSON())["type"], "ack")
        for t in ("one", "two", "three"):
            yield self.a.hub.send(Target(Target.GROUP, "g"), Message(TEXT, t.encode()))
        seen = (yield frames(x, 3))
        self.assertEqual([(f["data"], f["history"]) for f in seen],
                         [(t, {"epoch": start["epoch"], "offset": i})
                          for i, t in enumerate(("one", "two", "three"), 1)])
        y = yield self.b.connectJSON(userId="y", roles=["webpubsub.joinLeaveGroup"])
        frame = yield self.join(y, "g", seen[0]["history"], 2)
        self.assertEqual((frame["recovered"], frame["epoch"], frame["offset"]),
                         (True, start["epoch"], 3))
        missed = (yield frames(y, 2))
        self.assertEqual([(f["data"], f["history"]["offset"]) for f in missed],
                         [("two", 2), ("three", 3)])
        self.assertEqual((yield y.nextJSON()), {"type": "ack", "ackId": 2, "success": True})
        # B's publishes continue the same history, and its members get it live.
        yield self.b.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"four"))
        live = yield y.nextJSON()
        self.assertEqual((live["data"], live["history"]),
                         ("four", {"epoch": start["epoch"], "offset": 4}))

    @defer.inlineCallbacks
    def test_liveMessagesDuringRecovery(self):
        """
        A recovery from Redis takes a round trip, during which the client is
        already a member: live messages of the group are held, those the
        recovery returned anyway dropped, the others sent after the missed
        ones, so the client sees each once, in order, before the ack.
        """
        history = self.b.hub.history
        since = history.sinceAsync
        hub = self.b.hub

        @defer.inlineCallbacks
        def slowSince(*args):
            # Stamped before the recovery reads the history: replayed only.
            yield hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"before"))
            result = yield since(*args)
            # Stamped after: held, then sent after the missed ones.
            yield hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"after"))
            return result
        x = yield self.a.connectJSON(userId="x", roles=["webpubsub.joinLeaveGroup"])
        start = yield self.join(x, "g", {}, 1)
        yield self.a.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"missed"))
        history.sinceAsync = slowSince
        y = yield self.b.connectJSON(userId="y", roles=["webpubsub.joinLeaveGroup"])
        # A delivery first: y's connection has found its lane (protocol.py),
        # which the recovery's hold must close.
        yield hub.send(Target(Target.USER, "y"), Message(TEXT, b"warm"))
        warm = yield y.nextJSON()
        self.assertEqual(warm["data"], "warm")
        self.assertTrue(hub.localSession(y.connectionId).connection._lane)
        frame = yield self.join(y, "g", {"epoch": start["epoch"], "offset": 0}, 2)
        self.assertEqual((frame["recovered"], frame["offset"]), (True, 2))
        got = yield frames(y, 4)
        self.assertEqual([(f.get("data"), f.get("history", {}).get("offset")) for f in got],
                         [("missed", 1), ("before", 2), ("after", 3), (None, None)])
        self.assertEqual(got[-1], {"type": "ack", "ackId": 2, "success": True})
        yield later()
        self.assertEqual(y.frames, [])

    @defer.inlineCallbacks
    def test_excludedAndOrdered(self):
        """
        Publishes of one node go out in the order they were made, each
        stamped; a noEcho publisher is not replayed its own message.
        """
        x = yield self.a.connectJSON(userId="x", roles=["webpubsub.joinLeaveGroup",
                                                        "webpubsub.sendToGroup"])
        yield self.join(x, "g", {}, 1)
        yield x.nextJSON()
        for i in range(20):
            x.send({"type": "sendToGroup", "group": "g", "ackId": 10 + i, "noEcho": i == 0,
                    "dataType": "text", "data": str(i)})
        got = yield frames(x, 20 + 19)
        messages = [f for f in got if f["type"] == "message"]
        self.assertEqual([m["data"] for m in messages], [str(i) for i in range(1, 20)])
        self.assertEqual([m["history"]["offset"] for m in messages], list(range(2, 21)))
        self.assertEqual(sorted(f["ackId"] for f in got if f["type"] == "ack"),
                         list(range(10, 30)))
        y = yield self.b.connectJSON(userId="x", roles=["webpubsub.joinLeaveGroup"])
        frame = yield self.join(y, "g", {"epoch": messages[0]["history"]["epoch"],
                                         "offset": 0}, 1)
        self.assertTrue(frame["recovered"])
        replay = (yield frames(y, 20))
        self.assertEqual([m["data"] for m in replay], [str(i) for i in range(20)])

    @defer.inlineCallbacks
    def test_redisDownIsHonest(self):
        """
        With Redis gone a recovery answers recovered: false with the reason,
        and publishes still go out, unstamped; once Redis is back the old
        position is not claimed recoverable.
        """
        x = yield self.a.connectJSON(userId="x", roles=["webpubsub.joinLeaveGroup"])
        start = yield self.join(x, "g", {}, 1)
        yield x.nextJSON()
        yield self.redis.stop()
        yield waitFor(lambda: not self.a.client.connected and not self.b.client.connected)
        yield self.a.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"unstamped"))
        frame = yield x.nextJSON()
        self.assertEqual(frame["data"], "unstamped")
        self.assertNotIn("history", frame)
        y = yield self.b.connectJSON(userId="y", roles=["webpubsub.joinLeaveGroup"])
        frame = yield self.join(y, "g", {"epoch": start["epoch"], "offset": 0}, 2)
        self.assertFalse(frame["recovered"])
        self.assertIn("unavailable", frame["reason"])
        self.assertEqual((yield y.nextJSON())["success"], True)
        yield self.redis.start()
        yield waitFor(lambda: self.a.client.connected and self.b.client.connected)
        frame = yield self.join(y, "g", {"epoch": start["epoch"], "offset": 0}, 3)
        self.assertFalse(frame["recovered"])
        self.assertNotEqual(frame["epoch"], start["epoch"])
        # The node's heartbeat may have been cut mid-command (node.py logs it).
        self.flushLoggedErrors(txredisapi.ConnectionError)

    @defer.inlineCallbacks
    def test_gapStartsNewEpoch(self):
        """
        A publish that could not be recorded (Redis down for this node
        only) makes the group's next write start a new epoch, so the
        position before the gap is not recoverable.
        """
        history = self.a.hub.history
        x = yield self.a.connectJSON(userId="x", roles=["webpubsub.joinLeaveGroup"])
        start = yield self.join(x, "g", {}, 1)
        yield x.nextJSON()
        yield self.a.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"one"))
        self.assertEqual((yield x.nextJSON())["history"]["offset"], 1)
        # Only node A loses Redis; B keeps it.
        yield self.a.client.stopService()
        yield self.a.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"lost to history"))
        self.assertNotIn("history", (yield x.nextJSON()))
        self.assertEqual(history.unstamped, 1)
        self.a.client.startService()
        yield waitFor(lambda: self.a.client.connected)
        yield self.a.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"after"))
        after = (yield x.nextJSON())["history"]
        self.assertNotEqual(after["epoch"], start["epoch"])
        y = yield self.b.connectJSON(userId="y", roles=["webpubsub.joinLeaveGroup"])
        frame = yield self.join(y, "g", {"epoch": start["epoch"], "offset": 1}, 1)
        self.assertFalse(frame["recovered"])
        self.assertIn("unknown epoch", frame["reason"])
        self.flushLoggedErrors(txredisapi.ConnectionError)


    @defer.inlineCallbacks
    def test_lostReplyMarksGapAtOnce(self):
        """
        A stamp whose reply is lost while Redis stays up (no resync will
        follow) resets the group's epoch at once: a recovery on another
        node does not claim the unstamped message was never missed.
        """
        history = self.a.hub.history
        x = yield self.a.connectJSON(userId="x", roles=["webpubsub.joinLeaveGroup"])
        start = yield self.join(x, "g", {}, 1)
        yield x.nextJSON()
        evalOnce = history.redis.eval

        def lost(script, keys, args):
            history.redis.eval = evalOnce
            return defer.fail(RuntimeError("reply lost"))
        history.redis.eval = lost
        yield self.a.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"unrecorded"))
        self.assertNotIn("history", (yield x.nextJSON()))
        y = yield self.b.connectJSON(userId="y", roles=["webpubsub.joinLeaveGroup"])
        frame = yield self.join(y, "g", {"epoch": start["epoch"], "offset": 0}, 1)
        self.assertEqual((frame["recovered"], frame["offset"]), (False, 0))
        self.assertIn("unknown epoch", frame["reason"])


class OverlapTests(TestCase):
    def test_copyOnEachPathCancelsOnce(self):
        """
        While a link moves, a message seen directly and forwarded is
        delivered once; two distinct publishes with the same content on one
        path are both delivered.
        """
        overlap = Overlap()

        def d(text, history=None):
            delivery = Delivery(Message(TEXT, text), FROM_GROUP, "g", "u", "c")
            delivery.history = history
            return delivery
        self.assertFalse(overlap(d(b"a"), True))
        self.assertFalse(overlap(d(b"a"), True))
        self.assertTrue(overlap(d(b"a"), False))
        self.assertTrue(overlap(d(b"a"), False))
        self.assertFalse(overlap(d(b"a"), False))
        self.assertFalse(overlap(d(b"b", ("e", 1)), False))
        self.assertFalse(overlap(d(b"b", ("e", 2)), True))
        self.assertTrue(overlap(d(b"b", ("e", 1)), True))


class HandoverTests(ClusterTestCase):
    def toUser(self, node, text):
        node.hub.send(Target(Target.USER, "alice"), Message(TEXT, text.encode()))

    @defer.inlineCallbacks
    def connect(self, node, query=""):
        c = yield node.connect(protocols=(RELIABLE,), userId="alice", query=query)
        return c, (yield c.nextJSON())

    @defer.inlineCallbacks
    def dropped(self, node):
        """
        A reliable client on C{node} that got two messages, acked the first
        and lost its socket; a third was sent while it was away.
        """
        c, hello = yield self.connect(node)
        node.hub.addConnectionToGroup(hello["connectionId"], "g")
        self.toUser(node, "one")
        self.toUser(node, "two")
        self.assertEqual([f["data"] for f in (yield frames(c, 2))], ["one", "two"])
        c.send({"type": "sequenceAck", "sequenceId": 1})
        yield later()
        c.transport.abortConnection()
        yield c.closed
        yield later()
        self.toUser(node, "three")
        return hello

    def resume(self, hello):
        return (f"awps_connection_id={hello['connectionId']}"
                f"&awps_reconnection_token={hello['reconnectionToken']}")

    @defer.inlineCallbacks
    def test_resumeOnAnotherNode(self):
        """
        The client comes back to B: same connectionId, every unacknowledged
        message once, in order, then B numbers on; the connection left A's
        hub and joined B's with its groups, without connected/disconnected
        events.
        """
        hello = yield self.dropped(self.a)
        cid = hello["connectionId"]
        back, again = yield self.connect(self.b, self.resume(hello))
        self.assertEqual((again["connectionId"], again["reconnectionToken"]),
                         (cid, hello["reconnectionToken"]))
        resent = (yield frames(back, 2))
        self.assertEqual([(f["sequenceId"], f["data"]) for f in resent],
                         [(2, "two"), (3, "three")])
        yield waitFor(lambda: not self.a.hub.connectionExists(cid))
        self.assertEqual(self.b.hub.session(cid).groups, {"g"})
        self.toUser(self.b, "four")
        self.b.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"five"))
        self.assertEqual([(f["sequenceId"], f["data"]) for f in (yield frames(back, 2))],
                         [(4, "four"), (5, "five")])
        self.assertEqual(self.a.events.seen, [("connected", cid)])
        self.assertEqual(self.b.events.seen, [])
        # Nor group presence: the move joins B's group, which is no join.
        self.assertEqual(self.a.events.membership, [("joined", cid, "g")])
        self.assertEqual(self.b.events.membership, [])
        self.assertEqual(back.frames, [])
        # Its owner is now B: it can move back to A the same way.
        self.assertEqual((yield self.a.client.execute("GET", f"t:wps:link:chat:{cid}")), b"b")
        back.send({"type": "sequenceAck", "sequenceId": 4})
        yield later()
        back.transport.abortConnection()
        yield back.closed
        yield later()
        home, _ = yield self.connect(self.a, self.resume(hello))
        self.assertEqual((yield home.nextJSON())["sequenceId"], 5)
        self.toUser(self.a, "six")
        self.assertEqual((yield home.nextJSON())["sequenceId"], 6)
        # A normal close ends it everywhere: the owner key goes.
        home.sendClose(1000)
        yield home.closed
        yield waitFor(lambda: not self.a.hub.connectionExists(cid))
        yield later(0.1)
        self.assertIsNone((yield self.a.client.execute("GET", f"t:wps:link:chat:{cid}")))
        self.assertEqual(self.a.events.seen[-1], ("disconnected", cid))

    @defer.inlineCallbacks
    def test_protobufResumeOnAnotherNode(self):
        """
        A protobuf reliable connection moves too: its unacknowledged binary
        frames travel in the hand-over and B goes on in protobuf.
        """
        from broker.webpubsub.protobuf import PROTOBUF_RELIABLE_V1
        from broker.webpubsub.proto import webpubsub_pb2 as pb

        @defer.inlineCallbacks
        def nextPB(c):
            payload, isBinary = yield c.next()
            self.assertTrue(isBinary)
            return pb.DownstreamMessage.FromString(payload)
        c = yield self.a.connect(protocols=(PROTOBUF_RELIABLE_V1,), userId="alice")
        hello = (yield nextPB(c)).system_message.connected_message
        self.toUser(self.a, "one")
        # Bytes that are not UTF-8, in a frame that is not either.
        self.a.hub.send(Target(Target.USER, "alice"), Message(BINARY, b"\xff\x80"))
        self.assertEqual([(yield nextPB(c)).data_message.sequence_id,
                          (yield nextPB(c)).data_message.sequence_id], [1, 2])
        ack = pb.UpstreamMessage(sequence_ack_message=pb.UpstreamMessage.SequenceAckMessage(
            sequence_id=1))
        c.sendMessage(ack.SerializeToString(), isBinary=True)
        yield later()
        c.transport.abortConnection()
        yield c.closed
        yield later()
        back = yield self.b.connect(
            protocols=(PROTOBUF_RELIABLE_V1,), userId="alice",
            query=f"awps_connection_id={hello.connection_id}"
                  f"&awps_reconnection_token={hello.reconnection_token}")
        self.assertEqual((yield nextPB(back)).system_message.connected_message.connection_id,
                         hello.connection_id)
        resent = (yield nextPB(back)).data_message
        self.assertEqual((resent.sequence_id, resent.data.binary_data), (2, b"\xff\x80"))
        self.toUser(self.b, "three")
        fresh = (yield nextPB(back)).data_message
        self.assertEqual((fresh.sequence_id, fresh.data.text_data), (3, "three"))

    @defer.inlineCallbacks
    def test_messagesDuringHandoverForwarded(self):
        """
        What reaches A after it handed the state over and before it let the
        link go is forwarded to B, numbered on, neither lost nor repeated.
        """
        hello = yield self.dropped(self.a)
        handlers = self.a.cluster._handlers
        release = handlers[RELEASE.encode()]

        def lateRelease(origin, payload):
            self.toUser(self.a, "during")
            # A group publish is stamped in Redis first: let it reach A.
            d = self.a.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"during too"))
            d.addCallback(lambda _: release(origin, payload))
        handlers[RELEASE.encode()] = lateRelease
        back, _ = yield self.connect(self.b, self.resume(hello))
        got = (yield frames(back, 4))
        self.assertEqual([(f["sequenceId"], f["data"]) for f in got],
                         [(2, "two"), (3, "three"), (4, "during"), (5, "during too")])
        self.toUser(self.b, "after")
        self.assertEqual((yield back.nextJSON())["sequenceId"], 6)
        yield later(0.1)
        self.assertEqual(back.frames, [])

    @defer.inlineCallbacks
    def test_ackIdsMoveWithTheLink(self):
        """
        The ackIds the client used on A are handed to B with the link: a
        request sent again on B after the move is answered C{Duplicate} and
        not carried out, a new one is.
        """
        rx = yield self.b.connectJSON(groups=["g"])
        c = yield self.a.connect(protocols=(RELIABLE,), userId="alice",
                                 roles=("webpubsub.sendToGroup",))
        hello = yield c.nextJSON()

        self.assertTrue((yield c.publish("g", 5))["success"])
        c.transport.abortConnection()
        yield c.closed
        back = yield self.b.connect(protocols=(RELIABLE,), userId="alice",
                                    roles=("webpubsub.sendToGroup",), query=self.resume(hello))
        self.assertEqual((yield back.nextJSON())["connectionId"], hello["connectionId"])
        dup = yield back.publish("g", 5)
        self.assertEqual((dup["success"], dup["error"]["name"]), (False, "Duplicate"))
        self.assertTrue((yield back.publish("g", 6))["success"])
        self.assertEqual((yield rx.nextJSON())["data"], "m6")
        yield later(0.1)
        self.assertEqual(rx.frames, [])

    @defer.inlineCallbacks
    def test_takeOverFromOpenSocket(self):
        """
        The client reaches B while A still thinks its old socket is open (a
        half-open TCP connection): A closes that socket and hands over.
        """
        c, hello = yield self.connect(self.a)
        self.toUser(self.a, "one")
        self.assertEqual((yield c.nextJSON())["sequenceId"], 1)
        back, again = yield self.connect(self.b, self.resume(hello))
        self.assertEqual(again["connectionId"], hello["connectionId"])
        self.assertEqual(((yield back.nextJSON())["sequenceId"]), 1)
        code, reason = yield c.closed
        self.assertEqual(code, 1001)
        self.toUser(self.b, "two")
        self.assertEqual(((yield back.nextJSON())["sequenceId"]), 2)

    @defer.inlineCallbacks
    def test_reliableJoinWithHistory(self):
        """
        A reliable client recovering group history from Redis: the replayed
        messages are numbered like any other, live ones held meanwhile.
        """
        yield self.a.hub.send(Target(Target.GROUP, "h"), Message(TEXT, b"old"))
        c, hello = yield self.connect(self.b)
        self.b.hub.grantPermission(hello["connectionId"], "joinLeaveGroup")
        c.send({"type": "joinGroup", "group": "h", "ackId": 1,
                "history": {"epoch": (yield self.b.hub.history.sinceAsync("h", None, 0))[3][0],
                            "offset": 0}})
        frame = yield c.nextJSON()
        self.assertEqual((frame["event"], frame["recovered"], frame["offset"]),
                         ("groupHistory", True, 1))
        replay = yield c.nextJSON()
        self.assertEqual((replay["data"], replay["sequenceId"], replay["history"]["offset"]),
                         ("old", 1, 1))
        self.assertEqual((yield c.nextJSON())["ackId"], 1)
        yield self.b.hub.send(Target(Target.GROUP, "h"), Message(TEXT, b"new"))
        live = yield c.nextJSON()
        self.assertEqual((live["data"], live["sequenceId"]), ("new", 2))

    @defer.inlineCallbacks
    def test_twoReconnectionsAtOnce(self):
        """
        A client retrying while its first reconnection to B is still taking
        the link over: both get the link (the later socket carries it), as
        two reconnections on one node would.
        """
        hello = yield self.dropped(self.a)
        first = self.b.connect(protocols=(RELIABLE,), userId="alice", query=self.resume(hello))
        second = self.b.connect(protocols=(RELIABLE,), userId="alice", query=self.resume(hello))
        one, two = yield defer.gatherResults([first, second])
        for c in (one, two):
            self.assertEqual((yield c.nextJSON())["connectionId"], hello["connectionId"])
            self.assertEqual([f["sequenceId"] for f in (yield frames(c, 2))], [2, 3])
        self.assertEqual(len(self.b.hub.sessions()), 1)
        self.toUser(self.b, "four")
        yield later(0.1)
        got = sorted([json.loads(p)["data"] for p, _ in c.frames] for c in (one, two))
        self.assertEqual(got, [[], ["four"]])

    @defer.inlineCallbacks
    def test_refusedAcrossNodes(self):
        """
        A wrong token or another user is refused on B (404) and leaves the
        link on A, still recoverable there.
        """
        hello = yield self.dropped(self.a)
        cid = hello["connectionId"]
        for userId, query in (("alice", f"awps_connection_id={cid}&awps_reconnection_token=x"),
                              ("mallory", self.resume(hello))):
            e = yield self.assertFailure(
                self.b.connect(protocols=(RELIABLE,), userId=userId, query=query),
                ConnectionRefusedByServer)
            self.assertIn("404", str(e))
        self.assertTrue(self.a.hub.connectionExists(cid))
        back, _ = yield self.connect(self.a, self.resume(hello))
        self.assertEqual((yield back.nextJSON())["sequenceId"], 2)

    @defer.inlineCallbacks
    def test_redisDownRefusesResumeElsewhere(self):
        """
        Without Redis, B cannot find the link: 404 (the SDK then opens a
        new connection); the link stays on A, recoverable there.
        """
        hello = yield self.dropped(self.a)
        yield self.b.client.stopService()
        e = yield self.assertFailure(self.connect(self.b, self.resume(hello)),
                                     ConnectionRefusedByServer)
        self.assertIn("404", str(e))
        back, _ = yield self.connect(self.a, self.resume(hello))
        self.assertEqual((yield back.nextJSON())["sequenceId"], 2)

    @defer.inlineCallbacks
    def test_deadOwner(self):
        """
        A node that died takes its links' unacknowledged messages with it:
        a client coming back to another node is refused at once (404), and
        the dead node's owner keys are reaped.
        """
        hello = yield self.dropped(self.a)
        cid = hello["connectionId"]
        key = f"t:wps:link:chat:{cid}"
        # A dies: no heartbeat, no bus (its Redis connections go).
        self.a.cluster._beat.stop()
        self.a.client._upHooks = []
        yield self.a.client.stopService()
        e = yield self.assertFailure(self.connect(self.b, self.resume(hello)),
                                     ConnectionRefusedByServer)
        self.assertIn("404", str(e))
        yield waitFor(lambda: self.b.cluster.reaped == 1, timeout=5)
        self.assertIsNone((yield self.b.client.execute("GET", key)))
        self.assertEqual((yield self.b.client.execute("EXISTS", "t:wps:links:a")), 0)
        self.assertFalse(self.b.hub.connectionExists(cid))
        self.flushLoggedErrors(txredisapi.ConnectionError)


class WithEngineTests(ClusterTestCase):
    """
    The same over the cluster-wide engine, where every publish reaches
    every node: stamps seen alike on both nodes, and a link moving while
    the messages it is sent reach both its old and its new node.
    """

    engine = True
    if RedisEngine is None:
        skip = "no cluster engine (broker.cluster.engine) in this tree"

    @defer.inlineCallbacks
    def test_sameStampOnEveryNode(self):
        roles = ["webpubsub.joinLeaveGroup"]
        x = yield self.a.connectJSON(userId="x", roles=roles)
        y = yield self.b.connectJSON(userId="y", roles=roles)
        for c in (x, y):
            c.send({"type": "joinGroup", "group": "g", "ackId": 1})
            self.assertEqual((yield c.nextJSON())["ackId"], 1)
        yield waitFor(lambda: self.b.hub.groupExists("g"))
        yield self.a.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"one"))
        yield self.b.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"two"))
        seenX = yield frames(x, 2)
        seenY = yield frames(y, 2)
        key = lambda f: f["history"]["offset"]  # noqa: E731
        self.assertEqual(sorted(((f["data"], f["history"]) for f in seenX), key=str),
                         sorted(((f["data"], f["history"]) for f in seenY), key=str))
        self.assertEqual(sorted(key(f) for f in seenX), [1, 2])

    @defer.inlineCallbacks
    def test_moveWhileMessagesReachBothNodes(self):
        """
        A reliable client moves from A to B; group messages published on
        either node before, during and after the hand-over reach it once
        each, numbered without a gap.
        """
        c = yield self.a.connect(protocols=(RELIABLE,), userId="alice", groups=["g"])
        hello = yield c.nextJSON()
        cid = hello["connectionId"]
        yield self.a.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"m1"))
        self.assertEqual((yield c.nextJSON())["data"], "m1")
        c.transport.abortConnection()
        yield c.closed
        yield later()
        yield self.b.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"m2"))
        handlers = self.a.cluster._handlers
        release = handlers[RELEASE.encode()]

        def lateRelease(origin, payload):
            # B holds the link now and A still does: both get these.
            d1 = self.a.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"m3"))
            d2 = self.b.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"m4"))
            defer.gatherResults([d1, d2]).addCallback(
                lambda _: reactor.callLater(0.1, release, origin, payload))
        handlers[RELEASE.encode()] = lateRelease
        query = (f"awps_connection_id={cid}"
                 f"&awps_reconnection_token={hello['reconnectionToken']}")
        back = yield self.b.connect(protocols=(RELIABLE,), userId="alice", query=query)
        self.assertEqual((yield back.nextJSON())["connectionId"], cid)
        got = yield frames(back, 4)
        yield waitFor(lambda: not self.a.hub.connectionExists(cid))
        yield self.a.hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"m5"))
        got += yield frames(back, 1)
        self.assertEqual([f["sequenceId"] for f in got], [1, 2, 3, 4, 5])
        self.assertEqual(sorted(f["data"] for f in got), ["m1", "m2", "m3", "m4", "m5"])
        self.assertEqual([f["data"] for f in got][:2], ["m1", "m2"])
        yield later(0.2)
        self.assertEqual(back.frames, [])
        info = yield self.a.core.engine.directory.connection("chat", cid)
        self.assertEqual(info["node"], "b")

    @defer.inlineCallbacks
    def test_groupStreamAcrossNodes(self):
        """
        A group stream sent on A reaches a member on B with its stream
        field, the end marker included: fragments cross the bus whole.
        """
        y = yield self.b.connectJSON(userId="y", groups=["g"])
        x = yield self.a.connectJSON(userId="x", roles=["webpubsub.sendToGroup"])
        x.send({"type": "sendToGroup", "group": "g", "stream": {"streamId": "s"}})
        self.assertEqual((yield x.nextJSON())["expectedSequenceId"], 1)
        x.send({"type": "streamData", "streamId": "s", "streamSequenceId": 1,
                "dataType": "json", "data": {"part": 1}})
        x.send({"type": "streamEnd", "streamId": "s",
                "error": {"message": "cut", "userErrorCode": "E"}})
        got = yield frames(y, 2)
        self.assertEqual([(f["data"], f["stream"]) for f in got], [
            ({"part": 1}, {"streamId": "s", "streamSequenceId": 1}),
            ("", {"streamId": "s", "streamSequenceId": 2, "endOfStream": True,
                  "error": {"name": "Aborted", "message": "cut", "userErrorCode": "E"}})])

    @defer.inlineCallbacks
    def test_membershipToldOnceWhereTheConnectionIs(self):
        """
        A connection on B added to a group through A (the REST API's
        addConnectionToGroup) is told as joined on B, where the group
        presence events of its upstream go out, and not on A.
        """
        y = yield self.b.connectJSON(userId="y")
        yield self.a.hub.addConnectionToGroup(y.connectionId, "g")
        yield waitFor(lambda: ("joined", y.connectionId, "g") in self.b.events.membership)
        yield self.a.hub.removeConnectionFromGroup(y.connectionId, "g")
        yield waitFor(lambda: ("left", y.connectionId, "g") in self.b.events.membership)
        self.assertEqual(self.b.events.membership,
                         [("joined", y.connectionId, "g"), ("left", y.connectionId, "g")])
        self.assertEqual(self.a.events.membership, [])

    @defer.inlineCallbacks
    def test_filteredGroupsReachEveryNode(self):
        """
        :addToGroups / :removeFromGroups sent to A's REST API apply the
        filter to the connections of both nodes; the group then reaches
        them wherever they are.
        """
        a1 = yield self.a.connectJSON(userId="alice")
        b1 = yield self.b.connectJSON(userId="alice")
        b2 = yield self.b.connectJSON(userId="bob")

        @defer.inlineCallbacks
        def bulk(op, body):
            url = (f"http://127.0.0.1:{self.a.port.getHost().port}/api/hubs/chat/:{op}"
                   "?api-version=2024-12-01")
            token = jwt.encode({"aud": url, "exp": int(time.time()) + 60}, KEY,
                               algorithm="HS256")
            r = yield treq.post(url, json.dumps(body).encode("utf-8"), reactor=reactor,
                                persistent=False,
                                headers={"Authorization": f"Bearer {token}",
                                         "Content-Type": "application/json"})
            yield r.content()
            return r.code
        self.assertEqual((yield bulk("addToGroups",
                                     {"groups": ["room"], "filter": "userId eq 'alice'"})), 200)
        yield waitFor(lambda: self.b.hub.groupExists("room"))
        self.assertEqual([c.connectionId for c in (a1, b1)],
                         [s.connectionId for s in self.a.hub.groupConnections("room")
                          + self.b.hub.groupConnections("room")])
        self.assertFalse(self.b.hub.session(b2.connectionId).groups)
        yield self.a.hub.send(Target(Target.GROUP, "room"), Message(TEXT, b"hi"))
        for c in (a1, b1):
            self.assertEqual((yield c.nextJSON())["data"], "hi")
        self.assertEqual((yield bulk("removeFromGroups",
                                     {"groups": ["room"], "filter": "connectionId eq "
                                      f"'{b1.connectionId}'"})), 200)
        yield waitFor(lambda: not self.b.hub.groupExists("room"))
        self.assertTrue(self.a.hub.groupExists("room"))
        yield later(0.1)
        self.assertEqual((b1.frames, b2.frames), ([], []))

