# -*- test-case-name: tests.test_tap -*-
"""
C{twistd broker}: options and the service tree.

C{makeService} returns a L{MultiService}: the core first, then one listening
service per configured listener, each named after its configuration key so a
listener that cannot start is reported by key.
"""

import os
import signal
import sys
import threading

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger
from twisted.python import usage
from prometheus_client.registry import CollectorRegistry

from broker import config as brokerconfig
from broker.admin import build as adminface
from broker.cluster.build import ClusterService, buildCluster
from broker.core.router import Core
from broker.faces import FACES, FaceContext, faceModule
from broker.net.listeners import CappedFactory, Listeners, ListenersCollector
from broker.webpubsub.face import ACCESS_KEY_FILE, developmentKey  # noqa: F401 (re-exported)

log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("Run the broker. With no --config, the embedded default "
                "etc/broker.toml is used (every face on loopback ports).")
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: the embedded etc/broker.toml)."],
    ]

    def postOptions(self):
        # Absolute: a daemon changes directory, and SIGHUP reads it again.
        if self["config"] is not None:
            self["config"] = os.path.abspath(self["config"])
        try:
            self["settings"] = brokerconfig.load(self["config"])
        except brokerconfig.ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}")


class ListenerService(StreamServerEndpointService):
    """
    Listens on one configured endpoint, and is named after its configuration
    key (C{webpubsub.listen[0]}) so that logs and failures say which one.

    A broker running without one of its configured listeners is worse than
    one that does not run: clients and health checks would find half a
    service.  So a failure to listen is logged as one line naming the key
    and the process exits with status 1.  Left to itself, twistd would print
    a traceback for an endpoint that fails while starting, and merely log
    one that fails later (an endpoint that listens asynchronously) and run on.

    @ivar foreground: how a failure while starting leaves.  In the
        foreground (C{twistd -n}) by L{SystemExit}: the logged line is all
        the operator sees.  A daemonizing twistd must get an exception
        instead: it reports that to its waiting parent process, which
        would otherwise wait for ever.
    """

    # How the process leaves after a late failure; a test replaces it.
    _exit = staticmethod(os._exit)

    def __init__(self, key, description, endpoint, factory, reactor, foreground=True):
        super().__init__(endpoint, factory)
        self.key = key
        self.description = description
        self.setName(key)
        self.foreground = foreground
        self._reactor = reactor
        self._starting = False
        self.failure = None

    def privilegedStartService(self):
        service.Service.privilegedStartService(self)
        self._starting = True
        self._waitingForPort = self.endpoint.listen(self.factory)
        self._waitingForPort.addCallbacks(self._listening, self._cannotListen)
        self._starting = False
        if self.failure is not None:
            # twistd is still starting: leaving here stops it before the
            # reactor runs.
            if self.foreground:
                raise SystemExit(1)
            raise ListenError(self.failure)

    def _listening(self, port):
        log.info("{key} listening on {address}", key=self.key, address=_address(port.getHost()))
        return port

    def _cannotListen(self, failure):
        if failure.check(CancelledError):
            # stopService() before the endpoint was listening.
            return None
        reason = " ".join(str(failure.value).split())
        self.failure = f"{self.key}: cannot listen on {self.description!r}: {reason}"
        log.critical("{problem}", problem=self.failure)
        if not self._starting:
            self._abort()
        return None

    def _abort(self):
        """
        Stop the running broker after a late listening failure, then exit
        with status 1: twistd offers no exit status of its own to set.
        """
        self._reactor.addSystemEventTrigger("after", "shutdown", self._exit, 1)
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass


class ListenError(Exception):
    """
    A configured listener could not be opened; C{str(error)} names its key.
    """


def _address(address):
    """
    C{host:port} for an IP address, the path for a UNIX socket.
    """
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    return os.fsdecode(name) if name is not None else str(address)


class Reloader(service.Service):
    """
    Runs the faces' reload hooks on C{SIGHUP} (rules, keys, the Web PubSub
    settings), in the reactor thread.  The handler is installed while the
    service runs, whatever faces are enabled (even with no hook at all):
    the signal's default action would end the broker and drop every
    client.  The previous handler is put back when it stops.
    """

    name = "reloader"

    def __init__(self, reactor):
        self._reactor = reactor
        self.hooks = []
        self._previous = None

    def startService(self):
        super().startService()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGHUP, self._onSignal)

    def stopService(self):
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        return super().stopService()

    def _onSignal(self, signum, frame):
        self._reactor.callFromThread(self.reload)

    def reload(self):
        log.info("SIGHUP: reloading")
        for hook in self.hooks:
            try:
                hook()
            except Exception:
                log.failure("reload hook {hook!r} failed; its previous state stays", hook=hook)


class BrokerService(service.MultiService):
    """
    The broker's service tree.

    Stopping (C{SIGTERM}) drains first: the faces' listeners stop accepting
    (the admin listener stays, its C{/healthz} answering 503 "draining"),
    each face's drain hook tells its sessions the broker is closing (their
    protocol's close frame or code) and answers what it holds, the core
    closes every session of every hub with 1001, and the broker waits until
    the faces' connections have gone or C{broker.drain_timeout} has passed.
    Then the services stop as in a L{MultiService}: whatever is left is cut.

    In cluster mode the Redis link and the node stop last, once every face
    and the core have stopped, so that their last writes (a session's
    removal, a peer's sync point) still reach Redis.
    """

    clusterService = None
    core = None
    reactor = None
    drainTimeout = 10.0

    def __init__(self):
        super().__init__()
        self.drainHooks = []

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        yield self._drain()
        others = [s for s in reversed(list(self))
                  if s is not self.clusterService and s.running]
        yield defer.DeferredList([defer.maybeDeferred(s.stopService) for s in others])
        if self.clusterService is not None:
            yield self.clusterService.stopService()

    @defer.inlineCallbacks
    def _drain(self):
        if self.core is None:
            return
        self.core.draining = True
        listeners = [s for s in self if isinstance(s, ListenerService) and s.running
                     and not s.key.startswith("admin.")]
        yield defer.DeferredList([defer.maybeDeferred(s.stopService) for s in listeners])
        if not self.drainHooks or not self.drainTimeout:
            return
        waits = []
        for hook in self.drainHooks:
            d = defer.maybeDeferred(hook)
            d.addErrback(_drainFailed)
            waits.append(d)
        # Sessions of every hub (Web PubSub, peer groups) are told 1001.
        self.core.goingAway()
        started = self.reactor.seconds()
        done = defer.DeferredList(waits)
        late = []

        def deadline():
            late.append(True)
            done.cancel()
        timer = self.reactor.callLater(self.drainTimeout, deadline)
        yield done
        if late:
            log.warn("drain: sessions still open after {t:g} s; closing them",
                     t=self.drainTimeout)
        else:
            timer.cancel()
            log.info("drained in {t:.3f} s", t=self.reactor.seconds() - started)


def _drainFailed(failure):
    if not failure.check(CancelledError):
        log.failure("drain hook failed", failure)


def buildService(settings, reactor, foreground=True, ports=None, loadSettings=None):
    """
    The broker's service tree for validated C{settings}: the core, then
    each face (L{broker.faces.FACES}) with its listeners and services, then
    the admin listener.

    @param foreground: see L{ListenerService.foreground}.
    @param ports: C{None} to open every listener; in a worker process, the
        L{broker.workers.InheritedPorts} whose C{reactorFor(key)} adopts the
        socket the supervisor opened for the listener C{key}.
    @param loadSettings: C{callable()} reading and validating the
        configuration again (on C{SIGHUP}; raising L{brokerconfig.ConfigError}),
        or C{None} when there is nothing to read again: reloads then keep
        C{settings}.
    """
    top = BrokerService()
    top.reactor = reactor
    top.drainTimeout = settings["broker"]["drain_timeout"]
    cluster = buildCluster(reactor, settings)
    engine = None
    if cluster is not None:
        # First in the tree (started first) and stopped last.
        top.clusterService = ClusterService(cluster)
        top.clusterService.setServiceParent(top)
        from broker.cluster.engine import RedisEngine
        engine = RedisEngine(cluster)
    core = Core(reactor, engine=engine, fanoutChunk=settings["webpubsub"]["fanout_chunk"])
    core.setServiceParent(top)
    top.cluster = cluster
    top.core = core
    registry = CollectorRegistry()
    reloader = Reloader(reactor)
    top.reloader = reloader
    top.registry = registry
    listeners = Listeners(reactor)
    registry.register(ListenersCollector(listeners))
    top.listeners = listeners

    def listeningReactor(key):
        return reactor if ports is None else ports.reactorFor(key)

    def capped(key, factory, maxConnections):
        """
        C{factory} behind the listener C{key}'s cap (every endpoint of the
        key shares it), or C{factory} itself without one.
        """
        if maxConnections is None:
            return factory
        return CappedFactory(factory, listeners.get(key), maxConnections)

    def listen(key, descriptions, factory, maxConnections=None):
        factory = capped(key, factory, maxConnections)
        for i, desc in enumerate(descriptions):
            name = f"{key}[{i}]"
            endpoint = serverFromString(listeningReactor(name), desc)
            ListenerService(name, desc, endpoint, factory, reactor,
                            foreground).setServiceParent(top)

    top.capped = capped
    context = FaceContext(reactor, core, settings, top, registry, listen, reloader, cluster,
                          listeningReactor, listeners, top.drainHooks, loadSettings)
    for name in FACES:
        faceModule(name).build(context)
    top.adminSite = adminface.build(context, listen, listeners)
    reloader.setServiceParent(top)
    return top


def makeService(options):
    from twisted.internet import reactor

    # options.parent is twistd's own options (None when called otherwise).
    twistd = options.parent
    foreground = twistd is None or bool(twistd.get("nodaemon"))
    settings = options["settings"]
    path = options["config"]
    if threading.current_thread() is threading.main_thread():
        # Until the Reloader (or a supervisor's WorkerPool) takes SIGHUP
        # over, the signal must not end the starting broker.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        if settings["cluster"]["workers"] > 1:
            from broker.workers import makeSupervisor
            return makeSupervisor(settings, reactor, foreground, configPath=path or "")
        return buildService(settings, reactor, foreground,
                            loadSettings=lambda: brokerconfig.load(path))
    except (brokerconfig.ConfigError, OSError, ValueError) as e:
        sys.stderr.write(f"broker: cannot start: {e}\n")
        raise SystemExit(1)
