# -*- test-case-name: tests.test_tap -*-
"""
The broker's service tree: the core, then each face plugin
(L{broker.plugins.findFaces}) with its listeners and services, then the
admin listener.

Built by C{twistd broker} (L{broker.tap}) for a single process, and by each
worker process (L{broker.workers.worker}) over the sockets it inherited;
neither of those imports the other.
"""

import signal
import threading

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from prometheus_client.registry import CollectorRegistry

from broker.admin.collectors import registerCollectors
from broker.admin import build as adminface
from broker.cluster.build import ClusterService, buildCluster
from broker.config import ConfigError
from broker.core.router import Core
from broker.faces import FaceContext
from broker.listening import ListenerService
from broker.net.listeners import CappedFactory, Listeners, ListenersCollector
from broker.plugins import FacePluginError, findFaces
from broker.pollspin import PollSpinCollector, PollSpinService

# The namespace of the former broker/tap.py, which operators filter logs by.
log = Logger(namespace="broker.tap")


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


def buildService(settings, reactor, foreground=True, ports=None, loadSettings=None,
                 plugins=None):
    """
    The broker's service tree for validated C{settings}: the core, then
    each face plugin (L{broker.plugins.findFaces}, in their C{order}) with
    its listeners and services, then the admin listener.

    @param foreground: see L{ListenerService.foreground}.
    @param ports: C{None} to open every listener; in a worker process, the
        L{broker.workers.worker.InheritedPorts} whose C{reactorFor(key)} adopts the
        socket the supervisor opened for the listener C{key}.
    @param loadSettings: C{callable()} reading and validating the
        configuration again (on C{SIGHUP}; raising L{brokerconfig.ConfigError}),
        or C{None} when there is nothing to read again: reloads then keep
        C{settings}.
    @param plugins: the L{broker.plugins.FacePlugins} to build; by default
        those installed.
    @raise ConfigError: a face the settings configure is not installed here
        (a worker process must find the plugins its supervisor found), or
        a face refuses its settings.
    """
    if plugins is None:
        try:
            plugins = findFaces()
        except FacePluginError as e:
            raise ConfigError("", str(e))
    faces = [face for face in plugins.faces if face.name in settings]
    missing = sorted(set(settings) - {"broker", "admin", "cluster"} - set(plugins.names()))
    if missing:
        raise ConfigError(missing[0], f"configured, but no face plugin of that name is "
                                      f"installed here (installed: {plugins.describe()})")
    top = BrokerService()
    top.reactor = reactor
    top.drainTimeout = settings["broker"]["drain_timeout"]
    spin = None
    if settings["broker"]["poll_spin_us"]:
        spin = PollSpinService(reactor, settings["broker"]["poll_spin_us"] / 1e6)
        spin.setServiceParent(top)
    cluster = buildCluster(reactor, settings)
    engine = None
    if cluster is not None:
        # First in the tree (started first) and stopped last.
        top.clusterService = ClusterService(cluster)
        top.clusterService.setServiceParent(top)
        from broker.cluster.engine import RedisEngine
        engine = RedisEngine(cluster)
    # The fan-out chunk is a Web PubSub key for history's sake; the core is
    # every face's.
    fanoutChunk = settings.get("webpubsub", {}).get("fanout_chunk", 4096)
    core = Core(reactor, engine=engine, fanoutChunk=fanoutChunk)
    core.setServiceParent(top)
    top.cluster = cluster
    top.core = core
    registry = CollectorRegistry()
    registerCollectors(registry, core)
    if spin is not None:
        registry.register(PollSpinCollector(spin.pollSpin))
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
    for face in faces:
        face.build(context)
    top.adminSite = adminface.build(context, listen, listeners)
    reloader.setServiceParent(top)
    return top
