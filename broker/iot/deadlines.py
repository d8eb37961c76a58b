# -*- test-case-name: tests.test_iot_deadlines -*-
"""
Many deadlines on one reactor timer: the timeouts of the requests the
broker sends to its peers (a held HTTP request's REQUEST frame to a device).

A C{callLater} per request, cancelled when the answer comes a few hundred
microseconds later, was a Twisted L{DelayedCall}, two heap operations in
the reactor and a cancellation per round trip.  Here a deadline is a list
pushed on a heap, cancelled by clearing its callable; one reactor call is
armed for the earliest deadline, and re-armed when it fires.  Cancelled
entries are dropped when they reach the top of the heap, or all at once
when they outnumber the live ones, so the heap stays within a constant
factor of the requests in flight.

The reactor call is kept while deadlines come and go (that is the saving),
and cancelled by L{stop}: the owner calls it when it has nothing left that
may be waiting (the last session gone), so that nothing outlives it.
"""

from heapq import heapify, heappop, heappush

from twisted.logger import Logger

log = Logger()

# A cancelled entry is dropped from the heap at the latest when there are
# this many of them and they outnumber the live ones.
_COMPACT_AT = 1024


class Deadlines:
    """
    @param reactor: an C{IReactorTime}.
    """

    def __init__(self, reactor):
        self._reactor = reactor
        self._heap = []
        self._seq = 0
        self._live = 0
        self._call = None
        self._callAt = None

    def __len__(self):
        """
        The deadlines not yet cancelled nor expired.
        """
        return self._live

    def add(self, delay, f, *args):
        """
        Call C{f(*args)} in C{delay} seconds, unless L{cancel}led before.

        @return: the entry to give L{cancel}.
        """
        reactor = self._reactor
        at = reactor.seconds() + delay
        self._seq += 1
        entry = [at, self._seq, f, args]
        heappush(self._heap, entry)
        self._live += 1
        if self._call is None:
            self._callAt = at
            self._call = reactor.callLater(delay, self._fire)
        elif at < self._callAt:
            # Sooner than the armed call (a shorter timeout): re-armed.
            self._call.cancel()
            self._callAt = at
            self._call = reactor.callLater(delay, self._fire)
        return entry

    def cancel(self, entry):
        """
        Forget C{entry} (once expired or cancelled, nothing happens).
        """
        if entry[2] is None:
            return
        entry[2] = entry[3] = None
        self._live -= 1
        heap = self._heap
        if len(heap) - self._live > max(_COMPACT_AT, self._live):
            self._heap = [e for e in heap if e[2] is not None]
            heapify(self._heap)

    def _fire(self):
        self._call = self._callAt = None
        now = self._reactor.seconds()
        heap = self._heap
        while heap:
            entry = heap[0]
            f = entry[2]
            if f is None:
                heappop(heap)
                continue
            if entry[0] > now:
                break
            heappop(heap)
            args = entry[3]
            entry[2] = entry[3] = None
            self._live -= 1
            try:
                f(*args)
            except Exception:
                log.failure("a deadline's call failed")
            # f may have added or cancelled deadlines, or stopped us.
            heap = self._heap
        if heap and self._call is None:
            at = heap[0][0]
            self._callAt = at
            self._call = self._reactor.callLater(max(0.0, at - now), self._fire)

    def stop(self):
        """
        Cancel the reactor call and forget every deadline.
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self._callAt = None
        for entry in self._heap:
            entry[2] = entry[3] = None
        self._heap = []
        self._live = 0
