"""
What one Web PubSub publish costs the broker in Python, in one process:
C{python bench/wps_publish.py [--subscribers N] [--messages M] [--profile]}.

L{fanout} measures the broker against Mosquitto across processes, where a
publish's time is mostly the kernel's (a loopback C{send} wakes its reader
on the other CPU) and the load's.  This runs the Web PubSub face in this
process over real loopback sockets whose readers are drained between
batches, so nothing else is woken: the figures are the broker's own work
per publish (a frame read, parsed and fanned out to N plain WebSocket
subscribers and the publisher, last, whose echo ends it), C{send}s
included.  Compare two versions by running both, alternately: the
C{send}s cost the same in each.  It asserts nothing.
"""

import argparse
import cProfile
import os
import pstats
import select
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from twisted.internet import reactor                                    # noqa: E402
from twisted.internet.endpoints import TCP4ServerEndpoint               # noqa: E402

from broker import config                                               # noqa: E402
from broker.auth.tokens import makeClientToken                          # noqa: E402
from broker.core.router import Core                                     # noqa: E402
from broker.webpubsub.site import makeFactory, makeSite                 # noqa: E402
from wsload import clientFrame, openingHandshake, readFrames            # noqa: E402

KEY = "bench-key-0123456789abcdef0123456789abcdef"
HUB = "bench"
GROUP = "g"
PAYLOAD = b"x" * 64


def spin(until, limit=5.0):
    deadline = time.monotonic() + limit
    while not until():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        reactor.iterate(0.001)


def connect(port, token, protocol=None):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.send(openingHandshake(port, token, protocol, f"/client/hubs/{HUB}?access_token={token}"))
    s.setblocking(False)
    buf = [b""]

    def answered():
        try:
            buf[0] += s.recv(65536)
        except BlockingIOError:
            pass
        return b"\r\n\r\n" in buf[0]

    spin(answered)
    if not buf[0].startswith(b"HTTP/1.1 101"):
        raise SystemExit(buf[0][:200])
    return s, buf[0][buf[0].index(b"\r\n\r\n") + 4:]


def drain(sockets):
    frames = 0
    for s in sockets:
        while True:
            try:
                data = s.recv(1 << 20)
            except BlockingIOError:
                break
            frames += readFrames(data)[0]
    return frames


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subscribers", type=int, default=100)
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="print a cProfile of one round")
    opts = p.parse_args()

    # No inbound rate limit: the publisher sends faster than its default.
    settings = config.parse("[webpubsub]\nmax_inbound_messages_per_second = 0\n")
    core = Core(reactor, fanoutChunk=settings["webpubsub"]["fanout_chunk"])
    factory = makeFactory(core, settings["webpubsub"], [KEY], reactor)
    core.startService()
    port = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(makeSite(factory))
    listening = []
    port.addCallback(listening.append)
    spin(lambda: listening)
    port = listening[0].getHost().port
    url = f"http://127.0.0.1:{port}/client/hubs/{HUB}"

    subToken = makeClientToken(KEY, url, groups=[GROUP])
    subs = [connect(port, subToken)[0] for _ in range(opts.subscribers)]
    pubToken = makeClientToken(KEY, url, roles=["webpubsub.sendToGroup"], groups=[GROUP])
    pub, _ = connect(port, pubToken, "json.webpubsub.azure.v1")
    hub = core.hub(HUB)
    spin(lambda: len(hub._groups.get(GROUP, ())) == opts.subscribers + 1)
    drain(subs + [pub])

    frame = clientFrame(b'{"type":"sendToGroup","group":"%s","dataType":"text","data":"%s"}'
                        % (GROUP.encode(), PAYLOAD))
    print(f"Web PubSub publish cost, in process: {opts.subscribers} plain subscribers + the "
          f"publisher ({opts.subscribers + 1} deliveries a publish), {opts.messages} publishes "
          f"a round, CPython {sys.version.split()[0]}")
    figures = []
    for r in range(opts.rounds):
        profiler = cProfile.Profile() if opts.profile and r == opts.rounds - 1 else None
        cpu = 0.0
        for i in range(opts.messages):
            pub.send(frame)     # on loopback, in the server's socket once sent
            start = time.process_time()
            if profiler:
                profiler.enable()
            got = False
            while not got:
                reactor.iterate(0)
                got = bool(select.select([pub], [], [], 0)[0])
            if profiler:
                profiler.disable()
            cpu += time.process_time() - start
            if i % 50 == 49:
                drain(subs + [pub])
        drain(subs + [pub])
        per = cpu / opts.messages
        figures.append(per)
        print(f"  round {r + 1}: {per * 1e6:7.1f} µs CPU a publish, "
              f"{per / (opts.subscribers + 1) * 1e6:.2f} µs a delivery")
        if profiler:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    figures.sort()
    print(f"  median: {figures[len(figures) // 2] * 1e6:.1f} µs CPU a publish")
    for s in subs + [pub]:
        s.close()


if __name__ == "__main__":
    main()
