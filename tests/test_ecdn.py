# -*- test-case-name: tests.test_ecdn -*-
"""
The eCDN API over real HTTP and HTTPS: spec §5's checklist
(../shared/specs/ecdn-onprem.md), CORS, reload and metrics.
"""

import gzip
import io
import json
import os

import treq
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry
from twisted.internet import defer, reactor, ssl
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase
from twisted.web.client import (Agent, BrowserLikePolicyForHTTPS, FileBodyProducer,
                                HTTPConnectionPool, readBody)
from twisted.web.http_headers import Headers

from broker import config
from broker.ecdn.face import loadState
from broker.ecdn.keyring import newKeyLine
from broker.ecdn.resource import EcdnResource, Metrics, makeSite
from tests.certs import makeCertificate

MEET = "https://meet.google.com"
RULES = """\
10.0.0.0-10.0.0.255    allow    floor1
10.0.0.0-15.0.0.0      block    wide
fd00:1::/48            allow    v6site
192.168.7.0/24         redirect https://ecdn2.example:8443
"""
SDP = ("v=0\r\no=- 46117 2 IN IP4 10.1.2.3\r\ns=-\r\nt=0 0\r\n"
       "a=candidate:1 1 udp 2122260223 192.168.1.20 50000 typ host\r\n"
       "a=x:ünïcödé\r\n") * 100


def ip(address):
    return {"format": "ipv6" if ":" in address else "ipv4", "address": address}


class EcdnServer:
    """
    One eCDN API on a real loopback port, built as the face builds it.
    """

    def __init__(self, testCase, tls=False, clock=reactor, **overrides):
        directory = FilePath(testCase.mktemp())
        directory.makedirs()
        self.directory = directory
        self.rules = directory.child("rules.txt")
        self.rules.setContent(RULES.encode())
        self.keys = directory.child("keys.txt")
        self.keys.setContent((newKeyLine("k1") + "\n").encode())
        os.chmod(self.keys.path, 0o600)
        settings = config.parse("[ecdn]\nenabled = true\n")["ecdn"]
        settings.update(rules_file=self.rules.path, key_file=self.keys.path)
        settings.update(overrides)
        self.cfg = settings
        self.registry = CollectorRegistry()
        self.resource = EcdnResource(loadState(settings, self.keys.path), settings, clock,
                                     Metrics(self.registry))
        site = makeSite(self.resource)
        self.scheme = "https" if tls else "http"
        if tls:
            keyPath, certPath, pem = makeCertificate(directory.child("tls").path)
            with open(keyPath, "rb") as k:
                both = k.read() + pem
            options = ssl.PrivateCertificate.loadPEM(both).options()
            self.port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
            trust = ssl.Certificate.loadPEM(pem)
            policy = BrowserLikePolicyForHTTPS(trustRoot=trust)
        else:
            self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
            policy = BrowserLikePolicyForHTTPS()
        testCase.addCleanup(self.port.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        testCase.addCleanup(self.pool.closeCachedConnections)
        self.agent = Agent(reactor, contextFactory=policy, pool=self.pool)
        host = "localhost" if tls else "127.0.0.1"
        self.base = f"{self.scheme}://{host}:{self.port.getHost().port}"

    def reload(self):
        state = loadState(self.cfg, self.keys.path)
        self.resource.state = state

    @defer.inlineCallbacks
    def request(self, method, path, body=None, headers=None, raw=None):
        """
        @return: (response, parsed JSON body or None, raw bytes)
        """
        hdrs = {"Origin": MEET}
        if body is not None or raw is not None:
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        response = yield treq.request(method, self.base + path, data=data, headers=hdrs,
                                      agent=self.agent, allow_redirects=False)
        content = yield treq.content(response)
        if response.headers.getRawHeaders(b"content-encoding") == [b"gzip"]:
            content = gzip.decompress(content)
        parsed = None
        if content and (response.headers.getRawHeaders(b"content-type") or [b""])[0] \
                == b"application/json":
            parsed = json.loads(content)
        return response, parsed, content

    def post(self, endpoint, body, **kw):
        return self.request("POST", "/v1/" + endpoint, body, **kw)


def header(response, name):
    values = response.headers.getRawHeaders(name)
    return values[0].decode() if values else None


class TransportTests(TestCase):
    @defer.inlineCallbacks
    def test_https(self):
        """
        All three endpoints answer over TLS.
        """
        server = EcdnServer(self, tls=True)
        r, body, _ = yield server.post("get-peering-group", {"availableIPs": [ip("10.0.0.5")]})
        self.assertEqual((r.code, body), (200, {"allowed": True, "result": "floor1",
                                                 "error": None}))
        r, body, _ = yield server.post("encrypt-sdp", {"data": SDP})
        self.assertEqual(r.code, 200)
        self.assertIsNone(body["error"])
        r, body, _ = yield server.post("decrypt-sdp", {"data": body["result"]})
        self.assertEqual(body, {"result": SDP, "error": None})

    @defer.inlineCallbacks
    def test_routing(self):
        """
        Other versions and endpoints are 404, other methods 405, all with
        the error body; responses are JSON.
        """
        server = EcdnServer(self)
        for path in ("/v2/get-peering-group", "/v1/nothing", "/", "/v1/get-peering-group/x"):
            r, body, _ = yield server.request("POST", path, {})
            self.assertEqual(r.code, 404, path)
            self.assertIsNone(body["result"])
            self.assertTrue(body["error"])
        for method in ("GET", "PUT", "DELETE"):
            r, body, _ = yield server.request(method, "/v1/encrypt-sdp")
            self.assertEqual(r.code, 405, method)
            self.assertEqual(header(r, b"allow"), "POST, OPTIONS")
            self.assertEqual(header(r, b"access-control-allow-origin"), MEET)

    @defer.inlineCallbacks
    def test_contentTypesAndEncodings(self):
        """
        C{application/json} with a charset is accepted; a gzip or deflate
        body is inflated; a gzip answer is given to those who accept it;
        another content type is 415.
        """
        server = EcdnServer(self)
        payload = json.dumps({"availableIPs": [ip("10.0.0.5")]}).encode()
        r, body, _ = yield server.post(
            "get-peering-group", None, raw=payload,
            headers={"Content-Type": "application/json; charset=utf-8"})
        self.assertEqual(body["result"], "floor1")
        # treq would inflate the answer itself: ask with the bare agent.
        r = yield server.agent.request(
            b"POST", (server.base + "/v1/get-peering-group").encode(),
            Headers({"Content-Type": ["application/json"], "Content-Encoding": ["gzip"],
                     "Accept-Encoding": ["gzip"]}),
            FileBodyProducer(io.BytesIO(gzip.compress(payload))))
        self.assertEqual(header(r, b"content-encoding"), "gzip")
        content = yield readBody(r)
        self.assertEqual(json.loads(gzip.decompress(content))["result"], "floor1")
        import zlib
        r, body, _ = yield server.post("get-peering-group", None, raw=zlib.compress(payload),
                                       headers={"Content-Encoding": "deflate"})
        self.assertEqual(body["result"], "floor1")
        r, body, _ = yield server.post("get-peering-group", None, raw=payload,
                                       headers={"Content-Type": "text/plain"})
        self.assertEqual(r.code, 415)
        r, body, _ = yield server.post("get-peering-group", None, raw=payload,
                                       headers={"Content-Encoding": "compress"})
        self.assertEqual(r.code, 415)

    @defer.inlineCallbacks
    def test_bodyLimit(self):
        """
        A body over max_body is 413 with the CORS headers, also when it is
        small compressed (a zip bomb).
        """
        server = EcdnServer(self, max_body=4096)
        r, body, _ = yield server.post("encrypt-sdp", {"data": "x" * 5000})
        self.assertEqual(r.code, 413)
        self.assertIsNone(body["result"])
        self.assertEqual(header(r, b"access-control-allow-origin"), MEET)
        bomb = gzip.compress(json.dumps({"data": "a" * 100000}).encode())
        self.assertLess(len(bomb), 4096)
        r, body, _ = yield server.post("encrypt-sdp", None, raw=bomb,
                                       headers={"Content-Encoding": "gzip"})
        self.assertEqual(r.code, 413)

    @defer.inlineCallbacks
    def test_badJSON(self):
        server = EcdnServer(self)
        for raw in (b"{", b"[]", b"\xff\xfe", b"null"):
            r, body, _ = yield server.post("get-peering-group", None, raw=raw)
            self.assertEqual(r.code, 400)
            self.assertEqual(set(body), {"result", "error"})
            self.assertIsNone(body["result"])

    @defer.inlineCallbacks
    def test_strictJSON(self):
        """
        Bodies are strict JSON (broker/core/jsonstrict.py): 400 with the
        reason, also when the body came gzip-compressed.
        """
        server = EcdnServer(self)
        cases = [(b'{"a":NaN}', "NaN is not JSON"), (b'{"a":Infinity}', "Infinity is not JSON"),
                 (b'{"a":-Infinity}', "-Infinity is not JSON"),
                 (b'{"a":1e400}', "number out of range"),
                 (b'{"a":1,"a":2}', "duplicate key 'a'"),
                 (b'{"a":' + b"[" * 64 + b"]" * 64 + b"}", "nesting deeper than 64 levels"),
                 (b"[" * 100000 + b"]" * 100000, "nesting deeper than 64 levels"),
                 (b'{"a":"\\ud800"}', "lone surrogate"),
                 (b"\xef\xbb\xbf{}", "byte order mark"), (b'{"a":"\xff"}', "invalid UTF-8")]
        for raw, why in cases:
            for headers, data in (({}, raw), ({"Content-Encoding": "gzip"}, gzip.compress(raw))):
                r, body, _ = yield server.post("get-peering-group", None, raw=data,
                                               headers=headers)
                self.assertEqual((r.code, body["result"]), (400, None), raw[:30])
                self.assertIn(why, body["error"])


class CORSTests(TestCase):
    @defer.inlineCallbacks
    def test_preflightOnEveryPath(self):
        server = EcdnServer(self)
        for path in ("/v1/get-peering-group", "/v1/encrypt-sdp", "/v1/decrypt-sdp", "/v2/x"):
            r, _, content = yield server.request(
                "OPTIONS", path, headers={"Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": "content-type",
                                          "Access-Control-Request-Private-Network": "true"})
            self.assertEqual(r.code, 204, path)
            self.assertEqual(content, b"")
            self.assertEqual(header(r, b"access-control-allow-origin"), MEET)
            self.assertEqual(header(r, b"access-control-allow-methods"), "GET, POST, OPTIONS")
            self.assertIn("Content-Type", header(r, b"access-control-allow-headers"))
            self.assertEqual(header(r, b"access-control-allow-credentials"), "true")
            self.assertEqual(header(r, b"access-control-allow-private-network"), "true")
            self.assertEqual(header(r, b"access-control-max-age"), "600")
            self.assertEqual(header(r, b"vary"), "Origin")
        r, _, _ = yield server.request("OPTIONS", "/v1/encrypt-sdp")
        self.assertIsNone(header(r, b"access-control-allow-private-network"))

    @defer.inlineCallbacks
    def test_onEveryAnswer(self):
        """
        Success, error and redirect answers carry the CORS headers.
        """
        server = EcdnServer(self)
        answers = [
            (yield server.post("get-peering-group", {"availableIPs": [ip("10.0.0.1")]})),
            (yield server.post("get-peering-group", {"availableIPs": "no"})),
            (yield server.post("decrypt-sdp", {"data": "v1.k1.AAAA"})),
            (yield server.post("get-peering-group", {"availableIPs": [ip("192.168.7.1")]})),
        ]
        self.assertEqual([r.code for r, _, _ in answers], [200, 400, 200, 302])
        for r, _, _ in answers:
            self.assertEqual(header(r, b"access-control-allow-origin"), MEET)
            self.assertEqual(header(r, b"access-control-allow-credentials"), "true")
            self.assertEqual(header(r, b"vary"), "Origin")

    @defer.inlineCallbacks
    def test_origins(self):
        """
        Only allowed origins are echoed (never C{*}); the doc-literal mode
        sends Google's scheme-less value.
        """
        server = EcdnServer(self, allowed_origins=[MEET, "https://other.example"])
        body = {"availableIPs": [ip("10.0.0.1")]}
        r, _, _ = yield server.post("get-peering-group", body,
                                    headers={"Origin": "https://other.example"})
        self.assertEqual(header(r, b"access-control-allow-origin"), "https://other.example")
        r, _, _ = yield server.post("get-peering-group", body,
                                    headers={"Origin": "https://evil.example"})
        self.assertIsNone(header(r, b"access-control-allow-origin"))
        self.assertIsNone(header(r, b"access-control-allow-credentials"))
        literal = EcdnServer(self, origin_mode="doc-literal")
        r, _, _ = yield literal.post("get-peering-group", body)
        self.assertEqual(header(r, b"access-control-allow-origin"), "meet.google.com")


class PeeringGroupTests(TestCase):
    @defer.inlineCallbacks
    def test_rules(self):
        server = EcdnServer(self)
        cases = [
            (["10.0.0.30"], {"allowed": True, "result": "floor1", "error": None}),
            (["10.0.3.1"], {"allowed": False, "result": "wide", "error": None}),
            (["172.16.0.1", "10.0.0.7"], {"allowed": True, "result": "floor1", "error": None}),
            (["fd00:1::9"], {"allowed": True, "result": "v6site", "error": None}),
            (["172.16.0.1"], {"allowed": False, "result": "unmatched", "error": None}),
        ]
        for addresses, expected in cases:
            r, body, _ = yield server.post("get-peering-group",
                                           {"availableIPs": [ip(a) for a in addresses]})
            self.assertEqual((r.code, body), (200, expected), addresses)

    @defer.inlineCallbacks
    def test_redirect(self):
        server = EcdnServer(self)
        r, _, _ = yield server.post("get-peering-group", {"availableIPs": [ip("192.168.7.1")]})
        self.assertEqual(r.code, 302)
        self.assertEqual(header(r, b"location"), "https://ecdn2.example:8443/v1/get-peering-group")

    @defer.inlineCallbacks
    def test_badRequests(self):
        server = EcdnServer(self)
        for bad in ({}, {"availableIPs": {}}, {"availableIPs": ["10.0.0.1"]},
                    {"availableIPs": [{"format": "ipv4", "address": "fd00::1"}]},
                    {"availableIPs": [{"format": "ipv6", "address": "10.0.0.1"}]},
                    {"availableIPs": [{"format": "ipv4", "address": "10.0.0.256"}]},
                    {"availableIPs": [{"format": "ipv4"}]},
                    {"availableIPs": []}):
            r, body, _ = yield server.post("get-peering-group", bad)
            self.assertEqual(r.code, 400, bad)
            self.assertIsNone(body["result"])
            self.assertIsInstance(body["error"], str)
            self.assertTrue(body["error"])

    @defer.inlineCallbacks
    def test_emptyListFallback(self):
        server = EcdnServer(self, empty_list="fallback", fallback="end")
        r, body, _ = yield server.post("get-peering-group", {"availableIPs": []})
        # The documented way to end the session on purpose.
        self.assertEqual(body, {"allowed": False, "result": "", "error": None})

    @defer.inlineCallbacks
    def test_legacy(self):
        server = EcdnServer(self, response_style="legacy", fallback="end")
        results = []
        for a in ("10.0.0.1", "10.0.3.1", "172.16.0.1"):
            r, body, _ = yield server.post("get-peering-group", {"availableIPs": [ip(a)]})
            self.assertNotIn("allowed", body)
            self.assertIsNone(body["error"])
            results.append(body["result"])
        self.assertEqual(results, ["floor1", "BLOCKED", "NOT_FOUND"])

    @defer.inlineCallbacks
    def test_subnetAndRandom(self):
        server = EcdnServer(self, policy="subnet", subnet_prefix_v4=16)
        _, body, _ = yield server.post("get-peering-group", {"availableIPs": [ip("10.9.8.7")]})
        self.assertEqual(body["result"], "subnet-10.9.0.0-16")
        server = EcdnServer(self, policy="random", random_group_size=1)
        _, a, _ = yield server.post("get-peering-group", {"availableIPs": [ip("10.9.8.7")]})
        _, b, _ = yield server.post("get-peering-group", {"availableIPs": [ip("10.9.8.7")]})
        self.assertNotEqual(a["result"], b["result"])


class SDPTests(TestCase):
    @defer.inlineCallbacks
    def test_roundTripDiffersAndHides(self):
        server = EcdnServer(self)
        _, a, _ = yield server.post("encrypt-sdp", {"data": SDP})
        _, b, _ = yield server.post("encrypt-sdp", {"data": SDP})
        self.assertNotEqual(a["result"], b["result"])
        for secret in ("10.1.2.3", "192.168.1.20", "candidate"):
            self.assertNotIn(secret, a["result"])
        _, back, _ = yield server.post("decrypt-sdp", {"data": b["result"]})
        self.assertEqual(back["result"], SDP)

    @defer.inlineCallbacks
    def test_badTokens(self):
        """
        Tampered, truncated, non-base64, unknown-key and foreign tokens are
        200 with an error, never a result.
        """
        server = EcdnServer(self)
        _, enc, _ = yield server.post("encrypt-sdp", {"data": SDP})
        token = enc["result"]
        i = len(token) // 2
        flipped = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]
        other = EcdnServer(self)
        _, foreign, _ = yield other.post("encrypt-sdp", {"data": SDP})
        for bad in (flipped, token[:-7], token[:12], "v1.k1.!!!!", "hello",
                    token.replace("v1.k1.", "v1.zz."), foreign["result"]):
            r, body, _ = yield server.post("decrypt-sdp", {"data": bad})
            self.assertEqual(r.code, 200)
            self.assertEqual(set(body), {"result", "error"})
            self.assertIsNone(body["result"])
            self.assertTrue(body["error"])

    @defer.inlineCallbacks
    def test_dataMustBeAString(self):
        server = EcdnServer(self)
        for endpoint in ("encrypt-sdp", "decrypt-sdp"):
            for bad in ({}, {"data": 5}, {"data": None}, {"data": ""}, {"data": ["x"]}):
                r, body, _ = yield server.post(endpoint, bad)
                self.assertEqual(r.code, 400)
                self.assertIsNone(body["result"])

    @defer.inlineCallbacks
    def test_expiry(self):
        clock = Clock()
        clock.advance(1_800_000_000)
        server = EcdnServer(self, clock=clock, max_token_age=120.0)
        _, enc, _ = yield server.post("encrypt-sdp", {"data": SDP})
        clock.advance(100)
        _, ok, _ = yield server.post("decrypt-sdp", {"data": enc["result"]})
        self.assertEqual(ok["result"], SDP)
        clock.advance(30)
        _, late, _ = yield server.post("decrypt-sdp", {"data": enc["result"]})
        self.assertEqual(late, {"result": None, "error": "token expired"})

    @defer.inlineCallbacks
    def test_rotationByReload(self):
        """
        Rotating the key file: new tokens use the new key, old tokens still
        decrypt in the grace period, and fail once the old key is retired.
        """
        server = EcdnServer(self)
        oldLine = server.keys.getContent().decode().strip()
        _, old, _ = yield server.post("encrypt-sdp", {"data": SDP})
        kid, secret, _ = oldLine.split()
        server.keys.setContent(f"{newKeyLine('k2')}\n{kid} {secret} decrypt\n".encode())
        server.reload()
        _, new, _ = yield server.post("encrypt-sdp", {"data": SDP})
        self.assertTrue(new["result"].startswith("v1.k2."))
        _, back, _ = yield server.post("decrypt-sdp", {"data": old["result"]})
        self.assertEqual(back["result"], SDP)
        rotated = server.keys.getContent().decode().replace(" decrypt", " retired")
        server.keys.setContent(rotated.encode())
        server.reload()
        _, refused, _ = yield server.post("decrypt-sdp", {"data": old["result"]})
        self.assertEqual(refused, {"result": None, "error": "token key retired"})


class OperationsTests(TestCase):
    @defer.inlineCallbacks
    def test_nothingPrivateLogged(self):
        """
        No log event mentions an SDP, a submitted address or the client's.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        server = EcdnServer(self)
        yield server.post("get-peering-group", {"availableIPs": [ip("10.0.0.77")]})
        yield server.post("get-peering-group", {"availableIPs": [ip("10.0.0.777")]})
        _, enc, _ = yield server.post("encrypt-sdp", {"data": SDP})
        yield server.post("decrypt-sdp", {"data": enc["result"][:-3]})
        from twisted.logger import formatEvent
        # The test's own HTTP client logs where it connects; the server must not.
        text = "\n".join(formatEvent(e) + repr(e) for e in events
                         if not e.get("log_namespace", "").startswith("twisted.web.client"))
        for secret in ("10.0.0.77", "10.0.0.777", "192.168.1.20", "candidate", "127.0.0.1"):
            self.assertNotIn(secret, text)

    @defer.inlineCallbacks
    def test_reloadRefusesBadFiles(self):
        """
        A bad rules or key file is refused with its file and line, and the
        rules and keys in force stay.
        """
        server = EcdnServer(self)
        before = server.resource.state
        server.rules.setContent(RULES.encode() + b"10.0.0.0/40 allow x\n")
        e = self.assertRaises(Exception, server.reload)
        self.assertIn("rules.txt:5", str(e))
        server.rules.setContent(RULES.encode())
        server.keys.setContent(b"k1 short active\n")
        e = self.assertRaises(Exception, server.reload)
        self.assertIn("keys.txt:1", str(e))
        self.assertIs(server.resource.state, before)
        _, body, _ = yield server.post("get-peering-group", {"availableIPs": [ip("10.0.0.1")]})
        self.assertEqual(body["result"], "floor1")

    @defer.inlineCallbacks
    def test_metrics(self):
        server = EcdnServer(self)
        yield server.post("get-peering-group", {"availableIPs": [ip("10.0.0.1")]})
        yield server.post("get-peering-group", {"availableIPs": [ip("10.0.3.1")]})
        yield server.post("get-peering-group", {"availableIPs": 1})
        yield server.post("encrypt-sdp", {"data": "x"})
        text = generate_latest(server.registry).decode()
        for line in ('broker_ecdn_results_total{endpoint="get-peering-group",result="allowed"} 1.0',
                     'broker_ecdn_results_total{endpoint="get-peering-group",result="blocked"} 1.0',
                     'broker_ecdn_results_total{endpoint="get-peering-group",result="error"} 1.0',
                     'broker_ecdn_results_total{endpoint="encrypt-sdp",result="ok"} 1.0',
                     'broker_ecdn_request_seconds_count{endpoint="get-peering-group"} 3.0'):
            self.assertIn(line, text)
