# -*- test-case-name: tests.test_admin_api -*-
"""
The admin console's JSON API and files over real HTTP, against real Web
PubSub WebSocket clients, real IoT sessions and real peer-group sessions:
the admin token (refused without it, or with a wrong one; counted), every
read endpoint, every action, and paging at 100,000 connections.
"""

import json

import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.trial import unittest

from broker.admin.auth import Guard, loadToken
from broker.admin.build import AdminCollector, coreCounters
from broker.admin.console import CSP
from broker.admin.rates import RateSampler
from broker.admin.resource import makeAdminSite
from broker.core.router import Core
from broker.iot import frames
from broker.iot.adminview import IoTView
from broker.net.http import BoundedSite
from broker.peergroups.adminview import PeerGroupsView
from broker.webpubsub.adminview import WebPubSubView
from tests.iotharness import IoTHarness, waitUntil
from tests.recorder import RecordingConnection
from tests.test_peergroups import Base as PeerGroupsBase
from tests.wsharness import BrokerHarness

TOKEN = "admin-token-for-tests-0123456789"


class Admin:
    """
    An admin site on 127.0.0.1:0 and a client of it.
    """

    def __init__(self, testCase, core, views=None, rates=None, protectProbes=False):
        self.testCase = testCase
        self.guard = Guard(TOKEN, core.quietLog)
        self.site = makeAdminSite(core, guard=self.guard, views=views, rates=rates,
                                  protectProbes=protectProbes)

    @defer.inlineCallbacks
    def start(self):
        self.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.site)
        self.testCase.addCleanup(self.port.stopListening)
        return self

    @property
    def base(self):
        return f"http://127.0.0.1:{self.port.getHost().port}"

    @defer.inlineCallbacks
    def request(self, method, path, token=TOKEN, data=None, headers=None):
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        r = yield treq.request(method, self.base + path, headers=headers, data=data,
                               reactor=reactor, persistent=False)
        body = yield treq.content(r)
        return r, body

    @defer.inlineCallbacks
    def json(self, method, path, status=200, **kw):
        r, body = yield self.request(method, path, **kw)
        self.testCase.assertEqual(r.code, status, body)
        return json.loads(body) if body else None

    def get(self, path, **kw):
        return self.json("GET", path, **kw)


class TokenTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.core = Core(reactor)
        self.core.startService()
        self.addCleanup(self.core.stopService)
        self.admin = yield Admin(self, self.core).start()

    @defer.inlineCallbacks
    def test_refusedWithoutToken(self):
        """
        Without the token, or with a wrong one (also one that differs in its
        last character only, or in case), every API path is 401 with
        C{WWW-Authenticate: Bearer}, and the refusals are counted.
        """
        cases = [(None, "GET", "/api/overview"), (TOKEN[:-1] + "X", "GET", "/api/hubs"),
                 (TOKEN.upper(), "GET", "/api/rates"),
                 (None, "POST", "/api/hubs/chat/connections/c1/close"),
                 ("", "DELETE", "/api/iot/fleets/acme/devices/d1/queue")]
        for token, method, path in cases:
            r, body = yield self.admin.request(method, path, token=token)
            self.assertEqual(r.code, 401, (method, path))
            self.assertEqual(r.headers.getRawHeaders("www-authenticate"),
                             ['Bearer realm="broker admin"'])
            self.assertEqual(json.loads(body)["error"]["code"], "Unauthorized")
        # A scheme other than Bearer is no token at all.
        r, _ = yield self.admin.request("GET", "/api/overview", token=None,
                                        headers={"Authorization": f"Basic {TOKEN}"})
        self.assertEqual(r.code, 401)
        self.assertEqual(self.admin.guard.refused, {"missing": 3, "wrong": 3})
        families = {m.name: m for m in AdminCollector(self.admin.guard).collect()}
        samples = {s.labels["reason"]: s.value for s in families["broker_admin_refused"].samples}
        self.assertEqual(samples, {"missing": 3, "wrong": 3})
        # Nothing was closed: the hub does not even exist.
        self.assertEqual(self.core.hubs, {})

    @defer.inlineCallbacks
    def test_acceptedWithToken(self):
        o = yield self.admin.get("/api/overview")
        self.assertTrue(o["health"]["ok"])
        self.assertEqual(o["core"]["connections"], 0)

    @defer.inlineCallbacks
    def test_probesOpenByDefault(self):
        for path in ("/healthz", "/stats", "/metrics"):
            r, _ = yield self.admin.request("GET", path, token=None)
            self.assertEqual(r.code, 200, path)

    @defer.inlineCallbacks
    def test_protectProbes(self):
        """
        With C{admin.protect_probes}, the probes want the token too.
        """
        admin = yield Admin(self, self.core, protectProbes=True).start()
        for path in ("/healthz", "/stats", "/metrics"):
            r, _ = yield admin.request("GET", path, token=None)
            self.assertEqual(r.code, 401, path)
            r, _ = yield admin.request("GET", path, token="wrong")
            self.assertEqual(r.code, 401, path)
            r, _ = yield admin.request("GET", path)
            self.assertEqual(r.code, 200, path)

    @defer.inlineCallbacks
    def test_console(self):
        """
        C{/} is the console's page and its assets are under C{/static},
        each with the Content Security Policy; the page needs no token (it
        holds no data), the data it shows does.
        """
        r, body = yield self.admin.request("GET", "/", token=None)
        self.assertEqual(r.code, 200)
        self.assertIn(b"<title>broker console</title>", body)
        self.assertEqual(r.headers.getRawHeaders("content-security-policy"), [CSP.decode()])
        self.assertEqual(r.headers.getRawHeaders("x-frame-options"), ["DENY"])
        for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css"),
                           ("favicon.svg", "image/svg+xml")):
            r, body = yield self.admin.request("GET", "/static/" + name, token=None)
            self.assertEqual(r.code, 200, name)
            self.assertTrue(r.headers.getRawHeaders("content-type")[0].startswith(kind))
            self.assertTrue(body)
        # No inline script: the CSP would refuse it.
        _, page = yield self.admin.request("GET", "/", token=None)
        self.assertNotIn(b"<script>", page)
        r, _ = yield self.admin.request("GET", "/static/nope.js", token=None)
        self.assertEqual(r.code, 404)

    @defer.inlineCallbacks
    def test_bodies(self):
        """
        Only the API's actions take a body, and not beyond 64 KiB: refused
        before it is read.
        """
        r, _ = yield self.admin.request("POST", "/healthz", data=b"x")
        self.assertEqual(r.code, 405)
        r, _ = yield self.admin.request("POST", "/api/hubs/chat/groups/g/messages",
                                        data=b"x" * (64 * 1024 + 1))
        self.assertEqual(r.code, 413)

    @defer.inlineCallbacks
    def test_errors(self):
        yield self.admin.get("/api/nope", status=404)
        yield self.admin.get("/api/hubs/nohub", status=404)
        yield self.admin.json("POST", "/api/overview", status=405)
        e = yield self.admin.get("/api/hubs?x=1&offset=-1")
        self.assertEqual(e, {"hubs": []})
        self.core.hub("chat")
        e = yield self.admin.get("/api/hubs/chat/connections?offset=-1", status=400)
        self.assertEqual(e["error"]["code"], "BadRequest")
        yield self.admin.get("/api/hubs/chat/connections?limit=many", status=400)


class AccessLogTests(unittest.TestCase):
    """
    The console's polls write no access-log line; its actions and
    refusals do.
    """

    @defer.inlineCallbacks
    def test_quietReads(self):
        core = Core(reactor)
        core.startService()
        self.addCleanup(core.stopService)
        admin = yield Admin(self, core).start()
        lines = []
        self.patch(BoundedSite, "log", lambda site, request: lines.append(
            f"{request.method.decode()} {request.uri.decode()} {request.code}"))
        yield admin.get("/api/overview")
        yield admin.get("/api/rates")
        self.assertEqual(lines, [])
        yield admin.request("GET", "/api/overview", token=None)
        yield admin.json("POST", "/api/hubs/nohub/groups/g/messages", status=404)
        self.assertEqual(len(lines), 2, lines)
        self.assertEqual(lines, ["GET /api/overview 401",
                                 "POST /api/hubs/nohub/groups/g/messages 404"])


class TokenFileTests(unittest.TestCase):
    def test_generatedOnce(self):
        state = self.mktemp()
        import os
        os.makedirs(state)
        token, path = loadToken("", state)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(loadToken("", state), (token, path))
        self.assertEqual(loadToken("configured", state), ("configured", None))

    def test_emptyFileRefused(self):
        import os
        state = self.mktemp()
        os.makedirs(state)
        open(os.path.join(state, "admin.token"), "w").close()
        self.assertRaises(OSError, loadToken, "", state)


class LiveTests(unittest.TestCase):
    """
    A core with real Web PubSub clients and IoT sessions, and the admin
    API over it.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.wps = yield BrokerHarness(self, reactor).start()
        self.core = self.wps.core
        self.iot = yield IoTHarness(self, reactor, core=self.core).start()
        self.rates = RateSampler(reactor, [coreCounters(self.core)], interval=0.05,
                                 gauges=("connections",))
        views = {"webpubsub": WebPubSubView(self.core, self.wps.site.restAPI),
                 "iot": IoTView(self.iot.concentrator, self.iot.factory, self.iot.udp)}
        self.admin = yield Admin(self, self.core, views=views, rates=self.rates).start()
        self.alice = yield self.wps.connectJSON(userId="alice", groups=["room"],
                                                roles=["webpubsub.sendToGroup"])
        self.bob = yield self.wps.connectJSON(userId="bob", groups=["room", "other"],
                                              roles=["webpubsub.sendToGroup"])

    @defer.inlineCallbacks
    def test_overviewAndStats(self):
        o = yield self.admin.get("/api/overview")
        self.assertEqual(o["core"]["connections"], 2)
        self.assertEqual(o["faces"]["webpubsub"]["connections"], 2)
        self.assertEqual(o["faces"]["hubs"]["webpubsub"]["connections"], 2)
        self.assertEqual(o["faces"]["iot"]["devicesOnline"], 0)
        self.assertIn("pid", o["node"])
        self.assertFalse(o["clustered"])
        yield self.iot.device("d1")
        o = yield self.admin.get("/api/overview")
        self.assertEqual(o["faces"]["iot"]["devicesOnline"], 1)
        # /stats: today's keys, plus a section per face.
        r, body = yield self.admin.request("GET", "/stats", token=None)
        stats = json.loads(body)
        self.assertEqual((stats["connections"], stats["hubs"]["chat"]["users"]), (2, 2))
        self.assertEqual(stats["iot"]["devicesOnline"], 1)
        self.assertEqual(stats["webpubsub"]["connections"], 2)

    @defer.inlineCallbacks
    def test_hubsConnectionsGroupsUsers(self):
        hubs = yield self.admin.get("/api/hubs")
        chat = [h for h in hubs["hubs"] if h["name"] == "chat"][0]
        self.assertEqual((chat["face"], chat["connections"], chat["users"], chat["groups"]),
                         ("webpubsub", 2, 2, 2))
        page = yield self.admin.get("/api/hubs/chat/connections")
        self.assertEqual(page["total"], 2)
        self.assertEqual([c["userId"] for c in page["items"]], ["alice", "bob"])
        page = yield self.admin.get("/api/hubs/chat/connections?search=BO")
        self.assertEqual([c["connectionId"] for c in page["items"]], [self.bob.connectionId])
        detail = yield self.admin.get(f"/api/hubs/chat/connections/{self.bob.connectionId}")
        self.assertEqual((detail["userId"], detail["groups"], detail["face"]),
                         ("bob", ["other", "room"], "webpubsub"))
        self.assertEqual(detail["subprotocol"], "json.webpubsub.azure.v1")
        self.assertTrue(detail["address"].startswith("127.0.0.1:"))
        self.assertGreater(detail["connectedAt"], 0)
        yield self.bob.publish("room", 1)
        detail = yield self.admin.get(f"/api/hubs/chat/connections/{self.bob.connectionId}")
        self.assertEqual(detail["messagesIn"], 1)
        groups = yield self.admin.get("/api/hubs/chat/groups")
        self.assertEqual(sorted((g["name"], g["connections"]) for g in groups["items"]),
                         [("other", 1), ("room", 2)])
        groups = yield self.admin.get("/api/hubs/chat/groups?search=OTH")
        self.assertEqual([g["name"] for g in groups["items"]], ["other"])
        members = yield self.admin.get("/api/hubs/chat/groups/room")
        self.assertEqual(members["total"], 2)
        users = yield self.admin.get("/api/hubs/chat/users?search=ali")
        self.assertEqual(users["items"], [{"userId": "alice", "connections": 1}])
        user = yield self.admin.get("/api/hubs/chat/users/alice")
        self.assertEqual([c["connectionId"] for c in user["connections"]],
                         [self.alice.connectionId])
        yield self.admin.get("/api/hubs/chat/connections/nope", status=404)
        yield self.admin.get("/api/hubs/chat/users/nobody", status=404)

    @defer.inlineCallbacks
    def test_closeConnection(self):
        """
        Closing a connection closes the client's WebSocket (1008, as the
        REST API's close does); the other client keeps its connection.
        """
        result = yield self.admin.json(
            "POST", f"/api/hubs/chat/connections/{self.bob.connectionId}/close")
        self.assertEqual(result, {"closed": True, "connectionId": self.bob.connectionId})
        code, reason = yield self.bob.closed
        self.assertEqual((code, reason), (1008, "closed by an administrator"))
        yield waitUntil(reactor, lambda: self.core.hubs["chat"].connectionCount == 1)
        yield self.admin.json("POST", f"/api/hubs/chat/connections/{self.bob.connectionId}/close",
                              status=404)
        self.assertIsNone(self.alice.closeCode)

    @defer.inlineCallbacks
    def test_removeFromGroup(self):
        cid = self.bob.connectionId
        yield self.admin.json("DELETE", f"/api/hubs/chat/connections/{cid}/groups/room")
        detail = yield self.admin.get(f"/api/hubs/chat/connections/{cid}")
        self.assertEqual(detail["groups"], ["other"])
        # A message to the group now reaches alice only.
        yield self.admin.json("POST", "/api/hubs/chat/groups/room/messages", data=b"hi room")
        frame = yield self.alice.nextJSON()
        self.assertEqual((frame["type"], frame["group"], frame["data"]),
                         ("message", "room", "hi room"))
        self.assertEqual(self.bob.frames, [])

    @defer.inlineCallbacks
    def test_sendTestMessage(self):
        result = yield self.admin.json("POST", "/api/hubs/chat/groups/other/messages",
                                       data="héllo".encode())
        self.assertEqual(result["group"], "other")
        frame = yield self.bob.nextJSON()
        self.assertEqual((frame["from"], frame["group"], frame["dataType"], frame["data"]),
                         ("group", "other", "text", "héllo"))
        yield self.admin.json("POST", "/api/hubs/chat/groups/other/messages", data=b"\xff",
                              status=400)

    @defer.inlineCallbacks
    def test_iot(self):
        yield self.iot.device("d1")
        self.iot.concentrator.telemetry("acme", "d1",
                                        frames.Payload(frames.JSON, b'{"t":21.5}'))
        for i in range(3):
            yield self.iot.concentrator.send("acme", "d2", frames.Payload(frames.UTF8, b"cmd"))
        fleets = yield self.admin.get("/api/iot/fleets")
        self.assertEqual(fleets["fleets"], [
            {"name": "acme", "devices": 2, "devicesOnline": 1},
            {"name": "other", "devices": 1, "devicesOnline": 0}])
        devices = yield self.admin.get("/api/iot/fleets/acme")
        byId = {d["id"]: d for d in devices["items"]}
        self.assertEqual((byId["d1"]["online"], byId["d2"]["online"]), (True, False))
        self.assertEqual(byId["d2"]["queueDepth"], 3)
        self.assertEqual(byId["d1"]["lastValue"]["payload"], '{"type":"json","data":{"t":21.5}}')
        device = yield self.admin.get("/api/iot/fleets/acme/devices/d2")
        self.assertEqual(device["queueDepth"], 3)
        purged = yield self.admin.json("DELETE", "/api/iot/fleets/acme/devices/d2/queue")
        self.assertEqual(len(purged["purged"]), 3)
        device = yield self.admin.get("/api/iot/fleets/acme/devices/d2")
        self.assertEqual(device["queueDepth"], 0)
        yield self.admin.get("/api/iot/fleets/acme/devices/zz", status=404)
        yield self.admin.get("/api/iot/fleets/nofleet", status=404)
        yield self.admin.json("DELETE", "/api/iot/fleets/acme/devices/zz/queue", status=404)

    @defer.inlineCallbacks
    def test_rates(self):
        self.rates.startService()
        self.addCleanup(self.rates.stopService)
        for i in range(3):
            yield self.alice.publish("room", i + 1)
        yield waitUntil(reactor, lambda: len(self.rates.samples) >= 3)
        rates = yield self.admin.get("/api/rates")
        self.assertEqual(rates["interval"], 0.05)
        self.assertEqual(len(rates["t"]), len(rates["series"]["messagesIn"]))
        self.assertEqual(rates["series"]["connections"][-1], 2)
        self.assertGreater(sum(v for v in rates["series"]["messagesOut"] if v), 0)

    @defer.inlineCallbacks
    def test_cluster(self):
        info = yield self.admin.get("/api/cluster")
        self.assertFalse(info["clustered"])
        self.assertEqual(info["nodes"], [{"id": None, "self": True, "alive": True}])


class RateSamplerTests(unittest.TestCase):
    def test_series(self):
        """
        Counters become rates per second between samples, gauges stay
        levels, a counter that went down (reset) gives no rate, and the
        ring keeps the window only.
        """
        clock = Clock()
        values = {"n": 0, "c": 5}
        rates = RateSampler(clock, [lambda: dict(values)], interval=2.0, window=12.0,
                            gauges=("c",))
        rates.startService()
        for n in (10, 30, 20, 40, 50, 60, 70, 80):
            values["n"] = n
            values["c"] += 1
            clock.advance(2.0)
        rates.stopService()
        s = rates.series()
        self.assertEqual(len(rates.samples), 7)
        self.assertEqual(s["series"]["n"], [None, 10.0, 5.0, 5.0, 5.0, 5.0])
        self.assertEqual(s["series"]["c"], [8, 9, 10, 11, 12, 13])
        self.assertEqual(s["t"], [6.0, 8.0, 10.0, 12.0, 14.0, 16.0])


class PagingTests(unittest.TestCase):
    """
    Paging at 100,000 connections in one hub (admitted to the hub directly,
    as the core is built to take them): pages at any offset, searches
    with totals, all through the API.
    """

    N = 100000

    @defer.inlineCallbacks
    def setUp(self):
        self.core = Core(reactor)
        self.core.startService()
        self.addCleanup(self.core.stopService)
        hub = self.core.hub("big")
        for i in range(self.N):
            hub.admit(RecordingConnection(f"c{i:06d}", f"user{i % 1000}"), f"user{i % 1000}",
                      (), [f"g{i % 100}"])
        self.admin = yield Admin(self, self.core).start()

    @defer.inlineCallbacks
    def test_pages(self):
        page = yield self.admin.get("/api/hubs/big/connections?offset=99990&limit=50")
        self.assertEqual((page["total"], page["offset"], page["limit"]), (self.N, 99990, 50))
        self.assertEqual([c["connectionId"] for c in page["items"]],
                         [f"c{i:06d}" for i in range(99990, self.N)])
        page = yield self.admin.get("/api/hubs/big/connections?limit=100000")
        self.assertEqual((page["limit"], len(page["items"])), (500, 500))
        page = yield self.admin.get("/api/hubs/big/connections?offset=200000")
        self.assertEqual((page["total"], page["items"]), (self.N, []))

    @defer.inlineCallbacks
    def test_search(self):
        # user7, user70..79, user700..799: 111 users of 100 connections each.
        page = yield self.admin.get("/api/hubs/big/connections?search=USER7&offset=11000")
        self.assertEqual(page["total"], 11100)
        self.assertEqual(len(page["items"]), 50)
        self.assertTrue(all(c["userId"].startswith("user7") for c in page["items"]))
        page = yield self.admin.get("/api/hubs/big/connections?search=c099999")
        self.assertEqual([c["connectionId"] for c in page["items"]], ["c099999"])
        users = yield self.admin.get("/api/hubs/big/users?search=user99")
        self.assertEqual(users["total"], 11)
        groups = yield self.admin.get("/api/hubs/big/groups?offset=90&limit=20")
        self.assertEqual((groups["total"], len(groups["items"])), (100, 10))
        self.assertEqual(groups["items"][0], {"name": "g90", "connections": 1000})

    @defer.inlineCallbacks
    def test_closeAtScale(self):
        yield self.admin.json("POST", "/api/hubs/big/connections/c050000/close")
        closed = self.core.hubs["big"].session("c050000").connection.closed
        self.assertEqual(closed, (1008, "closed by an administrator"))


class PeerGroupsViewTests(PeerGroupsBase, unittest.TestCase):
    """
    The peer-groups view over a real broker with real peer sessions.
    """

    @defer.inlineCallbacks
    def test_applicationsGroupsMembers(self):
        admin = yield self.group("admin")
        yield self.invite(admin, "bob", connect=False)
        view = PeerGroupsView(self.broker.pg)
        summary = view.summary()
        self.assertEqual((summary["applications"], summary["groups"], summary["membersOnline"]),
                         (1, 1, 1))
        apps = view.read([], {})["applications"]
        self.assertEqual(apps, [{"name": "default", "groups": 1, "membersOnline": 1}])
        groups = view.read(["applications", "default"], {})
        self.assertEqual(groups["total"], 1)
        gpn = groups["items"][0]["name"]
        self.assertEqual(groups["items"][0]["online"], 1)
        members = view.read(["applications", "default", "groups", gpn], {})
        self.assertEqual([(m["friendlyName"], m["online"]) for m in members["items"]],
                         [("Admin", True), ("Bob", False)])
        self.assertIn("peergroups.requests", view.counters())
