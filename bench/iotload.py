"""
The cheap load of the IoT held-request benchmark (L{iot}): raw sockets and
one C{epoll} loop, no reactor.

With one request in flight a held round trip is a latency: the load and
the broker take turns, so every microsecond the load spends is in the
figure.  The Twisted load (L{iot.HTTPConnection} and the reference device
client, L{broker.iot.client}) costs about 130 µs of CPU a round trip,
almost as much as the broker's side.  Here a device answers a REQUEST by
changing one byte of it (its kind, to RESPONSE: the payload is echoed, as
the reference client's C{onRequest} did), an HTTP request is bytes built
once, and an answer is parsed only as far as its status and length.

Devices authenticate with blocking sockets (the challenge-response of
docs/iot-protocol.md, with L{broker.iot.auth}), then everything runs
non-blocking in the loop of L{HeldLoad.run}.
"""

import json
import os
import select
import socket
import struct
import time
from array import array

from broker.iot import auth, frames

_LENGTH = struct.Struct(">I")
_REQUEST = frames.REQUEST
_PING = frames.PING
# The kind byte of a frame, after its length prefix and version.
_KIND_AT = 5
_RESPONSE_KIND = bytes((frames.RESPONSE,))
_PONG_KIND = bytes((frames.PONG,))


def _recvExactly(sock, n):
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise ConnectionError("the broker closed the connection")
        data += more
    return data


def _readFrame(sock):
    (length,) = _LENGTH.unpack(_recvExactly(sock, 4))
    return frames.decodeBody(_recvExactly(sock, length))


def connectDevice(port, fleet, deviceId, secret, host="127.0.0.1"):
    """
    A device session, authenticated (blocking), as a non-blocking socket
    with nothing of the broker's left unread in user space.
    """
    key = auth.keyBytes(secret)
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    nonce = os.urandom(32)
    hello = {"role": auth.DEVICE, "fleet": fleet, "id": deviceId, "nonce": nonce.hex(),
             "udp": auth.UDP_VERSION}
    sock.sendall(frames.encode(frames.HELLO, 0, frames.Payload.json(hello)))
    challenge = _readFrame(sock)
    if challenge.kind != frames.CHALLENGE:
        raise RuntimeError(f"{deviceId}: expected CHALLENGE, got {challenge!r}")
    serverNonce = challenge.payload.data
    proof = auth.proof(key, "client", auth.DEVICE, fleet, deviceId, nonce, serverNonce)
    sock.sendall(frames.encode(frames.PROOF, 0, frames.Payload(frames.BINARY, proof)))
    welcome = _readFrame(sock)
    if welcome.kind != frames.WELCOME:
        raise RuntimeError(f"{deviceId}: expected WELCOME, got {welcome!r}")
    expected = auth.proof(key, "server", auth.DEVICE, fleet, deviceId, nonce, serverNonce)
    if bytes.fromhex(json.loads(welcome.payload.data)["proof"]) != expected:
        raise RuntimeError(f"{deviceId}: the broker does not know our key")
    sock.setblocking(False)
    return sock


def connectHTTP(port, host="127.0.0.1"):
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


class HeldLoad:
    """
    Devices that echo every REQUEST at once, and keep-alive HTTP/1.1
    connections that each keep one request in flight.

    @param devices: device sockets from L{connectDevice}.
    @param https: HTTP sockets from L{connectHTTP}.
    @param requests: the request bytes, used round-robin.
    """

    def __init__(self, devices, https, requests):
        self.devices = devices
        self.https = https
        self.requests = requests
        self.ep = select.epoll()
        self._deviceBuf = {}
        self._httpBuf = {}
        for s in devices:
            self.ep.register(s.fileno(), select.EPOLLIN)
            self._deviceBuf[s.fileno()] = b""
        for s in https:
            self.ep.register(s.fileno(), select.EPOLLIN)
            self._httpBuf[s.fileno()] = b""
        self._socks = {s.fileno(): s for s in devices + https}

    def close(self):
        self.ep.close()
        for s in self._socks.values():
            s.close()

    def run(self, total, concurrency):
        """
        Make C{total} round trips with C{concurrency} HTTP connections
        (at most C{len(https)}) each holding one request at a time.

        @return: C{(latencies, errors)}: seconds from writing each request
            to reading all of its answer (an C{array}), and the number of
            answers that were not 200.
        """
        socks = self._socks
        deviceBuf = self._deviceBuf
        httpBuf = self._httpBuf
        requests = self.requests
        nRequests = len(requests)
        latencies = array("d")
        started = {}
        issued = 0
        done = 0
        errors = 0
        clock = time.perf_counter
        unpack = _LENGTH.unpack_from
        active = self.https[:concurrency]
        for s in active:
            if issued >= total:
                break
            started[s.fileno()] = clock()
            s.sendall(requests[issued % nRequests])
            issued += 1
        poll = self.ep.poll
        while done < total:
            for fd, _ in poll():
                sock = socks[fd]
                data = sock.recv(262144)
                if not data:
                    raise ConnectionError("the broker closed a connection")
                if fd in deviceBuf:
                    buf = deviceBuf[fd] + data if deviceBuf[fd] else data
                    pos, n, out = 0, len(buf), []
                    while n - pos >= 4:
                        end = pos + 4 + unpack(buf, pos)[0]
                        if end > n:
                            break
                        kind = buf[pos + _KIND_AT]
                        if kind == _REQUEST:
                            out.append(buf[pos:pos + _KIND_AT] + _RESPONSE_KIND
                                       + buf[pos + _KIND_AT + 1:end])
                        elif kind == _PING:
                            out.append(buf[pos:pos + _KIND_AT] + _PONG_KIND
                                       + buf[pos + _KIND_AT + 1:end])
                        pos = end
                    deviceBuf[fd] = buf[pos:]
                    if out:
                        sock.sendall(out[0] if len(out) == 1 else b"".join(out))
                    continue
                buf = httpBuf[fd] + data if httpBuf[fd] else data
                while True:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    head = buf[:end].lower()
                    at = head.find(b"\r\ncontent-length:")
                    if at >= 0:
                        stop = head.find(b"\r\n", at + 2)
                        length = int(head[at + 17:stop if stop >= 0 else len(head)])
                        if len(buf) < end + 4 + length:
                            break
                        buf = buf[end + 4 + length:]
                    elif b"transfer-encoding: chunked" in head:
                        stop = buf.find(b"\r\n0\r\n\r\n", end + 2)
                        if stop < 0:
                            break
                        buf = buf[stop + 7:]
                    else:
                        buf = buf[end + 4:]
                    latencies.append(clock() - started[fd])
                    done += 1
                    if head[9:12] != b"200":
                        errors += 1
                    if issued < total:
                        started[fd] = clock()
                        sock.sendall(requests[issued % nRequests])
                        issued += 1
                httpBuf[fd] = buf
        return latencies, errors
