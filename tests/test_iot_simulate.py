"""
Tests for C{python -m broker.iot.simulate}: a simulated device against a
concentrator on real sockets.
"""

import io

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from broker.iot.frames import Payload
from broker.iot.simulate import parseArgs, run
from broker.iot.udp import ACCEPTED
from tests.iotharness import SECRETS, IoTHarness, waitUntil


class SimulatorTests(TestCase):

    @defer.inlineCallbacks
    def test_run(self):
        """
        The simulator authenticates, sends its readings over UDP (accepted
        by the listener), answers a request and acknowledges a queued
        message.
        """
        h = yield IoTHarness(self, reactor).start()
        yield h.concentrator.send("acme", "d1", Payload.json({"cmd": "blink"}))
        args = parseArgs(["--fleet", "acme", "--device", "d1", "--key", SECRETS[("acme", "d1")],
                          "--port", str(h.port.getHost().port),
                          "--udp-port", str(h.udpPort.getHost().port),
                          "--interval", "0.1", "--count", "5"])
        out = io.StringIO()
        done = run(reactor, args, out)
        yield waitUntil(reactor, lambda: h.concentrator.isOnline("acme", "d1"))
        answer = yield h.concentrator.request("acme", "d1", Payload.json({"q": 1}), timeout=5)
        self.assertEqual(answer.value(), {"ok": True, "echo": {"q": 1}})
        sent = yield done
        self.assertEqual(sent, 5)
        yield waitUntil(reactor, lambda: h.udp.counts[ACCEPTED] == 5)
        self.assertEqual((yield h.concentrator.queueDepth("acme", "d1")), 0)
        text = out.getvalue()
        self.assertIn("authenticated as acme/d1", text)
        self.assertIn("message ", text)
        self.assertIn("{'cmd': 'blink'}", text)


class CentralSimulatorTests(TestCase):

    @defer.inlineCallbacks
    def test_deviceMessagesKeptForTheCentral(self):
        """
        A simulated device with C{--messages} while no central is connected:
        each MESSAGE is ACKed (stored); the simulated central, started
        afterwards, prints them with their durable ids after the device's
        DEVICE_CONNECTED, and ACKs them all.
        """
        h = yield IoTHarness(self, reactor).start()
        port, udp = str(h.port.getHost().port), str(h.udpPort.getHost().port)
        args = parseArgs(["--fleet", "acme", "--device", "d1", "--key", SECRETS[("acme", "d1")],
                          "--port", port, "--udp-port", udp, "--interval", "0.05",
                          "--count", "3", "--messages"])
        out = io.StringIO()
        self.assertEqual((yield run(reactor, args, out)), 3)
        yield waitUntil(reactor, lambda: h.concentrator.stats["centralQueued"] == 5)
        for rid in (1, 2, 3):
            self.assertIn(f"ack {rid}", out.getvalue())
        args = parseArgs(["--fleet", "acme", "--central", "--key", SECRETS[("acme", None)],
                          "--port", port, "--count", "5"])
        out = io.StringIO()
        self.assertEqual((yield run(reactor, args, out)), 5)
        lines = out.getvalue().splitlines()[1:]
        self.assertTrue(lines[0].startswith("device_connected from d1 (#"), lines)
        self.assertTrue(all(line.startswith("message from d1 (#") for line in lines[1:4]),
                        lines)
        self.assertIn("'seq': 2", lines[3])
        self.assertTrue(lines[4].startswith("device_disconnected from d1 (#"), lines)
        self.assertIn("'reason': 'closed'", lines[4])
        yield waitUntil(reactor, lambda: h.concentrator.stats["centralDelivered"] == 5)
        yield h.stop()
