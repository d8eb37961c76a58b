"""
What L{soak} is made of: the counters of a run (L{Soak}, L{Ledger}), the
never-reading subscribers (L{NeverReading}), raw exchanges for churn and
malformed input (L{Exchanges}), the broker (L{SoakBroker}) and its
/metrics.
"""

import os
import socket
import sys
import time
import warnings
from collections import Counter

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from procs import BrokerProcess, rssKiB  # noqa: E402
from wsload import clientFrame  # noqa: E402

MB = 1024 * 1024
RSS_LIMIT_MB = 300
TCP_ESTABLISHED = 1


# -- what the load keeps count of ------------------------------------------------


def payload(tag, seq, size):
    """
    A message body: its tag (which publisher), its sequence number, padding.
    """
    head = b"%s%010d " % (tag, seq)
    return head + b"x" * (size - len(head))


def messageKey(body):
    """
    The key of a body made by L{payload}: tag and sequence number in one
    int; None for any other body (a probe's message the broker accepted).
    """
    try:
        return body[0] << 40 | int(body[1:11])
    except (ValueError, IndexError):
        return None


class Ledger:
    """
    What one well-behaved subscriber was due (accepted by the broker for
    it) and what it received.
    """

    def __init__(self, name):
        self.name = name
        self.accepted = set()
        self.received = set()
        self.duplicates = 0
        self.foreign = 0
        self.dropped = False

    def accept(self, key):
        self.accepted.add(key)

    def receive(self, key):
        if key is None:
            self.foreign += 1
        elif key in self.received:
            self.duplicates += 1
        else:
            self.received.add(key)

    def lost(self):
        return len(self.accepted - self.received)

    def complete(self):
        return self.accepted <= self.received


class Soak:
    """
    One face's run: the broker, the counters every part of the load adds
    to, and the once-a-second RSS sampler.

    @ivar refusals: C{"who: reason" -> count} of everything the broker
        refused or closed, as the clients saw it.
    @ivar accepted: messages accepted by the broker, per publisher.
    @ivar probes: C{"probe -> outcome" -> count}.
    """

    def __init__(self, reactor, opts, broker):
        self.reactor = reactor
        self.opts = opts
        self.broker = broker
        self.running = True
        self.refusals = Counter()
        self.accepted = Counter()
        self.churn = Counter()
        self.probes = Counter()
        self.ledgers = []
        self.pools = []
        self.samples = []
        self.started = None

    def ledger(self, name):
        ledger = Ledger(name)
        self.ledgers.append(ledger)
        return ledger

    def refuse(self, who, reason):
        self.refusals[f"{who}: {reason}"] += 1

    def drops(self):
        return sum(p.drops for p in self.pools)

    def sample(self):
        rss = rssKiB(self.broker.pid) / 1024
        self.samples.append(rss)
        t = time.monotonic() - self.started
        print(f"  t={t:5.1f}s  RSS {rss:7.1f} MB  accepted {sum(self.accepted.values()):>8,}"
              f"  delivered {sum(len(x.received) for x in self.ledgers):>8,}"
              f"  never-reading dropped {self.drops():>4}", flush=True)

    async def loop(self, what, interval, step):
        """
        Call C{step()} (which may return a Deferred) every C{interval}
        seconds while the run lasts; failures are counted, not raised.
        """
        while self.running:
            try:
                await defer.maybeDeferred(step)
            except Exception as e:
                self.refuse(what, type(e).__name__)
            await task.deferLater(self.reactor, interval)


def tcpState(transport):
    """
    The kernel's state of a client socket (1: established).  A paused
    transport never reads, so a reset or close from the broker is only
    seen here: 7 (closed by a reset) or 8 (the broker sent FIN).
    """
    try:
        sock = transport.getHandle()
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return -1


class NeverReading:
    """
    C{n} clients that stop reading once subscribed.  C{connect(i)} returns
    a Deferred firing with a client whose C{transport} is then paused.
    Every half second each one's socket state is checked: one the broker
    dropped is counted and replaced.
    """

    def __init__(self, soak, name, n, connect):
        self.soak = soak
        self.name = name
        self.n = n
        self.connect = connect
        self.clients = [None] * n
        self.drops = 0
        self.connected = 0
        soak.pools.append(self)

    async def start(self):
        await defer.gatherResults([defer.ensureDeferred(self._open(i)) for i in range(self.n)])

    async def _open(self, i):
        while self.soak.running:
            try:
                client = await self.connect(i)
            except Exception as e:
                self.soak.refuse(f"{self.name} connecting", type(e).__name__)
                await task.deferLater(self.soak.reactor, 0.5)
                continue
            client.transport.pauseProducing()
            self.clients[i] = client
            self.connected += 1
            return

    def poll(self):
        for i, client in enumerate(self.clients):
            if client is not None and tcpState(client.transport) != TCP_ESTABLISHED:
                self.drops += 1
                self.clients[i] = None
                client.transport.abortConnection()
                defer.ensureDeferred(self._open(i))

    def close(self):
        for client in self.clients:
            if client is not None:
                client.transport.abortConnection()


# -- raw connections: churn and malformed input -------------------------------


class Raw(Protocol):
    """
    A raw connection that writes C{chunks} (bytes, or floats: seconds to
    wait; or a function returning them, called for each connection), records what comes back, and ends when the broker closes it or
    after C{timeout}.  C{done} fires with C{(received bytes, how it ended)}.
    """

    def __init__(self, reactor, chunks, timeout=3.0, abortAfter=False):
        self.reactor = reactor
        self.chunks = chunks
        self.timeout = timeout
        self.abortAfter = abortAfter
        self.received = []
        self.done = defer.Deferred()
        self.closed = False

    def connectionMade(self):
        self._timer = self.reactor.callLater(self.timeout, self._expire)
        defer.ensureDeferred(self._write())

    async def _write(self):
        for c in self.chunks:
            if self.closed:
                return
            if isinstance(c, float):
                await task.deferLater(self.reactor, c)
            else:
                self.transport.write(c)
        if self.abortAfter and not self.closed:
            self._finish("aborted by us")
            self.transport.abortConnection()

    def _expire(self):
        self._timer = None
        self._finish("no close within %gs" % self.timeout)
        self.transport.abortConnection()

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        err = reason.getErrorMessage()
        self._finish("reset" if "reset" in err.lower() else "closed")

    def _finish(self, how):
        if not self.done.called:
            self.done.callback((b"".join(self.received), how))


async def rawExchange(reactor, port, chunks, timeout=3.0, abortAfter=False):
    """
    Open a connection, run a L{Raw} exchange over it.
    """
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    proto = Raw(reactor, chunks() if callable(chunks) else chunks, timeout, abortAfter)
    await connectProtocol(endpoint, proto)
    return await proto.done


def streamed(total, chunk=64 * 1024, pause=0.002):
    """
    C{total} bytes in chunks, with a short pause between them: a body that
    is streamed, not declared.
    """
    piece = b"y" * chunk
    out = []
    for _ in range(total // chunk):
        out += [piece, pause]
    return out


def httpHead(method, path, headers):
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def httpStatus(data):
    if data.startswith(b"HTTP/1."):
        return "http " + data[9:12].decode("latin-1", "replace")
    return None


def httpProbes(path, headers, limit):
    """
    The two HTTP body probes: a huge declared C{Content-Length} with a body
    streamed past C{limit}, and a chunked body streamed past it.
    """
    declared = httpHead("POST", path, headers + [("Content-Length", str(10 ** 12))])
    chunk = 64 * 1024
    piece = b"%x\r\n" % chunk + b"y" * chunk + b"\r\n"
    chunked = [httpHead("POST", path, headers + [("Transfer-Encoding", "chunked")])]
    for _ in range(2 * limit // chunk):
        chunked += [piece, 0.002]
    return [("http huge Content-Length", [declared] + streamed(2 * limit)),
            ("http chunked body", chunked)]


def classifyHTTP(data, how):
    return httpStatus(data) or (f"no answer, {how}" if not data else f"bytes, {how}")


class Exchanges:
    """
    Raw exchanges started C{rate} times a second at most, C{concurrency} at
    once at most, cycling over C{items}: C{(name, port, chunks, classify,
    abortAfter)}.  Each outcome, C{classify(received, how)}, is counted in
    C{counter} as C{"name -> outcome"}.
    """

    def __init__(self, soak, counter, items, rate, concurrency=8, timeout=3.0):
        self.soak = soak
        self.counter = counter
        self.items = items
        self.rate = rate
        self.timeout = timeout
        self.sem = defer.DeferredSemaphore(concurrency)
        self._next = 0

    async def _one(self, name, port, chunks, classify, abortAfter):
        try:
            data, how = await rawExchange(self.soak.reactor, port, chunks, self.timeout,
                                          abortAfter)
        except Exception as e:
            outcome = f"connect failed: {type(e).__name__}"
        else:
            try:
                outcome = classify(data, how)
            except Exception as e:
                outcome = f"unclassified ({type(e).__name__}), {how}"
        self.counter[f"{name} -> {outcome}"] += 1

    def step(self):
        if self.sem.tokens:
            item = self.items[self._next % len(self.items)]
            self._next += 1
            self.sem.run(lambda: defer.ensureDeferred(self._one(*item)))

    async def run(self):
        await self.soak.loop("exchanges", 1.0 / self.rate, self.step)
        # Let the last ones end before the figures are read.
        while self.sem.tokens < self.sem.limit:
            await task.deferLater(self.soak.reactor, 0.1)


def churn(soak, ways, rate):
    """
    Connection churn: C{ways} are C{(name, port, chunks, abort)}; counted
    by how each connection ended.
    """
    items = [(name, port, chunks, lambda d, how: how, abort)
             for name, port, chunks, abort in ways]
    return defer.ensureDeferred(Exchanges(soak, soak.churn, items, rate, 16, 2.0).run())


def probes(soak, probes, rate):
    """
    Malformed input: C{probes} are C{(name, port, chunks, classify)}.
    """
    items = [(name, port, chunks, classify, False) for name, port, chunks, classify in probes]
    return defer.ensureDeferred(Exchanges(soak, soak.probes, items, rate).run())


# -- WebSocket frames, by hand ---------------------------------------------------


def fragment(frame):
    """
    A masked client frame without its FIN bit.
    """
    return bytes((frame[0] & 0x7F,)) + frame[1:]


def fragmented(total, piece=64 * 1024):
    """
    One text message of C{total} bytes in masked fragments, streamed.
    """
    body = b"x" * piece
    out = [fragment(clientFrame(body, 0x1)), 0.002]
    for _ in range(total // piece - 2):
        out += [fragment(clientFrame(body, 0x0)), 0.002]
    return out + [clientFrame(body, 0x0)]


def declaredFrame(size):
    """
    The header of a masked text frame of C{size} bytes, then the body
    streamed.
    """
    head = bytes((0x81, 0x80 | 127)) + size.to_bytes(8, "big") + b"\0\0\0\0"
    return [head] + streamed(size + 64 * 1024)


def serverFrames(data):
    """
    The (opcode, payload) of each whole unmasked frame in C{data}.
    """
    out, i, n = [], 0, len(data)
    while n - i >= 2:
        size, start = data[i + 1] & 0x7F, i + 2
        if size == 126:
            size, start = int.from_bytes(data[start:start + 2], "big"), start + 2
        elif size == 127:
            size, start = int.from_bytes(data[start:start + 8], "big"), start + 8
        if start + size > n:
            break
        out.append((data[i] & 0x0F, data[start:start + size]))
        i = start + size
    return out


def classifyWS(data, how, text=lambda p: None):
    """
    The outcome of a WebSocket probe: the HTTP status unless 101, then what
    the text frames said (C{text(payload)}) and the close code.
    """
    status = httpStatus(data)
    if status is None:
        return f"no handshake answer, {how}"
    if status != "http 101":
        return status
    said = []
    for op, p in serverFrames(data[data.find(b"\r\n\r\n") + 4:]):
        if op == 0x8:
            said.append("close %d" % int.from_bytes(p[:2], "big") if len(p) >= 2 else "close")
        elif op == 0x1:
            what = text(p)
            if what:
                said.append(what)
    if not said or not said[-1].startswith("close"):
        said.append(how)
    return ", ".join(said)


# -- the broker ------------------------------------------------------------------


class SoakBroker(BrokerProcess):
    """
    L{procs.BrokerProcess} (Web PubSub on, its hub and key), plus the
    other faces' sections given as C{sections}, and /metrics and /healthz.
    """

    def __init__(self, reactor, workdir, sections, cpus):
        super().__init__(reactor, workdir, [sections], cpus)

    async def get(self, path):
        from twisted.web.client import Agent, readBody

        warnings.filterwarnings("ignore", "Using readBody with a transport", DeprecationWarning)
        url = f"http://127.0.0.1:{self.adminPort}{path}".encode("ascii")
        response = await Agent(self.reactor).request(b"GET", url)
        return response.code, (await readBody(response)).decode("utf-8", "replace")

    async def metrics(self):
        """
        Every sample of /metrics: C{{"name{labels}": value}}.
        """
        _, body = await self.get("/metrics")
        out = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


def metricSum(samples, name):
    """
    The sum of C{name} over its labels.
    """
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def metricLabels(samples, name):
    return {k[len(name):]: v for k, v in samples.items()
            if k.startswith(name + "{") and v}


