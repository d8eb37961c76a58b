"""
Benchmarks of the IoT face, against a real C{twistd broker} process on
loopback ports.  Each part is a function C{bench*(run)}; L{main} runs every
part listed in L{PARTS} (or those named on the command line) and prints
their figures.  Nothing is asserted.

Held requests (HTTP -> device -> HTTP): D devices are connected over TCP
by this process and answer every request at once (echo); C keep-alive HTTP
connections each hold one request at a time, round-robin over the devices;
each round trip is timed from writing the HTTP request to reading the
whole response.  The load is raw sockets in one C{epoll} loop
(L{iotload}: pre-built HTTP/1.1 requests, devices that answer a REQUEST
by changing its kind byte), so that it costs far less than the broker;
C{--load twisted} uses the reference device client and a Twisted HTTP
client instead.  CPU seconds of both are printed.

Usage: python bench/iot.py [--quick] [PART ...] (see bench/README.md).
"""

import argparse
import json
import math
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

import iotload
from broker.iot import apikeys, frames
from broker.iot.auth import newSecret, tokenKey
from broker.iot.client import IoTClient
from broker.iot.frames import Payload

FLEET = "bench"


def freePort():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(ordered, p):
    if not ordered:
        return float("nan")
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def cpuSeconds(pid):
    return sum(cpuSplit(pid))


def cpuSplit(pid):
    """
    C{(user, system)} CPU seconds of process C{pid}.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def ownCpu():
    return sum(ownSplit())


def ownSplit():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


class Broker:
    """
    A C{twistd -n broker} with the IoT face on free loopback ports, a
    registry of C{devices} devices in fleet C{bench} and one API key.
    """

    def __init__(self, workdir, devices=64, extra="", like=None, twistd=None, cpus=None,
                 pollSpin=0):
        os.makedirs(workdir, exist_ok=True)
        self.twistd = twistd or os.path.join(os.path.dirname(sys.executable), "twistd")
        self.cpus = cpus
        self.workdir = workdir
        self.tcp, self.udp, self.http, self.admin = (freePort() for _ in range(4))
        if like is not None:
            # Another node of the same cluster: the same registry and key.
            self.secrets, self.centralSecret, self.apiKey = (
                like.secrets, like.centralSecret, like.apiKey)
        else:
            self.secrets = {f"dev{i}": newSecret() for i in range(devices)}
            self.centralSecret = newSecret()
            self.apiKey, _ = apikeys.newKey()
        registry = os.path.join(workdir, "registry.toml")
        with open(registry, "w") as f:
            f.write(f'[fleets.{FLEET}]\ncentral_key = "{self.centralSecret}"\n')
            for did, secret in self.secrets.items():
                f.write(f'[fleets.{FLEET}.devices.{did}]\nkey = "{secret}"\n')
        self.config = os.path.join(workdir, "broker.toml")
        with open(self.config, "w") as f:
            f.write(f"""\
[broker]
state_dir = "{workdir}/var"
{f"poll_spin_us = {pollSpin}" if pollSpin else ""}
[admin]
listen = ["tcp:{self.admin}:interface=127.0.0.1"]
[webpubsub]
enabled = false
[iot]
enabled = true
listen = ["tcp:{self.tcp}:interface=127.0.0.1:backlog=1024"]
registry_file = "{registry}"
# The UDP part spends tokens fast: let each device hold many.
token_batch = 4096
max_queue_depth = 1000000
[iot.udp]
port = {self.udp}
[iot.http]
listen = ["tcp:{self.http}:interface=127.0.0.1:backlog=1024"]
api_keys = ["{apikeys.hashLine(FLEET, self.apiKey)}"]
{extra}
""")
        self.logPath = os.path.join(workdir, "broker.log")
        self.process = None

    def start(self):
        self._log = open(self.logPath, "wb")
        cpus = self.cpus
        self.process = subprocess.Popen(
            [self.twistd, "-n", "--pidfile=", *os.environ.get("BENCH_TWISTD_ARGS", "").split(),
             "broker", "--config", self.config],
            cwd=self.workdir, stdout=self._log, stderr=self._log,
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/healthz", timeout=1)
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    with open(self.logPath, errors="replace") as f:
                        raise RuntimeError("the broker did not start:\n" + f.read()[-2000:])
                time.sleep(0.1)

    def stop(self):
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self._log.close()

    def cpu(self):
        return cpuSeconds(self.process.pid)


# -- held requests -------------------------------------------------------------


class HTTPConnection(Protocol):
    """
    A keep-alive HTTP/1.1 connection with one request in flight; enough of a
    parser for answers with a C{Content-Length} or a small chunked body
    (twisted.web sends an empty 202 chunked).  C{call(raw)} fires with
    C{(status, body)}, or fails if the connection is lost first.
    """

    def __init__(self):
        self.buffer = b""
        self.waiting = None

    def call(self, raw):
        self.waiting = defer.Deferred()
        self.transport.write(raw)
        return self.waiting

    def dataReceived(self, data):
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower()
        if b"transfer-encoding: chunked" in head:
            # The body ends with the last (empty) chunk.
            stop = self.buffer.find(b"\r\n0\r\n\r\n", end + 2)
            if stop < 0:
                return
            chunks, rest = self.buffer[end + 4:stop + 2], self.buffer[stop + 7:]
            body = b"".join(chunks.split(b"\r\n")[1::2])
        else:
            length = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
            if len(self.buffer) < end + 4 + length:
                return
            body, rest = self.buffer[end + 4:end + 4 + length], self.buffer[end + 4 + length:]
        self.buffer = rest
        d, self.waiting = self.waiting, None
        d.callback((int(head[9:12]), body))

    def connectionLost(self, reason):
        d, self.waiting = self.waiting, None
        if d is not None:
            d.errback(reason)


def heldRequestBytes(broker, devices):
    """
    The HTTP request of a held round trip to each of C{devices}, as bytes.
    """
    body = json.dumps({"payload": {"type": "json", "data": {"read": "temperature"}},
                       "timeout": 10}).encode()

    def raw(did):
        return (f"POST /v1/fleets/{FLEET}/devices/{did}/requests HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\nAuthorization: Bearer {broker.apiKey}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode() + body
    return [raw(d) for d in devices]


def heldRuns(opts):
    """
    The runs of the held part: C{(concurrency, requests)}, one in flight
    first (a tenth of the requests, at least 200).
    """
    return [(c, opts.requests if c > 1 else max(200, opts.requests // 10))
            for c in sorted({1, opts.concurrency})]


async def benchHeldRequests(run):
    """
    Held request round trips/s and latency, HTTP -> device -> HTTP.
    """
    if run.opts.load == "raw":
        return benchHeldRaw(run)
    return await benchHeldTwisted(run)


def benchHeldRaw(run):
    """
    L{benchHeldRequests} with the load of L{iotload}: raw sockets in one
    C{epoll} loop, which blocks this process's reactor while it runs.
    """
    opts, broker = run.opts, run.broker
    ids = list(broker.secrets)[:opts.devices]
    devices = [iotload.connectDevice(run.deviceBroker.tcp, FLEET, did, broker.secrets[did])
               for did in ids]
    https = [iotload.connectHTTP(broker.http) for _ in range(opts.concurrency)]
    load = iotload.HeldLoad(devices, https, heldRequestBytes(broker, ids))
    results = []
    try:
        for concurrency, total in heldRuns(opts):
            # Warm up (connections, caches), then measure from zero.
            load.run(min(total, 200), concurrency)
            cpu0, own0, t0 = run.cpuSplit(), ownSplit(), time.perf_counter()
            latencies, errors = load.run(total, concurrency)
            elapsed = time.perf_counter() - t0
            results.append(heldFigures(run, concurrency, len(devices), total, errors, elapsed,
                                       sorted(latencies), cpu0, own0))
    finally:
        load.close()
    return results


def heldFigures(run, concurrency, devices, total, errors, elapsed, latencies, cpu0, own0):
    """
    The figures of one held run; C{cpu0} and C{own0} are the C{(user,
    system)} CPU seconds of the brokers and of this process at its start.
    """
    cpu1, own1 = run.cpuSplit(), ownSplit()
    brokerUser, brokerSys = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    loadUser, loadSys = own1[0] - own0[0], own1[1] - own0[1]
    return {
        "part": "held requests", "concurrency": concurrency, "devices": devices,
        "requests": total, "errors": errors, "perSecond": total / elapsed,
        "p50ms": percentile(latencies, 50) * 1000, "p99ms": percentile(latencies, 99) * 1000,
        "brokerCpu": brokerUser + brokerSys, "brokerSys": brokerSys,
        "loadCpu": loadUser + loadSys, "loadSys": loadSys, "seconds": elapsed,
        "nodes": len(run.brokers), "load": run.opts.load}


async def benchHeldTwisted(run):
    """
    L{benchHeldRequests} with the load on Twisted: the reference device
    client and L{HTTPConnection}.
    """
    reactor, opts = run.reactor, run.opts
    broker = run.broker
    devices = []
    for did in list(broker.secrets)[:opts.devices]:
        c = IoTClient("device", FLEET, did, broker.secrets[did])
        c.onRequest = lambda frame: frame.payload
        # With --nodes 2 the devices are on the other node: every request
        # crosses the cluster bus both ways.
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", run.deviceBroker.tcp),
                              c)
        await c.authenticated
        devices.append(did)
    conns = []
    for _ in range(opts.concurrency):
        conns.append(await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", broker.http), HTTPConnection()))
    requests = heldRequestBytes(broker, devices)
    results = []
    for concurrency, total in heldRuns(opts):
        latencies, errors = [], 0
        issued = [0]

        async def worker(conn):
            nonlocal errors
            while issued[0] < total:
                n = issued[0]
                issued[0] += 1
                t0 = time.perf_counter()
                status, _ = await conn.call(requests[n % len(requests)])
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors += 1
        # Warm up (connections, caches), then measure from zero.
        measured, total = total, min(total, 200)
        await defer.gatherResults([defer.Deferred.fromCoroutine(worker(c))
                                   for c in conns[:concurrency]])
        latencies.clear()
        errors = 0
        issued[0] = 0
        total = measured
        cpu0, own0, t0 = run.cpuSplit(), ownSplit(), time.perf_counter()
        await defer.gatherResults([defer.Deferred.fromCoroutine(worker(c))
                                   for c in conns[:concurrency]])
        elapsed = time.perf_counter() - t0
        results.append(heldFigures(run, concurrency, len(devices), total, errors, elapsed,
                                   sorted(latencies), cpu0, own0))
    for c in conns:
        c.transport.loseConnection()
    return results


def printHeld(r):
    where = " on the other node" if r["nodes"] > 1 else ""
    print(f"held requests, {r['concurrency']} in flight over {r['devices']} devices{where}: "
          f"{r['perSecond']:,.0f} round trips/s, p50 {r['p50ms']:.2f} ms, "
          f"p99 {r['p99ms']:.2f} ms ({r['requests']} requests, {r['errors']} errors; "
          f"CPU broker {r['brokerCpu']:.2f} s, load {r['loadCpu']:.2f} s ({r['load']}); "
          f"CPU per round trip: broker {r['brokerCpu'] / r['requests'] * 1e6:.0f} µs "
          f"({r['brokerSys'] / r['requests'] * 1e6:.0f} in the kernel), "
          f"load {r['loadCpu'] / r['requests'] * 1e6:.0f} µs "
          f"({r['loadSys'] / r['requests'] * 1e6:.0f} in the kernel))")


# -- UDP telemetry (IoT core) ----------------------------------------------------


def metric(broker, name, label):
    """
    One sample of the broker's admin /metrics, e.g.
    C{metric(b, "broker_iot_udp_datagrams_total", 'outcome="accepted"')}.
    """
    with urllib.request.urlopen(f"http://127.0.0.1:{broker.admin}/metrics", timeout=5) as r:
        body = r.read().decode()
    prefix = f"{name}{{{label}}} "
    for line in body.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


async def connectDevices(run, ids, **attrs):
    clients = []
    for did in ids:
        c = IoTClient("device", FLEET, did, run.broker.secrets[did])
        for k, v in attrs.items():
            setattr(c, k, v)
        await connectProtocol(TCP4ClientEndpoint(run.reactor, "127.0.0.1", run.broker.tcp), c)
        await c.authenticated
        clients.append(c)
    return clients


def blast(datagrams, address, rate):
    """
    Send C{datagrams} from one UDP socket, paced at C{rate}/s (0: as fast
    as the socket takes them); return the seconds it took.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sendto = s.sendto
    t0 = time.perf_counter()
    if rate:
        step = 256
        for i in range(0, len(datagrams), step):
            for d in datagrams[i:i + step]:
                sendto(d, address)
            # Sleep, not spin: the sender must leave the CPU to the broker.
            ahead = t0 + (i + step) / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
    else:
        for d in datagrams:
            try:
                sendto(d, address)
            except BlockingIOError:
                pass
    elapsed = time.perf_counter() - t0
    s.close()
    return elapsed


async def benchUDP(run):
    """
    UDP telemetry datagrams accepted/s: devices fetch tokens over TCP, then
    one socket sends JSON readings, each with its own token, at a paced
    rate and then unpaced; the broker's accepted count is read from
    /metrics until it stops moving.
    """
    reactor, opts, broker = run.reactor, run.opts, run.broker
    rates = [opts.udp_rate, 0]
    perRun = min(opts.datagrams, len(broker.secrets) * 4096 // len(rates))
    need = perRun * len(rates)
    ids = list(broker.secrets)[:max(1, math.ceil(need / 4096))]
    clients = await connectDevices(run, ids)
    for c in clients:
        await c.waitTokens(4096)
    tokens = [t for c in clients for t in c.tokens]
    # Version 2 datagrams, each with the MAC made with its token's key
    # (built before the clock starts: the broker's check is what is timed).
    keyOf = {t: c.udpKey for c in clients for t in c.tokens}
    datagrams = [frames.encodeDatagram(t, Payload.json({"seq": i, "temperature": 21.5}),
                                       tokenKey(keyOf[t], t))
                 for i, t in enumerate(tokens[:need])]
    size = len(datagrams[0])
    results = []
    for n, rate in enumerate(rates):
        batch = datagrams[n * perRun:(n + 1) * perRun]
        accepted0 = metric(broker, "broker_iot_udp_datagrams_total", 'outcome="accepted"')
        cpu0 = broker.cpu()
        t0 = time.perf_counter()
        sendSeconds = blast(batch, ("127.0.0.1", broker.udp), rate)
        # Wait for the broker to finish what reached it.
        last, lastChange = accepted0, time.perf_counter()
        while time.perf_counter() - lastChange < 0.5:
            await task.deferLater(reactor, 0.1, lambda: None)
            now = metric(broker, "broker_iot_udp_datagrams_total", 'outcome="accepted"')
            if now != last:
                last, lastChange = now, time.perf_counter()
        accepted = last - accepted0
        busy = max(lastChange - t0 - 0.1, sendSeconds)
        results.append({"part": "udp", "rate": rate, "sent": len(batch), "size": size,
                        "accepted": int(accepted), "perSecond": accepted / busy,
                        "sendPerSecond": len(batch) / sendSeconds,
                        "brokerCpu": broker.cpu() - cpu0, "seconds": busy})
    for c in clients:
        c.transport.loseConnection()
    return results


def printUDP(r):
    pace = f"paced at {r['rate']:,}/s" if r["rate"] else "unpaced"
    loss = 100 * (1 - r["accepted"] / r["sent"])
    perCpu = r["accepted"] / max(r["brokerCpu"], 1e-9)
    print(f"udp telemetry, {r['sent']:,} datagrams of {r['size']} bytes {pace} "
          f"(sent at {r['sendPerSecond']:,.0f}/s): {r['perSecond']:,.0f} accepted/s, "
          f"{loss:.1f}% not accepted; {perCpu:,.0f} accepted per broker CPU second "
          f"(CPU broker {r['brokerCpu']:.2f} s in {r['seconds']:.2f} s)")


# -- store-and-forward drain (IoT core) -------------------------------------------


async def benchDrain(run):
    """
    Store-and-forward drain on reconnect: a central queues N messages for
    an offline device (each stored durably before its ACK; 256 in flight),
    then the
    device connects and acknowledges each as it arrives; timed until the
    last arrives, and until the broker has removed them all.
    """
    reactor, opts, broker = run.reactor, run.opts, run.broker
    n = opts.queued
    did = list(broker.secrets)[-1]
    central = IoTClient("central", FLEET, None, broker.centralSecret)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", broker.tcp), central)
    await central.authenticated
    acked0 = metric(broker, "broker_iot_events_total", 'event="messagesAcked"')
    queueSeconds = await sendAcked(
        central, n, lambda i: (frames.MESSAGE, i + 1, Payload.json({"n": i, "cmd": "set", "v": 1}),
                               did), "queueing")
    device = IoTClient("device", FLEET, did, broker.secrets[did])
    device.autoAck = True
    cpu0 = broker.cpu()
    t0 = time.perf_counter()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", broker.tcp), device)
    await device.authenticated
    for i in range(n):
        f = await device.nextFrame()
        if f.kind != frames.MESSAGE:
            raise RuntimeError(f"unexpected {f!r}")
    return await drainFigures(run, "drain", 'event="messagesAcked"', acked0, n, queueSeconds,
                              t0, cpu0, central, device)


async def sendAcked(client, n, frame, what):
    """
    Send C{n} frames (C{frame(i)} gives C{client.write}'s arguments), 256
    unanswered at most (the broker's BUSY bound), each answered by an ACK.

    @return: the seconds it took.
    """
    t0 = time.perf_counter()
    sent = 0
    while sent < min(256, n):
        client.write(*frame(sent))
        sent += 1
    for _ in range(n):
        f = await client.nextFrame()
        if f.kind != frames.ACK:
            raise RuntimeError(f"{what} failed: {f!r}")
        if sent < n:
            client.write(*frame(sent))
            sent += 1
    return time.perf_counter() - t0


async def drainFigures(run, part, event, counted0, n, queueSeconds, t0, cpu0, *clients):
    """
    The figures of a drain whose last message has just arrived: waits
    until the broker has counted C{n} more C{event}s (removed), then
    closes C{clients}.
    """
    reactor, broker = run.reactor, run.broker
    delivered = time.perf_counter() - t0
    while metric(broker, "broker_iot_events_total", event) - counted0 < n:
        await task.deferLater(reactor, 0.01, lambda: None)
    removed = time.perf_counter() - t0
    for client in clients:
        client.transport.loseConnection()
    return [{"part": part, "messages": n, "queuePerSecond": n / queueSeconds,
             "perSecond": n / delivered, "ackedPerSecond": n / removed,
             "brokerCpu": broker.cpu() - cpu0}]


def printDrain(r):
    print(f"store-and-forward, {r['messages']:,} messages: queued at "
          f"{r['queuePerSecond']:,.0f}/s; drained on reconnect at {r['perSecond']:,.0f}/s "
          f"delivered, {r['ackedPerSecond']:,.0f}/s acknowledged and removed "
          f"(CPU broker {r['brokerCpu']:.2f} s)")


async def benchCentralDrain(run):
    """
    Device -> central store-and-forward after an outage: with no central
    connected, a device sends N MESSAGEs (each ACKed once stored in the
    fleet's central queue; 256 in flight), then the central connects and
    ACKs each as it arrives; timed until the last arrives, and until the
    broker has removed them all.
    """
    reactor, opts, broker = run.reactor, run.opts, run.broker
    n = opts.queued
    did = list(broker.secrets)[-2]
    # The drain part's central (if it ran) must be gone: it would take the
    # messages straight away.
    await task.deferLater(reactor, 0.5, lambda: None)
    device = IoTClient("device", FLEET, did, broker.secrets[did])
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", broker.tcp), device)
    await device.authenticated
    delivered0 = metric(broker, "broker_iot_events_total", 'event="centralDelivered"')
    queueSeconds = await sendAcked(
        device, n, lambda i: (frames.MESSAGE, i + 1, Payload.json({"n": i + 1, "reading": 21.5})),
        "storing")
    central = IoTClient("central", FLEET, None, broker.centralSecret)
    central.autoAck = True
    cpu0 = broker.cpu()
    t0 = time.perf_counter()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", broker.tcp), central)
    await central.authenticated
    got = 0
    while got < n:
        f = await central.nextFrame()
        if f.kind == frames.MESSAGE and f.address == did:
            got += 1
    return await drainFigures(run, "central-drain", 'event="centralDelivered"', delivered0, n,
                              queueSeconds, t0, cpu0, central, device)


def printCentralDrain(r):
    print(f"device -> central after an outage, {r['messages']:,} messages: stored at "
          f"{r['queuePerSecond']:,.0f}/s; drained when the central connects at "
          f"{r['perSecond']:,.0f}/s delivered, {r['ackedPerSecond']:,.0f}/s acknowledged "
          f"and removed (CPU broker {r['brokerCpu']:.2f} s)")


# Every part: (name, coroutine function, printer).  Other parts of the IoT
# benchmark (UDP telemetry, store-and-forward drain) add themselves here.
PARTS = [
    ("held", benchHeldRequests, printHeld),
    ("udp", benchUDP, printUDP),
    ("drain", benchDrain, printDrain),
    ("central-drain", benchCentralDrain, printCentralDrain),
]


def startRedis(workdir):
    """
    A redis-server on a free loopback port, no persistence (the cluster
    run measures the broker's Redis round trips, not Redis' disk).
    """
    port = freePort()
    process = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port),
         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, f"redis://127.0.0.1:{port}/0"
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)


class Run:
    def __init__(self, reactor, opts, broker, brokers=None):
        self.reactor = reactor
        self.opts = opts
        self.broker = broker
        self.brokers = brokers or [broker]
        self.deviceBroker = self.brokers[-1]

    def cpu(self):
        return sum(b.cpu() for b in self.brokers)

    def cpuSplit(self):
        """
        C{(user, system)} CPU seconds of the brokers.
        """
        splits = [cpuSplit(b.process.pid) for b in self.brokers]
        return sum(u for u, _ in splits), sum(s for _, s in splits)


def parseArgs(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("parts", nargs="*", metavar="PART",
                   help=f"parts to run (default all: {', '.join(n for n, _, _ in PARTS)})")
    p.add_argument("--quick", action="store_true", help="fewer requests, for a smoke test")
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=64,
                   help="HTTP requests held at once")
    p.add_argument("--devices", type=int, default=16)
    p.add_argument("--datagrams", type=int, default=200000,
                   help="UDP datagrams per measured run")
    p.add_argument("--udp-rate", type=int, default=60000,
                   help="datagrams/s of the paced UDP run")
    p.add_argument("--queued", type=int, default=5000,
                   help="messages queued for the drain and central-drain parts")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--load", choices=("raw", "twisted"), default="raw",
                   help="the held part's load: raw sockets in one epoll loop (bench/iotload.py) "
                        "or the reference device client and an HTTP client on Twisted")
    p.add_argument("--twistd", default=None,
                   help="the twistd of the broker to measure (default: this Python's), "
                        "e.g. another checkout's venv, to compare two brokers with one load")
    p.add_argument("--pin", action="store_true",
                   help="pin the broker(s) to CPU 0 and this process to CPU 1")
    p.add_argument("--poll-spin", type=int, default=0, metavar="US",
                   help="the broker's broker.poll_spin_us (default 0: sleep when idle)")
    p.add_argument("--cluster", action="store_true",
                   help="run the broker as one cluster node over a fresh redis-server "
                        "(Redis store, tokens and presence)")
    p.add_argument("--nodes", type=int, default=1, choices=(1, 2),
                   help="2: a second cluster node holds the devices of the held part "
                        "(implies --cluster)")
    opts = p.parse_args(argv)
    if opts.nodes > 1:
        opts.cluster = True
    if opts.quick:
        opts.requests = min(opts.requests, 2000)
        opts.datagrams = min(opts.datagrams, 20000)
        opts.queued = min(opts.queued, 500)
    known = {n for n, _, _ in PARTS}
    for name in opts.parts:
        if name not in known:
            p.error(f"unknown part {name!r}")
    return opts


def main(argv=None):
    from twisted.internet import reactor

    opts = parseArgs(sys.argv[1:] if argv is None else argv)
    workdir = tempfile.mkdtemp(prefix="iot-bench-")
    redis, extra = None, ""
    if opts.cluster:
        redis, url = startRedis(workdir)
        extra = f'[cluster]\nredis_url = "{url}"\nprefix = "bench"\n'
    cpus = None
    if opts.pin:
        cpus = {0}
        os.sched_setaffinity(0, {1})
    broker = Broker(workdir, devices=max(64, opts.devices), extra=extra, twistd=opts.twistd,
                    cpus=cpus, pollSpin=opts.poll_spin)
    brokers = [broker] + [Broker(os.path.join(workdir, f"node{i}"), extra=extra, like=broker,
                                 twistd=opts.twistd, cpus=cpus, pollSpin=opts.poll_spin)
                          for i in range(1, opts.nodes)]
    try:
        for b in brokers:
            b.start()
    except BaseException:
        for b in brokers:
            b.stop()
        if redis is not None:
            redis.terminate()
        raise
    run = Run(reactor, opts, broker, brokers)
    outcome = {}

    async def everything():
        for name, f, printer in PARTS:
            if opts.parts and name not in opts.parts:
                continue
            for r in await f(run):
                printer(r)

    def go():
        d = defer.Deferred.fromCoroutine(everything())

        def done(result):
            outcome["result"] = result
            reactor.stop()
        d.addBoth(done)
    reactor.callWhenRunning(go)
    try:
        reactor.run()
    finally:
        for b in brokers:
            b.stop()
        if redis is not None:
            redis.terminate()
            redis.wait(10)
        if opts.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    result = outcome.get("result")
    if hasattr(result, "raiseException"):
        result.raiseException()


if __name__ == "__main__":
    main()
