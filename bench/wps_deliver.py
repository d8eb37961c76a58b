"""
The Python a Web PubSub delivery costs, with the kernel taken out:
C{python bench/wps_deliver.py [--subscribers N] [--deliveries M] [--rounds R]}.

L{fanout} and L{wps_publish} time deliveries whose C{send} is a real
loopback C{send} (4-6 µs of kernel time on this project's VMs, varying
by 10 % from minute to minute), so a change of 0.2 µs in the broker's own
Python per delivery is lost in them.  This sets up the Web PubSub face in
this process with N real subscribers (real sockets, handshakes, group
joins, one real fan-out so that every connection has found its socket),
then swaps each connection's socket for one whose C{send} is C{len}: the
bytes go nowhere, everything else is the broker's path.  It then times
fan-outs of one 64-byte group message to the N connections (a new
L{Delivery} each, through the core's L{Fanout}, the reactor turn ended
after each as L{WriteBatch} ends it) and prints nanoseconds per delivery.
Compare two checkouts by running each one's copy alternately; pin it
(C{taskset -c 0}) for steadier figures.  It asserts nothing.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from twisted.internet import reactor                                    # noqa: E402
from twisted.internet.endpoints import TCP4ServerEndpoint               # noqa: E402

from broker import config                                               # noqa: E402
from broker.auth.tokens import makeClientToken                          # noqa: E402
from broker.core.message import FROM_GROUP, Delivery, Message, Target   # noqa: E402
from broker.core.router import Core                                     # noqa: E402
from broker.webpubsub.site import makeFactory, makeSite                 # noqa: E402
from wps_publish import GROUP, HUB, KEY, PAYLOAD, connect, drain, spin  # noqa: E402


class NowhereSocket:
    """
    A socket whose C{send} takes everything at once and goes nowhere.
    """

    send = staticmethod(len)


def writeNowhere(connections):
    """
    Swap the socket of each of C{connections} (direct writers,
    L{broker.core.directwrite}, that have found their socket) for a
    L{NowhereSocket}; return the function that ends a reactor turn as
    their L{WriteBatch} would (its scheduled flush run now).
    """
    batch = None
    for conn in connections:
        if getattr(conn, "_outSocket", None) is None:
            raise SystemExit(f"{conn!r} writes through its transport: nothing to measure")
        conn._outSocket.socket = NowhereSocket()
        batch = conn._outBatch

    def endOfTurn():
        if batch._call is not None:
            batch._call.cancel()
            batch._call = None
        batch.flush()
    return endOfTurn


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subscribers", type=int, default=100)
    p.add_argument("--deliveries", type=int, default=2_000_000,
                   help="deliveries per round (default 2,000,000)")
    p.add_argument("--rounds", type=int, default=7)
    opts = p.parse_args()

    settings = config.parse("[webpubsub]\n")
    core = Core(reactor, fanoutChunk=settings["webpubsub"]["fanout_chunk"])
    factory = makeFactory(core, settings["webpubsub"], [KEY], reactor)
    core.startService()
    listening = []
    TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        makeSite(factory)).addCallback(listening.append)
    spin(lambda: listening)
    port = listening[0].getHost().port
    token = makeClientToken(KEY, f"http://127.0.0.1:{port}/client/hubs/{HUB}", groups=[GROUP])
    subs = [connect(port, token)[0] for _ in range(opts.subscribers)]
    hub = core.hub(HUB)
    spin(lambda: len(hub._groups.get(GROUP, ())) == opts.subscribers)
    target = Target(Target.GROUP, GROUP)
    message = Message("text", PAYLOAD)

    def fanOut():
        delivery = Delivery(message, FROM_GROUP, GROUP, "publisher", None)
        core.fanout.deliver(hub.receivers(target), delivery, hub.stats)

    # One real fan-out: each connection finds its socket (and its batch).
    fanOut()
    for _ in range(20):
        reactor.iterate(0)
    drain(subs)
    endOfTurn = writeNowhere(list(hub._groups[GROUP].values()))

    fanOuts = max(1, opts.deliveries // opts.subscribers)
    print(f"Web PubSub delivery, Python only: {opts.subscribers} subscribers, {fanOuts:,} "
          f"fan-outs a round, CPython {sys.version.split()[0]}")
    figures = []
    for r in range(opts.rounds):
        start = time.perf_counter()
        for _ in range(fanOuts):
            fanOut()
            endOfTurn()
        per = (time.perf_counter() - start) / (fanOuts * opts.subscribers)
        figures.append(per)
        print(f"  round {r + 1}: {per * 1e9:6.0f} ns a delivery")
    figures.sort()
    print(f"  median: {figures[len(figures) // 2] * 1e9:.0f} ns a delivery")
    for s in subs:
        s.close()


if __name__ == "__main__":
    main()
