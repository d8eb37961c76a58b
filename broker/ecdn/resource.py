# -*- test-case-name: tests.test_ecdn -*-
"""
The eCDN on-premises HTTP API: C{/v1/get-peering-group},
C{/v1/encrypt-sdp}, C{/v1/decrypt-sdp}, with the CORS answers browsers need.

Meet's JavaScript on C{https://meet.google.com} calls these from the
viewer's browser, so every answer (success, error, redirect, preflight)
carries the CORS headers, or the browser hides it from the page.  Meet ends
the viewer's eCDN session on any error, so errors are plain: the documented
C{{"result": null, "error": "..."}} body.

Nothing here logs a request body, an SDP, an address or the client's own
address: private addresses are what this API exists to keep private.
"""

import json
import zlib

from prometheus_client import Counter, Histogram
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.resource import EncodingResourceWrapper
from twisted.web.server import GzipEncoderFactory

from broker.core import jsonstrict
from broker.ecdn.keyring import TokenError
from broker.ecdn.policy import parseAddress
from broker.net.http import BoundedSite, Routes

log = Logger()

ENDPOINTS = ("get-peering-group", "encrypt-sdp", "decrypt-sdp")
ALLOW_METHODS = b"GET, POST, OPTIONS"
DOC_LITERAL_ORIGIN = b"meet.google.com"


class State:
    """
    What a reload replaces as a whole: the policy and the key ring.  A
    request reads C{resource.state} once, so it sees one consistent pair.
    """

    def __init__(self, policy, keyring):
        self.policy = policy
        self.keyring = keyring


class Metrics:
    """
    Per-endpoint latency and result class, on the admin C{/metrics}.
    """

    def __init__(self, registry=None):
        # registry=None keeps them out of the process-wide default registry.
        kwargs = {"registry": registry}
        self.latency = Histogram(
            "broker_ecdn_request_seconds", "eCDN API request latency.", ["endpoint"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2),
            **kwargs)
        self.results = Counter(
            "broker_ecdn_results", "eCDN API answers by result class "
            "(allowed, blocked, unmatched, redirect, ok, error).",
            ["endpoint", "result"], **kwargs)
        self.counts = {}        # (endpoint, result) -> answers

    def observe(self, endpoint, result, seconds):
        self.latency.labels(endpoint).observe(seconds)
        self.results.labels(endpoint, result).inc()
        # The same answers as plain integers, for /stats and the console.
        key = (endpoint, result)
        self.counts[key] = self.counts.get(key, 0) + 1


class _Answer(Exception):
    """
    Leave the handler with this status and body.
    """

    def __init__(self, status, body, result="error", headers=()):
        self.status = status
        self.body = body
        self.result = result
        self.headers = headers


def _error(message, status=200):
    return _Answer(status, {"result": None, "error": message})


class EcdnResource(Resource):
    """
    @param state: the initial L{State}; L{broker.ecdn.face} replaces
        C{self.state} on reload.
    @param clock: for latency and token times (an injected reactor).
    """

    isLeaf = True

    def __init__(self, state, cfg, clock, metrics):
        super().__init__()
        self.state = state
        self.clock = clock
        self.metrics = metrics
        self.style = cfg["response_style"]
        self.emptyList = cfg["empty_list"]
        self.origins = {o.encode("utf-8") for o in cfg["allowed_origins"]}
        self.originMode = cfg["origin_mode"]
        self.maxAge = str(cfg["preflight_max_age"]).encode("ascii")
        self.maxBody = cfg["max_body"]
        self.maxTokenAge = cfg["max_token_age"]

    # -- CORS ----------------------------------------------------------------

    def _cors(self, request):
        origin = request.getHeader(b"origin")
        request.setHeader(b"vary", b"Origin")
        if origin is None or origin not in self.origins:
            # No ACAO for other origins: the browser refuses the answer.
            return
        allowOrigin = DOC_LITERAL_ORIGIN if self.originMode == "doc-literal" else origin
        request.setHeader(b"access-control-allow-origin", allowOrigin)
        request.setHeader(b"access-control-allow-credentials", b"true")

    def _preflight(self, request):
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-methods", ALLOW_METHODS)
        asked = request.getHeader(b"access-control-request-headers")
        allowed = b"Content-Type"
        if asked:
            allowed = b"Content-Type, " + asked
        request.setHeader(b"access-control-allow-headers", allowed)
        request.setHeader(b"access-control-max-age", self.maxAge)
        if _header(request, b"access-control-request-private-network").lower() == "true":
            request.setHeader(b"access-control-allow-private-network", b"true")
        return b""

    # -- dispatch ------------------------------------------------------------

    def render(self, request):
        started = self.clock.seconds()
        self._cors(request)
        if request.method == b"OPTIONS":
            return self._preflight(request)
        endpoint = "other"
        try:
            endpoint = self._route(request)
            handler = getattr(self, "_" + endpoint.replace("-", "_"))
            payload = self._readJSON(request)
            answer = handler(payload, request)
        except _Answer as a:
            answer = a
        except Exception:
            log.failure("eCDN {endpoint} failed", endpoint=endpoint)
            answer = _error("internal error", 500)
        request.setResponseCode(answer.status)
        for name, value in answer.headers:
            request.setHeader(name, value)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        self.metrics.observe(endpoint, answer.result, self.clock.seconds() - started)
        return json.dumps(answer.body, separators=(",", ":")).encode("utf-8")

    def _route(self, request):
        segments = request.path.split(b"?", 1)[0].strip(b"/").split(b"/")
        if len(segments) != 2 or segments[0] != b"v1":
            raise _error("not found; this service implements /v1/get-peering-group, "
                         "/v1/encrypt-sdp and /v1/decrypt-sdp", 404)
        name = segments[1].decode("ascii", "replace")
        if name not in ENDPOINTS:
            raise _error(f"unknown endpoint /v1/{name}", 404)
        if request.method != b"POST":
            raise _Answer(405, {"result": None, "error": "use POST"},
                          headers=[(b"allow", b"POST, OPTIONS")])
        return name

    def _readJSON(self, request):
        # The site refused a body over max_body before reading it.
        contentType = _header(request, b"content-type").split(";")[0].strip().lower()
        if contentType != "application/json":
            raise _error("Content-Type must be application/json", 415)
        body = request.content.read()
        encoding = (_header(request, b"content-encoding") or "identity").strip().lower()
        if encoding in ("gzip", "deflate"):
            body = self._inflate(body, encoding)
        elif encoding != "identity":
            raise _error(f"unsupported Content-Encoding {encoding}; use gzip or deflate", 415)
        try:
            payload = jsonstrict.loads(body)
        except jsonstrict.JSONError as e:
            raise _error(f"the body is not valid JSON: {e}", 400)
        if not isinstance(payload, dict):
            raise _error("the body must be a JSON object", 400)
        return payload

    def _inflate(self, body, encoding):
        # Bounded: a small compressed body must not expand without limit.
        inflater = zlib.decompressobj(wbits=47 if encoding == "gzip" else 15)
        try:
            out = inflater.decompress(body, self.maxBody + 1)
        except zlib.error:
            raise _error(f"the body is not valid {encoding} data", 400)
        if len(out) > self.maxBody or inflater.unconsumed_tail:
            raise _error(f"request body over {self.maxBody} bytes", 413)
        return out

    # -- endpoints -----------------------------------------------------------

    def _get_peering_group(self, payload, request):
        entries = payload.get("availableIPs")
        if not isinstance(entries, list):
            raise _error("availableIPs must be a list of {format, address} objects", 400)
        addresses = []
        for entry in entries:
            if not isinstance(entry, dict):
                raise _error("availableIPs must be a list of {format, address} objects", 400)
            try:
                addresses.append(parseAddress(entry.get("format"), entry.get("address")))
            except ValueError as e:
                raise _error(str(e), 400)
        policy = self.state.policy
        if not addresses:
            if self.emptyList == "error":
                raise _error("availableIPs is empty", 400)
            decision = policy.fallbackDecision()
        else:
            decision = policy.decide(addresses)
        if decision.outcome == "redirect":
            return _Answer(302, {"result": None, "error": None}, "redirect",
                           headers=[(b"location", _redirectURL(decision.group, request))])
        return _Answer(200, self._peeringBody(decision), decision.outcome)

    def _peeringBody(self, decision):
        if self.style == "legacy":
            result = {"allowed": decision.group, "blocked": "BLOCKED",
                      "unmatched": "NOT_FOUND"}[decision.outcome]
            return {"result": result, "error": None}
        return {"allowed": decision.outcome == "allowed", "result": decision.group,
                "error": None}

    def _sdp(self, payload):
        data = payload.get("data")
        if not isinstance(data, str):
            raise _error("data must be a string", 400)
        if not data:
            raise _error("data is empty", 400)
        return data

    def _encrypt_sdp(self, payload, request):
        data = self._sdp(payload)
        token = self.state.keyring.encrypt(data.encode("utf-8"), self.clock.seconds())
        return _Answer(200, {"result": token, "error": None}, "ok")

    def _decrypt_sdp(self, payload, request):
        data = self._sdp(payload)
        try:
            plain = self.state.keyring.decrypt(data, self.clock.seconds(), self.maxTokenAge)
            text = plain.decode("utf-8")
        except TokenError as e:
            raise _error(str(e))
        except UnicodeDecodeError:
            raise _error("token authentication failed")
        return _Answer(200, {"result": text, "error": None}, "ok")


def _header(request, name):
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else ""


def _redirectURL(base, request):
    """
    The same endpoint on the instance at C{base}.
    """
    return base.rstrip("/").encode("utf-8") + request.path


def refusal(resource):
    """
    The eCDN refusal of an oversized body or a wrong method: the documented
    error body, with the CORS headers a browser needs to show it to Meet.
    """
    def render(request, status, reason, message):
        resource._cors(request)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps({"result": None, "error": message},
                          separators=(",", ":")).encode("utf-8")
    return render


class QuietSite(BoundedSite):
    """
    A site that writes no access log: its lines would carry viewers'
    (private) addresses.  The metrics count requests instead.
    """

    def log(self, request):
        pass


def makeSite(resource, reactor=None, headerTimeout=10.0, idleTimeout=60.0, stats=None):
    """
    The eCDN site: a POST may carry C{max_body} bytes (before inflating;
    L{EcdnResource} bounds the inflated size too), nothing else takes a
    body.  Responses are gzip-encoded for clients that accept it.

    @param stats: the listener's L{broker.net.listeners.ListenerStats}.
    """
    # Every path: an unknown one gets the resource's 404 with CORS headers.
    routes = Routes([(b"/", {b"POST": resource.maxBody, b"OPTIONS": 0})])
    return QuietSite(EncodingResourceWrapper(resource, [GzipEncoderFactory()]),
                     reactor=reactor, bodyLimit=routes, refusal=refusal(resource),
                     headerTimeout=headerTimeout, idleTimeout=idleTimeout, stats=stats,
                     name="ecdn.listen")
