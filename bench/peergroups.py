"""
Peer-groups benchmark: a real `twistd broker` process (peer groups only, on
loopback ports) and real peers over WebSocket and length-prefixed TCP.

Prints figures, asserts nothing:

  - records/s: one member adds records (a window of requests in flight),
    every member online is told of each (RECORD_CHANGED), measured until
    the last member has the last event;
  - direct data: messages/s and MiB/s of 1 KiB sendData relayed between
    two members, measured at the receiver;
  - join: the time from createInvitation to the joiner's STATUS_CHANGED.

With C{--nodes 2} the same runs on two broker nodes joined by a real
redis-server (cluster mode): the administrator on the first node, members
alternately on the second and the first, so each record crosses nodes and
the direct connection measured joins the two nodes.  CPU is the sum of
the brokers' and Redis's.

    .venv/bin/python bench/peergroups.py [--quick] [--nodes 2]
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, task

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from broker.peergroups import constants as C  # noqa: E402
from broker.peergroups.client import Identity, connectStream, connectWebSocket  # noqa: E402

T = "11111111-2222-3333-4444-555555555555"


def freePort():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def startRedis(tmp):
    port = freePort()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", tmp],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


def startBroker(tmp, redisURL=None, name="broker"):
    ws, tcp, admin = freePort(), freePort(), freePort()
    conf = os.path.join(tmp, f"{name}.toml")
    cluster = (f'[cluster]\nredis_url = "{redisURL}"\nprefix = "pgbench"\n'
               f'node_id = "{name}"\n') if redisURL else ""
    with open(conf, "w") as f:
        f.write(f'[broker]\nstate_dir = "{tmp}/state-{name}"\n'
                f'[admin]\nlisten = ["tcp:{admin}:interface=127.0.0.1"]\n'
                '[webpubsub]\nenabled = false\n' + cluster +
                f'[peergroups]\nenabled = true\nlisten = ["tcp:{ws}:interface=127.0.0.1"]\n'
                f'tcp_listen = ["tcp:{tcp}:interface=127.0.0.1"]\n')
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    log = open(os.path.join(tmp, f"{name}.log"), "w")
    proc = subprocess.Popen([twistd, "-n", "--pidfile=", "broker", "--config", conf],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", tcp), timeout=1).close()
            return proc, ws, tcp
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("broker did not start; see " + log.name)


def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bench:
    """
    @param nodes: C{[(ws port, tcp port)]}, one per broker node.
    @param pids: the processes whose CPU is counted.
    """

    def __init__(self, reactor, wire, nodes, pids):
        self.reactor, self.wire, self.nodes, self.pids = reactor, wire, nodes, pids

    def cpu(self):
        return sum(cpu(p) for p in self.pids)

    @defer.inlineCallbacks
    def peer(self, name, node=0):
        ws, tcp = self.nodes[node % len(self.nodes)]
        if self.wire == "ws":
            c = yield connectWebSocket(self.reactor, f"ws://127.0.0.1:{ws}/peergroups/v1")
        else:
            c = yield connectStream(self.reactor, f"tcp:127.0.0.1:{tcp}")
        yield c.startup("bench")
        ident = Identity.generate(name)
        yield c.registerIdentity(ident)
        return c, ident

    @defer.inlineCallbacks
    def setup(self, members):
        admin, _ = yield self.peer("admin")
        h = yield admin.create()
        reg = yield admin.registerEvent(h, [C.EVENT_STATUS_CHANGED, C.EVENT_RECORD_CHANGED,
                                            C.EVENT_DIRECT_CONNECTION, C.EVENT_INCOMING_DATA])
        yield admin.connect(h)
        yield admin.nextEvent(reg, C.EVENT_STATUS_CHANGED)
        peers = [(admin, h, reg, None)]
        joins = []
        for i in range(members - 1):
            c, ident = yield self.peer(f"m{i}", node=i + 1)
            t0 = time.perf_counter()
            inv = yield admin.createInvitation(h, ident.identityInfo())
            hb = yield c.join(inv)
            rb = yield c.registerEvent(hb, [C.EVENT_STATUS_CHANGED, C.EVENT_RECORD_CHANGED,
                                            C.EVENT_DIRECT_CONNECTION, C.EVENT_INCOMING_DATA])
            yield c.connect(hb)
            yield c.nextEvent(rb, C.EVENT_STATUS_CHANGED)
            joins.append(time.perf_counter() - t0)
            peers.append((c, hb, rb, ident))
        return peers, joins

    @defer.inlineCallbacks
    def records(self, peers, count, window):
        writer, h, _, _ = peers[-1]
        for c, _, reg, _ in peers:
            c._queues.pop(reg, None)
        done = [defer.Deferred() for _ in peers]
        counts = [0] * len(peers)

        def watch(i, c, reg):
            original = c._event

            def event(e):
                if e.get("registration") == reg and e["eventType"] == C.EVENT_RECORD_CHANGED:
                    counts[i] += 1
                    if counts[i] == count:
                        done[i].callback(None)
                    return
                original(e)
            c._event = event
        for i, (c, _, reg, _) in enumerate(peers):
            watch(i, c, reg)
        c0, t0 = self.cpu(), time.perf_counter()
        sem = defer.DeferredSemaphore(window)
        payload = os.urandom(100)
        yield defer.DeferredList([sem.run(writer.addRecord, h, T, payload)
                                  for _ in range(count)])
        yield defer.DeferredList(done)
        elapsed, used = time.perf_counter() - t0, self.cpu() - c0
        return count / elapsed, count * len(peers) / elapsed, used / elapsed

    @defer.inlineCallbacks
    def data(self, peers, count, size, window):
        (a, ha, _, _), (b, _, rb, ident) = peers[0], peers[1]
        cid = yield a.openDirectConnection(ha, ident.peerName)
        yield b.nextEvent(rb, C.EVENT_DIRECT_CONNECTION, status=C.PEER_CONNECTED)
        got = [0]
        finished = defer.Deferred()
        original = b._event

        def event(e):
            if e["eventType"] == C.EVENT_INCOMING_DATA:
                got[0] += 1
                if got[0] == count:
                    finished.callback(None)
                return
            original(e)
        b._event = event
        payload = os.urandom(size)
        sem = defer.DeferredSemaphore(window)
        c0, t0 = self.cpu(), time.perf_counter()
        yield defer.DeferredList([sem.run(a.sendData, ha, cid, T, payload)
                                  for _ in range(count)])
        yield finished
        elapsed, used = time.perf_counter() - t0, self.cpu() - c0
        b._event = original
        return count / elapsed, count * size / elapsed / 2 ** 20, used / elapsed


@defer.inlineCallbacks
def main(reactor, *argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--members", type=int, default=None)
    parser.add_argument("--nodes", type=int, choices=(1, 2), default=1)
    args = parser.parse_args(argv)
    members = args.members or (5 if args.quick else 20)
    nrec = 500 if args.quick else 5000
    ndata = 1000 if args.quick else 20000
    tmp = tempfile.mkdtemp(prefix="pgbench-")
    procs, nodes = [], []
    redisURL = None
    if args.nodes > 1:
        redis, redisURL = startRedis(tmp)
        procs.append(redis)
    for i in range(args.nodes):
        proc, ws, tcp = startBroker(tmp, redisURL, f"n{i}")
        procs.append(proc)
        nodes.append((ws, tcp))
    try:
        print(f"{args.nodes} broker node(s)" + (" on one redis-server" if redisURL else "")
              + f", pids {[p.pid for p in procs]}; {members} members; figures per wire")
        for wire in ("ws", "tcp"):
            bench = Bench(reactor, wire, nodes, [p.pid for p in procs])
            peers, joins = yield bench.setup(members)
            joins.sort()
            print(f"[{wire}] join (invite -> STATUS_CHANGED): p50 {joins[len(joins) // 2] * 1000:.1f} ms,"
                  f" max {joins[-1] * 1000:.1f} ms")
            rps, eps, load = yield bench.records(peers, nrec, 64)
            print(f"[{wire}] addRecord: {rps:,.0f} records/s, {eps:,.0f} RECORD_CHANGED events/s"
                  f" to {members} members; CPU {load:.2f} cores")
            mps, mib, load = yield bench.data(peers, ndata, 1024, 256)
            print(f"[{wire}] sendData 1 KiB: {mps:,.0f} messages/s, {mib:.1f} MiB/s;"
                  f" CPU {load:.2f} cores")
            yield defer.DeferredList([c.disconnect() for c, _, _, _ in peers])
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
