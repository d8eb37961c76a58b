# -*- test-case-name: tests.test_engine -*-
"""
The engine conformance suite: every IEngine implementation runs the same
tests.  A suite has C{self.cores}: one core for the in-memory engine, two
or three nodes over one real redis-server for the Redis engine
(L{tests.test_cluster_engine}).  Connections are spread over the nodes and
every verb is made from every node, so "cluster-wide" is what is checked,
and with one node it is the plain single-process behaviour.
"""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from broker.core.engine import MemoryEngine
from broker.core.errors import CloseCode, NotFound
from broker.core.interfaces import IDirectory, IEngine
from broker.core.message import Delivery, Message, Target
from broker.core.permissions import SEND_TO_GROUP
from broker.core.router import Core
from tests.recorder import RecordingConnection


def texts(conn):
    return [p.decode("utf-8") for p in conn.payloads]


class EngineConformanceMixin:
    """
    Subclasses provide C{makeCores()} (may return a Deferred) returning a
    list of started cores that form one cluster, and C{settle()}, which
    fires once what was sent has reached every node.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.cores = yield self.makeCores()
        self.hubs = [c.hub("h") for c in self.cores]

    def node(self, i):
        return self.hubs[i % len(self.hubs)]

    def admit(self, i, cid, user=None, groups=(), roles=()):
        conn = RecordingConnection(cid, user)
        self.node(i).admit(conn, user, roles, groups)
        return conn

    def test_provides(self):
        for core in self.cores:
            verifyObject(IEngine, core.engine)
            verifyObject(IDirectory, core.engine.directory)
            self.assertTrue(core.engine.healthy())

    @defer.inlineCallbacks
    def test_everyTargetExactlyOnce(self):
        conns = {}
        for i, (cid, user, groups) in enumerate(
                [("a", "u1", ["g"]), ("b", "u1", []), ("c", "u2", ["g"])]):
            conns[cid] = self.admit(i, cid, user, groups)
        yield self.settle()
        for i in range(len(self.hubs)):
            sender = self.node(i + 1)
            yield sender.send(Target(Target.GROUP, "g"), Message.text(f"g{i}"))
            yield sender.send(Target(Target.USER, "u1"), Message.text(f"u{i}"))
            yield sender.send(Target(Target.CONNECTION, "b"), Message.text(f"c{i}"))
            yield sender.send(Target(Target.HUB, excluded=["c"]), Message.text(f"h{i}"))
            yield self.settle()
        n = range(len(self.hubs))
        self.assertEqual(texts(conns["a"]),
                         [p for i in n for p in (f"g{i}", f"u{i}", f"h{i}")])
        self.assertEqual(texts(conns["b"]),
                         [p for i in n for p in (f"u{i}", f"c{i}", f"h{i}")])
        self.assertEqual(texts(conns["c"]), [f"g{i}" for i in n])

    @defer.inlineCallbacks
    def test_orderPreserved(self):
        receivers = [self.admit(i, f"r{i}", None, ["g"]) for i in range(len(self.hubs))]
        yield self.settle()
        for i in range(100):
            self.node(0).send(Target(Target.GROUP, "g"), Message.text(str(i)))
        yield self.settle()
        for r in receivers:
            self.assertEqual(texts(r), [str(i) for i in range(100)])

    @defer.inlineCallbacks
    def test_deliveryFieldsTravel(self):
        r = self.admit(len(self.hubs) - 1, "r", None, ["g"])
        s = self.node(0).admit(RecordingConnection("s", "alice"), "alice",
                               ["webpubsub.sendToGroup"])
        yield self.settle()
        yield s.sendToGroup("g", Message.binary(b"\x00\xff\n"))
        yield self.settle()
        [d] = r.deliveries
        self.assertEqual((d.message.dataType, d.message.data), ("binary", b"\x00\xff\n"))
        self.assertEqual((d.source, d.group, d.fromUserId, d.fromConnectionId),
                         ("group", "g", "alice", "s"))

    @defer.inlineCallbacks
    def test_unknownHubIgnored(self):
        for core in self.cores:
            yield core.publish("nohub", Target(Target.HUB), Delivery(Message.text("x")))
        yield self.settle()
        for core in self.cores:
            self.assertNotIn("nohub", core.hubs)

    @defer.inlineCallbacks
    def test_directorySeesEveryNode(self):
        self.admit(0, "a", "u1", ["g"])
        self.admit(len(self.hubs) - 1, "b", "u2", ["g"])
        yield self.settle()
        for hub in self.hubs:
            self.assertTrue((yield hub.findConnection("a")))
            self.assertTrue((yield hub.findConnection("b")))
            self.assertFalse((yield hub.findConnection("zz")))
            self.assertTrue((yield hub.findUser("u2")))
            self.assertFalse((yield hub.findUser("nobody")))
            self.assertTrue((yield hub.findGroup("g")))
            self.assertFalse((yield hub.findGroup("empty")))
            self.assertEqual(sorted((yield hub.listGroupConnections("g"))),
                             [("a", "u1"), ("b", "u2")])
            self.assertEqual((yield hub.listGroupUsers("g")), {"u1": 1, "u2": 1})

    @defer.inlineCallbacks
    def test_groupVerbsOnAnotherNodesConnection(self):
        far = len(self.hubs) - 1
        b = self.admit(far, "b", "u")
        yield self.settle()
        here = self.node(0)
        yield here.addConnectionToGroup("b", "g")
        # Read-your-writes from the node that made the change.
        self.assertEqual((yield here.listGroupConnections("g")), [("b", "u")])
        yield self.settle()
        yield here.send(Target(Target.GROUP, "g"), Message.text("1"))
        yield here.removeConnectionFromGroup("b", "g")
        self.assertFalse((yield here.findGroup("g")))
        yield here.send(Target(Target.GROUP, "g"), Message.text("2"))
        yield here.addConnectionToGroup("b", "g2")
        yield here.removeConnectionFromAllGroups("b")
        self.assertFalse((yield here.findGroup("g2")))
        yield self.settle()
        self.assertEqual(texts(b), ["1"])
        self.assertEqual(self.hubs[far].localSession("b").groups, set())
        yield self.assertFailure(here.addConnectionToGroup("zz", "g"), NotFound)

    @defer.inlineCallbacks
    def test_userGroupsAreClusterWide(self):
        first = self.admit(len(self.hubs) - 1, "a", "u")
        yield self.settle()
        yield self.node(0).addUserToGroup("u", "g")
        yield self.settle()
        self.assertEqual(self.hubs[-1].localSession("a").groups, {"g"})
        # A later connection of the user, on another node, joins it too.
        later = self.admit(0, "b", "u")
        yield self.settle()
        self.assertEqual(self.hubs[0].localSession("b").groups, {"g"})
        yield self.node(1).send(Target(Target.GROUP, "g"), Message.text("x"))
        yield self.settle()
        self.assertEqual((texts(first), texts(later)), (["x"], ["x"]))
        yield self.node(1).removeUserFromGroup("u", "g")
        yield self.settle()
        self.assertFalse((yield self.node(0).findGroup("g")))
        yield self.node(0).addUserToGroup("u", "g1")
        yield self.node(0).addUserToGroup("u", "g2")
        yield self.node(1).removeUserFromAllGroups("u")
        yield self.settle()
        for hub in self.hubs:
            self.assertEqual(hub.groupCount, 0)
        self.admit(1, "c", "u")
        yield self.settle()
        self.assertEqual(self.node(1).localSession("c").groups, set())

    @defer.inlineCallbacks
    def test_permissionsHoldOnEveryNode(self):
        far = len(self.hubs) - 1
        self.admit(far, "a", "u")
        yield self.settle()
        here = self.node(0)
        self.assertFalse((yield here.hasPermission("a", SEND_TO_GROUP, "g")))
        yield here.grantPermission("a", SEND_TO_GROUP, "g")
        self.assertTrue((yield here.hasPermission("a", SEND_TO_GROUP, "g")))
        yield self.settle()
        session = self.hubs[far].localSession("a")
        self.assertTrue(session.permissions.has(SEND_TO_GROUP, "g"))
        for hub in self.hubs:
            self.assertTrue((yield hub.hasPermission("a", SEND_TO_GROUP, "g")))
        yield self.node(far).revokePermission("a", SEND_TO_GROUP, "g")
        yield self.settle()
        for hub in self.hubs:
            self.assertFalse((yield hub.hasPermission("a", SEND_TO_GROUP, "g")))
        yield self.assertFailure(here.hasPermission("zz", SEND_TO_GROUP), NotFound)

    @defer.inlineCallbacks
    def test_closeEverywhere(self):
        conns = [self.admit(i, f"c{i}", "u" if i % 2 else "v", ["g"])
                 for i in range(2 * len(self.hubs))]
        yield self.settle()
        yield self.node(0).close(Target(Target.USER, "u"), CloseCode.POLICY_VIOLATION, "bye")
        yield self.settle()
        self.assertEqual([c.closed for c in conns],
                         [(CloseCode.POLICY_VIOLATION, "bye") if i % 2 else None
                          for i in range(len(conns))])

    @defer.inlineCallbacks
    def test_filterAppliedOnEveryNode(self):
        for core in self.cores:
            core.setFilterCompiler(lambda text: (lambda s: s.userId == text))
        conns = [self.admit(i, f"c{i}", f"u{i % 2}") for i in range(2 * len(self.hubs))]
        yield self.settle()
        yield self.node(0).send(Target(Target.HUB, filter="u1"), Message.text("x"))
        yield self.settle()
        self.assertEqual([texts(c) for c in conns],
                         [["x"] if i % 2 else [] for i in range(len(conns))])

    @defer.inlineCallbacks
    def test_removedConnectionLeavesDirectory(self):
        c = RecordingConnection("a", "u")
        far = self.hubs[-1]
        session = far.admit(c, "u", (), ["g"])
        yield self.settle()
        far.remove(session, "gone")
        yield self.settle()
        for hub in self.hubs:
            self.assertFalse((yield hub.findConnection("a")))
            self.assertFalse((yield hub.findUser("u")))
            self.assertFalse((yield hub.findGroup("g")))


class MemoryEngineTests(EngineConformanceMixin, unittest.TestCase):
    def makeCores(self):
        core = Core(Clock(), engine=MemoryEngine())
        core.startService()
        return [core]

    def settle(self):
        return defer.succeed(None)

    def test_unattached(self):
        self.failureResultOf(MemoryEngine().publish("h", Target(Target.HUB),
                                                    Delivery(Message.text("x"))), RuntimeError)
        self.assertFalse(MemoryEngine().healthy())
