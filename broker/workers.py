# -*- test-case-name: tests.test_workers -*-
"""
Several worker processes on one machine, sharing every listening socket
(C{cluster.workers} > 1).

One Python process uses one core.  With C{cluster.workers = N} the twistd
process becomes a I{supervisor}: it opens every configured listener once
(every face's stream endpoints, the UDP telemetry socket, the admin
listener), never accepts on them itself, and runs N worker processes
(C{python -m broker.worker}) that inherit those sockets and adopt them.
Each worker is a whole broker node (its own core, faces and cluster node,
named C{<node_id or host>-w<i>-<pid>}); the workers behave as one broker
through Redis, exactly as nodes on different machines do.

Sockets are inherited rather than opened by each worker with
C{SO_REUSEPORT} because:

  - a listener has one accept queue, which every worker takes from: a
    worker that dies or restarts loses none of the connections waiting in
    it (with C{SO_REUSEPORT} the kernel hashes each connection to one
    worker's own queue, and closing that socket resets what waits there),
    and a worker busy with a long fan-out simply accepts less;
  - C{tcp:0} is one port shared by all, with nothing to coordinate;
  - twistd opens the sockets before it sheds privileges (C{--uid}), so
    ports below 1024 keep working, and the supervisor reports a port it
    cannot open by its key and exits 1 before any worker starts, as a single
    broker does;
  - it works alike for every endpoint kind: TCP, TLS (the TLS layer runs in
    the workers, over the adopted socket), UNIX sockets, and UDP, where each
    datagram is read by one worker.

The price: the kernel does not balance accepts, so the spread of connections
over workers is whatever their wake-ups make of it (even enough under load,
uneven for a trickle of connections).

A worker's node id carries its process id, so a restarted worker is a new
node: the dead one's connections are reaped cluster-wide by the usual
dead-node path (C{cluster.dead_after}), never mistaken for the new one's.
"""

import functools
import json
import os
import signal
import socket
import sys
import threading

from twisted.application import service
from twisted.internet import defer, error, fdesc, main, protocol
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import (
    LogLevel, Logger, eventFromJSON, globalLogBeginner, globalLogPublisher,
    jsonFileLogObserver)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from broker import config as brokerconfig
from broker.config import ConfigError

log = Logger()


def checkSettings(settings):
    """
    @raise ConfigError: for C{cluster.workers} > 1 without the Redis the
        workers share their state through.
    """
    cluster = settings["cluster"]
    if cluster["workers"] > 1 and not cluster["redis_url"]:
        raise ConfigError("cluster.workers",
                          f"{cluster['workers']} workers need cluster.redis_url: the workers "
                          "are cluster nodes and share their state through Redis")


# -- what is shared -----------------------------------------------------------


class SharedListener:
    """
    One listener the supervisor opens for every worker.

    @ivar key: its name, as the worker's C{buildService} asks for it
        (C{webpubsub.listen[0]}, C{iot.udp}).
    @ivar description: the endpoint, for logs and failures.
    @ivar endpoint: C{endpoint(reactor)}, the endpoint listening with
        C{reactor}.
    """

    def __init__(self, key, description, endpoint):
        self.key = key
        self.description = description
        self.endpoint = endpoint


def sharedListeners(settings):
    """
    Every listener a broker with C{settings} opens, by the key its face
    names it with.  This mirrors the faces' C{build} (which face is enabled,
    which of its listeners); a worker asked to listen on a key missing here
    refuses to start, naming it, and a test checks both agree.
    """
    out = []

    def streams(key, descriptions):
        for i, description in enumerate(descriptions):
            out.append(SharedListener(f"{key}[{i}]", description,
                                      lambda r, d=description: serverFromString(r, d)))

    if settings["webpubsub"]["enabled"]:
        streams("webpubsub.listen", settings["webpubsub"]["listen"])
    if settings["ecdn"]["enabled"]:
        streams("ecdn.listen", settings["ecdn"]["listen"])
    iot = settings["iot"]
    if iot["enabled"]:
        streams("iot.listen", iot["listen"])
        streams("iot.tls.listen", iot["tls"]["listen"])
        udp = iot["udp"]
        if udp["enabled"]:
            out.append(SharedListener(
                "iot.udp", f"udp:{udp['port']}:interface={udp['interface']}",
                lambda r: DatagramEndpoint(r, udp["port"], udp["interface"],
                                           udp["max_datagram"] + 1)))
        if iot["http"]["enabled"]:
            streams("iot.http.listen", iot["http"]["listen"])
    pg = settings["peergroups"]
    if pg["enabled"]:
        streams("peergroups.listen", pg["listen"])
        streams("peergroups.tcp_listen", pg["tcp_listen"])
    streams("admin.listen", settings["admin"]["listen"])
    return out


def workerAdminKey(j, index):
    """
    The name of worker C{index}'s own C{admin.worker_listen[j]} listener.
    """
    return f"admin.worker_listen[{j}]@w{index}"


class DatagramEndpoint:
    """
    The UDP telemetry socket as an endpoint, so the supervisor opens it (and
    reports a failure) like the stream listeners.
    """

    def __init__(self, reactor, port, interface, maxPacketSize):
        self._reactor = reactor
        self._port = port
        self._interface = interface
        self._maxPacketSize = maxPacketSize

    def listen(self, protocol):
        return defer.execute(self._reactor.listenUDP, self._port, protocol,
                             interface=self._interface, maxPacketSize=self._maxPacketSize)


class _Unshareable(Exception):
    pass


class _Shared(protocol.Factory):
    """
    The factory of a supervisor's socket: it never accepts, the workers do.
    """

    noisy = False

    def logPrefix(self):
        # Twisted logs "<prefix> starting on <port>".
        return "Shared with the workers:"

    def buildProtocol(self, addr):
        return None


class _UnreadDatagrams(protocol.DatagramProtocol):
    """
    The protocol of the supervisor's UDP socket, which it never reads.
    """

    noisy = False


class Holder:
    """
    What an endpoint listens with in the supervisor: it opens the socket
    with the real reactor, stops reading it at once (the supervisor never
    accepts or reads) and keeps it in L{port} for the workers.

    @param worker: for a per-worker listener (C{admin.worker_listen}), the
        worker's index: its TCP port is the configured one plus the index
        (0 stays 0: an ephemeral port each) and its UNIX path gets
        C{-w<index>}.
    """

    def __init__(self, reactor, worker=None):
        self._reactor = reactor
        self._worker = worker
        self.port = None

    def _hold(self, port):
        port.stopReading()
        self.port = port
        return port

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if self._worker and port:
            port += self._worker
        return self._hold(self._reactor.listenTCP(port, _Shared(), backlog, interface))

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        # TLS runs in the workers, over the socket they adopt.
        return self.listenTCP(port, factory, backlog, interface)

    def listenUNIX(self, address, factory, backlog=50, mode=0o666, wantPID=0):
        if self._worker is not None:
            address = f"{os.fsdecode(address)}-w{self._worker}"
        return self._hold(self._reactor.listenUNIX(address, _Shared(), backlog, mode, wantPID))

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        return self._hold(self._reactor.listenUDP(port, _UnreadDatagrams(), interface,
                                                  maxPacketSize))

    def adoptStreamPort(self, fileDescriptor, addressFamily, factory):
        # systemd: and other already-open sockets: hand them on as they are.
        return self._hold(self._reactor.adoptStreamPort(fileDescriptor, addressFamily, _Shared()))

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise _Unshareable(f"this kind of endpoint cannot be shared by workers "
                           f"(it needs reactor.{name})")

    def spec(self, key, childFD):
        """
        How the worker finds the socket: its key, its descriptor there and
        its address family.
        """
        return {"key": key, "fd": childFD, "family": int(self.port.socket.family)}


def _adoptedUNIXPortClass():
    """
    A UNIX port adopted from the supervisor, which owns the socket's path:
    a worker stopping must not unlink it.
    """
    from twisted.internet import tcp, unix

    class AdoptedUNIXPort(unix.Port):
        def connectionLost(self, reason):
            # unix.Port would unlink the path the other workers still serve.
            tcp.Port.connectionLost(self, reason)
    return AdoptedUNIXPort


class Adopter:
    """
    What an endpoint listens with in a worker: instead of opening a socket
    it adopts the one inherited from the supervisor, so parsing the
    configured description (C{ssl:...} included, with its certificate) is
    done by Twisted's own endpoint, unchanged.
    """

    def __init__(self, reactor, key, fd, family):
        self._reactor = reactor
        self.key = key
        self._fd = fd
        self._family = family
        self.adopted = False

    def _take(self):
        if self.adopted:
            raise _Unshareable(f"{self.key} was adopted already")
        self.adopted = True
        return self._fd

    def _done(self, port):
        # The adopted port holds its own duplicate of the descriptor.
        os.close(self._fd)
        return port

    def listenTCP(self, port, factory, backlog=50, interface=""):
        return self._done(self._reactor.adoptStreamPort(self._take(), self._family, factory))

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        # What reactor.listenSSL does over a socket it opens itself.
        return self.listenTCP(port, TLSMemoryBIOFactory(contextFactory, False, factory))

    def listenUNIX(self, address, factory, backlog=50, mode=0o666, wantPID=0):
        port = _adoptedUNIXPortClass()._fromListeningDescriptor(
            self._reactor, self._take(), factory)
        port.mode = mode
        port.startListening()
        return self._done(port)

    def adoptStreamPort(self, fileDescriptor, addressFamily, factory):
        return self.listenTCP(None, factory)

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        return self._done(self._reactor.adoptDatagramPort(
            self._take(), self._family, protocol, maxPacketSize))


class InheritedPorts:
    """
    The sockets a worker inherited, by listener key; handed to
    L{broker.tap.buildService} as C{ports}.
    """

    def __init__(self, reactor, specs):
        self._reactor = reactor
        self._adopters = {s["key"]: Adopter(reactor, s["key"], s["fd"], s["family"])
                          for s in specs}

    def reactorFor(self, key):
        """
        @return: what the listener C{key} listens with.
        @raise ConfigError: the supervisor opened no socket for C{key}.
        """
        adopter = self._adopters.get(key)
        if adopter is None:
            raise ConfigError(key, "this worker inherited no socket for this listener "
                                   "(broker.workers.sharedListeners does not list it)")
        return adopter

    def unused(self):
        """
        The keys of inherited sockets nothing has adopted (yet).
        """
        return sorted(k for k, a in self._adopters.items() if not a.adopted)


# -- the supervisor -----------------------------------------------------------


def makeSupervisor(settings, reactor, foreground=True, **options):
    """
    The service twistd runs for C{cluster.workers} > 1.

    @raise ConfigError: see L{checkSettings}.
    """
    checkSettings(settings)
    return Supervisor(settings, reactor, foreground, **options)


class Supervisor(service.MultiService):
    """
    The shared listeners (one L{broker.tap.ListenerService} each, named by
    key: they log C{<key> listening on <address>} and, when one cannot be
    opened, one critical line and exit 1, as in a single broker), then the
    L{WorkerPool}.

    @ivar pool: the L{WorkerPool}.
    """

    def __init__(self, settings, reactor, foreground=True, **options):
        from broker.tap import ListenerService
        super().__init__()
        count = settings["cluster"]["workers"]
        self.pool = WorkerPool(reactor, settings, count, **options)
        for listener in sharedListeners(settings):
            holder = Holder(reactor)
            ListenerService(listener.key, listener.description, listener.endpoint(holder),
                            _Shared(), reactor, foreground).setServiceParent(self)
            self.pool.shared.append((listener.key, holder))
        for index in range(count):
            for j, description in enumerate(settings["admin"]["worker_listen"]):
                holder = Holder(reactor, worker=index)
                key = workerAdminKey(j, index)
                ListenerService(key, description, serverFromString(holder, description),
                                _Shared(), reactor, foreground).setServiceParent(self)
                self.pool.own[index].append((key, holder))
        self.pool.setServiceParent(self)


def _describe(reason):
    value = getattr(reason, "value", reason)
    if getattr(value, "signal", None):
        return f"killed by signal {value.signal}"
    return f"exit status {getattr(value, 'exitCode', None) or 0}"


class _Worker:
    """
    One worker slot (C{w<index>}) across its incarnations.
    """

    def __init__(self, index):
        self.index = index
        self.name = f"w{index}"
        self.process = None
        self.pid = None
        self.nodeId = None
        self.readyAt = None
        self.everReady = False
        self.quickDeaths = 0
        self.restartCall = None
        self.ready = None
        self.ended = None

    @property
    def alive(self):
        return self.process is not None


class WorkerPool(service.Service):
    """
    Runs the workers: C{w0} first (so state files a face creates on first
    start, such as development keys, are made once), the others once it is
    ready.  A worker that dies is restarted, after C{restartDelay} seconds
    doubled for each death within C{stableAfter} seconds of being ready,
    up to C{maxRestartDelay}.  A worker that cannot start the first time
    stops the broker with exit status 1 (its own lines say why).

    Stopping sends SIGTERM to every worker and waits for them (SIGKILL after
    C{stopTimeout} seconds); C{SIGHUP} is forwarded to every ready worker.
    A worker's log events reach this process's log with their level, their
    system prefixed by the worker (C{[w1 broker.tap#info]}).

    @ivar shared: C{[(key, Holder)]}, the sockets every worker inherits.
    @ivar own: C{{index: [(key, Holder)]}}, the sockets of one worker.
    """

    name = "workers"
    # How the process leaves after a fatal failure; a test replaces it.
    _exit = staticmethod(os._exit)

    def __init__(self, reactor, settings, count, python=None, env=None, stopTimeout=None,
                 restartDelay=0.5, maxRestartDelay=30.0, stableAfter=10.0,
                 publisher=None, configPath=None):
        self._reactor = reactor
        # What the workers read again on SIGHUP: the --config file, "" for
        # the embedded default, None for nothing (they keep their settings).
        self.configPath = configPath
        # Whether SIGHUP has been forwarded: a worker (re)started after one
        # reloads once it runs, so it serves what the others reloaded.
        self.reloaded = False
        self.settings = settings
        self.workers = [_Worker(i) for i in range(count)]
        self.shared = []
        self.own = {i: [] for i in range(count)}
        self.python = python or sys.executable
        self.env = env if env is not None else _workerEnvironment()
        if stopTimeout is None:
            # A worker drains for up to broker.drain_timeout, then stops.
            stopTimeout = settings["broker"]["drain_timeout"] + 10.0
        self.stopTimeout = stopTimeout
        self.restartDelay = restartDelay
        self.maxRestartDelay = maxRestartDelay
        self.stableAfter = stableAfter
        self.publisher = publisher or globalLogPublisher
        self.nodeBase = settings["cluster"]["node_id"] or socket.gethostname()
        self.stopping = False
        self.failed = False
        self._previousHUP = None

    def startService(self):
        super().startService()
        if threading.current_thread() is threading.main_thread():
            self._previousHUP = signal.signal(signal.SIGHUP, self._onHUP)
        first, rest = self.workers[0], self.workers[1:]

        def others(ready):
            if not self.stopping:
                for worker in rest:
                    self._spawn(worker)
            return ready
        self._spawn(first).addCallback(others)

    def _spawn(self, worker):
        worker.restartCall = None
        worker.ready = defer.Deferred()
        worker.ended = defer.Deferred()
        worker.readyAt = None
        worker.nodeId = None
        childFDs = {0: "w", 1: "r", 2: "r"}
        ports = []
        for key, holder in self.shared + self.own[worker.index]:
            childFD = 3 + len(ports)
            childFDs[childFD] = holder.port.fileno()
            ports.append(holder.spec(key, childFD))
        spec = {"index": worker.index, "nodeBase": self.nodeBase,
                "settings": self.settings, "ports": ports, "config": self.configPath,
                "reload": self.reloaded and self.configPath is not None}
        proc = WorkerProcess(self, worker, json.dumps(spec).encode("utf-8") + b"\n")
        args = [self.python, "-m", "broker.worker", worker.name]
        try:
            transport = self._reactor.spawnProcess(proc, self.python, args, env=self.env,
                                                   childFDs=childFDs)
        except OSError as e:
            # Out of processes or descriptors: nothing a retry would mend soon.
            log.critical("{worker} cannot be started: {error}: the broker stops",
                         worker=worker.name, error=e)
            self._abort()
            return worker.ready
        worker.process = proc
        worker.pid = transport.pid
        log.info("{worker} started (pid {pid})", worker=worker.name, pid=transport.pid)
        return worker.ready

    def _ready(self, worker, nodeId):
        worker.nodeId = nodeId
        worker.readyAt = self._reactor.seconds()
        worker.everReady = True
        if not worker.ready.called:
            worker.ready.callback(worker)

    def _ended(self, worker, reason):
        pid, nodeId, readyAt = worker.pid, worker.nodeId, worker.readyAt
        worker.process = None
        ended = worker.ended
        status = _describe(reason)
        if self.stopping:
            log.info("{worker} (pid {pid}) stopped: {status}",
                     worker=worker.name, pid=pid, status=status)
        elif not worker.everReady:
            log.critical("{worker} (pid {pid}) could not start ({status}): the broker stops",
                         worker=worker.name, pid=pid, status=status)
            self._abort()
        else:
            now = self._reactor.seconds()
            if readyAt is not None and now - readyAt >= self.stableAfter:
                worker.quickDeaths = 0
            delay = min(self.maxRestartDelay, self.restartDelay * 2 ** worker.quickDeaths)
            worker.quickDeaths += 1
            log.warn("{worker} (pid {pid}, node {node}) died: {status}; restarting in "
                     "{delay:.1f} s", worker=worker.name, pid=pid, node=nodeId,
                     status=status, delay=delay)
            worker.restartCall = self._reactor.callLater(delay, self._spawn, worker)
        ended.callback(None)

    def _abort(self):
        """
        Stop the broker, then exit with status 1 (twistd has no exit status
        of its own to set).
        """
        if self.failed:
            return
        self.failed = True
        self._reactor.addSystemEventTrigger("after", "shutdown", self._exit, 1)
        try:
            self._reactor.stop()
        except error.ReactorNotRunning:
            pass

    def _onHUP(self, signum, frame):
        self._reactor.callFromThread(self.reload)

    def reload(self):
        """
        Forward C{SIGHUP} to every ready worker (one still starting has not
        installed its handler yet, and would die of it).
        """
        ready = [w for w in self.workers if w.alive and w.readyAt is not None]
        log.info("SIGHUP: reloading {n} workers", n=len(ready))
        self.reloaded = True
        for worker in ready:
            self._signal(worker, "HUP")

    def _signal(self, worker, name):
        try:
            worker.process.transport.signalProcess(name)
        except (error.ProcessExitedAlready, AttributeError):
            pass

    def stopService(self):
        super().stopService()
        if self._previousHUP is not None:
            signal.signal(signal.SIGHUP, self._previousHUP)
            self._previousHUP = None
        self.stopping = True
        waiting = []
        for worker in self.workers:
            if worker.restartCall is not None and worker.restartCall.active():
                worker.restartCall.cancel()
            worker.restartCall = None
            if worker.alive:
                waiting.append(worker.ended)
                self._signal(worker, "TERM")
        if not waiting:
            return None

        def kill():
            for worker in self.workers:
                if worker.alive:
                    log.warn("{worker} (pid {pid}) still running after {t} s: SIGKILL",
                             worker=worker.name, pid=worker.pid, t=self.stopTimeout)
                    self._signal(worker, "KILL")
        killer = self._reactor.callLater(self.stopTimeout, kill)

        def done(result):
            if killer.active():
                killer.cancel()
            return None
        return defer.DeferredList(waiting).addBoth(done)

    def relay(self, worker, event):
        """
        Publish a worker's log event in this process, its system naming the
        worker.
        """
        levelName = getattr(event.get("log_level"), "name", "-")
        event["log_system"] = f"{worker.name} {event.get('log_namespace', '-')}#{levelName}"
        traceback = event.pop("workerTraceback", None)
        if isinstance(traceback, str):
            event["log_failure"] = Failure(WorkerTraceback(traceback))
        self.publisher(event)
        if event.get("workerReady"):
            self._ready(worker, event.get("nodeId"))

    def relayText(self, worker, stream, line, level):
        self.publisher({"log_level": level, "log_namespace": "broker.workers",
                        "log_system": f"{worker.name} {stream}", "log_format": "{line}",
                        "line": line, "log_time": self._reactor.seconds()})


class WorkerTraceback(Exception):
    """
    A failure logged in a worker, as its traceback text: what a relayed
    event's C{log_failure} holds (a L{Failure}'s frames do not survive the
    JSON between the processes).
    """

    def __str__(self):
        return "in the worker:\n" + self.args[0]


def _withTracebacks(observer):
    """
    Put the traceback text of an event's failure in C{workerTraceback}
    before C{observer} writes it as JSON, which keeps only the exception's
    type.
    """
    def observe(event):
        failure = event.get("log_failure")
        if failure is not None:
            try:
                text = failure.getTraceback()
            except Exception as e:
                text = f"(no traceback: {e!r})"
            event = dict(event, workerTraceback=text)
        observer(event)
    return observe


def _workerEnvironment():
    """
    This process's environment, with the directory holding this C{broker}
    package first on C{PYTHONPATH}, so C{python -m broker.worker} runs the
    same code (a source checkout as well as an installed package).
    """
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


class WorkerProcess(protocol.ProcessProtocol):
    """
    The supervisor's end of one worker incarnation: it writes the worker's
    spec (one JSON line) on the worker's stdin and keeps that pipe open
    (its end tells the worker the supervisor is gone), and relays what the
    worker writes: JSON log events on stdout, raw text on stderr.
    """

    def __init__(self, pool, worker, spec):
        self.pool = pool
        self.worker = worker
        self.spec = spec
        self._buffers = {1: b"", 2: b""}

    def connectionMade(self):
        self.transport.write(self.spec)

    def childDataReceived(self, fd, data):
        lines = (self._buffers.get(fd, b"") + data).split(b"\n")
        self._buffers[fd] = lines.pop()
        for line in lines:
            self._line(fd, line)

    def _line(self, fd, line):
        text = line.decode("utf-8", "replace")
        if fd == 1 and text.startswith("\x1e"):
            try:
                event = eventFromJSON(text[1:])
            except ValueError:
                event = None
            if isinstance(event, dict):
                self.pool.relay(self.worker, event)
                return
        if text.strip():
            self.pool.relayText(self.worker, "stdout" if fd == 1 else "stderr", text,
                                LogLevel.info if fd == 1 else LogLevel.error)

    def processEnded(self, reason):
        for fd, rest in sorted(self._buffers.items()):
            if rest:
                self._line(fd, rest)
        self._buffers = {}
        self.pool._ended(self.worker, reason)


# -- the worker -------------------------------------------------------------


@implementer(IReadDescriptor)
class SupervisorWatch:
    """
    Reads the worker's stdin, the supervisor's pipe: its end means the
    supervisor is gone (even by SIGKILL), and the worker then stops rather
    than serve on as an orphan.
    """

    def __init__(self, reactor, fd=0):
        self._reactor = reactor
        self._fd = fd
        self.gone = False
        fdesc.setNonBlocking(fd)

    def fileno(self):
        return self._fd

    def logPrefix(self):
        return "supervisor"

    def doRead(self):
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if data:
            return None
        self.gone = True
        return main.CONNECTION_DONE

    def connectionLost(self, reason):
        if not (self.gone or reason.check(error.ConnectionDone)):
            # ConnectionLost: the reactor is stopping and lets go of every
            # descriptor.  (A hang-up without data comes as ConnectionDone
            # without a doRead.)
            return
        log.warn("the supervisor is gone: stopping")
        _stop(self._reactor)


def _readSpec(fd):
    data = b""
    while b"\n" not in data:
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        data += chunk
    return json.loads(data.split(b"\n", 1)[0])


class WorkerCollector:
    """
    C{broker_worker_info{worker, node_id} 1} in C{/metrics}: which worker
    answered a scrape of the shared admin port.
    """

    def __init__(self, index, nodeId):
        self.index = index
        self.nodeId = nodeId

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        g = GaugeMetricFamily("broker_worker_info",
                              "This worker process (1): its index and cluster node id.",
                              labels=["worker", "node_id"])
        g.add_metric([str(self.index), self.nodeId], 1)
        yield g


def buildWorker(spec, reactor):
    """
    A worker's service tree from the spec its supervisor sent: the broker's
    (L{broker.tap.buildService}) over the inherited sockets, its own
    C{admin.worker_listen} listeners, and C{broker_worker_info}.

    @return: the tree, and the L{InheritedPorts}.
    """
    from broker.tap import ListenerService, buildService

    settings = spec["settings"]
    index = spec["index"]
    nodeId = f"{spec['nodeBase']}-w{index}-{os.getpid()}"
    settings["cluster"]["node_id"] = nodeId
    ports = InheritedPorts(reactor, spec["ports"])
    loadSettings = None
    path = spec.get("config")
    if path is not None:
        loadSettings = functools.partial(brokerconfig.load, path or None)
    top = buildService(settings, reactor, True, ports=ports, loadSettings=loadSettings)
    adminFactory = top.capped("admin.worker_listen", top.adminSite,
                              settings["admin"]["max_connections"])
    for j, description in enumerate(settings["admin"]["worker_listen"]):
        key = workerAdminKey(j, index)
        ListenerService(key, description, serverFromString(ports.reactorFor(key), description),
                        adminFactory, reactor).setServiceParent(top)
    top.registry.register(WorkerCollector(index, nodeId))
    top.nodeId = nodeId
    return top, ports


def _stop(reactor):
    try:
        reactor.stop()
    except error.ReactorNotRunning:
        pass


def _stopOnce(reactor):
    """
    Replace the reactor's SIGTERM and SIGINT handlers with ones that stop it
    once and ignore the signals after: a terminal's Ctrl-C reaches the whole
    process group and the supervisor forwards its own on top, and the
    reactor's handler would log a traceback for the second.  (A worker that
    hangs while stopping gets SIGKILL from the supervisor.)
    """
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        log.info("{signal}: stopping", signal=signal.Signals(signum).name)
        reactor.callFromThread(_stop, reactor)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def workerMain(argv, stdin=0):
    """
    C{python -m broker.worker w<i>}: run one worker until SIGTERM (or the
    supervisor's end).  Its log goes to stdout as JSON events, for the
    supervisor to relay.

    @return: the exit status.
    """
    # Until its Reloader takes SIGHUP over, a worker must not die of a
    # forwarded SIGHUP.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        spec = _readSpec(stdin)
    except (OSError, ValueError):
        spec = None
    if spec is None:
        sys.stderr.write("broker.worker: started by twistd broker (cluster.workers > 1), "
                         "not by hand\n")
        return 2
    from twisted.internet import reactor

    out = sys.stdout
    globalLogBeginner.beginLoggingTo([_withTracebacks(jsonFileLogObserver(out))],
                                     redirectStandardIO=True)
    try:
        top, ports = buildWorker(spec, reactor)
    except (ConfigError, OSError, ValueError) as e:
        log.critical("cannot start: {error}", error=str(e))
        return 1
    reactor.addReader(SupervisorWatch(reactor, stdin))
    try:
        top.privilegedStartService()
        top.startService()
    except SystemExit as e:
        # A listener that could not adopt its socket; it logged why.
        return e.code if isinstance(e.code, int) else 1
    for key in ports.unused():
        log.warn("{key}: inherited from the supervisor, but nothing here listens on it",
                 key=key)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)

    def running():
        _stopOnce(reactor)
        if spec.get("reload"):
            # Started after a SIGHUP: serve what the other workers reloaded.
            top.reloader.reload()
        log.info("ready: node {nodeId}, pid {pid}", nodeId=top.nodeId, pid=os.getpid(),
                 workerReady=True)
    reactor.callWhenRunning(running)
    reactor.run()
    return 0
