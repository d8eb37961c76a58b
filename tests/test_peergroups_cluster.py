# -*- test-case-name: tests.test_peergroups_cluster -*-
"""
The peer-groups face on two broker nodes (two L{Cluster}s on one real
redis-server, each face with its own WebSocket and TCP listeners): peers
of one group connected to different nodes see each other as on one node;
a node that stops heartbeating has its members reported offline; a Redis
outage refuses changes and loses nothing acknowledged.
"""

import os

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from broker.cluster.node import Cluster
from broker.cluster.redis import RedisClient, RedisOutcomeUnknown
from broker.peergroups import constants as C
from broker.peergroups import credentials as cred
from broker.peergroups.records import Record
from broker.peergroups.redisstore import RedisPeerGroupStore
from broker.peergroups.params import STORE_LOST
from broker.peergroups.session import RELOAD_LOST
from tests.pgharness import PeerBroker
from tests.redisserver import RedisServer, settle, silence
from tests.test_cluster_redis import waitFor
from tests.test_peergroups import DATA, HOUR, T1, T2, Base

HEARTBEAT = 0.1
DEAD_AFTER = 0.5


class TwoNodes(Base):
    """
    L{Base}'s helpers over two brokers: C{self.a} and C{self.b};
    C{self.broker} is the one new peers connect to.
    """

    transport = "tcp"

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(self, reactor)
        yield self.redis.start()
        self.a = yield self.node("a")
        self.b = yield self.node("b")
        self.broker = self.a

    @defer.inlineCallbacks
    def node(self, name):
        client = RedisClient(reactor, self.redis.url, maxDelay=0.3)
        cluster = Cluster(reactor, client, prefix="t", nodeId=name, heartbeat=HEARTBEAT,
                          deadAfter=DEAD_AFTER)
        client.startService()
        cluster.startService()
        self.addCleanup(client.stopService)
        self.addCleanup(self.stopCluster, cluster)
        yield waitFor(lambda: cluster.healthy)
        broker = yield PeerBroker(self, reactor, cluster=cluster).start()
        broker.clusterNode = cluster
        return broker

    @defer.inlineCallbacks
    def stopCluster(self, cluster):
        if cluster.running:
            yield cluster.stopService()

    @defer.inlineCallbacks
    def on(self, broker, name, transport="tcp", identity=None):
        self.broker = broker
        m = yield self.peer(name, transport, identity=identity)
        self.broker = self.a
        return m

    def next(self, m, eventType=None, **fields):
        return m.next(eventType, **fields).addTimeout(5, reactor)

    @defer.inlineCallbacks
    def quiet(self, *members):
        """
        Let cross-node messages land, then everything queued per member.
        """
        yield settle(reactor, 0.3)
        out = []
        for m in members:
            out.append((yield m.drain()))
        return out

    @defer.inlineCallbacks
    def pair(self, bobTransport="ws"):
        """
        An administrator on node A and bob, invited by it, on node B, both
        online and registered for every event.
        """
        admin = yield self.group()
        bob = yield self.on(self.b, "bob", bobTransport)
        invitation = yield admin.client.createInvitation(admin.handle, bob.identity.identityInfo(),
                                                         roles=(C.ROLE_MEMBER,))
        bob.handle = yield bob.client.join(invitation)
        yield self.register(bob)
        yield self.online(bob)
        # As a peer on one node would, the administrator acts on bob once
        # it saw him connect.
        yield self.next(admin, C.EVENT_MEMBER_CHANGED, changeType=C.MEMBER_CONNECTED,
                        identity=bob.name)
        return admin, bob


class ClusterTests(TwoNodes, TestCase):
    @defer.inlineCallbacks
    def test_memberOnOtherNode(self):
        """
        Bob joins on B with an invitation made on A: A's administrator sees
        JOINED and CONNECTED once; each lists the other present with its
        node id and address.
        """
        admin, bob = yield self.pair()
        yield self.quiet(admin)
        seen = [e["memberChangeData"] for e in admin.client.allEvents
                if e["eventType"] == C.EVENT_MEMBER_CHANGED and e["registration"] == admin.reg
                and e["memberChangeData"]["identity"] == bob.name]
        self.assertEqual(seen, [{"changeType": C.MEMBER_JOINED, "identity": bob.name},
                                {"changeType": C.MEMBER_CONNECTED, "identity": bob.name}])
        for m, order in ((admin, [admin.name, bob.name]), (bob, [bob.name, admin.name])):
            members = yield m.client.enumMembers(m.handle, C.MEMBER_PRESENT)
            self.assertEqual([x["identity"] for x in members], order)
            for x in members:
                self.assertNotEqual(x["nodeId"], "0")
                self.assertTrue(x["addresses"][0].startswith("127.0.0.1:"))
        # The node ids are the same whichever node answers.
        listA = yield admin.client.enumMembers(admin.handle)
        listB = yield bob.client.enumMembers(bob.handle)
        self.assertEqual({x["identity"]: x["nodeId"] for x in listA},
                         {x["identity"]: x["nodeId"] for x in listB})

    @defer.inlineCallbacks
    def test_recordsBothWays(self):
        """
        Records added, updated and deleted on either node raise
        RECORD_CHANGED exactly once per registration on both nodes (type
        filters honoured), and the other node reads them; attribute search
        finds the other node's records.
        """
        admin, bob = yield self.pair()
        typed = yield admin.client.registerEvent(admin.handle, [(C.EVENT_RECORD_CHANGED, T2)])
        attrs = '<attributes><attribute name="colour">blue</attribute></attributes>'
        rid = yield bob.client.addRecord(bob.handle, T1, b"from B", attributes=attrs)
        event = yield self.next(admin, C.EVENT_RECORD_CHANGED, recordId=rid)
        self.assertEqual(event["recordChangeData"], {"changeType": C.RECORD_ADDED,
                                                     "recordId": rid, "recordType": T1})
        got = yield admin.client.getRecord(admin.handle, rid)
        self.assertEqual((cred.unb64(got["data"]), got["creatorId"]), (b"from B", bob.name))
        found = yield admin.client.searchRecords(
            admin.handle, '<peersearch><clause attrib="colour">bl*</clause></peersearch>')
        self.assertEqual([r["id"] for r in found], [rid])

        other = yield admin.client.addRecord(admin.handle, T2, b"from A")
        yield self.next(bob, C.EVENT_RECORD_CHANGED, recordId=other)
        yield admin.client.updateRecord(admin.handle, dict(got, data=cred.b64(b"edited on A")))
        yield self.next(bob, C.EVENT_RECORD_CHANGED, recordId=rid,
                        changeType=C.RECORD_UPDATED)
        mine = yield bob.client.getRecord(bob.handle, rid)
        self.assertEqual((cred.unb64(mine["data"]), mine["version"]), (b"edited on A", 2))
        yield bob.client.deleteRecord(bob.handle, rid)
        yield self.next(admin, C.EVENT_RECORD_CHANGED, recordId=rid,
                        changeType=C.RECORD_DELETED)
        yield self.quiet(admin, bob)
        expected = sorted([(C.RECORD_ADDED, rid), (C.RECORD_ADDED, other),
                           (C.RECORD_UPDATED, rid), (C.RECORD_DELETED, rid)])
        for m in (admin, bob):
            changes = sorted((e["recordChangeData"]["changeType"],
                              e["recordChangeData"]["recordId"])
                             for e in m.client.allEvents
                             if e["registration"] == m.reg
                             and e["eventType"] == C.EVENT_RECORD_CHANGED)
            self.assertEqual(changes, expected)
        typedEvents = [e for e in admin.client.allEvents if e["registration"] == typed]
        self.assertEqual([e["recordChangeData"]["recordId"] for e in typedEvents], [other])
        recordsA = yield admin.client.enumRecords(admin.handle)
        recordsB = yield bob.client.enumRecords(bob.handle)
        self.assertEqual([(r["id"], r["version"]) for r in recordsA],
                         [(r["id"], r["version"]) for r in recordsB])
        self.assertEqual([r["id"] for r in recordsA], [other])

    @defer.inlineCallbacks
    def test_directDataBothWays(self):
        """
        A direct connection from A's administrator to bob on B: both ends
        get CONNECTED with the same id and each other's node ids; data goes
        both ways intact, in order, with its type; enumConnections lists
        it on both; a close tells both ends.
        """
        admin, bob = yield self.pair()
        members = {x["identity"]: x["nodeId"] for x in (yield admin.client.enumMembers(
            admin.handle))}
        cid = yield admin.client.openDirectConnection(admin.handle, bob.name)
        for m, other in ((admin, bob), (bob, admin)):
            event = yield self.next(m, C.EVENT_DIRECT_CONNECTION)
            change = event["connectionChangeData"]
            self.assertEqual((change["status"], change["connectionId"], change["identity"],
                              change["nodeId"]),
                             (C.PEER_CONNECTED, cid, other.name, members[other.name]))
        payloads = [os.urandom(n) for n in (0, 1, 100, 70000)] + [bytes([i]) * 10
                                                                  for i in range(50)]
        for p in payloads:
            yield admin.client.sendData(admin.handle, cid, DATA, p)
        for p in payloads:
            event = yield self.next(bob, C.EVENT_INCOMING_DATA)
            data = event["incomingData"]
            self.assertEqual((data["connectionId"], data["type"], cred.unb64(data["data"])),
                             (cid, DATA, p))
        yield bob.client.sendData(bob.handle, cid, DATA, b"back")
        event = yield self.next(admin, C.EVENT_INCOMING_DATA)
        self.assertEqual(cred.unb64(event["incomingData"]["data"]), b"back")
        for m, other in ((admin, bob), (bob, admin)):
            connections = yield m.client.enumConnections(m.handle, C.CONNECTION_DIRECT)
            self.assertEqual([(c["connectionId"], c["peerId"]) for c in connections],
                             [(cid, other.name)])
        yield bob.client.closeDirectConnection(bob.handle, cid)
        for m in (admin, bob):
            event = yield self.next(m, C.EVENT_DIRECT_CONNECTION)
            self.assertEqual((event["connectionChangeData"]["status"],
                              event["connectionChangeData"]["connectionId"]),
                             (C.PEER_DISCONNECTED, cid))
        yield self.failsWith(admin.client.sendData(admin.handle, cid, DATA, b"x"),
                             "PEER_E_CONNECTION_NOT_FOUND")
        self.assertEqual((self.a.pg.directs, self.b.pg.directs), ({}, {}))

    @defer.inlineCallbacks
    def test_directUsableOnceOpenAnswered(self):
        """
        As on one node, a direct connection can be used as soon as
        openDirectConnection has answered, before its CONNECTED event: data
        sent at once reaches bob on B after his CONNECTED, in order; one
        closed at once is reported CONNECTED then DISCONNECTED at both ends.
        """
        admin, bob = yield self.pair()
        cid = yield admin.client.openDirectConnection(admin.handle, bob.name)
        for i in range(3):
            yield admin.client.sendData(admin.handle, cid, DATA, b"%d" % i)
        other = yield admin.client.openDirectConnection(admin.handle, bob.name)
        yield admin.client.closeDirectConnection(admin.handle, other)
        yield self.next(bob, C.EVENT_INCOMING_DATA, connectionId=cid)
        yield self.quiet(admin, bob)
        for m in (admin, bob):
            seen = [(e["eventType"], e.get("connectionChangeData", {}).get("status"),
                     e.get("connectionChangeData", e.get("incomingData"))["connectionId"],
                     cred.unb64(e["incomingData"]["data"]) if "incomingData" in e else None)
                    for e in m.client.allEvents if e["registration"] == m.reg
                    and e["eventType"] in (C.EVENT_DIRECT_CONNECTION, C.EVENT_INCOMING_DATA)]
            expected = [(C.EVENT_DIRECT_CONNECTION, C.PEER_CONNECTED, cid, None)]
            if m is bob:
                expected += [(C.EVENT_INCOMING_DATA, None, cid, b"%d" % i) for i in range(3)]
            expected += [(C.EVENT_DIRECT_CONNECTION, C.PEER_CONNECTED, other, None),
                         (C.EVENT_DIRECT_CONNECTION, C.PEER_DISCONNECTED, other, None)]
            self.assertEqual(seen, expected)
        for m in (admin, bob):
            connections = yield m.client.enumConnections(m.handle, C.CONNECTION_DIRECT)
            self.assertEqual([c["connectionId"] for c in connections], [cid])

    @defer.inlineCallbacks
    def test_directRefusedAcrossNodes(self):
        """
        A target on the other node without a DIRECT_CONNECTION registration
        refuses, as on one node (CONNECTION_FAILED with
        PEER_E_CONNECTION_REFUSED).
        """
        admin = yield self.group()
        carol = yield self.on(self.b, "carol")
        invitation = yield admin.client.createInvitation(
            admin.handle, carol.identity.identityInfo(), roles=(C.ROLE_MEMBER,))
        carol.handle = yield carol.client.join(invitation)
        yield self.register(carol, [C.EVENT_STATUS_CHANGED])
        yield self.online(carol)
        yield waitFor(lambda: carol.name in self.a.pg.apps["default"].groups[
            admin.client.groupPeerName(admin.handle)].remote)
        cid = yield admin.client.openDirectConnection(admin.handle, carol.name)
        event = yield self.next(admin, C.EVENT_DIRECT_CONNECTION)
        change = event["connectionChangeData"]
        self.assertEqual((change["status"], change["connectionId"],
                          change["hrConnectionFailedReason"]),
                         (C.PEER_CONNECTION_FAILED, cid, 0x8063010B))

    @defer.inlineCallbacks
    def test_offlineMemberConvergesOnOtherNode(self):
        """
        Bob drops off node B; records change on A meanwhile; bob comes back
        through node A and is told of each change once, the delete by its
        tombstone, and lists what the administrator lists.
        """
        admin, bob = yield self.pair()
        kept = yield admin.client.addRecord(admin.handle, T1, b"kept")
        doomed = yield bob.client.addRecord(bob.handle, T1, b"doomed")
        yield self.next(bob, C.EVENT_RECORD_CHANGED, recordId=kept)
        yield self.next(admin, C.EVENT_RECORD_CHANGED, recordId=doomed)
        yield bob.client.disconnect()
        yield self.next(admin, C.EVENT_MEMBER_CHANGED,
                        changeType=C.MEMBER_DISCONNECTED, identity=bob.name)
        present = yield admin.client.enumMembers(admin.handle, C.MEMBER_PRESENT)
        self.assertEqual([m["identity"] for m in present], [admin.name])
        added = yield admin.client.addRecord(admin.handle, T1, b"added")
        record = yield admin.client.getRecord(admin.handle, kept)
        yield admin.client.updateRecord(admin.handle, dict(record, data=cred.b64(b"changed")))
        yield admin.client.deleteRecord(admin.handle, doomed)

        back = yield self.on(self.a, "bob", identity=bob.identity)
        back.handle = yield back.client.open(admin.client.groupPeerName(admin.handle))
        yield self.register(back, [C.EVENT_RECORD_CHANGED, C.EVENT_STATUS_CHANGED])
        yield back.client.connect(back.handle)
        events = yield back.drain()
        changes = sorted((e["recordChangeData"]["changeType"], e["recordChangeData"]["recordId"])
                         for e in events if e["eventType"] == C.EVENT_RECORD_CHANGED)
        self.assertEqual(changes, sorted([(C.RECORD_UPDATED, kept), (C.RECORD_DELETED, doomed),
                                          (C.RECORD_ADDED, added)]))
        mine = sorted(r["id"] for r in (yield back.client.enumRecords(back.handle)))
        self.assertEqual(mine, sorted([kept, added]))

    @defer.inlineCallbacks
    def test_propertiesAcrossNodes(self):
        """
        SetProperties on A raises PROPERTY_CHANGED on B and B reads the new
        properties.
        """
        admin, bob = yield self.pair()
        yield admin.client.setProperties(admin.handle, friendlyName="Renamed")
        yield self.next(bob, C.EVENT_PROPERTY_CHANGED)
        props = yield bob.client.getProperties(bob.handle)
        self.assertEqual(props["friendlyName"], "Renamed")

    @defer.inlineCallbacks
    def test_deadNodeMembersOffline(self):
        """
        Node B stops heartbeating (as if frozen or cut off): within
        deadAfter + heartbeat (and a margin for the reaper's round) A
        reports bob DISCONNECTED, lists him absent, and closes the direct
        connection to him.
        """
        admin, bob = yield self.pair()
        cid = yield admin.client.openDirectConnection(admin.handle, bob.name)
        yield self.next(admin, C.EVENT_DIRECT_CONNECTION,
                        status=C.PEER_CONNECTED)
        yield self.quiet(admin)
        silence(self.b.clusterNode)
        started = reactor.seconds()
        event = yield self.next(admin, C.EVENT_MEMBER_CHANGED,
                                changeType=C.MEMBER_DISCONNECTED, identity=bob.name)
        took = reactor.seconds() - started
        self.assertEqual(event["memberChangeData"]["identity"], bob.name)
        self.assertLess(took, DEAD_AFTER + HEARTBEAT + 1.0)
        event = yield self.next(admin, C.EVENT_DIRECT_CONNECTION,
                                status=C.PEER_DISCONNECTED)
        self.assertEqual(event["connectionChangeData"]["connectionId"], cid)
        present = yield admin.client.enumMembers(admin.handle, C.MEMBER_PRESENT)
        self.assertEqual([m["identity"] for m in present], [admin.name])
        self.assertEqual(self.redis.command("HLEN", "t:pg:presence"), b":1\r\n")

    @defer.inlineCallbacks
    def test_redisOutage(self):
        """
        With Redis stopped, changes on either node are refused with
        E_UNEXPECTED (saying why) and reads still work; once it is back
        changes work again and cross nodes, and every record acknowledged
        before the outage is there, in Redis as on both nodes.
        """
        admin, bob = yield self.pair()
        self.redis.command("CONFIG", "SET", "save", "3600 1")
        before = yield bob.client.addRecord(bob.handle, T1, b"before")
        yield self.next(admin, C.EVENT_RECORD_CHANGED)
        yield self.redis.stop()
        yield waitFor(lambda: not self.a.store.available and not self.b.store.available)
        e = yield self.failsWith(admin.client.addRecord(admin.handle, T1, b"refused"),
                                 "E_UNEXPECTED")
        self.assertIn("Redis", e.message)
        yield self.failsWith(bob.client.setProperties(bob.handle, comment="x"),
                             "E_UNEXPECTED")
        carol = yield self.on(self.b, "carol")
        yield self.failsWith(carol.client.create(friendlyName="Lost"), "E_UNEXPECTED")
        records = yield admin.client.enumRecords(admin.handle)
        self.assertEqual([r["id"] for r in records], [before])

        yield self.redis.start()
        yield waitFor(lambda: self.a.store.available and self.b.store.available, timeout=10)
        after = yield admin.client.addRecord(admin.handle, T1, b"after")
        event = yield self.next(bob, C.EVENT_RECORD_CHANGED, recordId=after)
        self.assertEqual(event["recordChangeData"]["changeType"], C.RECORD_ADDED)
        for m in (admin, bob):
            records = yield m.client.enumRecords(m.handle)
            self.assertEqual(sorted(r["id"] for r in records), sorted([before, after]))
        fresh = RedisPeerGroupStore(self.a.clusterNode)
        data = yield fresh.load()
        self.assertEqual(sorted(r.id for _, _, r in data["records"]), sorted([before, after]))
        # Presence was registered again after the restart.
        present = yield bob.client.enumMembers(bob.handle, C.MEMBER_PRESENT)
        self.assertEqual(len(present), 2)

    @defer.inlineCallbacks
    def test_passwordJoinOnOtherNode(self):
        """
        A password group created on A (its issuer certificate naming the
        cluster's issuer key) is joined with the password on B: the
        broker-signed credentials verify, and A lists the joiner present.
        """
        admin = yield self.group(password="s3cret p4ss", passwordRole=C.ROLE_MEMBER)
        invitation = yield admin.client.createPasswordInvitation(admin.handle)
        bob = yield self.on(self.b, "bob")
        hr, bob.handle = yield bob.client.passwordJoin(invitation, "s3cret p4ss")
        yield self.register(bob)
        yield self.online(bob)
        creds = yield bob.call("getCredentials")
        self.assertEqual(creds["credentialInfo"]["roles"], [C.ROLE_MEMBER])
        yield self.next(admin, C.EVENT_MEMBER_CHANGED, changeType=C.MEMBER_CONNECTED,
                        identity=bob.name)
        members = yield admin.client.enumMembers(admin.handle, C.MEMBER_PRESENT)
        self.assertEqual([m["identity"] for m in members], [admin.name, bob.name])

    def test_oneKeyPairForTheCluster(self):
        """
        The issuer key (password joiners' certificates) and the export key
        are one for the cluster, though each node made its own at start.
        """
        self.assertEqual(self.a.pg.issuerPublicKey(), self.b.pg.issuerPublicKey())
        self.assertEqual(self.a.pg.exportKey, self.b.pg.exportKey)

    @defer.inlineCallbacks
    def test_resyncAfterReconnect(self):
        """
        After its Redis connections come back a node registers its online
        members again and merges the store: a change whose broadcast was
        lost (here stored behind every node's back) is raised once on
        both nodes, and presence is whole again.
        """
        admin, bob = yield self.pair()
        gpn = admin.client.groupPeerName(admin.handle)
        group = self.a.pg.apps["default"].groups[gpn]
        now = self.a.pg.now()
        missed = Record(C.newGUID(), T1, 1, 0, admin.name, "", "", now, now, now + HOUR,
                        b"missed", group.seq + 1, group.seq + 1)
        yield self.a.store.apply([("record", "default", gpn, missed),
                                  ("seq", "default", gpn, group.seq + 1)])
        self.redis.command("DEL", "t:pg:presence")
        self.redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        self.redis.command("CLIENT", "KILL", "TYPE", "normal")
        for m in (admin, bob):
            event = yield self.next(m, C.EVENT_RECORD_CHANGED, recordId=missed.id)
            self.assertEqual(event["recordChangeData"]["changeType"], C.RECORD_ADDED)
            got = yield m.client.getRecord(m.handle, missed.id)
            self.assertEqual(cred.unb64(got["data"]), b"missed")
        yield waitFor(lambda: self.redis.command("HLEN", "t:pg:presence") == b":2\r\n")
        yield self.quiet(admin, bob)
        for m in (admin, bob):
            seen = [e for e in m.client.allEvents if e.get("recordChangeData", {}).get(
                "recordId") == missed.id and e["registration"] == m.reg]
            self.assertEqual(len(seen), 1)

    @defer.inlineCallbacks
    def test_writeCutOffInFlight(self):
        """
        A record write Redis executed but whose answer was lost (the
        connection dropped in between, as when Redis shuts down under
        pipelined writes) is refused with the message that says it may have
        been stored, not "nothing was changed"; once the nodes are back on
        Redis the record is raised as added, exactly once, on both nodes.
        """
        admin, bob = yield self.pair()
        store = self.b.store
        real = store.apply

        def executedThenCutOff(changes):
            store.apply = real

            def cut(_):
                self.redis.command("CLIENT", "KILL", "TYPE", "pubsub")
                self.redis.command("CLIENT", "KILL", "TYPE", "normal")
                raise RedisOutcomeUnknown("lost the connection to Redis")
            return real(changes).addCallback(cut)
        store.apply = executedThenCutOff
        e = yield self.failsWith(bob.client.addRecord(bob.handle, T1, b"in flight"),
                                 "E_UNEXPECTED")
        self.assertEqual(e.message, STORE_LOST)
        for m in (admin, bob):
            event = yield self.next(m, C.EVENT_RECORD_CHANGED, changeType=C.RECORD_ADDED)
            rid = event["recordChangeData"]["recordId"]
            got = yield m.client.getRecord(m.handle, rid)
            self.assertEqual(cred.unb64(got["data"]), b"in flight")
        yield self.quiet(admin, bob)
        for m in (admin, bob):
            added = [e for e in m.client.allEvents if e["registration"] == m.reg
                     and e["eventType"] == C.EVENT_RECORD_CHANGED]
            self.assertEqual([e["recordChangeData"]["recordId"] for e in added], [rid])

    @defer.inlineCallbacks
    def test_changeCutOffInFlight(self):
        """
        A change other than a record write (here properties) that Redis
        executed but whose answer was lost: refused saying it may have been
        stored; the node starts again from Redis (its sessions close, an
        outage logged as such, no traceback) and then shows what Redis
        holds, on both nodes.
        """
        admin, bob = yield self.pair()
        gpn = admin.client.groupPeerName(admin.handle)
        store = self.a.store
        real = store.apply
        # Only A's command connection drops (a blip between A and Redis).
        clientId = yield self.a.clusterNode.redis.execute("CLIENT", "ID")

        def executedThenCutOff(changes):
            store.apply = real

            def cut(_):
                self.redis.command("CLIENT", "KILL", "ID", clientId)
                raise RedisOutcomeUnknown("lost the connection to Redis")
            return real(changes).addCallback(cut)
        store.apply = executedThenCutOff
        e = yield self.failsWith(admin.client.setProperties(admin.handle, friendlyName="Maybe"),
                                 "E_UNEXPECTED")
        self.assertEqual(e.message, RELOAD_LOST)
        yield admin.client.closed
        self.assertEqual(self.flushLoggedErrors(), [])
        yield self.a.pg.whenLoaded()
        again = yield self.on(self.a, "admin", identity=admin.identity)
        again.handle = yield again.client.open(gpn)
        yield self.register(again)
        yield self.online(again)
        props = yield again.client.getProperties(again.handle)
        self.assertEqual(props["friendlyName"], "Maybe")
        yield waitFor(lambda: self.b.pg.apps["default"].groups[gpn].properties.get(
            "friendlyName") == "Maybe", timeout=3)
        props = yield bob.client.getProperties(bob.handle)
        self.assertEqual(props["friendlyName"], "Maybe")

    @defer.inlineCallbacks
    def test_storeFailureStartsAgainOnOneNode(self):
        """
        A change the store refuses on node B (not a record write) makes B
        start again from the store, as on one broker: its sessions close,
        A sees B's members disconnect, and they reopen on B.
        """
        admin, bob = yield self.pair()
        gpn = admin.client.groupPeerName(admin.handle)
        carol = yield self.on(self.b, "carol")
        store = self.b.store
        real = store.apply

        def failOnce(changes):
            store.apply = real
            return defer.fail(OSError("refused"))
        store.apply = failOnce
        yield self.failsWith(carol.client.create(friendlyName="Lost"), "E_UNEXPECTED")
        yield bob.client.closed
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        yield self.next(admin, C.EVENT_MEMBER_CHANGED, changeType=C.MEMBER_DISCONNECTED,
                        identity=bob.name)
        yield self.b.pg.whenLoaded()
        self.assertEqual(list(self.b.pg.apps["default"].groups), [gpn])
        again = yield self.on(self.b, "bob", identity=bob.identity)
        again.handle = yield again.client.open(gpn)
        yield self.register(again)
        yield self.online(again)
        yield self.next(admin, C.EVENT_MEMBER_CHANGED, changeType=C.MEMBER_CONNECTED,
                        identity=bob.name)
        present = yield again.client.enumMembers(again.handle, C.MEMBER_PRESENT)
        self.assertEqual(sorted(m["identity"] for m in present), sorted([admin.name, bob.name]))
