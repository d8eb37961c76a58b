# -*- test-case-name: tests.test_workers -*-
"""
One worker process (C{python -m broker.worker}): it reads its spec from
the supervisor, adopts the inherited sockets (L{Adopter},
L{InheritedPorts}), builds a whole broker over them
(L{broker.service.buildService}), writes its log as JSON events for the
supervisor to relay, and stops when the supervisor goes.
"""

import functools
import json
import os
import signal
import sys

from twisted.internet import error, fdesc, main
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from broker import config as brokerconfig
from broker.config import ConfigError
from broker.listening import ListenerService
from broker.service import buildService
from broker.workers.shared import Unshareable, workerAdminKey

# The namespace of the former broker/workers.py, which operators filter logs by.
log = Logger(namespace="broker.workers")


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
            raise Unshareable(f"{self.key} was adopted already")
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
    L{broker.service.buildService} as C{ports}.
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
    (L{broker.service.buildService}) over the inherited sockets, its own
    C{admin.worker_listen} listeners, and C{broker_worker_info}.

    @return: the tree, and the L{InheritedPorts}.
    """
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
