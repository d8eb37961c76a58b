"""
MQTT benchmark: the broker's MQTT face against Mosquitto and amqtt, side by
side in one run.

Each broker is started by the benchmark on a free loopback port, pinned to
the first CPU (the load gets the others), and measured the same way:

  - QoS 0 and QoS 1 fan-out: N subscribers (100 and 1000) of one topic, one
    publisher sending 64-byte messages as fast as the subscribers take them
    (at most C{--window} messages ahead of the average subscriber, so a
    broker is never measured by how much it can buffer); deliveries/s over
    the measured window, counted at the subscribers;
  - one-in-flight latency: the same N subscribers, the next message
    published once every subscriber has the previous one; publish-to-deliver
    p50/p99 over every delivery.

The brokers:

  - C{broker}: C{twistd -n broker --config} a generated configuration with
    only the C{[mqtt]} face on (skipped, and said so, while the MQTT face is
    not installed);
  - C{mosquitto}: Debian's C{/usr/sbin/mosquitto} with a generated
    configuration (anonymous, no persistence, queues deep enough that QoS 1
    is never dropped);
  - C{amqtt}: the asyncio broker from PyPI, in a virtualenv of its own (it
    pins dependencies of its own): C{--amqtt-python} names an interpreter
    that has it, otherwise the benchmark makes one under
    C{~/.cache/broker-bench/amqtt} with C{pip install amqtt} the first time.

Clients are L{mqttload}'s raw MQTT 3.1.1 protocols, all in this process (on
the second CPU).  The CPU seconds of the broker and of the load are printed
for each window: when the load's approach the wall time, the figure is the
client's, not the broker's.  It prints a table, the ratios beside the
figures, and asserts nothing.

Usage: python bench/mqtt.py [--quick] [--targets broker mosquitto amqtt]
"""

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import time

from twisted.internet import defer, task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from procs import (ChildProcess, cpuSeconds, freePort, percentile, pinCPUs,  # noqa: E402
                    raiseFileLimit, workdirUntilShutdown)
from mqttload import (MqttError, Tally, closeAll, connectClient,  # noqa: E402
                      stampedPayload, subscribers)

TOPIC = "bench/fanout"
AMQTT_CACHE = os.path.expanduser("~/.cache/broker-bench/amqtt")


# -- the brokers ------------------------------------------------------------


class Target(ChildProcess):
    """
    One broker process under test, listening on C{self.port}.
    """

    name = None

    def __init__(self, reactor, workdir, cpus):
        super().__init__()
        self.reactor = reactor
        self.workdir = workdir
        self.cpus = cpus
        self.port = freePort()
        self.logPath = os.path.join(workdir, f"{self.name}-{self.port}.log")

    def command(self):
        raise NotImplementedError

    def available(self):
        """None when it can run here, else why not."""
        return None

    def version(self):
        return "?"

    async def start(self):
        self.spawn(self.reactor, self.command(), self.workdir, self.cpus)

        async def answering():
            client = await connectClient(self.reactor, self.port, "probe")
            await closeAll([client])
        await self.ready(self.reactor, answering, self.name, interval=0.2)

    def cpu(self):
        return cpuSeconds(self.pid)


class Mosquitto(Target):
    name = "mosquitto"
    binary = "/usr/sbin/mosquitto"

    def available(self):
        if not os.access(self.binary, os.X_OK):
            return f"{self.binary} not found (Debian package mosquitto)"
        return None

    def version(self):
        out = subprocess.run([self.binary, "-h"], capture_output=True, text=True).stdout
        return out.split("\n", 1)[0].replace("mosquitto version ", "")

    def command(self):
        config = os.path.join(self.workdir, f"mosquitto-{self.port}.conf")
        with open(config, "w") as f:
            f.write(f"listener {self.port} 127.0.0.1\n"
                    "allow_anonymous true\n"
                    "persistence false\n"
                    "max_queued_messages 1000000\n"
                    "log_dest stderr\n"
                    "log_type error\nlog_type warning\n")
        return [self.binary, "-c", config]


class Amqtt(Target):
    name = "amqtt"
    python = None

    def available(self):
        if self.python is None:
            return "no amqtt interpreter"
        return None

    def version(self):
        out = subprocess.run([self.python, "-c", "import amqtt; print(amqtt.__version__)"],
                             capture_output=True, text=True)
        return out.stdout.strip() or "?"

    def command(self):
        config = os.path.join(self.workdir, f"amqtt-{self.port}.yaml")
        with open(config, "w") as f:
            # Only anonymous authentication: the default configuration's
            # packet logger would log every packet.
            f.write("listeners:\n  default:\n    type: tcp\n"
                    f"    bind: 127.0.0.1:{self.port}\n"
                    "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                    "    allow_anonymous: true\n")
        return [self.python, "-c", "from amqtt.scripts.broker_script import main; main()",
                "-c", config]

    @classmethod
    def ensurePython(cls, given):
        """
        The interpreter with amqtt: C{given}, or a virtualenv of its own made
        (once) under L{AMQTT_CACHE}.
        """
        if given:
            return given
        python = os.path.join(AMQTT_CACHE, "bin", "python")
        if not os.path.exists(python):
            print(f"making a virtualenv for amqtt in {AMQTT_CACHE} ...", flush=True)
            subprocess.run([sys.executable, "-m", "venv", AMQTT_CACHE], check=True)
            subprocess.run([python, "-m", "pip", "install", "-q", "amqtt"], check=True)
        return python


class Broker(Target):
    name = "broker"

    CONFIG = """\
[broker]
state_dir = "{workdir}/var-{port}"
[admin]
listen = ["tcp:{admin}:interface=127.0.0.1"]
[webpubsub]
listen = []
[mqtt]
enabled = true
listen = ["tcp:{port}:interface=127.0.0.1:backlog=1024"]
persistence = false
max_queued_messages = 1000000
max_connections_per_address = 0
{extra}
"""

    settings = ()

    def available(self):
        try:
            found = importlib.util.find_spec("broker.mqtt.face") is not None
        except ImportError:
            found = False
        if not found:
            return "the broker's MQTT face (broker.mqtt.face) is not installed"
        return None

    def version(self):
        try:
            out = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)),
                                  "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True)
            return out.stdout.strip() or "?"
        except OSError:
            return "?"

    def command(self):
        config = os.path.join(self.workdir, f"broker-{self.port}.toml")
        with open(config, "w") as f:
            f.write(self.CONFIG.format(workdir=self.workdir, port=self.port, admin=freePort(),
                                       extra="\n".join(self.settings)))
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        return [twistd, "-n", "--pidfile=", "broker", "--config", config]


TARGETS = {"broker": Broker, "mosquitto": Mosquitto, "amqtt": Amqtt}


# -- the measurements -------------------------------------------------------


class Publisher:
    """
    Publishes stamped messages to L{TOPIC}, at most C{window} messages
    ahead of the average subscriber and (QoS 1) C{inflight} unacknowledged.
    """

    def __init__(self, client, tally, subscribers, qos, size, window, inflight=20):
        self.client = client
        self.tally = tally
        self.n = subscribers
        self.qos = qos
        self.size = size
        self.window = window
        self.inflight = inflight
        self.sent = 0
        self.unacked = 0
        self.running = False
        tally.onDelivery = self.pump

    def start(self):
        self.running = True
        self.pump()

    def stop(self):
        self.running = False

    def pump(self):
        while (self.running and self.sent - self.tally.count / self.n < self.window
               and self.unacked < self.inflight):
            self.sent += 1
            d = self.client.publish(TOPIC, stampedPayload(self.sent, self.size), self.qos)
            if d is not None:
                self.unacked += 1
                d.addCallbacks(self._acked, self._lost)

    def _acked(self, _):
        self.unacked -= 1
        self.pump()

    def _lost(self, failure):
        # The run ended with publishes unacknowledged: the connection closed.
        failure.trap(MqttError)


async def throughput(reactor, target, n, qos, opts):
    """Deliveries/s of QoS C{qos} to C{n} subscribers over C{opts.duration} s."""
    tally = Tally()
    subs = await subscribers(reactor, target.port, n, TOPIC, qos, tally, prefix=f"t{qos}n{n}-")
    pub = await connectClient(reactor, target.port, f"pub{qos}n{n}")
    window = opts.window or max(2, 8192 // n)
    publisher = Publisher(pub, tally, n, qos, opts.payload, window)
    publisher.start()
    await task.deferLater(reactor, opts.warmup)
    c0, b0, l0, t0 = tally.count, target.cpu(), ownCpu(), time.monotonic()
    await task.deferLater(reactor, opts.duration)
    c1, b1, l1, t1 = tally.count, target.cpu(), ownCpu(), time.monotonic()
    publisher.stop()
    await task.deferLater(reactor, 0.5)
    await closeAll(subs + [pub])
    wall = t1 - t0
    return {"rate": (c1 - c0) / wall, "brokerCpu": (b1 - b0) / wall,
            "loadCpu": (l1 - l0) / wall, "sent": publisher.sent,
            "delivered": tally.count}


async def latency(reactor, target, n, qos, opts):
    """p50/p99 publish-to-deliver ms, one message in flight, C{n} subscribers."""
    tally = Tally()
    subs = await subscribers(reactor, target.port, n, TOPIC, qos, tally, prefix=f"l{qos}n{n}-")
    pub = await connectClient(reactor, target.port, f"lpub{qos}n{n}")
    messages = opts.messages
    lost = 0
    done = [None]

    def check():
        if done[0] is not None and tally.count >= expected[0]:
            d, done[0] = done[0], None
            d.callback(None)

    tally.onDelivery = check
    expected = [0]
    # A few unmeasured messages first: connections warm, caches filled.
    for seq in range(-5, messages):
        if seq == 0:
            tally.stamps = True
        expected[0] = tally.count + n
        done[0] = defer.Deferred()
        d = done[0]
        ack = pub.publish(TOPIC, stampedPayload(max(seq, 0), opts.payload), qos)
        try:
            await d.addTimeout(5, reactor)
        except defer.TimeoutError:
            lost += expected[0] - tally.count
            done[0] = None
        if ack is not None:
            await ack
    await closeAll(subs + [pub])
    ordered = sorted(tally.latencies)
    return {"p50": percentile(ordered, 50) / 1e6, "p99": percentile(ordered, 99) / 1e6,
            "samples": len(ordered), "lost": lost}


def ownCpu():
    t = os.times()
    return t.user + t.system


async def measure(reactor, target, opts, results):
    for n in opts.subscribers:
        for qos in (0, 1):
            r = await throughput(reactor, target, n, qos, opts)
            results[(target.name, f"qos{qos} fan-out deliveries/s, {n} subs")] = r["rate"]
            print(f"  {target.name}: QoS {qos}, {n} subscribers: {r['rate']:,.0f} deliveries/s "
                  f"(broker CPU {r['brokerCpu']:.2f}, load CPU {r['loadCpu']:.2f} s/s; "
                  f"{r['delivered']:,} of {r['sent'] * n:,} sent delivered)", flush=True)
            r = await latency(reactor, target, n, qos, opts)
            for p in ("p50", "p99"):
                results[(target.name, f"qos{qos} latency {p} ms, {n} subs")] = r[p]
            print(f"  {target.name}: QoS {qos}, {n} subscribers, one in flight: "
                  f"p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms over {r['samples']:,} "
                  f"deliveries{', %d lost' % r['lost'] if r['lost'] else ''}", flush=True)


def report(names, results):
    figures = []
    for (_, figure) in results:
        if figure not in figures:
            figures.append(figure)
    first = names[0]
    others = names[1:]
    head = ["figure"] + names + [f"{first}/{o}" for o in others]
    rows = []
    for figure in figures:
        row = [figure]
        for name in names:
            v = results.get((name, figure))
            row.append("-" if v is None else (f"{v:,.0f}" if "/s" in figure else f"{v:.2f}"))
        for o in others:
            a, b = results.get((first, figure)), results.get((o, figure))
            row.append("-" if not a or not b else f"{a / b:.2f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa
    print()
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print("\nratios: deliveries/s higher is better for the first column's broker; "
          "latency lower is better (a ratio under 1 is the first broker ahead).")


def parseArgs(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", choices=list(TARGETS),
                   default=["broker", "mosquitto", "amqtt"])
    p.add_argument("--subscribers", nargs="*", type=int, default=[100, 1000])
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--messages", type=int, default=200,
                   help="messages per one-in-flight latency run")
    p.add_argument("--payload", type=int, default=64)
    p.add_argument("--window", type=int, default=0,
                   help="messages the publisher may be ahead (default max(2, 8192/N))")
    p.add_argument("--amqtt-python", help="a Python that has amqtt installed")
    p.add_argument("--mosquitto", default=Mosquitto.binary)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra [mqtt] setting for the broker, in TOML")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 20 and 100 subscribers, 1 s windows, 30 messages")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the brokers' configs and logs")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.subscribers, opts.duration, opts.warmup, opts.messages = [20, 100], 1.0, 0.3, 30
    return opts


async def main(reactor, argv):
    opts = parseArgs(argv)
    limit = raiseFileLimit()
    cpus = None if opts.no_pin else pinCPUs()
    workdir = workdirUntilShutdown(reactor, "mqtt-bench-", opts.keep)
    Mosquitto.binary = opts.mosquitto
    Broker.settings = tuple(opts.set)
    if "amqtt" in opts.targets:
        Amqtt.python = Amqtt.ensurePython(opts.amqtt_python)
    print(f"MQTT fan-out benchmark: {platform.python_implementation()} "
          f"{platform.python_version()}, {os.cpu_count()} CPUs, broker pinned to "
          f"{sorted(cpus) if cpus else 'any'}, load on {sorted(os.sched_getaffinity(0))}, "
          f"{opts.payload}-byte payloads, file limit {limit}")
    names, results = [], {}
    for name in opts.targets:
        target = TARGETS[name](reactor, workdir, cpus)
        why = target.available()
        if why:
            print(f"{name}: skipped: {why}")
            continue
        print(f"{name} {target.version()}:", flush=True)
        await target.start()
        try:
            await measure(reactor, target, opts, results)
        finally:
            await target.stop(reactor)
        names.append(name)
    if names:
        report(names, results)


if __name__ == "__main__":
    from twisted.internet.task import react
    react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1:])))
