"""
Tests for L{broker.iot.lastvalue}: each device's last telemetry, over TCP
and UDP on real sockets, read through the HTTP API (C{GET
.../telemetry/last}), kept in the SQLite store across a restart and in
Redis in cluster mode, and sent first to a Web PubSub connection joining
C{telemetry.<device>} when the fleet enables it.
"""

import time

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase

from broker.iot import frames
from broker.iot.frames import Payload
from broker.iot.lastvalue import LastValues
from broker.iot.store import MemoryMessageStore, SQLiteMessageStore
from tests.iotharness import IoTHarness, waitUntil
from tests.test_iot_api import APIHarness
from tests.wsharness import BrokerHarness

LAST = "/v1/fleets/{}/devices/{}/telemetry/last"


class Sender(DatagramProtocol):
    pass


class LastValueAPITests(TestCase):
    """
    C{GET /v1/fleets/{fleet}/devices/{id}/telemetry/last}.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield APIHarness(self, tokenBatch=8).start()
        self.sender = Sender()
        port = reactor.listenUDP(0, self.sender, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

    def accepted(self, n):
        c = self.h.iot.concentrator
        return waitUntil(reactor, lambda: c.stats["telemetryAccepted"] >= n)

    @defer.inlineCallbacks
    def test_afterTCPThenUDP(self):
        """
        The answer is the latest reading, typed as the API's payloads are,
        with the wall-clock time it was received and its transport.
        """
        device = yield self.h.iot.device("d1")
        before = time.time()
        device.write(frames.TELEMETRY, 0, Payload.json({"t": 21.5}))
        yield self.accepted(1)
        status, body, _ = yield self.h.call("GET", LAST.format("acme", "d1"))
        self.assertEqual(status, 200)
        self.assertEqual((body["id"], body["payload"], body["via"]),
                         ("d1", {"type": "json", "data": {"t": 21.5}}, "tcp"))
        self.assertTrue(before <= body["received"] <= time.time())

        tokens = yield device.waitTokens(8)
        self.sender.transport.write(device.datagram(Payload(frames.BINARY, b"\x00\x01"),
                                                    tokens[0]), self.h.iot.udpAddress)
        yield self.accepted(2)
        status, body, _ = yield self.h.call("GET", LAST.format("acme", "d1") + "/")
        self.assertEqual(status, 200)
        self.assertEqual((body["payload"], body["via"]),
                         ({"type": "binary", "data": "AAE="}, "udp"))

    @defer.inlineCallbacks
    def test_noValue(self):
        """
        A registered device that has reported nothing: 404 NO_VALUE; one
        that does not exist: 404 UNKNOWN_DEVICE.
        """
        status, body, _ = yield self.h.call("GET", LAST.format("acme", "d2"))
        self.assertEqual((status, body["error"]["code"]), (404, "NO_VALUE"))
        status, body, _ = yield self.h.call("GET", LAST.format("acme", "nope"))
        self.assertEqual((status, body["error"]["code"]), (404, "UNKNOWN_DEVICE"))
        status, body, _ = yield self.h.call("GET", "/v1/fleets/acme/devices/d1/telemetry")
        self.assertEqual((status, body["error"]["code"]), (404, "NOT_FOUND"))
        status, body, _ = yield self.h.call("GET", "/v1/fleets/acme/devices/d1/telemetry/x")
        self.assertEqual((status, body["error"]["code"]), (404, "NOT_FOUND"))
        status, body, _ = yield self.h.call("POST", LAST.format("acme", "d1"))
        self.assertEqual((status, body["error"]["code"]), (405, "METHOD_NOT_ALLOWED"))

    @defer.inlineCallbacks
    def test_authAndFleets(self):
        """
        Without a key 401; with another fleet's key 403; a fleet's device
        of the same id as another fleet's does not see its value.
        """
        device = yield self.h.iot.device("x1", fleet="other")
        device.write(frames.TELEMETRY, 0, Payload.json("other's"))
        yield self.accepted(1)
        status, body, _ = yield self.h.call("GET", LAST.format("other", "x1"), key=False)
        self.assertEqual((status, body["error"]["code"]), (401, "UNAUTHENTICATED"))
        status, body, _ = yield self.h.call("GET", LAST.format("other", "x1"))
        self.assertEqual((status, body["error"]["code"]), (403, "FORBIDDEN"))
        status, body, _ = yield self.h.call("GET", LAST.format("acme", "x1"))
        self.assertEqual((status, body["error"]["code"]), (404, "UNKNOWN_DEVICE"))
        status, body, _ = yield self.h.call("GET", LAST.format("other", "x1"),
                                            key=self.h.otherKey)
        self.assertEqual((status, body["payload"]["data"]), (200, "other's"))


class DurableLastValueTests(TestCase):
    """
    The value is written to the SQLite store in batches and read back
    after the store is reopened.
    """

    @defer.inlineCallbacks
    def test_survivesRestart(self):
        path = self.mktemp() + "/iot.sqlite"
        clock = task.Clock()
        store = SQLiteMessageStore.open(reactor, path)
        store.runner.start()
        values = LastValues(clock, store, interval=1.0)
        for i in range(100):
            values.record("acme", "d1", Payload.json(i), 1000.0 + i, "udp")
        values.record("acme", "d2", Payload.text("two"), 1000.0, "tcp")
        values.record("other", "d1", Payload.json("o"), 1001.0, "tcp")
        # Nothing written before the interval; then one batch, one row per
        # device.
        stored = yield store.lastValue("acme", "d1")
        self.assertIsNone(stored)
        clock.advance(1.0)
        yield waitUntil(reactor, lambda: values.stats["lastValueWrites"] == 3)
        self.assertEqual(values.stats["lastValueBatches"], 1)
        # An older value (another writer's) never replaces a newer one.
        yield store.saveLastValues([("acme", "d1", Payload.json("old"), 5.0, "tcp")])
        values.record("acme", "d2", Payload.text("2b"), 2000.0, "udp")
        yield values.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
        yield store.runner.close()

        store = SQLiteMessageStore.open(reactor, path)
        store.runner.start()
        self.addCleanup(store.runner.close)
        reopened = LastValues(clock, store)
        got = yield reopened.get("acme", "d1")
        self.assertEqual(got, (Payload.json(99), 1099.0, "udp"))
        got = yield reopened.get("acme", "d2")
        self.assertEqual(got, (Payload.text("2b"), 2000.0, "udp"))
        got = yield reopened.get("other", "d1")
        self.assertEqual(got, (Payload.json("o"), 1001.0, "tcp"))
        got = yield reopened.get("other", "d2")
        self.assertIsNone(got)

    @defer.inlineCallbacks
    def test_failedWriteRetried(self):
        """
        A batch the store refused is written again at the next interval,
        unless a newer reading replaced it.
        """
        clock = task.Clock()
        store = MemoryMessageStore()
        refusals = []
        real = store.saveLastValues

        def flaky(rows):
            if not refusals:
                refusals.append(rows)
                return defer.fail(RuntimeError("disk full"))
            return real(rows)
        store.saveLastValues = flaky
        values = LastValues(clock, store, interval=1.0)
        values.record("acme", "d1", Payload.json(1), 1.0, "tcp")
        values.record("acme", "d2", Payload.json(2), 1.0, "tcp")
        clock.advance(1.0)
        self.assertEqual(len(refusals), 1)
        values.record("acme", "d1", Payload.json(3), 2.0, "tcp")
        clock.advance(1.0)
        got = yield store.lastValue("acme", "d1")
        self.assertEqual(got, (Payload.json(3), 2.0, "tcp"))
        got = yield store.lastValue("acme", "d2")
        self.assertEqual(got, (Payload.json(2), 1.0, "tcp"))
        self.assertEqual(clock.getDelayedCalls(), [])


class LastValueOnJoinTests(TestCase):
    """
    A Web PubSub JSON client joining C{telemetry.<device>} in the fleet's
    hub, on the same core as the concentrator.
    """

    @defer.inlineCallbacks
    def start(self, enabled):
        self.wps = yield BrokerHarness(self, reactor).start()
        self.h = yield IoTHarness(self, reactor, core=self.wps.core,
                                  lastValueOnJoin=enabled).start()
        device = yield self.h.device("d1")
        device.write(frames.TELEMETRY, 0, Payload.json({"t": 1}))
        device.write(frames.TELEMETRY, 0, Payload.json({"t": 2}))
        c = self.h.concentrator
        yield waitUntil(reactor, lambda: c.stats["telemetryAccepted"] >= 2)
        self.device = device

    @defer.inlineCallbacks
    def join(self, group="telemetry.d1"):
        ws = yield self.wps.connectJSON(hub="acme", roles=["webpubsub.joinLeaveGroup"])
        ws.send({"type": "joinGroup", "group": group, "ackId": 1})
        return ws

    @defer.inlineCallbacks
    def test_lastValueFirstWhenEnabled(self):
        """
        The last reading comes first, as the group message a live reading
        is, then the join's ack, then live readings.
        """
        yield self.start(True)
        ws = yield self.join()
        first = yield ws.nextJSON()
        self.assertEqual((first["type"], first["from"], first["group"], first["data"]),
                         ("message", "group", "telemetry.d1", {"t": 2}))
        ack = yield ws.nextJSON()
        self.assertEqual((ack["type"], ack["ackId"], ack["success"]), ("ack", 1, True))
        self.device.write(frames.TELEMETRY, 0, Payload.json({"t": 3}))
        live = yield ws.nextJSON()
        self.assertEqual({k: live[k] for k in first if k != "data"},
                         {k: first[k] for k in first if k != "data"})
        self.assertEqual(live["data"], {"t": 3})

    @defer.inlineCallbacks
    def test_nothingForOtherGroups(self):
        """
        A device that has reported nothing, one not in the registry, and a
        group that is not a telemetry group get only the ack.
        """
        yield self.start(True)
        for group in ("telemetry.d2", "telemetry.zz", "alerts"):
            ws = yield self.join(group)
            ack = yield ws.nextJSON()
            self.assertEqual((ack["type"], ack["success"]), ("ack", True))

    @defer.inlineCallbacks
    def test_nothingWhenDisabled(self):
        """
        By default a joining connection gets the ack, then live readings
        only.
        """
        yield self.start(False)
        ws = yield self.join()
        ack = yield ws.nextJSON()
        self.assertEqual((ack["type"], ack["success"]), ("ack", True))
        self.device.write(frames.TELEMETRY, 0, Payload.json({"t": 3}))
        live = yield ws.nextJSON()
        self.assertEqual(live["data"], {"t": 3})


class LastValueStoreMixin:
    """
    What every L{ILastValueStore} must do; C{setUp} sets C{self.store}.
    """

    @defer.inlineCallbacks
    def test_roundTripAndIsolation(self):
        """
        Each payload type round-trips (binary with newlines too); fleets
        and devices whose names contain the key separators stay apart.
        """
        payloads = [Payload(frames.BINARY, b"\n\x00\xff\n"), Payload.json({"a": [1]}),
                    Payload(frames.ASCII, b"t=1"), Payload.text("caf\u00e9"), frames.EMPTY]
        rows = [("f", f"d{i}", p, 1000.5 + i, "udp" if i % 2 else "tcp")
                for i, p in enumerate(payloads)]
        rows += [("f:x", "d0", Payload.json("colon fleet"), 7.0, "tcp"),
                 ("f", "x:d0", Payload.json("colon device"), 8.0, "udp")]
        yield self.store.saveLastValues(rows)
        for fleet, deviceId, p, received, via in rows:
            got = yield self.store.lastValue(fleet, deviceId)
            self.assertEqual(got, (p, received, via))
        self.assertIsNone((yield self.store.lastValue("g", "d0")))
        self.assertIsNone((yield self.store.lastValue("f", "d9")))

    @defer.inlineCallbacks
    def test_olderNeverReplacesNewer(self):
        yield self.store.saveLastValues([("f", "d", Payload.json("new"), 20.0, "udp")])
        yield self.store.saveLastValues([("f", "d", Payload.json("old"), 10.0, "tcp")])
        self.assertEqual((yield self.store.lastValue("f", "d")),
                         (Payload.json("new"), 20.0, "udp"))
        yield self.store.saveLastValues([("f", "d", Payload.json("newer"), 30.0, "tcp")])
        self.assertEqual((yield self.store.lastValue("f", "d")),
                         (Payload.json("newer"), 30.0, "tcp"))

    @defer.inlineCallbacks
    def test_largeBatch(self):
        rows = [("f", f"d{i}", Payload.json(i), 1.0 + i, "udp") for i in range(1203)]
        yield self.store.saveLastValues(rows)
        for i in (0, 499, 500, 1202):
            self.assertEqual((yield self.store.lastValue("f", f"d{i}")),
                             (Payload.json(i), 1.0 + i, "udp"))


class MemoryLastValueStoreTests(LastValueStoreMixin, TestCase):
    def setUp(self):
        self.store = MemoryMessageStore()


class SQLiteLastValueStoreTests(LastValueStoreMixin, TestCase):
    def setUp(self):
        self.store = SQLiteMessageStore.open(reactor, self.mktemp() + "/q.sqlite")
        self.store.runner.start()
        self.addCleanup(self.store.runner.close)


class RedisLastValueStoreTests(LastValueStoreMixin, TestCase):
    """
    The same on a real redis-server, plus the cluster's read: the newer of
    this node's value and Redis' (another node's) wins.
    """

    @defer.inlineCallbacks
    def setUp(self):
        from tests.redisserver import RedisServer
        self.server = RedisServer(self, reactor)
        yield self.server.start()
        self.store = yield self.makeStore("a")

    def makeStore(self, nodeId):
        from tests.test_iot_store import redisStore
        return redisStore(self, self.server, nodeId)

    @defer.inlineCallbacks
    def test_twoNodes(self):
        other = yield self.makeStore("b")
        clock = task.Clock()
        a = LastValues(clock, self.store, shared=True)
        b = LastValues(clock, other, shared=True)
        a.record("f", "d", Payload.json("on a"), 10.0, "tcp")
        yield a.flush()
        # b has never seen the device: Redis answers.
        self.assertEqual((yield b.get("f", "d")), (Payload.json("on a"), 10.0, "tcp"))
        b.record("f", "d", Payload.json("on b"), 11.0, "udp")
        # Not yet flushed: b answers its own newer value, a Redis' older...
        self.assertEqual((yield b.get("f", "d"))[0], Payload.json("on b"))
        self.assertEqual((yield a.get("f", "d"))[0], Payload.json("on a"))
        yield b.flush()
        # ...and after b's flush a answers b's newer reading; a late flush
        # of an older reading on a does not put it back.
        self.assertEqual((yield a.get("f", "d"))[0], Payload.json("on b"))
        yield self.store.saveLastValues([("f", "d", Payload.json("late"), 10.5, "tcp")])
        self.assertEqual((yield b.get("f", "d"))[0], Payload.json("on b"))

    @defer.inlineCallbacks
    def test_outage(self):
        """
        With Redis away a read fails with Unavailable and a flush is kept
        and written once Redis is back.
        """
        from broker.iot import errors
        from tests.test_cluster_redis import waitFor
        client = self.store.redis
        values = LastValues(reactor, self.store, interval=0.05, shared=True)
        self.addCleanup(values.stop)
        yield self.server.stop()
        yield waitFor(lambda: not client.connected)
        yield self.assertFailure(self.store.lastValue("f", "d"), errors.Unavailable)
        values.record("f", "d", Payload.json("kept"), 10.0, "udp")
        yield values.flush()
        self.assertEqual(values.stats["lastValueWrites"], 0)
        yield self.server.start()
        yield waitFor(lambda: client.connected)
        yield waitUntil(reactor, lambda: values.stats["lastValueWrites"] == 1)
        self.assertEqual((yield self.store.lastValue("f", "d")),
                         (Payload.json("kept"), 10.0, "udp"))
