# -*- test-case-name: tests.test_peergroups_store -*-
"""
One suite for both L{IPeerGroupStore}s: the SQLite file of a single broker
and the Redis store of a cluster (a real redis-server).  What one writes,
a fresh instance on the same file or Redis loads back, whole batches or
nothing.
"""

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from broker.cluster.node import Cluster
from broker.cluster.redis import RedisClient, RedisUnavailable
from broker.peergroups.interfaces import IPeerGroupStore
from broker.peergroups.records import Record
from broker.peergroups.redisstore import RedisPeerGroupStore
from broker.peergroups.store import SQLitePeerGroupStore
from tests.redisserver import RedisServer
from tests.test_cluster_redis import waitFor

GROUP = {"grc": {"kind": "GRC", "sig": "AAAA"},
         "properties": {"friendlyName": "Team", "flags": 0, "creatorPeerName": "a.b"},
         "verifier": None, "issuer": None, "seq": 0}


def record(rid, version=1, seq=1, data=b"d", flags=0):
    return Record(rid, "11111111-2222-3333-4444-555555555555", version, flags, "alice", "",
                  "", 100, 100 + version, 10 ** 18, data, seq, 1)


def member(peer, lastSeq=0):
    return {"publicKey": "AAAA", "friendlyName": peer, "chain": None, "pending": None,
            "published": True, "local": True, "synced": bool(lastSeq), "lastSeq": lastSeq}


def view(data):
    """
    A loaded store as comparable plain values.
    """
    return {
        "groups": sorted((g["app"], g["gpn"], g["properties"]["friendlyName"], g["seq"])
                         for g in data["groups"]),
        "members": sorted((m["app"], m["gpn"], m["peer"], m["lastSeq"])
                          for m in data["members"]),
        "records": [(app, gpn, r.id, r.version, r.flags, r.data, r.seq, r.createdSeq)
                    for app, gpn, r in data["records"]],
        "serials": sorted(data["serials"]),
    }


class StoreSuite:
    """
    Mixed into a TestCase that defines C{makeStore()} (a started store on
    this test's file or Redis; several calls share it).
    """

    @defer.inlineCallbacks
    def test_roundTrip(self):
        """
        Every kind of change is loaded back by another instance, records in
        seq order, applications kept apart.
        """
        store = yield self.makeStore()
        self.assertTrue(verifyObject(IPeerGroupStore, store))
        yield store.apply([("group", "chat", "g1", GROUP), ("member", "chat", "g1", "alice",
                                                             member("alice"))])
        yield store.apply([("record", "chat", "g1", record("r2", seq=2)),
                           ("record", "chat", "g1", record("r1", seq=1, data=b"\x00\xff")),
                           ("seq", "chat", "g1", 2), ("serial", "chat", "g1", "s1"),
                           ("serial", "chat", "g1", "s1"),
                           ("group", "other", "g1", dict(GROUP, seq=5))])
        again = yield self.makeStore()
        self.assertEqual(view((yield again.load())), {
            "groups": [("chat", "g1", "Team", 2), ("other", "g1", "Team", 5)],
            "members": [("chat", "g1", "alice", 0)],
            "records": [("chat", "g1", "r1", 1, 0, b"\x00\xff", 1, 1),
                        ("chat", "g1", "r2", 1, 0, b"d", 2, 1)],
            "serials": [("chat", "g1", "s1")],
        })
        loaded = yield again.load()
        self.assertEqual(loaded["groups"][0]["grc"], GROUP["grc"])
        self.assertEqual(loaded["members"][0]["publicKey"], "AAAA")

    @defer.inlineCallbacks
    def test_replaceAndDrop(self):
        """
        A member or record written again replaces the stored one; drops
        remove them; a group's properties are replaced.
        """
        store = yield self.makeStore()
        yield store.apply([("group", "chat", "g1", GROUP),
                           ("member", "chat", "g1", "alice", member("alice")),
                           ("member", "chat", "g1", "bob", member("bob")),
                           ("record", "chat", "g1", record("r1", seq=1)),
                           ("record", "chat", "g1", record("r2", seq=2))])
        renamed = dict(GROUP, properties=dict(GROUP["properties"], friendlyName="New"), seq=4)
        yield store.apply([("member", "chat", "g1", "alice", member("alice", lastSeq=3)),
                           ("dropMember", "chat", "g1", "bob"),
                           ("record", "chat", "g1", record("r1", version=2, seq=3,
                                                            flags=1, data=b"")),
                           ("dropRecords", "chat", "g1", ["r2"]),
                           ("group", "chat", "g1", renamed)])
        loaded = view((yield (yield self.makeStore()).load()))
        self.assertEqual(loaded["groups"], [("chat", "g1", "New", 4)])
        self.assertEqual(loaded["members"], [("chat", "g1", "alice", 3)])
        self.assertEqual(loaded["records"], [("chat", "g1", "r1", 2, 1, b"", 3, 1)])

    @defer.inlineCallbacks
    def test_badBatchWritesNothing(self):
        """
        A batch with a change the store does not know fails and none of it
        is written.
        """
        store = yield self.makeStore()
        yield store.apply([("group", "chat", "g1", GROUP)])
        try:
            yield store.apply([("member", "chat", "g1", "alice", member("alice")),
                               ("bogus", "chat", "g1")])
        except ValueError:
            pass
        else:
            self.fail("a bad batch was accepted")
        loaded = view((yield store.load()))
        self.assertEqual(loaded["members"], [])
        self.assertEqual(loaded["groups"], [("chat", "g1", "Team", 0)])


class SQLiteStoreTests(StoreSuite, TestCase):
    def setUp(self):
        self.path = self.mktemp()

    def makeStore(self):
        store = SQLitePeerGroupStore(reactor, self.path)
        store.start()
        self.addCleanup(store.close)
        return defer.succeed(store)


class RedisStoreTests(StoreSuite, TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.server = RedisServer(self, reactor)
        yield self.server.start()

    @defer.inlineCallbacks
    def makeStore(self):
        client = RedisClient(reactor, self.server.url, maxDelay=0.3)
        cluster = Cluster(reactor, client, prefix="t")
        client.startService()
        self.addCleanup(client.stopService)
        store = RedisPeerGroupStore(cluster)
        store.start()
        self.addCleanup(store.close)
        yield waitFor(lambda: client.connected)
        return store

    @defer.inlineCallbacks
    def test_prefixed(self):
        """
        Every key is under the cluster's prefix.
        """
        store = yield self.makeStore()
        yield store.apply([("group", "chat", "g1", GROUP)])
        keys = self.server.command("KEYS", "*")
        self.assertIn(b"t:pg:groups", keys)
        self.assertNotIn(b"\r\npg:", keys)

    @defer.inlineCallbacks
    def test_olderVersionKept(self):
        """
        Two nodes writing one record at once: a lower version never
        replaces a higher one in the store.
        """
        store = yield self.makeStore()
        yield store.apply([("record", "chat", "g1", record("r1", version=3, seq=5))])
        yield store.apply([("record", "chat", "g1", record("r1", version=2, seq=6)),
                           ("seq", "chat", "g1", 4)])
        loaded = view((yield store.load()))
        self.assertEqual([r[3] for r in loaded["records"]], [3])

    @defer.inlineCallbacks
    def test_refusedWhileDown(self):
        """
        With Redis down a write fails at once with RedisUnavailable (never
        parked, never acknowledged) and C{available} says so; once Redis is
        back writes work and what was acknowledged before is there.
        """
        store = yield self.makeStore()
        self.server.command("CONFIG", "SET", "save", "3600 1")
        yield store.apply([("group", "chat", "g1", GROUP)])
        yield self.server.stop()
        yield waitFor(lambda: not store.available)
        try:
            yield store.apply([("serial", "chat", "g1", "lost")])
        except RedisUnavailable:
            pass
        else:
            self.fail("a write was accepted with Redis down")
        yield self.server.start()
        yield waitFor(lambda: store.available)
        yield store.apply([("serial", "chat", "g1", "kept")])
        loaded = view((yield store.load()))
        self.assertEqual(loaded["groups"], [("chat", "g1", "Team", 0)])
        self.assertEqual(loaded["serials"], [("chat", "g1", "kept")])
