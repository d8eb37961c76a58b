# -*- test-case-name: tests.test_iot_cluster -*-
"""
The IoT face in cluster mode: two nodes (two L{Cluster}s on one real
redis-server, each with its own concentrator, device/central TCP listener,
UDP listener and centrals' HTTP API on ephemeral loopback ports) in one
test process.
"""

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase

from broker.cluster.node import Cluster
from broker.cluster.redis import RedisClient
from broker.iot import errors, frames
from broker.iot.frames import Payload
from broker.iot.auth import tokenKey
from broker.iot.udp import ACCEPTED, BAD_MAC, REPLAYED, UNKNOWN
from tests.redisserver import RedisServer, settle, silence
from tests.test_cluster_redis import waitFor
from tests.test_iot_api import APIHarness, echo
from tests.test_iot_webhook import WebhookTestMixin

HEARTBEAT = 0.1
DEAD_AFTER = 0.4


class Sender(DatagramProtocol):
    pass


class TwoNodes:
    """
    Mixin: C{self.a} and C{self.b}, each an L{APIHarness} whose
    concentrator is a node of one cluster (C{self.nodes}).
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.server = RedisServer(self, reactor)
        yield self.server.start()
        self.nodes = {}
        self.a = yield self.makeNode("a")
        self.b = yield self.makeNode("b")
        yield waitFor(lambda: all(n.healthy for n in self.nodes.values()))
        self.sender = Sender()
        port = reactor.listenUDP(0, self.sender, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

    @defer.inlineCallbacks
    def makeNode(self, name):
        client = RedisClient(reactor, self.server.url, maxDelay=0.3)
        node = Cluster(reactor, client, prefix="t", nodeId=name, heartbeat=HEARTBEAT,
                       deadAfter=DEAD_AFTER)
        self.addCleanup(client.stopService)
        self.addCleanup(lambda: node.stopService() if node.running else None)
        h = yield APIHarness(self, cluster=node, tokenBatch=8).start()
        client.startService()
        node.startService()
        self.nodes[name] = node
        return h

    def send(self, node, data):
        self.sender.transport.write(data, node.iot.udpAddress)

    def located(self, deviceId, nodeId, fleet="acme"):
        """
        Fire once the presence key of the device names C{nodeId} (None:
        no node).
        """
        c = self.a.iot.concentrator

        @defer.inlineCallbacks
        def poll():
            deadline = reactor.seconds() + 10
            while True:
                node = yield c._locate(fleet, deviceId)
                if node == nodeId:
                    return
                if reactor.seconds() > deadline:
                    raise AssertionError(f"{deviceId} is on {node}, not {nodeId}")
                yield settle(reactor, 0.02)
        return poll()


class RoutingTests(TwoNodes, WebhookTestMixin, TestCase):
    """
    A central on node A and devices on node B reach each other.
    """

    @defer.inlineCallbacks
    def test_heldRequestAcrossNodes(self):
        """
        A held HTTP request on A for a device on B is forwarded to B and
        answered with the device's answer; so is a central's TCP request.
        """
        device = yield self.b.iot.device("d1")
        device.onRequest = lambda f: Payload.json({"got": f.payload.value()})
        yield self.located("d1", "b")
        status, body, _ = yield self.a.call(
            "POST", "/v1/fleets/acme/devices/d1/requests",
            {"payload": {"type": "json", "data": {"read": "temp"}}, "timeout": 5})
        self.assertEqual((status, body["payload"]),
                         (200, {"type": "json", "data": {"got": {"read": "temp"}}}))
        central = yield self.a.iot.central()
        answer = yield central.request(Payload.json("over tcp"), "d1")
        self.assertEqual(answer.value(), {"got": "over tcp"})
        self.assertEqual(self.b.iot.concentrator.stats["requestsToDevices"], 2)
        self.assertEqual(self.a.iot.concentrator.stats["forwarded"], 2)

    @defer.inlineCallbacks
    def test_refusedAndTimeoutAcrossNodes(self):
        """
        The device's refusal comes back with its code (502); a device that
        never answers ends in 504 TIMEOUT on the asking node.
        """
        device = yield self.b.iot.device("d1")

        def refuse(frame):
            raise errors.Refused("no such sensor", "NO_SENSOR")
        device.onRequest = refuse
        yield self.located("d1", "b")
        status, body, _ = yield self.a.call(
            "POST", "/v1/fleets/acme/devices/d1/requests", {"payload": {"type": "none"}})
        self.assertEqual((status, body["error"]["code"], body["error"]["source"]),
                         (502, "NO_SENSOR", "device"))
        device.onRequest = None
        started = reactor.seconds()
        status, body, _ = yield self.a.call(
            "POST", "/v1/fleets/acme/devices/d1/requests",
            {"payload": {"type": "none"}, "timeout": 0.3})
        self.assertEqual((status, body["error"]["code"]), (504, "TIMEOUT"))
        self.assertLess(reactor.seconds() - started, 2)
        self.assertEqual(self.a.site.api.stats.held, 0)

    @defer.inlineCallbacks
    def test_offlineThenQueuedAndDeliveredOnOtherNode(self):
        """
        A device on no node: a held request is DEVICE_OFFLINE, a one-way
        message is queued (202, queued) in the shared store and delivered
        when the device connects to node B; its ACK empties the queue seen
        from A.
        """
        status, body, _ = yield self.a.call(
            "POST", "/v1/fleets/acme/devices/d1/requests", {"payload": {"type": "none"}})
        self.assertEqual((status, body["error"]["code"]), (503, "DEVICE_OFFLINE"))
        status, body, _ = yield self.a.call(
            "POST", "/v1/fleets/acme/devices/d1/messages",
            {"payload": {"type": "utf8", "data": "while you were out"}})
        self.assertEqual((status, body["queued"]), (202, True))
        status, body, _ = yield self.a.call("GET", "/v1/fleets/acme/devices/d1/queue")
        self.assertEqual(body["queueDepth"], 1)
        device = yield self.b.iot.device("d1")
        frame = yield device.nextFrame()
        self.assertEqual((frame.kind, frame.payload.value()),
                         (frames.MESSAGE, "while you were out"))
        device.write(frames.ACK, frame.requestId)
        yield waitFor(lambda: self.b.iot.concentrator.stats["messagesAcked"] == 1)
        status, body, _ = yield self.a.call("GET", "/v1/fleets/acme/devices/d1/queue")
        self.assertEqual(body["queueDepth"], 0)

    @defer.inlineCallbacks
    def test_messagesToDeviceOnOtherNode(self):
        """
        A queued message for a device online on B is delivered at once
        (queued: false, B is told to pump); a direct one (queue: false) is
        forwarded.
        """
        device = yield self.b.iot.device("d1")
        yield self.located("d1", "b")
        status, body, _ = yield self.a.call(
            "POST", "/v1/fleets/acme/devices/d1/messages",
            {"payload": {"type": "json", "data": 1}})
        self.assertEqual((status, body["queued"]), (202, False))
        frame = yield device.nextFrame()
        self.assertEqual((frame.kind, frame.payload.value()), (frames.MESSAGE, 1))
        self.assertEqual(str(frame.requestId), body["messageId"])
        status, body, _ = yield self.a.call(
            "POST", "/v1/fleets/acme/devices/d1/messages",
            {"payload": {"type": "json", "data": 2}, "queue": False})
        self.assertEqual((status, body["queued"]), (202, False))
        frame = yield device.nextFrame()
        self.assertEqual((frame.kind, frame.payload.value()), (frames.MESSAGE, 2))
        self.assertEqual(str(frame.requestId), body["messageId"])

    @defer.inlineCallbacks
    def test_deviceReachesCentralOnOtherNode(self):
        """
        A device on B: its request is answered by the central on A, its
        message and telemetry reach that central.
        """
        central = yield self.a.iot.central()
        central.onRequest = lambda f: Payload.json({"to": f.address, "echo": f.payload.value()})
        yield waitFor(lambda: "acme" in self.b.iot.concentrator._remoteCentrals)
        device = yield self.b.iot.device("d1")
        answer = yield device.request(Payload.json("hello central"))
        self.assertEqual(answer.value(), {"to": "d1", "echo": "hello central"})
        device.write(frames.MESSAGE, device.nextId(), Payload.json("fyi"))
        device.write(frames.TELEMETRY, 0, Payload.json({"t": 20}))
        seen = []
        while len(seen) < 2:
            f = yield central.nextFrame()
            if f.kind in (frames.MESSAGE, frames.TELEMETRY):
                seen.append((f.kind, f.address, f.payload.value()))
        # The message goes through the central queue (the central is on
        # another node), telemetry straight (iot.forward_telemetry is off):
        # they are not ordered with each other.
        self.assertEqual(sorted(seen), [(frames.MESSAGE, "d1", "fyi"),
                                        (frames.TELEMETRY, "d1", {"t": 20})])

    @defer.inlineCallbacks
    def test_webhookFallbackWithoutCentral(self):
        """
        With no central on any node a device's request gets NO_CENTRAL,
        unless its fleet has a webhook, which is used; a central connected
        to another node takes precedence over the webhook.
        """
        device = yield self.b.iot.device("d1")
        e = yield self.assertFailure(device.request(Payload.json("anyone?")), errors.Refused)
        self.assertEqual(e.code, "NO_CENTRAL")
        yield self.startUpstream(
            [(200, b'{"payload": {"type": "utf8", "data": "from the webhook"}}')])
        self.b.iot.concentrator.setCentralFallback("acme", self.link())
        answer = yield device.request(Payload.json("anyone?"))
        self.assertEqual(answer.value(), "from the webhook")
        self.assertEqual(self.upstream.seen[0]["event"]["device"], "d1")
        central = yield self.a.iot.central()
        central.onRequest = lambda f: Payload.json("from the central")
        yield waitFor(lambda: "acme" in self.b.iot.concentrator._remoteCentrals)
        answer = yield device.request(Payload.json("anyone?"))
        self.assertEqual(answer.value(), "from the central")
        self.assertEqual([s["event"]["kind"] for s in self.upstream.seen
                          if s["event"]["kind"] == "request"], ["request"])

    @defer.inlineCallbacks
    def test_listingIsClusterWide(self):
        device = yield self.b.iot.device("d1")
        yield self.located("d1", "b")
        status, body, _ = yield self.a.call(
            "POST", "/v1/fleets/acme/devices/d2/messages", {"payload": {"type": "none"}})
        status, body, _ = yield self.a.call("GET", "/v1/fleets/acme/devices")
        self.assertEqual(body["devices"], [
            {"id": "d1", "online": True, "queueDepth": 0},
            {"id": "d2", "online": False, "queueDepth": 1}])
        status, body, _ = yield self.a.call("GET", "/v1/fleets/acme/devices/d1")
        self.assertEqual(body, {"id": "d1", "online": True, "queueDepth": 0})
        device.transport.loseConnection()
        yield self.located("d1", None)
        status, body, _ = yield self.a.call("GET", "/v1/fleets/acme/devices/d1")
        self.assertFalse(body["online"])

    @defer.inlineCallbacks
    def test_newerSessionWinsAcrossNodes(self):
        """
        The device authenticates on A, then on B: A's session is closed
        with REPLACED and requests from A reach the session on B.
        """
        old = yield self.a.iot.device("d1")
        yield self.located("d1", "a")
        new = yield self.b.iot.device("d1")
        new.onRequest = lambda f: Payload.json("new")
        frame = yield old.nextFrame()
        while frame.kind != frames.CLOSE:
            frame = yield old.nextFrame()
        self.assertEqual(frame.payload.value()["code"], "REPLACED")
        yield old.closed
        yield self.located("d1", "b")
        status, body, _ = yield self.a.call(
            "POST", "/v1/fleets/acme/devices/d1/requests", {"payload": {"type": "none"}})
        self.assertEqual((status, body["payload"]["data"]), (200, "new"))

    @defer.inlineCallbacks
    def test_newerSessionWinsAfterAnOutage(self):
        """
        The device authenticates on B while Redis is away and its session
        on A is still open: when Redis is back (whichever node resyncs
        first) B's newer session stays and A's is closed with REPLACED.
        """
        old = yield self.a.iot.device("d1")
        yield self.located("d1", "a")
        yield self.server.stop()
        yield waitFor(lambda: not any(n.healthy for n in self.nodes.values()))
        new = yield self.b.iot.device("d1")
        new.onRequest = lambda f: Payload.json("new")
        yield self.server.start()
        yield old.closed
        close = [f for f in old.inbox.pending if f.kind == frames.CLOSE]
        self.assertEqual(close[0].payload.value()["code"], "REPLACED")
        self.assertTrue(new.transport.connected)
        yield self.located("d1", "b")
        status, body, _ = yield self.a.call(
            "POST", "/v1/fleets/acme/devices/d1/requests", {"payload": {"type": "none"}})
        self.assertEqual((status, body["payload"]["data"]), (200, "new"))

    @defer.inlineCallbacks
    def test_keyIssuedOnOneNodeWorksOnAnother(self):
        status, body, _ = yield self.a.call("PUT", "/v1/fleets/acme/devices/new1/key")
        self.assertEqual(status, 200)
        yield waitFor(lambda: self.b.iot.registry.device("acme", "new1") is not None)
        device = yield self.b.iot.device("new1", secret=body["key"])
        self.assertTrue(device.open)
        status, _, _ = yield self.a.call("DELETE", "/v1/fleets/acme/devices/new1/key")
        self.assertEqual(status, 204)
        yield device.closed


class TokenTests(TwoNodes, TestCase):

    def test_interface(self):
        """
        The memory book (one node) and the cluster book provide one
        interface, which is all the concentrator and the listener use.
        """
        from zope.interface.verify import verifyObject
        from broker.iot.interfaces import ITokenBook
        from broker.iot.udp import TokenBook
        self.assertTrue(verifyObject(ITokenBook, TokenBook()))
        self.assertTrue(verifyObject(ITokenBook, self.a.iot.concentrator.tokens))

    @defer.inlineCallbacks
    def test_singleUseAcrossNodes(self):
        """
        A token issued on A is accepted once on B; replayed on A or B it
        is refused as a replay.
        """
        central = yield self.a.iot.central()
        yield waitFor(lambda: "acme" in self.b.iot.concentrator._remoteCentrals)
        device = yield self.a.iot.device("d1")
        tokens = yield device.waitTokens(8)
        datagram = device.datagram(Payload.json({"temp": 1}), tokens[0])
        self.send(self.b, datagram)
        yield waitFor(lambda: self.b.iot.udp.counts[ACCEPTED] == 1)
        # The telemetry accepted on B reaches the central on A.
        f = yield central.nextFrame()
        while f.kind != frames.TELEMETRY:
            f = yield central.nextFrame()
        self.assertEqual((f.address, f.payload.value()), ("d1", {"temp": 1}))
        self.send(self.a, datagram)
        self.send(self.b, datagram)
        yield waitFor(lambda: self.a.iot.udp.counts[REPLAYED] == 1
                      and self.b.iot.udp.counts[REPLAYED] == 1)
        self.assertEqual(self.a.iot.udp.counts[ACCEPTED], 0)
        # A dropped the token spent elsewhere from its own book when the
        # replay came; spending another leaves 6 of the 8.
        self.send(self.a, device.datagram(Payload.json({"temp": 2}), tokens[1]))
        yield waitFor(lambda: self.a.iot.udp.counts[ACCEPTED] == 1)
        self.assertEqual(self.a.iot.concentrator.tokens.outstanding("acme", "d1"), 6)

    @defer.inlineCallbacks
    def test_macCheckedOnAnyNode(self):
        """
        A token issued on A carries its key in Redis: B, receiving a
        datagram with it, checks its MAC there.  A swapped payload is
        dropped as bad_mac on B (and on A, from A's memory) without
        spending the token; the genuine datagram is then accepted on B,
        once.
        """
        central = yield self.a.iot.central()
        yield waitFor(lambda: "acme" in self.b.iot.concentrator._remoteCentrals)
        device = yield self.a.iot.device("d1")
        tokens = yield device.waitTokens(8)
        genuine = device.datagram(Payload.json({"valve": "closed"}), tokens[0])
        swapped = genuine[:18] + b'{"valve":"open!"}' + genuine[-16:]
        self.send(self.b, swapped)
        self.send(self.a, swapped)
        yield waitFor(lambda: self.b.iot.udp.counts[BAD_MAC] == 1
                      and self.a.iot.udp.counts[BAD_MAC] == 1)
        key = self.nodes["a"].key("iot", "tok", tokens[0].hex())
        value = self.server.command("GET", key)
        # Still live in Redis, holding the token's key (not the session's).
        self.assertIn(tokenKey(device.udpKey, tokens[0]).hex().encode(), value)
        self.assertNotIn(device.udpKey.hex().encode(), value)
        self.send(self.b, genuine)
        yield waitFor(lambda: self.b.iot.udp.counts[ACCEPTED] == 1)
        f = yield central.nextFrame()
        while f.kind != frames.TELEMETRY:
            f = yield central.nextFrame()
        self.assertEqual(f.payload.value(), {"valve": "closed"})
        self.send(self.b, genuine)
        yield waitFor(lambda: self.b.iot.udp.counts[REPLAYED] == 1)
        self.assertEqual(self.b.iot.udp.counts[ACCEPTED], 1)

    @defer.inlineCallbacks
    def test_tokenStillOnItsWay(self):
        """
        A token B spends before A's write of it has reached Redis is looked
        up once more, a moment later, and accepted; a token nobody issued
        is counted unknown after that second look.
        """
        book = self.a.iot.concentrator.tokens
        realEval = book.redis.eval
        held = []

        def slowIssue(script, keys=(), args=(), **kw):
            d = defer.Deferred()
            held.append(lambda: realEval(script, keys, args, **kw).chainDeferred(d))
            return d
        book.redis.eval = slowIssue
        book.bindKey("acme", "d1", b"u" * 32)
        tokens = book.issue("acme", "d1", 2)
        book.redis.eval = realEval
        self.send(self.b, frames.encodeDatagram(tokens[0], Payload.json({"temp": 1}),
                                                tokenKey(b"u" * 32, tokens[0])))
        yield settle(reactor, 0.03)
        self.assertEqual(self.b.iot.udp.counts[ACCEPTED], 0)
        held.pop()()
        yield waitFor(lambda: self.b.iot.udp.counts[ACCEPTED] == 1)
        self.send(self.b, frames.encodeDatagram(b"\x07" * 16, Payload.json({"temp": 2}),
                                                b"k" * 32))
        yield waitFor(lambda: self.b.iot.udp.counts[UNKNOWN] == 1)

    @defer.inlineCallbacks
    def test_revokedTokensRefusedEverywhere(self):
        device = yield self.a.iot.device("d1")
        tokens = list((yield device.waitTokens(8)))
        device.transport.loseConnection()
        yield device.closed
        again = yield self.a.iot.device("d1")
        yield again.waitTokens(8)
        # The old session's tokens were revoked when the new one came (on
        # A's Redis connection: wait for it, Redis orders nothing across
        # connections).
        key = self.nodes["a"].key("iot", "tok", tokens[0].hex())
        yield waitFor(lambda: self.server.command("EXISTS", key) == b":0\r\n")
        self.send(self.b, device.datagram(Payload.json(1), tokens[0]))
        yield waitFor(lambda: sum(self.b.iot.udp.counts.values()) == 1)
        self.assertEqual(self.b.iot.udp.counts[ACCEPTED], 0)


class FailureTests(TwoNodes, TestCase):

    @defer.inlineCallbacks
    def test_deadNodeLeavesPresence(self):
        """
        Node B stops heartbeating without a clean leave: within
        deadAfter + heartbeat (and the reaper's own tick) its devices are
        offline in A's listing and requests for them are DEVICE_OFFLINE.
        """
        yield self.b.iot.device("d1")
        yield self.located("d1", "b")
        b = self.nodes["b"]
        started = reactor.seconds()
        silence(b)
        yield self.located("d1", None)
        elapsed = reactor.seconds() - started
        self.assertLess(elapsed, DEAD_AFTER + 2 * HEARTBEAT + 0.5)
        status, body, _ = yield self.a.call("GET", "/v1/fleets/acme/devices")
        self.assertFalse(body["devices"][0]["online"])
        status, body, _ = yield self.a.call(
            "POST", "/v1/fleets/acme/devices/d1/requests", {"payload": {"type": "none"}})
        self.assertEqual((status, body["error"]["code"]), (503, "DEVICE_OFFLINE"))

    @defer.inlineCallbacks
    def test_sweepRestoresPresence(self):
        """
        A presence entry removed behind the node's back (a reaper racing
        its resync) is written back by the next sweep; a device gone while
        the node could not tell Redis is removed by it.
        """
        yield self.b.iot.device("d1")
        d2 = yield self.b.iot.device("d2")
        yield self.located("d1", "b")
        yield self.located("d2", "b")
        b = self.b.iot.concentrator
        self.server.command("DEL", b._presenceKey("acme", "d1"))
        b._unreleased[("acme", "d2")] = b._sids[("acme", "d2")]
        del b._sids[("acme", "d2")]
        d2.transport.loseConnection()
        yield d2.closed
        yield waitFor(lambda: ("acme", "d2") not in b._devices)
        yield b.sweep()
        yield self.located("d1", "b")
        yield self.located("d2", None)

    @defer.inlineCallbacks
    def test_redisOutage(self):
        """
        Redis stops: queued messages are refused with 503 UNAVAILABLE (and
        the protocol's UNAVAILABLE), never accepted and lost; a central and
        a device on the same node still talk (held request, direct message,
        device request, UDP with that node's tokens).  Redis restarts
        (empty): everything works again, across nodes too.
        """
        central = yield self.a.iot.central()
        central.onRequest = lambda f: Payload.json("central here")
        d1 = yield self.a.iot.device("d1")
        d1.onRequest = echo
        d2 = yield self.b.iot.device("d2")
        d2.onRequest = echo
        tokens = yield d1.waitTokens(8)
        yield self.located("d2", "b")
        yield self.server.stop()
        yield waitFor(lambda: not any(n.healthy for n in self.nodes.values()))

        status, body, _ = yield self.a.call(
            "POST", "/v1/fleets/acme/devices/d1/messages", {"payload": {"type": "none"}})
        self.assertEqual((status, body["error"]["code"]), (503, "UNAVAILABLE"))
        mid = central.nextId()
        central.write(frames.MESSAGE, mid, Payload.json("queued?"), "d1")
        f = yield central.nextFrame()
        self.assertEqual((f.kind, f.requestId, f.payload.value()["code"]),
                         (frames.ERROR, mid, "UNAVAILABLE"))
        status, body, _ = yield self.a.call(
            "POST", "/v1/fleets/acme/devices/d2/requests", {"payload": {"type": "none"}})
        self.assertEqual((status, body["error"]["code"]), (503, "UNAVAILABLE"))
        # Local routing goes on.
        status, body, _ = yield self.a.call(
            "POST", "/v1/fleets/acme/devices/d1/requests",
            {"payload": {"type": "ascii", "data": "local"}})
        self.assertEqual((status, body["payload"]["data"]), (200, "local"))
        status, body, _ = yield self.a.call(
            "POST", "/v1/fleets/acme/devices/d1/messages",
            {"payload": {"type": "json", "data": "direct"}, "queue": False})
        self.assertEqual((status, body["queued"]), (202, False))
        f = yield d1.nextFrame()
        self.assertEqual((f.kind, f.payload.value()), (frames.MESSAGE, "direct"))
        answer = yield d1.request(Payload.json("hi"))
        self.assertEqual(answer.value(), "central here")
        genuine = [d1.datagram(Payload.json({"t": i + 1}), t) for i, t in enumerate(tokens[:2])]
        self.send(self.a, genuine[0])
        yield waitFor(lambda: self.a.iot.udp.counts[ACCEPTED] == 1)

        yield self.server.start()
        yield waitFor(lambda: all(n.healthy for n in self.nodes.values()), timeout=10)
        yield self.located("d2", "b")
        yield self.located("d1", "a")
        status, body, _ = yield self.a.call(
            "POST", "/v1/fleets/acme/devices/d2/messages",
            {"payload": {"type": "json", "data": "after"}})
        self.assertEqual((status, body["queued"]), (202, False))
        f = yield d2.nextFrame()
        self.assertEqual((f.kind, f.payload.value()), (frames.MESSAGE, "after"))
        status, body, _ = yield self.b.call(
            "POST", "/v1/fleets/acme/devices/d1/requests",
            {"payload": {"type": "ascii", "data": "across"}})
        self.assertEqual((status, body["payload"]["data"]), (200, "across"))
        # The token spent during the outage stays spent after the resync.
        self.send(self.b, genuine[0])
        self.send(self.b, genuine[1])
        yield waitFor(lambda: sum(self.b.iot.udp.counts.values()) == 2)
        self.assertEqual((self.b.iot.udp.counts[REPLAYED], self.b.iot.udp.counts[ACCEPTED]),
                         (1, 1))


class CentralQueueTests(TwoNodes, TestCase):
    """
    Device -> central store-and-forward is cluster-wide: the central queue
    is in Redis, drained by the node its central comes back to.
    """

    @defer.inlineCallbacks
    def test_centralBackOnOtherNode(self):
        from tests.test_iot_forward import RecordingCentral
        first = yield self.a.iot.open(RecordingCentral())
        yield first.authenticated
        device = yield self.a.iot.device("d1")
        yield waitFor(lambda: first.log)
        first.transport.loseConnection()
        yield first.closed
        yield waitFor(lambda: "acme" not in self.a.iot.concentrator._centrals)
        # The first central's device_connected may itself have gone through
        # the queue (and been counted) when the central was busy.
        stats = self.a.iot.concentrator.stats
        queuedBefore = stats["centralQueued"]
        for i in range(3):
            device.write(frames.MESSAGE, i + 1, Payload.json({"n": i}))
            ack = yield device.nextFrame()
            self.assertEqual((ack.kind, ack.requestId), (frames.ACK, i + 1))
        device.transport.loseConnection()
        yield device.closed
        store = self.a.iot.concentrator.store
        yield waitFor(lambda: stats["centralQueued"] == queuedBefore + 4)
        self.assertEqual((yield store.depth("acme", "")), 4)
        central = yield self.b.iot.open(RecordingCentral())
        yield central.authenticated
        yield waitFor(lambda: len(central.log) == 4)
        self.assertEqual(central.events(), [
            ("message", "d1", {"n": 0}), ("message", "d1", {"n": 1}),
            ("message", "d1", {"n": 2}), ("device_disconnected", "d1", "closed")])
        ids = [f.requestId for f in central.log]
        self.assertEqual(ids, sorted(ids))
        yield waitFor(lambda: self.b.iot.concentrator.stats["centralDelivered"] == 4)
        self.assertEqual((yield store.depth("acme", "")), 0)
        # Drained: a device on A now reaches the central on B through the
        # queue (another node's central is never sent to directly).
        again = yield self.a.iot.device("d1")
        yield waitFor(lambda: len(central.log) == 5)
        self.assertEqual(central.events()[-1][:2], ("device_connected", "d1"))
        self.assertNotEqual(central.log[-1].requestId, 0)
        again.transport.loseConnection()


class FeedbackTests(TwoNodes, TestCase):
    """
    Delivery feedback is cluster-wide: a message queued through A's API is
    listed and purged through B's, delivered by B, and each outcome reaches
    the central on A through the shared central queue.
    """

    @defer.inlineCallbacks
    def test_outcomesAcrossNodes(self):
        from tests.test_iot_feedback import statuses
        from tests.test_iot_forward import RecordingCentral
        ids = []
        for n in range(3):
            status, body, _ = yield self.a.call(
                "POST", "/v1/fleets/acme/devices/d1/messages",
                {"payload": {"type": "json", "data": n}})
            self.assertEqual((status, body["queued"]), (202, True))
            ids.append(body["messageId"])
        status, body, _ = yield self.b.call("GET", "/v1/fleets/acme/devices/d1/messages")
        self.assertEqual([(m["messageId"], m["size"]) for m in body["messages"]],
                         [(i, 1) for i in ids])
        status, _, _ = yield self.b.call(
            "DELETE", f"/v1/fleets/acme/devices/d1/messages/{ids[1]}")
        self.assertEqual(status, 204)
        status, body, _ = yield self.a.call(
            "GET", f"/v1/fleets/acme/devices/d1/messages/{ids[0]}")
        self.assertEqual(body["status"], "queued")
        central = yield self.a.iot.open(RecordingCentral())
        yield central.authenticated
        device = yield self.b.iot.device("d1", authenticate=False)
        device.autoAck = True
        yield device.authenticated
        yield waitFor(lambda: len(statuses(central)) == 3)
        self.assertEqual(statuses(central), [(ids[1], "d1", "purged"),
                                             (ids[0], "d1", "delivered"),
                                             (ids[2], "d1", "delivered")])
        status, body, _ = yield self.a.call("GET", "/v1/fleets/acme/devices/d1/messages")
        self.assertEqual(body["messages"], [])

    @defer.inlineCallbacks
    def test_expiredReportedOnce(self):
        """
        Both nodes purge; each expired message is reported by one of them.
        """
        from broker.iot.feedback import EXPIRED
        c = self.a.iot.concentrator
        for n in range(3):
            yield c.store.push("acme", "d2", Payload.json(n), 0.05, 10)
        yield settle(reactor, 0.1)
        a, b = yield defer.gatherResults([self.a.iot.store.purgeExpired(),
                                          self.b.iot.store.purgeExpired()])
        self.assertEqual(len(a) + len(b), 3)
        self.assertEqual(sorted(a + b), sorted(set(a + b)))
        self.b.iot.concentrator.feedback.expired(a + b)
        _, _, mid = (a + b)[0]
        self.assertEqual(self.b.iot.concentrator.feedback.outcomes.get("acme", "d2", mid)[0],
                         EXPIRED)
        yield waitFor(lambda: self.b.iot.concentrator.stats["centralQueued"] >= 3)


class CentralQueueWebhookTests(TwoNodes, WebhookTestMixin, TestCase):
    @defer.inlineCallbacks
    def test_oneNodeDrainsToWebhook(self):
        """
        With no central session anywhere, one node (the Redis lease
        holder) drains the queue to the webhook: each event once per
        attempt, in order, whichever node its device is on.
        """
        yield self.startUpstream()
        self.upstream.default = (503, b"")
        for h in (self.a, self.b):
            h.iot.concentrator.setCentralFallback(
                "acme", self.link(retries=0, backoff=0.02, maxBackoff=0.1))
        d1 = yield self.a.iot.device("d1")
        d2 = yield self.b.iot.device("d2")
        for i in range(3):
            for d in (d1, d2):
                d.write(frames.MESSAGE, i + 1, Payload.json(i))
                yield d.nextFrame()
        yield waitFor(lambda: len(self.upstream.seen) >= 2)
        self.upstream.default = (200, b"")
        yield waitFor(lambda: sum(h.iot.concentrator.stats["centralDelivered"]
                                  for h in (self.a, self.b)) == 8)
        ok = [s["event"] for s in self.upstream.seen]
        ids = [e["messageId"] for e in ok]
        self.assertEqual(ids, sorted(ids))
        delivered = {e["messageId"]: e for e in ok}
        self.assertEqual(len(delivered), 8)
        for dev in ("d1", "d2"):
            self.assertEqual([e["payload"]["data"] for _, e in sorted(delivered.items())
                              if e["device"] == dev and e["kind"] == "message"], [0, 1, 2])
        self.assertEqual([h.iot.concentrator.stats["centralDelivered"] > 0
                          for h in (self.a, self.b)].count(True), 1)
