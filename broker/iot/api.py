# -*- test-case-name: tests.test_iot_api -*-
"""
The HTTP(S) JSON API a fleet's central uses to reach its devices.

Every call carries an API key (C{Authorization: Bearer iotk_...} or
C{X-API-Key: iotk_...}); each key belongs to one fleet and the URL names
the fleet, so a key used on another fleet's URL gets 403 and never learns
whether that fleet or its devices exist::

    GET    /v1/fleets/{fleet}/devices                     list, online state
    GET    /v1/fleets/{fleet}/devices/{id}                one device
    POST   /v1/fleets/{fleet}/devices/{id}/requests       held request
    POST   /v1/fleets/{fleet}/devices/{id}/messages       one-way message
    GET    /v1/fleets/{fleet}/devices/{id}/messages       what is queued
    DELETE /v1/fleets/{fleet}/devices/{id}/messages       purge the queue
    GET    /v1/fleets/{fleet}/devices/{id}/messages/{mid} a message's state
    DELETE /v1/fleets/{fleet}/devices/{id}/messages/{mid} purge one message
    GET    /v1/fleets/{fleet}/devices/{id}/queue          queue depth
    GET    /v1/fleets/{fleet}/devices/{id}/telemetry/last last telemetry
    PUT    /v1/fleets/{fleet}/devices/{id}/key            issue a device key
    DELETE /v1/fleets/{fleet}/devices/{id}/key            revoke it

A held request keeps the HTTP request open until the device answers or the
timeout: the answer is the HTTP response.  If the client goes away first,
the device request is cancelled (its answer, if it comes, is dropped).

Every error has one shape, C{{"error": {"code": ..., "message": ...,
"source": "broker" | "device"}}}; docs/iot.md lists the codes and their
HTTP statuses.  Payloads are typed JSON objects (L{broker.iot.jsonpayload}).
"""

import json

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet.defer import CancelledError, DeferredList
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from broker.config import ConfigError
from broker.core import jsonstrict
from broker.iot import apikeys, errors, frames
from broker.iot.histogram import LatencyHistogram
from broker.iot.jsonpayload import PayloadError, fromJSON, toJSON
from broker.iot.lastvalue import lastValueJSON
from broker.logs import peerAddress
from broker.net.http import METHOD_NOT_ALLOWED, BoundedSite, Routes, jsonBody

log = Logger()

# broker.iot.errors code -> HTTP status.
STATUS = {
    errors.UnknownDevice.code: 404,
    errors.DeviceOffline.code: 503,
    errors.RequestTimeout.code: 504,
    errors.QueueFull.code: 507,
    errors.Forbidden.code: 403,
    errors.BadRequest.code: 400,
    errors.NoCentral.code: 503,
    errors.Busy.code: 429,
    errors.Unavailable.code: 503,
    errors.NotQueued.code: 404,
    errors.NoValue.code: 404,
}


class APIError(Exception):
    """
    An error answered as C{status} with the JSON error shape.
    """

    def __init__(self, status, code, message, headers=()):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


class APIStats:
    """
    Counters read by L{APICollector} at scrape time.
    """

    def __init__(self):
        self.held = 0
        self.heldOutcomes = {}
        self.heldLatency = LatencyHistogram()
        self.responses = {}
        self.authFailures = {}

    def bump(self, table, key):
        table[key] = table.get(key, 0) + 1


class APICollector:
    def __init__(self, stats):
        self.stats = stats

    def collect(self):
        s = self.stats
        yield GaugeMetricFamily("broker_iot_http_held_requests",
                                "HTTP requests held until their device answers.", value=s.held)
        c = CounterMetricFamily("broker_iot_http_held", "Held requests by outcome.",
                                labels=["outcome"])
        for k, v in sorted(s.heldOutcomes.items()):
            c.add_metric([k], v)
        yield c
        yield s.heldLatency.family("broker_iot_http_held_seconds",
                                   "Seconds a held request waited for its outcome.")
        c = CounterMetricFamily("broker_iot_http_responses", "API responses by status.",
                                labels=["status"])
        for k, v in sorted(s.responses.items()):
            c.add_metric([str(k)], v)
        yield c
        c = CounterMetricFamily("broker_iot_http_auth_failures", "Refused API keys.",
                                labels=["reason"])
        for k, v in sorted(s.authFailures.items()):
            c.add_metric([k], v)
        yield c


def _takesBody(path):
    """
    Whether C{path} is C{/v1/fleets/{fleet}/devices/{id}/requests} or
    C{.../messages} (a trailing slash allowed): only those two POSTs take a
    body (at most iot.http.max_body bytes).  Split, not a regular
    expression, on every request.
    """
    parts = path.split(b"/")
    if len(parts) == 8 and parts[7] == b"":
        parts.pop()
    return (len(parts) == 7 and parts[0] == b"" and parts[1] == b"v1"
            and parts[2] == b"fleets" and parts[3] != b"" and parts[4] == b"devices"
            and parts[5] != b"" and parts[6] in (b"requests", b"messages"))


class APISite(BoundedSite):
    """
    The API's bounded site (L{broker.net.http}): an oversized body, or one
    sent where none is taken, is refused in the API's error shape before it
    is read.
    """

    def __init__(self, resource, reactor, maxBody, idleTimeout=120.0, headerTimeout=10.0,
                 stats=None):
        # The API takes JSON only: no form parsing.  Twisted stops the idle
        # timer while a request is processed, so it never cuts a held one.
        # Every path is the API's: its plain requests take the lean path
        # (broker.net.fasthttp).
        super().__init__(resource, reactor=reactor,
                         bodyLimit=Routes([(_takesBody, {b"POST": maxBody})]),
                         refusal=self._refusal, headerTimeout=headerTimeout,
                         idleTimeout=idleTimeout, stats=stats, name="iot.http.listen",
                         fast=[((), resource)])
        self.maxBody = maxBody

    def _refusal(self, request, status, reason, message):
        api = getattr(self, "api", None)
        if api is not None:
            api.stats.bump(api.stats.responses, status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        code = "METHOD_NOT_ALLOWED" if reason == METHOD_NOT_ALLOWED else "TOO_LARGE"
        return jsonBody({"error": {"code": code, "message": message, "source": "broker"}})

    def log(self, request):
        # The API counts responses in its metrics; one access-log line per
        # held request would drown the broker's log.
        pass


class APIResource(Resource):
    """
    @param concentrator: an L{broker.iot.interfaces.IConcentrator}.
    @param keys: an L{broker.iot.apikeys.APIKeys}.
    """

    isLeaf = True

    def __init__(self, reactor, concentrator, keys, requestTimeout=30.0,
                 maxRequestTimeout=300.0, maxHeld=10000, maxHeldPerFleet=1000, stats=None):
        super().__init__()
        self.reactor = reactor
        self.concentrator = concentrator
        self.keys = keys
        self.requestTimeout = requestTimeout
        self.maxRequestTimeout = maxRequestTimeout
        self.maxHeld = maxHeld
        self.maxHeldPerFleet = maxHeldPerFleet
        self.heldByFleet = {}
        self.stats = stats if stats is not None else APIStats()
        # Set when the broker stops: held requests are answered 503 and new
        # ones refused the same way.
        self.draining = False
        self._held = set()          # the held requests' concentrator Deferreds
        self._answering = set()     # notifyFinish of requests answered while draining

    def drain(self):
        """
        The broker is stopping: answer every held request 503
        C{SHUTTING_DOWN} (and refuse new ones so); a Deferred fires once
        those answers are written.
        """
        self.draining = True
        for d in list(self._held):
            d.cancel()
        answering, self._answering = self._answering, set()
        return DeferredList([d for d in answering if not d.called], consumeErrors=True)

    # -- plumbing -----------------------------------------------------------

    def render(self, request):
        try:
            if self.draining:
                raise _shuttingDown()
            return self._route(request)
        except APIError as e:
            return self._error(request, e)
        except Exception:
            log.failure("iot.http: {method} {path}", method=request.method,
                        path=request.path)
            return self._error(request, APIError(500, "INTERNAL", "internal error"))

    def _send(self, request, status, obj=None, headers=(), data=None):
        """
        Answer C{request}: C{obj} as JSON, or C{data}, JSON text already
        encoded.
        """
        if request._disconnected or request.finished:
            return
        self.stats.bump(self.stats.responses, status)
        request.setResponseCode(status)
        request.setHeader(b"cache-control", b"no-store")
        for k, v in headers:
            request.setHeader(k, v)
        if obj is not None:
            data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if data is not None:
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"%d" % len(data))
            request.write(data)
        request.finish()

    def _error(self, request, e, source="broker"):
        headers = list(e.headers)
        self._send(request, e.status, {"error": {"code": e.code, "message": e.message,
                                                 "source": source}}, headers)
        return server.NOT_DONE_YET

    def _failure(self, request, f):
        """
        Answer a failed concentrator Deferred.
        """
        e = f.value
        if isinstance(e, errors.Refused):
            return self._error(request, APIError(502, e.code, e.message), source="device")
        if isinstance(e, errors.IoTError):
            return self._error(request, APIError(STATUS.get(e.code, 500), e.code, e.message))
        log.failure("iot.http: {method} {path}", f, method=request.method, path=request.path)
        return self._error(request, APIError(500, "INTERNAL", "internal error"))

    def _authenticate(self, request):
        header = request.getHeader(b"authorization")
        key = None
        if header is not None:
            scheme, _, value = header.partition(b" ")
            if scheme.lower() == b"bearer":
                key = value.strip()
        if key is None:
            key = request.getHeader(b"x-api-key")
        if key is None:
            self.stats.bump(self.stats.authFailures, "missing")
            raise APIError(401, "UNAUTHENTICATED",
                           "send an API key: Authorization: Bearer <key>",
                           [(b"www-authenticate", b'Bearer realm="iot"')])
        try:
            found = self.keys.fleetOf(key.decode("ascii"))
        except UnicodeDecodeError:
            found = None
        if found is None:
            self.stats.bump(self.stats.authFailures, "invalid")
            log.info("iot.http: refused an invalid API key from {peer}",
                     peer=peerAddress(request))
            raise APIError(401, "BAD_API_KEY", "this API key is not valid",
                           [(b"www-authenticate", b'Bearer realm="iot", error="invalid_token"')])
        return found[0]

    def _body(self, request, fields):
        # The site refused a body over max_body before reading it.
        ctype = request.getHeader(b"content-type")
        if ctype is not None and ctype.split(b";")[0].strip().lower() != b"application/json":
            raise APIError(415, "UNSUPPORTED_MEDIA_TYPE", "send Content-Type: application/json")
        request.content.seek(0)
        raw = request.content.read()
        try:
            body = jsonstrict.loads(raw)
        except jsonstrict.JSONError as e:
            raise APIError(400, "BAD_JSON", f"the body is not JSON: {e}")
        if not isinstance(body, dict):
            raise APIError(400, "BAD_REQUEST", "the body must be a JSON object")
        for name in body:
            if name not in fields:
                unknown = sorted(set(body) - set(fields))
                raise APIError(400, "BAD_REQUEST", f"unknown field {unknown[0]!r}")
        return body

    def _payload(self, body):
        if "payload" not in body:
            raise APIError(400, "BAD_REQUEST", "the body needs a payload")
        try:
            return fromJSON(body["payload"])
        except PayloadError as e:
            raise APIError(400, "BAD_PAYLOAD", str(e))

    # -- routing ------------------------------------------------------------

    def _route(self, request):
        keyFleet = self._authenticate(request)
        postpath = request.postpath
        n = len(postpath)
        if (request.method == b"POST" and (n == 6 or (n == 7 and postpath[6] == b""))
                and postpath[5] == b"requests" and postpath[0] == b"v1"
                and postpath[1] == b"fleets" and postpath[3] == b"devices"):
            # A held request, the hot path: routed without the tables
            # below, with the same checks in the same order.
            try:
                fleet = postpath[2].decode("utf-8")
                deviceId = postpath[4].decode("utf-8")
            except UnicodeDecodeError:
                raise APIError(400, "BAD_REQUEST", "the path is not UTF-8")
            if fleet != keyFleet:
                raise APIError(403, "FORBIDDEN", "this API key is not for that fleet")
            if not deviceId or len(postpath[4]) > 255:
                raise APIError(400, "BAD_REQUEST", "a device id is 1 to 255 bytes of UTF-8")
            return self._request(request, fleet, deviceId)
        try:
            parts = [p.decode("utf-8") for p in request.postpath]
        except UnicodeDecodeError:
            raise APIError(400, "BAD_REQUEST", "the path is not UTF-8")
        if parts and parts[-1] == "":
            parts.pop()
        if len(parts) < 4 or parts[:2] != ["v1", "fleets"] or parts[3] != "devices" \
                or len(parts) > 7 or (len(parts) == 7 and parts[5] != "messages"
                                      and parts[5:] != ["telemetry", "last"]):
            raise APIError(404, "NOT_FOUND", "no such API path")
        fleet = parts[2]
        if fleet != keyFleet:
            raise APIError(403, "FORBIDDEN", "this API key is not for that fleet")
        method = request.method.decode("ascii", "replace").upper()
        if len(parts) == 4:
            handlers = {"GET": self._list}
            args = (fleet,)
        else:
            deviceId = parts[4]
            if not deviceId or len(deviceId.encode("utf-8")) > 255:
                raise APIError(400, "BAD_REQUEST", "a device id is 1 to 255 bytes of UTF-8")
            args = (fleet, deviceId)
            sub = parts[5] if len(parts) >= 6 else None
            if len(parts) == 7 and sub == "telemetry":
                sub = "last"
            elif len(parts) == 7:
                sub = "message"
                args = (fleet, deviceId, _messageId(parts[6]))
            handlers = {
                None: {"GET": self._device},
                "requests": {"POST": self._request},
                "messages": {"POST": self._message, "GET": self._queued,
                             "DELETE": self._purgeAll},
                "message": {"GET": self._messageState, "DELETE": self._purgeOne},
                "queue": {"GET": self._queue},
                "last": {"GET": self._lastValue},
                "key": {"PUT": self._issueKey, "DELETE": self._revokeKey},
            }.get(sub)
            if handlers is None:
                raise APIError(404, "NOT_FOUND", "no such API path")
        handler = handlers.get(method)
        if handler is None:
            allow = ", ".join(sorted(handlers)).encode("ascii")
            raise APIError(405, "METHOD_NOT_ALLOWED", f"use {', '.join(sorted(handlers))}",
                           [(b"allow", allow)])
        return handler(request, *args)

    def _reply(self, request, d, status, shape):
        def ok(result):
            self._send(request, status, shape(result))
        d.addCallbacks(ok, lambda f: self._failure(request, f))
        d.addErrback(lambda f: log.failure("iot.http: answering", f))
        return server.NOT_DONE_YET

    # -- handlers -----------------------------------------------------------

    def _list(self, request, fleet):
        return self._reply(request, self.concentrator.devices(fleet), 200,
                           lambda devices: {"fleet": fleet, "devices": devices})

    def _device(self, request, fleet, deviceId):
        return self._reply(request, self.concentrator.deviceStatus(fleet, deviceId), 200,
                           lambda status: status)

    def _queue(self, request, fleet, deviceId):
        return self._reply(request, self.concentrator.queueDepth(fleet, deviceId), 200,
                           lambda depth: {"id": deviceId, "queueDepth": depth})

    def _lastValue(self, request, fleet, deviceId):
        return self._reply(request, self.concentrator.lastValue(fleet, deviceId), 200,
                           lambda value: lastValueJSON(deviceId, value, toJSON))

    def _queued(self, request, fleet, deviceId):
        return self._reply(request, self.concentrator.feedback.queued(fleet, deviceId), 200,
                           lambda messages: {"id": deviceId, "messages": messages})

    def _messageState(self, request, fleet, deviceId, messageId):
        return self._reply(request, self.concentrator.feedback.state(fleet, deviceId, messageId),
                           200, lambda state: state)

    def _purgeAll(self, request, fleet, deviceId):
        return self._reply(request, self.concentrator.feedback.purge(fleet, deviceId), 200,
                           lambda ids: {"id": deviceId, "purged": ids})

    def _purgeOne(self, request, fleet, deviceId, messageId):
        def purged(ids):
            if not ids:
                raise errors.NotQueued(f"message {messageId} is not queued for {deviceId!r}")
            return None
        d = self.concentrator.feedback.purge(fleet, deviceId, messageId).addCallback(purged)
        return self._reply(request, d, 204, lambda _: None)

    def _issueKey(self, request, fleet, deviceId):
        return self._reply(request, self.concentrator.issueKey(fleet, deviceId), 200,
                           lambda secret: {"id": deviceId, "key": secret})

    def _revokeKey(self, request, fleet, deviceId):
        return self._reply(request, self.concentrator.revokeKey(fleet, deviceId), 204,
                           lambda _: None)

    def _message(self, request, fleet, deviceId):
        body = self._body(request, ("payload", "queue"))
        payload = self._payload(body)
        queue = body.get("queue", True)
        if not isinstance(queue, bool):
            raise APIError(400, "BAD_REQUEST", "queue is true or false")
        d = self.concentrator.send(fleet, deviceId, payload, queue=queue)
        return self._reply(request, d, 202,
                           lambda r: {"messageId": r[0], "queued": r[1]})

    def _request(self, request, fleet, deviceId):
        body = self._body(request, ("payload", "timeout"))
        payload = self._payload(body)
        timeout = body.get("timeout", self.requestTimeout)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not 0 < timeout <= self.maxRequestTimeout:
            raise APIError(400, "BAD_REQUEST",
                           f"timeout is a number of seconds in (0, {self.maxRequestTimeout:g}]")
        s = self.stats
        byFleet = self.heldByFleet
        if byFleet.get(fleet, 0) >= self.maxHeldPerFleet:
            # One tenant may not take every slot from the others.
            s.bump(s.heldOutcomes, "fleet_limit")
            raise APIError(429, "TOO_MANY_HELD",
                           f"this fleet already has {self.maxHeldPerFleet} requests waiting",
                           [(b"retry-after", b"1")])
        if s.held >= self.maxHeld:
            s.bump(s.heldOutcomes, "overloaded")
            raise APIError(503, "OVERLOADED", "too many requests are waiting for devices",
                           [(b"retry-after", b"1")])
        s.held += 1
        byFleet[fleet] = byFleet.get(fleet, 0) + 1
        held = _Held(self, request, fleet, self.reactor.seconds())
        d = held.d = self.concentrator.request(fleet, deviceId, payload, timeout)
        notifyLost = getattr(request, "notifyLost", None)
        if notifyLost is not None:
            # The lean path's request: a plain callback, no Deferred.
            notifyLost(held.gone)
        else:
            request.notifyFinish().addErrback(held.gone)
        self._held.add(d)
        d.addCallbacks(held.answered, held.failed)
        return server.NOT_DONE_YET


class _Held:
    """
    One held request, from the concentrator's Deferred to the HTTP answer:
    one object and its bound methods, not a closure and a Deferred per
    step.  The answer is written before the bookkeeping, which is then
    off the round trip's path.
    """

    __slots__ = ("api", "request", "fleet", "started", "d", "done")

    def __init__(self, api, request, fleet, started):
        self.api = api
        self.request = request
        self.fleet = fleet
        self.started = started
        self.d = None
        self.done = False

    def settle(self, outcome, elapsed):
        self.done = True
        api = self.api
        s = api.stats
        s.held -= 1
        byFleet = api.heldByFleet
        fleet = self.fleet
        if byFleet[fleet] == 1:
            del byFleet[fleet]
        else:
            byFleet[fleet] -= 1
        s.bump(s.heldOutcomes, outcome)
        s.heldLatency.observe(max(0.0, elapsed))

    def answered(self, answer):
        try:
            api = self.api
            api._held.discard(self.d)
            elapsed = api.reactor.seconds() - self.started
            if answer.type == frames.JSON:
                # The device's JSON was validated (strict) when its frame
                # was read: spliced in, not parsed and serialised again.
                api._send(self.request, 200, data=b'{"payload":{"type":"json","data":%s},'
                          b'"elapsed":%r}' % (answer.data.strip(), round(elapsed, 6)))
            else:
                api._send(self.request, 200, {"payload": toJSON(answer),
                                              "elapsed": round(elapsed, 6)})
            self.settle("answered", elapsed)
        except Exception:
            log.failure("iot.http: answering a held request")

    def failed(self, f):
        try:
            api = self.api
            api._held.discard(self.d)
            elapsed = api.reactor.seconds() - self.started
            request = self.request
            if f.check(CancelledError) and request._disconnected:
                self.settle("cancelled", elapsed)
                return
            if f.check(CancelledError) and api.draining:
                self.settle("shutdown", elapsed)
                api._answering.add(request.notifyFinish())
                api._error(request, _shuttingDown())
                return
            e = f.value
            if isinstance(e, errors.Refused):
                self.settle("refused", elapsed)
            elif isinstance(e, errors.IoTError):
                self.settle(e.code.lower(), elapsed)
            else:
                self.settle("error", elapsed)
            api._failure(request, f)
        except Exception:
            log.failure("iot.http: answering a held request")

    def gone(self, reason):
        # The central hung up: stop waiting for the device.
        if not self.done:
            self.d.cancel()


def _messageId(text):
    """
    A queued message's id in a URL: the decimal id C{202} answered.
    """
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise APIError(400, "BAD_REQUEST", "a message id is the decimal id the broker gave")
    return int(text)


def _shuttingDown():
    return APIError(503, "SHUTTING_DOWN", "the broker is stopping; retry elsewhere",
                    [(b"retry-after", b"1"), (b"connection", b"close")])


def loadKeys(httpSettings, stateDir):
    """
    The API key entries of C{iot.http}: C{api_keys}, then C{api_key_file}.
    With neither, a development key for fleet C{demo} is made (or read) in
    C{stateDir} and its path returned so that it can be logged.

    @return: C{(entries, developmentKeyPath or None)}.
    @raise ConfigError: naming the key at fault.
    """
    entries = [apikeys.parseLine(line) for line in httpSettings["api_keys"]]
    path = httpSettings["api_key_file"]
    if path:
        try:
            entries.extend(apikeys.readKeyFile(path))
        except (OSError, apikeys.APIKeyError) as e:
            raise ConfigError("iot.http.api_key_file", str(e))
    if entries:
        return entries, None
    try:
        key, devPath = apikeys.developmentKey(stateDir, "demo")
    except OSError as e:
        raise ConfigError("broker.state_dir", f"cannot keep the IoT API key there: {e}")
    return [apikeys.parseLine(apikeys.hashLine("demo", key))], devPath


def makeSite(reactor, concentrator, keys, httpSettings, registry=None, stats=None):
    """
    The API site for the C{iot.http} settings; its counters are registered
    on C{registry} when given.

    @param stats: the listener's L{broker.net.listeners.ListenerStats}.
    """
    resource = APIResource(reactor, concentrator, keys,
                           requestTimeout=httpSettings["request_timeout"],
                           maxRequestTimeout=httpSettings["max_request_timeout"],
                           maxHeld=httpSettings["max_held"],
                           maxHeldPerFleet=httpSettings["max_held_per_fleet"])
    if registry is not None:
        registry.register(APICollector(resource.stats))
    site = APISite(resource, reactor, httpSettings["max_body"], httpSettings["idle_timeout"],
                   httpSettings["header_timeout"], stats)
    site.api = resource
    return site
