# -*- test-case-name: tests.test_iot_feedback -*-
"""
Delivery feedback of queued device messages (L{broker.iot.feedback}) over
real sockets: MESSAGE_STATUS frames to a central session (also one that
was away), C{message_status} events to a real HTTP webhook, and the API
calls that list, inspect and purge a device's queue.
"""

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from broker.iot import frames
from broker.iot.feedback import OutcomeLog, statusPayload
from broker.iot.frames import Payload, encode
from broker.iot.settings import SECTION
from broker.iot.webhook import Webhooks
from tests.iotharness import waitUntil
from tests.test_iot_api import APIHarness
from tests.test_iot_forward import RecordingCentral
from tests.test_iot_webhook import WebhookTestMixin


def statuses(central):
    """
    C{(messageId, device, status)} of the MESSAGE_STATUS frames a
    L{RecordingCentral} got.
    """
    out = []
    for f in central.log:
        if f.kind == frames.MESSAGE_STATUS:
            v = f.payload.value()
            assert f.address == v["device"], f
            assert isinstance(v["at"], float), v
            out.append((v["messageId"], v["device"], v["status"]))
    return out


class WireTests(TestCase):
    def test_vector(self):
        """
        The test vector of docs/iot-protocol.md: a MESSAGE_STATUS from the
        central queue (durable id 7) about message 42 of device d1.
        """
        payload = statusPayload(42, "d1", "delivered", 1700000000.5)
        self.assertEqual(payload.value(), {"messageId": "42", "device": "d1",
                                           "status": "delivered", "at": 1700000000.5})
        wire = encode(frames.MESSAGE_STATUS, 7, payload, "d1")
        self.assertEqual(wire[:18].hex(), "00000055" "01" "34" "0000000000000007" "04" "02" "6431")
        self.assertEqual(wire[18:], payload.data)
        self.assertEqual(payload.data, b'{"messageId":"42","device":"d1",'
                                       b'"status":"delivered","at":1700000000.5}')

    def test_outcomeLogBounded(self):
        log = OutcomeLog(perFleet=2)
        for i in range(3):
            log.record("f", "d", i, "delivered", float(i))
        log.record("g", "d", 0, "purged", 9.0)
        self.assertIsNone(log.get("f", "d", 0))
        self.assertEqual(log.get("f", "d", 2), ("delivered", 2.0))
        self.assertEqual(log.get("g", "d", 0), ("purged", 9.0))
        self.assertIsNone(log.get("f", "e", 2))


class FeedbackMixin:
    options = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield APIHarness(self, **self.options).start()
        self.c = self.h.iot.concentrator

    @defer.inlineCallbacks
    def queue(self, device, value, queued=True):
        status, body, _ = yield self.h.call(
            "POST", f"/v1/fleets/acme/devices/{device}/messages",
            {"payload": {"type": "json", "data": value}})
        self.assertEqual((status, body["queued"]), (202, queued))
        return body["messageId"]

    @defer.inlineCallbacks
    def central(self):
        central = yield self.h.iot.open(RecordingCentral())
        yield central.authenticated
        return central

    @defer.inlineCallbacks
    def deliver(self, device="d1"):
        """
        Connect the device, take (and auto-ACK) what is queued for it.
        """
        d = yield self.h.iot.device(device, authenticate=False)
        d.autoAck = True
        yield d.authenticated
        yield waitUntil(reactor, lambda: self.c.stats["messagesAcked"] > 0)
        return d


class CentralFeedbackTests(FeedbackMixin, TestCase):
    @defer.inlineCallbacks
    def test_awayCentralGetsOutcomesInOrder(self):
        """
        With no central connected, a message delivered, one expired and
        one purged each yield a MESSAGE_STATUS kept in the central queue;
        the central gets them once it connects, in order with the
        device's presence events, and ACKs them off the queue.
        """
        # Queued with a short TTL of its own (the central queue's events
        # keep the default one).
        expired = str((yield self.h.iot.store.push("acme", "d2", Payload.json("too late"),
                                                   0.05, 10)))
        yield deferLater(reactor, 0.1, lambda: None)
        # What the face's housekeeping does every minute.
        self.c.feedback.expired((yield self.h.iot.store.purgeExpired()))
        purged = yield self.queue("d2", "purge me")
        status, _, _ = yield self.h.call(
            "DELETE", f"/v1/fleets/acme/devices/d2/messages/{purged}")
        self.assertEqual(status, 204)
        delivered = yield self.queue("d1", "hello")
        device = yield self.deliver("d1")
        frame = [f for f in device.inbox.pending if f.kind == frames.MESSAGE][0]
        self.assertEqual(str(frame.requestId), delivered)
        yield waitUntil(reactor, lambda: self.c.stats["centralQueued"] >= 4)
        central = yield self.central()
        yield waitUntil(reactor, lambda: len(statuses(central)) == 3)
        self.assertEqual(statuses(central), [(expired, "d2", "expired"),
                                             (purged, "d2", "purged"),
                                             (delivered, "d1", "delivered")])
        kinds = [f.kind for f in central.log]
        self.assertLess(kinds.index(frames.DEVICE_CONNECTED),
                        kinds.index(frames.MESSAGE_STATUS, 2))
        self.assertTrue(all(f.requestId for f in central.log))
        yield waitUntil(reactor, lambda: self.c.stats["centralDelivered"] == len(central.log))
        self.assertEqual((yield self.h.iot.store.depth("acme", "")), 0)
        # The API knows every outcome.
        for mid, dev, state in statuses(central):
            status, body, _ = yield self.h.call(
                "GET", f"/v1/fleets/acme/devices/{dev}/messages/{mid}")
            self.assertEqual((status, body["status"], body["messageId"]), (200, state, mid))

    @defer.inlineCallbacks
    def test_connectedCentralGetsDeliveredAtOnce(self):
        central = yield self.central()
        device = yield self.h.iot.device("d1")
        device.autoAck = True
        mid = yield self.queue("d1", "now", queued=False)
        yield waitUntil(reactor, lambda: statuses(central))
        self.assertEqual(statuses(central), [(mid, "d1", "delivered")])


class WebhookFeedbackTests(WebhookTestMixin, FeedbackMixin, TestCase):
    """
    The webhook gets each outcome as a C{message_status} event, also after
    being down for a while.
    """

    @defer.inlineCallbacks
    def setUp(self):
        yield self.startUpstream()
        self.upstream.default = (503, b"")
        yield FeedbackMixin.setUp(self)
        settings = SECTION.check("iot", {"webhook": {
            "retries": 0, "backoff": 0.02, "max_backoff": 0.1, "fleets": {"acme": {
                "url": self.url, "signing_secret": "s"}}}})
        self.webhooks = Webhooks(reactor, settings["webhook"], persistent=False)
        self.addCleanup(self.webhooks.close)
        self.webhooks.install(self.c)

    @defer.inlineCallbacks
    def test_outcomesAfterOutage(self):
        delivered = yield self.queue("d1", "a")
        purged = yield self.queue("d2", "b")
        yield self.deliver("d1")
        status, body, _ = yield self.h.call("DELETE", "/v1/fleets/acme/devices/d2/messages")
        self.assertEqual((status, body), (200, {"id": "d2", "purged": [purged]}))
        yield waitUntil(reactor, lambda: self.upstream.seen)
        self.upstream.default = (200, b"")
        yield waitUntil(reactor, lambda: self.c.stats["centralQueued"]
                        == self.c.stats["centralDelivered"])
        events = {}
        for s in self.upstream.seen:
            events[s["event"]["id"]] = s["event"]
        got = [(e["payload"]["data"]["messageId"], e["device"], e["payload"]["data"]["status"])
               for e in events.values() if e["kind"] == "message_status"]
        self.assertEqual(got, [(delivered, "d1", "delivered"), (purged, "d2", "purged")])
        for e in events.values():
            if e["kind"] == "message_status":
                self.assertEqual(e["payload"]["type"], "json")
                self.assertEqual(e["id"], f"q{e['messageId']}")


class QueueAPITests(FeedbackMixin, TestCase):
    @defer.inlineCallbacks
    def test_listAndState(self):
        a = yield self.queue("d2", {"n": 1})
        b = yield self.queue("d2", "xyz")
        status, body, _ = yield self.h.call("GET", "/v1/fleets/acme/devices/d2/messages")
        self.assertEqual(status, 200)
        self.assertEqual([(m["messageId"], m["size"]) for m in body["messages"]],
                         [(a, 7), (b, 5)])
        for m in body["messages"]:
            self.assertGreater(m["expires"], m["enqueued"])
        status, body, _ = yield self.h.call("GET", f"/v1/fleets/acme/devices/d2/messages/{a}")
        self.assertEqual((status, body["status"], body["device"]), (200, "queued", "d2"))
        status, body, _ = yield self.h.call("GET", "/v1/fleets/acme/devices/d2/messages/999")
        self.assertEqual((status, body["status"]), (200, "unknown"))
        status, body, _ = yield self.h.call("GET", "/v1/fleets/acme/devices/d1/messages")
        self.assertEqual((status, body), (200, {"id": "d1", "messages": []}))

    @defer.inlineCallbacks
    def test_purgeOne(self):
        a = yield self.queue("d2", 1)
        b = yield self.queue("d2", 2)
        status, body, _ = yield self.h.call("DELETE", f"/v1/fleets/acme/devices/d2/messages/{a}")
        self.assertEqual((status, body), (204, None))
        status, body, _ = yield self.h.call("DELETE", f"/v1/fleets/acme/devices/d2/messages/{a}")
        self.assertEqual((status, body["error"]["code"]), (404, "NOT_QUEUED"))
        status, body, _ = yield self.h.call("GET", f"/v1/fleets/acme/devices/d2/messages/{a}")
        self.assertEqual(body["status"], "purged")
        status, body, _ = yield self.h.call("GET", "/v1/fleets/acme/devices/d2/messages")
        self.assertEqual([m["messageId"] for m in body["messages"]], [b])
        self.assertEqual(self.c.stats["messagesPurged"], 1)

    @defer.inlineCallbacks
    def test_errors(self):
        """
        Auth, unknown devices, bad ids, other fleets: the usual errors.
        """
        a = yield self.queue("d2", 1)
        for method in ("GET", "DELETE"):
            for path in ("/v1/fleets/acme/devices/d2/messages",
                         f"/v1/fleets/acme/devices/d2/messages/{a}"):
                status, body, _ = yield self.h.call(method, path, key=False)
                self.assertEqual((status, body["error"]["code"]), (401, "UNAUTHENTICATED"))
                status, body, _ = yield self.h.call(method, path, key=self.h.otherKey)
                self.assertEqual((status, body["error"]["code"]), (403, "FORBIDDEN"))
            for path in ("/v1/fleets/acme/devices/nope/messages",
                         "/v1/fleets/acme/devices/nope/messages/1"):
                status, body, _ = yield self.h.call(method, path)
                self.assertEqual((status, body["error"]["code"]), (404, "UNKNOWN_DEVICE"))
            for bad in ("x", "-1", "1.5", "\u0661", "9" * 21):
                status, body, _ = yield self.h.call(
                    method, f"/v1/fleets/acme/devices/d2/messages/{bad}")
                self.assertEqual((status, body["error"]["code"]), (400, "BAD_REQUEST"))
        # Another fleet's key on its own URL does not reach acme's devices.
        status, body, _ = yield self.h.call("GET", f"/v1/fleets/other/devices/d2/messages/{a}",
                                            key=self.h.otherKey)
        self.assertEqual((status, body["error"]["code"]), (404, "UNKNOWN_DEVICE"))
        status, body, _ = yield self.h.call(
            "GET", f"/v1/fleets/acme/devices/d2/messages/{a}/more")
        self.assertEqual((status, body["error"]["code"]), (404, "NOT_FOUND"))
        status, body, _ = yield self.h.call("PUT", f"/v1/fleets/acme/devices/d2/messages/{a}")
        self.assertEqual(status, 405)
        status, body, _ = yield self.h.call("GET", "/v1/fleets/acme/devices/d2/messages")
        self.assertEqual([m["messageId"] for m in body["messages"]], [a])
