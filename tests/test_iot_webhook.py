"""
Tests for L{broker.iot.webhook}: deliveries to a real twisted.web upstream
on 127.0.0.1 (plain and TLS), signatures checked as a central would, retries,
refusals, timeouts, and a device's request answered through the webhook.
"""

import json

import treq.client
from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString
from twisted.trial.unittest import TestCase
from twisted.web import server
from twisted.web.resource import Resource

from broker.iot import errors, frames
from broker.iot.frames import Payload
from broker.iot.settings import SECTION
from broker.iot.webhook import (BadCentralResponse, CentralUnavailable, WebhookCollector,
                                WebhookLink, Webhooks, makeAgent, verify)
from tests.iotharness import IoTHarness, waitUntil

SECRET = b"test-signing-secret"


class Upstream(Resource):
    """
    A central's webhook endpoint: records each request and answers with the
    next of C{script} (C{(status, body)}, or C{"hang"} to never answer).
    """

    isLeaf = True

    def __init__(self, script=()):
        super().__init__()
        self.script = list(script)
        self.default = (200, b'{"payload": {"type": "none"}}')
        self.seen = []
        self.hung = []

    def render_POST(self, request):
        body = request.content.read()
        self.seen.append({
            "body": body, "event": json.loads(body),
            "headers": {k.decode().lower(): v[0].decode()
                        for k, v in request.requestHeaders.getAllRawHeaders()}})
        action = self.script.pop(0) if self.script else self.default
        if action == "hang":
            self.hung.append(request)
            return server.NOT_DONE_YET
        status, content = action
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return content


class WebhookTestMixin:
    tls = False

    @defer.inlineCallbacks
    def startUpstream(self, script=()):
        self.upstream = Upstream(script)
        site = server.Site(self.upstream)
        caFile = None
        if self.tls:
            from tests.certs import makeCertificate
            keyPath, certPath, _ = makeCertificate(self.mktemp())
            endpoint = serverFromString(
                reactor, f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}")
            caFile = certPath
        else:
            endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        self.caFile = caFile
        port = yield endpoint.listen(site)
        self.addCleanup(port.stopListening)
        agent, pool = makeAgent(reactor, persistent=False, caFile=caFile)
        self.addCleanup(pool.closeCachedConnections)
        self.client = treq.client.HTTPClient(agent)
        host = "localhost" if self.tls else "127.0.0.1"
        self.url = f"{'https' if self.tls else 'http'}://{host}:{port.getHost().port}/hook"

    def link(self, **kw):
        options = dict(timeout=2.0, retries=2, backoff=0.01, maxBackoff=0.05)
        options.update(kw)
        return WebhookLink(reactor, self.client, "acme", self.url, "central-api-key", SECRET,
                           **options)


class DeliveryTests(WebhookTestMixin, TestCase):
    @defer.inlineCallbacks
    def test_requestAnswered(self):
        """
        A device's request is POSTed, signed, with the API key; the
        central's payload is the answer.
        """
        yield self.startUpstream([(200, b'{"payload": {"type": "utf8", "data": "ok \\u2713"}}')])
        link = self.link()
        answer = yield link.deviceRequest("acme", "d1", Payload.json({"door": "open"}))
        self.assertEqual(answer, Payload.text("ok \u2713"))
        [seen] = self.upstream.seen
        h = seen["headers"]
        self.assertEqual(h["authorization"], "Bearer central-api-key")
        self.assertEqual(h["content-type"], "application/json")
        self.assertTrue(verify(SECRET, h["x-iot-timestamp"], seen["body"], h["x-iot-signature"]))
        self.assertFalse(verify(b"other", h["x-iot-timestamp"], seen["body"],
                                h["x-iot-signature"]))
        self.assertFalse(verify(SECRET, h["x-iot-timestamp"], seen["body"] + b" ",
                                h["x-iot-signature"]))
        self.assertFalse(verify(SECRET, int(h["x-iot-timestamp"]) - 3600, seen["body"],
                                h["x-iot-signature"]))
        event = seen["event"]
        self.assertEqual({k: event[k] for k in ("kind", "fleet", "device", "payload")},
                         {"kind": "request", "fleet": "acme", "device": "d1",
                          "payload": {"type": "json", "data": {"door": "open"}}})
        self.assertEqual(event["id"], h["x-iot-delivery"])
        self.assertEqual(link.stats.outcomes, {("request", "ok"): 1})

    @defer.inlineCallbacks
    def test_emptyAnswer(self):
        yield self.startUpstream([(204, b"")])
        answer = yield self.link().deviceRequest("acme", "d1", frames.EMPTY)
        self.assertEqual(answer, frames.EMPTY)

    @defer.inlineCallbacks
    def test_retriedThenAnswered(self):
        """
        5xx answers are retried with the same delivery id, each attempt
        signed afresh.
        """
        yield self.startUpstream([(503, b""), (429, b"slow down"),
                                  (200, b'{"payload": {"type": "ascii", "data": "third"}}')])
        link = self.link()
        answer = yield link.deviceRequest("acme", "d1", Payload.text("x"))
        self.assertEqual(answer, Payload(frames.ASCII, b"third"))
        seen = self.upstream.seen
        self.assertEqual([s["headers"]["x-iot-attempt"] for s in seen], ["1", "2", "3"])
        self.assertEqual(len({s["headers"]["x-iot-delivery"] for s in seen}), 1)
        for s in seen:
            self.assertTrue(verify(SECRET, s["headers"]["x-iot-timestamp"], s["body"],
                                   s["headers"]["x-iot-signature"]))
        self.assertEqual((link.stats.attempts, link.stats.retries), (3, 2))

    @defer.inlineCallbacks
    def test_failsAfterRetries(self):
        yield self.startUpstream([(500, b"")] * 3)
        link = self.link(retries=2)
        yield self.assertFailure(link.deviceRequest("acme", "d1", frames.EMPTY),
                                 CentralUnavailable)
        self.assertEqual(len(self.upstream.seen), 3)
        self.assertEqual(link.stats.outcomes, {("request", "failed"): 1})

    @defer.inlineCallbacks
    def test_noRetryOn4xx(self):
        """
        A 4xx is the central's answer: not retried, its error passed on.
        """
        yield self.startUpstream(
            [(403, b'{"error": {"code": "NOT_ALLOWED", "message": "door stays shut"}}')])
        e = yield self.assertFailure(self.link().deviceRequest("acme", "d1", frames.EMPTY),
                                     errors.Refused)
        self.assertEqual((e.code, e.message), ("NOT_ALLOWED", "door stays shut"))
        self.assertEqual(len(self.upstream.seen), 1)
        yield self.startUpstream([(404, b"not json")])
        e = yield self.assertFailure(self.link().deviceRequest("acme", "d1", frames.EMPTY),
                                     errors.Refused)
        self.assertEqual(e.code, "CENTRAL_REFUSED")

    @defer.inlineCallbacks
    def test_timeoutRetried(self):
        yield self.startUpstream(["hang", "hang"])
        link = self.link(timeout=0.2, retries=1)
        yield self.assertFailure(link.deviceRequest("acme", "d1", frames.EMPTY),
                                 CentralUnavailable)
        self.assertEqual(len(self.upstream.seen), 2)

    @defer.inlineCallbacks
    def test_unreachable(self):
        yield self.startUpstream()
        self.url = "http://127.0.0.1:1/hook"
        link = self.link(retries=1)
        e = yield self.assertFailure(link.deviceRequest("acme", "d1", frames.EMPTY),
                                     CentralUnavailable)
        self.assertIn("2 time(s)", e.message)

    @defer.inlineCallbacks
    def test_badAnswers(self):
        json = b'{"payload": {"type": "json", "data": %s}}'
        for body in [b"{", b'{"nopayload": 1}', b'{"payload": {"type": "ascii", "data": "\\u00e9"}}',
                     b"x" * 5000,
                     # Strict JSON (broker/core/jsonstrict.py) only.
                     json % b"NaN", json % b"[Infinity]", json % b"-Infinity", json % b"1e400",
                     json % b'"\\ud800"', json % (b"[" * 63 + b"]" * 63),
                     b'{"payload": {"type": "none"}, "payload": {"type": "none"}}',
                     b"\xef\xbb\xbf" + json % b"1", json % b'"\xff"']:
            yield self.startUpstream([(200, body)])
            yield self.assertFailure(
                self.link(maxResponse=4096).deviceRequest("acme", "d1", frames.EMPTY),
                BadCentralResponse)
        yield self.startUpstream([(200, json % (b"[" * 100000 + b"]" * 100000))])
        e = yield self.assertFailure(
            self.link(maxResponse=300000).deviceRequest("acme", "d1", frames.EMPTY),
            BadCentralResponse)
        self.assertIn("nesting deeper than 64 levels", str(e))

    @defer.inlineCallbacks
    def test_cancelStopsRetries(self):
        """
        Cancelling a delivery (the concentrator's own timeout) stops it:
        no further attempt is made.
        """
        yield self.startUpstream(["hang"])
        link = self.link(timeout=5, retries=5)
        d = link.deviceRequest("acme", "d1", frames.EMPTY)
        yield waitUntil(reactor, lambda: len(self.upstream.seen) == 1)
        d.cancel()
        yield self.assertFailure(d, defer.CancelledError)
        yield waitUntil(reactor, lambda: link.stats.inFlight == 0)
        self.assertEqual(link.stats.outcomes, {("request", "cancelled"): 1})
        self.assertEqual(len(self.upstream.seen), 1)

    @defer.inlineCallbacks
    def test_telemetryAndMessages(self):
        """
        Telemetry is posted once (failures counted, not retried); messages
        are retried; neither makes anyone wait.
        """
        yield self.startUpstream([(500, b""), (200, b""), (500, b""), (200, b"")])
        link = self.link()
        link.telemetry("acme", "d1", Payload.json({"t": 21.5}))
        yield waitUntil(reactor, lambda: link.stats.inFlight == 0)
        self.assertEqual(link.stats.outcomes, {("telemetry", "failed"): 1})
        link.telemetry("acme", "d1", Payload.json({"t": 22}))
        yield waitUntil(reactor, lambda: ("telemetry", "ok") in link.stats.outcomes)
        link.message("acme", "d1", Payload.text("hello central"))
        yield waitUntil(reactor, lambda: ("message", "ok") in link.stats.outcomes)
        kinds = [s["event"]["kind"] for s in self.upstream.seen]
        self.assertEqual(kinds, ["telemetry", "telemetry", "message", "message"])
        self.assertEqual(self.upstream.seen[1]["event"]["payload"],
                         {"type": "json", "data": {"t": 22}})

    @defer.inlineCallbacks
    def test_telemetryFailuresLoggedSparingly(self):
        """
        A dead webhook under a telemetry stream logs once per interval; the
        counters have every failure.
        """
        yield self.startUpstream([(500, b"")] * 5)
        link = self.link()
        logged = []
        from twisted.logger import globalLogPublisher
        observer = logged.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        for i in range(5):
            link.telemetry("acme", "d1", Payload.json(i))
        yield waitUntil(reactor, lambda: link.stats.inFlight == 0)
        self.assertEqual(link.stats.outcomes, {("telemetry", "failed"): 5})
        warnings = [e for e in logged if "webhook" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)

    @defer.inlineCallbacks
    def test_fireAndForgetBounded(self):
        yield self.startUpstream(["hang"] * 2)
        link = self.link(maxInFlight=2, timeout=0.3, retries=0)
        for i in range(5):
            link.telemetry("acme", "d1", Payload.json(i))
        self.assertEqual(link.stats.outcomes, {("telemetry", "dropped"): 3})
        yield waitUntil(reactor, lambda: link.stats.inFlight == 0)
        self.assertEqual(link.stats.outcomes[("telemetry", "failed")], 2)

    @defer.inlineCallbacks
    def test_metrics(self):
        yield self.startUpstream([(500, b""), (200, b"")])
        link = self.link()
        yield link.deviceRequest("acme", "d1", frames.EMPTY)
        families = {f.name: f for f in WebhookCollector(link.stats).collect()}
        self.assertEqual(families["broker_iot_webhook_attempts"].samples[0].value, 2)
        self.assertEqual(families["broker_iot_webhook_retries"].samples[0].value, 1)
        [ok] = families["broker_iot_webhook_deliveries"].samples
        self.assertEqual((ok.labels, ok.value), ({"kind": "request", "outcome": "ok"}, 1))


class TLSDeliveryTests(WebhookTestMixin, TestCase):
    tls = True

    @defer.inlineCallbacks
    def test_https(self):
        yield self.startUpstream([(200, b'{"payload": {"type": "utf8", "data": "tls"}}')])
        answer = yield self.link().deviceRequest("acme", "d1", frames.EMPTY)
        self.assertEqual(answer, Payload.text("tls"))

    @defer.inlineCallbacks
    def test_untrustedCertificate(self):
        """
        An https webhook whose certificate is not trusted is not posted to.
        """
        yield self.startUpstream()
        agent, pool = makeAgent(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.client = treq.client.HTTPClient(agent)
        yield self.assertFailure(self.link(retries=0).deviceRequest("acme", "d1", frames.EMPTY),
                                 CentralUnavailable)
        self.assertEqual(self.upstream.seen, [])


class DeviceThroughWebhookTests(WebhookTestMixin, TestCase):
    """
    The whole path: a device's REQUEST frame over TCP, the concentrator, the
    webhook, the upstream's answer back as the device's RESPONSE.
    """

    @defer.inlineCallbacks
    def setUp(self):
        yield self.startUpstream()
        self.iot = yield IoTHarness(self, reactor).start()
        settings = SECTION.check("iot", {"webhook": {
            "retries": 1, "backoff": 0.01, "fleets": {"acme": {
                "url": self.url, "api_key": "k", "signing_secret": SECRET.decode()}}}})
        self.webhooks = Webhooks(reactor, settings["webhook"], persistent=False)
        self.addCleanup(self.webhooks.close)
        self.webhooks.install(self.iot.concentrator)

    @defer.inlineCallbacks
    def device(self, deviceId="d1"):
        """
        A connected device, once the webhook has had its DEVICE_CONNECTED
        event (forgotten, so each test's script answers what it sends).
        """
        device = yield self.iot.device(deviceId)
        yield waitUntil(reactor, lambda: any(
            s["event"]["kind"] == "device_connected" for s in self.upstream.seen))
        del self.upstream.seen[:]
        return device

    @defer.inlineCallbacks
    def test_deviceRequestAnswered(self):
        device = yield self.device("d1")
        self.upstream.script = [(502, b""), (200, b'{"payload": {"type": "json", "data": '
                                                  b'{"firmware": "2.1"}}}')]
        answer = yield device.request(Payload.json({"need": "firmware"}))
        self.assertEqual(answer.value(), {"firmware": "2.1"})
        self.assertEqual(len(self.upstream.seen), 2)
        self.assertEqual(self.upstream.seen[0]["event"]["device"], "d1")

    @defer.inlineCallbacks
    def test_deviceTimeoutCancelsDelivery(self):
        """
        The device's request timeout bounds the webhook exchange: the
        delivery is cancelled (no retry) and the device gets TIMEOUT.
        """
        self.iot.concentrator.requestTimeout = 0.3
        device = yield self.device("d1")
        self.upstream.script = ["hang", "hang"]
        e = yield self.assertFailure(device.request(frames.EMPTY), errors.Refused)
        self.assertEqual(e.code, "TIMEOUT")
        stats = self.webhooks.stats
        yield waitUntil(reactor, lambda: stats.inFlight == 0)
        self.assertEqual(stats.outcomes, {("device_connected", "ok"): 1,
                                          ("request", "cancelled"): 1})
        self.assertEqual(len(self.upstream.seen), 1)

    @defer.inlineCallbacks
    def test_deviceRequestRefused(self):
        device = yield self.device("d1")
        self.upstream.script = [(409, b'{"error": {"code": "BUSY", "message": "later"}}')]
        e = yield self.assertFailure(device.request(frames.EMPTY), errors.Refused)
        self.assertEqual(e.code, "BUSY")

    @defer.inlineCallbacks
    def test_centralSessionPreferred(self):
        """
        While the fleet's central has a TCP session, it gets the requests,
        not the webhook.
        """
        central = yield self.iot.central("acme")
        central.onRequest = lambda f: Payload.text("from the session")
        device = yield self.iot.device("d1")
        answer = yield device.request(frames.EMPTY)
        self.assertEqual(answer, Payload.text("from the session"))
        self.assertEqual(self.upstream.seen, [])

    @defer.inlineCallbacks
    def test_telemetryForwarded(self):
        device = yield self.device("d1")
        device.write(frames.TELEMETRY, 0, Payload.json({"v": 3.3}))
        yield waitUntil(reactor, lambda: self.upstream.seen)
        event = self.upstream.seen[0]["event"]
        self.assertEqual((event["kind"], event["device"], event["payload"]["data"]),
                         ("telemetry", "d1", {"v": 3.3}))

    @defer.inlineCallbacks
    def test_deviceMessageForwarded(self):
        device = yield self.device("d1")
        device.write(frames.MESSAGE, 7, Payload(frames.BINARY, b"\x01\x02"))
        yield waitUntil(reactor, lambda: self.upstream.seen)
        event = self.upstream.seen[0]["event"]
        self.assertEqual((event["kind"], event["payload"]), (
            "message", {"type": "binary", "data": "AQI="}))

    @defer.inlineCallbacks
    def test_otherFleetHasNoWebhook(self):
        device = yield self.iot.device("x1", fleet="other")
        e = yield self.assertFailure(device.request(frames.EMPTY), errors.Refused)
        self.assertEqual(e.code, "NO_CENTRAL")
        self.assertEqual(self.upstream.seen, [])


class ConfiguredTLSWebhookTests(WebhookTestMixin, TestCase):
    """
    iot.webhook.ca_file: an https webhook with a private CA, from the
    configuration.
    """

    tls = True

    @defer.inlineCallbacks
    def test_caFile(self):
        yield self.startUpstream([(200, b'{"payload": {"type": "ascii", "data": "ok"}}')])
        settings = SECTION.check("iot", {"webhook": {
            "ca_file": self.caFile, "fleets": {"acme": {
                "url": self.url, "signing_secret": "x", "timeout": 2.0}}}})
        webhooks = Webhooks(reactor, settings["webhook"], persistent=False)
        self.addCleanup(webhooks.close)
        link = webhooks.links["acme"]
        self.assertEqual((link.timeout, link.retries), (2.0, 3))
        answer = yield link.deviceRequest("acme", "d1", frames.EMPTY)
        self.assertEqual(answer, Payload(frames.ASCII, b"ok"))
        self.assertEqual(self.upstream.seen[0]["headers"].get("authorization"), None)
