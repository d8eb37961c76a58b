"""
Strict JSON (L{broker.core.jsonstrict}) for the IoT C{json} payload type,
over real sockets: TCP frames of devices and centrals, UDP telemetry.  (The
HTTP API's bodies are in tests/test_iot_api.py, the webhook's answers in
tests/test_iot_webhook.py.)
"""

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase

from broker.iot import auth, frames
from broker.iot.frames import Payload
from tests.iotharness import IoTHarness, waitUntil

NOT_JSON = [b"NaN", b"Infinity", b"-Infinity", b"[1e400]", b'{"x":1,"x":2}',
            b"[" * 65 + b"]" * 65, b"[" * 100000 + b"]" * 100000, b'"\\ud800"',
            b"\xef\xbb\xbf{}", b'"\xff"']


def rawFrame(kind, requestId, ptype, data, address=b""):
    body = frames.HEADER.pack(1, kind, requestId, ptype, len(address)) + address + data
    return frames.LENGTH.pack(len(body)) + body


class Sender(DatagramProtocol):
    pass


class StrictPayloadTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield IoTHarness(self, reactor).start()

    @defer.inlineCallbacks
    def test_deviceMessages(self):
        """
        Each not-quite-JSON json payload from a device gets an ERROR
        BAD_PAYLOAD with its request id; the central receives none of them,
        and the session goes on.
        """
        central = yield self.h.central()
        d = yield self.h.device("d1")
        for n, data in enumerate(NOT_JSON, 1):
            d.transport.write(rawFrame(frames.MESSAGE, n, frames.PAYLOAD_CODES[frames.JSON],
                                       data))
        for n in range(1, len(NOT_JSON) + 1):
            f = yield d.nextFrame()
            self.assertEqual((f.kind, f.requestId, f.payload.value()["code"]),
                             (frames.ERROR, n, "BAD_PAYLOAD"))
        self.assertEqual(self.h.factory.counters.badFrames, len(NOT_JSON))
        d.write(frames.MESSAGE, 99, Payload.json({"ok": [1.5]}))
        ack = yield d.nextFrame()
        self.assertEqual((ack.kind, ack.requestId), (frames.ACK, 99))
        m = yield central.nextFrame()
        self.assertEqual((m.kind, m.address, m.payload.value()),
                         (frames.MESSAGE, "d1", {"ok": [1.5]}))

    @defer.inlineCallbacks
    def test_errorSaysWhy(self):
        d = yield self.h.device("d1")
        for data, why in ((b"NaN", "NaN is not JSON"), (b'{"x":1,"x":2}', "duplicate key 'x'"),
                          (b"[" * 100000 + b"]" * 100000, "nesting deeper than 64 levels")):
            d.transport.write(rawFrame(frames.MESSAGE, 1, frames.PAYLOAD_CODES[frames.JSON],
                                       data))
            f = yield d.nextFrame()
            self.assertEqual(f.payload.value()["code"], "BAD_PAYLOAD")
            self.assertIn(why, f.payload.value()["message"])

    @defer.inlineCallbacks
    def test_centralMessages(self):
        """
        A central's MESSAGE to a device with a NaN json payload is refused
        the same way; the device receives nothing of it.
        """
        d = yield self.h.device("d1")
        central = yield self.h.central()
        central.transport.write(rawFrame(frames.MESSAGE, 5, frames.PAYLOAD_CODES[frames.JSON],
                                         b"[NaN]", b"d1"))
        f = yield central.nextFrame()
        self.assertEqual((f.kind, f.requestId, f.payload.value()["code"]),
                         (frames.ERROR, 5, "BAD_PAYLOAD"))
        central.write(frames.MESSAGE, 6, Payload.json([1]), "d1")
        m = yield d.nextFrame()
        self.assertEqual((m.kind, m.payload.value()), (frames.MESSAGE, [1]))

    @defer.inlineCallbacks
    def test_telemetryDatagrams(self):
        """
        A UDP datagram with a not-quite-JSON json payload is counted
        malformed, does not spend its token and reaches no one.
        """
        sender = Sender()
        port = reactor.listenUDP(0, sender, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        central = yield self.h.central()
        d = yield self.h.device("d1")
        tokens = yield d.waitTokens(2)
        small = [data for data in NOT_JSON if len(data) < 1000]
        key = auth.tokenKey(d.udpKey, tokens[0])
        for data in small:
            # Authentic (its MAC is right), but its json payload is not JSON.
            signed = b"\x02" + tokens[0] + b"\x04" + data
            sender.transport.write(signed + frames.datagramMac(key, signed), self.h.udpAddress)
        yield waitUntil(reactor, lambda: self.h.udp.counts["malformed"] >= len(small))
        sender.transport.write(d.datagram(Payload.json({"t": 1}), tokens[0]), self.h.udpAddress)
        f = yield central.nextFrame()
        self.assertEqual((f.kind, f.payload.value()), (frames.TELEMETRY, {"t": 1}))
        self.assertEqual(self.h.udp.counts["accepted"], 1)


class StrictAPITests(TestCase):
    """
    The HTTP API's bodies (the other cases are in tests/test_iot_api.py):
    nesting 100,000 levels deep under a body limit that lets it through.
    """

    @defer.inlineCallbacks
    def test_deepBody(self):
        from tests.test_iot_api import APIHarness
        h = yield APIHarness(self, http={"max_body": 300000}).start()
        yield h.iot.device("d1")
        path = "/v1/fleets/acme/devices/d1/messages"
        for raw in (b'{"payload": {"type": "json", "data": ' + b"[" * 100000 + b"]" * 100000
                    + b"}}", b"[" * 100000 + b"]" * 100000, b'{"payload": {"type": "json", '
                    b'"data": ' + b"[" * 63 + b"]" * 63 + b"}}"):
            code, body, _ = yield h.call("POST", path, raw=raw,
                                         headers={"Content-Type": ["application/json"]})
            self.assertEqual((code, body["error"]["code"]), (400, "BAD_JSON"))
            self.assertIn("nesting deeper than 64 levels", body["error"]["message"])
        self.assertEqual(h.iot.concentrator.stats["messagesDirect"]
                         + h.iot.concentrator.stats["messagesQueued"], 0)
