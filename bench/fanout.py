"""
Fan-out benchmark for the Web PubSub face.

Runs the broker as a real C{twistd broker} process on loopback ports and
drives it over real WebSocket connections:

  - throughput: N subscribers (100 and 1000) in one group, one publisher
    sending 64-byte text messages as fast as the server takes them;
    deliveries/s are counted at the subscribers;
  - latency: the same N subscribers, one message in flight at a time;
    publish-to-deliver latency p50/p99 over every delivery;
  - memory: server RSS per idle connection at 1k and 10k connections.

It prints figures beside the targets from the issue and asserts nothing.

The load must cost less than the server, or the figures measure the client.
So subscribers are not autobahn clients: they are raw Twisted protocols that
do the opening handshake by hand and only walk the headers of the server's
unmasked frames, reading a timestamp from the first frame of each read.  They are
plain WebSocket clients (no subprotocol), which the broker sends bare payload
frames.  They run in worker processes (this file with C{--worker}) driven by
the controller over stdin/stdout; the controller runs the publisher.  CPU
seconds of the server and of every client process are printed for each run.

Latency uses C{time.monotonic_ns()}: CLOCK_MONOTONIC is system-wide on Linux,
so the publisher and the subscriber processes read the same clock.

Usage: python bench/fanout.py [--quick] (see bench/README.md).
"""

import argparse
import json
import math
import os
import platform
import resource
import shutil
import socket
import sys
import tempfile
import time
import warnings
from array import array
from collections import deque
from importlib.metadata import version

from twisted.internet import defer, stdio, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.protocols.basic import LineReceiver

HUB = "bench"
GROUP = "g"
KEY = "bench-key-0123456789abcdef0123456789abcdef"
PAYLOAD_SIZE = 64

# Payload layout: "<seq:20> <monotonic ns:20> " then padding to PAYLOAD_SIZE.
_STAMP = slice(21, 41)
_PAD = b"x" * (PAYLOAD_SIZE - 42)

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the wire: a minimal WebSocket client -----------------------------------


def openingHandshake(port, token, protocol=None):
    """
    The client's opening handshake.  The key is fixed: the server's accept
    header is not checked, only its 101 status.
    """
    lines = [f"GET /client/hubs/{HUB}?access_token={token} HTTP/1.1",
             f"Host: 127.0.0.1:{port}",
             "Upgrade: websocket",
             "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
             "Sec-WebSocket-Version: 13"]
    if protocol:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def clientFrame(payload, opcode=0x1):
    """
    A final, masked client frame, as RFC 6455 requires of clients.  The XOR
    is one big-integer operation, which is far cheaper in Python than a
    byte loop.
    """
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    mask = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")
    return header + key + masked


def stampedPayload(seq):
    return b"%020d %020d " % (seq, time.monotonic_ns()) + _PAD


class HandshakeFailed(Exception):
    pass


class WebSocketClient(Protocol):
    """
    The client side of one connection: sends C{request}, waits for the 101,
    then splits the server's frames.  Pings are answered and a close frame
    is echoed; data frames go to L{dataFrames}.

    The server never fragments (autobahn's autoFragmentSize is 0), so every
    text or binary frame is a whole message.

    @ivar ready: fires with this protocol once the server has accepted the
        upgrade, or fails with L{HandshakeFailed}.
    @ivar collect: when true, L{dataFrames} receives every payload; when
        false only the first one of each read, which keeps counting cheap.
    """

    collect = False

    def __init__(self, request):
        self.request = request
        self.ready = defer.Deferred()
        self.open = False
        self._buf = b""

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.transport.write(self.request)

    def dataReceived(self, data):
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if not self.open:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._buf = data
                return
            status = data[:data.find(b"\r\n")]
            if not status.startswith(b"HTTP/1.1 101"):
                self.transport.loseConnection()
                self.ready.errback(HandshakeFailed(status.decode("latin-1")))
                return
            self.open = True
            data = data[end + 4:]
            self.ready.callback(self)
        n = len(data)
        i = 0
        count = 0
        first = None
        payloads = [] if self.collect else None
        while n - i >= 2:
            length = data[i + 1] & 0x7F
            start = i + 2
            if length == 126:
                start = i + 4
                if start > n:
                    break
                length = int.from_bytes(data[i + 2:start], "big")
            elif length == 127:
                start = i + 10
                if start > n:
                    break
                length = int.from_bytes(data[i + 2:start], "big")
            end = start + length
            if end > n:
                break
            opcode = data[i] & 0x0F
            if opcode == 0x1 or opcode == 0x2:
                count += 1
                if payloads is not None:
                    payloads.append(data[start:end])
                elif first is None:
                    first = data[start:end]
            elif opcode == 0x9:
                self.transport.write(clientFrame(data[start:end], 0xA))
            elif opcode == 0x8:
                self.transport.write(clientFrame(data[start:start + 2], 0x8))
                self.transport.loseConnection()
            i = end
        if i < n:
            self._buf = data[i:]
        if count:
            self.dataFrames(count, payloads if payloads is not None else first)

    def dataFrames(self, count, payloads):
        """
        C{count} data frames arrived in one read; C{payloads} is the list of
        their payloads when L{collect} is set, else the first payload.
        """

    def connectionLost(self, reason):
        if not self.ready.called:
            self.ready.errback(HandshakeFailed(f"connection lost: {reason.getErrorMessage()}"))


# -- subscriber worker process ------------------------------------------------


class Tally:
    """
    What one worker's subscribers received, shared by all of them.

    @ivar frames: data frames received.
    @ivar samples: publish-to-deliver latencies (ns), one per read.
    """

    def __init__(self):
        self.frames = 0
        self.samples = array("q")
        self.open = 0
        self.lost = 0
        self._target = None

    def received(self, count, payload):
        self.samples.append(time.monotonic_ns() - int(payload[_STAMP]))
        self.frames += count
        if self._target is not None and self.frames >= self._target[0]:
            d = self._target[1]
            self._target = None
            d.callback(self.frames)

    def reach(self, frames):
        """
        A Deferred that fires once C{frames} data frames have arrived.
        """
        if self.frames >= frames:
            return defer.succeed(self.frames)
        d = defer.Deferred(lambda _: setattr(self, "_target", None))
        self._target = (frames, d)
        return d


class Subscriber(WebSocketClient):
    def __init__(self, request, tally):
        super().__init__(request)
        self.tally = tally

    def dataFrames(self, count, first):
        self.tally.received(count, first)

    def connectionLost(self, reason):
        if self.open:
            self.tally.open -= 1
            self.tally.lost += 1
        super().connectionLost(reason)


class WorkerControl(LineReceiver):
    """
    Commands from the controller, one JSON reply line each, handled strictly
    in order:

      - C{connect N}: open N more subscribers;
      - C{count}: frames received, connections open and lost;
      - C{reach K SECONDS}: reply once K frames have arrived, or at timeout;
      - C{reset}: forget the latency samples taken so far;
      - C{dump PATH}: write the latency samples to PATH (native int64).
    """

    delimiter = b"\n"
    concurrency = 64   # handshakes in flight, so the listen backlog never overflows

    def __init__(self, reactor, port, token):
        self.reactor = reactor
        self.endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30)
        self.request = openingHandshake(port, token)
        self.tally = Tally()
        self._last = defer.succeed(None)

    def lineReceived(self, line):
        words = line.decode("ascii").split()
        self._last.addCallback(lambda _: defer.ensureDeferred(self._run(words)))

    async def _run(self, words):
        verb, args = words[0], words[1:]
        t = self.tally
        try:
            if verb == "connect":
                reply = await self.connect(int(args[0]))
            elif verb == "count":
                reply = {}
            elif verb == "reach":
                d = t.reach(int(args[0]))
                d.addTimeout(float(args[1]), self.reactor)
                try:
                    await d
                except defer.TimeoutError:
                    reply = {"timeout": True}
                else:
                    reply = {}
            elif verb == "reset":
                t.samples = array("q")
                reply = {}
            elif verb == "dump":
                with open(args[0], "wb") as f:
                    t.samples.tofile(f)
                reply = {"samples": len(t.samples)}
            else:
                reply = {"error": f"unknown command {verb!r}"}
        except Exception as e:
            reply = {"error": repr(e)}
        reply.update(frames=t.frames, open=t.open, lost=t.lost)
        self.sendLine(json.dumps(reply).encode("ascii"))

    async def connect(self, n):
        started = time.monotonic()
        sem = defer.DeferredSemaphore(self.concurrency)
        failures = []

        async def one():
            try:
                subscriber = Subscriber(self.request, self.tally)
                await connectProtocol(self.endpoint, subscriber)
                await subscriber.ready
            except Exception as e:
                failures.append(str(e))
                return
            self.tally.open += 1

        await defer.gatherResults(
            [sem.run(lambda: defer.ensureDeferred(one())) for _ in range(n)])
        return {"seconds": time.monotonic() - started, "failed": len(failures),
                "firstFailure": failures[0] if failures else None}

    def connectionLost(self, reason):
        # The controller went away: so do we.
        if self.reactor.running:
            self.reactor.stop()


def runWorker(port, token):
    from twisted.internet import reactor

    stdio.StandardIO(WorkerControl(reactor, port, token))
    reactor.run()


# -- controller: processes and measurements ---------------------------------


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

    def __init__(self):
        self._endWaiters = []

    def connectionMade(self):
        self.pid = self.transport.pid
        self.live.add(self)

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

    CONFIG = """\
[broker]
state_dir = "{workdir}/var"
[admin]
listen = ["tcp:{admin}:interface=127.0.0.1"]
[webpubsub]
# A deep backlog: thousands of clients connect at once.
listen = ["tcp:{port}:interface=127.0.0.1:backlog=1024"]
access_keys = ["{key}"]
{extra}
[webpubsub.hubs.{hub}]
"""

    def __init__(self, reactor, workdir, settings=(), cpus=None):
        super().__init__()
        self.cpus = cpus
        self.reactor = reactor
        self.workdir = workdir
        self.settings = settings
        self.port = freePort()
        self.adminPort = freePort()
        self.logPath = os.path.join(workdir, f"broker-{self.port}.log")

    async def start(self):
        config = os.path.join(self.workdir, f"broker-{self.port}.toml")
        with open(config, "w") as f:
            f.write(self.CONFIG.format(workdir=self.workdir, admin=self.adminPort,
                                       port=self.port, key=KEY, hub=HUB,
                                       extra="\n".join(self.settings)))
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        with open(self.logPath, "wb") as log:
            self.reactor.spawnProcess(
                self, twistd, [twistd, "-n", "--pidfile=",
                               *os.environ.get("BENCH_TWISTD_ARGS", "").split(),
                               "broker", "--config", config],
                env=os.environ, path=self.workdir,
                childFDs={0: "w", 1: log.fileno(), 2: log.fileno()})
        if self.cpus:
            os.sched_setaffinity(self.pid, self.cpus)
        deadline = time.monotonic() + 30
        while True:
            try:
                return await self.stats()
            except Exception:
                if not self.running or time.monotonic() > deadline:
                    raise RuntimeError(f"the broker did not start; see {self.logPath}:\n"
                                       + self.logTail())
                await task.deferLater(self.reactor, 0.1)

    def logTail(self, lines=20):
        with open(self.logPath, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

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


class Publisher(WebSocketClient):
    """
    Publishes stamped 64-byte text messages to the group over
    C{json.webpubsub.azure.v1}, without ackIds.

    It is itself a member of the group, joined after every subscriber, so
    the server writes it each message last: the echo says the message has
    been written to every subscriber.  Flow control windows on echoes; acks
    would not do, since the broker acks a publish once its fan-out is
    queued, not written.

    @ivar window: messages kept in flight while running; 0 when stopped.
    """

    collect = True

    def __init__(self, request):
        super().__init__(request)
        self.welcomed = defer.Deferred()
        self.sent = 0
        self.echoed = 0
        self.window = 0
        self.unexpected = []

    def dataFrames(self, count, payloads):
        for p in payloads:
            if p.startswith(b'{"type":"message"'):
                self.echoed += 1
            elif b'"event":"connected"' in p and not self.welcomed.called:
                self.welcomed.callback(self)
            else:
                self.unexpected.append(p[:200])
        if self.window:
            self._fill()

    def start(self, window):
        self.window = window
        self._fill()

    def stop(self):
        self.window = 0

    def publish(self):
        self.transport.write(self._frame())

    def _fill(self):
        n = self.window - (self.sent - self.echoed)
        if n > 0:
            self.transport.write(b"".join([self._frame() for _ in range(n)]))

    def _frame(self):
        self.sent += 1
        return clientFrame(b'{"type":"sendToGroup","group":"%s","dataType":"text","data":"%s"}'
                           % (GROUP.encode("ascii"), stampedPayload(self.sent)))


def ownCpu():
    t = os.times()
    return t.user + t.system


class Load:
    """
    The client side: subscriber worker processes and, in this process, the
    publisher.  Its CPU is the workers' plus this process's.
    """

    def __init__(self, reactor, broker, workers, workdir):
        self.reactor = reactor
        self.broker = broker
        self.workdir = workdir
        self.workers = [WorkerProcess() for _ in range(workers)]
        self.publisher = None

    def start(self):
        token = self.broker.token()
        for w in self.workers:
            args = [sys.executable, os.path.abspath(__file__), "--worker",
                    str(self.broker.port), token]
            self.reactor.spawnProcess(w, sys.executable, args, env=os.environ,
                                      childFDs={0: "w", 1: "r", 2: 2})

    async def stop(self):
        await defer.gatherResults(
            [defer.ensureDeferred(w.stop(self.reactor)) for w in self.workers])

    def cpu(self):
        return ownCpu() + sum(cpuSeconds(w.pid) for w in self.workers)

    async def each(self, command):
        """
        Send C{command(worker)} to every worker; the list of replies.
        """
        return await defer.gatherResults(
            [w.command(command(w)) for w in self.workers], consumeErrors=True)

    async def connect(self, total):
        """
        Spread C{total} more subscribers over the workers.

        @return: (seconds, failures, first failure message); the seconds are
            the slowest worker's, which leaves out worker start-up.
        """
        base, extra = divmod(total, len(self.workers))
        shares = {w: base + (i < extra) for i, w in enumerate(self.workers)}
        for w, n in shares.items():
            w.share += n
        replies = await self.each(lambda w: f"connect {shares[w]}")
        failed = sum(r["failed"] for r in replies)
        first = next((r["firstFailure"] for r in replies if r["firstFailure"]), None)
        return max(r["seconds"] for r in replies), failed, first

    async def connectPublisher(self):
        request = openingHandshake(self.broker.port,
                                   self.broker.token(roles=["webpubsub.sendToGroup"]),
                                   "json.webpubsub.azure.v1")
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.broker.port)
        pub = await connectProtocol(endpoint, Publisher(request))
        await pub.ready
        self.publisher = await pub.welcomed.addTimeout(10, self.reactor)
        return self.publisher

    async def frames(self, command="count"):
        return sum(r["frames"] for r in await self.each(lambda w: command))

    async def reach(self, published, timeout):
        """
        Wait until every subscriber has received C{published} messages.

        @return: the number of deliveries still missing at timeout (0).
        """
        replies = await self.each(lambda w: f"reach {published * w.share} {timeout}")
        return sum(max(0, published * w.share - r["frames"])
                   for w, r in zip(self.workers, replies))

    async def samples(self):
        """
        Dump every worker's latency samples; all of them, in ms, ascending.
        """
        merged = array("q")
        for w in self.workers:
            path = os.path.join(self.workdir, f"samples-{w.pid}")
            await w.command(f"dump {path}")
            with open(path, "rb") as f:
                merged.frombytes(f.read())
            os.remove(path)
        return sorted(ns / 1e6 for ns in merged)


# -- the runs -----------------------------------------------------------------


class Window:
    """
    CPU and wall time over one measurement window.
    """

    def __init__(self, broker, load):
        self.broker = broker
        self.load = load
        self.wall = time.monotonic()
        self.server = broker.cpu()
        self.client = load.cpu()

    def close(self):
        self.wall = time.monotonic() - self.wall
        self.server = self.broker.cpu() - self.server
        self.client = self.load.cpu() - self.client
        return self

    def __str__(self):
        return (f"CPU server {self.server:.2f} s ({self.server / self.wall:.0%}), "
                f"clients {self.client:.2f} s ({self.client / self.wall:.0%}), "
                f"wall {self.wall:.2f} s")


def ms(x):
    return f"{x:.2f} ms"


class Results:
    """
    The rows of the summary table and the CPU of every measured window.
    """

    def __init__(self):
        self.rows = []          # (figure, measured, target, ok or None)
        self.cpu = []           # (server, client) seconds per measured window

    def add(self, figure, measured, target="", ok=None):
        self.rows.append((figure, measured, target, ok))

    def window(self, w):
        self.cpu.append((w.server, w.client))
        print(f"    {w}")


async def fanoutRuns(reactor, opts, workdir, n, results):
    """
    Throughput, then one-in-flight latency, with C{n} subscribers on one
    fresh broker.
    """
    print(f"\n{n} subscribers in group {GROUP!r}")
    broker = BrokerProcess(reactor, workdir, opts.set, opts.serverCPUs)
    await broker.start()
    load = Load(reactor, broker, opts.workers, workdir)
    try:
        load.start()
        seconds, failed, why = await load.connect(n)
        print(f"  connected {n - failed} subscribers in {seconds:.2f} s"
              + (f"; {failed} FAILED: {why}" if failed else ""))
        pub = await load.connectPublisher()
        if await throughputRun(reactor, opts, broker, load, n, results):
            await latencyRun(opts, broker, load, n, results)
        if pub.unexpected:
            print(f"  the publisher got {len(pub.unexpected)} unexpected frames, e.g. "
                  f"{pub.unexpected[0]!r}")
    finally:
        await load.stop()
        await broker.stop(reactor)


async def throughputRun(reactor, opts, broker, load, n, results):
    """
    Keep a window of messages in flight and count deliveries at the
    subscribers over a measured window after a warm-up.

    @return: whether every message reached every subscriber.
    """
    pub = load.publisher
    window = opts.window or max(2, 8192 // n)
    pub.start(window)
    await task.deferLater(reactor, opts.warmup)
    f0 = await load.frames("reset")
    sent0 = pub.sent
    w = Window(broker, load)
    await task.deferLater(reactor, opts.seconds)
    f1 = await load.frames("count")
    w.close()
    published = pub.sent - sent0
    pub.stop()
    lat = await load.samples()
    missing = await load.reach(pub.sent, 30)
    stats = await broker.stats()
    rate = (f1 - f0) / w.wall
    print(f"  throughput, {PAYLOAD_SIZE}-byte messages, {window} in flight: "
          f"{rate:,.0f} deliveries/s ({published / w.wall:,.0f} messages/s published)")
    print(f"    latency under load p50 {ms(percentile(lat, 50))}, "
          f"p99 {ms(percentile(lat, 99))} ({len(lat):,} samples, one per read)")
    print(f"    after draining: {missing} deliveries missing, "
          f"{stats['slowConsumerDrops']} slow-consumer drops")
    results.window(w)
    target = n == 100
    results.add(f"deliveries/s, {n} subscribers, {PAYLOAD_SIZE} B", f"{rate:,.0f}",
                ">= 150,000" if target else "", rate >= 150_000 if target else None)
    return not missing


async def latencyRun(opts, broker, load, n, results):
    """
    One message in flight: publish, wait until every subscriber has it,
    publish the next.  Every delivery is timed.
    """
    pub = load.publisher
    for i in range(opts.warmupMessages + opts.messages):
        if i == opts.warmupMessages:
            await load.frames("reset")
            w = Window(broker, load)
        pub.publish()
        if await load.reach(pub.sent, 10):
            print(f"  one message in flight: message {pub.sent} was not delivered "
                  f"to every subscriber within 10 s; giving up")
            return
    w.close()
    lat = await load.samples()
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    print(f"  one message in flight, {opts.messages} messages: latency p50 {ms(p50)}, "
          f"p99 {ms(p99)}, max {ms(lat[-1])} ({len(lat):,} deliveries)")
    results.window(w)
    target = n == 1000
    results.add(f"p50 latency, {n} subscribers, 1 in flight", ms(p50))
    results.add(f"p99 latency, {n} subscribers, 1 in flight", ms(p99),
                "< 50 ms" if target else "", p99 < 50 if target else None)


async def memoryRuns(reactor, opts, workdir, results):
    """
    Server RSS per idle connection, on a fresh broker.  A few connections
    are made before the baseline so that one-time costs (imports, caches)
    are not charged to connections.
    """
    warm = 10
    steps = [s for s in opts.idle if s > warm]
    print(f"\nidle connections: {', '.join(f'{s:,}' for s in steps)}")
    broker = BrokerProcess(reactor, workdir, opts.set, opts.serverCPUs)
    await broker.start()
    load = Load(reactor, broker, opts.workers, workdir)
    try:
        load.start()
        await load.connect(warm)
        await task.deferLater(reactor, 1)
        base = broker.rss()
        print(f"  baseline RSS {base / 1024:.1f} MiB with {warm} connections")
        have = warm
        for total in steps:
            w = Window(broker, load)
            seconds, failed, why = await load.connect(total - have)
            w.close()
            made, have = total - have - failed, total
            # Let the last handshakes settle before reading the RSS.
            await task.deferLater(reactor, 2)
            rss = broker.rss()
            stats = await broker.stats()
            per = (rss - base) / (stats["connections"] - warm)
            print(f"  {stats['connections']:,} connections open: RSS {rss / 1024:.1f} MiB, "
                  f"{per:.1f} KiB per connection; {made:,} more connected in "
                  f"{seconds:.1f} s ({made / seconds:,.0f}/s)"
                  + (f"; {failed} FAILED: {why}" if failed else ""))
            results.window(w)
            results.add(f"RSS per idle connection, {total:,} connections", f"{per:.1f} KiB",
                        "<= 10 KiB", per <= 10)
    finally:
        await load.stop()
        await broker.stop(reactor)


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


def report(opts, results, started):
    """
    The summary table, the targets beside the figures.
    """
    if not results.rows:
        return
    width = max(len(r[0]) for r in results.rows)
    kind = "quick smoke run, not comparable with the targets" if opts.quick else "full run"
    print(f"\nResults ({kind})")
    print(f"  {'figure':<{width}}  {'measured':>14}  {'target':<11} ")
    for figure, measured, target, ok in results.rows:
        verdict = "" if ok is None else ("met" if ok else "MISSED")
        print(f"  {figure:<{width}}  {measured:>14}  {target:<11} {verdict}")
    server = sum(s for s, _ in results.cpu)
    client = sum(c for _, c in results.cpu)
    print(f"  CPU over all measured windows: server {server:.2f} s, clients {client:.2f} s "
          f"(clients/server {client / server:.2f}; the load must stay below 1)")
    print(f"  total wall time {time.monotonic() - started:.0f} s")


async def main(reactor, opts):
    started = time.monotonic()
    # The broker needs one descriptor per connection, and so do the workers
    # between them.
    limit = raiseFileLimit()
    if opts.idle and opts.idle[-1] + 100 > limit:
        opts.idle = [s for s in opts.idle if s + 100 <= limit] or [limit - 100]
        print(f"note: RLIMIT_NOFILE hard limit is {limit}; idle steps cut to {opts.idle}")
    opts.serverCPUs = pinCPUs() if opts.pin else None
    print(f"broker fan-out benchmark: CPython {platform.python_version()}, Twisted "
          f"{version('twisted')}, autobahn {version('autobahn')}, {os.cpu_count()} CPUs, "
          f"{opts.workers} subscriber worker process(es)"
          + (f"; broker pinned to CPU {min(opts.serverCPUs)}, load to the others"
             if opts.serverCPUs else ""))
    workdir = workdirUntilShutdown(reactor, "broker-bench-", opts.keep)
    results = Results()
    for n in opts.subscribers:
        await fanoutRuns(reactor, opts, workdir, n, results)
    if opts.idle:
        await memoryRuns(reactor, opts, workdir, results)
    report(opts, results, started)


def parseArgs(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run with small numbers (about 20 s)")
    p.add_argument("--workers", type=int, default=2,
                   help="subscriber worker processes (default 2)")
    p.add_argument("--window", type=int, default=0,
                   help="messages in flight in the throughput run "
                        "(default max(2, 8192 / subscribers))")
    p.add_argument("--subscribers", type=int, nargs="*", metavar="N",
                   help="group sizes to run (default 100 1000; none to skip)")
    p.add_argument("--idle", type=int, nargs="*", metavar="N",
                   help="idle connection counts, ascending (default 1000 10000; none to skip)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra [webpubsub] setting for the broker, in TOML, "
                        "e.g. --set fanout_chunk=4096 (repeatable)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin the broker and the load to separate CPUs")
    p.add_argument("--keep", action="store_true", help="keep the broker logs")
    opts = p.parse_args(argv)
    if opts.quick:
        subscribers, opts.seconds, opts.warmup = [10, 100], 2.0, 0.5
        opts.messages, opts.warmupMessages, idle = 30, 5, [100, 1000]
    else:
        subscribers, opts.seconds, opts.warmup = [100, 1000], 8.0, 2.0
        opts.messages, opts.warmupMessages, idle = 200, 20, [1000, 10000]
    if opts.subscribers is None:
        opts.subscribers = subscribers
    if opts.idle is None:
        opts.idle = idle
    opts.idle.sort()
    return opts


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        runWorker(int(sys.argv[2]), sys.argv[3])
    else:
        task.react(main, [parseArgs(sys.argv[1:])])
