"""
A lean MQTT 3.1.1 load client for the benchmarks (L{bench/mqtt.py}, and any
benchmark that needs MQTT subscribers or a publisher, such as a Web PubSub
vs MQTT comparison): raw Twisted protocols that build the few packets they
send by hand and only walk the fixed headers of what they receive.

The load must cost less than the broker measured, or the figures measure
the client: a subscriber reads a delivery's timestamp only when latency is
being measured, and acknowledges a whole read's QoS 1 deliveries in one
write.  3.1.1 is what every broker compared speaks (amqtt has no 5.0).

Payload layout (as bench/fanout.py): C{"<seq:20> <monotonic ns:20> "} then
padding to the payload size; C{time.monotonic_ns()} is system-wide on Linux,
so publisher and subscribers may live in different processes.
"""

import struct
import time

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, DISCONNECT = 8, 9, 14
_STAMP = slice(21, 41)


def remainingLength(n):
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(kind, flags, body):
    return bytes([kind << 4 | flags]) + remainingLength(len(body)) + body


def string(s):
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def connectPacket(clientId, keepAlive=0, username=None, password=None, clean=True):
    flags = 0x02 if clean else 0
    payload = string(clientId)
    if username is not None:
        flags |= 0x80
        payload += string(username)
    if password is not None:
        flags |= 0x40
        payload += string(password)
    return packet(CONNECT, 0, string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepAlive)
                  + payload)


def subscribePacket(packetId, topicFilter, qos):
    return packet(SUBSCRIBE, 2, struct.pack("!H", packetId) + string(topicFilter) + bytes([qos]))


def publishPacket(topic, payload, qos=0, packetId=0):
    head = string(topic) + (struct.pack("!H", packetId) if qos else b"")
    return packet(PUBLISH, qos << 1, head + payload)


def pubackPacket(packetId):
    return b"\x40\x02" + struct.pack("!H", packetId)


def stampedPayload(seq, size):
    head = b"%020d %020d " % (seq, time.monotonic_ns())
    return head + b"x" * (size - len(head))


class MqttError(Exception):
    pass


class MqttClient(Protocol):
    """
    One MQTT 3.1.1 connection.  C{onPublish(qos, packetId, payload)} is
    called per PUBLISH received only when set (subscribers that count leave
    it unset and use L{deliveries}); QoS 1 deliveries are acknowledged.
    """

    onPublish = None
    tally = None

    def __init__(self):
        self._buf = b""
        self._waiting = {}
        self._nextId = 0
        self.deliveries = 0
        self.closed = defer.Deferred()

    def connectionMade(self):
        # As device clients do (paho sets it too): a PUBACK must not wait
        # for Nagle's algorithm behind the broker's delayed ACK.
        self.transport.setTcpNoDelay(True)

    def connectionLost(self, reason):
        for d in self._waiting.values():
            d.errback(MqttError(f"connection lost: {reason.value}"))
        self._waiting.clear()
        self.closed.callback(None)

    def _expect(self, key):
        d = defer.Deferred()
        self._waiting[key] = d
        return d

    def newPacketId(self):
        self._nextId = self._nextId % 65535 + 1
        return self._nextId

    def connect(self, clientId, **kw):
        self.transport.write(connectPacket(clientId, **kw))
        return self._expect(CONNACK)

    def subscribe(self, topicFilter, qos=0):
        pid = self.newPacketId()
        self.transport.write(subscribePacket(pid, topicFilter, qos))
        return self._expect((SUBACK, pid))

    def publish(self, topic, payload, qos=0):
        """QoS 0: None.  QoS 1: a Deferred fired by the PUBACK."""
        if not qos:
            self.transport.write(publishPacket(topic, payload))
            return None
        pid = self.newPacketId()
        self.transport.write(publishPacket(topic, payload, qos, pid))
        return self._expect((PUBACK, pid))

    def dataReceived(self, data):
        buf = self._buf + data if self._buf else data
        n = len(buf)
        i = 0
        acks = []
        stamps = None
        count = 0
        tally = self.tally
        while i + 2 <= n:
            b1 = buf[i + 1]
            if b1 < 128:
                start, length = i + 2, b1
            else:
                length, shift, j, complete = 0, 0, i + 1, False
                while j < n and j < i + 5:
                    byte = buf[j]
                    j += 1
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        complete = True
                        break
                if not complete:
                    break
                start = j
            end = start + length
            if end > n:
                break
            kind = buf[i] >> 4
            if kind == PUBLISH:
                count += 1
                qos = (buf[i] >> 1) & 3
                if qos or self.onPublish is not None or (tally is not None and tally.stamps):
                    tlen = buf[start] << 8 | buf[start + 1]
                    p = start + 2 + tlen
                    pid = 0
                    if qos:
                        pid = buf[p] << 8 | buf[p + 1]
                        p += 2
                        acks.append(pubackPacket(pid))
                    if self.onPublish is not None:
                        self.onPublish(qos, pid, buf[p:end])
                    elif tally is not None and tally.stamps:
                        if stamps is None:
                            stamps = []
                        stamps.append(int(buf[p + _STAMP.start:p + _STAMP.stop]))
            elif kind == CONNACK:
                d = self._waiting.pop(CONNACK, None)
                if d is not None:
                    if buf[start + 1]:
                        d.errback(MqttError(f"CONNACK return code {buf[start + 1]}"))
                    else:
                        d.callback(None)
            elif kind in (SUBACK, PUBACK):
                pid = buf[start] << 8 | buf[start + 1]
                d = self._waiting.pop((kind, pid), None)
                if d is not None:
                    if kind == SUBACK and buf[start + 2] == 0x80:
                        d.errback(MqttError("subscription refused"))
                    else:
                        d.callback(buf[start + 2] if kind == SUBACK else None)
            i = end
        self._buf = buf[i:] if i < n else b""
        if acks:
            self.transport.write(b"".join(acks))
        if count:
            self.deliveries += count
            if tally is not None:
                tally.received(count, stamps)


class Tally:
    """
    Deliveries counted across every subscriber of one process; when
    C{stamps} is set, each delivery's latency in ns, read at arrival.
    C{onDelivery()} (the publisher's pump) runs after each read.
    """

    def __init__(self):
        self.count = 0
        self.stamps = False
        self.latencies = []
        self.onDelivery = None

    def received(self, count, stamps):
        self.count += count
        if stamps:
            now = time.monotonic_ns()
            self.latencies.extend(now - s for s in stamps)
        if self.onDelivery is not None:
            self.onDelivery()


async def connectClient(reactor, port, clientId, tally=None, host="127.0.0.1", **kw):
    """A connected (CONNACK received) L{MqttClient}."""
    client = MqttClient()
    client.tally = tally
    await connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=30), client)
    await client.connect(clientId, **kw)
    return client


async def subscribers(reactor, port, count, topic, qos, tally, prefix="sub", batch=100):
    """
    C{count} clients subscribed to C{topic}, connected C{batch} at a time
    (a thousand SYNs at once overflow a listener's backlog).
    """
    out = []
    for first in range(0, count, batch):
        clients = await defer.gatherResults([
            defer.ensureDeferred(connectClient(reactor, port, f"{prefix}{i}", tally))
            for i in range(first, min(count, first + batch))], consumeErrors=True)
        await defer.gatherResults([c.subscribe(topic, qos) for c in clients],
                                  consumeErrors=True)
        out.extend(clients)
    return out


async def closeAll(clients):
    for c in clients:
        if c.transport is not None and c.transport.connected:
            c.transport.write(packet(DISCONNECT, 0, b""))
            c.transport.loseConnection()
    await defer.gatherResults([c.closed for c in clients])
