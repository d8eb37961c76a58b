# -*- test-case-name: tests.test_pollspin -*-
"""
Polling before sleeping: an idle reactor that checks its sockets for a few
microseconds before it blocks in C{epoll_wait}.

A process that blocks hands its CPU back to the kernel; when that CPU then
has nothing else to run it halts, and on a virtual machine without guest
halt-polling (this project's VMs: C{haltpoll.guest_halt_poll_ns=0}) waking
a halted CPU costs about 40 µs, where the loopback round trip it serves
costs 20.  At low load every message pays it: a request answered by a
device is four hops, two of which wake the broker.  Spinning on
C{epoll_wait(0)} for a short while first catches the next event without
the wake-up, at the price of the CPU time spent spinning.

The spin adapts, as the kernel's own C{haltpoll} governor does, so that a
broker with sparse traffic does not burn a core: after a blocking wait
that ended sooner than the spin limit, the next idle spins up to the limit
(the next event was close); after a wait that ran past it, the spin is
halved, down to nothing.  A spin never outlasts the reactor's next timed
call.  Only the epoll reactor is spun; others are left alone.

Operators turn it on with C{broker.poll_spin_us} (docs/configuration.md):
it trades CPU that would otherwise be idle for latency, which suits a
dedicated core and not a host shared with other busy processes.
"""

import errno
from time import monotonic

from prometheus_client.core import CounterMetricFamily
from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()

#: A spin shorter than this is not worth a poll: it becomes none.
MIN_SPIN = 2e-6


class PollSpin:
    """
    Installs an adaptive spin before C{reactor}'s blocking polls.

    @ivar limit: the longest spin, in seconds.
    @ivar spin: the next spin, in seconds (adapted between 0 and C{limit}).
    @ivar caught: idles whose event arrived while spinning (a wake-up saved).
    @ivar slept: idles that spun and then blocked anyway.
    """

    def __init__(self, reactor, limit, clock=monotonic):
        self.reactor = reactor
        self.limit = limit
        self.spin = limit
        self.caught = 0
        self.slept = 0
        self._clock = clock
        self._installed = False

    def install(self):
        """
        Spin before C{reactor}'s blocking polls, if it is an epoll reactor
        and the limit is positive.  Returns whether it did.
        """
        poller = getattr(self.reactor, "_poller", None)
        doPoll = getattr(self.reactor, "doPoll", None)
        if (self.limit <= 0 or self._installed or poller is None or doPoll is None
                or type(poller).__name__ != "epoll"):
            return False
        self.reactor.doIteration = self.doIteration
        self._installed = True
        return True

    def uninstall(self):
        if self._installed:
            del self.reactor.doIteration
            self._installed = False

    def doIteration(self, timeout):
        """
        The reactor's C{doIteration}: poll without blocking, spin while the
        adapted spin lasts, then block for what remains of C{timeout}.
        """
        reactor = self.reactor
        if timeout == 0:
            reactor.doPoll(0)
            return
        poll = reactor._poller.poll
        clock = self._clock
        spin = self.spin
        if timeout is not None and timeout < spin:
            spin = timeout
        idleSince = clock()
        if spin >= MIN_SPIN:
            end = idleSince + spin
            try:
                while not poll(0, 1):
                    if clock() >= end:
                        break
                else:
                    # Something is ready (epoll is level-triggered here):
                    # the reactor's own poll hands it on.
                    self.caught += 1
                    reactor.doPoll(0)
                    return
            except OSError as e:
                if e.errno == errno.EINTR:
                    return
                raise
            self.slept += 1
            if timeout is not None:
                timeout = max(0.0, timeout - (clock() - idleSince))
        reactor.doPoll(timeout)
        # How long this idle lasted, spin included: within the limit, the
        # next one spins the whole limit; past it, half what this one did.
        if clock() - idleSince <= self.limit:
            self.spin = self.limit
        else:
            half = self.spin / 2
            self.spin = half if half >= MIN_SPIN else 0.0


class PollSpinService(Service):
    """
    Spins C{reactor}'s idles (L{PollSpin}) while the broker runs.
    """

    def __init__(self, reactor, limit):
        self.pollSpin = PollSpin(reactor, limit)

    def startService(self):
        Service.startService(self)
        if not self.pollSpin.install():
            log.warn("broker.poll_spin_us ignored: the reactor is not the epoll reactor")

    def stopService(self):
        self.pollSpin.uninstall()
        return Service.stopService(self)


class PollSpinCollector:
    """
    Prometheus: C{broker_poll_spin_idles_total{outcome}}, the idles of a
    spinning reactor by whether the spin caught their event (C{caught}: a
    wake-up saved) or ended in a sleep (C{slept}).  A high share of
    C{slept} with a busy process says the spin costs more than it saves.
    """

    def __init__(self, pollSpin):
        self.pollSpin = pollSpin

    def collect(self):
        idles = CounterMetricFamily("broker_poll_spin_idles",
                                    "Idles of the spinning reactor (broker.poll_spin_us), by "
                                    "whether the spin caught the next event or ended in a sleep.",
                                    labels=["outcome"])
        idles.add_metric(["caught"], self.pollSpin.caught)
        idles.add_metric(["slept"], self.pollSpin.slept)
        yield idles
