# -*- test-case-name: tests.test_workers -*-
"""
The supervisor's worker processes: spawning them (with the inherited
sockets and a JSON spec on stdin), restarting those that die, forwarding
signals, and relaying their log events into the supervisor's log.
"""

import json
import os
import signal
import socket
import sys
import threading

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import LogLevel, Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

# The namespace of the former broker/workers.py, which operators filter logs by.
log = Logger(namespace="broker.workers")


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


def _workerEnvironment():
    """
    This process's environment, with the directory holding this C{broker}
    package first on C{PYTHONPATH}, so C{python -m broker.worker} runs the
    same code (a source checkout as well as an installed package), then
    every other directory this process found C{twisted/plugins/} in, so
    the workers find the face plugins the supervisor found (a worker
    missing one refuses to start, naming it: L{broker.service.buildService}).
    """
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [here] + _pluginRoots() + [env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    return env


def _pluginRoots():
    """
    The C{sys.path} entries holding the C{twisted/plugins/} directories of
    this process, but those a fresh interpreter has anyway (site-packages:
    put first on C{PYTHONPATH}, they could shadow the standard library).
    """
    import site

    import twisted.plugins

    standard = set(site.getsitepackages() + [site.getusersitepackages()])
    roots = []
    for directory in twisted.plugins.__path__:
        # Twisted lists twisted/plugins under every sys.path entry, there or not.
        if not os.path.isdir(directory):
            continue
        root = os.path.dirname(os.path.dirname(os.path.abspath(directory)))
        if root not in standard:
            roots.append(root)
    return roots


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
