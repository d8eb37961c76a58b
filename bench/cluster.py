"""
Cluster benchmark: Web PubSub fan-out over several broker processes joined
by a real redis-server, on this machine.

  - fan-out throughput with worker processes: one C{twistd -n broker} with
    C{cluster.workers = N} (N = 1, 2, 4) sharing one port, S subscribers of
    one group connected to it (the kernel spreads them over the workers),
    one publisher sending 64-byte text messages with a window of messages
    in flight; deliveries/s are counted at the subscribers.  One broker on
    the in-memory engine is the baseline;
  - the same with separate nodes (one twistd each, on its own port, the
    subscribers spread evenly, the publisher on the first), which puts an
    exact share of the subscribers on every node;
  - the Redis hop: two nodes, subscribers on both, one message in flight;
    publish-to-deliver latency p50/p99 on the publisher's node and on the
    other node, whose difference is what the hop through Redis adds.

The subscriber load runs in client processes (see bench/fanout.py, whose
client this reuses).  It prints figures and asserts nothing.  On a 2-core
machine the brokers, Redis and the load share the two cores: more
processes than cores measure the overhead of the cluster, not its scaling.

Usage: python bench/cluster.py [--quick] [--workers 1 2 4] [--nodes 2 4]
       [--subscribers S]
"""

import argparse
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from importlib.metadata import version

from twisted.internet import defer, task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fanout import Load, ms  # noqa: E402  (the fan-out benchmark's load)
from procs import (BrokerProcess, ChildProcess, cpuSeconds, freePort,  # noqa: E402
                   percentile, raiseFileLimit)
from wsload import GROUP, HUB, PAYLOAD_SIZE  # noqa: E402


class RedisProcess(ChildProcess):
    def __init__(self, reactor, workdir):
        super().__init__()
        self.reactor = reactor
        self.workdir = workdir
        self.port = freePort()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    async def start(self):
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        log = open(os.path.join(self.workdir, "redis.log"), "wb")
        self.reactor.spawnProcess(
            self, exe, [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", self.workdir],
            env=os.environ, childFDs={0: "w", 1: log.fileno(), 2: log.fileno()})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                await task.deferLater(self.reactor, 0.05)
        raise RuntimeError("redis-server did not start")

    def cpu(self):
        return cpuSeconds(self.pid)


class NodeProcess(BrokerProcess):
    """
    A broker node: the fan-out benchmark's broker plus a [cluster] section.
    """

    CONFIG = BrokerProcess.CONFIG.replace(
        "[webpubsub]\n", "{cluster}\n[webpubsub]\n")

    def __init__(self, reactor, workdir, redisURL, nodeId):
        super().__init__(reactor, workdir)
        # Web PubSub only: the other faces' listeners and timers stay out.
        self.cluster = "[iot]\nenabled = false\n"
        if redisURL:
            self.cluster += (f'[cluster]\nredis_url = "{redisURL}"\nprefix = "bench"\n'
                             f'node_id = "{nodeId}"\n')

    async def start(self):
        # BrokerProcess.start formats CONFIG with fixed names; add ours.
        self.CONFIG = self.CONFIG.replace("{cluster}", self.cluster)
        return await super().start()


def childPids(pid):
    """
    The processes whose parent is C{pid} (a supervisor's workers).
    """
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if int(f.read().rpartition(b")")[2].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


class WorkersProcess(NodeProcess):
    """
    One broker whose supervisor runs C{workers} worker processes on one
    shared port; its CPU is the supervisor's and the workers'.
    """

    def __init__(self, reactor, workdir, redisURL, workers):
        super().__init__(reactor, workdir, redisURL, "w")
        if workers > 1:
            self.cluster += f"workers = {workers}\n"
        self.workers = workers

    async def start(self):
        stats = await super().start()
        # Every worker is ready once the shared port has answered from each.
        deadline = time.monotonic() + 30
        while len(childPids(self.pid)) < (self.workers if self.workers > 1 else 0):
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not start")
            await task.deferLater(self.reactor, 0.1)
        await task.deferLater(self.reactor, 1.0)
        return stats

    def cpu(self):
        return sum(cpuSeconds(p) for p in [self.pid] + childPids(self.pid))


class Cluster:
    def __init__(self, reactor, workdir, nodes, redis, workers=None):
        self.reactor = reactor
        self.redis = redis
        url = redis.url if redis else None
        if workers is not None:
            self.nodes = [WorkersProcess(reactor, workdir, url, workers)]
            self.loads = [Load(reactor, self.nodes[0], max(1, min(workers, 2)), workdir)]
        else:
            self.nodes = [NodeProcess(reactor, workdir, url, f"n{i}") for i in range(nodes)]
            self.loads = [Load(reactor, n, 1, workdir) for n in self.nodes]

    async def start(self, subscribers):
        for n in self.nodes:
            await n.start()
        for load in self.loads:
            load.start()
        base, extra = divmod(subscribers, len(self.nodes))
        results = await defer.gatherResults([
            defer.ensureDeferred(load.connect(base + (i < extra)))
            for i, load in enumerate(self.loads)])
        failed = sum(r[1] for r in results)
        if failed:
            print(f"    {failed} subscribers FAILED to connect: "
                  + next(r[2] for r in results if r[2]))
        self.publisher = await self.loads[0].connectPublisher()
        # Let every node's directory and subscriptions settle.
        await task.deferLater(self.reactor, 0.5)

    async def stop(self):
        for load in self.loads:
            await load.stop()
        for n in self.nodes:
            await n.stop(self.reactor)

    async def frames(self, command="count"):
        return sum(await self.perNode(command))

    async def perNode(self, command="count"):
        return [await load.frames(command) for load in self.loads]

    async def reach(self, published, timeout):
        return sum([await load.reach(published, timeout) for load in self.loads])

    def serverCPU(self):
        return sum(n.cpu() for n in self.nodes) + (self.redis.cpu() if self.redis else 0)

    def clientCPU(self):
        return sum(load.cpu() for load in self.loads)


async def throughput(reactor, opts, workdir, nodes, engine, redis, workers=None):
    if workers is not None:
        label = f"{workers} worker{'s' if workers > 1 else ''}, {engine} engine"
    else:
        label = f"{nodes} nodes, {engine} engine"
    c = Cluster(reactor, workdir, nodes, redis if engine == "redis" else None, workers)
    try:
        await c.start(opts.subscribers)
        pub = c.publisher
        window = opts.window or max(2, 8192 // opts.subscribers)
        pub.start(window)
        await task.deferLater(reactor, opts.warmup)
        per0 = await c.perNode("reset")
        f0 = sum(per0)
        sent0, wall0 = pub.sent, time.monotonic()
        s0, k0 = c.serverCPU(), c.clientCPU()
        await task.deferLater(reactor, opts.seconds)
        per = await c.perNode("count")
        f1 = sum(per)
        wall = time.monotonic() - wall0
        server, client = c.serverCPU() - s0, c.clientCPU() - k0
        published = pub.sent - sent0
        pub.stop()
        missing = await c.reach(pub.sent, 30)
        rate = (f1 - f0) / wall
        print(f"  {label}: {rate:,.0f} deliveries/s ({published / wall:,.0f} messages/s "
              f"to {opts.subscribers} subscribers); {missing} missing after draining; "
              f"CPU servers+redis {server / wall:.0%}, clients {client / wall:.0%}")
        if len(per) > 1:
            print("    deliveries/s per node: "
                  + ", ".join(f"{(b - a) / wall:,.0f}" for a, b in zip(per0, per)))
        return label, rate, missing
    finally:
        await c.stop()


async def hop(reactor, opts, workdir, redis):
    """
    Two nodes, one message in flight: latency at each node's subscribers.
    """
    c = Cluster(reactor, workdir, 2, redis)
    try:
        await c.start(opts.hopSubscribers)
        pub = c.publisher
        for i in range(opts.warmupMessages + opts.messages):
            if i == opts.warmupMessages:
                await c.frames("reset")
            pub.publish()
            if await c.reach(pub.sent, 10):
                print(f"  message {pub.sent} was not delivered everywhere within 10 s")
                return None
        local = await c.loads[0].samples()
        remote = await c.loads[1].samples()
        out = {}
        for name, lat in (("publisher's node", local), ("other node", remote)):
            out[name] = (percentile(lat, 50), percentile(lat, 99))
            print(f"  {name}: p50 {ms(out[name][0])}, p99 {ms(out[name][1])} "
                  f"({len(lat)} deliveries)")
        return out
    finally:
        await c.stop()


async def main(reactor, opts):
    started = time.monotonic()
    raiseFileLimit()
    print(f"broker cluster benchmark: CPython {platform.python_version()}, Twisted "
          f"{version('twisted')}, txredisapi {version('txredisapi')}, {os.cpu_count()} CPUs")
    workdir = tempfile.mkdtemp(prefix="broker-cluster-bench-")
    redis = RedisProcess(reactor, workdir)

    async def cleanup():
        await defer.gatherResults(
            [defer.ensureDeferred(p.stop(reactor)) for p in list(ChildProcess.live)])
        shutil.rmtree(workdir, ignore_errors=True)

    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(cleanup()))
    await redis.start()
    print(f"\nfan-out, {opts.subscribers} subscribers in group {GROUP!r} of hub {HUB!r}, "
          f"{PAYLOAD_SIZE}-byte messages, {opts.seconds:.0f} s windows")
    rows = [await throughput(reactor, opts, workdir, 1, "memory", None, workers=1)]
    for n in opts.workers:
        rows.append(await throughput(reactor, opts, workdir, 1, "redis", redis, workers=n))
    for n in opts.nodes:
        rows.append(await throughput(reactor, opts, workdir, n, "redis", redis))
    print(f"\nthe Redis hop: 2 nodes, {opts.hopSubscribers} subscribers, one message in "
          f"flight, {opts.messages} messages")
    lat = await hop(reactor, opts, workdir, redis)
    print("\nResults")
    for label, rate, missing in rows:
        print(f"  deliveries/s, {label:<24} {rate:>12,.0f}"
              + (f"  ({missing} missing)" if missing else ""))
    if lat:
        (l50, l99), (r50, r99) = lat["publisher's node"], lat["other node"]
        print(f"  added latency of the Redis hop: p50 {ms(r50 - l50)}, p99 {ms(r99 - l99)}")
    print(f"  total wall time {time.monotonic() - started:.0f} s")


def parseArgs(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run (about 30 s)")
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4],
                   help="worker counts of one broker on the Redis engine (default 1 2 4)")
    p.add_argument("--nodes", type=int, nargs="*", default=[2, 4],
                   help="counts of separate nodes on the Redis engine (default 2 4)")
    p.add_argument("--subscribers", type=int, default=None,
                   help="subscribers in the group (default 1000; quick 100)")
    p.add_argument("--window", type=int, default=0,
                   help="messages in flight (default max(2, 8192 / subscribers))")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.seconds, opts.warmup, opts.messages, opts.warmupMessages = 2.0, 0.5, 30, 5
        opts.subscribers = opts.subscribers or 100
        opts.hopSubscribers = 10
    else:
        opts.seconds, opts.warmup, opts.messages, opts.warmupMessages = 8.0, 2.0, 300, 30
        opts.subscribers = opts.subscribers or 1000
        opts.hopSubscribers = 50
    return opts


if __name__ == "__main__":
    task.react(main, [parseArgs(sys.argv[1:])])
