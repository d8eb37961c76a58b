# -*- test-case-name: tests.test_logs -*-
"""
Tests for L{broker.logs}: one address format, refused handshakes counted
and logged once a minute per address, no access log for the admin probes,
and the JSON log format from a real twistd.
"""

import json
import os

import treq
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import capturedLogs, formatEvent
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from broker import logs
from broker.auth.tokens import makeClientToken
from broker.net.accesslog import INTERVAL as ACCESS_LOG_INTERVAL
from tests.test_collectors import sample
from tests.test_tap import (LOOPBACK, TwistdTestsMixin, handshake, servicePort, startInProcess,
                            writeConfig)

KEY = "a-test-access-key-of-some-length"


class PeerAddressTests(TestCase):
    def test_formats(self):
        self.assertEqual(logs.peerAddress(IPv4Address("TCP", "10.0.0.1", 5000)), "10.0.0.1:5000")
        self.assertEqual(logs.peerAddress(IPv6Address("TCP", "::1", 5000)), "[::1]:5000")
        self.assertEqual(logs.peerAddress(UNIXAddress(b"/run/b.sock")), "/run/b.sock")
        self.assertEqual(logs.peerAddress(None), "?")

    def test_transportAndRequest(self):
        """
        A transport (C{getPeer}) and an HTTP request (C{getClientAddress})
        are written by their peer's address.
        """
        class Transport:
            def getPeer(self):
                return IPv4Address("TCP", "10.0.0.2", 1)

        class Request:
            def getClientAddress(self):
                return IPv6Address("TCP", "fe80::2", 2)
        self.assertEqual(logs.peerAddress(Transport()), "10.0.0.2:1")
        self.assertEqual(logs.peerAddress(Request()), "[fe80::2]:2")


class RefusalLogTests(TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.refusals = logs.RefusalLog(self.clock.seconds, maxAddresses=3)

    def refuse(self, host, port=1000):
        self.refusals.refused("webpubsub", "401", IPv4Address("TCP", host, port),
                              "refused {peer}: {why}", why="bad token")

    def test_oncePerAddressPerMinute(self):
        """
        A flood from one address: every refusal counted, one line a minute
        (from any of its ports), the next saying how many were not logged.
        """
        with capturedLogs() as events:
            for port in range(100):
                self.refuse("10.0.0.1", port)
            self.refuse("10.0.0.9")
        self.assertEqual(self.refusals.counts, {("webpubsub", "401"): 101})
        self.assertEqual([formatEvent(e) for e in events],
                         ["refused 10.0.0.1:0: bad token", "refused 10.0.0.9:1000: bad token"])
        self.clock.advance(60)
        with capturedLogs() as events:
            self.refuse("10.0.0.1")
        self.assertEqual(len(events), 1)
        self.assertIn("99 more from this address not logged", formatEvent(events[0]))

    def test_boundedAddresses(self):
        """
        Many addresses: the map keeps the latest C{maxAddresses}.
        """
        for i in range(50):
            self.refuse(f"10.0.1.{i}")
        self.assertEqual(len(self.refusals._addresses), 3)
        self.assertEqual(self.refusals.counts[("webpubsub", "401")], 50)


class BrokerLogTests(TestCase):
    """
    A broker on loopback ports, its log captured.
    """

    def setUp(self):
        _, path = writeConfig(self, webpubsubText=f'access_keys = ["{KEY}"]\n')
        self.top = startInProcess(self, path)
        self.admin = servicePort(self.top, "admin.listen[0]")
        self.wps = servicePort(self.top, "webpubsub.listen[0]")

    @defer.inlineCallbacks
    def get(self, path):
        response = yield treq.get(f"http://127.0.0.1:{self.admin}{path}", reactor=reactor,
                                  persistent=False)
        body = yield treq.content(response)
        return response.code, body.decode("utf-8")

    @defer.inlineCallbacks
    def test_noAccessLogForProbes(self):
        """
        /healthz, /metrics and /stats write no access-log line; another
        admin path still does.
        """
        with capturedLogs() as events:
            for path in ("/healthz", "/metrics", "/stats", "/healthz?verbose"):
                code, _ = yield self.get(path)
                self.assertEqual(code, 200)
            # Access-log lines are emitted in batches (broker.net.accesslog).
            yield task.deferLater(reactor, ACCESS_LOG_INTERVAL + 0.2, lambda: None)
        texts = [formatEvent(e) for e in events]
        self.assertFalse([t for t in texts if '"GET /' in t], texts)
        with capturedLogs() as events:
            code, _ = yield self.get("/nothing-here")
            self.assertEqual(code, 404)
            yield task.deferLater(reactor, ACCESS_LOG_INTERVAL + 0.2, lambda: None)
        self.assertTrue([e for e in events if '"GET /nothing-here' in formatEvent(e)])


class RefusedHandshakeTests(TwistdTestsMixin, TestCase):
    """
    A token-guessing bot against a real C{twistd -n broker}.
    """

    @defer.inlineCallbacks
    def test_refusedHandshakes(self):
        """
        Twenty handshakes without a token, as a bot sends them: all refused
        (401), all counted on /metrics, one log line (not autobahn's line
        each); a client with a token from the same address still gets in.
        """
        directory, path = writeConfig(self, webpubsubText=f'access_keys = ["{KEY}"]\n')
        proc = self.spawn(["-n", "--pidfile=", "broker", "--config", path.path], directory,
                          ["webpubsub.listen[0]", "admin.listen[0]"])
        ports = yield proc.listening
        wps = ports["webpubsub.listen[0]"]
        for _ in range(20):
            status = yield handshake(wps, "/client/hubs/chat")
            self.assertEqual(status.split(b" ", 2)[1], b"401")
        url = f"http://127.0.0.1:{wps}/client/hubs/chat"
        status = yield handshake(wps, "/client/hubs/chat?access_token=" +
                                 makeClientToken(KEY, url))
        self.assertEqual(status.split(b" ", 2)[1], b"101")
        response = yield treq.get(f"http://127.0.0.1:{ports['admin.listen[0]']}/metrics",
                                  reactor=reactor, persistent=False)
        metrics = (yield treq.content(response)).decode("utf-8")
        self.assertEqual(sample(metrics, "broker_handshakes_refused_total",
                                face="webpubsub", reason="401"), 20)
        self.assertEqual(sample(metrics, "broker_connections_accepted_total", hub="chat"), 1)
        refused = [line for line in proc.lines() if "refused a WebSocket handshake" in line]
        self.assertEqual(len(refused), 1, proc.text())
        self.assertRegex(refused[0], r"webpubsub: refused a WebSocket handshake from "
                                     r"127\.0\.0\.1:\d+: 401 Unauthorized: ")
        self.assertNotIn("failing WebSocket opening handshake", proc.text())


class JSONLogTests(TwistdTestsMixin, TestCase):
    """
    C{[broker] log_format = "json"} under a real twistd.
    """

    def setUp(self):
        self.directory = FilePath(self.mktemp())
        self.directory.makedirs()
        self.path = self.directory.child("broker.toml")
        self.path.setContent(
            f'[broker]\nstate_dir = "{self.directory.child("state").path}"\n'
            f'log_format = "json"\n'
            f'[admin]\nlisten = ["{LOOPBACK}"]\n'
            f'[webpubsub]\nlisten = ["{LOOPBACK}"]\n'.encode("utf-8"))

    @defer.inlineCallbacks
    def waitFor(self, read, text):
        """
        The JSON events C{read()} gives, once one's text contains C{text}.
        """
        for _ in range(400):
            events = [json.loads(line) for line in read().splitlines(True)
                      if line.endswith("\n")]
            if any(text in e["text"] for e in events):
                return events
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail(f"no {text!r} in:\n{read()}")

    def assertEvents(self, events):
        for e in events:
            self.assertEqual(set(e) >= {"time", "level", "namespace", "text"}, True, e)
            self.assertTrue(e["time"].endswith("Z"), e)
        listening = [e for e in events if e.get("key") == "admin.listen[0]"]
        self.assertEqual(len(listening), 1, events)
        self.assertEqual(listening[0]["namespace"], "broker.tap")
        self.assertEqual(listening[0]["level"], "info")
        self.assertRegex(listening[0]["address"], r"^127\.0\.0\.1:\d+$")
        self.assertTrue(any(e["text"].startswith("broker ") and " starting (" in e["text"]
                            for e in events), events)

    @defer.inlineCallbacks
    def test_foregroundStdout(self):
        """
        C{twistd -n broker}: every stdout line is one JSON object.
        """
        proc = self.spawn(["-n", "--pidfile=", "broker", "--config", self.path.path],
                          self.directory)
        events = yield self.waitFor(lambda: proc.output[1].decode("utf-8"),
                                    "admin.listen[0] listening on")
        self.assertEvents(events)
        self.assertNotIn(b"Traceback", proc.output[2])

    @defer.inlineCallbacks
    def test_logfile(self):
        """
        C{twistd -n --logfile FILE broker}: the file holds the JSON lines.
        """
        logfile = self.directory.child("broker.log")
        proc = self.spawn(["-n", "--pidfile=", "--logfile", logfile.path, "broker",
                           "--config", self.path.path], self.directory)

        def read():
            return (logfile.getContent().decode("utf-8")
                    if os.path.exists(logfile.path) else "")
        events = yield self.waitFor(read, "admin.listen[0] listening on")
        self.assertEvents(events)
        self.assertEqual(proc.output[1], b"")
