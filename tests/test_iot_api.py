"""
Tests for L{broker.iot.api}: the central's HTTP(S) JSON API over real
sockets, with devices on real TCP sessions of the concentrator
(L{tests.iotharness}).
"""

import base64
import io
import json
import os

import treq.client
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import UNKNOWN_LENGTH

from broker.core import jsonstrict
from broker.iot import apikeys, frames
from broker.iot.api import APICollector, loadKeys, makeSite
from broker.iot.errors import Refused
from broker.iot.frames import Payload
from broker.iot.jsonpayload import PayloadError, fromJSON, toJSON
from broker.iot.settings import SECTION
from broker.iot.webhook import makeAgent
from tests.iotharness import IoTHarness, waitUntil


def httpSettings(**overrides):
    s = SECTION.check("iot", {})["http"]
    s.update(overrides)
    return s


class APIHarness:
    """
    The concentrator harness plus the API on 127.0.0.1:0 (HTTP or HTTPS),
    with one key for fleet acme and one for fleet other.
    """

    def __init__(self, testCase, tls=False, http=None, **options):
        self.testCase = testCase
        self.tls = tls
        self.http = httpSettings(**(http or {}))
        self.iot = IoTHarness(testCase, reactor, **options)

    @defer.inlineCallbacks
    def start(self):
        tc = self.testCase
        yield self.iot.start()
        self.acmeKey, _ = apikeys.newKey()
        self.otherKey, _ = apikeys.newKey()
        self.keys = apikeys.APIKeys([apikeys.parseLine(apikeys.hashLine("acme", self.acmeKey)),
                                     apikeys.parseLine(apikeys.hashLine("other", self.otherKey))])
        self.site = makeSite(reactor, self.iot.concentrator, self.keys, self.http)
        caFile = None
        if self.tls:
            from tests.certs import makeCertificate
            keyPath, certPath, _ = makeCertificate(tc.mktemp())
            endpoint = serverFromString(
                reactor, f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}")
            caFile = certPath
        else:
            endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        self.port = yield endpoint.listen(self.site)
        tc.addCleanup(self.port.stopListening)
        agent, pool = makeAgent(reactor, persistent=False, caFile=caFile)
        tc.addCleanup(pool.closeCachedConnections)
        self.client = treq.client.HTTPClient(agent)
        scheme = "https" if self.tls else "http"
        host = "localhost" if self.tls else "127.0.0.1"
        self.base = f"{scheme}://{host}:{self.port.getHost().port}"
        return self

    @defer.inlineCallbacks
    def call(self, method, path, body=None, key=None, headers=None, raw=None):
        """
        @return: C{(status, parsed JSON or None, response)}.
        """
        h = {} if key is False else {
            "Authorization": ["Bearer " + (self.acmeKey if key is None else key)]}
        h.update(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            h.setdefault("Content-Type", ["application/json"])
        r = yield self.client.request(method, self.base + path, data=data, headers=h)
        content = yield treq.content(r)
        parsed = json.loads(content) if content else None
        return r.code, parsed, r


def echo(frame):
    return frame.payload


class PayloadJSONTests(TestCase):
    def test_roundTrips(self):
        for p in [Payload.json({"a": [1, 2]}), Payload(frames.BINARY, bytes(range(256))),
                  Payload(frames.ASCII, b"plain"), Payload.text("caf\u00e9 \u2603"),
                  frames.EMPTY]:
            self.assertEqual(fromJSON(json.loads(json.dumps(toJSON(p)))), p)
        self.assertEqual(toJSON(Payload(frames.BINARY, b"\x00\xff")),
                         {"type": "binary", "data": "AP8="})

    def test_jsonChecked(self):
        """
        JSON data is serialised strictly; short data is not parsed again
        (it cannot nest too deep), long data is, so nesting past
        jsonstrict's depth is refused.
        """
        p = fromJSON({"type": "json", "data": {"a": ["\u00e9", 1.5, None]}})
        self.assertEqual((p.type, p.value()), ("json", {"a": ["\u00e9", 1.5, None]}))
        self.assertRaises(PayloadError, fromJSON, {"type": "json", "data": float("nan")})
        deep = 1
        for _ in range(jsonstrict.MAX_DEPTH + 1):
            deep = [deep]
        self.assertRaises(PayloadError, fromJSON, {"type": "json", "data": deep})

    def test_refused(self):
        for bad in [[], {"type": "xml", "data": ""}, {"type": "ascii", "data": "\u00e9"},
                    {"type": "binary", "data": "not base64!"}, {"type": "utf8", "data": 3},
                    {"type": "utf8"}, {"type": "none", "data": "x"},
                    {"type": "json", "data": 1, "extra": 2}]:
            self.assertRaises(PayloadError, fromJSON, bad)


class HeldRequestTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield APIHarness(self).start()

    @defer.inlineCallbacks
    def test_answered(self):
        """
        The HTTP request is held until the device answers; the answer, typed,
        is the response.
        """
        device = yield self.h.iot.device("d1")
        device.onRequest = lambda f: Payload.json({"got": f.payload.value()})
        status, body, _ = yield self.h.call(
            "POST", "/v1/fleets/acme/devices/d1/requests",
            {"payload": {"type": "json", "data": {"read": "temp"}}, "timeout": 5})
        self.assertEqual(status, 200)
        self.assertEqual(body["payload"], {"type": "json", "data": {"got": {"read": "temp"}}})
        self.assertGreaterEqual(body["elapsed"], 0)
        self.assertEqual(self.h.site.api.stats.heldOutcomes, {"answered": 1})
        self.assertEqual(self.h.site.api.stats.held, 0)

    @defer.inlineCallbacks
    def test_deviceJSONAsSent(self):
        """
        A device's JSON answer, however it is spaced, is the response's
        payload data, unchanged in value.
        """
        device = yield self.h.iot.device("d1")
        text = b' { "t" : [ 21.5 , "\\u00e9\xc3\xa9" , null ] }\n'
        device.onRequest = lambda f: Payload(frames.JSON, text)
        status, body, _ = yield self.h.call(
            "POST", "/v1/fleets/acme/devices/d1/requests",
            {"payload": {"type": "json", "data": 1}, "timeout": 5})
        self.assertEqual(status, 200)
        self.assertEqual(body["payload"], {"type": "json", "data": {"t": [21.5, "\u00e9\u00e9", None]}})

    @defer.inlineCallbacks
    def test_everyPayloadType(self):
        device = yield self.h.iot.device("d1")
        device.onRequest = echo
        for p in [{"type": "binary", "data": base64.b64encode(b"\x00\x01\xfe").decode()},
                  {"type": "ascii", "data": "OK"}, {"type": "utf8", "data": "\u00e9t\u00e9"},
                  {"type": "json", "data": [1, None, "x"]}, {"type": "none", "data": None}]:
            status, body, _ = yield self.h.call(
                "POST", "/v1/fleets/acme/devices/d1/requests", {"payload": p})
            self.assertEqual((status, body["payload"]), (200, p))

    @defer.inlineCallbacks
    def test_timeout(self):
        """
        A device that never answers: 504 TIMEOUT after the call's timeout.
        """
        yield self.h.iot.device("d1")
        status, body, _ = yield self.h.call(
            "POST", "/v1/fleets/acme/devices/d1/requests",
            {"payload": {"type": "utf8", "data": "hello?"}, "timeout": 0.2})
        self.assertEqual(status, 504)
        self.assertEqual(body["error"]["code"], "TIMEOUT")
        self.assertEqual(body["error"]["source"], "broker")
        self.assertEqual(self.h.site.api.stats.heldOutcomes, {"timeout": 1})

    @defer.inlineCallbacks
    def test_offlineAndUnknown(self):
        status, body, _ = yield self.h.call(
            "POST", "/v1/fleets/acme/devices/d2/requests", {"payload": {"type": "none"}})
        self.assertEqual((status, body["error"]["code"]), (503, "DEVICE_OFFLINE"))
        status, body, _ = yield self.h.call(
            "POST", "/v1/fleets/acme/devices/nope/requests", {"payload": {"type": "none"}})
        self.assertEqual((status, body["error"]["code"]), (404, "UNKNOWN_DEVICE"))

    @defer.inlineCallbacks
    def test_deviceRefuses(self):
        device = yield self.h.iot.device("d1")

        def refuse(frame):
            raise Refused("no such sensor", "NO_SENSOR")
        device.onRequest = refuse
        status, body, _ = yield self.h.call(
            "POST", "/v1/fleets/acme/devices/d1/requests", {"payload": {"type": "none"}})
        self.assertEqual(status, 502)
        self.assertEqual(body["error"], {"code": "NO_SENSOR", "message": "no such sensor",
                                         "source": "device"})

    @defer.inlineCallbacks
    def test_clientGoneCancels(self):
        """
        A central that hangs up while its request is held cancels the device
        request; the device's late answer is dropped without harm.
        """
        device = yield self.h.iot.device("d1")
        raw = RawHTTP()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.h.port.getHost().port)
        yield connectProtocol(endpoint, raw)
        body = json.dumps({"payload": {"type": "ascii", "data": "slow"}}).encode()
        raw.transport.write(
            b"POST /v1/fleets/acme/devices/d1/requests HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + self.h.acmeKey.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        frame = yield device.nextFrame()
        self.assertEqual((frame.kind, frame.payload), (frames.REQUEST, Payload(frames.ASCII,
                                                                               b"slow")))
        self.assertEqual(self.h.site.api.stats.held, 1)
        raw.transport.abortConnection()
        yield raw.closed
        stats = self.h.site.api.stats
        yield waitUntil(reactor, lambda: stats.heldOutcomes.get("cancelled") == 1)
        self.assertEqual(stats.held, 0)
        session = self.h.iot.concentrator._devices[("acme", "d1")]
        self.assertEqual(session._pending, {})
        device.write(frames.RESPONSE, frame.requestId, Payload.text("too late"))
        # The session survives the stray answer and serves the next request.
        device.onRequest = echo
        status, answer, _ = yield self.h.call(
            "POST", "/v1/fleets/acme/devices/d1/requests",
            {"payload": {"type": "utf8", "data": "again"}})
        self.assertEqual((status, answer["payload"]["data"]), (200, "again"))

    @defer.inlineCallbacks
    def test_deviceGoneWhileHeld(self):
        """
        A device that disconnects while a request waits for it: 503
        DEVICE_OFFLINE at once, not a timeout.
        """
        device = yield self.h.iot.device("d1")
        d = self.h.call("POST", "/v1/fleets/acme/devices/d1/requests",
                        {"payload": {"type": "none"}, "timeout": 30})
        frame = yield device.nextFrame()
        self.assertEqual(frame.kind, frames.REQUEST)
        device.transport.loseConnection()
        status, body, _ = yield d
        self.assertEqual((status, body["error"]["code"]), (503, "DEVICE_OFFLINE"))
        self.assertEqual(self.h.site.api.stats.heldOutcomes, {"device_offline": 1})

    @defer.inlineCallbacks
    def test_heldLongerThanIdleTimeout(self):
        """
        The idle timeout of keep-alive connections closes a silent
        connection, but never one whose request is held.
        """
        self.h.site.timeOut = 0.3
        device = yield self.h.iot.device("d1")
        raw = RawHTTP()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.h.port.getHost().port)
        yield connectProtocol(endpoint, raw)
        body = json.dumps({"payload": {"type": "none"}}).encode()
        raw.transport.write(
            b"POST /v1/fleets/acme/devices/d1/requests HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + self.h.acmeKey.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body)
        frame = yield device.nextFrame()
        yield task.deferLater(reactor, 0.8, lambda: None)
        self.assertEqual(raw.received, b"")
        device.write(frames.RESPONSE, frame.requestId, Payload.text("slow but sure"))
        yield waitUntil(reactor, lambda: b"slow but sure" in raw.received)
        self.assertTrue(raw.received.startswith(b"HTTP/1.1 200 "))
        # Then, idle, the connection is closed.
        yield raw.closed

    @defer.inlineCallbacks
    def test_badTimeout(self):
        yield self.h.iot.device("d1")
        for t in [0, -1, "5", True, 1e9]:
            status, body, _ = yield self.h.call(
                "POST", "/v1/fleets/acme/devices/d1/requests",
                {"payload": {"type": "none"}, "timeout": t})
            self.assertEqual((status, body["error"]["code"]), (400, "BAD_REQUEST"))

    @defer.inlineCallbacks
    def test_overloaded(self):
        self.h.site.api.maxHeld = 1
        yield self.h.iot.device("d1")
        first = self.h.call("POST", "/v1/fleets/acme/devices/d1/requests",
                            {"payload": {"type": "none"}, "timeout": 0.5})
        yield waitUntil(reactor, lambda: self.h.site.api.stats.held == 1)
        status, body, r = yield self.h.call("POST", "/v1/fleets/acme/devices/d1/requests",
                                            {"payload": {"type": "none"}})
        self.assertEqual((status, body["error"]["code"]), (503, "OVERLOADED"))
        self.assertEqual(r.headers.getRawHeaders("retry-after"), ["1"])
        status, _, _ = yield first
        self.assertEqual(status, 504)

    @defer.inlineCallbacks
    def test_fleetLimit(self):
        """
        One fleet's held requests are capped apart from the others'.
        """
        self.h.site.api.maxHeldPerFleet = 1
        yield self.h.iot.device("d1")
        other = yield self.h.iot.device("x1", fleet="other")
        other.onRequest = echo
        first = self.h.call("POST", "/v1/fleets/acme/devices/d1/requests",
                            {"payload": {"type": "none"}, "timeout": 0.5})
        yield waitUntil(reactor, lambda: self.h.site.api.stats.held == 1)
        status, body, _ = yield self.h.call("POST", "/v1/fleets/acme/devices/d1/requests",
                                            {"payload": {"type": "none"}})
        self.assertEqual((status, body["error"]["code"]), (429, "TOO_MANY_HELD"))
        status, _, _ = yield self.h.call("POST", "/v1/fleets/other/devices/x1/requests",
                                         {"payload": {"type": "none"}}, key=self.h.otherKey)
        self.assertEqual(status, 200)
        status, _, _ = yield first
        self.assertEqual(status, 504)
        self.assertEqual(self.h.site.api.heldByFleet, {})

    @defer.inlineCallbacks
    def test_metrics(self):
        device = yield self.h.iot.device("d1")
        device.onRequest = echo
        yield self.h.call("POST", "/v1/fleets/acme/devices/d1/requests",
                          {"payload": {"type": "none"}})
        families = {f.name: f for f in APICollector(self.h.site.api.stats).collect()}
        held = {s.labels.get("outcome"): s.value for s in families["broker_iot_http_held"].samples}
        self.assertEqual(held, {"answered": 1})
        count = [s.value for s in families["broker_iot_http_held_seconds"].samples
                 if s.name.endswith("_count")]
        self.assertEqual(count, [1])


class RawHTTP(Protocol):
    def __init__(self):
        self.received = b""
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(None)


class MessageTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield APIHarness(self, maxQueueDepth=2).start()

    @defer.inlineCallbacks
    def test_queuedForOfflineDevice(self):
        """
        A message for an offline device is accepted (202, queued), counted in
        its queue depth, delivered when it connects and removed on its ACK.
        """
        status, body, _ = yield self.h.call(
            "POST", "/v1/fleets/acme/devices/d2/messages",
            {"payload": {"type": "utf8", "data": "while you were out"}})
        self.assertEqual(status, 202)
        self.assertTrue(body["queued"])
        messageId = body["messageId"]
        status, body, _ = yield self.h.call("GET", "/v1/fleets/acme/devices/d2/queue")
        self.assertEqual((status, body), (200, {"id": "d2", "queueDepth": 1}))
        device = yield self.h.iot.device("d2")
        frame = yield device.nextFrame()
        while frame.kind != frames.MESSAGE:
            frame = yield device.nextFrame()
        self.assertEqual(frame.payload, Payload.text("while you were out"))
        self.assertEqual(str(frame.requestId), messageId)
        device.write(frames.ACK, frame.requestId)
        yield waitUntil(reactor, lambda: self.h.iot.concentrator.stats["messagesAcked"] == 1)
        status, body, _ = yield self.h.call("GET", "/v1/fleets/acme/devices/d2")
        self.assertEqual(body, {"id": "d2", "online": True, "queueDepth": 0})

    @defer.inlineCallbacks
    def test_onlineDevice(self):
        device = yield self.h.iot.device("d1")
        status, body, _ = yield self.h.call(
            "POST", "/v1/fleets/acme/devices/d1/messages",
            {"payload": {"type": "json", "data": {"led": "on"}}})
        self.assertEqual((status, body["queued"]), (202, False))
        frame = yield device.nextFrame()
        while frame.kind != frames.MESSAGE:
            frame = yield device.nextFrame()
        self.assertEqual(frame.payload.value(), {"led": "on"})

    @defer.inlineCallbacks
    def test_queueFull(self):
        for i in range(2):
            status, _, _ = yield self.h.call(
                "POST", "/v1/fleets/acme/devices/d2/messages",
                {"payload": {"type": "ascii", "data": str(i)}})
            self.assertEqual(status, 202)
        status, body, _ = yield self.h.call(
            "POST", "/v1/fleets/acme/devices/d2/messages",
            {"payload": {"type": "ascii", "data": "one too many"}})
        self.assertEqual((status, body["error"]["code"]), (507, "QUEUE_FULL"))

    @defer.inlineCallbacks
    def test_notQueuedOffline(self):
        status, body, _ = yield self.h.call(
            "POST", "/v1/fleets/acme/devices/d2/messages",
            {"payload": {"type": "none"}, "queue": False})
        self.assertEqual((status, body["error"]["code"]), (503, "DEVICE_OFFLINE"))
        status, body, _ = yield self.h.call("GET", "/v1/fleets/acme/devices/d2/queue")
        self.assertEqual(body["queueDepth"], 0)


class DeviceAdminTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield APIHarness(self).start()

    @defer.inlineCallbacks
    def test_list(self):
        yield self.h.iot.device("d1")
        status, body, _ = yield self.h.call("GET", "/v1/fleets/acme/devices")
        self.assertEqual(status, 200)
        self.assertEqual(body, {"fleet": "acme", "devices": [
            {"id": "d1", "online": True, "queueDepth": 0},
            {"id": "d2", "online": False, "queueDepth": 0}]})

    @defer.inlineCallbacks
    def test_issueAndRevoke(self):
        """
        A key issued through the API lets the device authenticate; revoking
        it closes the device's session and refuses the next.
        """
        status, body, _ = yield self.h.call("PUT", "/v1/fleets/acme/devices/new1/key")
        self.assertEqual((status, body["id"]), (200, "new1"))
        device = yield self.h.iot.device("new1", secret=body["key"])
        status, body, _ = yield self.h.call("GET", "/v1/fleets/acme/devices/new1")
        self.assertEqual(body, {"id": "new1", "online": True, "queueDepth": 0})
        status, body, _ = yield self.h.call("DELETE", "/v1/fleets/acme/devices/new1/key")
        self.assertEqual((status, body), (204, None))
        yield device.closed
        status, body, _ = yield self.h.call("DELETE", "/v1/fleets/acme/devices/new1/key")
        self.assertEqual((status, body["error"]["code"]), (404, "UNKNOWN_DEVICE"))


class IsolationAndAuthTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield APIHarness(self, http={"max_body": 1024}).start()

    @defer.inlineCallbacks
    def test_otherFleetForbidden(self):
        """
        Fleet other's key cannot list, read, address or re-key fleet acme's
        devices (403 before anything about acme is looked at), and acme's
        device ids mean nothing in its own fleet (404).
        """
        yield self.h.iot.device("d1")
        k = self.h.otherKey
        for method, path, body in [
                ("GET", "/v1/fleets/acme/devices", None),
                ("GET", "/v1/fleets/acme/devices/d1", None),
                ("GET", "/v1/fleets/acme/devices/d1/queue", None),
                ("POST", "/v1/fleets/acme/devices/d1/requests", {"payload": {"type": "none"}}),
                ("POST", "/v1/fleets/acme/devices/d1/messages", {"payload": {"type": "none"}}),
                ("PUT", "/v1/fleets/acme/devices/d1/key", None),
                ("DELETE", "/v1/fleets/acme/devices/d1/key", None),
                ("GET", "/v1/fleets/nosuch/devices", None)]:
            status, answer, _ = yield self.h.call(method, path, body, key=k)
            self.assertEqual((status, answer["error"]["code"]), (403, "FORBIDDEN"), path)
        status, answer, _ = yield self.h.call(
            "POST", "/v1/fleets/other/devices/d1/requests", {"payload": {"type": "none"}}, key=k)
        self.assertEqual((status, answer["error"]["code"]), (404, "UNKNOWN_DEVICE"))
        status, answer, _ = yield self.h.call("GET", "/v1/fleets/other/devices", key=k)
        self.assertEqual([d["id"] for d in answer["devices"]], ["x1"])
        self.assertTrue(self.h.iot.concentrator.isOnline("acme", "d1"))

    @defer.inlineCallbacks
    def test_missingKey(self):
        status, body, r = yield self.h.call("GET", "/v1/fleets/acme/devices", key=False)
        self.assertEqual((status, body["error"]["code"]), (401, "UNAUTHENTICATED"))
        self.assertEqual(r.headers.getRawHeaders("www-authenticate"), ['Bearer realm="iot"'])

    @defer.inlineCallbacks
    def test_wrongKeys(self):
        real = self.h.acmeKey
        forged = real[:-1] + ("A" if real[-1] != "A" else "B")
        other, _ = apikeys.newKey()
        for k in [forged, other, "iotk_zz", "secret", real + "x"]:
            status, body, _ = yield self.h.call("GET", "/v1/fleets/acme/devices", key=k)
            self.assertEqual((status, body["error"]["code"]), (401, "BAD_API_KEY"), k)
        status, body, _ = yield self.h.call("GET", "/v1/fleets/acme/devices", key=False,
                                            headers={"X-API-Key": [real]})
        self.assertEqual(status, 200)
        self.assertEqual(self.h.site.api.stats.authFailures, {"invalid": 5})

    @defer.inlineCallbacks
    def test_malformedBodies(self):
        yield self.h.iot.device("d1")
        path = "/v1/fleets/acme/devices/d1/messages"
        json_ = {"Content-Type": ["application/json"]}
        cases = [
            (b"{not json", json_, 400, "BAD_JSON"),
            (b"[1, 2]", json_, 400, "BAD_REQUEST"),
            (b'{"payload": {"type": "none"}, "x": 1}', json_, 400, "BAD_REQUEST"),
            (b'{"queue": true}', json_, 400, "BAD_REQUEST"),
            (b'{"payload": {"type": "ascii", "data": "\\u00e9"}}', json_, 400, "BAD_PAYLOAD"),
            (b'{"payload": {"type": "json", "data": NaN}}', json_, 400, "BAD_JSON"),
            # Strict JSON (broker/core/jsonstrict.py): a lone surrogate,
            # deep nesting and a duplicate key make the body not JSON.
            (b'{"payload": {"type": "json", "data": ["\\ud800"]}}', json_, 400, "BAD_JSON"),
            (b'{"payload": {"type": "utf8", "data": "\\udfff"}}', json_, 400, "BAD_JSON"),
            (b'{"payload": {"type": "json", "data": Infinity}}', json_, 400, "BAD_JSON"),
            (b'{"payload": {"type": "json", "data": -Infinity}}', json_, 400, "BAD_JSON"),
            (b'{"payload": {"type": "json", "data": 1e400}}', json_, 400, "BAD_JSON"),
            (b'{"payload": {"type": "json", "data": {"a": 1, "a": 2}}}', json_, 400, "BAD_JSON"),
            (b'{"payload": {"type": "json", "data": ' + b"[" * 63 + b"]" * 63 + b"}}",
             json_, 400, "BAD_JSON"),
            (b"[" * 100000 + b"]" * 100000, json_, 413, "TOO_LARGE"),
            (b"[" * 500 + b"]" * 500, json_, 400, "BAD_JSON"),
            (b"\xff\xfe", json_, 400, "BAD_JSON"),
            (b'{"payload": {"type": "none"}}', {"Content-Type": ["text/plain"]}, 415,
             "UNSUPPORTED_MEDIA_TYPE"),
            (b'{"payload": {"type": "utf8", "data": "' + b"x" * 2000 + b'"}}', json_, 413,
             "TOO_LARGE"),
        ]
        for raw, headers, status, code in cases:
            got, body, _ = yield self.h.call("POST", path, raw=raw, headers=headers)
            self.assertEqual((got, body["error"]["code"]), (status, code), raw[:40])
        self.assertEqual(self.h.iot.concentrator.stats["messagesDirect"]
                         + self.h.iot.concentrator.stats["messagesQueued"], 0)

    @defer.inlineCallbacks
    def test_oversizedDeclared(self):
        """
        A Content-Length over max_body is refused before the body is sent,
        and the connection closed.
        """
        raw = RawHTTP()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.h.port.getHost().port)
        yield connectProtocol(endpoint, raw)
        raw.transport.write(
            b"POST /v1/fleets/acme/devices/d1/messages HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + self.h.acmeKey.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{")
        yield raw.closed
        head, _, body = raw.received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
        self.assertEqual(json.loads(body)["error"]["code"], "TOO_LARGE")

    @defer.inlineCallbacks
    def test_oversizedChunked(self):
        """
        A chunked body (no Content-Length) past max_body is cut off too.
        """
        producer = FileBodyProducer(io.BytesIO(b"{" + b" " * 5000 + b"}"))
        producer.length = UNKNOWN_LENGTH  # sent chunked
        r = yield self.h.client.request(
            "POST", self.h.base + "/v1/fleets/acme/devices/d1/messages", data=producer,
            headers={"Authorization": ["Bearer " + self.h.acmeKey],
                     "Content-Type": ["application/json"]})
        content = json.loads((yield treq.content(r)))
        self.assertEqual((r.code, content["error"]["code"]), (413, "TOO_LARGE"))

    @defer.inlineCallbacks
    def test_paths(self):
        for method, path, status, code in [
                ("GET", "/", 404, "NOT_FOUND"),
                ("GET", "/v1/fleets/acme", 404, "NOT_FOUND"),
                ("GET", "/v1/fleets/acme/devices/d1/nothing", 404, "NOT_FOUND"),
                ("GET", "/v1/fleets/acme/devices/d1/a/b", 404, "NOT_FOUND"),
                ("DELETE", "/v1/fleets/acme/devices", 405, "METHOD_NOT_ALLOWED"),
                ("GET", "/v1/fleets/acme/devices/d1/requests", 405, "METHOD_NOT_ALLOWED"),
                ("GET", "/v1/fleets/acme/devices/%FF", 400, "BAD_REQUEST")]:
            got, body, _ = yield self.h.call(method, path)
            self.assertEqual((got, body["error"]["code"]), (status, code), path)
        got, body, _ = yield self.h.call("GET", "/v1/fleets/acme/devices/d%201")
        self.assertEqual((got, body["error"]["code"]), (404, "UNKNOWN_DEVICE"))


class HTTPSTests(TestCase):
    @defer.inlineCallbacks
    def test_heldRequestOverTLS(self):
        h = yield APIHarness(self, tls=True).start()
        device = yield h.iot.device("d1")
        device.onRequest = echo
        status, body, _ = yield h.call("POST", "/v1/fleets/acme/devices/d1/requests",
                                       {"payload": {"type": "utf8", "data": "secure"}})
        self.assertEqual((status, body["payload"]["data"]), (200, "secure"))
        self.assertTrue(h.base.startswith("https://"))


class KeyConfigTests(TestCase):
    def test_developmentKey(self):
        """
        With no key configured, a development key for fleet demo is made
        once in the state directory (mode 0600) and kept.
        """
        state = self.mktemp()
        entries, path = loadKeys(httpSettings(), state)
        self.assertEqual(oct(os.stat(path).st_mode & 0o777), "0o600")
        with open(path) as f:
            key = f.read().strip()
        self.assertEqual(apikeys.APIKeys(entries).fleetOf(key)[0], "demo")
        self.assertEqual(loadKeys(httpSettings(), state)[0], entries)

    def test_configAndFile(self):
        k1, _ = apikeys.newKey()
        k2, _ = apikeys.newKey()
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# fleet b\n\n" + apikeys.hashLine("b", k2) + "  # the central\n")
        entries, dev = loadKeys(httpSettings(api_keys=[apikeys.hashLine("a", k1)],
                                             api_key_file=path), self.mktemp())
        self.assertIsNone(dev)
        keys = apikeys.APIKeys(entries)
        self.assertEqual((keys.fleetOf(k1)[0], keys.fleetOf(k2)[0]), ("a", "b"))

    def test_badFile(self):
        from broker.config import ConfigError
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("a:deadbeef:short\n")
        e = self.assertRaises(ConfigError, loadKeys, httpSettings(api_key_file=path),
                              self.mktemp())
        self.assertIn("iot.http.api_key_file", str(e))
        self.assertIn("line 1", str(e))


class PayloadFuzzTests(TestCase):
    """
    Hypothesis-generated JSON as payload objects: either a Payload that
    survives the round trip or a PayloadError, never anything else.
    """

    def test_arbitraryObjects(self):
        from hypothesis import given, settings
        from hypothesis import strategies as st

        scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                                          allow_infinity=False)
                   | st.text())
        values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                              | st.dictionaries(st.text(max_size=8), children, max_size=4),
                              max_leaves=12)
        objects = st.fixed_dictionaries(
            {}, optional={"type": st.sampled_from(["json", "utf8", "ascii", "binary", "none"])
                          | st.text(max_size=6), "data": values | st.binary().map(
                              lambda b: base64.b64encode(b).decode()),
                          "extra": values}) | values

        @settings(max_examples=400, deadline=None)
        @given(objects)
        def check(obj):
            try:
                p = fromJSON(obj)
            except PayloadError:
                return
            self.assertEqual(fromJSON(json.loads(json.dumps(toJSON(p)))), p)
        check()


class RequestFuzzTests(TestCase):
    """
    Hypothesis-generated HTTP requests (methods, paths, headers, bodies) fed
    to the API's real HTTP channel over a StringTransport, with a real
    concentrator on an in-memory store: every answer is a well-formed HTTP
    response with the JSON error shape, never a 500, never an exception.
    """

    def test_arbitraryRequests(self):
        from hypothesis import given, settings
        from hypothesis import strategies as st
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from broker.core.router import Core
        from broker.iot.auth import Registry
        from broker.iot.concentrator import Concentrator
        from broker.iot.store import MemoryMessageStore
        from tests.iotharness import fleets

        clock = Clock()
        concentrator = Concentrator(clock, Core(clock), Registry(fleets()), MemoryMessageStore())
        key, _ = apikeys.newKey()
        keys = apikeys.APIKeys([apikeys.parseLine(apikeys.hashLine("acme", key))])
        site = makeSite(clock, concentrator, keys, httpSettings(max_body=2048))

        def mostly(usual, rare):
            # one_of() would merge repeated strategies; weight by hand.
            return st.sampled_from([usual, usual, usual, rare]).flatmap(lambda x: x)

        segment = st.sampled_from(["v1", "fleets", "acme", "other", "devices", "d1", "d2",
                                   "requests", "messages", "queue", "key", "", "%FF", "%2F",
                                   "x" * 300]) | st.text(
            alphabet=st.characters(min_codepoint=33, max_codepoint=126,
                                   blacklist_characters="/?#% "), max_size=10)
        routes = st.tuples(st.sampled_from(["acme", "acme", "other"]),
                           st.sampled_from(["/d1", "/d2", "/d1", "/d2", "", "/zz", "/d%201"]),
                           st.sampled_from(["/requests", "/messages", "", "/queue", "/key"])).map(
            lambda t: f"/v1/fleets/{t[0]}/devices{t[1]}{t[2] if t[1] else ''}")
        junkPaths = st.lists(segment, max_size=7).map(lambda s: "/" + "/".join(s))
        paths = mostly(routes, junkPaths)
        validPayloads = st.sampled_from([{"type": "none"}, {"type": "utf8", "data": "hi"},
                                         {"type": "json", "data": [1]},
                                         {"type": "binary", "data": "AA=="}])
        junkPayloads = st.fixed_dictionaries({}, optional={
            "type": st.sampled_from(["json", "utf8", "ascii", "binary", "none", "xml"]),
            "data": st.none() | st.text(max_size=20) | st.integers() | st.lists(st.integers())})

        payloads = st.sampled_from([validPayloads, junkPayloads]).flatmap(lambda x: x)
        bodies = (st.fixed_dictionaries({"payload": payloads}, optional={
            "timeout": st.none() | st.floats(allow_nan=False) | st.text() | st.just(1),
            "queue": st.booleans() | st.integers(), "other": st.integers()}).map(
                lambda o: json.dumps(o).encode())
            | st.binary(max_size=64) | st.just(b""))
        bodies = mostly(bodies, st.just(b"{" * 3000))
        auth = st.sampled_from(["Bearer " + key] * 6 + ["bearer " + key, None, "Bearer nope",
                                                        "Basic x"])

        @settings(max_examples=500, deadline=None)
        @given(st.sampled_from(["POST"] * 4 + ["GET", "PUT", "DELETE", "PATCH", "HEAD"]), paths,
               auth, st.sampled_from(["application/json", None, "text/plain"]), bodies)
        def check(method, path, authorization, ctype, body):
            headers = [f"{method} {path} HTTP/1.1", "Host: x",
                       f"Content-Length: {len(body)}"]
            if authorization:
                headers.append(f"Authorization: {authorization}")
            if ctype:
                headers.append(f"Content-Type: {ctype}")
            raw = ("\r\n".join(headers) + "\r\n\r\n").encode() + body
            transport = StringTransport()
            channel = site.buildProtocol(None)
            channel.makeConnection(transport)
            channel.dataReceived(raw)
            clock.advance(60)
            out = transport.value()
            channel.connectionLost(None)
            self.assertTrue(out.startswith(b"HTTP/1.1 "), out[:80])
            status = int(out[9:12])
            self.assertIn(status, (200, 202, 204, 400, 401, 403, 404, 405, 413, 415, 503, 504,
                                   507), out[:200])
            if status >= 400 and method != "HEAD":
                answer = json.loads(out.partition(b"\r\n\r\n")[2])
                self.assertEqual(set(answer["error"]), {"code", "message", "source"})
        check()
        self.assertEqual(self.flushLoggedErrors(), [])
