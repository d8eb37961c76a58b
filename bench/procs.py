"""
The processes of the benchmarks: the broker (a real C{twistd -n broker}),
Mosquitto (Debian's, the peer the broker is compared with in the same run),
the subscriber workers of L{wsload}, and how their CPU and memory are read.
"""

import json
import math
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections import deque

from twisted.internet import defer, task
from twisted.internet.protocol import ProcessProtocol

from wsload import HUB, GROUP, KEY

CLK_TCK = os.sysconf("SC_CLK_TCK")



def cpuSeconds(pid):
    """
    User + system CPU seconds used so far by process C{pid}.
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rssKiB(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def freePort():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(ordered, p):
    """
    Nearest-rank percentile of an ascending sequence.
    """
    if not ordered:
        return float("nan")
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class ChildProcess(ProcessProtocol):
    """
    A child process whose end can be awaited.

    @cvar live: every child still running, so that they can all be stopped
        however the controller ends.
    """

    live = set()
    pid = None
    exitReason = None

    logPath = None

    def __init__(self):
        self._endWaiters = []

    def connectionMade(self):
        self.pid = self.transport.pid
        self.live.add(self)

    def spawn(self, reactor, argv, cwd, cpus=None):
        """
        Run C{argv} in C{cwd}, its output in C{self.logPath}, pinned to
        C{cpus} when given.
        """
        with open(self.logPath, "wb") as log:
            reactor.spawnProcess(self, argv[0], argv, env=os.environ, path=cwd,
                                 childFDs={0: "w", 1: log.fileno(), 2: log.fileno()})
        if cpus:
            os.sched_setaffinity(self.pid, cpus)

    async def ready(self, reactor, probe, what, timeout=30, interval=0.1):
        """
        Call C{probe()} (a coroutine function) until it succeeds; its
        result.  Raise with the log's tail if the process ends or
        C{timeout} passes first.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await probe()
            except Exception:
                if not self.running or time.monotonic() > deadline:
                    raise RuntimeError(f"{what} did not start; see {self.logPath}:\n"
                                       + self.logTail())
                await task.deferLater(reactor, interval)

    def logTail(self, lines=20):
        with open(self.logPath, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def processEnded(self, reason):
        self.live.discard(self)
        self.exitReason = reason.value
        waiters, self._endWaiters = self._endWaiters, None
        for d in waiters:
            d.callback(None)

    @property
    def running(self):
        return self._endWaiters is not None

    def whenEnded(self):
        if not self.running:
            return defer.succeed(None)
        d = defer.Deferred()
        self._endWaiters.append(d)
        return d

    async def stop(self, reactor, timeout=15):
        """
        SIGTERM, then SIGKILL if the process outlives C{timeout}.
        """
        if not self.running:
            return
        self.transport.signalProcess("TERM")
        try:
            await self.whenEnded().addTimeout(timeout, reactor)
        except defer.TimeoutError:
            self.transport.signalProcess("KILL")
            await self.whenEnded()


class WorkerDied(Exception):
    pass


class WorkerProcess(ChildProcess):
    """
    The controller's end of one subscriber worker (see L{WorkerControl}).
    """

    def __init__(self):
        super().__init__()
        self._buf = b""
        self._replies = deque()
        self.share = 0          # subscribers this worker holds

    def command(self, line):
        """
        Send one command; the Deferred fires with its JSON reply.
        """
        if not self.running:
            return defer.fail(WorkerDied(f"worker {self.pid}: {self.exitReason}"))
        d = defer.Deferred()
        self._replies.append(d)
        self.transport.write(line.encode("ascii") + b"\n")
        return d

    def outReceived(self, data):
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            self._replies.popleft().callback(json.loads(line))

    def processEnded(self, reason):
        super().processEnded(reason)
        while self._replies:
            self._replies.popleft().errback(WorkerDied(f"worker {self.pid}: {reason.value}"))


class BrokerProcess(ChildProcess):
    """
    One C{twistd -n broker} on free loopback ports, with a configuration
    that differs from the shipped one only in ports, key and hub.
    """

    kind = "webpubsub"
    name = "broker"

    CONFIG = """\
[broker]
state_dir = "{workdir}/var"
{brokerExtra}
[admin]
listen = ["tcp:{admin}:interface=127.0.0.1"]
[webpubsub]
# A deep backlog: thousands of clients connect at once.
listen = ["tcp:{port}:interface=127.0.0.1:backlog=1024"]
access_keys = ["{key}"]
{extra}
[webpubsub.hubs.{hub}]
"""

    def __init__(self, reactor, workdir, settings=(), cpus=None, brokerSettings=()):
        super().__init__()
        self.cpus = cpus
        self.reactor = reactor
        self.workdir = workdir
        self.settings = settings
        self.brokerSettings = brokerSettings
        self.port = freePort()
        self.adminPort = freePort()
        self.logPath = os.path.join(workdir, f"broker-{self.port}.log")

    async def start(self):
        config = os.path.join(self.workdir, f"broker-{self.port}.toml")
        with open(config, "w") as f:
            f.write(self.CONFIG.format(workdir=self.workdir, admin=self.adminPort,
                                       port=self.port, key=KEY, hub=HUB,
                                       extra="\n".join(self.settings),
                                       brokerExtra="\n".join(self.brokerSettings)))
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.spawn(self.reactor, [twistd, "-n", "--pidfile=",
                                  *os.environ.get("BENCH_TWISTD_ARGS", "").split(),
                                  "broker", "--config", config], self.workdir, self.cpus)
        return await self.ready(self.reactor, self.stats, "the broker")

    async def stats(self):
        from twisted.web.client import Agent, readBody

        # Twisted warns when the body has already arrived by the time
        # readBody() is called; that is harmless here.
        warnings.filterwarnings("ignore", "Using readBody with a transport", DeprecationWarning)
        url = f"http://127.0.0.1:{self.adminPort}/stats".encode("ascii")
        response = await Agent(self.reactor).request(b"GET", url)
        return json.loads(await readBody(response))

    def token(self, roles=()):
        from broker.auth.tokens import makeClientToken

        return makeClientToken(KEY, f"http://127.0.0.1:{self.port}/client/hubs/{HUB}",
                               roles=roles, groups=[GROUP])

    def cpu(self):
        return cpuSeconds(self.pid)

    def rss(self):
        return rssKiB(self.pid)


class MosquittoProcess(ChildProcess):
    """
    Debian's C{mosquitto} on a free loopback port, MQTT over WebSocket
    only, anonymous, no persistence: the peer the broker is measured against
    in the same run (L{fanout} C{--peer mosquitto}).

    It has no C{/stats}: L{stats} answers what the benchmark needs from
    what the load knows.
    """

    kind = "mqtt"
    name = "Mosquitto"
    BINARY = "/usr/sbin/mosquitto"
    CONFIG = """\
per_listener_settings false
allow_anonymous true
persistence false
log_dest stderr
log_type error
log_type warning
set_tcp_nodelay true
max_queued_messages 100000
# Mosquitto 2.0.11 exits ("Unable to start any listening sockets") when its
# only listener is a WebSocket one, so it gets an unused MQTT one too.
listener {mqttPort} 127.0.0.1
listener {port} 127.0.0.1
protocol websockets
"""

    def __init__(self, reactor, workdir, settings=(), cpus=None, brokerSettings=()):
        super().__init__()
        self.cpus = cpus
        self.reactor = reactor
        self.workdir = workdir
        self.port = freePort()

    @classmethod
    def available(cls):
        return os.access(cls.BINARY, os.X_OK)

    async def start(self):
        config = os.path.join(self.workdir, f"mosquitto-{self.port}.conf")
        with open(config, "w") as f:
            f.write(self.CONFIG.format(port=self.port, mqttPort=freePort()))
        self.logPath = os.path.join(self.workdir, f"mosquitto-{self.port}.out")
        self.spawn(self.reactor, [self.BINARY, "-c", config], self.workdir, self.cpus)

        async def listening():
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                pass
        await self.ready(self.reactor, listening, "mosquitto", timeout=15)

    async def stats(self):
        return {"slowConsumerDrops": "n/a"}

    def token(self, roles=()):
        return "-"

    def cpu(self):
        return cpuSeconds(self.pid)

    def rss(self):
        return rssKiB(self.pid)


def ownCpu():
    t = os.times()
    return t.user + t.system


def pinCPUs():
    """
    Give the broker one CPU and the load the others (this process now, the
    workers by inheritance); return the broker's CPU set, or None when there
    is only one CPU.

    The broker is one single-threaded process, so one core is all it can
    use; pinned, the load cannot borrow that core either, and the CPU
    figures of the two sides stay separate.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    os.sched_setaffinity(0, cpus[1:])
    return {cpus[0]}


def raiseFileLimit():
    """
    Raise the soft descriptor limit to the hard one (inherited by the
    broker and the workers); return the limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def workdirUntilShutdown(reactor, prefix, keep):
    """
    A temporary directory for the brokers' configurations and logs.  When
    the reactor shuts down (also when the controller is interrupted) every
    child process is stopped, so that no broker outlives the benchmark,
    and the directory is removed unless C{keep}.
    """
    workdir = tempfile.mkdtemp(prefix=prefix)

    async def cleanup():
        await defer.gatherResults(
            [defer.ensureDeferred(c.stop(reactor)) for c in list(ChildProcess.live)])
        if keep:
            print(f"broker logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    reactor.addSystemEventTrigger("before", "shutdown",
                                  lambda: defer.ensureDeferred(cleanup()))
    return workdir
