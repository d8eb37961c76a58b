"""
Hostile-client soak of every face, against a real C{twistd broker}.

For each face (Web PubSub, IoT, peer groups) a fresh broker is started on
loopback ports (pinned to one CPU, the load on the others) and, for the
whole run, at once:

  - N never-reading subscribers (default 20): they connect, authenticate,
    subscribe or join, then stop reading, so that what the broker writes
    them piles up until its output bound drops them; each one dropped is
    counted and replaced, so the pressure lasts the whole run;
  - two well-behaved subscribers that read everything: every message the
    broker accepted (acked, 202, ok) for them must arrive;
  - a publisher flooding 8 KB messages and one flooding 64-byte ones, as
    fast as the broker accepts them (a window of unanswered messages);
  - connection churn: connections opened and dropped at a bounded rate,
    some at once, some mid-handshake, some after it;
  - oversized and malformed input at a bounded rate: frames over the
    face's limit, NaN, 100,000-deep nesting, truncated JSON, garbage
    bytes, and HTTP requests with a huge declared or a streamed chunked
    body; each answer is counted by kind.

Every second it prints the broker's RSS (VmRSS), what was accepted and
delivered and the drops seen; at the end, per face: RSS at baseline (load
connected, before the flood), peak and final, slow-consumer drops from the
broker's /metrics and from the clients' side, refusals by reason,
accepted/received/lost per well-behaved subscriber, and /healthz.  It
asserts nothing.

The faces' loads are in L{soakfaces}, the machinery in L{soaklib}; the
broker process, the WebSocket client, CPU pinning, the IoT HTTP client and
the peer-groups members come from the other benchmarks.

Usage: python bench/soak.py [--quick] [--face F] [--seconds S] (bench/README.md).
"""

import argparse
import os
import platform
import sys
import time

from twisted.internet import defer, task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from procs import pinCPUs, raiseFileLimit, rssKiB, workdirUntilShutdown  # noqa: E402
from soaklib import RSS_LIMIT_MB, Soak, SoakBroker, churn, probes  # noqa: E402
from soakfaces import FACES  # noqa: E402


RATE_LIMITS_OFF = "max_inbound_messages_per_second = 0\nmax_inbound_bytes_per_second = 0\n"


# -- one face's run --------------------------------------------------------------


async def runFace(reactor, opts, workdir, face):
    """
    Start a fresh broker with C{face}'s sections, connect its load, flood
    for C{opts.seconds}, drain, and return the face's figures.
    """
    load = FACES[face](opts, workdir)
    sections = load.sections()
    if not opts.rateLimits:
        # The floods must reach the output bounds, not be held back (and
        # their publishers closed) by the inbound rate limits first.
        sections = RATE_LIMITS_OFF + "".join(
            f"{line}\n{RATE_LIMITS_OFF}" if line in ("[iot]", "[peergroups]") else line + "\n"
            for line in sections.splitlines())
    broker = SoakBroker(reactor, workdir, sections, opts.serverCPUs)
    await broker.start()
    soak = Soak(reactor, opts, broker)
    print(f"\n[{face}] broker pid {broker.pid}, {opts.subscribers} never-reading "
          f"subscribers, {opts.seconds:g} s", flush=True)
    try:
        await load.connect(soak)
        await task.deferLater(reactor, 1.0)
        baseline = rssKiB(broker.pid) / 1024
        print(f"  baseline RSS {baseline:.1f} MB (load connected, before the flood)")
        soak.started = time.monotonic()
        sampler = task.LoopingCall(soak.sample)
        sampler.start(1.0)
        poller = task.LoopingCall(lambda: [p.poll() for p in soak.pools])
        poller.start(0.5)
        running = [load.flood(soak)]
        if opts.churnRate:
            running.append(churn(soak, load.churn(), opts.churnRate))
        if opts.probeInterval:
            running.append(probes(soak, load.probes(), 1.0 / opts.probeInterval))
        await task.deferLater(reactor, opts.seconds)
        soak.running = False
        floodSeconds = time.monotonic() - soak.started
        await defer.DeferredList(running)
        await load.settle(soak)
        drained = await drain(reactor, soak, 20.0)
        poller.stop()
        sampler.stop()
        final = rssKiB(broker.pid) / 1024
        metrics = await broker.metrics()
        health = await broker.get("/healthz")
        load.close(soak)
    finally:
        await broker.stop(reactor)
    return {"face": face, "baseline": baseline, "peak": max(soak.samples + [final]),
            "final": final, "soak": soak, "metrics": metrics, "health": health,
            "drained": drained, "seconds": floodSeconds,
            "brokerDrops": load.brokerDrops(metrics)}


async def drain(reactor, soak, timeout):
    """
    Wait until every well-behaved subscriber has what was accepted for it.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(x.complete() for x in soak.ledgers):
            return True
        await task.deferLater(reactor, 0.2)
    return False


def report(r):
    soak = r["soak"]
    lost = sum(x.lost() for x in soak.ledgers)
    print(f"\n[{r['face']}] results")
    print(f"  RSS: baseline {r['baseline']:.1f} MB, peak {r['peak']:.1f} MB, "
          f"final {r['final']:.1f} MB")
    for name, value in r["brokerDrops"]:
        print(f"  broker: {name} = {value:g}")
    for pool in soak.pools:
        print(f"  clients: {pool.name}: {pool.connected} connected, {pool.drops} seen dropped")
    for name, n in sorted(soak.accepted.items()):
        print(f"  accepted {name}: {n:,} ({n / r['seconds']:,.0f}/s)")
    for x in soak.ledgers:
        print(f"  well-behaved {x.name}: accepted {len(x.accepted):,}, received "
              f"{len(x.received):,}, lost {x.lost()}, duplicates {x.duplicates}"
              + (f", {x.foreign} not from the load's publishers" if x.foreign else "")
              + (", DROPPED by the broker" if x.dropped else ""))
    if not r["drained"]:
        print("  (not every accepted message had arrived 20 s after the flood)")
    for title, counts in (("refusals and closes seen by the load", soak.refusals),
                          ("churn", soak.churn), ("malformed input", soak.probes)):
        print(f"  {title}:")
        for k, n in sorted(counts.items()):
            print(f"    {k}: {n:,}")
    code, body = r["health"]
    print(f"  /healthz after the run: {code} {body.strip()}")
    print(f"  peak RSS under {RSS_LIMIT_MB} MB: {'yes' if r['peak'] < RSS_LIMIT_MB else 'NO'}")
    print(f"  lost: {lost}")
    return lost


async def main(reactor, opts):
    raiseFileLimit()
    opts.serverCPUs = pinCPUs() if opts.pin else None
    if opts.gcEvery:
        # Only the broker reads these (it is spawned with this environment).
        hook = os.path.join(os.path.dirname(os.path.abspath(__file__)), "soakhook")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [hook] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        os.environ["SOAK_GC_EVERY"] = str(opts.gcEvery)
        print(f"diagnostic: the broker runs gc.collect() every {opts.gcEvery:g} s")
    print(f"broker soak: CPython {platform.python_version()}, {os.cpu_count()} CPUs"
          + (f"; broker pinned to CPU {min(opts.serverCPUs)}, load to the others"
             if opts.serverCPUs else ""), flush=True)
    workdir = workdirUntilShutdown(reactor, "broker-soak-", opts.keep)
    results = []
    faces = ["webpubsub", "iot", "peergroups"] if opts.face == "all" else [opts.face]
    for face in faces:
        facedir = os.path.join(workdir, face)
        os.makedirs(facedir)
        results.append(await runFace(reactor, opts, facedir, face))
    print("\nsummary")
    for r in results:
        lost = report(r)
        r["lost"] = lost
    print("\n  face        baseline MB  peak MB  final MB  broker drops  lost")
    for r in results:
        drops = sum(v for _, v in r["brokerDrops"])
        print(f"  {r['face']:<11} {r['baseline']:>11.1f} {r['peak']:>8.1f} {r['final']:>9.1f}"
              f" {drops:>13g} {r['lost']:>5}")


def parseArgs(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--face", choices=("webpubsub", "iot", "peergroups", "all"), default="all")
    p.add_argument("--seconds", type=float, default=60.0, help="flood duration per face")
    p.add_argument("--subscribers", type=int, default=None,
                   help="never-reading subscribers per face (default 20; 5 with --quick)")
    p.add_argument("--quick", action="store_true", help="a ~10 s smoke run per face")
    p.add_argument("--churn-rate", dest="churnRate", type=float, default=20.0,
                   help="connections churned per second (default 20; 0: none)")
    p.add_argument("--probe-interval", dest="probeInterval", type=float, default=0.25,
                   help="seconds between malformed-input probes (default 0.25; 0: none)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin the broker to its own CPU")
    p.add_argument("--gc-every", dest="gcEvery", type=float, default=0, metavar="S",
                   help="diagnostic: make the broker run a full garbage collection every "
                        "S seconds (bench/soakhook), to tell garbage from live memory")
    p.add_argument("--keep", action="store_true", help="keep the brokers' logs")
    p.add_argument("--rate-limits", dest="rateLimits", action="store_true",
                   help="keep the faces' default inbound rate limits (by default they are "
                        "off, so that the floods reach the output bounds)")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.seconds = min(opts.seconds, 10.0)
    if opts.subscribers is None:
        opts.subscribers = 5 if opts.quick else 20
    return opts


if __name__ == "__main__":
    task.react(main, [parseArgs(sys.argv[1:])])
