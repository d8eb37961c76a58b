# -*- test-case-name: tests.test_admin -*-
"""
Admin endpoints over real HTTP.
"""

import json

import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest

from broker.admin.resource import makeAdminSite
from broker.core.message import Message, Target
from broker.core.router import Core
from tests.recorder import RecordingConnection


class AdminTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.core = Core(reactor)
        self.core.startService()
        self.addCleanup(self.core.stopService)
        self.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            makeAdminSite(self.core))
        self.addCleanup(self.port.stopListening)
        hub = self.core.hub("chat")
        for cid in ("a", "b"):
            hub.admit(RecordingConnection(cid, "u"), "u", (), ["g"])
        hub.send(Target(Target.GROUP, "g"), Message.text("x"))
        hub.stats.slowConsumerDrops = 3

    @defer.inlineCallbacks
    def get(self, path):
        r = yield treq.get(f"http://127.0.0.1:{self.port.getHost().port}{path}",
                           reactor=reactor, persistent=False)
        body = yield treq.content(r)
        return r, body

    @defer.inlineCallbacks
    def test_healthz(self):
        r, body = yield self.get("/healthz")
        self.assertEqual((r.code, body), (200, b"ok\n"))
        self.core.stopService()
        r, body = yield self.get("/healthz")
        self.assertEqual(r.code, 503)

    @defer.inlineCallbacks
    def test_stats(self):
        r, body = yield self.get("/stats")
        self.assertEqual(r.headers.getRawHeaders("content-type"), ["application/json"])
        st = json.loads(body)
        self.assertEqual((st["connections"], st["groups"], st["messagesOut"],
                          st["slowConsumerDrops"]), (2, 1, 2, 3))
        self.assertEqual(st["hubs"]["chat"]["users"], 1)

    @defer.inlineCallbacks
    def test_metrics(self):
        r, body = yield self.get("/metrics")
        self.assertEqual(r.code, 200)
        self.assertIn(b"text/plain", r.headers.getRawHeaders("content-type")[0].encode())
        text = body.decode()
        self.assertIn('broker_connections{hub="chat"} 2.0', text)
        self.assertIn('broker_messages_out_total{hub="chat"} 2.0', text)
        self.assertIn('broker_slow_consumer_drops_total{hub="chat"} 3.0', text)
        self.assertIn("broker_engine_healthy 1.0", text)

    @defer.inlineCallbacks
    def test_unknownPath(self):
        r, _ = yield self.get("/nope")
        self.assertEqual(r.code, 404)
