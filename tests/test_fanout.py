# -*- test-case-name: tests.test_fanout -*-
"""
Cooperative fan-out: chunks, yielding to the reactor, and ordering.
"""

from twisted.internet.task import Clock
from twisted.trial import unittest

from broker.core.fanout import Fanout
from broker.core.session import HubStats
from broker.core.message import Delivery, Message
from tests.recorder import RecordingConnection


class Turns:
    """
    A reactor stand-in for time: C{callLater(0, ...)} calls run one reactor
    turn at a time, on L{turn}.
    """

    def __init__(self):
        self.calls = []

    def callLater(self, delay, f, *args):
        call = _Call(f, args)
        self.calls.append(call)
        return call

    def turn(self):
        calls, self.calls = self.calls, []
        for c in calls:
            if c.active():
                c.f(*c.args)


class _Call:
    def __init__(self, f, args):
        self.f, self.args, self.cancelled = f, args, False

    def active(self):
        return not self.cancelled

    def cancel(self):
        self.cancelled = True


class Broken(RecordingConnection):
    def deliver(self, delivery):
        raise RuntimeError("adapter bug")


class FanoutTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.fanout = Fanout(self.clock, chunkSize=10)
        self.stats = HubStats()

    def d(self, text):
        return Delivery(Message.text(text))

    def test_smallAtOnce(self):
        conns = [RecordingConnection(str(i)) for i in range(10)]
        self.fanout.deliver(list(conns), self.d("x"), self.stats)
        self.assertEqual([len(c.deliveries) for c in conns], [1] * 10)
        self.assertEqual(self.fanout.pending, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_largeYields(self):
        conns = [RecordingConnection(str(i)) for i in range(25)]
        self.fanout.deliver(list(conns), self.d("x"), self.stats)
        self.assertEqual(sum(len(c.deliveries) for c in conns), 10)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0)
        self.assertEqual(sum(len(c.deliveries) for c in conns), 25)

    def test_oneChunkPerTurn(self):
        turns = Turns()
        fanout = Fanout(turns, chunkSize=10)
        conns = [RecordingConnection(str(i)) for i in range(25)]
        fanout.deliver(list(conns), self.d("x"), self.stats)
        for expected in (10, 20, 25):
            self.assertEqual(sum(len(c.deliveries) for c in conns), expected)
            turns.turn()
        self.assertEqual(turns.calls, [])
        self.assertEqual(self.stats.messagesOut, 25)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_orderKeptBehindLargeJob(self):
        conns = [RecordingConnection(str(i)) for i in range(25)]
        self.fanout.deliver(list(conns), self.d("big"), self.stats)
        # A small publish while the big one is in flight must queue behind it.
        self.fanout.deliver([conns[-1]], self.d("small"), self.stats)
        self.assertEqual(conns[-1].payloads, [])
        while self.clock.getDelayedCalls():
            self.clock.advance(0)
        self.assertEqual(conns[-1].payloads, [b"big", b"small"])

    def test_brokenReceiverDoesNotStopOthers(self):
        conns = [RecordingConnection("a"), Broken("b"), RecordingConnection("c")]
        self.fanout.deliver(conns, self.d("x"), self.stats)
        self.assertEqual((conns[0].payloads, conns[2].payloads), ([b"x"], [b"x"]))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stopDropsPending(self):
        conns = [RecordingConnection(str(i)) for i in range(25)]
        self.fanout.deliver(conns, self.d("x"), self.stats)
        self.fanout.stop()
        self.assertEqual(self.fanout.pending, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_badChunk(self):
        self.assertRaises(ValueError, Fanout, self.clock, 0)


class Republisher(RecordingConnection):
    """
    A receiver whose delivery publishes again, as an observer reacting to a
    delivery might.
    """

    def __init__(self, cid, fanout, others, stats):
        super().__init__(cid)
        self.fanout, self.others, self.stats = fanout, others, stats

    def deliver(self, delivery):
        super().deliver(delivery)
        if delivery.message.data == b"first":
            self.fanout.deliver(list(self.others), Delivery(Message.text("second")),
                                self.stats)


class ReentrancyTests(unittest.TestCase):
    def test_publishFromInsideDelivery(self):
        """
        The inner publish is queued while the outer one is written, then
        written in the same call, after it.
        """
        turns = Turns()
        fanout = Fanout(turns, chunkSize=10)
        stats = HubStats()
        others = [RecordingConnection(str(i)) for i in range(3)]
        first = Republisher("r", fanout, others, stats)
        fanout.deliver([first] + others, Delivery(Message.text("first")), stats)
        self.assertEqual(turns.calls, [])
        for c in others:
            self.assertEqual(c.payloads, [b"first", b"second"])
        self.assertEqual(stats.messagesOut, 7)


class BackpressureTests(unittest.TestCase):
    def test_congestedUntilDrained(self):
        turns = Turns()
        fanout = Fanout(turns, chunkSize=10)
        stats = HubStats()
        conns = [RecordingConnection(str(i)) for i in range(50)]
        self.assertFalse(fanout.congested)
        self.successResultOf(fanout.whenDrained())
        for i in range(3):
            fanout.deliver(list(conns), Delivery(Message.text(str(i))), stats)
        # 150 queued, 10 written at once: 140 > highWater (80).
        self.assertEqual(fanout.backlog, 140)
        self.assertTrue(fanout.congested)
        drained = fanout.whenDrained()
        self.assertNoResult(drained)
        # Ten deliveries a turn: 30 left after 11 turns, 20 (lowWater) after 12.
        for _ in range(11):
            turns.turn()
        self.assertNoResult(drained)
        turns.turn()
        self.successResultOf(drained)
        self.assertEqual(fanout.backlog, fanout.lowWater)
        self.assertFalse(fanout.congested)
        while turns.calls:
            turns.turn()
        self.assertEqual(fanout.backlog, 0)
        self.assertEqual(stats.messagesOut, 150)
