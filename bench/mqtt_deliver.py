"""
The Python an MQTT QoS 1 delivery costs, with the kernel taken out:
C{python bench/mqtt_deliver.py [--subscribers N] [--deliveries M] [--rounds R] [--qos Q]}.

As L{wps_deliver} for the Web PubSub face: the broker's service tree is
built in this process from a configuration with only the MQTT face on,
N raw MQTT 3.1.1 clients connect and subscribe to one topic at QoS 1 (real
sockets), one real fan-out lets every connection find its socket, then
each connection's socket is swapped for one whose C{send} is C{len}.  A
round times fan-outs of one 64-byte message through the core's
L{Fanout} (the reactor turn ended after each), and, at QoS 1, each
subscriber's PUBACK fed to its protocol's C{dataReceived} (parsed and
matched as if read from the socket): nanoseconds per delivery, its
acknowledgement included.  Compare two checkouts by running each one's
copy alternately, pinned (C{taskset -c 0}).  It asserts nothing.
"""

import argparse
import os
import socket
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from twisted.internet import reactor                                    # noqa: E402

from broker import config, tap                                          # noqa: E402
from broker.core.message import FROM_GROUP, Delivery, Target            # noqa: E402
from broker.mqtt.message import MqttMessage                             # noqa: E402
from wps_deliver import writeNowhere                                    # noqa: E402
from wps_publish import spin                                            # noqa: E402

TOPIC = "bench/deliver"
PAYLOAD = bytes(64)
CONFIG = """
[broker]
state_dir = "{state}"
[admin]
listen = []
[webpubsub]
enabled = false
[iot]
enabled = false
[peergroups]
enabled = false
[ecdn]
enabled = false
[mqtt]
enabled = true
listen = ["tcp:0:interface=127.0.0.1"]
persistence = false
max_connections_per_address = 0
"""


def mqttString(text):
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def packet(first, body):
    n, length = len(body), b""
    while True:
        byte, n = n % 128, n // 128
        length += bytes((byte | (0x80 if n else 0),))
        if not n:
            return bytes((first,)) + length + body


def subscriber(port, i, qos):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(packet(0x10, mqttString("MQTT") + b"\x04\x02\x00\x3c" + mqttString(f"d{i}")))
    s.sendall(packet(0x82, b"\x00\x01" + mqttString(TOPIC) + bytes((qos,))))
    s.setblocking(False)
    return s


def drain(sockets):
    for s in sockets:
        while True:
            try:
                if not s.recv(1 << 20):
                    break
            except BlockingIOError:
                break


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subscribers", type=int, default=100)
    p.add_argument("--deliveries", type=int, default=1_000_000,
                   help="deliveries per round (default 1,000,000)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--qos", type=int, default=1, choices=(0, 1))
    opts = p.parse_args()

    workdir = tempfile.mkdtemp(prefix="mqtt-deliver-")
    path = os.path.join(workdir, "broker.toml")
    with open(path, "w") as f:
        f.write(CONFIG.format(state=os.path.join(workdir, "state")))
    top = tap.buildService(config.load(path), reactor)
    top.privilegedStartService()
    top.startService()
    listening = top.getServiceNamed("mqtt.listen[0]")._waitingForPort
    spin(lambda: listening.called)
    port = listening.result.getHost().port
    core = next(s for s in top if hasattr(s, "fanout"))
    subs = []
    for i in range(opts.subscribers):
        subs.append(subscriber(port, i, opts.qos))
        reactor.iterate(0)      # accepted before the listen backlog fills
    hub = core.hub("mqtt")
    target = Target(Target.GROUP, TOPIC)
    spin(lambda: len(list(hub.receivers(target))) == opts.subscribers)
    message = MqttMessage(PAYLOAD, qos=opts.qos)

    def fanOut():
        delivery = Delivery(message, FROM_GROUP, TOPIC, "publisher", None)
        core.fanout.deliver(hub.receivers(target), delivery, hub.stats)

    fanOut()
    for _ in range(20):
        reactor.iterate(0)
    drain(subs)
    sessions = list(hub.receivers(target))
    protocols = [s.protocol for s in sessions]
    pubacks = [b""] + [b"\x40\x02" + struct.pack("!H", pid) for pid in range(1, 65536)]
    if opts.qos:
        for proto in protocols:
            proto.dataReceived(pubacks[1])
    endOfTurn = writeNowhere(protocols)

    fanOuts = max(1, opts.deliveries // opts.subscribers)
    print(f"MQTT QoS {opts.qos} delivery{' and PUBACK' if opts.qos else ''}, Python only: "
          f"{opts.subscribers} subscribers, {fanOuts:,} fan-outs a round, "
          f"CPython {sys.version.split()[0]}")
    figures = []
    pid = 1
    for r in range(opts.rounds):
        start = time.perf_counter()
        for _ in range(fanOuts):
            fanOut()
            endOfTurn()
            if opts.qos:
                pid = pid % 65535 + 1
                ack = pubacks[pid]
                for proto in protocols:
                    proto.dataReceived(ack)
        per = (time.perf_counter() - start) / (fanOuts * opts.subscribers)
        figures.append(per)
        print(f"  round {r + 1}: {per * 1e9:6.0f} ns a delivery")
    left = sum(len(s.inflight) for s in sessions)
    if left:
        raise SystemExit(f"{left} deliveries were not acknowledged: the figures are wrong")
    figures.sort()
    print(f"  median: {figures[len(figures) // 2] * 1e9:.0f} ns a delivery")
    for s in subs:
        s.close()
    top.stopService()


if __name__ == "__main__":
    main()
