# -*- test-case-name: tests.test_engine -*-
"""
The engine conformance suite: every IEngine implementation runs the same
tests (the Redis engine will subclass L{EngineConformanceMixin} too).
"""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from broker.core.engine import MemoryEngine
from broker.core.interfaces import IEngine
from broker.core.message import Delivery, Message, Target
from broker.core.router import Core
from tests.recorder import RecordingConnection


class EngineConformanceMixin:
    """
    Subclasses provide C{makeEngine()} (may return a Deferred).
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.engine = yield self.makeEngine()
        self.core = Core(Clock(), engine=self.engine)
        self.core.startService()
        self.hub = self.core.hub("h")

    def test_provides(self):
        verifyObject(IEngine, self.engine)
        self.assertTrue(self.engine.healthy())

    @defer.inlineCallbacks
    def test_everyTargetExactlyOnce(self):
        conns = {}
        for cid, user, groups in [("a", "u1", ["g"]), ("b", "u1", []), ("c", "u2", ["g"])]:
            conns[cid] = RecordingConnection(cid, user)
            self.hub.admit(conns[cid], user, (), groups)
        yield self.hub.send(Target(Target.GROUP, "g"), Message.text("g"))
        yield self.hub.send(Target(Target.USER, "u1"), Message.text("u"))
        yield self.hub.send(Target(Target.CONNECTION, "b"), Message.text("c"))
        yield self.hub.send(Target(Target.HUB, excluded=["c"]), Message.text("h"))
        yield self.settle()
        self.assertEqual(conns["a"].payloads, [b"g", b"u", b"h"])
        self.assertEqual(conns["b"].payloads, [b"u", b"c", b"h"])
        self.assertEqual(conns["c"].payloads, [b"g"])

    @defer.inlineCallbacks
    def test_orderPreserved(self):
        c = RecordingConnection("a")
        self.hub.admit(c, None, (), ["g"])
        for i in range(100):
            self.hub.send(Target(Target.GROUP, "g"), Message.text(str(i)))
        yield self.settle()
        self.assertEqual(c.payloads, [str(i).encode() for i in range(100)])

    @defer.inlineCallbacks
    def test_unknownHubIgnored(self):
        yield self.core.publish("nohub", Target(Target.HUB), Delivery(Message.text("x")))
        self.assertNotIn("nohub", self.core.hubs)

    def settle(self):
        return defer.succeed(None)


class MemoryEngineTests(EngineConformanceMixin, unittest.TestCase):
    def makeEngine(self):
        return MemoryEngine()

    def test_unattached(self):
        self.failureResultOf(MemoryEngine().publish("h", Target(Target.HUB),
                                                    Delivery(Message.text("x"))), RuntimeError)
        self.assertFalse(MemoryEngine().healthy())
