# -*- test-case-name: tests.test_limits -*-
"""
Admission, rate and group limits (L{broker.core.limits}): the mechanism
with a fake clock, then the Web PubSub face over real sockets, crossed the
way an attacker crosses them.
"""

import json
import os

import treq
from autobahn.twisted.websocket import WebSocketClientFactory
from azure.core.exceptions import HttpResponseError
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.python.filepath import FilePath
from twisted.trial import unittest

from broker.admin.resource import makeAdminSite
from broker.auth.tokens import makeClientToken
from broker.core.limits import (ALLOW, CLOSE, DROP, PER_ADDRESS, PER_HUB, PER_USER,
                                AdmissionLimits, InboundLimiter)
from tests.test_webpubsub_rest import _Base as RestBase
from tests.test_tap import TwistdTestsMixin
from tests.wsharness import KEY, BrokerHarness, Client

JOIN = "webpubsub.joinLeaveGroup"
SEND = "webpubsub.sendToGroup"


class AdmissionLimitsTests(unittest.TestCase):
    def test_countsAndForgets(self):
        """
        Slots are counted per kind and key; a full key refuses; a count
        back at zero is forgotten (the maps hold only what is open).
        """
        a = AdmissionLimits({PER_HUB: 2, PER_USER: 0})
        self.assertTrue(a.acquire(PER_HUB, "h"))
        self.assertTrue(a.acquire(PER_HUB, "h"))
        self.assertFalse(a.acquire(PER_HUB, "h"))
        self.assertTrue(a.acquire(PER_HUB, "other"))
        for _ in range(100):
            self.assertTrue(a.acquire(PER_USER, "u"))     # 0: no limit
        a.release(PER_HUB, "h")
        self.assertTrue(a.acquire(PER_HUB, "h"))
        for _ in range(2):
            a.release(PER_HUB, "h")
        a.release(PER_HUB, "other")
        for _ in range(100):
            a.release(PER_USER, "u")
        self.assertEqual(len(a), 0)

    def test_admitAllOrNone(self):
        """
        admit takes every slot or none, names the full kind, skips a None
        key, and a ticket gives its slots back once.
        """
        a = AdmissionLimits({PER_HUB: 5, PER_ADDRESS: 1}, overrides={PER_HUB: {"small": 1}})
        t, why = a.admit([(PER_HUB, "small"), (PER_ADDRESS, "1.2.3.4"), (PER_USER, None)])
        self.assertIsNone(why)
        t2, why = a.admit([(PER_HUB, "big"), (PER_ADDRESS, "1.2.3.4")])
        self.assertEqual((t2, why), (None, PER_ADDRESS))
        self.assertEqual(a.count(PER_HUB, "big"), 0)
        _, why = a.admit([(PER_HUB, "small")])
        self.assertEqual(why, PER_HUB)
        t.release()
        t.release()
        self.assertEqual(len(a), 0)


class InboundLimiterTests(unittest.TestCase):
    def test_holdReading(self):
        """
        Reading is paused once per hold, resumed when a frame would pass
        again, and a hold cancelled by stop() never resumes.
        """
        clock = task.Clock()
        r = InboundLimiter(clock.seconds, 10, 0, burst=0.1)
        self.assertEqual((r.check(1), r.check(1)), (ALLOW, DROP))
        calls = []
        for _ in range(3):
            r.holdReading(clock, 1, lambda: calls.append("pause"),
                          lambda: calls.append("resume"))
        self.assertEqual(calls, ["pause"])
        clock.advance(0.1)
        self.assertEqual(calls, ["pause", "resume"])
        r.holdReading(clock, 1, lambda: calls.append("pause"), lambda: calls.append("resume"))
        r.stop()
        clock.advance(1)
        self.assertEqual(calls, ["pause", "resume", "pause"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_bucket(self):
        """
        A burst passes, the next frame is dropped, the rate refills it; a
        client that keeps exceeding is told to close; a quiet one is
        forgiven.
        """
        clock = task.Clock()
        r = InboundLimiter(clock.seconds, 10, 0, burst=2.0)
        self.assertEqual([r.check(1) for _ in range(20)], [ALLOW] * 20)
        self.assertEqual(r.check(1), DROP)
        self.assertAlmostEqual(r.wait(), 0.1)
        clock.advance(0.1)
        self.assertEqual(r.check(1), ALLOW)
        # One dropped already; 20 (the message burst) more are let go.
        verdicts = [r.check(1) for _ in range(20)]
        self.assertEqual(verdicts, [DROP] * 19 + [CLOSE])
        clock.advance(2.5)
        self.assertEqual(r.check(1), ALLOW)
        self.assertEqual(r.dropped, 0)

    def test_bytes(self):
        """
        The byte bucket holds at least the largest frame, and refills at
        its rate.
        """
        clock = task.Clock()
        r = InboundLimiter(clock.seconds, 0, 100, burst=1.0, minBytes=1000)
        self.assertEqual(r.check(1000), ALLOW)
        self.assertEqual(r.check(10), DROP)
        self.assertAlmostEqual(r.wait(10), 0.1)
        clock.advance(0.1)
        self.assertEqual(r.check(10), ALLOW)
        self.assertIsNone(InboundLimiter.build(clock.seconds, 0, 0, 2.0))


class _Metrics:
    """
    The admin /metrics of a core, over a real socket.
    """

    @defer.inlineCallbacks
    def metrics(self, core):
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            makeAdminSite(core))
        try:
            r = yield treq.get(f"http://127.0.0.1:{port.getHost().port}/metrics",
                               reactor=reactor, persistent=False)
            body = yield treq.content(r)
        finally:
            yield port.stopListening()
        return body.decode()

    def assertMetric(self, text, line):
        self.assertIn(line, text.splitlines())


def waitFor(predicate, timeout=10.0):
    d = defer.Deferred()
    deadline = reactor.seconds() + timeout

    def poll():
        if predicate():
            d.callback(None)
        elif reactor.seconds() > deadline:
            d.errback(AssertionError("condition not reached in time"))
        else:
            reactor.callLater(0.01, poll)
    poll()
    return d


class WebPubSubAdmissionTests(_Metrics, unittest.TestCase):
    TOML = """
[webpubsub]
max_connections_per_address = 3
max_connections_per_user = 2
[webpubsub.hubs.small]
max_connections_per_hub = 1
"""

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield BrokerHarness(self, reactor, self.TOML).start()

    @defer.inlineCallbacks
    def test_perAddress(self):
        """
        The fourth WebSocket from one address is refused with 429, counted;
        the first three still work; a slot freed by one leaving is usable.
        """
        clients = []
        for _ in range(3):
            clients.append((yield self.broker.connectJSON(roles=[JOIN, SEND])))
        why = yield self.broker.refused()
        self.assertIn("429", why)
        text = yield self.metrics(self.broker.core)
        self.assertMetric(text, 'broker_admission_refused_total'
                                '{face="webpubsub",hub="chat",reason="per_address"} 1.0')
        a, b = clients[0], clients[1]
        a.send({"type": "joinGroup", "group": "g", "ackId": 1})
        self.assertTrue((yield a.nextJSON())["success"])
        b.send({"type": "sendToGroup", "group": "g", "data": "hi", "ackId": 1})
        self.assertTrue((yield b.nextJSON())["success"])
        self.assertEqual((yield a.nextJSON())["data"], "hi")
        clients[2].sendClose()
        yield clients[2].closed
        yield waitFor(lambda: self.broker.factory.admission.count(PER_ADDRESS, "127.0.0.1") == 2)
        yield self.broker.connectJSON()

    @defer.inlineCallbacks
    def test_perUserAndPerHub(self):
        """
        A user's third connection is refused (another user is not); a hub's
        own max_connections_per_hub overrides the face's.
        """
        yield self.broker.connectJSON(userId="alice")
        yield self.broker.connectJSON(userId="alice")
        why = yield self.broker.refused(userId="alice")
        self.assertIn("429", why)
        yield self.broker.connectJSON(hub="small", userId="bob")
        why = yield self.broker.refused(hub="small", userId="carol")
        self.assertIn("429", why)
        text = yield self.metrics(self.broker.core)
        self.assertMetric(text, 'broker_admission_refused_total'
                                '{face="webpubsub",hub="chat",reason="per_user"} 1.0')
        self.assertMetric(text, 'broker_admission_refused_total'
                                '{face="webpubsub",hub="small",reason="per_hub"} 1.0')
        self.assertEqual(self.broker.core.hub("chat").userSessions("alice").__len__(), 2)


class WebPubSubDroppedFrameTests(_Metrics, unittest.TestCase):
    # One frame a second: every frame after the first within the test is
    # dropped, however slow the machine; 14 drops stay under the 16 that
    # close a connection.
    TOML = """
[webpubsub]
max_inbound_messages_per_second = 1
inbound_burst = 0.1
"""

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield BrokerHarness(self, reactor, self.TOML).start()

    @defer.inlineCallbacks
    def test_droppedFramesPeekedStrictly(self):
        """
        A dropped frame is read for its ackId with the strict decoder: one
        nested deeper than Python's recursion limit (within the 4 KiB that
        are peeked) or carrying NaN is dropped without an ack and without
        an unhandled error (trial fails the test on one); the connection
        is not cut.
        """
        flood = yield self.broker.connectJSON(roles=[SEND])
        for i in range(5):
            flood.send({"type": "sendToGroup", "group": "g", "data": "x", "ackId": i})
        deep = b"[" * 2000 + b"]" * 2000
        for _ in range(5):
            flood.sendMessage(deep)
            flood.sendMessage(b'{"type":"sendToGroup","group":"g","ackId":1,"x":NaN}')
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertIsNone(flood.closeCode)
        acks = [json.loads(p) for p, _ in flood.frames]
        self.assertTrue([a for a in acks if not a.get("success", True)])
        self.assertEqual(len(acks), 5)
        # The connection goes with its pending resume (no timer left).
        flood.transport.abortConnection()
        while len(self.broker.factory.connections):
            yield task.deferLater(reactor, 0.01, lambda: None)


class WebPubSubRateTests(_Metrics, unittest.TestCase):
    TOML = """
[webpubsub]
max_inbound_messages_per_second = 50
inbound_burst = 1.0
"""

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield BrokerHarness(self, reactor, self.TOML).start()

    @defer.inlineCallbacks
    def test_floodIsClosedWellBehavedUntouched(self):
        """
        A JSON client sending many small frames at once is answered
        TooManyRequests for the dropped ones, then closed with 1008; a
        well-behaved publisher on the same hub gets every ack and its
        subscriber every message.
        """
        sub = yield self.broker.connectJSON(roles=[JOIN])
        sub.send({"type": "joinGroup", "group": "g", "ackId": 1})
        self.assertTrue((yield sub.nextJSON())["success"])
        good = yield self.broker.connectJSON(roles=[SEND])
        flood = yield self.broker.connectJSON(roles=[SEND])
        for i in range(2000):
            flood.send({"type": "sendToGroup", "group": "flood", "data": "x", "ackId": i})
        for i in range(20):
            good.send({"type": "sendToGroup", "group": "g", "data": str(i), "ackId": i})
            yield task.deferLater(reactor, 0.03, lambda: None)
        code, _ = yield flood.closed
        self.assertEqual(code, 1008)
        errors = [json.loads(p) for p, _ in flood.frames]
        throttled = [f for f in errors if f.get("type") == "ack" and not f["success"]]
        self.assertTrue(throttled)
        self.assertEqual(throttled[0]["error"]["name"], "TooManyRequests")
        acks = []
        for _ in range(20):
            acks.append((yield good.nextJSON()))
        self.assertTrue(all(a["success"] for a in acks), acks)
        got = []
        for _ in range(20):
            got.append((yield sub.nextJSON())["data"])
        self.assertEqual(got, [str(i) for i in range(20)])
        text = yield self.metrics(self.broker.core)
        self.assertMetric(text, 'broker_rate_limited_total'
                                '{action="closed",face="webpubsub",hub="chat"} 1.0')
        dropped = [l for l in text.splitlines() if l.startswith(
            'broker_rate_limited_total{action="dropped",face="webpubsub",hub="chat"}')]
        self.assertTrue(dropped and float(dropped[0].split()[-1]) >= 50, dropped)

    @defer.inlineCallbacks
    def test_plainClientFlood(self):
        """
        A plain client's frames count as well: a flood closes it with 1008.
        """
        self.broker.core.hub("chat")
        c = yield self.broker.connect(protocols=())
        for _ in range(2000):
            c.sendMessage(b"x")
        code, _ = yield c.closed
        self.assertEqual(code, 1008)


class WebPubSubGroupLimitTests(RestBase, _Metrics):
    toml = """
[webpubsub]
max_groups_per_connection = 5
max_groups_per_hub = 8
max_group_name_length = 16
[webpubsub.hubs.chat]
"""

    @defer.inlineCallbacks
    def join(self, c, group, ackId):
        c.send({"type": "joinGroup", "group": group, "ackId": ackId})
        return (yield c.nextJSON())

    @defer.inlineCallbacks
    def test_joinLimits(self):
        """
        Joins beyond the connection's, then the hub's group limit, and an
        over-long name, are refused with a LimitExceeded ack; a group
        left frees its place.
        """
        a = yield self.broker.connectJSON(roles=[JOIN])
        b = yield self.broker.connectJSON(roles=[JOIN])
        for i in range(5):
            self.assertTrue((yield self.join(a, f"a{i}", i))["success"])
        ack = yield self.join(a, "a5", 5)
        self.assertEqual((ack["success"], ack["error"]["name"]), (False, "LimitExceeded"))
        self.assertTrue((yield self.join(a, "a0", 6))["success"])    # already in: fine
        for i in range(3):
            self.assertTrue((yield self.join(b, f"b{i}", i))["success"])
        ack = yield self.join(b, "b3", 3)
        self.assertEqual(ack["error"]["name"], "LimitExceeded")
        self.assertIn("8 groups", ack["error"]["message"])
        self.assertTrue((yield self.join(b, "a1", 4))["success"])    # existing group
        ack = yield self.join(b, "x" * 17, 5)
        self.assertEqual(ack["error"]["name"], "LimitExceeded")
        a.send({"type": "leaveGroup", "group": "a4", "ackId": 7})
        yield a.nextJSON()
        self.assertTrue((yield self.join(b, "b3", 6))["success"])
        text = yield self.metrics(self.broker.core)
        for reason, n in (("per_connection", 1), ("per_hub", 1), ("name_length", 1)):
            self.assertMetric(text, 'broker_group_limit_refused_total{face="webpubsub",'
                                    f'hub="chat",reason="{reason}"}} {n}.0')

    @defer.inlineCallbacks
    def test_restAddToGroup(self):
        """
        REST addConnectionToGroup and addUserToGroup beyond the limits are
        refused with a 400 LimitExceeded JSON error.
        """
        c = yield self.broker.connectJSON(userId="u")
        sdk = self.sdk()
        for i in range(5):
            yield self.call(sdk.add_connection_to_group, f"g{i}", c.connectionId)
        e = yield self.assertFailure(
            self.call(sdk.add_connection_to_group, "g5", c.connectionId), HttpResponseError)
        self.assertEqual((e.status_code, e.error.code), (400, "LimitExceeded"))
        for i in range(5):
            yield self.call(sdk.add_user_to_group, f"u{i}", "v")
        e = yield self.assertFailure(self.call(sdk.add_user_to_group, "u5", "v"),
                                     HttpResponseError)
        self.assertEqual((e.status_code, e.error.code), (400, "LimitExceeded"))
        self.assertEqual(self.hub().session(c.connectionId).groups,
                         {f"g{i}" for i in range(5)})


def rssBytes(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class GroupMemoryTests(TwistdTestsMixin, _Metrics, unittest.TestCase):
    """
    The memory of a group is released when it empties: measured on a real
    broker process, so the clients' own memory is not counted.
    """

    GROUPS = 50_000
    timeout = 180

    @defer.inlineCallbacks
    def startBroker(self):
        directory = FilePath(self.mktemp())
        directory.makedirs()
        path = directory.child("broker.toml")
        path.setContent(f"""
[broker]
state_dir = "{directory.child("state").path}"
[admin]
listen = ["tcp:0:interface=127.0.0.1"]
[webpubsub]
listen = ["tcp:0:interface=127.0.0.1"]
access_keys = ["{KEY}"]
max_groups_per_connection = {self.GROUPS}
max_groups_per_hub = {2 * self.GROUPS}
max_inbound_messages_per_second = 0
max_inbound_bytes_per_second = 0
[webpubsub.hubs.chat]
history_messages = 10
history_groups = 1000
""".encode())
        proc = self.spawn(["-n", "--pidfile=", "broker", "--config", path.path], directory,
                          ["webpubsub.listen[0]", "admin.listen[0]"])
        ports = yield proc.listening
        return proc, ports

    @defer.inlineCallbacks
    def stats(self, ports):
        r = yield treq.get(f"http://127.0.0.1:{ports['admin.listen[0]']}/stats",
                           reactor=reactor, persistent=False)
        return json.loads((yield treq.content(r)))

    @defer.inlineCallbacks
    def client(self, port, roles):
        url = f"ws://127.0.0.1:{port}/client/hubs/chat"
        token = makeClientToken(KEY, url, roles=roles)
        factory = WebSocketClientFactory(f"{url}?access_token={token}",
                                         protocols=["json.webpubsub.azure.v1"],
                                         reactor=reactor)
        factory.protocol = Client
        factory.setProtocolOptions(autoPingInterval=0, failByDrop=False)
        c = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        self.addCleanup(lambda: c.transport.abortConnection()
                        if c.state != c.STATE_CLOSED else None)
        yield c.opened
        yield c.nextJSON()
        return c

    @defer.inlineCallbacks
    def waitStats(self, ports, predicate, timeout=90):
        deadline = reactor.seconds() + timeout
        while True:
            st = yield self.stats(ports)
            if predicate(st):
                return st
            if reactor.seconds() > deadline:
                self.fail(f"stats never matched: {st}")
            yield task.deferLater(reactor, 0.1, lambda: None)

    @defer.inlineCallbacks
    def test_joinLeaveManyGroups(self):
        """
        One client joins 50,000 distinct 1 KB-named groups, publishing to
        some (history on); another joins and leaves as many.  Once they
        have gone the hub holds no group, user or connection, and the
        broker's RSS is back within 30 MiB of where it started.
        """
        proc, ports = yield self.startBroker()
        pid = proc.transport.pid
        a = yield self.client(ports["webpubsub.listen[0]"], [JOIN, SEND])
        b = yield self.client(ports["webpubsub.listen[0]"], [JOIN])
        for c in (a, b):
            c.onMessage = lambda payload, isBinary: None
        yield task.deferLater(reactor, 0.5, lambda: None)
        before = rssBytes(pid)
        name = "n" * 1000
        step = 5000
        for start in range(0, self.GROUPS, step):
            for i in range(start, start + step):
                a.send({"type": "joinGroup", "group": f"{name}{i}"})
                b.send({"type": "joinGroup", "group": f"{name}b{i}"})
                b.send({"type": "leaveGroup", "group": f"{name}b{i}"})
                if i % 25 == 0:
                    a.send({"type": "sendToGroup", "group": f"{name}{i}", "data": "x"})
            yield self.waitStats(ports, lambda st: st["groups"] == start + step)
        peak = rssBytes(pid)
        self.assertGreater(peak - before, 50 * 1024 * 1024)    # the groups did cost
        a.sendClose()
        b.sendClose()
        yield a.closed
        yield b.closed
        st = yield self.waitStats(ports, lambda st: st["connections"] == 0)
        self.assertEqual((st["groups"], st["users"]), (0, 0))
        # The core gives the freed memory back a second after the shrink.
        yield task.deferLater(reactor, 2.0, lambda: None)
        after = rssBytes(pid)
        print(f"RSS {before >> 20} MiB before, {peak >> 20} at the peak, {after >> 20} after")
        self.assertLess(after - before, 30 * 1024 * 1024,
                        f"RSS {before >> 20} MiB before, {peak >> 20} at the peak, "
                        f"{after >> 20} after")


class GroupMapTests(unittest.TestCase):
    """
    What the process test cannot see: every per-group structure is empty
    or bounded once the groups are left.
    """

    @defer.inlineCallbacks
    def test_structuresEmpty(self):
        broker = yield BrokerHarness(self, reactor, """
[webpubsub]
max_groups_per_connection = 6000
[webpubsub.hubs.chat]
history_messages = 10
history_groups = 100
""").start()
        hub = broker.core.hub("chat")
        a = yield broker.connectJSON(roles=[JOIN, SEND], userId="u")
        for i in range(5000):
            a.send({"type": "joinGroup", "group": f"g{i}"})
            a.send({"type": "sendToGroup", "group": f"g{i}", "data": "x"})
        yield waitFor(lambda: hub.groupCount == 5000)
        self.assertEqual(len(hub.history._rings), 100)
        yield hub.addUserToGroup("u", "later")
        yield hub.removeUserFromGroup("u", "later")
        a.sendClose()
        yield a.closed
        yield waitFor(lambda: hub.connectionCount == 0)
        self.assertEqual((hub.groupCount, hub.userCount, hub.connectionCount), (0, 0, 0))
        self.assertEqual(len(broker.factory.admission), 0)
        self.assertEqual(broker.core.engine.directory._userGroups, {})
        self.assertLessEqual(len(hub.history._rings), 100)
