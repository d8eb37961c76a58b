# -*- test-case-name: tests.test_fanout -*-
"""
Cooperative fan-out: hand one delivery to many connections without holding
the reactor for the whole list.

Small fan-outs are written at once.  A fan-out larger than one chunk writes
its first chunk now and the rest from later reactor turns, so that a group of
100k connections does not stall every other socket.  Jobs run strictly in
order, which keeps every receiver's messages in publish order even when a
small publish arrives while a large one is still going out.
"""

from collections import deque

from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger()


class Fanout:
    """
    @ivar chunkSize: receivers written per reactor turn.
    """

    def __init__(self, reactor, chunkSize=4096):
        if chunkSize < 1:
            raise ValueError("chunkSize must be positive")
        self._reactor = reactor
        self.chunkSize = chunkSize
        # Deliveries queued for later turns, and the marks between which
        # publishers are told to hold off (see L{congested}).
        self.backlog = 0
        self.highWater = 8 * chunkSize
        self.lowWater = 2 * chunkSize
        self._drainWaiters = []
        self._jobs = deque()
        self._call = None
        self._running = False

    @property
    def congested(self):
        """
        Whether the backlog is over the high-water mark.
        """
        return self.backlog > self.highWater

    def whenDrained(self):
        """
        A L{Deferred} firing once the backlog is at or below the low-water
        mark.
        """
        d = Deferred()
        if self.backlog <= self.lowWater:
            d.callback(None)
        else:
            self._drainWaiters.append(d)
        return d

    @property
    def pending(self):
        """
        Number of fan-out jobs waiting for a later reactor turn.
        """
        return len(self._jobs)

    def deliver(self, receivers, delivery, stats):
        """
        Hand C{delivery} to every L{IConnection} in C{receivers} (a list the
        caller gives up), counting deliveries in C{stats.messagesOut}.
        """
        if not receivers:
            return
        if not self._jobs and not self._running and len(receivers) <= self.chunkSize:
            self._running = True
            try:
                _write(receivers, 0, len(receivers), delivery)
            finally:
                self._running = False
            stats.messagesOut += len(receivers)
            if self._jobs and self._call is None:
                self._run()
            return
        # Queued behind whatever is in flight, including a write that is
        # publishing again from inside a receiver (re-entrancy).
        self._jobs.append([receivers, 0, delivery, stats])
        self.backlog += len(receivers)
        if self._call is None and not self._running:
            self._run()

    def _run(self):
        self._call = None
        self._running = True
        try:
            self._runChunk()
        finally:
            self._running = False
        if self._jobs:
            self._call = self._reactor.callLater(0, self._run)
        if self._drainWaiters and self.backlog <= self.lowWater:
            waiters, self._drainWaiters = self._drainWaiters, []
            for d in waiters:
                d.callback(None)

    def _runChunk(self):
        budget = self.chunkSize
        jobs = self._jobs
        while jobs and budget > 0:
            job = jobs[0]
            receivers, start, delivery, stats = job
            end = min(len(receivers), start + budget)
            _write(receivers, start, end, delivery)
            stats.messagesOut += end - start
            budget -= end - start
            self.backlog -= end - start
            if end == len(receivers):
                jobs.popleft()
            else:
                job[1] = end

    def stop(self):
        """
        Drop pending jobs (at shutdown).
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._jobs.clear()
        self.backlog = 0
        waiters, self._drainWaiters = self._drainWaiters, []
        for d in waiters:
            d.callback(None)


def _write(receivers, start, end, delivery):
    if start == 0 and end == len(receivers):
        part = receivers
    else:
        part = receivers[start:end]
    for receiver in part:
        try:
            receiver.deliver(delivery)
        except Exception:
            # A broken adapter must not stop the fan-out to everyone else.
            log.failure("delivery to {conn!r} failed", conn=receiver)
