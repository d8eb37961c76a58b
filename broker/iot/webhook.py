# -*- test-case-name: tests.test_iot_webhook -*-
"""
The webhook client: how a fleet's central is reached over HTTP(S) when it
has no TCP session connected (the concentrator chooses; this is the
fallback L{ICentralLink} it is given with C{setCentralFallback}).

Every call is a C{POST} of one JSON event to the fleet's URL::

    {"id": "<delivery id>", "kind": "request" | "message" | "telemetry" |
     "device_connected" | "device_disconnected" | "message_status",
     "fleet": "...", "device": "...", "payload": {"type": ..., "data": ...}}

(events of a fleet's central queue, L{broker.iot.forward}, also carry
C{"messageId"}, and their delivery id is C{"q" + messageId})

with these headers:

  - C{Authorization: Bearer <api_key>} (when one is configured): who we are;
  - C{X-IoT-Timestamp}: Unix seconds when this attempt was signed;
  - C{X-IoT-Signature: v1=<hex>}: HMAC-SHA256 with the fleet's
    C{signing_secret} over C{"v1:" + timestamp + "." + body}, so the central
    knows the body came from the broker, unaltered, recently (it should
    refuse timestamps more than a few minutes off, and remember delivery ids
    for that long to drop replays and retried duplicates);
  - C{X-IoT-Delivery}: the delivery id, the same on every retry.

For a device's request, a 2xx answer is the response to the device: its
body is C{{"payload": {...}}} (an empty body or 204 is an empty payload).
A 4xx (but 408 and 429) refuses the request at once (no retry; C{{"error": {"code": ...,
"message": ...}}} in the body is passed to the device as its ERROR).  A
5xx, 408 or 429, a connection failure or a timeout is retried up to C{retries} times
with exponential backoff and jitter; then the device gets
C{CENTRAL_UNAVAILABLE}.  Messages are retried the same way but nobody
waits for them; telemetry is tried once.  Failures are counted (and
logged once per failure, never per retry).
"""

import hashlib
import hmac
import json
import random
import time
import uuid

import treq
import treq.client
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from zope.interface import implementer

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from broker.core import jsonstrict
from broker.iot import errors
from broker.iot.frames import EMPTY
from broker.iot.histogram import LatencyHistogram
from broker.iot.interfaces import ICentralLink
from broker.iot.jsonpayload import PayloadError, fromJSON, toJSON

log = Logger()

SIGNATURE_VERSION = "v1"


class CentralUnavailable(errors.IoTError):
    """
    The webhook did not answer (after every retry) or answered 5xx.
    """
    code = "CENTRAL_UNAVAILABLE"


class BadCentralResponse(errors.IoTError):
    """
    The webhook answered 2xx with a body that is not a payload.
    """
    code = "BAD_CENTRAL_RESPONSE"


class _Retryable(Exception):
    """
    One attempt failed in a way worth trying again (5xx, network, timeout).
    """


def sign(secret, timestamp, body):
    """
    @return: the C{X-IoT-Signature} value for C{body} sent at C{timestamp}.
    """
    mac = hmac.new(secret, f"{SIGNATURE_VERSION}:{timestamp}.".encode("ascii") + body,
                   hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def verify(secret, timestamp, body, signature, now=None, tolerance=300):
    """
    What a central does with a delivery (Python reference, used by the
    tests): check the signature in constant time and the timestamp's age.
    """
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    now = time.time() if now is None else now
    if abs(now - ts) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, ts, body).encode(), signature.encode())


class WebhookStats:
    """
    Plain counters, read by L{WebhookCollector} at scrape time.
    """

    def __init__(self):
        self.outcomes = {}        # (kind, outcome) -> count
        self.attempts = 0
        self.retries = 0
        self.inFlight = 0
        self.latency = LatencyHistogram()

    def count(self, kind, outcome):
        k = (kind, outcome)
        self.outcomes[k] = self.outcomes.get(k, 0) + 1


class WebhookCollector:
    def __init__(self, stats):
        self.stats = stats

    def collect(self):
        s = self.stats
        c = CounterMetricFamily("broker_iot_webhook_deliveries",
                                "Webhook deliveries by kind and final outcome.",
                                labels=["kind", "outcome"])
        for (kind, outcome), v in sorted(s.outcomes.items()):
            c.add_metric([kind, outcome], v)
        yield c
        yield CounterMetricFamily("broker_iot_webhook_attempts", "Webhook HTTP attempts.",
                                  value=s.attempts)
        yield CounterMetricFamily("broker_iot_webhook_retries", "Webhook attempts retried.",
                                  value=s.retries)
        yield GaugeMetricFamily("broker_iot_webhook_in_flight",
                                "Webhook deliveries under way.", value=s.inFlight)
        yield s.latency.family("broker_iot_webhook_seconds",
                               "Seconds from a delivery's first attempt to its outcome.")


def makeAgent(reactor, persistent=True, caFile=None):
    """
    @return: C{(agent, pool)} for webhook deliveries; C{caFile} (PEM)
        replaces the system trust roots for HTTPS (a private CA).  Close the
        pool (C{pool.closeCachedConnections()}) when done.
    """
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = 16
    if caFile:
        from twisted.internet import ssl
        with open(caFile, "rb") as f:
            root = ssl.Certificate.loadPEM(f.read())
        policy = BrowserLikePolicyForHTTPS(trustRoot=root)
    else:
        policy = BrowserLikePolicyForHTTPS()
    return Agent(reactor, contextFactory=policy, pool=pool), pool


@implementer(ICentralLink)
class WebhookLink:
    """
    A fleet's webhook.

    @param client: a C{treq.client.HTTPClient} (shared by every fleet).
    @param apiKey: sent as a bearer token (str), or C{""} for none.
    @param signingSecret: the HMAC key (bytes), never sent.
    @param timeout: seconds one attempt may take (connect, send, answer).
    @param retries: further attempts after a retryable failure.
    @param backoff: seconds before the first retry; doubled each time, at
        most C{maxBackoff}, each delay drawn in [delay/2, delay].
    @param maxInFlight: messages and telemetry posts under way at once
        beyond which new ones are dropped and counted (requests are never
        dropped here: the device waits for them and they time out).
    """

    def __init__(self, reactor, client, fleet, url, apiKey, signingSecret, timeout=10.0,
                 retries=3, backoff=0.5, maxBackoff=10.0, maxInFlight=256,
                 maxResponse=1024 * 1024, stats=None, random=random.random):
        self.reactor = reactor
        self.client = client
        self.fleet = fleet
        self.url = url
        self.apiKey = apiKey
        self.signingSecret = signingSecret
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.maxBackoff = maxBackoff
        self.maxInFlight = maxInFlight
        self.maxResponse = maxResponse
        self.stats = stats if stats is not None else WebhookStats()
        self._random = random
        self._fireAndForget = 0
        self._lastTelemetryLog = float("-inf")
        self._telemetrySuppressed = 0

    # -- ICentralLink -------------------------------------------------------

    def deviceRequest(self, fleet, deviceId, payload):
        return self._deliver("request", fleet, deviceId, payload, self.retries)

    def message(self, fleet, deviceId, payload):
        self._forget("message", fleet, deviceId, payload, self.retries)

    def telemetry(self, fleet, deviceId, payload):
        self._forget("telemetry", fleet, deviceId, payload, 0)

    def forwardEvent(self, fleet, kind, deviceId, payload, messageId):
        """
        Deliver one event of the fleet's central queue (L{broker.iot.forward}):
        C{kind} is C{message}, C{telemetry}, C{device_connected},
        C{device_disconnected} or C{message_status}; its delivery id is C{"q" + messageId} on
        every attempt, across restarts too, and the event carries
        C{"messageId"}.

        @return: a Deferred firing on a 2xx; failing with Refused on
            another 4xx, CentralUnavailable after the retries.
        """
        return self._deliver(kind, fleet, deviceId, payload, self.retries,
                             deliveryId=f"q{messageId}", messageId=messageId)

    # -- delivery -----------------------------------------------------------

    LOG_INTERVAL = 10.0

    def _logFailure(self, kind, fleet, deviceId, why):
        """
        Log a failed delivery: every request and message, but telemetry at
        most once per L{LOG_INTERVAL} (a dead webhook under a telemetry
        stream would flood the log; the counters have every failure).
        """
        if kind == "telemetry":
            now = self.reactor.seconds()
            if now - self._lastTelemetryLog < self.LOG_INTERVAL:
                self._telemetrySuppressed += 1
                return
            self._lastTelemetryLog = now
            suppressed, self._telemetrySuppressed = self._telemetrySuppressed, 0
            if suppressed:
                why = f"{why} (and {suppressed} telemetry failures not logged)"
        log.warn("iot: webhook {kind} of {fleet}/{device} to {url} failed: {why}",
                 kind=kind, fleet=fleet, device=deviceId, url=self.url, why=why)

    def _forget(self, kind, fleet, deviceId, payload, retries):
        if self._fireAndForget >= self.maxInFlight:
            self.stats.count(kind, "dropped")
            return
        self._fireAndForget += 1

        def done(result):
            self._fireAndForget -= 1
        self._deliver(kind, fleet, deviceId, payload, retries).addErrback(
            lambda f: None).addBoth(done)

    def _deliver(self, kind, fleet, deviceId, payload, retries, deliveryId=None, **extra):
        event = {"id": deliveryId or uuid.uuid4().hex, "kind": kind, "fleet": fleet,
                 "device": deviceId, "payload": toJSON(payload), **extra}
        body = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        started = self.reactor.seconds()
        self.stats.inFlight += 1

        def finished(result, outcome):
            self.stats.inFlight -= 1
            self.stats.count(kind, outcome(result))
            self.stats.latency.observe(max(0.0, self.reactor.seconds() - started))
            return result

        def failedOutcome(f):
            if f.check(defer.CancelledError):
                return "cancelled"
            if f.check(errors.Refused):
                return "refused"
            self._logFailure(kind, fleet, deviceId, f.getErrorMessage())
            return "failed"

        d = self._cancellable(self._attempts, kind, event["id"], body, retries)
        d.addCallbacks(finished, finished, callbackArgs=(lambda r: "ok",),
                       errbackArgs=(failedOutcome,))
        return d

    @staticmethod
    def _cancellable(f, *args):
        """
        Run C{f(*args, cancelled=state)} so that cancelling the returned
        Deferred stops it for good: whatever error the interrupted HTTP
        attempt reports, no further attempt is made.
        """
        state = {"cancelled": False}

        def cancel(outer):
            state["cancelled"] = True
            inner.cancel()

        def relay(result):
            if not outer.called:
                if isinstance(result, Failure):
                    outer.errback(result)
                else:
                    outer.callback(result)
            # else: cancelled already; the late outcome is dropped.

        outer = defer.Deferred(cancel)
        inner = f(*args, cancelled=state)
        inner.addBoth(relay)
        return outer

    @defer.inlineCallbacks
    def _attempts(self, kind, deliveryId, body, retries, cancelled):
        attempt = 0
        while True:
            attempt += 1
            try:
                result = yield self._attempt(kind, deliveryId, body, attempt)
                return result
            except _Retryable as e:
                if cancelled["cancelled"]:
                    raise defer.CancelledError()
                if attempt > retries:
                    raise CentralUnavailable(
                        f"the central's webhook failed {attempt} time(s); last: {e}")
                self.stats.retries += 1
                delay = min(self.maxBackoff, self.backoff * 2 ** (attempt - 1))
                delay *= 0.5 + self._random() / 2
                yield deferLater(self.reactor, delay, lambda: None)

    @defer.inlineCallbacks
    def _attempt(self, kind, deliveryId, body, attempt):
        self.stats.attempts += 1
        timestamp = int(self.reactor.seconds())
        headers = {
            "Content-Type": ["application/json"],
            "User-Agent": ["broker-iot-webhook/1"],
            "X-IoT-Timestamp": [str(timestamp)],
            "X-IoT-Signature": [sign(self.signingSecret, timestamp, body)],
            "X-IoT-Delivery": [deliveryId],
            "X-IoT-Attempt": [str(attempt)],
        }
        if self.apiKey:
            headers["Authorization"] = ["Bearer " + self.apiKey]
        d = self._post(body, headers)
        d.addTimeout(self.timeout, self.reactor)
        try:
            status, content = yield d
        except defer.TimeoutError:
            raise _Retryable(f"no answer within {self.timeout:g}s")
        except errors.IoTError:
            raise
        except defer.CancelledError:
            raise
        except Exception as e:
            raise _Retryable(f"{type(e).__name__}: {e}")
        if status >= 500 or status in (408, 429):
            # 408 and 429 say "not now", not "no": worth another attempt.
            raise _Retryable(f"HTTP {status}")
        if status >= 400:
            raise self._refusal(status, content)
        if status < 200 or status >= 300:
            raise BadCentralResponse(f"the central answered HTTP {status}")
        if kind != "request":
            return None
        return self._answer(status, content)

    @defer.inlineCallbacks
    def _post(self, body, headers):
        response = yield self.client.request("POST", self.url, data=body, headers=headers,
                                             allow_redirects=False)
        if response.length is not None and response.length > self.maxResponse:
            response.deliverBody(_Discard())
            raise BadCentralResponse(
                f"the central's answer is over {self.maxResponse} bytes")
        chunks, size = [], [0]

        def collect(data):
            size[0] += len(data)
            if size[0] > self.maxResponse:
                raise BadCentralResponse(
                    f"the central's answer is over {self.maxResponse} bytes")
            chunks.append(data)
        yield treq.collect(response, collect)
        return response.code, b"".join(chunks)

    @staticmethod
    def _refusal(status, content):
        code, message = "CENTRAL_REFUSED", f"the central answered HTTP {status}"
        try:
            info = jsonstrict.loads(content)["error"]
            if isinstance(info.get("code"), str) and info["code"]:
                code = info["code"][:64]
            if isinstance(info.get("message"), str):
                message = info["message"][:1024]
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        return errors.Refused(message, code)

    @staticmethod
    def _answer(status, content):
        if status == 204 or not content.strip():
            return EMPTY
        try:
            obj = jsonstrict.loads(content)
            if not isinstance(obj, dict) or "payload" not in obj:
                raise PayloadError('expected {"payload": {...}}')
            return fromJSON(obj["payload"])
        except ValueError as e:
            raise BadCentralResponse(f"the central's answer is not a payload: {e}")


class _Discard:
    """
    Reads and drops a response body we refuse, so the connection closes
    cleanly.
    """

    def makeConnection(self, transport):
        transport.stopProducing()

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        pass


class Webhooks:
    """
    The webhook links of every configured fleet, sharing one HTTP client,
    pool and set of counters; L{install} hands them to the concentrator.
    """

    def __init__(self, reactor, settings, persistent=True, registry=None):
        self.reactor = reactor
        self.stats = WebhookStats()
        agent, self.pool = makeAgent(reactor, persistent, settings["ca_file"] or None)
        self.client = treq.client.HTTPClient(agent)
        self.links = {}
        for fleet, f in settings["fleets"].items():
            def pick(key):
                return f[key] if f[key] is not None else settings[key]
            self.links[fleet] = WebhookLink(
                reactor, self.client, fleet, f["url"], f["api_key"],
                f["signing_secret"].encode("utf-8"), timeout=pick("timeout"),
                retries=pick("retries"), backoff=pick("backoff"),
                maxBackoff=settings["max_backoff"], maxInFlight=settings["max_in_flight"],
                maxResponse=settings["max_response"], stats=self.stats)
        if registry is not None:
            registry.register(WebhookCollector(self.stats))

    def install(self, concentrator):
        for fleet, link in self.links.items():
            concentrator.setCentralFallback(fleet, link)

    def close(self):
        return self.pool.closeCachedConnections()
