"""
Fan-out benchmark for the Web PubSub face, side by side with a peer.

Runs the broker as a real C{twistd broker} process on loopback ports and
drives it over real WebSocket connections:

  - throughput: N subscribers (100 and 1000) in one group, one publisher
    keeping 1 and then 64 messages of 64 bytes in flight; deliveries/s are
    counted at the subscribers;
  - latency: the same N subscribers, one message in flight, each delivered
    to every subscriber before the next is sent; publish-to-deliver latency
    p50/p99 over every delivery;
  - memory: server RSS per idle connection at 1k and 10k connections.

With C{--peer mosquitto} every scenario also runs, in the same run and
interleaved, against Debian's Mosquitto started by the benchmark (MQTT 3.1.1
over WebSocket, QoS 0 subscribers of one topic), and each figure is printed
beside the broker's with their ratio, so that a figure is never compared
across runs.  It prints figures and asserts nothing.

The load must cost less than the server, or the figures measure the client:
its subscribers live in worker processes (L{rawload}: one C{epoll} loop over
raw sockets, the wire of L{wsload}) driven by the controller over
stdin/stdout; the controller runs the publisher.  The broker's subscribers are plain WebSocket clients (bare
payload frames); the publisher uses C{json.webpubsub.azure.v1}.  CPU seconds
of the server and of every client process are printed for each run.

Latency uses C{time.monotonic_ns()}: CLOCK_MONOTONIC is system-wide on Linux,
so the publisher and the subscriber processes read the same clock.

Usage: python bench/fanout.py [--quick] [--peer mosquitto] (see bench/README.md).
"""

import argparse
import os
import platform
import sys
import time
from array import array
from importlib.metadata import version

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from procs import (BrokerProcess, MosquittoProcess, WorkerProcess, cpuSeconds, ownCpu,
                   percentile, pinCPUs, raiseFileLimit, workdirUntilShutdown)
from wsload import (GROUP, PAYLOAD_SIZE, MqttStream, WebSocketClient, clientFrame, mqttConnect,
                    mqttPublish, mqttSubscribe, openingHandshake, stampedPayload)


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


class MqttPublisher(Publisher):
    """
    The same publisher for an MQTT peer: MQTT 3.1.1 over WebSocket, QoS 0
    PUBLISH packets to topic C{GROUP}, itself subscribed to it last, so
    that its echoes window the load as the Web PubSub publisher's do.
    """

    def __init__(self, request):
        super().__init__(request)
        self.stream = MqttStream()
        self.ready.addCallback(self._opened)

    def _opened(self, result):
        self.transport.write(clientFrame(mqttConnect(f"pub-{os.getpid()}"), 0x2)
                             + clientFrame(mqttSubscribe(GROUP), 0x2))
        return result

    def dataFrames(self, count, payloads):
        for kind, body in self.stream.packets(payloads):
            if kind == 3:
                self.echoed += 1
            elif kind == 9 and not self.welcomed.called:
                self.welcomed.callback(self)
            elif kind != 2:
                self.unexpected.append(bytes([kind << 4]) + body[:200])
        if self.window:
            self._fill()

    def _frame(self):
        self.sent += 1
        return clientFrame(mqttPublish(GROUP, stampedPayload(self.sent)), 0x2)


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
        worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rawload.py")
        for w in self.workers:
            args = [sys.executable, worker, str(self.broker.port), token, self.broker.kind]
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
        if self.broker.kind == "mqtt":
            request = openingHandshake(self.broker.port, None, "mqtt", "/mqtt")
            endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.broker.port)
            pub = await connectProtocol(endpoint, MqttPublisher(request))
            await pub.ready
            self.publisher = await pub.welcomed.addTimeout(10, self.reactor)
            return self.publisher
        request = openingHandshake(self.broker.port,
                                   self.broker.token(roles=["webpubsub.sendToGroup"]),
                                   "json.webpubsub.azure.v1")
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.broker.port)
        pub = await connectProtocol(endpoint, Publisher(request))
        await pub.ready
        self.publisher = await pub.welcomed.addTimeout(10, self.reactor)
        return self.publisher

    async def openCount(self):
        """
        Subscribers open now, as the workers count them.
        """
        return sum(r["open"] for r in await self.each(lambda w: "count"))

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


class Figure:
    """
    One row of the summary: the values measured for each server (one per
    round), how to print them, and which way is better.

    @ivar higher: true when a higher value is better (deliveries/s).
    @ivar target: the issue's target for the broker, as (text, predicate).
    """

    def __init__(self, name, unit, higher, target=None):
        self.name = name
        self.unit = unit
        self.higher = higher
        self.target = target
        self.values = {}

    def add(self, server, value):
        self.values.setdefault(server, []).append(value)

    def median(self, server):
        values = sorted(self.values.get(server, ()))
        if not values:
            return None
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    def show(self, value):
        if value is None:
            return "-"
        if self.unit == "/s":
            return f"{value:,.0f}/s"
        return f"{value:.2f} {self.unit}"

    def ratio(self, ours, theirs):
        """
        How far the broker is ahead (> 1) or behind (< 1) of the peer.
        """
        if ours is None or theirs is None or not ours or not theirs:
            return None
        return ours / theirs if self.higher else theirs / ours


class Results:
    """
    The figures of the run, in the order first measured, and the CPU of
    every measured window.
    """

    def __init__(self):
        self.figures = {}
        self.cpu = {}           # server name: [(server, client) seconds per window]

    def add(self, server, name, value, unit, higher, target=None):
        figure = self.figures.get(name)
        if figure is None:
            figure = self.figures[name] = Figure(name, unit, higher, target)
        figure.add(server, value)

    def window(self, server, w):
        self.cpu.setdefault(server, []).append((w.server, w.client))
        print(f"    {w}")


async def fanoutRuns(reactor, opts, workdir, n, results, Server):
    """
    Throughput, then one-in-flight latency, with C{n} subscribers on one
    fresh server.
    """
    broker = Server(reactor, workdir, opts.set, opts.serverCPUs, opts.brokerSettings)
    print(f"\n{Server.name}: {n} subscribers in group {GROUP!r}")
    await broker.start()
    load = Load(reactor, broker, opts.workers, workdir)
    try:
        load.start()
        seconds, failed, why = await load.connect(n)
        print(f"  connected {n - failed} subscribers in {seconds:.2f} s"
              + (f"; {failed} FAILED: {why}" if failed else ""))
        pub = await load.connectPublisher()
        for window in opts.windows:
            if not await throughputRun(reactor, opts, broker, load, n, window, results):
                break
        else:
            await latencyRun(opts, broker, load, n, results)
        if pub.unexpected:
            print(f"  the publisher got {len(pub.unexpected)} unexpected frames, e.g. "
                  f"{pub.unexpected[0]!r}")
    finally:
        await load.stop()
        await broker.stop(reactor)


async def throughputRun(reactor, opts, broker, load, n, window, results):
    """
    Keep C{window} messages in flight (0: the default for C{n}) and count
    deliveries at the subscribers over a measured window after a warm-up.

    @return: whether every message reached every subscriber.
    """
    pub = load.publisher
    window = window or max(2, 8192 // n)
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
    results.window(broker.name, w)
    if f1 > f0 and w.server:
        results.add(broker.name, f"server CPU per delivery, {n} subscribers, {window} in flight",
                    w.server / (f1 - f0) * 1e6, "µs", False)
    target = ("150,000", lambda v: v >= 150_000) if n == 100 and window >= 64 else None
    results.add(broker.name, f"deliveries/s, {n} subscribers, {window} in flight",
                rate, "/s", True, target)
    return not missing


async def latencyRun(opts, broker, load, n, results):
    """
    One message in flight: publish, wait until every subscriber has it,
    publish the next.  Every delivery is timed.
    """
    pub = load.publisher
    # Settle after the throughput run: the server's buffers drained.
    await task.deferLater(load.reactor, 0.5)
    for i in range(opts.warmupMessages + opts.messages):
        if i == opts.warmupMessages:
            await load.frames("reset")
            w = Window(broker, load)
            sent0 = pub.sent
        pub.publish()
        if await load.reach(pub.sent, 10):
            print(f"  one message in flight: message {pub.sent} was not delivered "
                  f"to every subscriber within 10 s; giving up")
            return
    w.close()
    lat = await load.samples()
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    rate = (pub.sent - sent0) * n / w.wall
    if w.server:
        results.add(broker.name, f"server CPU per delivery, {n} subscribers, 1 in flight, "
                    f"one at a time", w.server / ((pub.sent - sent0) * n) * 1e6, "µs", False)
    print(f"  one message in flight, each delivered everywhere before the next, "
          f"{opts.messages} messages: latency p50 {ms(p50)}, p99 {ms(p99)}, "
          f"max {ms(lat[-1])} ({len(lat):,} deliveries, {rate:,.0f}/s)")
    results.window(broker.name, w)
    results.add(broker.name, f"p50 latency, {n} subscribers, 1 in flight", p50, "ms", False)
    target = ("< 50 ms", lambda v: v < 50) if n == 1000 else None
    results.add(broker.name, f"p99 latency, {n} subscribers, 1 in flight", p99, "ms", False,
                target)


async def memoryRuns(reactor, opts, workdir, results, Server):
    """
    Server RSS per idle connection, on a fresh server.  A few connections
    are made before the baseline so that one-time costs (imports, caches)
    are not charged to connections.
    """
    warm = 10
    steps = [s for s in opts.idle if s > warm]
    print(f"\n{Server.name}: idle connections: {', '.join(f'{s:,}' for s in steps)}")
    broker = Server(reactor, workdir, opts.set, opts.serverCPUs, opts.brokerSettings)
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
            connections = await load.openCount()
            per = (rss - base) / (connections - warm)
            print(f"  {connections:,} connections open: RSS {rss / 1024:.1f} MiB, "
                  f"{per:.1f} KiB per connection; {made:,} more connected in "
                  f"{seconds:.1f} s ({made / seconds:,.0f}/s)"
                  + (f"; {failed} FAILED: {why}" if failed else ""))
            results.window(broker.name, w)
            results.add(broker.name, f"RSS per idle connection, {total:,} connections", per,
                        "KiB", False, ("<= 10 KiB", lambda v: v <= 10))
    finally:
        await load.stop()
        await broker.stop(reactor)


def report(opts, results, servers, started):
    """
    The summary table: each figure for every server side by side (medians
    over the rounds), the ratio to the peer, and the issue's targets.
    """
    if not results.figures:
        return
    names = [s.name for s in servers]
    width = max(len(f.name) for f in results.figures.values())
    kind = "quick smoke run, not comparable with the targets" if opts.quick else "full run"
    rounds = f", medians of {opts.rounds} rounds" if opts.rounds > 1 else ""
    print(f"\nResults ({kind}{rounds})")
    header = f"  {'figure':<{width}}" + "".join(f"  {n:>14}" for n in names)
    if len(names) > 1:
        header += f"  {'ratio':>7}"
    print(header + "  target")
    for f in results.figures.values():
        values = [f.median(n) for n in names]
        line = f"  {f.name:<{width}}" + "".join(f"  {f.show(v):>14}" for v in values)
        if len(names) > 1:
            r = f.ratio(values[0], values[1])
            line += f"  {'-' if r is None else f'{r:.2f}x':>7}"
        if f.target and values[0] is not None:
            text, ok = f.target
            line += f"  {text} {'met' if ok(values[0]) else 'MISSED'}"
        print(line)
    if len(names) > 1:
        print(f"  ratio: how far {names[0]} is ahead of {names[1]} (> 1) or behind (< 1); "
              f"for latency and memory, lower is better")
    for name in names:
        cpu = results.cpu.get(name, [])
        server = sum(s for s, _ in cpu)
        client = sum(c for _, c in cpu)
        if server:
            print(f"  {name}: CPU over all measured windows: server {server:.2f} s, clients "
                  f"{client:.2f} s (clients/server {client / server:.2f})")
    print(f"  total wall time {time.monotonic() - started:.0f} s")


async def main(reactor, opts):
    started = time.monotonic()
    # The server needs one descriptor per connection, and so do the workers
    # between them.
    limit = raiseFileLimit()
    if opts.idle and opts.idle[-1] + 100 > limit:
        opts.idle = [s for s in opts.idle if s + 100 <= limit] or [limit - 100]
        print(f"note: RLIMIT_NOFILE hard limit is {limit}; idle steps cut to {opts.idle}")
    opts.serverCPUs = pinCPUs() if opts.pin else None
    if opts.workers is None:
        # One worker per CPU the load has: two on one CPU take turns with
        # each other and with the publisher, and the load, not the server,
        # sets the pace at one message in flight.
        opts.workers = len(os.sched_getaffinity(0)) if opts.serverCPUs else max(
            1, (os.cpu_count() or 2) - 1)
    servers = [BrokerProcess]
    if opts.peer == "mosquitto":
        if not MosquittoProcess.available():
            raise SystemExit(f"--peer mosquitto: no {MosquittoProcess.BINARY} "
                             f"(Debian package mosquitto)")
        servers.append(MosquittoProcess)
    print(f"fan-out benchmark: CPython {platform.python_version()}, Twisted "
          f"{version('twisted')}, autobahn {version('autobahn')}, {os.cpu_count()} CPUs, "
          f"{opts.workers} subscriber worker process(es)"
          + (f"; servers pinned to CPU {min(opts.serverCPUs)}, load to the others"
             if opts.serverCPUs else "")
          + (f"; peer: {opts.peer} (MQTT 3.1.1 over WebSocket, QoS 0)" if opts.peer else ""))
    workdir = workdirUntilShutdown(reactor, "broker-bench-", opts.keep)
    results = Results()
    for r in range(opts.rounds):
        if opts.rounds > 1:
            print(f"\n== round {r + 1} of {opts.rounds}")
        # Interleaved: each figure of every server within minutes of the other.
        for n in opts.subscribers:
            for Server in servers:
                await fanoutRuns(reactor, opts, workdir, n, results, Server)
        if opts.idle:
            for Server in servers:
                await memoryRuns(reactor, opts, workdir, results, Server)
    report(opts, results, servers, started)


def parseArgs(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run with small numbers (about 20 s per server)")
    p.add_argument("--peer", choices=["mosquitto"],
                   help="also run every scenario against this server, in the same run, "
                        "and print the figures side by side")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat everything, interleaved; medians are reported (default 1)")
    p.add_argument("--workers", type=int, default=None,
                   help="subscriber worker processes (default: one per CPU of the load)")
    p.add_argument("--window", type=int, nargs="*", default=None, metavar="W",
                   help="messages in flight in the throughput runs "
                        "(default: 1 and 64; 0 is max(2, 8192 / subscribers))")
    p.add_argument("--subscribers", type=int, nargs="*", metavar="N",
                   help="group sizes to run (default 100 1000; none to skip)")
    p.add_argument("--idle", type=int, nargs="*", metavar="N",
                   help="idle connection counts, ascending (default 1000 10000; none to skip)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra [webpubsub] setting for the broker, in TOML, "
                        "e.g. --set fanout_chunk=4096 (repeatable)")
    p.add_argument("--poll-spin", type=int, default=0, metavar="US",
                   help="the broker's broker.poll_spin_us (default 0: it sleeps when idle, "
                        "as Mosquitto does)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin the servers and the load to separate CPUs")
    p.add_argument("--keep", action="store_true", help="keep the servers' logs")
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
    # Mosquitto has no inbound rate limits; the broker's default (5,000
    # messages/s per connection) would drop the publisher's messages.
    keys = {line.split("=")[0].strip() for line in opts.set}
    opts.set += [f"{key} = 0" for key in ("max_inbound_messages_per_second",
                                          "max_inbound_bytes_per_second") if key not in keys]
    opts.brokerSettings = [f"poll_spin_us = {opts.poll_spin}"] if opts.poll_spin else []
    opts.windows = opts.window if opts.window is not None else [1, 64]
    return opts


if __name__ == "__main__":
    task.react(main, [parseArgs(sys.argv[1:])])
