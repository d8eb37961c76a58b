# -*- test-case-name: tests.test_cluster_process -*-
"""
Three real broker processes (C{twistd -n broker}) joined through a real
redis-server: Web PubSub clients on different nodes in one group, Microsoft's
service SDK driving the REST API on a third node, a node killed with
SIGKILL, and Redis stopped and restarted under the running nodes.
"""

import json

from autobahn.twisted.websocket import WebSocketClientFactory
from azure.core.exceptions import HttpResponseError
from azure.messaging.webpubsubservice import WebPubSubServiceClient
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from broker.auth.tokens import makeClientToken
from tests.clusternodes import ClusterNodesMixin
from tests.redisserver import settle
from tests.wsharness import Client

KEY = "cluster-test-key-0123456789abcdef"
JOIN, SEND = "webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"

FACES = """\
[webpubsub]
listen = ["tcp:0:interface=127.0.0.1"]
access_keys = ["{key}"]
[webpubsub.hubs.chat]
history_messages = 100
[iot]
enabled = false
"""


class ClusterProcessMixin(ClusterNodesMixin):
    """
    Web PubSub broker nodes as real twistd processes on one test
    redis-server, and clients of them.
    """

    timeout = 120
    faces = FACES
    listeners = ["webpubsub.listen[0]"]

    def prepare(self):
        self.prepareCluster()
        self.clients = []
        self.sdks = []
        self.addCleanup(self._closeClients)

    def faceSettings(self, name):
        return {"key": KEY}

    def nodeStarted(self, proc):
        proc.wps = proc.ports["webpubsub.listen[0]"]

    @defer.inlineCallbacks
    def stats(self, name):
        _, body = yield self.adminGet(name, "/stats")
        return json.loads(body)

    @defer.inlineCallbacks
    def _closeClients(self):
        for c in self.clients:
            if c.transport is not None and c.state != c.STATE_CLOSED:
                c.transport.abortConnection()
        yield defer.DeferredList([c.closed for c in self.clients])
        for sdk in self.sdks:
            yield threads.deferToThread(sdk.close)

    @defer.inlineCallbacks
    def connect(self, name, userId, roles=(JOIN, SEND), protocol="json.webpubsub.azure.v1",
                query=""):
        port = self.nodes[name].wps
        url = f"ws://127.0.0.1:{port}/client/hubs/chat"
        token = makeClientToken(KEY, url, userId=userId, roles=roles)
        factory = WebSocketClientFactory(f"{url}?access_token={token}{query}",
                                         protocols=[protocol], reactor=reactor)
        factory.protocol = Client
        factory.setProtocolOptions(autoPingInterval=0, failByDrop=False)
        proto = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        self.clients.append(proto)
        yield proto.opened
        hello = yield proto.nextJSON()
        proto.connectionId = hello["connectionId"]
        proto.hello = hello
        return proto

    @defer.inlineCallbacks
    def frames(self, client, n):
        """
        The next C{n} JSON frames of C{client}.
        """
        out = []
        for _ in range(n):
            out.append((yield client.nextJSON()))
        return out

    @defer.inlineCallbacks
    def join(self, client, group, ackId=1):
        client.send({"type": "joinGroup", "group": group, "ackId": ackId})
        ack = yield client.nextJSON()
        self.assertTrue(ack["success"], ack)

    def sdk(self, name):
        c = WebPubSubServiceClient.from_connection_string(
            f"Endpoint=http://127.0.0.1:{self.nodes[name].wps};AccessKey={KEY};Version=1.0;",
            hub="chat")
        self.sdks.append(c)
        return c

    def call(self, f, *args, **kw):
        return threads.deferToThread(f, *args, **kw)


class ClusterProcessTests(ClusterProcessMixin, TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.prepare()
        yield self.redis.start()
        for name in ("a", "b", "c"):
            yield self.startNode(name)

    @defer.inlineCallbacks
    def test_groupAcrossNodesAndRESTOnAThird(self):
        x = yield self.connect("a", "xavier")
        y = yield self.connect("b", "yvonne")
        yield self.join(x, "g")
        yield self.join(y, "g")
        x.send({"type": "sendToGroup", "group": "g", "ackId": 2, "dataType": "text",
                "data": "from a", "noEcho": True})
        self.assertEqual((yield x.nextJSON())["success"], True)
        got = yield y.nextJSON()
        self.assertEqual((got["fromUserId"], got["data"]), ("xavier", "from a"))

        sdk = self.sdk("c")
        # The directory: node c sees the connections of a and b.
        self.assertTrue((yield self.call(sdk.connection_exists, y.connectionId)))
        self.assertTrue((yield self.call(sdk.group_exists, "g")))
        self.assertTrue((yield self.call(sdk.user_exists, "xavier")))
        members = yield self.call(lambda: list(sdk.list_connections(group="g")))
        self.assertEqual(sorted(m.connection_id for m in members),
                         sorted([x.connectionId, y.connectionId]))
        # A send from node c reaches both, exactly once.
        yield self.call(sdk.send_to_group, "g", "from c", content_type="text/plain")
        for client in (x, y):
            m = yield client.nextJSON()
            self.assertEqual(m["data"], "from c")
        # Adding a user to a group on c affects its connection on b.
        yield self.call(sdk.add_user_to_group, "g2", "yvonne")
        yield self.call(sdk.send_to_group, "g2", {"n": 1})
        self.assertEqual((yield y.nextJSON())["data"], {"n": 1})
        # Permissions granted on c hold where the connection is.
        z = yield self.connect("a", "zoe", roles=())
        yield self.call(sdk.grant_permission, "sendToGroup", z.connectionId, target_name="g")
        self.assertTrue((yield self.call(sdk.has_permission, "sendToGroup", z.connectionId,
                                         target_name="g")))
        z.send({"type": "sendToGroup", "group": "g", "ackId": 9, "dataType": "text",
                "data": "zoe"})
        self.assertEqual((yield z.nextJSON())["success"], True)
        for client in (x, y):
            self.assertEqual((yield client.nextJSON())["data"], "zoe")
        # Closing a user from c closes its connection on b.
        yield self.call(sdk.close_user_connections, "yvonne", reason="bye")
        code, reason = yield y.closed
        self.assertEqual(code, 1008)
        yield settle(reactor, 0.2)
        self.assertEqual(x.frames, [])

    @defer.inlineCallbacks
    def test_nodeKilledLeavesPresence(self):
        x = yield self.connect("a", "xavier")
        y = yield self.connect("b", "yvonne")
        yield self.join(x, "g")
        yield self.join(y, "g")
        sdk = self.sdk("a")
        self.assertTrue((yield self.call(sdk.connection_exists, y.connectionId)))
        self.nodes["b"].transport.signalProcess("KILL")
        yield self.nodes["b"].ended
        start = reactor.seconds()
        while (yield self.call(sdk.connection_exists, y.connectionId)):
            self.assertLess(reactor.seconds() - start, 5, "b's connection never left")
            yield settle(reactor, 0.1)
        # Bounded by dead_after plus a heartbeat or two.
        self.assertLess(reactor.seconds() - start, 1.0 + 2 * 0.2 + 1.0)
        self.assertFalse((yield self.call(sdk.user_exists, "yvonne")))
        members = yield self.call(lambda: list(sdk.list_connections(group="g")))
        self.assertEqual([m.connection_id for m in members], [x.connectionId])
        # The survivors go on.
        w = yield self.connect("c", "walter")
        yield self.join(w, "g")
        w.send({"type": "sendToGroup", "group": "g", "ackId": 2, "dataType": "text",
                "data": "still here", "noEcho": True})
        self.assertEqual((yield w.nextJSON())["success"], True)
        self.assertEqual((yield x.nextJSON())["data"], "still here")
        stats = yield self.stats("a")
        self.assertEqual(stats["cluster"]["node"], "a")

    @defer.inlineCallbacks
    def test_sigtermLeavesAtOnce(self):
        """
        A node stopped with SIGTERM closes its clients with 1001 and takes
        its connections out of the directory as it goes, well before a
        dead node would be reaped, and says nothing alarming on the way.
        """
        y = yield self.connect("b", "yvonne")
        yield self.join(y, "g")
        sdk = self.sdk("a")
        self.assertTrue((yield self.call(sdk.group_exists, "g")))
        start = reactor.seconds()
        self.nodes["b"].transport.signalProcess("TERM")
        code, _ = yield y.closed
        self.assertEqual(code, 1001)
        yield self.nodes["b"].ended
        self.assertFalse((yield self.call(sdk.group_exists, "g")))
        self.assertLess(reactor.seconds() - start, 0.9)
        text = self.nodes["b"].text()
        for alarming in ("Traceback", "Unhandled", "failed"):
            self.assertNotIn(alarming, text)

    @defer.inlineCallbacks
    def test_redisStoppedAndRestarted(self):
        x = yield self.connect("a", "xavier")
        x2 = yield self.connect("a", "xena")
        y = yield self.connect("b", "yvonne")
        for c in (x, x2, y):
            yield self.join(c, "g")
        yield self.redis.stop()
        body = yield self.waitHealth("a", 503)
        self.assertIn(b"Redis", body)
        # Local delivery keeps working.
        x.send({"type": "sendToGroup", "group": "g", "ackId": 2, "dataType": "text",
                "data": "local", "noEcho": True})
        self.assertEqual((yield x.nextJSON())["success"], True)
        self.assertEqual((yield x2.nextJSON())["data"], "local")
        # The REST API refuses what needs the cluster, clearly.
        sdk = self.sdk("a")
        e = yield self.assertFailure(
            self.call(sdk.send_to_all, "x", content_type="text/plain"), HttpResponseError)
        self.assertEqual(e.status_code, 503)
        e = yield self.assertFailure(
            self.call(sdk.connection_exists, y.connectionId), HttpResponseError)
        self.assertEqual(e.status_code, 503)
        lines = [line for line in self.nodes["a"].lines() if "connection lost" in line]
        self.assertEqual(len(lines), 1, self.nodes["a"].text())
        # Redis comes back (empty): the nodes reconnect and re-register.
        yield self.redis.start()
        yield self.waitHealth("a", 200)
        yield self.waitHealth("b", 200)
        self.assertTrue((yield self.call(sdk.connection_exists, y.connectionId)))
        members = yield self.call(lambda: list(sdk.list_connections(group="g")))
        self.assertEqual(len(members), 3)
        y.send({"type": "sendToGroup", "group": "g", "ackId": 3, "dataType": "text",
                "data": "after", "noEcho": True})
        self.assertEqual((yield y.nextJSON())["success"], True)
        for c in (x, x2):
            self.assertEqual((yield c.nextJSON())["data"], "after")
        self.assertFalse(any("Traceback" in line for line in self.nodes["a"].lines()),
                         self.nodes["a"].text())


class ReliableAndHistoryTests(ClusterProcessMixin, TestCase):
    """
    What outlives a node's socket in Web PubSub, across real processes: a
    reliable connection resumes on another node with nothing lost or
    repeated, and a group's history is the same whichever node recovers it.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.prepare()
        yield self.redis.start()
        yield self.startNodes(["a", "b"])

    @defer.inlineCallbacks
    def test_reliableResumesOnAnotherNode(self):
        c = yield self.connect("a", "rita", protocol="json.reliable.webpubsub.azure.v1")
        yield self.join(c, "g")
        sdk = self.sdk("b")
        for text in ("one", "two"):
            yield self.call(sdk.send_to_group, "g", text, content_type="text/plain")
        got = (yield self.frames(c, 2))
        self.assertEqual([(m["sequenceId"], m["data"]) for m in got], [(1, "one"), (2, "two")])
        c.send({"type": "sequenceAck", "sequenceId": 1})
        yield settle(reactor, 0.1)
        c.transport.abortConnection()
        yield c.closed
        yield self.call(sdk.send_to_group, "g", "three", content_type="text/plain")
        yield settle(reactor, 0.1)
        query = (f"&awps_connection_id={c.connectionId}"
                 f"&awps_reconnection_token={c.hello['reconnectionToken']}")
        back = yield self.connect("b", "rita", protocol="json.reliable.webpubsub.azure.v1",
                                  query=query)
        self.assertEqual(back.connectionId, c.connectionId)
        resent = (yield self.frames(back, 2))
        self.assertEqual([(m["sequenceId"], m["data"]) for m in resent],
                         [(2, "two"), (3, "three")])
        # It is B's connection now: the directory says so, and it gets more.
        self.assertTrue((yield self.call(sdk.connection_exists, c.connectionId)))
        yield self.call(self.sdk("a").send_to_group, "g", "four", content_type="text/plain")
        m = yield back.nextJSON()
        self.assertEqual((m["sequenceId"], m["data"]), (4, "four"))
        yield settle(reactor, 0.2)
        self.assertEqual(back.frames, [])

    @defer.inlineCallbacks
    def test_historyRecoveredOnTheOtherNode(self):
        x = yield self.connect("a", "xavier")
        x.send({"type": "joinGroup", "group": "h", "ackId": 1, "history": {}})
        start = yield x.nextJSON()
        self.assertEqual(start["event"], "groupHistory")
        self.assertEqual((yield x.nextJSON())["type"], "ack")
        for text in ("one", "two", "three"):
            x.send({"type": "sendToGroup", "group": "h", "dataType": "text", "data": text})
        seen = (yield self.frames(x, 3))
        self.assertEqual([m["history"]["offset"] for m in seen], [1, 2, 3])
        y = yield self.connect("b", "yvonne")
        y.send({"type": "joinGroup", "group": "h", "ackId": 2, "history": seen[0]["history"]})
        frame = yield y.nextJSON()
        self.assertEqual((frame["recovered"], frame["epoch"], frame["offset"]),
                         (True, start["epoch"], 3))
        missed = (yield self.frames(y, 2))
        self.assertEqual([(m["data"], m["history"]["offset"]) for m in missed],
                         [("two", 2), ("three", 3)])
        self.assertEqual((yield y.nextJSON()), {"type": "ack", "ackId": 2, "success": True})
        # B's publishes continue the same history, seen alike on A.
        y.send({"type": "sendToGroup", "group": "h", "dataType": "text", "data": "four"})
        for client in (x, y):
            m = yield client.nextJSON()
            self.assertEqual((m["data"], m["history"]["offset"]), ("four", 4))


class RedisAbsentAtStartTests(ClusterProcessMixin, TestCase):
    """
    A node started while Redis is down serves its own clients, says so
    once, is unhealthy, and joins the cluster when Redis arrives.
    """

    def setUp(self):
        self.prepare()
        return self.startNode("a", healthy=False)

    @defer.inlineCallbacks
    def test_startsWithoutRedis(self):
        body = yield self.waitHealth("a", 503)
        self.assertIn(b"Redis", body)
        x = yield self.connect("a", "xavier")
        x2 = yield self.connect("a", "xena")
        yield self.join(x, "g")
        yield self.join(x2, "g")
        x.send({"type": "sendToGroup", "group": "g", "ackId": 2, "dataType": "text",
                "data": "alone", "noEcho": True})
        self.assertEqual((yield x.nextJSON())["success"], True)
        self.assertEqual((yield x2.nextJSON())["data"], "alone")
        for _ in range(100):
            if any("not reachable yet" in line for line in self.nodes["a"].lines()):
                break
            yield settle(reactor, 0.05)
        self.assertOneLineNaming(self.nodes["a"], "not reachable yet")
        yield self.redis.start()
        yield self.waitHealth("a", 200)
        yield self.startNode("b")
        y = yield self.connect("b", "yvonne")
        yield self.join(y, "g")
        sdk = self.sdk("b")
        members = yield self.call(lambda: list(sdk.list_connections(group="g")))
        self.assertEqual(len(members), 3)
        y.send({"type": "sendToGroup", "group": "g", "ackId": 3, "dataType": "text",
                "data": "joined", "noEcho": True})
        self.assertEqual((yield y.nextJSON())["success"], True)
        for c in (x, x2):
            self.assertEqual((yield c.nextJSON())["data"], "joined")
