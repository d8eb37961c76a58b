# -*- test-case-name: tests.test_core -*-
"""
The routing core: admission, groups, users, permissions, delivery verbs and
typed messages.
"""

from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from broker.core.errors import BadRequest, CloseCode, Forbidden, NotFound
from broker.core.interfaces import IConnection, IEngine
from broker.core.message import (BINARY, FROM_GROUP, FROM_SERVER, JSON, TEXT,
                                 Delivery, Message, Target)
from broker.core.permissions import JOIN_LEAVE_GROUP, SEND_TO_GROUP, Permissions
from broker.core.router import Core
from tests.recorder import RecordingConnection


class MessageTests(unittest.TestCase):
    def test_types(self):
        self.assertEqual(Message.text("é").data, "é".encode())
        self.assertEqual(Message.json({"a": 1}).data, b'{"a":1}')
        self.assertEqual(Message.binary(b"\x00").dataType, BINARY)
        self.assertRaises(BadRequest, Message, "xml", b"")
        self.assertRaises(TypeError, Message, TEXT, "not bytes")

    def test_jsonFieldRoundTrip(self):
        for dataType, value in [(TEXT, "hi"), (JSON, {"k": [1, None]}), (BINARY, "AAE=")]:
            m = Message.fromJSONField(dataType, value)
            self.assertEqual(Message.fromJSONField(dataType, __import__("json").loads(
                m.jsonField())), m)

    def test_jsonFieldErrors(self):
        self.assertRaises(BadRequest, Message.fromJSONField, TEXT, 1)
        self.assertRaises(BadRequest, Message.fromJSONField, BINARY, "***")
        self.assertRaises(BadRequest, Message.fromJSONField, BINARY, 5)
        self.assertRaises(BadRequest, Message.fromJSONField, "nope", "")

    def test_encodeOnce(self):
        d = Delivery(Message.text("x"))
        calls = []
        enc = lambda delivery: calls.append(1) or b"frame"
        self.assertEqual(d.encode("k", enc), b"frame")
        self.assertEqual(d.encode("k", enc), b"frame")
        self.assertEqual(len(calls), 1)


class PermissionTests(unittest.TestCase):
    def test_roles(self):
        p = Permissions.fromRoles(["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup.g1",
                                   "other.role", "webpubsub.bogus", 5])
        self.assertTrue(p.has(JOIN_LEAVE_GROUP, "anything"))
        self.assertTrue(p.has(SEND_TO_GROUP, "g1"))
        self.assertFalse(p.has(SEND_TO_GROUP, "g2"))
        self.assertFalse(p.has(SEND_TO_GROUP))
        self.assertEqual(p.roles(), ["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup.g1"])

    def test_groupWithDots(self):
        p = Permissions.fromRoles(["webpubsub.sendToGroup.a.b"])
        self.assertTrue(p.has(SEND_TO_GROUP, "a.b"))

    def test_grantRevoke(self):
        p = Permissions()
        p.grant(SEND_TO_GROUP, "g")
        self.assertTrue(p.has(SEND_TO_GROUP, "g"))
        p.revoke(SEND_TO_GROUP, "g")
        self.assertFalse(p.has(SEND_TO_GROUP, "g"))
        p.grant(SEND_TO_GROUP)
        p.grant(SEND_TO_GROUP, "h")
        p.revoke(SEND_TO_GROUP)
        self.assertFalse(p.has(SEND_TO_GROUP, "h"))
        self.assertRaises(ValueError, p.grant, "fly")


class CoreTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.core = Core(self.clock)
        self.core.startService()
        self.hub = self.core.hub("h")

    def conn(self, cid, userId=None, roles=(), groups=()):
        c = RecordingConnection(cid, userId)
        return c, self.hub.admit(c, userId, roles, groups)

    def test_interfaces(self):
        verifyObject(IEngine, self.core.engine)
        verifyObject(IConnection, RecordingConnection("x"))

    def test_deliveryVerbs(self):
        a, _ = self.conn("a", "u1", groups=["g"])
        b, _ = self.conn("b", "u1")
        c, _ = self.conn("c", "u2", groups=["g"])
        self.hub.send(Target(Target.GROUP, "g"), Message.text("group"))
        self.hub.send(Target(Target.USER, "u1", excluded=["b"]), Message.text("user"))
        self.hub.send(Target(Target.CONNECTION, "c"), Message.text("conn"))
        self.hub.send(Target(Target.HUB, excluded=["a"]), Message.text("hub"))
        self.hub.send(Target(Target.GROUP, "nobody"), Message.text("lost"))
        self.assertEqual(a.payloads, [b"group", b"user"])
        self.assertEqual(b.payloads, [b"hub"])
        self.assertEqual(c.payloads, [b"group", b"conn", b"hub"])
        self.assertEqual(a.deliveries[0].source, FROM_GROUP)
        self.assertEqual(a.deliveries[1].source, FROM_SERVER)
        self.assertEqual(self.hub.stats.messagesOut, 6)

    def test_clientVerbsCheckPermissions(self):
        _, s = self.conn("a")
        self.assertRaises(Forbidden, s.joinGroup, "g")
        self.assertRaises(Forbidden, s.sendToGroup, "g", Message.text("x"))
        self.assertRaises(BadRequest, s.joinGroup, "")
        s.permissions.grant(JOIN_LEAVE_GROUP, "g")
        s.joinGroup("g")
        self.assertEqual(s.groups, {"g"})

    def test_noEcho(self):
        a, s = self.conn("a", roles=["webpubsub.sendToGroup"], groups=["g"])
        b, _ = self.conn("b", groups=["g"])
        s.sendToGroup("g", Message.text("1"))
        s.sendToGroup("g", Message.text("2"), noEcho=True)
        self.assertEqual(a.payloads, [b"1"])
        self.assertEqual(b.payloads, [b"1", b"2"])
        self.assertEqual(b.deliveries[0].fromConnectionId, "a")
        self.assertEqual(self.hub.stats.messagesIn, 2)

    def test_userGroupsStick(self):
        a, _ = self.conn("a", "u")
        self.hub.addUserToGroup("u", "g")
        b, sb = self.conn("b", "u")
        self.assertEqual(sb.groups, {"g"})
        self.hub.removeUserFromGroup("u", "g")
        self.assertFalse(self.hub.groupExists("g"))
        self.hub.addUserToGroup("u", "g1")
        self.hub.addUserToGroup("u", "g2")
        self.hub.removeUserFromAllGroups("u")
        self.assertEqual(self.hub.groupCount, 0)
        _, sc = self.conn("c", "u")
        self.assertEqual(sc.groups, set())

    def test_connectionGroups(self):
        _, s = self.conn("a")
        self.hub.addConnectionToGroup("a", "g1")
        self.hub.addConnectionToGroup("a", "g2")
        self.assertEqual([x.connectionId for x in self.hub.groupConnections("g1")], ["a"])
        self.hub.removeConnectionFromGroup("a", "g1")
        self.assertFalse(self.hub.groupExists("g1"))
        self.hub.removeConnectionFromAllGroups("a")
        self.assertEqual(s.groups, set())
        self.failureResultOf(self.hub.addConnectionToGroup("zzz", "g"), NotFound)

    def test_removeCleansUp(self):
        _, s = self.conn("a", "u", groups=["g"])
        self.hub.remove(s, "gone")
        self.hub.remove(s, "twice")
        self.assertEqual((self.hub.connectionCount, self.hub.groupCount, self.hub.userCount),
                         (0, 0, 0))
        self.assertFalse(s.open)

    def test_duplicateConnectionId(self):
        self.conn("a")
        self.assertRaises(BadRequest, self.conn, "a")

    def test_observers(self):
        events = []

        class Obs:
            def connectionAdded(self, hub, session):
                events.append(("+", session.connectionId))

            def connectionRemoved(self, hub, session, reason):
                events.append(("-", session.connectionId, reason))

            def clientEvent(self, hub, session, event, message):
                events.append(("e", session.connectionId, event))

        self.core.onNewHub(lambda hub: hub.addObserver(Obs()))
        _, s = self.conn("a")
        from broker.core.session import NoUpstream
        # Observers hear of client events even with no upstream to take them.
        self.failureResultOf(s.sendEvent("chat", Message.text("hi")), NoUpstream)
        self.hub.remove(s, "bye")
        self.assertEqual(events, [("+", "a"), ("e", "a", "chat"), ("-", "a", "bye")])

    def test_sendEventNoUpstream(self):
        from broker.core.session import NoUpstream

        _, s = self.conn("a")
        self.failureResultOf(s.sendEvent("e", Message.text("x")), NoUpstream)

    def test_stopClosesEveryone(self):
        a, _ = self.conn("a")
        self.core.stopService()
        self.assertEqual(a.closed[0], CloseCode.GOING_AWAY)

    def test_stats(self):
        self.conn("a", "u", groups=["g"])
        self.core.countRejected("h")
        self.core.countRejected("nohub")
        st = self.core.stats()
        self.assertEqual((st["connections"], st["groups"], st["users"]), (1, 1, 1))
        self.assertEqual(st["connectionsRejected"], 2)
        self.assertEqual(st["hubs"]["h"]["connectionsRejected"], 1)
        self.assertNotIn("nohub", self.core.hubs)

    def test_permissionVerbs(self):
        self.conn("a")

        def has(*args):
            return self.successResultOf(self.hub.hasPermission("a", *args))
        self.assertFalse(has(SEND_TO_GROUP, "g"))
        self.successResultOf(self.hub.grantPermission("a", SEND_TO_GROUP, "g"))
        self.assertTrue(has(SEND_TO_GROUP, "g"))
        self.assertFalse(has(SEND_TO_GROUP, "h"))
        self.successResultOf(self.hub.grantPermission("a", JOIN_LEAVE_GROUP))
        self.assertTrue(has(JOIN_LEAVE_GROUP, "any"))
        self.successResultOf(self.hub.revokePermission("a", JOIN_LEAVE_GROUP))
        self.assertFalse(has(JOIN_LEAVE_GROUP, "any"))
        self.successResultOf(self.hub.revokePermission("a", SEND_TO_GROUP, "g"))
        self.assertFalse(has(SEND_TO_GROUP, "g"))
        self.failureResultOf(self.hub.grantPermission("zz", SEND_TO_GROUP), NotFound)
        self.failureResultOf(self.hub.grantPermission("a", "fly"), BadRequest)
        self.failureResultOf(self.hub.hasPermission("a", SEND_TO_GROUP, ""), BadRequest)

    def test_groupUsers(self):
        self.conn("a", "u1", groups=["g"])
        self.conn("b", "u1", groups=["g"])
        self.conn("c", "u2", groups=["g"])
        self.conn("d", None, groups=["g"])
        self.conn("e", "u3")
        self.assertEqual(self.hub.groupUsers("g"), {"u1": 2, "u2": 1})
        self.assertEqual(self.hub.groupUsers("nothing"), {})

    def test_historyHookSeesGroupPublishes(self):
        seen = []

        class History:
            def record(self, target, delivery):
                delivery.history = ("e", len(seen) + 1)
                seen.append((target.name, delivery.message.data))

        self.hub.history = History()
        a, _ = self.conn("a", groups=["g"])
        self.hub.send(Target(Target.GROUP, "g"), Message.text("1"))
        self.hub.send(Target(Target.HUB), Message.text("2"))
        self.assertEqual(seen, [("g", b"1")])
        self.assertEqual(a.deliveries[0].history, ("e", 1))
        self.assertIsNone(a.deliveries[1].history)


class AsyncHistoryTests(unittest.TestCase):
    """
    A history whose stamps come later (in Redis): each publish goes out once
    stamped, and every publish of the hub keeps its order.
    """

    def test_publishesWaitAndKeepOrder(self):
        from twisted.internet.defer import Deferred

        core = Core(Clock())
        core.startService()
        hub = core.hub("h")
        c = RecordingConnection("a", "u")
        hub.admit(c, "u", (), ["g"])
        stamps = []

        class History:
            def record(self, target, delivery):
                d = Deferred()
                stamps.append((d, delivery))
                return d
        hub.history = History()
        first = hub.send(Target(Target.GROUP, "g"), Message.text("1"))
        second = hub.send(Target(Target.GROUP, "g"), Message.text("2"))
        third = hub.send(Target(Target.USER, "u"), Message.text("3"))
        self.assertEqual(c.payloads, [])
        # The second stamp fails first: it waits for the first all the same.
        stamps[1][0].errback(RuntimeError("no stamp"))
        self.assertEqual(c.payloads, [])
        stamps[0][1].history = (1, 1)
        stamps[0][0].callback(None)
        self.assertEqual(c.payloads, [b"1", b"2", b"3"])
        self.assertEqual(c.deliveries[0].history, (1, 1))
        for d in (first, second, third):
            self.successResultOf(d)
        # Nothing waiting: straight through again.
        hub.history = None
        hub.send(Target(Target.GROUP, "g"), Message.text("4"))
        self.assertEqual(c.payloads[-1], b"4")
