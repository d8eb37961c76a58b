"""
The load side of the fan-out benchmark (L{fanout}): a minimal WebSocket
client, Web PubSub and MQTT-over-WebSocket subscribers that only walk frame
and packet headers, and the subscriber worker process the controller drives
over stdin/stdout (C{python bench/wsload.py PORT TOKEN [webpubsub|mqtt]}).

The load must cost less than the server, or the figures measure the client:
so these are not autobahn or paho clients but raw Twisted protocols that do
the opening handshake by hand and read a timestamp from the first message of
each read.
"""

import json
import os
import sys
import time
from array import array

from twisted.internet import defer, stdio
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.protocols.basic import LineReceiver

HUB = "bench"
GROUP = "g"
KEY = "bench-key-0123456789abcdef0123456789abcdef"
PAYLOAD_SIZE = 64

# Payload layout: "<seq:20> <monotonic ns:20> " then padding to PAYLOAD_SIZE.
_STAMP = slice(21, 41)
_PAD = b"x" * (PAYLOAD_SIZE - 42)


# -- the wire: a minimal WebSocket client -----------------------------------


def openingHandshake(port, token, protocol=None, path=None):
    """
    The client's opening handshake.  The key is fixed: the server's accept
    header is not checked, only its 101 status.
    """
    if path is None:
        path = f"/client/hubs/{HUB}?access_token={token}"
    lines = [f"GET {path} HTTP/1.1",
             f"Host: 127.0.0.1:{port}",
             "Upgrade: websocket",
             "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
             "Sec-WebSocket-Version: 13"]
    if protocol:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def clientFrame(payload, opcode=0x1):
    """
    A final, masked client frame, as RFC 6455 requires of clients.  The XOR
    is one big-integer operation, which is far cheaper in Python than a
    byte loop.
    """
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    mask = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")
    return header + key + masked


def stampedPayload(seq):
    return b"%020d %020d " % (seq, time.monotonic_ns()) + _PAD


def readFrames(data, collect=False):
    """
    Walk the server's (unmasked, unfragmented) frames in C{data}.

    @return: C{(count, first, payloads, controls, rest)}: the number of
        data frames, the first one's payload, every data payload when
        C{collect} (else C{None}), the C{(opcode, payload)} of pings and
        closes, and the bytes of an incomplete frame at the end.
    """
    n = len(data)
    i = 0
    count = 0
    first = None
    payloads = [] if collect else None
    controls = []
    while n - i >= 2:
        length = data[i + 1] & 0x7F
        start = i + 2
        if length == 126:
            start = i + 4
            if start > n:
                break
            length = int.from_bytes(data[i + 2:start], "big")
        elif length == 127:
            start = i + 10
            if start > n:
                break
            length = int.from_bytes(data[i + 2:start], "big")
        end = start + length
        if end > n:
            break
        opcode = data[i] & 0x0F
        if opcode == 0x1 or opcode == 0x2:
            count += 1
            if payloads is not None:
                payloads.append(data[start:end])
            elif first is None:
                first = data[start:end]
        elif opcode == 0x9 or opcode == 0x8:
            controls.append((opcode, data[start:end]))
        i = end
    return count, first, payloads, controls, data[i:] if i < n else b""


class HandshakeFailed(Exception):
    pass


class WebSocketClient(Protocol):
    """
    The client side of one connection: sends C{request}, waits for the 101,
    then splits the server's frames.  Pings are answered and a close frame
    is echoed; data frames go to L{dataFrames}.

    The server never fragments (autobahn's autoFragmentSize is 0), so every
    text or binary frame is a whole message.

    @ivar ready: fires with this protocol once the server has accepted the
        upgrade, or fails with L{HandshakeFailed}.
    @ivar collect: when true, L{dataFrames} receives every payload; when
        false only the first one of each read, which keeps counting cheap.
    """

    collect = False

    def __init__(self, request):
        self.request = request
        self.ready = defer.Deferred()
        self.open = False
        self._buf = b""

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.transport.write(self.request)

    def dataReceived(self, data):
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if not self.open:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._buf = data
                return
            status = data[:data.find(b"\r\n")]
            if not status.startswith(b"HTTP/1.1 101"):
                self.transport.loseConnection()
                self.ready.errback(HandshakeFailed(status.decode("latin-1")))
                return
            self.open = True
            data = data[end + 4:]
            self.ready.callback(self)
        count, first, payloads, controls, rest = readFrames(data, self.collect)
        self._buf = rest
        for opcode, payload in controls:
            if opcode == 0x9:
                self.transport.write(clientFrame(payload, 0xA))
            else:
                self.transport.write(clientFrame(payload[:2], 0x8))
                self.transport.loseConnection()
        if count:
            self.dataFrames(count, payloads if payloads is not None else first)

    def dataFrames(self, count, payloads):
        """
        C{count} data frames arrived in one read; C{payloads} is the list of
        their payloads when L{collect} is set, else the first payload.
        """

    def connectionLost(self, reason):
        if not self.ready.called:
            self.ready.errback(HandshakeFailed(f"connection lost: {reason.getErrorMessage()}"))


# -- subscriber worker process ------------------------------------------------


class Tally:
    """
    What one worker's subscribers received, shared by all of them.

    @ivar frames: data frames received.
    @ivar samples: publish-to-deliver latencies (ns), one per read.
    """

    def __init__(self):
        self.frames = 0
        self.samples = array("q")
        self.open = 0
        self.lost = 0
        self._target = None

    def received(self, count, payload):
        self.samples.append(time.monotonic_ns() - int(payload[_STAMP]))
        self.frames += count
        if self._target is not None and self.frames >= self._target[0]:
            d = self._target[1]
            self._target = None
            d.callback(self.frames)

    def reach(self, frames):
        """
        A Deferred that fires once C{frames} data frames have arrived.
        """
        if self.frames >= frames:
            return defer.succeed(self.frames)
        d = defer.Deferred(lambda _: setattr(self, "_target", None))
        self._target = (frames, d)
        return d


class Subscriber(WebSocketClient):
    def __init__(self, request, tally):
        super().__init__(request)
        self.tally = tally

    def dataFrames(self, count, first):
        self.tally.received(count, first)

    def connectionLost(self, reason):
        if self.open:
            self.tally.open -= 1
            self.tally.lost += 1
        super().connectionLost(reason)


# -- MQTT 3.1.1 over WebSocket, the few packets a QoS 0 subscriber needs -------


def mqttLength(n):
    """
    MQTT's variable-length "remaining length".
    """
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqttString(s):
    b = s.encode("utf-8")
    return len(b).to_bytes(2, "big") + b


def mqttConnect(clientId):
    """
    CONNECT, MQTT 3.1.1, clean session, no keep-alive (an idle benchmark
    connection must not be dropped).
    """
    body = mqttString("MQTT") + bytes((4, 0x02)) + (0).to_bytes(2, "big") + mqttString(clientId)
    return b"\x10" + mqttLength(len(body)) + body


def mqttSubscribe(topic, packetId=1):
    body = packetId.to_bytes(2, "big") + mqttString(topic) + b"\x00"
    return b"\x82" + mqttLength(len(body)) + body


def mqttPublish(topic, payload):
    """
    PUBLISH, QoS 0, not retained.
    """
    body = mqttString(topic) + payload
    return b"\x30" + mqttLength(len(body)) + body


class MqttStream:
    """
    Splits the MQTT packets carried by a connection's WebSocket data frames
    (a packet may span frames, a frame may carry several packets).
    """

    def __init__(self):
        self._buf = b""

    def packets(self, payloads):
        """
        The (type, packet body) of every whole packet in C{payloads}.
        """
        data = self._buf + b"".join(payloads) if self._buf else b"".join(payloads)
        out = []
        n = len(data)
        i = 0
        while n - i >= 2:
            length = 0
            shift = 0
            j = i + 1
            while True:
                if j >= n:
                    self._buf = data[i:]
                    return out
                byte = data[j]
                length |= (byte & 0x7F) << shift
                j += 1
                if not byte & 0x80:
                    break
                shift += 7
            end = j + length
            if end > n:
                break
            out.append((data[i] >> 4, data[j:end]))
            i = end
        self._buf = data[i:]
        return out


def publishPayload(body):
    """
    The application payload of a QoS 0 PUBLISH packet's body.
    """
    return body[2 + int.from_bytes(body[:2], "big"):]


class MqttSubscriber(Subscriber):
    """
    A QoS 0 MQTT-over-WebSocket subscriber of C{GROUP}: CONNECT, SUBSCRIBE,
    then counts PUBLISH packets.  L{subscribed} fires on the SUBACK.
    """

    collect = True
    _serial = 0

    def __init__(self, request, tally):
        super().__init__(request, tally)
        self.subscribed = defer.Deferred()
        self.stream = MqttStream()
        self.ready.addCallback(self._opened)

    def _opened(self, result):
        MqttSubscriber._serial += 1
        clientId = f"sub-{os.getpid()}-{MqttSubscriber._serial}"
        self.transport.write(clientFrame(mqttConnect(clientId), 0x2)
                             + clientFrame(mqttSubscribe(GROUP), 0x2))
        return result

    def dataFrames(self, count, payloads):
        publishes = 0
        first = None
        for kind, body in self.stream.packets(payloads):
            if kind == 3:
                publishes += 1
                if first is None:
                    first = publishPayload(body)
            elif kind == 9 and not self.subscribed.called:
                self.subscribed.callback(self)
        if publishes:
            self.tally.received(publishes, first)

    def connectionLost(self, reason):
        if not self.subscribed.called:
            self.subscribed.errback(HandshakeFailed(f"no SUBACK: {reason.getErrorMessage()}"))
        super().connectionLost(reason)


class WorkerControl(LineReceiver):
    """
    Commands from the controller, one JSON reply line each, handled strictly
    in order:

      - C{connect N}: open N more subscribers;
      - C{count}: frames received, connections open and lost;
      - C{reach K SECONDS}: reply once K frames have arrived, or at timeout;
      - C{reset}: forget the latency samples taken so far;
      - C{dump PATH}: write the latency samples to PATH (native int64).
    """

    delimiter = b"\n"
    concurrency = 64   # handshakes in flight, so the listen backlog never overflows

    def __init__(self, reactor, port, token, kind="webpubsub"):
        self.reactor = reactor
        self.endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30)
        self.mqtt = kind == "mqtt"
        if self.mqtt:
            self.request = openingHandshake(port, None, "mqtt", "/mqtt")
        else:
            self.request = openingHandshake(port, token)
        self.tally = Tally()
        self._last = defer.succeed(None)

    def lineReceived(self, line):
        words = line.decode("ascii").split()
        self._last.addCallback(lambda _: defer.ensureDeferred(self._run(words)))

    async def _run(self, words):
        verb, args = words[0], words[1:]
        t = self.tally
        try:
            if verb == "connect":
                reply = await self.connect(int(args[0]))
            elif verb == "count":
                reply = {}
            elif verb == "reach":
                d = t.reach(int(args[0]))
                d.addTimeout(float(args[1]), self.reactor)
                try:
                    await d
                except defer.TimeoutError:
                    reply = {"timeout": True}
                else:
                    reply = {}
            elif verb == "reset":
                t.samples = array("q")
                reply = {}
            elif verb == "dump":
                with open(args[0], "wb") as f:
                    t.samples.tofile(f)
                reply = {"samples": len(t.samples)}
            else:
                reply = {"error": f"unknown command {verb!r}"}
        except Exception as e:
            reply = {"error": repr(e)}
        reply.update(frames=t.frames, open=t.open, lost=t.lost)
        self.sendLine(json.dumps(reply).encode("ascii"))

    async def connect(self, n):
        started = time.monotonic()
        sem = defer.DeferredSemaphore(self.concurrency)
        failures = []

        async def one():
            try:
                if self.mqtt:
                    subscriber = MqttSubscriber(self.request, self.tally)
                else:
                    subscriber = Subscriber(self.request, self.tally)
                await connectProtocol(self.endpoint, subscriber)
                await subscriber.ready
                if self.mqtt:
                    await subscriber.subscribed.addTimeout(30, self.reactor)
            except Exception as e:
                failures.append(str(e))
                return
            self.tally.open += 1

        await defer.gatherResults(
            [sem.run(lambda: defer.ensureDeferred(one())) for _ in range(n)])
        return {"seconds": time.monotonic() - started, "failed": len(failures),
                "firstFailure": failures[0] if failures else None}

    def connectionLost(self, reason):
        # The controller went away: so do we.
        if self.reactor.running:
            self.reactor.stop()


def runWorker(port, token, kind="webpubsub"):
    from twisted.internet import reactor

    stdio.StandardIO(WorkerControl(reactor, port, token, kind))
    reactor.run()


if __name__ == "__main__":
    runWorker(int(sys.argv[1]), sys.argv[2], *sys.argv[3:4])


