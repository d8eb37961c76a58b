# -*- test-case-name: tests.test_wscompact -*-
"""
Open WebSocket connections keep few attributes of their own
(L{broker.net.wscompact}), and still behave as autobahn connections:
pings, messages both ways, close codes, and after a write recreates an
attribute that compaction had dropped.
"""

import sys

from twisted.internet import defer, reactor
from twisted.trial import unittest

from broker.net.wscompact import STATE_DEFAULTS, SendQueue
from tests.wsharness import BrokerHarness


class CompactTests(unittest.TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield BrokerHarness(self, reactor).start()
        self.hub = self.broker.core.hub("chat")

    def server(self, client):
        return self.hub.localSession(client.connectionId).connection

    @defer.inlineCallbacks
    def test_fewAttributes(self):
        """
        An open, idle connection holds a small dictionary: the factory's
        options live on its class, the state flags at their defaults are
        class attributes too, and the handshake is gone.
        """
        client = yield self.broker.connectJSON(groups=["g"])
        conn = self.server(client)
        d = conn.__dict__
        self.assertLessEqual(len(d), 24, sorted(d))
        self.assertLess(sys.getsizeof(d), 1200)
        for name in ("maxFramePayloadSize", "autoPingInterval", "http_headers",
                     "http_request_data", "_wskey", "closedByMe", "_results"):
            self.assertNotIn(name, d)
        self.assertEqual(conn.maxFramePayloadSize, self.broker.factory.maxFramePayloadSize)
        self.assertIsInstance(conn.send_queue, SendQueue)
        for name, default in STATE_DEFAULTS.items():
            if name not in d:
                self.assertEqual(getattr(conn, name), default)

    @defer.inlineCallbacks
    def test_stillWorks(self):
        """
        After compaction a connection sends and receives, answers pings and
        closes with its code; state written after compaction is its own.
        """
        client = yield self.broker.connectJSON(groups=["g"],
                                               roles=["webpubsub.sendToGroup"])
        other = yield self.broker.connectJSON(groups=["g"])
        conn = self.server(client)
        client.sendPing(b"hi")
        client.send({"type": "sendToGroup", "group": "g", "dataType": "text",
                     "data": "after compaction", "ackId": 1})
        frames = [(yield client.nextJSON()), (yield client.nextJSON())]
        self.assertIn({"type": "ack", "ackId": 1, "success": True}, frames)
        got = yield other.nextJSON()
        self.assertEqual(got["data"], "after compaction")
        self.assertFalse(self.server(other).closedByMe)
        session = self.hub.localSession(client.connectionId)
        self.hub.closeConnections([session], 4000, "bye")
        code, reason = yield client.closed
        self.assertEqual(code, 4000)
        self.assertTrue(conn.__dict__["closedByMe"])
        self.assertNotIn("closedByMe", self.server(other).__dict__)
