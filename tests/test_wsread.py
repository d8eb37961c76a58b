"""
Tests for L{broker.net.wsread} (whole small client frames read without
autobahn's per-frame machinery), L{broker.net.wsframe} and
L{broker.net.wsmask.unmask}: the same bytes as autobahn's, and over a real
Web PubSub connection, frames that arrive together, cut, interleaved with
control frames, fragmented, oversized, unmasked or not UTF-8 are read or
refused exactly as autobahn does.
"""

import json
import os
import struct

from autobahn.websocket.protocol import PreparedMessage
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from broker.net.wsframe import PreparedFrame, serverFrame
from broker.net.wsmask import unmask
from tests.wsharness import BrokerHarness, Client


def maskedFrame(payload, opcode=0x1, fin=True, masked=True, rsv=0):
    """
    A client frame as the fast path sees it, built independently of the
    code under test.
    """
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", b0, (0x80 if masked else 0) | n)
    elif n < 0x10000:
        head = struct.pack("!BBH", b0, (0x80 if masked else 0) | 126, n)
    else:
        head = struct.pack("!BBQ", b0, (0x80 if masked else 0) | 127, n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def publish(ackId, data="m", group="g"):
    return json.dumps({"type": "sendToGroup", "group": group, "ackId": ackId,
                       "dataType": "text", "data": data}).encode()


class FrameBytesTests(TestCase):
    def test_serverFrame(self):
        for n in (0, 1, 125, 126, 127, 4095, 65535, 65536, 70000):
            payload = os.urandom(n)
            for binary in (False, True):
                expected = PreparedMessage(payload, binary, False, True).payloadHybi
                self.assertEqual(serverFrame(payload, binary), expected, n)
                prepared = PreparedFrame(payload, binary)
                self.assertEqual(prepared.payloadHybi, expected)
                self.assertIs(prepared.payload, payload)
                self.assertFalse(prepared.doNotCompress)

    def test_unmask(self):
        for n in (0, 1, 2, 3, 4, 5, 63, 64, 125, 1000, 4095):
            mask = os.urandom(4)
            data = os.urandom(n)
            expected = create_xor_masker(mask, n).process(data) if n else b""
            self.assertEqual(unmask(mask, data), expected, n)


class RecordingClient(Client):
    """
    A Web PubSub client that also records the pongs it gets, in order with
    the other frames.
    """

    def onPong(self, payload):
        self.onMessage(b"pong:" + payload, False)


class ReadWholeFramesTests(TestCase):
    timeout = 30

    toml = """
[webpubsub]
max_frame_size = 4000
max_inbound_messages_per_second = 0
"""

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield BrokerHarness(self, reactor, self.toml).start()
        self.client = yield self.connect()

    @defer.inlineCallbacks
    def connect(self):
        from autobahn.twisted.websocket import WebSocketClientFactory
        from twisted.internet.endpoints import TCP4ClientEndpoint

        token = self.broker.token(roles=["webpubsub.sendToGroup", "webpubsub.joinLeaveGroup"])
        factory = WebSocketClientFactory(f"{self.broker.url}/client/hubs/chat?access_token={token}",
                                         protocols=["json.webpubsub.azure.v1"])
        factory.protocol = RecordingClient
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.broker.port.getHost().port)
        client = yield endpoint.connect(factory)
        self.broker.clients.append(client)
        yield client.opened
        connected = yield client.nextJSON()
        self.assertEqual(connected["event"], "connected")
        return client

    @defer.inlineCallbacks
    def acks(self, count):
        got = []
        for _ in range(count):
            payload, _ = yield self.client.next()
            got.append(payload.decode() if payload.startswith(b"pong:") else
                       json.loads(payload)["ackId"])
        return got

    @defer.inlineCallbacks
    def test_manyFramesInOneWrite(self):
        """
        Fifty publishes and a ping in one write, the last frame cut in two:
        every publish is acked in order, the pong in its place.
        """
        frames = [maskedFrame(publish(i)) for i in range(1, 51)]
        frames.insert(25, maskedFrame(b"p1", opcode=0x9))
        data = b"".join(frames)
        self.client.transport.write(data[:-5])
        yield deferLater(0.05)
        self.client.transport.write(data[-5:])
        got = yield self.acks(51)
        self.assertEqual(got, list(range(1, 26)) + ["pong:p1"] + list(range(26, 51)))

    @defer.inlineCallbacks
    def test_extendedLength(self):
        """
        A frame with a two-byte length is read too.  (Binary frames go the
        same way: the MQTT WebSocket tests send nothing else.)
        """
        big = publish(1, "x" * 300)
        self.client.transport.write(maskedFrame(big) + maskedFrame(publish(2)))
        self.assertEqual((yield self.acks(2)), [1, 2])

    @defer.inlineCallbacks
    def test_fragmentedMessage(self):
        body = publish(7)
        data = (maskedFrame(publish(6)) + maskedFrame(body[:10], fin=False)
                + maskedFrame(b"p2", opcode=0x9) + maskedFrame(body[10:], opcode=0x0, fin=True)
                + maskedFrame(publish(8)))
        self.client.transport.write(data)
        self.assertEqual((yield self.acks(4)), [6, "pong:p2", 7, 8])

    @defer.inlineCallbacks
    def assertClosedAfterOneAck(self, bad, code):
        self.client.transport.write(maskedFrame(publish(1)) + bad + maskedFrame(publish(2)))
        self.assertEqual((yield self.acks(1)), [1])
        closed = yield self.client.closed
        self.assertEqual(closed[0], code)
        self.assertEqual(self.client.frames, [])

    @defer.inlineCallbacks
    def test_invalidUTF8(self):
        yield self.assertClosedAfterOneAck(maskedFrame(b'{"type":"\xff"}'), 1007)
        # autobahn fails such a message twice (at the byte, then at the
        # frame's end), arming its closing-handshake timer twice and
        # cancelling only the second when the handshake completes; the
        # first would run, a no-op, five seconds later.
        for call, _ in list(self.broker.factory._batched_timer._buckets.values()):
            call.cancel()

    def test_overFrameLimit(self):
        return self.assertClosedAfterOneAck(maskedFrame(publish(9, "y" * 5000)), 1009)

    def test_unmasked(self):
        return self.assertClosedAfterOneAck(maskedFrame(publish(9), masked=False), 1002)

    def test_reservedBits(self):
        return self.assertClosedAfterOneAck(maskedFrame(publish(9), rsv=4), 1002)

    def test_nonMinimalLength(self):
        frame = maskedFrame(publish(9))
        # The same 60-odd bytes announced with a two-byte length.
        n = frame[1] & 0x7F
        frame = bytes((frame[0], 0x80 | 126)) + struct.pack("!H", n) + frame[2:]
        return self.assertClosedAfterOneAck(frame, 1002)


def deferLater(seconds):
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)
