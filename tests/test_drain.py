# -*- test-case-name: tests.test_drain -*-
"""
A real C{twistd broker} stopped by C{SIGTERM} while every face has
sessions open: each is told it is closing in its protocol's terms, a held
IoT HTTP request is answered 503, and the process ends within the drain
deadline.
"""

import json
import signal
import time

import treq
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from broker.core.drain import LiveConnections
from broker.iot import apikeys, frames
from broker.iot.client import IoTClient
from broker.peergroups.client import Identity, connectStream, connectWebSocket
from broker.webpubsub.face import ACCESS_KEY_FILE
from broker.auth.tokens import makeClientToken
from tests.test_iot_face import writeConfig
from tests.test_tap import TwistdTestsMixin
from tests.wsharness import Client

LISTENERS = ["webpubsub.listen[0]", "iot.listen[0]", "iot.http.listen[0]",
             "peergroups.listen[0]", "peergroups.tcp_listen[0]", "admin.listen[0]"]


class LiveConnectionsTests(TestCase):
    def test_whenEmpty(self):
        live = LiveConnections()
        self.assertTrue(live.whenEmpty().called)
        a, b = object(), object()
        live.add(a)
        live.add(b)
        d = live.whenEmpty()
        live.discard(a)
        self.assertFalse(d.called)
        self.assertEqual(list(live), [b])
        live.discard(b)
        self.assertTrue(d.called)
        self.assertEqual(len(live), 0)


class _Broker(TwistdTestsMixin):
    """
    A twistd broker with every client-facing face on ephemeral ports.
    """

    timeout = 60

    drainTimeout = 8.0

    @defer.inlineCallbacks
    def setUp(self):
        self.key = apikeys.newKey()[0]
        hashed = apikeys.hashLine("acme", self.key)
        self.directory, self.config = writeConfig(self)
        text = self.config.getContent().decode()
        text = text.replace("[webpubsub]\nenabled = false\n",
                            '[webpubsub]\nlisten = ["tcp:0:interface=127.0.0.1"]\n')
        text = text.replace("[broker]\n", f"[broker]\ndrain_timeout = {self.drainTimeout}\n")
        text += (f'api_keys = ["{hashed}"]\n'
                 '[peergroups]\nenabled = true\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                 'tcp_listen = ["tcp:0:interface=127.0.0.1"]\n')
        self.config.setContent(text.encode())
        self.proc = self.spawn(["-n", "--pidfile=", "broker", "--config", self.config.path],
                               self.directory, LISTENERS)
        self.ports = yield self.proc.listening

    @defer.inlineCallbacks
    def webPubSubClient(self):
        port = self.ports["webpubsub.listen[0]"]
        key = self.directory.child("state").child(ACCESS_KEY_FILE).getContent().decode().strip()
        url = f"ws://127.0.0.1:{port}/client/hubs/chat"
        token = makeClientToken(key, url)
        factory = WebSocketClientFactory(f"{url}?access_token={token}",
                                         protocols=["json.webpubsub.azure.v1"], reactor=reactor)
        factory.protocol = Client
        factory.setProtocolOptions(autoPingInterval=0, failByDrop=False)
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        yield client.opened
        yield client.nextJSON()
        return client

    @defer.inlineCallbacks
    def device(self):
        device = IoTClient("device", "acme", "d1", "d1-secret")
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                 self.ports["iot.listen[0]"]), device)
        yield device.authenticated
        return device


class SigtermDrainTests(_Broker, TestCase):
    @defer.inlineCallbacks
    def test_everyFaceToldThenStopped(self):
        wps = yield self.webPubSubClient()
        device = yield self.device()
        held = treq.post(
            f"http://127.0.0.1:{self.ports['iot.http.listen[0]']}"
            "/v1/fleets/acme/devices/d1/requests",
            json.dumps({"payload": {"type": "utf8", "data": "hold"}}).encode(),
            headers={"authorization": f"Bearer {self.key}",
                     "content-type": "application/json"},
            reactor=reactor, persistent=False)
        request = yield device.nextFrame()         # never answered: the request is held
        self.assertEqual(request.kind, frames.REQUEST)
        ws = yield connectWebSocket(
            reactor, f"ws://127.0.0.1:{self.ports['peergroups.listen[0]']}/peergroups/v1")
        yield ws.startup("default")
        yield ws.registerIdentity(Identity.generate("ws", "WS"))
        tcp = yield connectStream(
            reactor, f"tcp:127.0.0.1:{self.ports['peergroups.tcp_listen[0]']}")
        yield tcp.startup("default")
        yield tcp.registerIdentity(Identity.generate("tcp", "TCP"))

        started = time.monotonic()
        self.proc.transport.signalProcess("TERM")

        response = yield held
        self.assertEqual(response.code, 503)
        body = yield treq.json_content(response)
        self.assertEqual(body["error"]["code"], "SHUTTING_DOWN")

        frame = yield device.nextFrame()
        self.assertEqual(frame.kind, frames.CLOSE)
        self.assertEqual(frame.payload.value()["code"], "SHUTDOWN")
        yield device.closed

        code, _ = yield wps.closed
        self.assertEqual(code, 1001)
        said = json.loads(wps.frames[-1][0])
        self.assertEqual((said["type"], said["event"], said["message"]),
                         ("system", "disconnected", "broker shutting down"))

        reason = yield ws.closed
        self.assertIn("1001", str(reason))
        yield tcp.closed

        ended = yield self.proc.ended
        self.assertIsInstance(ended, error.ProcessTerminated)
        self.assertEqual(ended.signal, signal.SIGTERM)
        # Every session went at once: nothing waited for the deadline.
        self.assertLess(time.monotonic() - started, 7.0)
        text = self.proc.text()
        self.assertIn("drained in", text)
        self.assertNotIn("Traceback", text)


class DeadlineTests(_Broker, TestCase):
    """
    A client that stopped reading never finishes its close handshake: the
    broker waits for it no longer than C{broker.drain_timeout}.
    """

    drainTimeout = 1.0

    @defer.inlineCallbacks
    def test_deadline(self):
        wps = yield self.webPubSubClient()
        wps.transport.pauseProducing()
        started = time.monotonic()
        self.proc.transport.signalProcess("TERM")
        ended = yield self.proc.ended
        took = time.monotonic() - started
        self.assertEqual(ended.signal, signal.SIGTERM)
        self.assertGreaterEqual(took, 0.9)
        self.assertLess(took, 4.5)     # autobahn's close handshake timeout is 5 s
        self.assertIn("sessions still open after 1 s", self.proc.text())
        self.assertNotIn("Traceback", self.proc.text())
