# -*- test-case-name: tests.test_workers -*-
"""
Tests for L{broker.workers}: sockets opened by a supervisor and adopted by
workers (TCP, TLS, UDP, UNIX), the listeners every face opens, and real
C{twistd -n broker} processes with C{cluster.workers = 2} over a real
redis-server.
"""

import json
import os
import re
import signal

import treq
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, error, protocol, reactor, ssl
from twisted.internet.endpoints import (
    TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol, serverFromString,
    wrapClientTLS)
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, capturedLogs, eventAsJSON, eventAsText, formatEvent
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from broker import config, tap, workers
from broker.auth.tokens import makeClientToken
from broker.iot.client import IoTClient
from broker.iot.frames import Payload
from tests.certs import makeCertificate
from tests.redisserver import RedisServer, settle
from tests.test_cluster_redis import waitFor
from tests.test_tap import TwistdTestsMixin, handshake
from tests.wsharness import Client

LOOPBACK = "tcp:0:interface=127.0.0.1"


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class EchoClient(protocol.Protocol):
    def __init__(self):
        self.received = defer.Deferred()
        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        self.lost.callback(None)

    def connectionMade(self):
        self.transport.write(b"ping")

    def dataReceived(self, data):
        if not self.received.called:
            self.received.callback(data)
            self.transport.loseConnection()


@defer.inlineCallbacks
def echo(endpoint):
    client = EchoClient()
    yield endpoint.connect(protocol.Factory.forProtocol(lambda: client))
    data = yield client.received
    yield client.lost
    return data


class Datagrams(protocol.DatagramProtocol):
    def __init__(self):
        self.received = defer.Deferred()

    def datagramReceived(self, data, addr):
        if not self.received.called:
            self.received.callback(data)


class HoldAndAdoptTests(TestCase):
    """
    A socket a L{workers.Holder} opened (as the supervisor does) is served
    by whoever adopts it through an L{workers.Adopter} (as a worker does),
    parsing the same endpoint description.
    """

    def hold(self, description, worker=None):
        holder = workers.Holder(reactor, worker=worker)
        d = serverFromString(holder, description).listen(protocol.Factory())
        port = self.successResultOf(d)
        self.addCleanup(port.stopListening)
        self.assertIs(holder.port, port)
        return holder

    def adopt(self, holder, description, factory, key="k"):
        # The worker gets its own copy of the descriptor, as a child does.
        adopter = workers.Adopter(reactor, key, os.dup(holder.port.fileno()),
                                  holder.port.socket.family)
        port = self.successResultOf(serverFromString(adopter, description).listen(factory))
        self.addCleanup(port.stopListening)
        self.assertTrue(adopter.adopted)
        return port

    @defer.inlineCallbacks
    def test_tcp(self):
        holder = self.hold(LOOPBACK)
        port = self.adopt(holder, LOOPBACK, protocol.Factory.forProtocol(Echo))
        self.assertEqual(port.getHost().port, holder.port.getHost().port)
        data = yield echo(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        self.assertEqual(data, b"ping")

    @defer.inlineCallbacks
    def test_tls(self):
        """
        An C{ssl:} listener: the TLS layer runs in the adopting process,
        with the certificate the description names.
        """
        keyPath, certPath, certPEM = makeCertificate(self.mktemp())
        description = f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}"
        holder = self.hold(description)
        port = self.adopt(holder, description, protocol.Factory.forProtocol(Echo))
        options = ssl.optionsForClientTLS(
            "localhost", trustRoot=ssl.Certificate.loadPEM(certPEM))
        data = yield echo(wrapClientTLS(
            options, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)))
        self.assertEqual(data, b"ping")

    @defer.inlineCallbacks
    def test_udp(self):
        holder = workers.Holder(reactor)
        d = workers.DatagramEndpoint(holder, 0, "127.0.0.1", 1024).listen(
            protocol.DatagramProtocol())
        held = self.successResultOf(d)
        self.addCleanup(held.stopListening)
        receiver = Datagrams()
        adopter = workers.Adopter(reactor, "iot.udp", os.dup(held.fileno()),
                                  held.socket.family)
        port = adopter.listenUDP(0, receiver, "127.0.0.1", 1024)
        self.addCleanup(port.stopListening)
        sender = reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(sender.stopListening)
        sender.write(b"telemetry", ("127.0.0.1", held.getHost().port))
        self.assertEqual((yield receiver.received), b"telemetry")

    @defer.inlineCallbacks
    def test_unix(self):
        """
        A worker that stops listening on an adopted UNIX socket leaves its
        path to the supervisor (and the other workers).
        """
        path = os.path.join(self.mktemp(), "s")
        os.makedirs(os.path.dirname(path))
        holder = self.hold(f"unix:{path}:mode=600")
        port = self.adopt(holder, f"unix:{path}:mode=600", protocol.Factory.forProtocol(Echo))
        self.assertEqual((yield echo(UNIXClientEndpoint(reactor, path))), b"ping")
        yield port.stopListening()
        self.assertTrue(os.path.exists(path))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

    def test_workerOffset(self):
        """
        A per-worker listener (C{admin.worker_listen}) of worker I{i}
        listens on the configured port plus I{i}; port 0 stays ephemeral.
        """
        for _ in range(5):
            probe = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
            base = probe.getHost().port
            probe.stopListening()
            holder = workers.Holder(reactor, worker=2)
            try:
                port = holder.listenTCP(base, protocol.Factory(), interface="127.0.0.1")
            except error.CannotListenError:
                continue  # base + 2 is somebody else's: try another base
            self.addCleanup(port.stopListening)
            self.assertEqual(port.getHost().port, base + 2)
            break
        else:
            self.fail("no free port pair found")
        self.assertNotEqual(self.hold(LOOPBACK, worker=3).port.getHost().port, 3)

    def test_unixOffset(self):
        path = os.path.join(self.mktemp(), "admin")
        os.makedirs(os.path.dirname(path))
        self.hold(f"unix:{path}", worker=1)
        self.assertTrue(os.path.exists(path + "-w1"))

    def test_adoptedOnce(self):
        holder = self.hold(LOOPBACK)
        adopter = workers.Adopter(reactor, "k", os.dup(holder.port.fileno()), 2)
        port = adopter.listenTCP(0, protocol.Factory())
        self.addCleanup(port.stopListening)
        self.assertRaises(Exception, adopter.listenTCP, 0, protocol.Factory())


ALL_FACES = """
[broker]
state_dir = "{state}"
[admin]
listen = ["{lo}", "{lo}"]
[webpubsub]
listen = ["{lo}"]
[ecdn]
enabled = true
listen = ["{lo}"]
[iot]
enabled = true
listen = ["{lo}"]
[iot.tls]
listen = ["{lo}"]
[iot.udp]
port = 0
[iot.http]
listen = ["{lo}"]
[peergroups]
enabled = true
listen = ["{lo}"]
tcp_listen = ["{lo}"]
"""


class SharedListenersTests(TestCase):
    def test_workersNeedRedis(self):
        settings = config.parse("[cluster]\nworkers = 2\n")
        e = self.assertRaises(config.ConfigError, workers.checkSettings, settings)
        self.assertEqual(e.key, "cluster.workers")
        self.assertIn("cluster.redis_url", str(e))
        workers.checkSettings(config.parse("[cluster]\nworkers = 1\n"))

    @defer.inlineCallbacks
    def test_everyListenerShared(self):
        """
        With every face enabled, a worker's service tree adopts exactly the
        sockets L{workers.sharedListeners} had the supervisor open, and
        serves on them.
        """
        state = FilePath(self.mktemp())
        settings = config.parse(ALL_FACES.format(state=state.path, lo=LOOPBACK))
        listeners = workers.sharedListeners(settings)
        self.assertEqual(
            [listener.key for listener in listeners],
            ["webpubsub.listen[0]", "ecdn.listen[0]", "iot.listen[0]", "iot.tls.listen[0]",
             "iot.udp",
             "iot.http.listen[0]", "peergroups.listen[0]", "peergroups.tcp_listen[0]",
             "admin.listen[0]", "admin.listen[1]"])
        specs, held = [], {}
        for listener in listeners:
            holder = workers.Holder(reactor)
            port = yield listener.endpoint(holder).listen(protocol.Factory())
            self.addCleanup(port.stopListening)
            held[listener.key] = port.getHost().port
            specs.append({"key": listener.key, "fd": os.dup(port.fileno()),
                          "family": int(port.socket.family)})
        ports = workers.InheritedPorts(reactor, specs)
        top = tap.buildService(settings, reactor, ports=ports)
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        self.assertEqual(ports.unused(), [])
        response = yield treq.get(f"http://127.0.0.1:{held['admin.listen[1]']}/healthz",
                                  reactor=reactor, persistent=False)
        self.assertEqual(response.code, 200)
        yield treq.content(response)

    def test_unknownListenerRefused(self):
        ports = workers.InheritedPorts(reactor, [])
        e = self.assertRaises(config.ConfigError, ports.reactorFor, "admin.listen[0]")
        self.assertEqual(e.key, "admin.listen[0]")


def clusterSettings(workers=2):
    return config.parse(f'[cluster]\nredis_url = "redis://127.0.0.1:1/0"\n'
                        f'workers = {workers}\n')


class WorkerPoolTests(TestCase):
    """
    The pool's restart schedule (over a L{Clock}) and its relay of a
    worker's output.
    """

    def setUp(self):
        self.clock = Clock()
        self.events = []
        self.pool = workers.WorkerPool(self.clock, clusterSettings(), 2, restartDelay=0.5,
                                       maxRestartDelay=2.0, stableAfter=10.0,
                                       publisher=self.events.append)

    def die(self, worker, readyFor):
        worker.everReady = True
        worker.readyAt = self.clock.seconds() - readyFor
        worker.ended = defer.Deferred()
        worker.pid = 1234
        self.pool._ended(worker, Failure(error.ProcessTerminated(signal=9)))
        self.assertTrue(worker.ended.called)
        call = worker.restartCall
        delay = call.getTime() - self.clock.seconds()
        call.cancel()
        return delay

    def test_backoff(self):
        """
        Each death soon after being ready doubles the delay, up to the
        maximum; a death after a stable run starts again from the first.
        """
        w1 = self.pool.workers[1]
        with capturedLogs() as logged:
            delays = [self.die(w1, readyFor=1.0) for _ in range(4)]
        self.assertEqual(delays, [0.5, 1.0, 2.0, 2.0])
        self.assertIn("w1 (pid 1234, node None) died: killed by signal 9; restarting in 0.5 s",
                      [formatEvent(e) for e in logged])
        self.assertEqual(self.die(w1, readyFor=10.0), 0.5)
        self.assertEqual(self.die(w1, readyFor=0.0), 1.0)

    def test_relay(self):
        """
        A worker's JSON events are published here with their level and a
        system naming the worker; its ready event marks it ready; other
        output is relayed as text lines.
        """
        w0 = self.pool.workers[0]
        w0.ready, w0.ended = defer.Deferred(), defer.Deferred()
        proc = workers.WorkerProcess(self.pool, w0, b"")
        info = eventAsJSON({"log_namespace": "broker.tap", "log_level": LogLevel.warn,
                            "log_format": "hello {who}", "who": "you", "log_time": 1.0})
        ready = eventAsJSON({"log_namespace": "broker.workers", "log_level": LogLevel.info,
                             "log_format": "ready", "workerReady": True, "nodeId": "h-w0-1",
                             "log_time": 2.0})
        data = f"\x1e{info}\n\x1e{ready}\nprinted\n".encode()
        # In pieces, as a pipe delivers it.
        proc.childDataReceived(1, data[:7])
        proc.childDataReceived(1, data[7:])
        proc.childDataReceived(2, b"Fatal Python error")
        self.assertEqual(len(self.events), 3)
        with capturedLogs():
            proc.processEnded(Failure(error.ProcessDone(0)))
        self.assertTrue(w0.ended.called)
        first, second, text, err = self.events[:4]
        self.assertEqual(formatEvent(first), "hello you")
        self.assertEqual(first["log_system"], "w0 broker.tap#warn")
        self.assertEqual(first["log_level"], LogLevel.warn)
        self.assertEqual(second["log_system"], "w0 broker.workers#info")
        self.assertEqual(self.successResultOf(w0.ready), w0)
        self.assertEqual(w0.nodeId, "h-w0-1")
        self.assertEqual((formatEvent(text), text["log_system"]), ("printed", "w0 stdout"))
        self.assertEqual((formatEvent(err), err["log_system"], err["log_level"]),
                         ("Fatal Python error", "w0 stderr", LogLevel.error))

    def test_relayedTraceback(self):
        """
        A failure logged in a worker reaches this log with its traceback
        (the JSON between the processes would keep only its type).
        """
        written = []
        observe = workers._withTracebacks(lambda e: written.append(eventAsJSON(e)))
        try:
            1 / 0
        except ZeroDivisionError:
            observe({"log_namespace": "broker.x", "log_level": LogLevel.critical,
                     "log_format": "it broke", "log_failure": Failure(), "log_time": 1.0})
        w0 = self.pool.workers[0]
        proc = workers.WorkerProcess(self.pool, w0, b"")
        proc.childDataReceived(1, f"\x1e{written[0]}\n".encode())
        [event] = self.events
        text = eventAsText(event)
        self.assertIn("it broke", text)
        self.assertIn("test_relayedTraceback", text)
        self.assertIn("ZeroDivisionError: division by zero", text)


HUNG_WORKER = b"""#!/bin/sh
trap '' TERM
printf '\036{"workerReady": true, "nodeId": "hung", "log_format": "ready"}\\n'
exec sleep 30
"""


class HungWorkerTests(TestCase):
    @defer.inlineCallbacks
    def test_killedAfterStopTimeout(self):
        """
        A worker that ignores SIGTERM gets SIGKILL after C{stopTimeout}
        seconds, so a hung worker cannot hang the broker's shutdown.
        """
        script = FilePath(self.mktemp())
        script.setContent(HUNG_WORKER)
        script.chmod(0o755)
        events = []
        pool = workers.WorkerPool(reactor, clusterSettings(), 1, python=script.path,
                                  env=dict(os.environ), stopTimeout=0.5,
                                  publisher=events.append)
        pool.startService()
        self.addCleanup(lambda: pool.stopService() if pool.running else None)
        worker = yield pool.workers[0].ready
        self.assertEqual(worker.nodeId, "hung")
        started = reactor.seconds()
        with capturedLogs() as logged:
            yield pool.stopService()
        self.assertGreaterEqual(reactor.seconds() - started, 0.5)
        self.assertFalse(worker.alive)
        lines = [formatEvent(e) for e in logged]
        self.assertIn(f"w0 (pid {worker.pid}) still running after 0.5 s: SIGKILL", lines)
        self.assertIn(f"w0 (pid {worker.pid}) stopped: killed by signal 9", lines)


# -- real twistd processes --------------------------------------------------

READY = re.compile(r"\[(w\d+) broker\.workers#info\] ready: node (\S+), pid (\d+)$")
WORKER_INFO = re.compile(rb'^broker_worker_info\{node_id="([^"]+)",worker="(\d+)"\} 1\.0$',
                         re.M)


def writeConfig(testCase, redisURL, extra="", state=None):
    directory = FilePath(testCase.mktemp())
    directory.makedirs()
    path = directory.child("broker.toml")
    path.setContent(
        f'[broker]\nstate_dir = "{state or directory.child("state").path}"\n'
        f'[admin]\nlisten = ["{LOOPBACK}"]\nworker_listen = ["{LOOPBACK}"]\n'
        f'[cluster]\nredis_url = "{redisURL}"\nworkers = 2\nheartbeat = 0.2\n'
        f'dead_after = 1.0\n'
        f'[webpubsub]\nlisten = ["{LOOPBACK}"]\n{extra}'.encode("utf-8"))
    return directory, path


def readyWorkers(proc):
    """
    C{{name: (nodeId, pid)}} of the latest ready incarnation of each worker.
    """
    ready = {}
    for line in proc.lines():
        m = READY.search(line)
        if m:
            ready[m.group(1)] = (m.group(2), int(m.group(3)))
    return ready


@defer.inlineCallbacks
def whoAnswers(port):
    """
    The node id of the worker that answered a scrape of C{port}, on a new
    connection.
    """
    response = yield treq.get(f"http://127.0.0.1:{port}/metrics", reactor=reactor,
                              persistent=False)
    body = yield treq.content(response)
    return WORKER_INFO.search(body).group(1).decode("ascii")


def running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not reaped it yet.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class RunningWorkersMixin(TwistdTestsMixin):
    """
    C{twistd -n broker} with C{cluster.workers = 2}, both workers ready.
    """

    timeout = 45
    extra = ""

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(self, reactor)
        yield self.redis.start()
        self.directory, path = writeConfig(self, self.redis.url, self.extra)
        self.proc = self.spawn(
            ["-n", "--pidfile=", "broker", "--config", path.path], self.directory,
            ["webpubsub.listen[0]", "admin.listen[0]", "admin.worker_listen[0]@w0",
             "admin.worker_listen[0]@w1"])
        self.ports = yield self.proc.listening
        yield waitFor(lambda: len(readyWorkers(self.proc)) == 2, timeout=20)
        self.addCleanup(self.noOrphans)
        # Ready to serve means linked to Redis too.  (A RedisClient stopped
        # while its connections are still being set up logs an unhandled
        # NoTransition from ClientService: the lead's to look at.)
        for name in ("w0", "w1"):
            yield self.waitHealthy(self.ports[f"admin.worker_listen[0]@{name}"])

    @defer.inlineCallbacks
    def waitHealthy(self, port):
        for _ in range(200):
            response = yield treq.get(f"http://127.0.0.1:{port}/healthz", reactor=reactor,
                                      persistent=False)
            yield treq.content(response)
            if response.code == 200:
                return
            yield settle(reactor, 0.05)
        self.fail(f"the worker of admin port {port} never became healthy")

    def noOrphans(self):
        """
        Whatever ended the test, the broker's workers end with it.
        """
        pids = [pid for _, pid in readyWorkers(self.proc).values()]
        if not self.proc.ended.called:
            self.proc.transport.signalProcess("TERM")
        return self.proc.ended.addCallback(
            lambda _: waitFor(lambda: not any(running(p) for p in pids), timeout=5))

    @defer.inlineCallbacks
    def seenBehind(self, port, expected, tries=60):
        seen = set()
        for _ in range(tries):
            seen.add((yield whoAnswers(port)))
            if expected <= seen:
                break
        return seen


KEY = "workers-test-key-0123456789abcdef"


class WorkersTests(RunningWorkersMixin, TestCase):
    extra = f'access_keys = ["{KEY}"]\n[webpubsub.hubs.chat]\n'

    @defer.inlineCallbacks
    def connect(self, userId, key=KEY):
        port = self.ports["webpubsub.listen[0]"]
        url = f"ws://127.0.0.1:{port}/client/hubs/chat"
        token = makeClientToken(key, url, userId=userId,
                                roles=("webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"))
        factory = WebSocketClientFactory(f"{url}?access_token={token}",
                                         protocols=["json.webpubsub.azure.v1"], reactor=reactor)
        factory.protocol = Client
        factory.setProtocolOptions(autoPingInterval=0, failByDrop=False)
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        self.addCleanup(lambda: client.transport.abortConnection() or client.closed
                        if client.state != client.STATE_CLOSED else None)
        yield client.opened
        client.connectionId = (yield client.nextJSON())["connectionId"]
        return client

    @defer.inlineCallbacks
    def connections(self, name):
        """
        The Web PubSub connections worker C{name} holds, from its own
        admin port.
        """
        response = yield treq.get(
            f"http://127.0.0.1:{self.ports[f'admin.worker_listen[0]@{name}']}/stats",
            reactor=reactor, persistent=False)
        stats = json.loads((yield treq.content(response)))
        return stats["connections"]

    @defer.inlineCallbacks
    def test_groupAcrossWorkers(self):
        """
        Two clients of the shared port held by different workers share a
        group: the workers are one broker.
        """
        x = yield self.connect("xavier")
        holder = "w0" if (yield self.connections("w0")) == 1 else "w1"
        other = {"w0": "w1", "w1": "w0"}[holder]
        # The kernel wakes every worker for each connection and the first to
        # accept it wins: a loaded machine can favour one worker for a long
        # run, so keep trying, with pauses that let the scheduler move on.
        for attempt in range(150):
            y = yield self.connect(f"yvonne{attempt}")
            if (yield self.connections(other)) == 1:
                break
            y.transport.abortConnection()
            yield y.closed
            yield deferLater(reactor, 0.02 * (attempt % 5), lambda: None)
        else:
            self.fail("150 connections in a row went to the same worker")
        for client in (x, y):
            client.send({"type": "joinGroup", "group": "g", "ackId": 1})
            self.assertTrue((yield client.nextJSON())["success"])
        x.send({"type": "sendToGroup", "group": "g", "ackId": 2, "dataType": "text",
                "data": "across", "noEcho": True})
        self.assertTrue((yield x.nextJSON())["success"])
        got = yield y.nextJSON()
        self.assertEqual((got["fromUserId"], got["data"]), ("xavier", "across"))

    @defer.inlineCallbacks
    def test_bothWorkersServe(self):
        """
        Connections to the shared admin port reach both workers (each a
        cluster node of its own), each worker's own admin port reaches that
        worker, and the shared Web PubSub port is served.
        """
        ready = readyWorkers(self.proc)
        nodes = {name: nodeId for name, (nodeId, _) in ready.items()}
        self.assertEqual(len(set(nodes.values())), 2)
        for name, (nodeId, pid) in ready.items():
            self.assertTrue(nodeId.endswith(f"-{name}-{pid}"), nodeId)
        seen = yield self.seenBehind(self.ports["admin.listen[0]"], set(nodes.values()))
        self.assertEqual(seen, set(nodes.values()))
        for name in ("w0", "w1"):
            answered = yield whoAnswers(self.ports[f"admin.worker_listen[0]@{name}"])
            self.assertEqual(answered, nodes[name])
        # One admin site: each metric once, whichever listener serves it.
        response = yield treq.get(
            f"http://127.0.0.1:{self.ports['admin.worker_listen[0]@w1']}/metrics",
            reactor=reactor, persistent=False)
        body = yield treq.content(response)
        self.assertEqual(body.count(b"\nbroker_fanout_pending "), 1, body)
        status = yield handshake(self.ports["webpubsub.listen[0]"], "/client/hubs/chat")
        self.assertEqual(status.split(b" ", 2)[1], b"401", status)

    @defer.inlineCallbacks
    def test_killedWorkerRestarted(self):
        """
        A worker killed with SIGKILL is restarted (a new node) while the
        other keeps serving the shared ports.
        """
        before = readyWorkers(self.proc)
        (w0, _), (w1, pid1) = before["w0"], before["w1"]
        os.kill(pid1, signal.SIGKILL)
        yield waitFor(lambda: any(f"w1 (pid {pid1}, node {w1}) died: killed by signal 9; "
                                  "restarting in" in line for line in self.proc.lines()))
        # Meanwhile the shared port goes on answering (w0, or the new w1 as
        # soon as it listens, a moment before it logs that it is ready).
        answers = 0
        while readyWorkers(self.proc)["w1"][1] == pid1:
            self.assertNotEqual((yield whoAnswers(self.ports["admin.listen[0]"])), w1)
            answers += 1
        self.assertGreater(answers, 0)
        newNode, newPid = readyWorkers(self.proc)["w1"]
        self.assertNotEqual((newNode, newPid), (w1, pid1))
        self.assertFalse(running(pid1))
        seen = yield self.seenBehind(self.ports["admin.listen[0]"], {w0, newNode})
        self.assertEqual(seen, {w0, newNode})
        # Its own admin port came back with it.
        self.assertEqual(
            (yield whoAnswers(self.ports["admin.worker_listen[0]@w1"])), newNode)

    def test_sigterm(self):
        """
        SIGTERM stops every worker cleanly, then twistd, which ends by the
        signal as a single broker does; no worker outlives it and the
        ports are closed.
        """
        return self.stopsCleanly("TERM")

    def test_sigint(self):
        """
        So does SIGINT (Ctrl-C) sent to twistd alone.
        """
        return self.stopsCleanly("INT")

    @defer.inlineCallbacks
    def stopsCleanly(self, name):
        pids = [pid for _, pid in readyWorkers(self.proc).values()]
        self.proc.transport.signalProcess(name)
        reason = yield self.proc.ended
        self.assertIsInstance(reason, error.ProcessTerminated)
        self.assertEqual(reason.signal, getattr(signal, f"SIG{name}"))
        for pid in pids:
            self.assertFalse(running(pid), pid)
        text = self.proc.text()
        for name in ("w0", "w1"):
            self.assertRegex(text, rf"{name} \(pid \d+\) stopped: exit status 0")
        self.assertTrue(self.proc.lines()[-1].endswith("Server Shut Down."), text[-2000:])
        self.assertNotIn("Traceback", text)
        yield self.assertFailure(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.ports["admin.listen[0]"]).connect(
                protocol.Factory.forProtocol(protocol.Protocol)),
            error.ConnectionRefusedError)


    @defer.inlineCallbacks
    def test_supervisorKilled(self):
        """
        Even when twistd is killed with SIGKILL (nothing forwarded), its
        workers notice the end of its pipe and stop instead of serving on.
        """
        pids = [pid for _, pid in readyWorkers(self.proc).values()]
        self.proc.transport.signalProcess("KILL")
        yield self.proc.ended
        yield waitFor(lambda: not any(running(p) for p in pids), timeout=10)


class WebPubSubReloadWorkersTests(RunningWorkersMixin, TestCase):
    """
    SIGHUP reaches every worker, and each reads the configuration file
    again: a key added to it is accepted whichever worker takes the
    client, and the clients connected before stay.
    """

    extra = f'access_keys = ["{KEY}"]\n[webpubsub.hubs.chat]\n'
    connect = WorkersTests.connect

    @defer.inlineCallbacks
    def test_sighupReloadsEveryWorker(self):
        before = yield self.connect("before")
        newKey = "workers-new-key-fedcba9876543210"
        path = self.directory.child("broker.toml")
        path.setContent(path.getContent().replace(
            f'access_keys = ["{KEY}"]'.encode(), f'access_keys = ["{KEY}", "{newKey}"]'.encode()))
        self.proc.transport.signalProcess("HUP")
        yield waitFor(lambda: all(
            any(f"[{name} broker.webpubsub.reload#info] webpubsub: reloaded: access keys 2 "
                f"(was 1)" in line for line in self.proc.lines()) for name in ("w0", "w1")))
        port = self.ports["webpubsub.listen[0]"]
        for i in range(6):
            yield self.connect(f"new{i}", key=newKey)
        self.assertEqual(
            (yield handshake(port, "/client/hubs/chat?access_token=" + makeClientToken(
                "not-a-configured-key-0123456789abcdef", f"http://127.0.0.1:{port}/client/hubs/chat"))).split()[1],
            b"401")
        self.assertIsNone(before.closeCode)
        self.assertEqual(len(readyWorkers(self.proc)), 2)

        # A worker restarted after the SIGHUP reloads too, once it runs.
        w1, pid1 = readyWorkers(self.proc)["w1"]
        os.kill(pid1, signal.SIGKILL)
        yield waitFor(lambda: readyWorkers(self.proc)["w1"][1] != pid1, timeout=20)
        newPid = readyWorkers(self.proc)["w1"][1]
        reloaded = [line for line in self.proc.lines()
                    if "[w1 broker.webpubsub.reload#info] webpubsub: reloaded:" in line]
        self.assertEqual(len(reloaded), 2, self.proc.text())
        self.assertIn("access keys 2 (was 1)", reloaded[-1])
        self.assertNotEqual(newPid, pid1)


class EcdnWorkersTests(RunningWorkersMixin, TestCase):
    """
    Workers serving the eCDN face over TLS: SIGHUP reaches every worker
    (the face reloads its rules and keys in each), and the shared C{ssl:}
    listener serves HTTPS.
    """

    @property
    def extra(self):
        keyPath, certPath, self.certPEM = makeCertificate(os.path.abspath(self.mktemp()))
        return ('[ecdn]\nenabled = true\n'
                f'listen = ["ssl:0:interface=127.0.0.1:privateKey={keyPath}:'
                f'certKey={certPath}"]\n')

    @defer.inlineCallbacks
    def test_tls(self):
        port = self.ports["ecdn.listen[0]"]
        options = ssl.optionsForClientTLS(
            "localhost", trustRoot=ssl.Certificate.loadPEM(self.certPEM))
        client = HTTPSClient()
        yield wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port)).connect(
            protocol.Factory.forProtocol(lambda: client))
        status = yield client.status
        self.assertRegex(status, rb"^HTTP/1\.1 \d{3} ")

    @defer.inlineCallbacks
    def test_sighup(self):
        self.proc.transport.signalProcess("HUP")
        yield waitFor(lambda: all(
            any(f"[{name} broker.ecdn.face#info] ecdn: rules and keys reloaded" in line
                for line in self.proc.lines()) for name in ("w0", "w1")))
        self.assertIn("SIGHUP: reloading 2 workers", self.proc.text())
        self.assertEqual(len(readyWorkers(self.proc)), 2)
        self.assertFalse(self.proc.ended.called)


IOT_REGISTRY = b"""
[fleets.acme]
central_key = "central-secret"
[fleets.acme.devices.d1]
key = "d1-secret"
"""


class IoTWorkersTests(RunningWorkersMixin, TestCase):
    """
    IoT devices over the shared TCP port, telemetry over the shared UDP
    socket: a datagram is accepted once, whichever worker reads it.
    """

    @property
    def extra(self):
        registry = FilePath(self.mktemp())
        registry.setContent(IOT_REGISTRY)
        return ('[iot]\nenabled = true\n'
                f'listen = ["{LOOPBACK}"]\nregistry_file = "{registry.path}"\n'
                'token_batch = 16\n[iot.udp]\nport = 0\n[iot.http]\nenabled = false\n')

    @defer.inlineCallbacks
    def udpCounts(self):
        counts = {}
        for name in ("w0", "w1"):
            response = yield treq.get(
                f"http://127.0.0.1:{self.ports[f'admin.worker_listen[0]@{name}']}/metrics",
                reactor=reactor, persistent=False)
            body = (yield treq.content(response)).decode()
            counts[name] = {m.group(1): float(m.group(2)) for m in re.finditer(
                r'^broker_iot_udp_datagrams_total\{outcome="(\w+)"\} (\S+)$', body, re.M)}
        return counts

    @defer.inlineCallbacks
    def test_telemetry(self):
        udpPort = int(re.search(r"\] iot\.udp listening on 127\.0\.0\.1:(\d+)$",
                                self.proc.text(), re.M).group(1))
        device = IoTClient("device", "acme", "d1", "d1-secret")
        yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.ports["iot.listen[0]"]), device)
        self.addCleanup(lambda: device.transport.loseConnection() or device.closed)
        yield device.authenticated
        tokens = list((yield device.waitTokens(16)))
        sender = reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(sender.stopListening)
        for i, token in enumerate(tokens[:12]):
            sender.write(device.datagram(Payload.json({"n": i}), token), ("127.0.0.1", udpPort))
            yield settle(reactor, 0.01)

        def total(counts, outcome):
            return sum(c.get(outcome, 0) for c in counts.values())

        # A replay, whichever worker reads it this time.  UDP may drop a
        # datagram on a loaded machine, so the replay is sent again (at
        # most three times) until one is counted; none is ever accepted.
        for attempt in range(3):
            sender.write(device.datagram(Payload.json({"n": 0}), tokens[0]),
                         ("127.0.0.1", udpPort))
            # Up to 10 s: on a loaded machine a worker's Redis round trip
            # for the replayed token can take seconds.
            for _ in range(200):
                counts = yield self.udpCounts()
                if total(counts, "accepted") >= 12 and total(counts, "replayed") >= 1:
                    break
                yield settle(reactor, 0.05)
            if total(counts, "replayed") >= 1:
                break
        self.assertEqual(total(counts, "accepted"), 12, (counts, self.proc.text()[-6000:]))
        self.assertGreaterEqual(total(counts, "replayed"), 1, (counts, self.proc.text()[-6000:]))
        self.assertEqual(sum(total(counts, outcome) for outcome in
                             ("unknown", "expired", "malformed", "rate_limited", "bad_mac")), 0,
                         counts)


class HTTPSClient(protocol.Protocol):
    """
    One request over an established TLS connection: its status line.
    """

    def __init__(self):
        self.received = b""
        self.status = defer.Deferred()

    def connectionMade(self):
        self.transport.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.status.callback(self.received.split(b"\r\n", 1)[0])


class StartupFailureTests(TwistdTestsMixin, TestCase):
    """
    What stops C{twistd broker} with workers from starting, reported in one
    line with status 1.  (No redis-server: none of them gets that far.)
    """

    URL = "redis://127.0.0.1:1/0"

    def startBroker(self, path, directory):
        proc = self.spawn(["-n", "--pidfile=", "broker", "--config", path.path], directory)
        return proc.ended.addCallback(lambda _: proc)

    @defer.inlineCallbacks
    def test_workersNeedRedis(self):
        directory, path = writeConfig(self, "")
        proc = yield self.startBroker(path, directory)
        # A configuration error: EX_CONFIG, reported before anything starts.
        self.assertEqual(proc.exitCode(), 78)
        self.assertOneLineNaming(proc, "cluster.workers: 2 workers need cluster.redis_url")

    @defer.inlineCallbacks
    def test_portInUse(self):
        busy = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(busy.stopListening)
        directory, path = writeConfig(
            self, self.URL, f'[ecdn]\nenabled = true\n'
                            f'listen = ["tcp:{busy.getHost().port}:interface=127.0.0.1"]\n')
        proc = yield self.startBroker(path, directory)
        self.assertEqual(proc.exitCode(), 1)
        self.assertOneLineNaming(proc, "ecdn.listen[0]: cannot listen on")
        self.assertNotIn("w0 started", proc.text())

    @defer.inlineCallbacks
    def test_workerCannotStart(self):
        """
        A worker that cannot build its broker (here: state_dir is a file)
        stops the whole broker with status 1 instead of being restarted
        for ever.
        """
        state = FilePath(self.mktemp())
        state.setContent(b"not a directory")
        directory, path = writeConfig(self, self.URL, state=state.path)
        proc = yield self.startBroker(path, directory)
        self.assertEqual(proc.exitCode(), 1)
        self.assertOneLineNaming(proc, "cannot start: broker.state_dir:")
        self.assertOneLineNaming(proc, "w0 (pid")
        self.assertIn("could not start (exit status 1): the broker stops", proc.text())
        self.assertNotIn("w1 started", proc.text())
