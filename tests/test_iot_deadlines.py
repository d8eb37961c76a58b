"""
Tests for L{broker.iot.deadlines}: many deadlines on one reactor call.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from broker.iot.deadlines import Deadlines


class DeadlinesTests(TestCase):
    def setUp(self):
        self.clock = Clock()
        self.deadlines = Deadlines(self.clock)
        self.fired = []

    def add(self, delay, name):
        return self.deadlines.add(delay, self.fired.append, name)

    def test_firesAtItsTime(self):
        """
        A deadline fires when its delay has passed, not before, with its
        arguments, once.
        """
        self.add(2.0, "a")
        self.clock.advance(1.999)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.001)
        self.assertEqual(self.fired, ["a"])
        self.clock.advance(10)
        self.assertEqual(self.fired, ["a"])
        self.assertEqual(len(self.deadlines), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_order(self):
        """
        Deadlines fire in the order of their times, those of one time in
        the order they were added, on one reactor call at a time.
        """
        self.add(3, "c")
        self.add(1, "a")
        self.add(2, "b1")
        self.add(2, "b2")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(2)
        self.assertEqual(self.fired, ["a", "b1", "b2"])
        self.clock.advance(1)
        self.assertEqual(self.fired, ["a", "b1", "b2", "c"])

    def test_sooner(self):
        """
        A deadline sooner than the armed call re-arms it: it is not late.
        """
        self.add(30, "late")
        self.add(1, "soon")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1)
        self.assertEqual(self.fired, ["soon"])
        self.clock.advance(29)
        self.assertEqual(self.fired, ["soon", "late"])

    def test_cancel(self):
        """
        A cancelled deadline never fires; cancelling twice, or after it
        fired, does nothing.
        """
        a = self.add(1, "a")
        self.add(2, "b")
        self.deadlines.cancel(a)
        self.deadlines.cancel(a)
        self.assertEqual(len(self.deadlines), 1)
        self.clock.advance(5)
        self.assertEqual(self.fired, ["b"])
        self.deadlines.cancel(a)
        self.assertEqual(len(self.deadlines), 0)

    def test_reactorCallKept(self):
        """
        The reactor call stays armed while deadlines are added and
        cancelled (the point: no reactor call per deadline); when it fires
        with nothing live it is not re-armed.
        """
        calls = set()
        for i in range(100):
            self.deadlines.cancel(self.add(10, i))
            calls.update(self.clock.getDelayedCalls())
        self.assertEqual(len(calls), 1)
        self.clock.advance(10)
        self.assertEqual(self.fired, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_compacted(self):
        """
        Cancelled entries do not pile up: the heap stays within a constant
        factor of the live deadlines, however many come and go.
        """
        live = [self.add(60, "live") for _ in range(10)]
        for i in range(20000):
            self.deadlines.cancel(self.add(60, i))
        self.assertLessEqual(len(self.deadlines._heap), 2 * 1024 + len(live))
        self.assertEqual(len(self.deadlines), 10)
        self.clock.advance(60)
        self.assertEqual(self.fired, ["live"] * 10)

    def test_failureLogged(self):
        """
        A deadline whose call raises is logged; the others still fire and
        the next call is armed.
        """
        def boom():
            raise ZeroDivisionError()
        self.deadlines.add(1, boom)
        self.add(1, "after")
        self.add(5, "later")
        self.clock.advance(1)
        self.assertEqual(self.fired, ["after"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.clock.advance(4)
        self.assertEqual(self.fired, ["after", "later"])

    def test_addWhileFiring(self):
        """
        A deadline's call may add another: it is armed.
        """
        self.deadlines.add(1, lambda: self.add(1, "again"))
        self.clock.advance(1)
        self.assertEqual(self.fired, [])
        self.clock.advance(1)
        self.assertEqual(self.fired, ["again"])

    def test_stop(self):
        """
        L{Deadlines.stop} cancels the reactor call and every deadline.
        """
        self.add(1, "a")
        self.deadlines.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.deadlines), 0)
        self.clock.advance(5)
        self.assertEqual(self.fired, [])
        self.add(1, "b")
        self.clock.advance(1)
        self.assertEqual(self.fired, ["b"])
