# -*- test-case-name: tests.test_peergroups_cluster_process -*-
"""
The peer-groups face on three real broker processes (C{twistd -n broker})
joined through a real redis-server: peers of one group on different nodes
(over WebSocket and over TCP) see each other as on one broker; a node
killed with SIGKILL has its members reported offline and its direct
connections closed; Redis stopped and restarted under the running nodes
refuses changes meanwhile and loses nothing it acknowledged.
"""

import os

from twisted.internet import defer, reactor
from twisted.python import log
from twisted.trial.unittest import TestCase

from broker.peergroups import constants as C
from broker.peergroups import credentials as cred
from broker.peergroups.client import Identity, PeerError, connectStream, connectWebSocket
from broker.peergroups.params import STORE_DOWN, STORE_LOST
from tests.clusternodes import ClusterNodesMixin
from tests.redisserver import settle
from tests.test_peergroups import ALL_EVENTS, DATA, T1, T2, Member

HEARTBEAT = 0.2
DEAD_AFTER = 1.0

FACES = """\
[webpubsub]
enabled = false
[iot]
enabled = false
[peergroups]
enabled = true
listen = ["tcp:0:interface=127.0.0.1"]
tcp_listen = ["tcp:0:interface=127.0.0.1"]
"""


class PeerGroupsProcessMixin(ClusterNodesMixin):
    """
    Broker nodes as real twistd processes on one test redis-server, and
    peer-groups clients of them.
    """

    timeout = 60
    prefix = "pgit"
    heartbeat = HEARTBEAT
    deadAfter = DEAD_AFTER
    faces = FACES
    listeners = ["peergroups.listen[0]", "peergroups.tcp_listen[0]"]

    @defer.inlineCallbacks
    def startCluster(self, names, durable=False):
        self.prepareCluster(durable=durable)
        self.clients = []
        self.addCleanup(self._closeClients)
        yield self.redis.start()
        yield self.startNodes(names)

    def _closeClients(self):
        return defer.DeferredList([c.disconnect() for c in self.clients
                                   if not c.closed.called])

    @defer.inlineCallbacks
    def peer(self, node, name, transport, identity=None):
        """
        A started client of C{node} with a registered identity, as a
        L{Member}.
        """
        ports = self.nodes[node].ports
        if transport == "ws":
            client = yield connectWebSocket(
                reactor, f"ws://127.0.0.1:{ports['peergroups.listen[0]']}/peergroups/v1")
        else:
            client = yield connectStream(
                reactor, f"tcp:127.0.0.1:{ports['peergroups.tcp_listen[0]']}")
        self.clients.append(client)
        identity = identity or Identity.generate(name, name.title())
        yield client.startup("default")
        yield client.registerIdentity(identity)
        return Member(client, identity)

    def next(self, m, eventType=None, **fields):
        return m.next(eventType, **fields).addTimeout(10, reactor)

    @defer.inlineCallbacks
    def online(self, m, events=ALL_EVENTS):
        m.reg = yield m.client.registerEvent(m.handle, events)
        yield m.client.connect(m.handle)
        event = yield self.next(m, C.EVENT_STATUS_CHANGED)
        self.assertEqual(event["status"], C.STATUS_LISTENING | C.STATUS_HAS_CONNECTIONS)

    @defer.inlineCallbacks
    def pair(self, adminNode="a", bobNode="b"):
        """
        An administrator on C{adminNode} over TCP and bob, invited by it,
        on C{bobNode} over WebSocket; both online, registered for every
        event; the administrator has seen bob connect.
        """
        admin = yield self.peer(adminNode, "admin", "tcp")
        admin.handle = yield admin.client.create(friendlyName="Across")
        yield self.online(admin)
        bob = yield self.peer(bobNode, "bob", "ws")
        invitation = yield admin.client.createInvitation(
            admin.handle, bob.identity.identityInfo(), roles=(C.ROLE_MEMBER,))
        bob.handle = yield bob.client.join(invitation)
        yield self.online(bob)
        yield self.next(admin, C.EVENT_MEMBER_CHANGED, changeType=C.MEMBER_CONNECTED,
                        identity=bob.name)
        return admin, bob

    @defer.inlineCallbacks
    def quiet(self, *members):
        """
        Let cross-node messages land, then everything queued per member.
        """
        yield settle(reactor, 0.5)
        out = []
        for m in members:
            out.append((yield m.drain()))
        return out

    def changes(self, m, eventType=C.EVENT_RECORD_CHANGED):
        """
        Every event of C{eventType} C{m}'s registration received, as
        C{(changeType, id)} pairs in arrival order.
        """
        key = {C.EVENT_RECORD_CHANGED: ("recordChangeData", "recordId"),
               C.EVENT_MEMBER_CHANGED: ("memberChangeData", "identity")}[eventType]
        return [(e[key[0]]["changeType"], e[key[0]][key[1]]) for e in m.client.allEvents
                if e["registration"] == m.reg and e["eventType"] == eventType]

    @defer.inlineCallbacks
    def failsWith(self, d, name):
        try:
            yield d
        except PeerError as e:
            self.assertEqual(e.name, name, e.message)
            return e
        self.fail(f"expected {name}")


class AcrossNodesTests(PeerGroupsProcessMixin, TestCase):
    def setUp(self):
        return self.startCluster(["a", "b", "c"])

    @defer.inlineCallbacks
    def test_groupAcrossThreeNodes(self):
        """
        An administrator on A (TCP) invites bob, who joins and connects on
        B (WebSocket): JOINED and CONNECTED once; both list each other
        present with the same node ids; records written on either node
        raise RECORD_CHANGED exactly once on both; direct data goes both
        ways in order; bob drops off B, changes are made meanwhile, and bob
        reconnecting through C is told of each once and lists what A lists.
        """
        admin, bob = yield self.pair()
        yield self.quiet(admin)
        self.assertEqual([c for c in self.changes(admin, C.EVENT_MEMBER_CHANGED)
                          if c[1] == bob.name],
                         [(C.MEMBER_JOINED, bob.name), (C.MEMBER_CONNECTED, bob.name)])
        lists = []
        for m in (admin, bob):
            members = yield m.client.enumMembers(m.handle, C.MEMBER_PRESENT)
            self.assertEqual(sorted(x["identity"] for x in members),
                             sorted([admin.name, bob.name]))
            for x in members:
                self.assertTrue(x["addresses"][0].startswith("127.0.0.1:"), x)
            lists.append({x["identity"]: x["nodeId"] for x in members})
        self.assertEqual(lists[0], lists[1])
        self.assertNotEqual(lists[0][admin.name], lists[0][bob.name])

        # Records both ways.
        fromB = yield bob.client.addRecord(bob.handle, T1, b"from B")
        fromA = yield admin.client.addRecord(admin.handle, T2, b"from A")
        for m, rid in ((admin, fromB), (bob, fromA)):
            yield self.next(m, C.EVENT_RECORD_CHANGED, recordId=rid)
        got = yield admin.client.getRecord(admin.handle, fromB)
        self.assertEqual((cred.unb64(got["data"]), got["creatorId"]), (b"from B", bob.name))
        yield admin.client.updateRecord(admin.handle, dict(got, data=cred.b64(b"edited on A")))
        yield self.next(bob, C.EVENT_RECORD_CHANGED, recordId=fromB,
                        changeType=C.RECORD_UPDATED)
        mine = yield bob.client.getRecord(bob.handle, fromB)
        self.assertEqual((cred.unb64(mine["data"]), mine["version"]), (b"edited on A", 2))
        yield bob.client.deleteRecord(bob.handle, fromB)
        yield self.next(admin, C.EVENT_RECORD_CHANGED, recordId=fromB,
                        changeType=C.RECORD_DELETED)
        yield self.quiet(admin, bob)
        expected = sorted([(C.RECORD_ADDED, fromB), (C.RECORD_ADDED, fromA),
                           (C.RECORD_UPDATED, fromB), (C.RECORD_DELETED, fromB)])
        for m in (admin, bob):
            self.assertEqual(sorted(self.changes(m)), expected)

        # Direct data both ways, in order.
        cid = yield admin.client.openDirectConnection(admin.handle, bob.name)
        for m, other in ((admin, bob), (bob, admin)):
            change = (yield self.next(m, C.EVENT_DIRECT_CONNECTION))["connectionChangeData"]
            self.assertEqual((change["status"], change["connectionId"], change["identity"],
                              change["nodeId"]),
                             (C.PEER_CONNECTED, cid, other.name, lists[0][other.name]))
        payloads = [os.urandom(n) for n in (0, 1, 100, 70000)] + [b"%d" % i for i in range(40)]
        for p in payloads:
            admin.client.sendData(admin.handle, cid, DATA, p)
            bob.client.sendData(bob.handle, cid, DATA, p[::-1])
        for m, expect in ((bob, payloads), (admin, [p[::-1] for p in payloads])):
            received = []
            for _ in expect:
                data = (yield self.next(m, C.EVENT_INCOMING_DATA))["incomingData"]
                self.assertEqual((data["connectionId"], data["type"]), (cid, DATA))
                received.append(cred.unb64(data["data"]))
            self.assertEqual(received, expect)
        # As on one node, a connection is usable once the open is answered.
        early = yield bob.client.openDirectConnection(bob.handle, admin.name)
        yield bob.client.sendData(bob.handle, early, DATA, b"early")
        yield bob.client.closeDirectConnection(bob.handle, early)
        for status in (C.PEER_CONNECTED, C.PEER_DISCONNECTED):
            for m in (admin, bob):
                yield self.next(m, C.EVENT_DIRECT_CONNECTION, status=status,
                                connectionId=early)
        data = (yield self.next(admin, C.EVENT_INCOMING_DATA, connectionId=early))
        self.assertEqual(cred.unb64(data["incomingData"]["data"]), b"early")

        # Bob drops off B; the group changes; bob comes back through C.
        yield bob.client.disconnect()
        yield self.next(admin, C.EVENT_MEMBER_CHANGED, changeType=C.MEMBER_DISCONNECTED,
                        identity=bob.name)
        event = yield self.next(admin, C.EVENT_DIRECT_CONNECTION,
                                status=C.PEER_DISCONNECTED)
        self.assertEqual(event["connectionChangeData"]["connectionId"], cid)
        present = yield admin.client.enumMembers(admin.handle, C.MEMBER_PRESENT)
        self.assertEqual([x["identity"] for x in present], [admin.name])
        added = yield admin.client.addRecord(admin.handle, T1, b"while away")
        record = yield admin.client.getRecord(admin.handle, fromA)
        yield admin.client.updateRecord(admin.handle, dict(record, data=cred.b64(b"again")))

        back = yield self.peer("c", "bob", "tcp", identity=bob.identity)
        back.handle = yield back.client.open(admin.client.groupPeerName(admin.handle))
        back.reg = yield back.client.registerEvent(
            back.handle, [C.EVENT_RECORD_CHANGED, C.EVENT_STATUS_CHANGED])
        yield back.client.connect(back.handle)
        yield self.next(admin, C.EVENT_MEMBER_CHANGED, changeType=C.MEMBER_CONNECTED,
                        identity=bob.name)
        yield self.quiet(back)
        self.assertEqual(sorted(self.changes(back)),
                         sorted([(C.RECORD_ADDED, added), (C.RECORD_UPDATED, fromA)]))
        records = {}
        for m in (admin, back):
            records[m] = [(r["id"], r["version"]) for r in (yield m.client.enumRecords(m.handle))]
        self.assertEqual(sorted(records[admin]), sorted(records[back]))
        self.assertEqual(sorted(r for r, _ in records[admin]), sorted([fromA, added]))
        members = yield back.client.enumMembers(back.handle, C.MEMBER_PRESENT)
        nodes = {x["identity"]: x["nodeId"] for x in members}
        self.assertEqual(sorted(nodes), sorted([admin.name, bob.name]))
        self.assertNotIn(nodes[bob.name], (lists[0][admin.name], lists[0][bob.name]))
        self.assertNoTraceback("a", "b", "c")


class NodeKilledTests(PeerGroupsProcessMixin, TestCase):
    def setUp(self):
        return self.startCluster(["a", "b", "c"])

    @defer.inlineCallbacks
    def test_sigkill(self):
        """
        Node B is killed with SIGKILL while bob (on B) has a direct
        connection with the administrator (on A): within dead_after +
        heartbeat (and slack for the reaper's round and a busy machine) A
        reports bob DISCONNECTED and the direct connection closed, lists
        him absent; A and C go on serving the group across nodes.
        """
        admin, bob = yield self.pair()
        carol = yield self.peer("c", "carol", "tcp")
        invitation = yield admin.client.createInvitation(
            admin.handle, carol.identity.identityInfo(), roles=(C.ROLE_MEMBER,))
        carol.handle = yield carol.client.join(invitation)
        yield self.online(carol)
        yield self.next(admin, C.EVENT_MEMBER_CHANGED, changeType=C.MEMBER_CONNECTED,
                        identity=carol.name)
        cid = yield admin.client.openDirectConnection(admin.handle, bob.name)
        yield self.next(admin, C.EVENT_DIRECT_CONNECTION, status=C.PEER_CONNECTED)
        yield self.next(bob, C.EVENT_DIRECT_CONNECTION, status=C.PEER_CONNECTED)
        yield self.quiet(admin, carol)

        self.nodes["b"].transport.signalProcess("KILL")
        started = reactor.seconds()
        yield self.nodes["b"].ended
        yield bob.client.closed
        offline = {}
        for m in (admin, carol):
            yield self.next(m, C.EVENT_MEMBER_CHANGED, changeType=C.MEMBER_DISCONNECTED,
                            identity=bob.name)
            offline[m.name] = reactor.seconds() - started
        event = yield self.next(admin, C.EVENT_DIRECT_CONNECTION, status=C.PEER_DISCONNECTED)
        closed = reactor.seconds() - started
        self.assertEqual(event["connectionChangeData"]["connectionId"], cid)
        log.msg(f"pg-process: offline after {offline}, direct closed after {closed:.2f}s")
        for took in list(offline.values()) + [closed]:
            self.assertLess(took, DEAD_AFTER + HEARTBEAT + 1.5, (offline, closed))
        for m in (admin, carol):
            present = yield m.client.enumMembers(m.handle, C.MEMBER_PRESENT)
            self.assertEqual(sorted(x["identity"] for x in present),
                             sorted([admin.name, carol.name]))
        yield self.failsWith(admin.client.sendData(admin.handle, cid, DATA, b"x"),
                             "PEER_E_CONNECTION_NOT_FOUND")

        # The survivors go on: records and direct data between A and C.
        rid = yield carol.client.addRecord(carol.handle, T1, b"after the kill")
        yield self.next(admin, C.EVENT_RECORD_CHANGED, recordId=rid)
        # (As a peer on one node may, the administrator sends once the
        # target is connected, without waiting for its own event.)
        cid2 = yield admin.client.openDirectConnection(admin.handle, carol.name)
        yield self.next(carol, C.EVENT_DIRECT_CONNECTION, status=C.PEER_CONNECTED)
        yield admin.client.sendData(admin.handle, cid2, DATA, b"still here")
        data = (yield self.next(carol, C.EVENT_INCOMING_DATA))["incomingData"]
        self.assertEqual(cred.unb64(data["data"]), b"still here")
        # Bob comes back on A: the group is his as before.
        back = yield self.peer("a", "bob", "ws", identity=bob.identity)
        back.handle = yield back.client.open(admin.client.groupPeerName(admin.handle))
        yield self.online(back)
        yield self.next(carol, C.EVENT_MEMBER_CHANGED, changeType=C.MEMBER_CONNECTED,
                        identity=bob.name)
        self.assertNoTraceback("a", "c")
        self.assertEqual(self.redis.command("HLEN", "pgit:pg:presence"), b":3\r\n")


class NodeRestartedTests(PeerGroupsProcessMixin, TestCase):
    def setUp(self):
        return self.startCluster(["a", "b"])

    @defer.inlineCallbacks
    def test_sigkillThenRestartSameNode(self):
        """
        Node B is killed and started again at once under the same node id
        (as a supervisor would), sooner than dead_after: A reports bob
        DISCONNECTED and his direct connection closed all the same; bob
        reopens the group on B and A sees him CONNECTED, once, and still
        present after dead_after has passed.
        """
        admin, bob = yield self.pair()
        gpn = admin.client.groupPeerName(admin.handle)
        cid = yield admin.client.openDirectConnection(admin.handle, bob.name)
        yield self.next(admin, C.EVENT_DIRECT_CONNECTION, status=C.PEER_CONNECTED)
        self.nodes["b"].transport.signalProcess("KILL")
        yield self.nodes["b"].ended
        yield self.startNode("b")
        yield self.next(admin, C.EVENT_MEMBER_CHANGED, changeType=C.MEMBER_DISCONNECTED,
                        identity=bob.name)
        event = yield self.next(admin, C.EVENT_DIRECT_CONNECTION, status=C.PEER_DISCONNECTED)
        self.assertEqual(event["connectionChangeData"]["connectionId"], cid)
        back = yield self.peer("b", "bob", "ws", identity=bob.identity)
        back.handle = yield back.client.open(gpn)
        yield self.online(back)
        yield self.next(admin, C.EVENT_MEMBER_CHANGED, changeType=C.MEMBER_CONNECTED,
                        identity=bob.name)
        yield settle(reactor, DEAD_AFTER + 2 * HEARTBEAT + 0.5)
        yield self.quiet(admin)
        self.assertEqual([c for c in self.changes(admin, C.EVENT_MEMBER_CHANGED)
                          if c[1] == bob.name],
                         [(C.MEMBER_JOINED, bob.name), (C.MEMBER_CONNECTED, bob.name),
                          (C.MEMBER_DISCONNECTED, bob.name), (C.MEMBER_CONNECTED, bob.name)])
        for m in (admin, back):
            present = yield m.client.enumMembers(m.handle, C.MEMBER_PRESENT)
            self.assertEqual(sorted(x["identity"] for x in present),
                             sorted([admin.name, bob.name]))
        cid = yield admin.client.openDirectConnection(admin.handle, bob.name)
        yield admin.client.sendData(admin.handle, cid, DATA, b"again")
        data = (yield self.next(back, C.EVENT_INCOMING_DATA))["incomingData"]
        self.assertEqual(cred.unb64(data["data"]), b"again")
        self.assertNoTraceback("a", "b")


class RedisRestartTests(PeerGroupsProcessMixin, TestCase):
    def setUp(self):
        return self.startCluster(["a", "b"], durable=True)

    def test_redisStoppedAndRestarted(self):
        """
        Redis (append-only, fsync always) is stopped while bob pipelines
        record writes: every write is either acknowledged or refused with
        E_UNEXPECTED and one of the documented messages (only a write cut
        off in flight, which says it may have been stored, may be in Redis
        afterwards, and is then raised once); while Redis is away every
        change on either node is refused, reads go on, both nodes answer
        /healthz 503; once Redis is back both answer 200, writes work and
        cross nodes again, and every acknowledged record is on both nodes
        and in Redis, raised once on each.
        """
        return self.outage(self.redis.stop)

    def test_redisKilledAndRestarted(self):
        """
        The same with Redis killed (SIGKILL): with C{appendfsync always}
        what it acknowledged was on disk, and survives.
        """
        return self.outage(self.redis.kill)

    @defer.inlineCallbacks
    def outage(self, stop):
        admin, bob = yield self.pair()
        gpn = admin.client.groupPeerName(admin.handle)
        acknowledged, refused, writes = [], [], []
        enough = defer.Deferred()

        def write():
            d = bob.client.addRecord(bob.handle, T1, b"record %d" % len(writes))
            writes.append(d.addCallbacks(acked, failed))

        def acked(rid):
            acknowledged.append(rid)
            if len(acknowledged) == 50 and not enough.called:
                enough.callback(None)
            if not refused:
                write()

        def failed(f):
            f.trap(PeerError)
            refused.append(f.value)
        # 20 writes in flight all along, until the first is refused.
        for _ in range(20):
            write()
        yield enough
        yield stop()
        while not all(d.called for d in writes):
            yield defer.DeferredList(writes)
        self.assertGreaterEqual(len(refused), 1)
        self.assertEqual(len(acknowledged) + len(refused), len(writes))
        # Those cut off in flight may have been stored, and say so; those
        # refused once the node knew Redis was gone were not.
        for e in refused:
            self.assertEqual(e.name, "E_UNEXPECTED")
            self.assertIn(e.message, (STORE_DOWN, STORE_LOST))
        unknown = sum(1 for e in refused if e.message == STORE_LOST)

        for name in ("a", "b"):
            body = yield self.waitHealth(name, 503)
            self.assertIn(b"Redis", body)
        e = yield self.failsWith(admin.client.addRecord(admin.handle, T2, b"refused"),
                                 "E_UNEXPECTED")
        self.assertEqual(e.message, STORE_DOWN)
        yield self.failsWith(bob.client.setProperties(bob.handle, comment="x"), "E_UNEXPECTED")
        carol = yield self.peer("a", "carol", "tcp")
        yield self.failsWith(carol.client.create(friendlyName="Lost"), "E_UNEXPECTED")
        # Reads go on from memory: bob's node has all it acknowledged (A
        # may miss the last broadcasts; the merge after Redis returns
        # brings them).
        seen = {r["id"] for r in (yield bob.client.enumRecords(bob.handle))}
        self.assertEqual(seen, set(acknowledged))
        self.assertLessEqual({r["id"] for r in (yield admin.client.enumRecords(admin.handle))},
                             seen)

        yield self.redis.start()
        for name in ("a", "b"):
            yield self.waitHealth(name, 200)
        # healthz follows the engine's connection; the face's own reload
        # after Redis returns follows it closely.
        after = yield self.retryWhileDown(lambda: admin.client.addRecord(admin.handle, T2,
                                                                         b"after"))
        yield self.next(bob, C.EVENT_RECORD_CHANGED, recordId=after)
        stored = {}
        for m in (admin, bob):
            stored[m.name] = {r["id"] for r in (yield m.client.enumRecords(m.handle))}
        self.assertEqual(stored[admin.name], stored[bob.name])
        self.assertEqual(set(acknowledged) - stored[admin.name], set())
        self.assertIn(after, stored[admin.name])
        storedRefused = stored[admin.name] - set(acknowledged) - {after}
        log.msg(f"pg-process: {len(acknowledged)} acknowledged, {len(refused)} refused "
                f"({unknown} as maybe stored), {len(storedRefused)} of them stored")
        self.assertLessEqual(len(storedRefused), unknown)
        inRedis = self.redis.command("HLEN", "pgit:pg:records")
        self.assertEqual(inRedis, b":%d\r\n" % len(stored[admin.name]))
        # Each record there was raised once on each node, the ones whose
        # answer was lost included.
        yield self.quiet(admin, bob)
        for m in (admin, bob):
            self.assertEqual(sorted(self.changes(m)),
                             sorted((C.RECORD_ADDED, rid) for rid in stored[admin.name]))
        # Presence was registered again and a new member joins across.
        present = yield bob.client.enumMembers(bob.handle, C.MEMBER_PRESENT)
        self.assertEqual(sorted(x["identity"] for x in present), sorted([admin.name, bob.name]))
        handle = yield carol.client.create(friendlyName="After")
        self.assertTrue(handle)
        reopened = yield self.peer("b", "admin", "ws", identity=admin.identity)
        reopened.handle = yield reopened.client.open(gpn)
        self.assertNoTraceback("a", "b")
        for name in ("a", "b"):
            lines = [line for line in self.nodes[name].lines()
                     if "peer groups: the cluster store (Redis) is unreachable" in line]
            self.assertEqual(len(lines), 1, self.nodes[name].text())

    @defer.inlineCallbacks
    def retryWhileDown(self, write, timeout=10):
        """
        C{write()} until the node takes it, for a node whose Redis has just
        come back; each refusal must be the documented one.
        """
        start = reactor.seconds()
        while True:
            try:
                result = yield write()
                log.msg(f"pg-process: a write was taken {reactor.seconds() - start:.2f}s "
                        "after /healthz said 200")
                return result
            except PeerError as e:
                self.assertEqual((e.name, e.message), ("E_UNEXPECTED", STORE_DOWN))
                self.assertLess(reactor.seconds() - start, timeout)
                yield settle(reactor, 0.1)
