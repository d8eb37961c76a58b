"""
What Web PubSub's cluster mode costs on the hot path, measured in one
process against a real redis-server (spawned here on a loopback port):

  - history: group publishes stamped in Redis (broker/webpubsub/redishistory.py,
    one Lua call each, a window of them in flight) against the single-node
    ring;
  - reliable links: the fan-out of one message to N reliable links
    (ReliableLink.deliver, frames written to a null transport), alone and
    with what keeping every unacknowledged message in Redis would add (so
    a link could be recovered after its node died): one RPUSH per delivery,
    or one Lua call per message carrying every link's key.

It prints broker-side CPU microseconds per operation (this process's
user+system time; Redis's own CPU is not counted) and asserts nothing.

Usage: python bench/wps_cluster.py [--links N] [--messages M] [--publishes P]
"""

import argparse
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, reactor, task  # noqa: E402

from broker.cluster.node import Cluster  # noqa: E402
from broker.cluster.redis import RedisClient  # noqa: E402
from broker.core.message import FROM_GROUP, TEXT, Delivery, Message, Target  # noqa: E402
from broker.webpubsub.history import HubHistory  # noqa: E402
from broker.webpubsub.redishistory import RedisHubHistory  # noqa: E402
from broker.webpubsub.reliable import ReliableLinks  # noqa: E402

# One Lua call per message: append each link's frame to its list.
_JOURNAL = """
for i, k in ipairs(KEYS) do
  redis.call('RPUSH', k, ARGV[1] .. ARGV[i + 1])
end
return #KEYS
"""


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class NullProtocol:
    def sendMessage(self, frame):
        pass


def freePort():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@defer.inlineCallbacks
def measure(label, n, run):
    start, wall = cpu(), time.perf_counter()
    yield run()
    used, wall = cpu() - start, time.perf_counter() - wall
    print(f"{label:58s} {used / n * 1e6:8.2f} µs CPU/op  {n / wall:10,.0f} ops/s wall")
    return used / n


@defer.inlineCallbacks
def main(args):
    port = freePort()
    tmp = tempfile.mkdtemp()
    server = subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server",
                               "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", tmp],
                              stdout=subprocess.DEVNULL)
    client = RedisClient(reactor, f"redis://127.0.0.1:{port}")
    cluster = Cluster(reactor, client, prefix="bench", nodeId="bench")
    client.startService()
    try:
        while not client.connected:
            yield task.deferLater(reactor, 0.05, lambda: None)
        if args.only in ("", "history"):
            yield history(args, cluster)
        if args.only in ("", "links"):
            yield links(args, client)
    finally:
        yield client.stopService()
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        reactor.stop()


@defer.inlineCallbacks
def history(args, cluster):
    n, window = args.publishes, 64
    message = Message(TEXT, b"x" * 64)
    ring = HubHistory(1000, 3600.0, 10000, reactor.seconds)
    target = Target(Target.GROUP, "g")

    def memory():
        for _ in range(n):
            ring.record(target, Delivery(message, FROM_GROUP, "g"))
        return defer.succeed(None)
    yield measure("history stamp, single-node ring", n, memory)
    remote = RedisHubHistory(cluster, "chat", 1000, 3600.0, 10000)

    @defer.inlineCallbacks
    def redis():
        inflight = []
        for _ in range(n):
            inflight.append(remote.stamp(target, Delivery(message, FROM_GROUP, "g")))
            if len(inflight) >= window:
                yield defer.DeferredList(inflight)
                inflight = []
        yield defer.DeferredList(inflight)
    yield measure(f"history stamp in Redis (Lua, {window} in flight)", n, redis)
    print(f"  (unstamped: {remote.unstamped})")


@defer.inlineCallbacks
def links(args, client):
    nLinks, nMessages = args.links, args.messages
    registry = ReliableLinks(reactor, 30.0, 1 << 40)
    all_ = [registry.new("chat", f"c{i}", None) for i in range(nLinks)]
    for link in all_:
        link.protocol = NullProtocol()
    message = Message(TEXT, b"x" * 64)
    deliveries = nLinks * nMessages

    def plain():
        for _ in range(nMessages):
            d = Delivery(message, FROM_GROUP, "g")
            for link in all_:
                link.deliver(d)
        for link in all_:
            link.ack(link._sequence)
        return defer.succeed(None)
    base = yield measure(f"reliable deliver, {nLinks} links", deliveries, plain)

    keys = [f"bench:wps:j:{i}" for i in range(nLinks)]

    @defer.inlineCallbacks
    def perDelivery():
        for _ in range(nMessages):
            d = Delivery(message, FROM_GROUP, "g")
            pending = []
            for link, key in zip(all_, keys):
                link.deliver(d)
                pending.append(client.execute("RPUSH", key, link._unacked[link._sequence]))
            yield defer.DeferredList(pending)
        for link in all_:
            link.ack(link._sequence)
    one = yield measure("  + one RPUSH per delivery", deliveries, perDelivery)
    yield client.execute("DEL", *keys)

    @defer.inlineCallbacks
    def perMessage():
        for _ in range(nMessages):
            d = Delivery(message, FROM_GROUP, "g")
            seqs = []
            for link in all_:
                link.deliver(d)
                seqs.append(link._sequence)
            # The message once, and each link's sequenceId.
            yield client.eval(_JOURNAL, keys, [d.message.data] + [b"%d" % s for s in seqs])
        for link in all_:
            link.ack(link._sequence)
    batched = yield measure("  + one Lua call per message (all links' keys)",
                            deliveries, perMessage)
    yield client.execute("DEL", *keys)
    print(f"  journal overhead per delivery: {(one - base) * 1e6:.2f} µs (RPUSH each), "
          f"{(batched - base) * 1e6:.2f} µs (batched); deliver alone {base * 1e6:.2f} µs")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--links", type=int, default=1000)
    p.add_argument("--messages", type=int, default=50)
    p.add_argument("--publishes", type=int, default=20000)
    p.add_argument("--only", choices=("history", "links"), default="")
    p.add_argument("--profile", action="store_true", help="cProfile, top 25 by own time")
    args = p.parse_args()
    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        reactor.callWhenRunning(lambda: main(args))
        reactor.run()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        sys.exit(0)
    reactor.callWhenRunning(lambda: main(args).addErrback(
        lambda f: (f.printTraceback(), reactor.stop())))
    reactor.run()
