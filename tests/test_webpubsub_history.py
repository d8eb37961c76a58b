# -*- test-case-name: tests.test_webpubsub_history -*-
"""
Per-group history: the rings themselves (with a fake clock), and recovery
over real WebSocket clients that drop and rejoin.
"""

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from broker.core.errors import BadRequest
from broker.core.message import Delivery, Message, Target
from broker.webpubsub.history import HubHistory, parsePosition
from tests.wsharness import BrokerHarness


def publish(history, group, text, excluded=()):
    d = Delivery(Message.text(text))
    history.record(Target(Target.GROUP, group, excluded), d)
    return d


def texts(deliveries):
    return [d.message.data.decode() for d in deliveries]


class RingTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.history = HubHistory(3, 60.0, 2, self.clock.seconds)

    def test_positions(self):
        epoch, offset = self.history.position("g")
        self.assertEqual(offset, 0)
        d = publish(self.history, "g", "a")
        self.assertEqual(d.history, (epoch, 1))
        publish(self.history, "g", "b")
        self.assertEqual(self.history.position("g"), (epoch, 2))
        self.assertNotEqual(self.history.position("h")[0], epoch)

    def test_since(self):
        epoch, _ = self.history.position("g")
        for t in "abc":
            publish(self.history, "g", t)
        ok, why, missed = self.history.since("g", epoch, 1)
        self.assertEqual((ok, why, texts(missed)), (True, None, ["b", "c"]))
        ok, _, missed = self.history.since("g", epoch, 3)
        self.assertEqual((ok, missed), (True, []))

    def test_countBound(self):
        epoch, _ = self.history.position("g")
        for t in "abcde":
            publish(self.history, "g", t)
        ok, why, missed = self.history.since("g", epoch, 1)
        self.assertFalse(ok)
        self.assertIn("no longer held", why)
        self.assertEqual(texts(missed), ["c", "d", "e"])
        ok, _, missed = self.history.since("g", epoch, 2)
        self.assertEqual((ok, texts(missed)), (True, ["c", "d", "e"]))

    def test_ageBound(self):
        epoch, _ = self.history.position("g")
        publish(self.history, "g", "old")
        self.clock.advance(61)
        publish(self.history, "g", "new")
        ok, _, missed = self.history.since("g", epoch, 0)
        self.assertEqual((ok, texts(missed)), (False, ["new"]))
        self.clock.advance(61)
        ok, _, missed = self.history.since("g", epoch, 1)
        self.assertEqual((ok, missed), (False, []))

    def test_unknownEpochAndFutureOffset(self):
        epoch, _ = self.history.position("g")
        publish(self.history, "g", "a")
        self.assertEqual(self.history.since("g", "stale", 0)[:1], (False,))
        self.assertEqual(self.history.since("g", epoch, 5)[:1], (False,))

    def test_groupsEvictedLeastRecentlyWritten(self):
        e1, _ = self.history.position("g1")
        publish(self.history, "g1", "a")
        publish(self.history, "g2", "b")
        publish(self.history, "g1", "c")
        publish(self.history, "g3", "d")   # evicts g2, the least recently written
        self.assertEqual(self.history.position("g1"), (e1, 2))
        ok, why, _ = self.history.since("g2", "whatever", 0)
        self.assertFalse(ok)

    def test_excludedNotReplayed(self):
        epoch, _ = self.history.position("g")
        publish(self.history, "g", "mine", excluded=["me"])
        publish(self.history, "g", "theirs")
        self.assertEqual(texts(self.history.since("g", epoch, 0, "me")[2]), ["theirs"])
        self.assertEqual(texts(self.history.since("g", epoch, 0, "you")[2]),
                         ["mine", "theirs"])

    def test_parsePosition(self):
        self.assertEqual(parsePosition({}), (None, None))
        self.assertEqual(parsePosition({"epoch": "e", "offset": 0}), ("e", 0))
        for bad in [None, [], {"epoch": "e"}, {"offset": 1}, {"epoch": "", "offset": 1},
                    {"epoch": "e", "offset": -1}, {"epoch": "e", "offset": True},
                    {"epoch": "e" * 65, "offset": 1}, {"epoch": 5, "offset": 1}]:
            self.assertRaises(BadRequest, parsePosition, bad)


TOML = """
[webpubsub.hubs.chat]
history_messages = 3
history_max_age = 600
"""

JOIN = "webpubsub.joinLeaveGroup"


class RecoveryTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield BrokerHarness(self, reactor, TOML).start()
        self.hub = self.broker.core.hub("chat")

    def send(self, text, hub=None):
        (hub or self.hub).send(Target(Target.GROUP, "g"), Message.text(text))

    @defer.inlineCallbacks
    def join(self, client, history, ackId=1):
        client.send({"type": "joinGroup", "group": "g", "ackId": ackId, "history": history})
        frames = []
        while True:
            f = yield client.nextJSON()
            if f["type"] == "ack":
                self.assertTrue(f["success"], f)
                return frames
            frames.append(f)

    @defer.inlineCallbacks
    def test_dropAndRecover(self):
        a = yield self.broker.connectJSON(userId="u", roles=[JOIN])
        [pos] = yield self.join(a, {})
        self.assertEqual((pos["event"], pos["group"], pos["offset"]), ("groupHistory", "g", 0))
        self.assertNotIn("recovered", pos)
        epoch = pos["epoch"]
        self.send("1")
        self.send("2")
        for n in (1, 2):
            f = yield a.nextJSON()
            self.assertEqual((f["data"], f["history"]), (str(n), {"epoch": epoch, "offset": n}))
        a.transport.abortConnection()
        yield a.closed
        self.send("3")
        self.send("4")
        b = yield self.broker.connectJSON(userId="u", roles=[JOIN])
        frames = yield self.join(b, {"epoch": epoch, "offset": 2})
        self.assertEqual(frames[0], {"type": "system", "event": "groupHistory", "group": "g",
                                     "recovered": True, "epoch": epoch, "offset": 4})
        self.assertEqual([(f["data"], f["history"]["offset"]) for f in frames[1:]],
                         [("3", 3), ("4", 4)])
        self.send("5")
        f = yield b.nextJSON()
        self.assertEqual((f["data"], f["history"]["offset"]), ("5", 5))

    @defer.inlineCallbacks
    def test_tooLateIsHonest(self):
        a = yield self.broker.connectJSON(roles=[JOIN])
        [pos] = yield self.join(a, {})
        for n in range(5):
            self.send(str(n))
        b = yield self.broker.connectJSON(roles=[JOIN])
        frames = yield self.join(b, {"epoch": pos["epoch"], "offset": 0})
        self.assertFalse(frames[0]["recovered"])
        self.assertEqual(frames[0]["reason"], "some missed messages are no longer held")
        self.assertEqual([f["data"] for f in frames[1:]], ["2", "3", "4"])

    @defer.inlineCallbacks
    def test_unknownEpoch(self):
        a = yield self.broker.connectJSON(roles=[JOIN])
        self.send("x")
        frames = yield self.join(a, {"epoch": "from-another-life", "offset": 7})
        self.assertEqual(len(frames), 1)
        self.assertFalse(frames[0]["recovered"])
        self.assertEqual(frames[0]["offset"], 1)

    @defer.inlineCallbacks
    def test_historyOff(self):
        other = self.broker.core.hub("other")
        a = yield self.broker.connectJSON(hub="other", roles=[JOIN])
        frames = yield self.join(a, {"epoch": "e", "offset": 1})
        self.assertEqual(frames, [{"type": "system", "event": "groupHistory", "group": "g",
                                   "recovered": False,
                                   "reason": "history is off for this hub"}])
        self.send("plain", hub=other)
        f = yield a.nextJSON()
        self.assertNotIn("history", f)

    @defer.inlineCallbacks
    def test_badHistoryField(self):
        a = yield self.broker.connectJSON(roles=[JOIN])
        a.send({"type": "joinGroup", "group": "g", "ackId": 9, "history": {"offset": 1}})
        ack = yield a.nextJSON()
        self.assertEqual((ack["ackId"], ack["success"], ack["error"]["name"]),
                         (9, False, "BadRequest"))
        self.assertFalse(self.hub.groupExists("g"))

    @defer.inlineCallbacks
    def test_forbiddenJoinRevealsNothing(self):
        a = yield self.broker.connectJSON()
        self.send("secret")
        a.send({"type": "joinGroup", "group": "g", "ackId": 1,
                "history": {"epoch": "e", "offset": 0}})
        ack = yield a.nextJSON()
        self.assertEqual(ack["error"]["name"], "Forbidden")
