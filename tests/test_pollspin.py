# -*- test-case-name: tests.test_pollspin -*-
"""
Polling before sleeping (L{broker.pollspin}): on a private epoll reactor
over a real socket pair, and on a real C{twistd broker}.
"""

import os
import re
import socket
import threading
import time

import treq
from twisted.internet import defer, reactor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs
from twisted.web.client import HTTPConnectionPool
from twisted.trial.unittest import TestCase

from broker.pollspin import PollSpin, PollSpinService
from tests.test_tap import LOOPBACK, TwistdTestsMixin, configFile


class Reader:
    """
    A reader of one end of a socket pair, for a private reactor.
    """

    def __init__(self, sock):
        self.sock = sock
        self.received = b""

    def fileno(self):
        return self.sock.fileno()

    def doRead(self):
        self.received += self.sock.recv(4096)

    def connectionLost(self, reason):
        pass

    def logPrefix(self):
        return "Reader"


class PollSpinTests(TestCase):
    def setUp(self):
        self.reactor = EPollReactor()
        self.ours, self.theirs = socket.socketpair()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)
        self.addCleanup(self.closeReactor)
        self.ours.setblocking(False)
        self.reader = Reader(self.ours)
        self.reactor.addReader(self.reader)

    def closeReactor(self):
        r = self.reactor
        r.removeAll()
        for reader in list(r._internalReaders):
            r.removeReader(reader)
            reader.connectionLost(None)
        r._poller.close()

    def writeLater(self, seconds):
        """
        Write a byte to the reader's socket from another thread, after
        C{seconds}.
        """
        timer = threading.Timer(seconds, self.theirs.send, (b"x",))
        timer.start()
        self.addCleanup(timer.join)
        self.addCleanup(timer.cancel)

    def iterate(self, spin, timeout):
        started = time.monotonic()
        spin.doIteration(timeout)
        return time.monotonic() - started

    def test_caughtWhileSpinning(self):
        """
        An event that arrives within the spin is read without blocking.
        """
        spin = PollSpin(self.reactor, 2.0)
        self.assertTrue(spin.install())
        self.writeLater(0.02)
        elapsed = self.iterate(spin, 5.0)
        self.assertEqual(self.reader.received, b"x")
        self.assertEqual((spin.caught, spin.slept), (1, 0))
        self.assertLess(elapsed, 1.0)
        self.assertEqual(spin.spin, 2.0)

    def test_blocksAfterTheSpin(self):
        """
        With nothing to read, the reactor spins up to the limit, then blocks
        for the rest of its timeout, and the next spin is halved.
        """
        spin = PollSpin(self.reactor, 0.01)
        spin.install()
        elapsed = self.iterate(spin, 0.1)
        self.assertGreaterEqual(elapsed, 0.09)
        self.assertLess(elapsed, 1.0)
        self.assertEqual((spin.caught, spin.slept), (0, 1))
        self.assertAlmostEqual(spin.spin, 0.005)

    def test_shrinksToNothingThenGrows(self):
        """
        Idles longer than the limit halve the spin down to none (sparse
        traffic burns no CPU); a blocking wait shorter than the limit brings
        the whole spin back.
        """
        spin = PollSpin(self.reactor, 0.004)
        spin.install()
        for _ in range(12):
            self.iterate(spin, 0.006)
        self.assertEqual(spin.spin, 0.0)
        slept = spin.slept
        before = time.process_time()
        self.iterate(spin, 0.2)
        self.assertLess(time.process_time() - before, 0.05, "slept, not spun")
        self.assertEqual(spin.slept, slept)
        # A limit a loaded machine's thread start cannot pass.
        spin.limit = 2.0
        self.writeLater(0.001)
        self.iterate(spin, 5.0)
        self.assertEqual(self.reader.received, b"x")
        self.assertEqual(spin.spin, 2.0)

    def test_timedCallsKeepTheirTime(self):
        """
        A spin never outlasts the reactor's timeout (its next timed call).
        """
        spin = PollSpin(self.reactor, 5.0)
        spin.install()
        self.assertLess(self.iterate(spin, 0.02), 1.0)
        self.assertLess(self.iterate(spin, 0), 0.5)
        self.assertEqual(spin.caught, 0)

    def test_alreadyReady(self):
        """
        A socket readable before the idle is read by the first poll.
        """
        spin = PollSpin(self.reactor, 1.0)
        spin.install()
        self.theirs.send(b"y")
        self.assertLess(self.iterate(spin, None), 0.5)
        self.assertEqual(self.reader.received, b"y")

    def test_installedOnTheReactor(self):
        """
        The reactor's own iteration spins once installed, and not after.
        """
        spin = PollSpin(self.reactor, 1.0)
        spin.install()
        self.writeLater(0.01)
        self.reactor.iterate(3.0)
        self.assertEqual(spin.caught, 1)
        spin.uninstall()
        self.assertNotIn("doIteration", vars(self.reactor))
        self.theirs.send(b"z")
        self.reactor.iterate(0.5)
        self.assertEqual(self.reader.received, b"xz")
        self.assertEqual(spin.caught, 1)

    def test_notInstalled(self):
        """
        A zero limit, or a reactor that is not epoll's, is left alone.
        """
        self.assertFalse(PollSpin(self.reactor, 0).install())
        self.assertFalse(PollSpin(Clock(), 0.001).install())
        self.assertNotIn("doIteration", vars(self.reactor))

    def test_serviceWarnsOnOtherReactors(self):
        service = PollSpinService(Clock(), 0.001)
        with capturedLogs() as events:
            service.startService()
        service.stopService()
        self.assertTrue(any("poll_spin_us ignored" in e.get("log_format", "")
                            for e in events), events)


def cpuSeconds(pid):
    """
    User and system CPU seconds of process C{pid} so far.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class SpinningBrokerTests(TwistdTestsMixin, TestCase):
    """
    C{twistd broker} with C{broker.poll_spin_us}: it serves, and it does not
    spin while idle.
    """

    @defer.inlineCallbacks
    def test_servesAndIdles(self):
        directory, path = configFile(self, f'poll_spin_us = 10000\n[admin]\nlisten = ["{LOOPBACK}"]\n'
                                           f'[webpubsub]\nlisten = ["{LOOPBACK}"]\n'
                                           f'[webpubsub.hubs.chat]\n')
        proc = self.spawn(["-n", "--pidfile=", "broker", "--config", path.path],
                          directory, ["admin.listen[0]"])
        ports = yield proc.listening
        url = f"http://127.0.0.1:{ports['admin.listen[0]']}/healthz"
        # Requests one after the other on one connection, closer than the
        # spin: it spins.
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        for _ in range(50):
            response = yield treq.get(url, reactor=reactor, pool=pool)
            self.assertEqual((yield treq.content(response)), b"ok\n")
        pid = proc.transport.pid
        yield deferLater(reactor, 0.3, lambda: None)
        before = cpuSeconds(pid)
        yield deferLater(reactor, 2.0, lambda: None)
        idle = cpuSeconds(pid) - before
        self.assertLess(idle, 0.2, f"{idle:.2f} s of CPU in 2 s idle")
        metrics = yield treq.get(url.replace("/healthz", "/metrics"), reactor=reactor,
                                 pool=pool)
        text = (yield treq.content(metrics)).decode("utf-8")
        caught = re.search(r'^broker_poll_spin_idles_total\{outcome="caught"\} (\S+)$', text, re.M)
        slept = re.search(r'^broker_poll_spin_idles_total\{outcome="slept"\} (\S+)$', text, re.M)
        self.assertTrue(caught and slept, text)
        self.assertGreater(float(caught.group(1)), 0)
        self.assertGreater(float(slept.group(1)), 0)
        self.assertNotIn("Traceback", proc.text())
        self.assertNotIn("poll_spin_us ignored", proc.text())
