"""
The floor under the IoT benchmark's held round trip (L{iot}, part
C{held}): the same load (L{iotload}: one HTTP connection, 16 devices, one
request in flight) against a Twisted process that only forwards, with no
parsing at all: a read on the HTTP connection writes a ready REQUEST frame
to the device, a read on the device's connection writes a ready HTTP
answer.  What it costs per round trip (its CPU, the load's, the wall
time) is what any broker on Twisted's reactor pays for the four hops
between two processes on loopback, before doing any of its own work.
Prints figures, asserts nothing.

Usage: python bench/heldfloor.py [--requests N] [--rounds R]
"""

import argparse
import os
import socket
import sys
import time

import iotload
from iot import FLEET, cpuSplit, ownSplit, percentile

from broker.iot import frames

REQUEST = frames.encode(frames.REQUEST, 1 << 63, frames.Payload.json({"read": "temperature"}))
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n"
          + b'{"payload":{"type":"json","data":{"read":"temperature"}}}   ')


def serve(httpListener, deviceListener):
    """
    The forwarder (a child process): Twisted's reactor, one HTTP
    connection and one device connection, each read answered by one ready
    C{send} on the other's socket (as the broker's direct writes,
    L{broker.core.directwrite}: Twisted's buffered write would add a
    reactor turn and two C{epoll_ctl} calls).
    """
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    peers = {}

    class Device(Protocol):
        def connectionMade(self):
            self.transport.setTcpNoDelay(True)
            peers["device"] = self

        def dataReceived(self, data):
            peers["http"].transport.socket.send(ANSWER)

    class HTTP(Protocol):
        def connectionMade(self):
            self.transport.setTcpNoDelay(True)
            peers["http"] = self

        def dataReceived(self, data):
            peers["device"].transport.socket.send(REQUEST)

        def connectionLost(self, reason):
            reactor.stop()

    reactor.adoptStreamPort(httpListener.fileno(), socket.AF_INET, Factory.forProtocol(HTTP))
    reactor.adoptStreamPort(deviceListener.fileno(), socket.AF_INET, Factory.forProtocol(Device))
    httpListener.close()
    deviceListener.close()
    reactor.run()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10000)
    p.add_argument("--rounds", type=int, default=1)
    opts = p.parse_args()
    listeners = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        # Twisted accepts until EAGAIN.
        s.setblocking(False)
        listeners.append(s)
    pid = os.fork()
    if pid == 0:
        try:
            serve(*listeners)
        finally:
            os._exit(0)
    httpListener, deviceListener = listeners
    device = socket.create_connection(deviceListener.getsockname())
    device.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    device.setblocking(False)
    http = iotload.connectHTTP(httpListener.getsockname()[1])
    for s in listeners:
        s.close()
    time.sleep(0.3)
    request = (f"POST /v1/fleets/{FLEET}/devices/dev0/requests HTTP/1.1\r\n"
               f"Host: 127.0.0.1\r\nContent-Length: 0\r\n\r\n").encode()
    load = iotload.HeldLoad([device], [http], [request])
    try:
        load.run(200, 1)
        for _ in range(opts.rounds):
            cpu0, own0, t0 = cpuSplit(pid), ownSplit(), time.perf_counter()
            latencies, _ = load.run(opts.requests, 1)
            elapsed = time.perf_counter() - t0
            cpu1, own1 = cpuSplit(pid), ownSplit()
            n = opts.requests
            latencies = sorted(latencies)
            print(f"held floor (a Twisted forwarder, no parsing), 1 in flight: "
                  f"{n / elapsed:,.0f} round trips/s, p50 {percentile(latencies, 50) * 1000:.2f} "
                  f"ms, p99 {percentile(latencies, 99) * 1000:.2f} ms; CPU per round trip: "
                  f"forwarder {(sum(cpu1) - sum(cpu0)) / n * 1e6:.0f} µs "
                  f"({(cpu1[1] - cpu0[1]) / n * 1e6:.0f} in the kernel), load "
                  f"{(sum(own1) - sum(own0)) / n * 1e6:.0f} µs "
                  f"({(own1[1] - own0[1]) / n * 1e6:.0f} in the kernel)")
            sys.stdout.flush()
    finally:
        load.close()
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
