"""
Tests for L{broker.iot.face}: the face built from configuration, and the
real C{twistd broker} process keeping queued messages across a SIGKILL.
"""

import os
import stat

import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from broker import config, tap
from broker.iot import auth, frames
from broker.iot.client import AuthFailed, IoTClient
from broker.iot.frames import Payload
from tests.test_tap import TwistdTestsMixin

REGISTRY = """
[fleets.acme]
central_key = "central-secret"
[fleets.acme.devices.d1]
key = "d1-secret"
groups = ["alerts"]
"""


def writeConfig(testCase, registry=REGISTRY, extra=""):
    directory = FilePath(testCase.mktemp())
    directory.makedirs()
    reg = directory.child("registry.toml")
    reg.setContent(registry.encode())
    path = directory.child("broker.toml")
    path.setContent(
        f'[broker]\nstate_dir = "{directory.child("state").path}"\n'
        '[admin]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
        '[webpubsub]\nenabled = false\n'
        '[iot]\nenabled = true\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
        f'registry_file = "{reg.path}"\n{extra}'
        '[iot.udp]\nport = 0\n'
        '[iot.http]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'.encode())
    return directory, path


class ConfigTests(TestCase):

    def test_defaults(self):
        """
        The embedded configuration enables the face on loopback: TCP 7000,
        UDP 7001, the store and a development registry in state_dir.
        """
        iot = config.parse(config.defaultText())["iot"]
        self.assertTrue(iot["enabled"])
        self.assertEqual(iot["listen"], ["tcp:7000:interface=127.0.0.1"])
        self.assertEqual((iot["udp"]["interface"], iot["udp"]["port"]), ("127.0.0.1", 7001))
        self.assertEqual((iot["registry_file"], iot["store_path"]), ("", ""))

    def test_badKeyNamed(self):
        e = self.assertRaises(config.ConfigError, config.parse,
                              "[iot]\nmax_queue_depth = 0\n")
        self.assertIn("iot.max_queue_depth", str(e))

    def test_developmentRegistry(self):
        path = os.path.join(self.mktemp(), "iot-registry.toml")
        self.assertTrue(auth.writeDevelopmentRegistry(path))
        self.assertFalse(auth.writeDevelopmentRegistry(path))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        fleets = auth.loadRegistryFile(path)
        self.assertEqual(sorted(fleets["demo"]["devices"]), ["sensor1"])
        self.assertIsNotNone(fleets["demo"]["central"])

    def test_badRegistry(self):
        path = FilePath(self.mktemp())
        path.setContent(b'[fleets.acme.devices.d1]\nkey = 3\n')
        e = self.assertRaises(ValueError, auth.loadRegistryFile, path.path)
        self.assertIn("fleets.acme.devices.d1.key", str(e))


def listeningPort(listener):
    """
    The port a L{broker.tap.ListenerService} listens on, leaving its own
    Deferred's result (which it stops at shutdown) untouched.
    """
    d = defer.Deferred()

    def seen(port):
        d.callback(port)
        return port
    listener._waitingForPort.addCallback(seen)
    return d


class FaceBuildTests(TestCase):
    """
    The face in the service tree L{broker.tap.buildService} builds.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.directory, path = writeConfig(self)
        self.top = tap.buildService(config.load(path.path), reactor)
        self.top.privilegedStartService()
        self.top.startService()
        self.addCleanup(self.top.stopService)
        names = [s.name for s in self.top]
        self.assertIn("iot.listen[0]", names)
        self.assertIn("iot.udp", names)
        listener = self.top.getServiceNamed("iot.listen[0]")
        self.port = (yield listeningPort(listener)).getHost().port

    @defer.inlineCallbacks
    def authenticate(self, deviceId, secret):
        c = IoTClient("device", "acme", deviceId, secret)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), c)
        self.addCleanup(lambda: c.transport.abortConnection() if c.transport.connected
                        else None)
        try:
            yield c.authenticated
            return None
        except AuthFailed as e:
            return e.code

    @defer.inlineCallbacks
    def test_registryReload(self):
        """
        SIGHUP re-reads the registry file: a new device can connect; a
        file that no longer parses keeps the previous registry.
        """
        self.assertIsNone((yield self.authenticate("d1", "d1-secret")))
        self.assertEqual((yield self.authenticate("d2", "d2-secret")), "UNKNOWN_DEVICE")
        registry = self.directory.child("registry.toml")
        registry.setContent((REGISTRY + '[fleets.acme.devices.d2]\nkey = "d2-secret"\n').encode())
        self.top.reloader.reload()
        self.assertIsNone((yield self.authenticate("d2", "d2-secret")))
        registry.setContent(b"[fleets.acme.devices.d3]\nkey = 7\n")
        self.top.reloader.reload()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertIsNone((yield self.authenticate("d2", "d2-secret")))

    @defer.inlineCallbacks
    def test_reloadClosesRemoved(self):
        """
        A device removed from the registry, or the central whose key
        changed, loses its live session on SIGHUP; the others keep theirs.
        """
        registry = self.directory.child("registry.toml")
        registry.setContent((REGISTRY + '[fleets.acme.devices.d2]\nkey = "d2-secret"\n').encode())
        self.top.reloader.reload()
        clients = {}
        for role, did, secret in [("device", "d1", "d1-secret"), ("device", "d2", "d2-secret"),
                                  ("central", None, "central-secret")]:
            c = clients[did] = IoTClient(role, "acme", did, secret)
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), c)
            yield c.authenticated
            self.addCleanup(c.transport.abortConnection)
        registry.setContent(REGISTRY.replace("central-secret", "new-central-secret").encode())
        self.top.reloader.reload()
        yield clients["d2"].closed
        yield clients[None].closed
        for c in (clients["d2"], clients[None]):
            close = [f for f in c.inbox.pending if f.kind == frames.CLOSE]
            self.assertEqual(close[0].payload.value()["code"], "KEY_REVOKED")
        clients["d1"].write(frames.PING, 3)
        pong = yield clients["d1"].nextFrame()
        self.assertEqual(pong.kind, frames.PONG)

    @defer.inlineCallbacks
    def test_issuedKeysSurviveRestart(self):
        """
        Keys issued at run time are in the store: after a restart the
        device authenticates with its issued key, and a revoked file
        device stays revoked.
        """
        concentrator = self.top.getServiceNamed("iot.listen[0]").factory.wrappedFactory.concentrator
        secret = yield concentrator.issueKey("acme", "d7")
        yield concentrator.revokeKey("acme", "d1")
        yield self.top.stopService()
        self.top = tap.buildService(config.load(self.directory.child("broker.toml").path),
                                    reactor)
        self.top.privilegedStartService()
        self.top.startService()
        self.addCleanup(self.top.stopService)
        self.port = (yield listeningPort(self.top.getServiceNamed("iot.listen[0]"))
                     ).getHost().port
        self.assertIsNone((yield self.authenticate("d7", secret)))
        self.assertEqual((yield self.authenticate("d1", "d1-secret")), "UNKNOWN_DEVICE")
        # The store holds device keys: only the broker's user may read it.
        store = self.directory.child("state").child("iot.sqlite")
        self.assertEqual(stat.S_IMODE(os.stat(store.path).st_mode), 0o600)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(store.path + suffix):
                self.assertEqual(stat.S_IMODE(os.stat(store.path + suffix).st_mode), 0o600)

    @defer.inlineCallbacks
    def test_metrics(self):
        """
        The face's counters are served on the admin /metrics.
        """
        self.assertEqual((yield self.authenticate("d1", "wrong")), "BAD_PROOF")
        admin = self.top.getServiceNamed("admin.listen[0]")
        port = (yield listeningPort(admin)).getHost().port
        response = yield treq.get(f"http://127.0.0.1:{port}/metrics", reactor=reactor,
                                  persistent=False)
        text = (yield treq.content(response)).decode()
        self.assertIn('broker_iot_auth_failures_total{reason="BAD_PROOF"} 1.0', text)
        self.assertIn('broker_iot_sessions{role="device"} 0.0', text)
        self.assertIn("broker_iot_slow_consumers_total 0.0", text)


class ClusterFaceBuildTests(TestCase):
    """
    With C{[cluster] redis_url}, L{broker.iot.face.build} picks the cluster
    concentrator, its Redis store and tokens: two brokers on one
    redis-server act as one IoT face.
    """

    @defer.inlineCallbacks
    def setUp(self):
        from tests.redisserver import RedisServer
        self.redis = RedisServer(self, reactor)
        yield self.redis.start()
        self.nodes = []
        for name in ("a", "b"):
            directory, path = writeConfig(self, extra=(
                f'[cluster]\nredis_url = "{self.redis.url}"\nprefix = "face"\n'
                f'node_id = "{name}"\nheartbeat = 0.1\ndead_after = 0.5\n'))
            top = tap.buildService(config.load(path.path), reactor)
            top.privilegedStartService()
            top.startService()
            self.addCleanup(top.stopService)
            port = (yield listeningPort(top.getServiceNamed("iot.listen[0]"))).getHost().port
            self.nodes.append((directory, top, port))
        from tests.test_cluster_redis import waitFor
        self.waitFor = waitFor
        yield waitFor(lambda: all(top.cluster.healthy for _, top, _ in self.nodes))

    def concentrator(self, i):
        return self.nodes[i][1].getServiceNamed("iot.listen[0]").factory.wrappedFactory.concentrator

    @defer.inlineCallbacks
    def test_oneFaceOverTwoNodes(self):
        """
        A key issued on node a lets the device in on node b; a message
        queued through node a is delivered there; no SQLite store is made.
        """
        from broker.iot.clustered import ClusterConcentrator
        from broker.iot.redisstore import RedisMessageStore
        a, b = self.concentrator(0), self.concentrator(1)
        self.assertIsInstance(a, ClusterConcentrator)
        self.assertIsInstance(a.store, RedisMessageStore)
        secret = yield a.issueKey("acme", "d7")
        yield self.waitFor(lambda: b.registry.device("acme", "d7") is not None)
        c = IoTClient("device", "acme", "d7", secret)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.nodes[1][2]), c)
        self.addCleanup(lambda: c.transport.abortConnection() if c.transport.connected
                        else None)
        yield c.authenticated
        presence = b._presenceKey("acme", "d7")
        yield self.waitFor(lambda: self.redis.command("EXISTS", presence) == b":1\r\n")
        messageId, queued = yield a.send("acme", "d7", Payload.json("via a"))
        frame = yield c.nextFrame()
        while frame.kind != frames.MESSAGE:
            frame = yield c.nextFrame()
        self.assertEqual((frame.payload.value(), str(frame.requestId)), ("via a", messageId))
        for directory, _, _ in self.nodes:
            self.assertFalse(directory.child("state").child("iot.sqlite").exists())


class RestartDurabilityTests(TwistdTestsMixin, TestCase):
    """
    Messages queued for an offline device survive a SIGKILL of the broker
    and are delivered after a restart, each until it is acknowledged and
    never after.
    """

    timeout = 90
    LISTENERS = ["iot.listen[0]", "iot.udp", "admin.listen[0]"]

    def start(self):
        proc = self.spawn(["-n", "--pidfile=", "broker", "--config", self.config.path],
                          self.directory, self.LISTENERS)
        return proc, proc.listening

    @defer.inlineCallbacks
    def connect(self, ports, role, peerId, secret):
        c = IoTClient(role, "acme", peerId, secret)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", ports["iot.listen[0]"])
        yield connectProtocol(endpoint, c)
        yield c.authenticated
        self.addCleanup(lambda: c.transport.abortConnection() if c.transport.connected
                        else None)
        return c

    @defer.inlineCallbacks
    def kill(self, proc):
        proc.transport.signalProcess("KILL")
        yield proc.ended

    @defer.inlineCallbacks
    def acked(self, ports, event="messagesAcked"):
        response = yield treq.get(f"http://127.0.0.1:{ports['admin.listen[0]']}/metrics",
                                  reactor=reactor, persistent=False)
        body = (yield treq.content(response)).decode()
        for line in body.splitlines():
            if line.startswith(f'broker_iot_events_total{{event="{event}"}}'):
                return float(line.split()[-1])
        return 0.0

    @defer.inlineCallbacks
    def test_sigkill(self):
        self.directory, self.config = writeConfig(self)
        proc, listening = self.start()
        ports = yield listening
        central = yield self.connect(ports, "central", None, "central-secret")
        ids = []
        for i in range(5):
            central.write(frames.MESSAGE, i + 1, Payload.json({"n": i}), "d1")
            ack = yield central.nextFrame()
            self.assertEqual((ack.kind, ack.payload.value()["queued"]), (frames.ACK, True))
            ids.append(int(ack.payload.value()["messageId"]))
        yield self.kill(proc)

        proc, listening = self.start()
        ports = yield listening
        d = yield self.connect(ports, "device", "d1", "d1-secret")
        got = []
        for i in range(5):
            m = yield d.nextFrame()
            got.append((m.requestId, m.payload.value()["n"]))
        self.assertEqual(got, list(zip(ids, range(5))))
        d.write(frames.ACK, ids[0])
        d.write(frames.ACK, ids[1])
        for _ in range(100):
            if (yield self.acked(ports)) >= 2:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((yield self.acked(ports)), 2)
        yield self.kill(proc)

        proc, listening = self.start()
        ports = yield listening
        d = yield self.connect(ports, "device", "d1", "d1-secret")
        got = []
        for i in range(3):
            m = yield d.nextFrame()
            got.append(m.requestId)
            d.write(frames.ACK, m.requestId)
        self.assertEqual(got, ids[2:])
        for _ in range(100):
            if (yield self.acked(ports)) >= 3:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        d.transport.loseConnection()
        yield d.closed
        d = yield self.connect(ports, "device", "d1", "d1-secret")
        d.write(frames.PING, 9)
        pong = yield d.nextFrame()
        self.assertEqual(pong.kind, frames.PONG)
        # The queue is read as the session opens; give it time to (not) send.
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(d.inbox.pending, [])
        self.assertNotIn("Traceback", proc.text())


class CentralAwayRestartTests(RestartDurabilityTests):
    """
    Device -> central: while the central is away (no session, its webhook
    answering 503 from a real upstream in this process), what the device
    sends is kept across a SIGKILL of the broker and delivered, in order,
    once the webhook answers 2xx again.
    """

    @defer.inlineCallbacks
    def test_sigkill(self):
        from tests.test_iot_webhook import WebhookTestMixin
        hook = WebhookTestMixin()
        hook.tls = False
        hook.addCleanup, hook.mktemp = self.addCleanup, self.mktemp
        yield hook.startUpstream()
        upstream = hook.upstream
        upstream.default = (503, b"")
        self.directory, self.config = writeConfig(self, extra=(
            'forward_telemetry = true\n'
            '[iot.webhook]\nretries = 0\nbackoff = 0.05\nmax_backoff = 0.2\n'
            f'[iot.webhook.fleets.acme]\nurl = "{hook.url}"\nsigning_secret = "s"\n'))
        proc, listening = self.start()
        ports = yield listening
        d = yield self.connect(ports, "device", "d1", "d1-secret")
        for i in range(3):
            d.write(frames.MESSAGE, i + 1, Payload.json({"n": i}))
            d.write(frames.TELEMETRY, 0, Payload.json({"t": i}))
            ack = yield d.nextFrame()
            self.assertEqual((ack.kind, ack.requestId), (frames.ACK, i + 1))
        d.transport.loseConnection()
        yield d.closed
        # Connected, 3 messages, 3 telemetry, then DEVICE_DISCONNECTED once
        # the broker saw the close: all stored, none delivered.
        for _ in range(100):
            if (yield self.acked(ports, "centralQueued")) >= 8:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((yield self.acked(ports, "centralQueued")), 8)
        self.assertEqual((yield self.acked(ports, "centralDelivered")), 0)
        yield self.kill(proc)
        del upstream.seen[:]

        proc, listening = self.start()
        ports = yield listening
        d = yield self.connect(ports, "device", "d1", "d1-secret")
        d.write(frames.MESSAGE, 9, Payload.json({"n": 3}))
        ack = yield d.nextFrame()
        self.assertEqual(ack.kind, frames.ACK)
        upstream.default = (200, b"")
        expected = [("device_connected", None)]
        for i in range(3):
            expected += [("message", {"n": i}), ("telemetry", {"t": i})]
        expected += [("device_disconnected", "closed"), ("device_connected", None),
                     ("message", {"n": 3})]
        delivered = {}
        for _ in range(200):
            delivered = {}
            for s in upstream.seen:
                delivered[s["event"]["messageId"]] = s["event"]
            if len(delivered) >= len(expected):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        got = []
        for messageId in sorted(delivered):
            e = delivered[messageId]
            value = e["payload"]["data"]
            if e["kind"].startswith("device_"):
                value = value.get("reason")
            got.append((e["kind"], value))
        self.assertEqual(got, expected)
        # In order on the wire too: each event's first attempt came after
        # the previous event was answered 2xx.
        ids = [s["event"]["messageId"] for s in upstream.seen]
        self.assertEqual(ids, sorted(ids))
        self.assertNotIn("Traceback", proc.text())
        yield self.kill(proc)
