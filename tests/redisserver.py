# -*- test-case-name: tests.test_cluster_redis -*-
"""
A real C{redis-server} for the tests: started on an ephemeral loopback port
with no persistence (or, on request, with an append-only file synced on
every write, as operators are told to run it), stopped (or killed) at cleanup, restartable on the same
port so a test can take Redis away mid-run and bring it back.

Skipped where redis-server is missing, failed instead under scripts/test
(which installs Debian's redis-server).
"""

import os
import shutil
import socket
import tempfile

from twisted.internet import defer, error, protocol
from twisted.internet.task import deferLater

from tests.tools import requireTool

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def freePort():
    """
    An ephemeral loopback port nobody listens on (redis-server has no
    "port 0").
    """
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


class _RedisProcess(protocol.ProcessProtocol):
    def __init__(self):
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()
        self.output = b""

    def childDataReceived(self, fd, data):
        self.output = (self.output + data)[-20000:]
        if not self.ready.called and b"Ready to accept connections" in self.output:
            self.ready.callback(None)

    def processEnded(self, reason):
        if not self.ready.called:
            self.ready.errback(RuntimeError(
                "redis-server ended before it was ready:\n"
                + self.output.decode("utf-8", "replace")[-2000:]))
        self.ended.callback(None)


class RedisServer:
    """
    One redis-server child of the test.

    @ivar port: its loopback port, kept across L{stop} and L{start}.
    @ivar url: C{redis://127.0.0.1:<port>/0}.
    @ivar durable: run with C{appendonly yes}, C{appendfsync always}: what
        Redis acknowledged survives L{stop} and L{start} (and L{kill}), as
        docs/peergroups.md recommends; otherwise a restart starts empty.
    """

    def __init__(self, testCase, reactor, durable=False):
        requireTool(os.path.exists(REDIS_SERVER),
                    "no redis-server here (scripts/test installs Debian's redis-server)")
        self.testCase = testCase
        self.reactor = reactor
        self.port = freePort()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="broker-redis-")
        self.durable = durable
        self.process = None
        self.transport = None
        testCase.addCleanup(shutil.rmtree, self.dir, True)
        testCase.addCleanup(self.kill)

    @defer.inlineCallbacks
    def start(self):
        """
        Start it (again) and fire once it accepts connections.
        """
        self.process = _RedisProcess()
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else [
            "--appendonly", "no"]
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", ""] + aof + ["--dir", self.dir,
                "--protected-mode", "no", "--loglevel", "notice"]
        self.transport = self.reactor.spawnProcess(
            self.process, REDIS_SERVER, args, env=dict(os.environ))
        timeout = self.reactor.callLater(20, self.kill)
        try:
            yield self.process.ready
        finally:
            if timeout.active():
                timeout.cancel()
        return self

    def _signal(self, name):
        if self.process is None or self.process.ended.called:
            return defer.succeed(None)
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass
        return self.process.ended

    def stop(self):
        """
        Stop it gracefully (SIGTERM); fires once it has exited.
        """
        return self._signal("TERM")

    def kill(self):
        """
        SIGKILL it; fires once it has exited.
        """
        return self._signal("KILL")

    def forget(self):
        """
        Remove what a stopped server persisted, so that the next L{start}
        is an empty Redis (one without persistence, or a replacement).
        """
        assert self.process is None or self.process.ended.called, "stop it first"
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)

    def command(self, *args):
        """
        Run one command with a short-lived blocking client and return its
        reply as bytes (for checks from outside the broker).
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            parts = [b"*%d\r\n" % len(args)]
            for a in args:
                a = a if isinstance(a, bytes) else str(a).encode()
                parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
            s.sendall(b"".join(parts))
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data


def settle(reactor, seconds=0.05):
    """
    Let the reactor run for C{seconds}.
    """
    return deferLater(reactor, seconds, lambda: None)


def silence(cluster):
    """
    Make a cluster node fall silent without leaving, as a node killed with
    SIGKILL or frozen would: no more heartbeats, and no re-registration if
    its link reconnects.
    """
    cluster._beat.stop()
    cluster.redis._upHooks = []
