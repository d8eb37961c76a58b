# -*- test-case-name: tests.test_iot_simulate -*-
"""
A device simulator, to try the IoT face by hand::

    python -m broker.iot.simulate --registry var/iot-registry.toml
    python -m broker.iot.simulate --fleet demo --device sensor1 --key SECRET \\
        --host 127.0.0.1 --port 7000 --udp-port 7001 --interval 1 --count 10
    python -m broker.iot.simulate --registry var/iot-registry.toml \
        --tls --port 7002 --cafile var/iot-tls-cert.pem

It connects and authenticates (checking the server's proof), then sends a
JSON telemetry reading over UDP every C{--interval} seconds with the tokens
it was given (with C{--messages}, also as a MESSAGE to its central, printing
the broker's ACK, which comes once the central has it or it is stored for
it, or its error), answers every REQUEST with C{{"ok": true, "echo": ...}},
acknowledges and prints every MESSAGE, and stops after C{--count} readings
(0: runs until interrupted).

With C{--central} it is the fleet's central instead (C{--key}: the central
key, or C{--registry}): it prints what its devices send (MESSAGE,
TELEMETRY, DEVICE_CONNECTED, DEVICE_DISCONNECTED), including what was kept
for it while it was away, ACKs each, and stops after C{--count} of them::

    python -m broker.iot.simulate --registry var/iot-registry.toml --central --count 0
"""

import argparse
import json
import random
import sys

from twisted.internet import defer, ssl, task
from twisted.internet.defer import DeferredQueue
from twisted.internet.endpoints import (TCP4ClientEndpoint, connectProtocol,
                                        wrapClientTLS)
from twisted.internet.protocol import DatagramProtocol

from broker.iot import frames
from broker.iot.auth import loadRegistryFile
from broker.iot.client import FORWARDED, IoTClient
from broker.iot.frames import Payload


def parseArgs(argv):
    p = argparse.ArgumentParser(prog="python -m broker.iot.simulate",
                                description="Simulate one IoT device.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7000)
    p.add_argument("--udp-port", type=int, default=7001)
    p.add_argument("--fleet", default="demo")
    p.add_argument("--device", default="sensor1")
    p.add_argument("--key", help="the device's secret (else read from --registry)")
    p.add_argument("--registry", help="a registry file holding the device's key")
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--cafile", help="PEM certificate to trust for --tls, e.g. the development "
                                    "certificate var/iot-tls-cert.pem (pinned: only it is "
                                    "trusted)")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--messages", action="store_true",
                   help="also send each reading to the central as a MESSAGE")
    p.add_argument("--central", action="store_true",
                   help="be the fleet's central: print and ACK what devices send")
    args = p.parse_args(argv)
    if args.key is None:
        if not args.registry:
            p.error("give --key or --registry")
        fleet = loadRegistryFile(args.registry).get(args.fleet)
        entry = fleet and (fleet["central"] if args.central
                           else fleet["devices"].get(args.device))
        if entry is None:
            p.error(f"{args.registry} has no "
                    f"{'central of ' if args.central else 'device '}{args.fleet}"
                    f"{'' if args.central else '/' + args.device}")
        args.key = entry.key
    return args


class Simulator(IoTClient):
    def __init__(self, args, out):
        super().__init__("device", args.fleet, args.device, args.key)
        self.out = out
        self.onRequest = self.answer

    def say(self, *parts):
        print(*parts, file=self.out, flush=True)

    def answer(self, frame):
        self.say(f"request {frame.requestId}: {frame.payload.value()!r}")
        try:
            echo = frame.payload.value()
            if isinstance(echo, bytes):
                echo = echo.hex()
        except Exception:
            echo = None
        return Payload.json({"ok": True, "echo": echo})

    @defer.inlineCallbacks
    def consume(self):
        while True:
            frame = yield self.nextFrame()
            if isinstance(frame, frames.FrameError):
                self.say(f"bad frame from the server: {frame.message}")
                continue
            kind = frames.KINDS.get(frame.kind)
            if frame.kind == frames.MESSAGE:
                self.say(f"message {frame.requestId}: {frame.payload.value()!r}")
                self.write(frames.ACK, frame.requestId)
            elif frame.kind in (frames.ERROR, frames.CLOSE):
                self.say(f"{kind} {frame.requestId}: {frame.payload.value()!r}")
            elif frame.kind == frames.ACK:
                self.say(f"ack {frame.requestId}")
            else:
                self.say(f"{kind} {frame.requestId}")


class CentralSimulator(IoTClient):
    """
    The fleet's central: prints each device event and ACKs the stored
    ones (nonzero requestId: their durable ids).
    """

    def __init__(self, args, out):
        super().__init__("central", args.fleet, None, args.key)
        self.out = out
        self.events = DeferredQueue()

    def _frame(self, frame):
        # Every device event in one queue, in arrival order.
        if self.open and frame.kind in FORWARDED:
            if frame.requestId:
                self.write(frames.ACK, frame.requestId)
            self.events.put(frame)
        else:
            super()._frame(frame)

    @defer.inlineCallbacks
    def consume(self, count):
        seen = 0
        while count == 0 or seen < count:
            frame = yield self.events.get()
            kind = frames.KINDS.get(frame.kind)
            how = f"#{frame.requestId}" if frame.requestId else "direct"
            print(f"{kind} from {frame.address} ({how}): {frame.payload.value()!r}",
                  file=self.out, flush=True)
            seen += 1
        return seen


def connect(reactor, args, proto):
    endpoint = TCP4ClientEndpoint(reactor, args.host, args.port)
    if args.tls:
        trust = None
        if args.cafile:
            with open(args.cafile, "rb") as f:
                trust = ssl.Certificate.loadPEM(f.read())
        endpoint = wrapClientTLS(ssl.optionsForClientTLS(args.host, trustRoot=trust),
                                 endpoint)
    return connectProtocol(endpoint, proto)


@defer.inlineCallbacks
def runCentral(reactor, args, out=sys.stdout):
    central = CentralSimulator(args, out)
    yield connect(reactor, args, central)
    yield central.authenticated
    print(f"authenticated as the central of {args.fleet}", file=out, flush=True)
    try:
        seen = yield central.consume(args.count)
    finally:
        central.transport.loseConnection()
        yield central.closed
    return seen


@defer.inlineCallbacks
def run(reactor, args, out=sys.stdout):
    if args.central:
        return (yield runCentral(reactor, args, out))
    sim = Simulator(args, out)
    yield connect(reactor, args, sim)
    welcome = yield sim.authenticated
    sim.say(f"authenticated as {args.fleet}/{args.device} "
            f"(server proof checked, ping every {welcome['pingInterval']}s)")
    sim.consume()
    udp = DatagramProtocol()
    port = reactor.listenUDP(0, udp)
    sent = 0
    try:
        while args.count == 0 or sent < args.count:
            yield sim.waitTokens(1)
            token = sim.tokens.pop(0)
            reading = {"seq": sent, "temperature": round(20 + random.random() * 5, 2)}
            # Version 2: with the MAC made with the token's key.
            udp.transport.write(sim.datagram(Payload.json(reading), token),
                                (args.host, args.udp_port))
            sim.say(f"telemetry {json.dumps(reading)}")
            if args.messages:
                rid = sim.nextId()
                sim.write(frames.MESSAGE, rid, Payload.json(reading))
                sim.say(f"message {rid} to the central")
            sent += 1
            yield task.deferLater(reactor, args.interval, lambda: None)
    finally:
        yield port.stopListening()
        sim.write(frames.CLOSE, 0, Payload.json({"code": "BYE", "reason": "simulator done"}))
        sim.transport.loseConnection()
        yield sim.closed
    return sent


def main(argv=None):
    args = parseArgs(sys.argv[1:] if argv is None else argv)
    task.react(lambda reactor: run(reactor, args).addCallback(lambda _: None))


if __name__ == "__main__":
    main()
