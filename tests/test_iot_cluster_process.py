# -*- test-case-name: tests.test_iot_cluster_process -*-
"""
The IoT face over real broker processes: two or three C{twistd -n broker}
nodes joined through a real redis-server (run with its append-only file
fsynced on every write), sharing one registry file and one API key, each
with the face on ephemeral loopback ports (TCP devices and centrals, UDP
telemetry, the centrals' HTTP API).  Devices and centrals are the
reference client (L{broker.iot.client.IoTClient}); the HTTP API is called
over the network.  Every cross-node path, a node killed with SIGKILL, and
Redis killed and restarted under the running nodes.
"""

import json

import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase

from broker.iot import apikeys, frames
from broker.iot.client import AuthFailed, IoTClient
from broker.iot.errors import Refused
from broker.iot.frames import Payload
from tests.clusternodes import ClusterNodesMixin
from tests.redisserver import settle

HEARTBEAT = 0.2
DEAD_AFTER = 1.0
# The central's TCP requests (iot.request_timeout): short, for the timeout
# paths.
REQUEST_TIMEOUT = 1.0

SECRETS = {"d1": "d1-secret", "d2": "d2-secret", "d3": "d3-secret", None: "central-secret"}

REGISTRY = """\
[fleets.acme]
central_key = "central-secret"
[fleets.acme.devices.d1]
key = "d1-secret"
[fleets.acme.devices.d2]
key = "d2-secret"
[fleets.acme.devices.d3]
key = "d3-secret"
"""

FACES = """\
[webpubsub]
enabled = false
[iot]
enabled = true
listen = ["tcp:0:interface=127.0.0.1"]
registry_file = "{registry}"
request_timeout = {requestTimeout}
[iot.udp]
port = 0
[iot.http]
listen = ["tcp:0:interface=127.0.0.1"]
api_keys = ["{apiKeyLine}"]
"""


def echo(frame):
    return Payload.json({"echo": frame.payload.value()})


class IoTClusterProcessMixin(ClusterNodesMixin):
    """
    IoT broker nodes as real twistd processes on one test redis-server, and
    devices, centrals and HTTP calls to them.
    """

    timeout = 60
    prefix = "iotp"
    heartbeat = HEARTBEAT
    deadAfter = DEAD_AFTER
    faces = FACES
    listeners = ["iot.listen[0]", "iot.udp", "iot.http.listen[0]"]

    @defer.inlineCallbacks
    def startCluster(self, names):
        self.prepareCluster(durable=True)
        registry = self.directory.child("registry.toml")
        registry.setContent(REGISTRY.encode())
        self.apiKey, _ = apikeys.newKey()
        self.registryPath = registry.path
        self.clients = []
        self.addCleanup(self._closeClients)
        self.sender = DatagramProtocol()
        port = reactor.listenUDP(0, self.sender, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        yield self.redis.start()
        yield defer.gatherResults([self.startNode(n, healthy=False) for n in names],
                                  consumeErrors=True)
        for name in names:
            yield self.waitHealth(name, 200)

    def faceSettings(self, name):
        return {"registry": self.registryPath, "requestTimeout": REQUEST_TIMEOUT,
                "apiKeyLine": apikeys.hashLine("acme", self.apiKey)}

    def nodeStarted(self, proc):
        proc.tcp = proc.ports["iot.listen[0]"]
        proc.udp = proc.ports["iot.udp"]
        proc.http = proc.ports["iot.http.listen[0]"]

    @defer.inlineCallbacks
    def _closeClients(self):
        for c in self.clients:
            if c.transport is not None and c.transport.connected:
                c.transport.abortConnection()
        yield defer.DeferredList([c.closed for c in self.clients])

    # -- the admin endpoints ------------------------------------------------

    @defer.inlineCallbacks
    def metrics(self, name):
        """
        The node's /metrics as C{{"name{labels}": value}}.
        """
        _, body = yield self.adminGet(name, "/metrics")
        text = body.decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        return values

    # -- the centrals' HTTP API -----------------------------------------------

    @defer.inlineCallbacks
    def api(self, name, method, path, body=None):
        """
        Call C{/v1/fleets/acme/devices<path>} on node C{name}.

        @return: C{(status, decoded JSON body or None)}.
        """
        headers = {b"Authorization": [f"Bearer {self.apiKey}".encode()]}
        data = None
        if body is not None:
            headers[b"Content-Type"] = [b"application/json"]
            data = json.dumps(body).encode()
        response = yield treq.request(
            method, f"http://127.0.0.1:{self.nodes[name].http}/v1/fleets/acme/devices{path}",
            headers=headers, data=data, reactor=reactor, persistent=False)
        raw = yield treq.content(response)
        return response.code, (json.loads(raw) if raw else None)

    def message(self, name, deviceId, data, queue=True):
        return self.api(name, "POST", f"/{deviceId}/messages",
                        {"payload": {"type": "json", "data": data}, "queue": queue})

    def ask(self, name, deviceId, data, timeout=5):
        return self.api(name, "POST", f"/{deviceId}/requests",
                        {"payload": {"type": "json", "data": data}, "timeout": timeout})

    @defer.inlineCallbacks
    def waitOnline(self, name, deviceId, online, timeout=5.0):
        """
        Poll C{GET …/devices/ID} on node C{name} until it says C{online}.

        @return: the seconds it took.
        """
        start = reactor.seconds()
        while True:
            status, body = yield self.api(name, "GET", f"/{deviceId}")
            if status == 200 and body["online"] is online:
                return reactor.seconds() - start
            if reactor.seconds() - start > timeout:
                self.fail(f"{deviceId} never became online={online} on {name}: "
                          f"{status} {body}")
            yield settle(reactor, 0.05)

    # -- devices and centrals -------------------------------------------------

    @defer.inlineCallbacks
    def connect(self, name, deviceId=None, onRequest=None, autoAck=False):
        """
        A device (or, with no C{deviceId}, the fleet's central) on node
        C{name}, authenticated.
        """
        role = "central" if deviceId is None else "device"
        c = IoTClient(role, "acme", deviceId, SECRETS[deviceId])
        c.onRequest = onRequest
        c.autoAck = autoAck
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.nodes[name].tcp), c)
        self.clients.append(c)
        yield c.authenticated
        return c

    @defer.inlineCallbacks
    def nextOf(self, client, kind, timeout=5.0):
        """
        The next frame of C{kind} that C{client} receives (others skipped).
        """
        deadline = reactor.seconds() + timeout
        while True:
            d = client.nextFrame()
            timer = reactor.callLater(max(0.0, deadline - reactor.seconds()), d.cancel)
            try:
                frame = yield d
            except defer.CancelledError:
                self.fail(f"no {frames.KINDS.get(kind, kind)} frame within {timeout}s")
            finally:
                if timer.active():
                    timer.cancel()
            if getattr(frame, "kind", None) == kind:
                return frame

    def framesOf(self, client, kind):
        return [f for f in client.inbox.pending if getattr(f, "kind", None) == kind]

    def datagram(self, name, token, data, device=None):
        """
        Send node C{name} a datagram spending C{token} of C{device} (by
        default the first device connected), with its MAC.
        """
        if device is None:
            device = next(c for c in self.clients if c.udpKey is not None)
        self.sender.transport.write(device.datagram(Payload.json(data), token),
                                    ("127.0.0.1", self.nodes[name].udp))


class ThreeNodesTests(IoTClusterProcessMixin, TestCase):
    """
    Nodes a, b and c: every cross-node path of the face, and b killed.
    """

    def setUp(self):
        return self.startCluster(["a", "b", "c"])

    @defer.inlineCallbacks
    def test_heldRequestsAcrossNodes(self):
        """
        A central's TCP request on node a and held HTTP requests on node c
        reach devices on node b: answered, refused by the device, or timed
        out by the asking node; the listing on every node is cluster-wide.
        """
        yield self.connect("b", "d1", onRequest=echo)
        # d2 never answers.
        d2 = yield self.connect("b", "d2")
        central = yield self.connect("a")
        for name in ("a", "c"):
            yield self.waitOnline(name, "d1", True)
            yield self.waitOnline(name, "d2", True)

        answer = yield central.request(Payload.json("over tcp"), "d1")
        self.assertEqual(answer.value(), {"echo": "over tcp"})
        status, body = yield self.ask("c", "d1", {"read": "temp"})
        self.assertEqual((status, body["payload"]),
                         (200, {"type": "json", "data": {"echo": {"read": "temp"}}}))

        started = reactor.seconds()
        e = yield self.assertFailure(central.request(Payload.json("hello?"), "d2"), Refused)
        self.assertEqual(e.code, "TIMEOUT")
        self.assertLess(reactor.seconds() - started, REQUEST_TIMEOUT + 1.0)
        started = reactor.seconds()
        status, body = yield self.ask("c", "d2", "hello?", timeout=0.5)
        self.assertEqual((status, body["error"]["code"]), (504, "TIMEOUT"))
        self.assertLess(reactor.seconds() - started, 0.5 + 1.0)

        def refuse(frame):
            raise Refused("no such sensor", "NO_SENSOR")
        d3 = yield self.connect("b", "d3", onRequest=refuse)
        yield self.waitOnline("c", "d3", True)
        status, body = yield self.ask("c", "d3", "x")
        self.assertEqual((status, body["error"]["code"], body["error"]["source"]),
                         (502, "NO_SENSOR", "device"))
        # A late answer from d2 to the requests that timed out goes nowhere.
        requests = self.framesOf(d2, frames.REQUEST)
        self.assertEqual(len(requests), 2)
        for r in requests:
            d2.write(frames.RESPONSE, r.requestId, Payload.json("late"))

        d3.transport.loseConnection()
        yield d3.closed
        for name in ("a", "b", "c"):
            yield self.waitOnline(name, "d3", False)
            status, body = yield self.api(name, "GET", "")
            self.assertEqual(status, 200)
            self.assertEqual(body, {"fleet": "acme", "devices": [
                {"id": "d1", "online": True, "queueDepth": 0},
                {"id": "d2", "online": True, "queueDepth": 0},
                {"id": "d3", "online": False, "queueDepth": 0}]})
        # Node b answered the forwarded requests; a and c forwarded them.
        b, a, c = (yield self.metrics("b")), (yield self.metrics("a")), (yield self.metrics("c"))
        self.assertEqual(b['broker_iot_events_total{event="requestsToDevices"}'], 5)
        self.assertEqual(b['broker_iot_events_total{event="forwardedIn"}'], 5)
        self.assertEqual(a['broker_iot_events_total{event="forwarded"}'], 2)
        self.assertEqual(c['broker_iot_events_total{event="forwarded"}'], 3)
        self.assertEqual(c['broker_iot_http_held_total{outcome="answered"}'], 1)
        self.assertEqual(c['broker_iot_http_held_total{outcome="timeout"}'], 1)
        self.assertEqual(c["broker_iot_http_held_requests"], 0)
        self.assertNoTraceback("a", "b", "c")

    @defer.inlineCallbacks
    def test_queuedForOfflineDeliveredOnceOnAnotherNode(self):
        """
        Messages for a device offline everywhere are queued (HTTP 202 on
        node c, the central's MESSAGE on node b), delivered in order when it
        connects to node a, each exactly once, and gone once acknowledged;
        messages sent while it is online on a are delivered there.
        """
        central = yield self.connect("b")
        ids = []
        for i in range(3):
            status, body = yield self.message("c", "d1", {"n": i})
            self.assertEqual((status, body["queued"]), (202, True))
            ids.append(int(body["messageId"]))
        mid = central.nextId()
        central.write(frames.MESSAGE, mid, Payload.json({"n": 3}), "d1")
        ack = yield self.nextOf(central, frames.ACK)
        self.assertEqual((ack.requestId, ack.payload.value()["queued"]), (mid, True))
        ids.append(int(ack.payload.value()["messageId"]))
        self.assertEqual(ids, sorted(ids))
        status, body = yield self.api("a", "GET", "/d1/queue")
        self.assertEqual((status, body), (200, {"id": "d1", "queueDepth": 4}))

        device = yield self.connect("a", "d1")
        got = []
        for _ in range(4):
            m = yield self.nextOf(device, frames.MESSAGE)
            got.append((m.requestId, m.payload.value()["n"]))
        self.assertEqual(got, list(zip(ids, range(4))))
        for messageId in ids:
            device.write(frames.ACK, messageId)
        # Online on a now: a message queued through c or b is pushed there.
        status, body = yield self.message("c", "d1", {"n": 4})
        self.assertEqual((status, body["queued"]), (202, False))
        m = yield self.nextOf(device, frames.MESSAGE)
        self.assertEqual(m.payload.value(), {"n": 4})
        device.write(frames.ACK, m.requestId)
        status, body = yield self.message("b", "d1", "direct", queue=False)
        self.assertEqual((status, body["queued"]), (202, False))
        m = yield self.nextOf(device, frames.MESSAGE)
        self.assertEqual(m.payload.value(), "direct")

        for _ in range(100):
            status, body = yield self.api("b", "GET", "/d1/queue")
            if body["queueDepth"] == 0:
                break
            yield settle(reactor, 0.05)
        self.assertEqual(body["queueDepth"], 0)
        a = yield self.metrics("a")
        self.assertEqual(a['broker_iot_events_total{event="messagesAcked"}'], 5)
        # Exactly once: nothing more arrives (not from the node sweeps either),
        # and a new session on another node starts from an empty queue.
        yield settle(reactor, 0.5)
        self.assertEqual(self.framesOf(device, frames.MESSAGE), [])
        device.transport.loseConnection()
        yield device.closed
        yield self.waitOnline("c", "d1", False)
        again = yield self.connect("c", "d1")
        again.write(frames.PING, 7)
        yield self.nextOf(again, frames.PONG)
        yield settle(reactor, 0.3)
        self.assertEqual(self.framesOf(again, frames.MESSAGE), [])
        self.assertNoTraceback("a", "b", "c")

    @defer.inlineCallbacks
    def test_udpTokensAcrossNodes(self):
        """
        Tokens issued through node b (the device's TCP session) are
        accepted once on node a, whose telemetry reaches the central on
        node c; a replay on node b, or on a again, is refused.
        """
        central = yield self.connect("c")
        device = yield self.connect("b", "d1")
        tokens = yield device.waitTokens(2)
        yield self.waitOnline("a", "d1", True)
        # The central's presence reaches a through the cluster bus.
        for _ in range(100):
            self.datagram("a", tokens[0], {"t": 20.5})
            yield settle(reactor, 0.05)
            if self.framesOf(central, frames.TELEMETRY):
                break
            tokens.pop(0)
        frame = yield self.nextOf(central, frames.TELEMETRY)
        self.assertEqual((frame.address, frame.payload.value()), ("d1", {"t": 20.5}))
        spent = tokens[0]
        self.datagram("b", spent, {"t": "replay on b"})
        self.datagram("a", spent, {"t": "replay on a"})
        for _ in range(100):
            a, b = (yield self.metrics("a")), (yield self.metrics("b"))
            if (b.get('broker_iot_udp_datagrams_total{outcome="replayed"}')
                    and a.get('broker_iot_udp_datagrams_total{outcome="replayed"}')):
                break
            yield settle(reactor, 0.05)
        self.assertEqual(b['broker_iot_udp_datagrams_total{outcome="replayed"}'], 1)
        self.assertEqual(b['broker_iot_udp_datagrams_total{outcome="accepted"}'], 0)
        self.assertEqual(a['broker_iot_udp_datagrams_total{outcome="replayed"}'], 1)
        accepted = a['broker_iot_udp_datagrams_total{outcome="accepted"}']
        self.assertEqual(a['broker_iot_events_total{event="telemetryAccepted"}'], accepted)
        # Every accepted datagram reached the central, and nothing else.
        yield settle(reactor, 0.2)
        self.assertEqual(len(self.framesOf(central, frames.TELEMETRY)) + 1, accepted)
        # A token nobody issued is unknown everywhere.
        self.datagram("c", b"\0" * frames.TOKEN_SIZE, {"t": 0})
        for _ in range(100):
            c = yield self.metrics("c")
            if c.get('broker_iot_udp_datagrams_total{outcome="unknown"}'):
                break
            yield settle(reactor, 0.05)
        self.assertEqual(c['broker_iot_udp_datagrams_total{outcome="unknown"}'], 1)
        self.assertNoTraceback("a", "b", "c")

    @defer.inlineCallbacks
    def test_keysAcrossNodes(self):
        """
        A key issued through node a's API admits the device on node b; a
        revocation through node c closes that session on b and refuses the
        key everywhere.
        """
        status, body = yield self.api("a", "PUT", "/n1/key")
        self.assertEqual(status, 200)
        secret = body["key"]
        SECRETS["n1"] = secret
        self.addCleanup(SECRETS.pop, "n1")
        # The key reaches node b over the cluster bus.
        for _ in range(100):
            try:
                n1 = yield self.connect("b", "n1")
                break
            except AuthFailed:
                yield settle(reactor, 0.05)
        else:
            self.fail("node b never admitted the key issued on a")
        yield self.waitOnline("c", "n1", True)
        status, body = yield self.api("c", "GET", "")
        self.assertIn({"id": "n1", "online": True, "queueDepth": 0}, body["devices"])
        status, _ = yield self.api("c", "DELETE", "/n1/key")
        self.assertEqual(status, 204)
        yield n1.closed
        close = self.framesOf(n1, frames.CLOSE)
        self.assertEqual(close[0].payload.value()["code"], "KEY_REVOKED")
        for name in ("a", "b"):
            c = IoTClient("device", "acme", "n1", secret)
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                     self.nodes[name].tcp), c)
            self.clients.append(c)
            e = yield self.assertFailure(c.authenticated, AuthFailed)
            self.assertEqual(e.code, "UNKNOWN_DEVICE")
        status, body = yield self.api("a", "GET", "/n1")
        self.assertEqual(status, 404)
        self.assertNoTraceback("a", "b", "c")

    @defer.inlineCallbacks
    def test_nodeKilledHoldingADevice(self):
        """
        Node b is SIGKILLed holding d1 (and a held request for d2): d1 leaves
        presence within dead_after + a heartbeat or two, the API says it is
        offline, the held request ends, messages for d1 are queued, and d1
        gets them when it reconnects to node c.
        """
        yield self.connect("b", "d1", onRequest=echo)
        yield self.connect("b", "d2")
        yield self.waitOnline("a", "d1", True)
        yield self.waitOnline("c", "d2", True)
        held = self.ask("c", "d2", "waiting", timeout=8)
        yield settle(reactor, 0.2)
        yield self.kill("b")
        took = yield self.waitOnline("a", "d1", False, timeout=DEAD_AFTER + 4)
        self.assertLess(took, DEAD_AFTER + 2 * HEARTBEAT + 1.0)
        status, body = yield held
        self.assertEqual((status, body["error"]["code"]), (503, "DEVICE_OFFLINE"))
        status, body = yield self.ask("a", "d1", "anyone?")
        self.assertEqual((status, body["error"]["code"]), (503, "DEVICE_OFFLINE"))
        status, body = yield self.message("a", "d1", "while b is gone")
        self.assertEqual((status, body["queued"]), (202, True))
        device = yield self.connect("c", "d1", onRequest=echo)
        m = yield self.nextOf(device, frames.MESSAGE)
        self.assertEqual((str(m.requestId), m.payload.value()),
                         (body["messageId"], "while b is gone"))
        device.write(frames.ACK, m.requestId)
        yield self.waitOnline("a", "d1", True)
        status, body = yield self.ask("a", "d1", "back")
        self.assertEqual((status, body["payload"]["data"]), (200, {"echo": "back"}))
        status, body = yield self.api("a", "GET", "")
        self.assertEqual([(d["id"], d["online"]) for d in body["devices"]],
                         [("d1", True), ("d2", False), ("d3", False)])
        dead = [line for name in ("a", "c") for line in self.nodes[name].lines()
                if "node b is dead" in line]
        self.assertEqual(len(dead), 1, dead)
        self.assertNoTraceback("a", "c")


class NodeStoppedTests(IoTClusterProcessMixin, TestCase):
    """
    Nodes a and b: b stopped cleanly, or killed while its device already
    reconnected elsewhere.
    """

    def setUp(self):
        return self.startCluster(["a", "b"])

    @defer.inlineCallbacks
    def test_sigtermLeavesAtOnce(self):
        """
        SIGTERM: node b closes its sessions and leaves presence at once,
        not after dead_after; its device reconnects to a and gets what was
        queued meanwhile.
        """
        central = yield self.connect("b")
        d1 = yield self.connect("b", "d1")
        yield self.waitOnline("a", "d1", True)
        self.nodes["b"].transport.signalProcess("TERM")
        yield d1.closed
        yield central.closed
        took = yield self.waitOnline("a", "d1", False, timeout=DEAD_AFTER + 4)
        self.assertLess(took, DEAD_AFTER / 2)
        yield self.nodes["b"].ended
        status, body = yield self.message("a", "d1", "after b left")
        self.assertEqual((status, body["queued"]), (202, True))
        d1 = yield self.connect("a", "d1")
        m = yield self.nextOf(d1, frames.MESSAGE)
        self.assertEqual(m.payload.value(), "after b left")
        self.assertNoTraceback("a", "b")

    @defer.inlineCallbacks
    def test_deviceBackElsewhereBeforeTheKilledNodeIsReaped(self):
        """
        Node b is killed and its device reconnects to a at once: reaping b
        later leaves the device's new session online.
        """
        yield self.connect("b", "d1")
        yield self.waitOnline("a", "d1", True)
        yield self.kill("b")
        d1 = yield self.connect("a", "d1", onRequest=echo)
        for _ in range(200):
            if any("node b is dead" in line for line in self.nodes["a"].lines()):
                break
            yield settle(reactor, 0.05)
        self.assertTrue(any("node b is dead: 0 of its devices" in line
                            for line in self.nodes["a"].lines()), self.nodes["a"].text())
        status, body = yield self.api("a", "GET", "/d1")
        self.assertEqual((status, body["online"]), (200, True))
        status, body = yield self.ask("a", "d1", "still here?")
        self.assertEqual((status, body["payload"]["data"]), (200, {"echo": "still here?"}))
        self.assertTrue(d1.transport.connected)
        self.assertNoTraceback("a")


class CentralNodeKilledTests(IoTClusterProcessMixin, TestCase):
    """
    The node holding the fleet's newest central is killed.
    """

    def setUp(self):
        return self.startCluster(["a", "b", "c"])

    @defer.inlineCallbacks
    def test_devicesFallBackToTheOtherCentral(self):
        """
        A device on c reaches the newest central (on b); b is SIGKILLed:
        once b is reaped the device's requests and telemetry reach the
        central on a.
        """
        central = yield self.connect("a", onRequest=lambda f: Payload.json("a"))
        yield settle(reactor, 0.05)
        yield self.connect("b", onRequest=lambda f: Payload.json("b"))
        d1 = yield self.connect("c", "d1")

        @defer.inlineCallbacks
        def answered(expected, timeout):
            deadline = reactor.seconds() + timeout
            while True:
                try:
                    answer = (yield d1.request(Payload.json("who?"))).value()
                except Refused as e:
                    answer = e.code
                if answer == expected:
                    return
                if reactor.seconds() > deadline:
                    self.fail(f"the central answering is {answer}, not {expected}")
                yield settle(reactor, 0.05)
        yield answered("b", 5)
        yield self.kill("b")
        yield answered("a", DEAD_AFTER + 3)
        d1.write(frames.TELEMETRY, 0, Payload.json({"t": 1}))
        frame = yield self.nextOf(central, frames.TELEMETRY)
        self.assertEqual((frame.address, frame.payload.value()), ("d1", {"t": 1}))
        self.assertNoTraceback("a", "c")


class RestartUnderSameIdTests(IoTClusterProcessMixin, TestCase):
    """
    A node SIGKILLed and started again under its C{node_id} before the
    others gave it up for dead (dead_after is long here).
    """

    deadAfter = 20.0

    def setUp(self):
        return self.startCluster(["a", "b", "c"])

    @defer.inlineCallbacks
    def test_restartedNodeDropsWhatItsLastRunHeld(self):
        """
        What the killed run held is gone as soon as the node is back: its
        device is offline, and its central no longer takes the fleet's
        device requests from the central on another node.
        """
        yield self.connect("a", onRequest=lambda f: Payload.json("central on a"))
        yield settle(reactor, 0.05)
        yield self.connect("b", onRequest=lambda f: Payload.json("central on b"))
        yield self.connect("b", "d1", onRequest=echo)
        d2 = yield self.connect("c", "d2")
        yield self.waitOnline("a", "d1", True)
        for _ in range(100):
            answer = yield d2.request(Payload.json("who?"))
            if answer.value() == "central on b":
                break
            yield settle(reactor, 0.05)
        self.assertEqual(answer.value(), "central on b")
        yield self.kill("b")
        yield self.startNode("b")
        yield self.waitHealth("b", 200)
        took = yield self.waitOnline("a", "d1", False, timeout=5)
        self.assertLess(took, 3)
        for _ in range(100):
            try:
                answer = yield d2.request(Payload.json("who?"))
            except Refused:
                answer = None
            else:
                if answer.value() == "central on a":
                    break
            yield settle(reactor, 0.05)
        self.assertEqual(answer.value(), "central on a")
        status, body = yield self.ask("c", "d1", "anyone?")
        self.assertEqual((status, body["error"]["code"]), (503, "DEVICE_OFFLINE"))
        yield self.connect("b", "d1", onRequest=echo)
        yield self.waitOnline("c", "d1", True)
        status, body = yield self.ask("c", "d1", "back")
        self.assertEqual((status, body["payload"]["data"]), (200, {"echo": "back"}))
        self.assertNoTraceback("a", "b", "c")


class RedisOutageTests(IoTClusterProcessMixin, TestCase):
    """
    Redis killed (SIGKILL) and restarted under nodes a and b.
    """

    def setUp(self):
        return self.startCluster(["a", "b"])

    @defer.inlineCallbacks
    def test_redisKilledAndRestarted(self):
        """
        While Redis is away queued messages are refused with 503 (never
        202 and lost), /healthz is 503, and a central and a device on one
        node still talk; once it is back, healthz is 200, routing across
        nodes works again, and the messages acknowledged before the outage
        (in its append-only file) are delivered.
        """
        central = yield self.connect("a", onRequest=lambda f: Payload.json("central here"))
        d1 = yield self.connect("a", "d1", onRequest=echo)
        d2 = yield self.connect("b", "d2", onRequest=echo)
        tokens = yield d1.waitTokens(2)
        yield self.waitOnline("a", "d2", True)
        yield self.waitOnline("b", "d1", True)
        before = []
        for i in range(2):
            status, body = yield self.message("b", "d3", {"before": i})
            self.assertEqual((status, body["queued"]), (202, True))
            before.append(body["messageId"])

        yield self.redis.kill()
        for name in ("a", "b"):
            body = yield self.waitHealth(name, 503)
            self.assertIn(b"Redis", body)
        for name, device in (("a", "d3"), ("a", "d1"), ("b", "d3")):
            status, body = yield self.message(name, device, "lost?")
            self.assertEqual((status, body["error"]["code"]), (503, "UNAVAILABLE"))
        mid = central.nextId()
        central.write(frames.MESSAGE, mid, Payload.json("queued?"), "d3")
        f = yield self.nextOf(central, frames.ERROR)
        self.assertEqual((f.requestId, f.payload.value()["code"]), (mid, "UNAVAILABLE"))
        status, body = yield self.ask("a", "d2", "across?")
        self.assertEqual((status, body["error"]["code"]), (503, "UNAVAILABLE"))
        status, body = yield self.api("a", "GET", "")
        self.assertEqual((status, body["error"]["code"]), (503, "UNAVAILABLE"))
        # Local routing on node a goes on.
        status, body = yield self.ask("a", "d1", "local")
        self.assertEqual((status, body["payload"]["data"]), (200, {"echo": "local"}))
        answer = yield central.request(Payload.json("tcp local"), "d1")
        self.assertEqual(answer.value(), {"echo": "tcp local"})
        status, body = yield self.message("a", "d1", "direct", queue=False)
        self.assertEqual((status, body["queued"]), (202, False))
        m = yield self.nextOf(d1, frames.MESSAGE)
        self.assertEqual(m.payload.value(), "direct")
        answer = yield d1.request(Payload.json("to central"))
        self.assertEqual(answer.value(), "central here")
        self.datagram("a", tokens[0], {"during": "outage"}, d1)
        frame = yield self.nextOf(central, frames.TELEMETRY)
        self.assertEqual(frame.payload.value(), {"during": "outage"})

        yield self.redis.start()
        for name in ("a", "b"):
            yield self.waitHealth(name, 200)
        # Each node writes back its presence as it resyncs.
        yield self.waitOnline("a", "d2", True)
        yield self.waitOnline("b", "d1", True)
        status, body = yield self.ask("a", "d2", "across again")
        self.assertEqual((status, body["payload"]["data"]), (200, {"echo": "across again"}))
        status, body = yield self.ask("b", "d1", "and back")
        self.assertEqual((status, body["payload"]["data"]), (200, {"echo": "and back"}))
        # Only what was acknowledged before the outage is queued for d3.
        status, body = yield self.api("b", "GET", "/d3/queue")
        self.assertEqual((status, body["queueDepth"]), (200, 2))
        d3 = yield self.connect("b", "d3")
        got = []
        for _ in range(2):
            m = yield self.nextOf(d3, frames.MESSAGE)
            got.append((str(m.requestId), m.payload.value()))
            d3.write(frames.ACK, m.requestId)
        self.assertEqual(got, [(before[0], {"before": 0}), (before[1], {"before": 1})])
        # The token spent on a during the outage stays spent.
        self.datagram("b", tokens[0], {"replayed": True}, d1)
        for _ in range(100):
            b = yield self.metrics("b")
            if b.get('broker_iot_udp_datagrams_total{outcome="replayed"}'):
                break
            yield settle(reactor, 0.05)
        self.assertEqual(b['broker_iot_udp_datagrams_total{outcome="replayed"}'], 1)
        # New ids continue after the ones Redis kept.
        status, body = yield self.message("a", "d3", "after")
        self.assertEqual((status, body["queued"]), (202, False))
        self.assertGreater(int(body["messageId"]), int(before[1]))
        m = yield self.nextOf(d3, frames.MESSAGE)
        self.assertEqual(m.payload.value(), "after")
        yield settle(reactor, 0.3)
        self.assertEqual(self.framesOf(d3, frames.MESSAGE), [])
        # d2 kept its session on b through the outage.
        self.assertTrue(d2.transport.connected)
        self.assertNoTraceback("a", "b")

    @defer.inlineCallbacks
    def test_redisRestartedEmpty(self):
        """
        Redis comes back empty (it kept nothing, or it is a new server):
        a device that stayed online through it still gets the messages
        queued afterwards, though the id counter started again.
        """
        d1 = yield self.connect("a", "d1", autoAck=True)
        yield self.waitOnline("b", "d1", True)
        ids = []
        for i in range(3):
            status, body = yield self.message("b", "d1", {"n": i})
            self.assertEqual(status, 202)
            m = yield self.nextOf(d1, frames.MESSAGE)
            self.assertEqual(m.payload.value(), {"n": i})
            ids.append(m.requestId)
        yield self.redis.kill()
        yield self.waitHealth("a", 503)
        self.redis.forget()
        yield self.redis.start()
        for name in ("a", "b"):
            yield self.waitHealth(name, 200)
        yield self.waitOnline("b", "d1", True)
        status, body = yield self.message("b", "d1", "after")
        self.assertEqual((status, body["queued"]), (202, False))
        self.assertGreater(int(body["messageId"]), max(ids))
        m = yield self.nextOf(d1, frames.MESSAGE)
        self.assertEqual((str(m.requestId), m.payload.value()), (body["messageId"], "after"))
        self.assertNoTraceback("a", "b")

    @defer.inlineCallbacks
    def test_newerSessionDuringOutageWins(self):
        """
        A device that connects to node b while Redis is away, its older
        session still open on a: once Redis is back, b's newer session is
        kept and a's is closed (REPLACED).
        """
        old = yield self.connect("a", "d1")
        yield self.waitOnline("b", "d1", True)
        yield self.redis.kill()
        for name in ("a", "b"):
            yield self.waitHealth(name, 503)
        new = yield self.connect("b", "d1", onRequest=echo)
        yield self.redis.start()
        for name in ("a", "b"):
            yield self.waitHealth(name, 200)
        for _ in range(100):
            if not (old.transport.connected and new.transport.connected):
                break
            yield settle(reactor, 0.05)
        self.assertTrue(new.transport.connected, self.framesOf(new, frames.CLOSE))
        yield old.closed
        close = self.framesOf(old, frames.CLOSE)
        self.assertEqual(close[0].payload.value()["code"], "REPLACED")
        self.assertTrue(new.transport.connected)
        status, body = yield self.ask("a", "d1", "which?")
        self.assertEqual((status, body["payload"]["data"]), (200, {"echo": "which?"}))
        self.assertNoTraceback("a", "b")

    @defer.inlineCallbacks
    def test_acksDuringOutageHonoured(self):
        """
        A device acknowledges its messages while Redis is away: once Redis
        is back (with the messages, from its append-only file) they are
        removed, not delivered again to its next session, and the session
        goes on receiving.
        """
        d1 = yield self.connect("a", "d1")
        yield self.waitOnline("b", "d1", True)
        ids = []
        for i in range(3):
            status, body = yield self.message("b", "d1", {"n": i})
            self.assertEqual(status, 202)
            m = yield self.nextOf(d1, frames.MESSAGE)
            ids.append(m.requestId)
        yield self.redis.kill()
        yield self.waitHealth("a", 503)
        for messageId in ids:
            d1.write(frames.ACK, messageId)
        yield settle(reactor, 0.2)
        yield self.redis.start()
        for name in ("a", "b"):
            yield self.waitHealth(name, 200)
        for _ in range(100):
            status, body = yield self.api("b", "GET", "/d1/queue")
            if body["queueDepth"] == 0:
                break
            yield settle(reactor, 0.05)
        self.assertEqual((status, body["queueDepth"]), (200, 0))
        status, body = yield self.message("b", "d1", "after")
        self.assertEqual(status, 202)
        m = yield self.nextOf(d1, frames.MESSAGE)
        self.assertEqual(m.payload.value(), "after")
        d1.write(frames.ACK, m.requestId)
        d1.transport.loseConnection()
        yield d1.closed
        yield self.waitOnline("b", "d1", False)
        again = yield self.connect("b", "d1")
        again.write(frames.PING, 5)
        yield self.nextOf(again, frames.PONG)
        yield settle(reactor, 0.3)
        self.assertEqual(self.framesOf(again, frames.MESSAGE), [])
        self.assertNoTraceback("a", "b")

    @defer.inlineCallbacks
    def test_heldRequestWhenRedisGoes(self):
        """
        Redis goes away while a held request on node a waits for a device
        on node b: it ends in TIMEOUT when its timeout says (never hangs),
        and the device's late answer, after Redis is back, goes nowhere.
        """
        d2 = yield self.connect("b", "d2")
        yield self.waitOnline("a", "d2", True)
        started = reactor.seconds()
        held = self.ask("a", "d2", "slow", timeout=1.5)
        request = yield self.nextOf(d2, frames.REQUEST)
        yield self.redis.kill()
        status, body = yield held
        self.assertEqual((status, body["error"]["code"]), (504, "TIMEOUT"))
        self.assertLess(reactor.seconds() - started, 1.5 + 1.0)
        yield self.redis.start()
        for name in ("a", "b"):
            yield self.waitHealth(name, 200)
        d2.write(frames.RESPONSE, request.requestId, Payload.json("late"))
        d2.onRequest = echo
        yield self.waitOnline("a", "d2", True)
        status, body = yield self.ask("a", "d2", "now")
        self.assertEqual((status, body["payload"]["data"]), (200, {"echo": "now"}))
        self.assertEqual((yield self.metrics("a"))["broker_iot_http_held_requests"], 0)
        self.assertNoTraceback("a", "b")
