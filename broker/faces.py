# -*- test-case-name: tests.test_tap -*-
"""
The faces the broker serves, and what a face is given to build itself.

Each face is a package C{broker.<name>} with two modules:

  - C{settings}: C{SECTION}, the L{broker.config.Table} of its
    configuration section C{[<name>]};
  - C{face}: C{build(context)}, which reads C{context.settings[<name>]} and
    adds the face's listeners and services through the L{FaceContext}.

So a face's keys and wiring live beside its code, and neither
L{broker.config} nor L{broker.tap} changes when a face grows.
"""

import importlib

# In start-up order; listeners appear in the service tree in this order.
FACES = ("webpubsub", "ecdn", "iot", "peergroups", "mqtt")


def settingsModule(name):
    return importlib.import_module(f"broker.{name}.settings")


def faceModule(name):
    return importlib.import_module(f"broker.{name}.face")


class FaceContext:
    """
    What L{broker.tap.buildService} lends each face while building.

    @ivar reactor: the reactor every face must use (never the global one).
    @ivar core: the routing core (L{broker.core.router.Core}).
    @ivar settings: the whole validated configuration.
    @ivar stateDir: C{broker.state_dir}, for stores and generated keys.
    @ivar registry: the Prometheus registry served by the admin C{/metrics}.
    @ivar cluster: C{None} on a single node; in cluster mode the
        L{broker.cluster.node.Cluster} (node id, node-to-node messages,
        liveness hooks, and C{cluster.redis} for the face's shared stores).
    @ivar listeners: the L{broker.net.listeners.Listeners} of the broker:
        C{listeners.get(key)} is where a listener's refusals count (give it
        to the listener's L{broker.net.http.BoundedSite}).
    """

    def __init__(self, reactor, core, settings, top, registry, listen, reloader,
                 cluster=None, listeningReactor=None, listeners=None, drainHooks=None,
                 loadSettings=None):
        self._loadSettings = loadSettings
        self.reactor = reactor
        self._listeningReactor = listeningReactor
        self.core = core
        self.cluster = cluster
        self.settings = settings
        self.stateDir = settings["broker"]["state_dir"]
        self.registry = registry
        self._top = top
        self._listen = listen
        self._reloader = reloader
        self._drainHooks = drainHooks if drainHooks is not None else []
        if listeners is None:
            from broker.net.listeners import Listeners
            listeners = Listeners(reactor)
        self.listeners = listeners

    def listen(self, key, descriptions, factory, maxConnections=None):
        """
        Listen with C{factory} on each Twisted endpoint string in
        C{descriptions}; the I{n}th is named C{"{key}[n]"} (e.g.
        C{ecdn.listen[0]}) in logs and failures.

        @param maxConnections: the cap on connections open at once on all
            of them together (L{broker.net.listeners.CappedFactory}); every
            face gives its C{max_connections}.
        """
        self._listen(key, descriptions, factory, maxConnections)

    def listeningReactor(self, key):
        """
        What a listener opened without L{listen} (C{iot.udp}) listens with:
        the reactor, or in a worker process (C{cluster.workers} > 1) one
        whose C{listenUDP} adopts the socket the supervisor opened for
        C{key}.
        """
        if self._listeningReactor is None:
            return self.reactor
        return self._listeningReactor(key)

    def addService(self, svc):
        """
        Run C{svc} (a store, a UDP listener, a timer) with the broker: it is
        started after the core and stopped before it.
        """
        svc.setServiceParent(self._top)

    def onDrain(self, hook):
        """
        Call C{hook()} when the broker starts stopping (C{SIGTERM}), once the
        faces' listeners no longer accept: it tells the face's sessions the
        broker is closing (their protocol's close frame or code), answers
        what the face holds (503 for a held request), and returns a Deferred
        firing once the face's connections have gone.  The broker waits at
        most C{broker.drain_timeout} for every hook before it stops the
        faces, which cut whatever is left.
        """
        self._drainHooks.append(hook)

    def onReload(self, hook):
        """
        Call C{hook()} on C{SIGHUP}.  A hook that raises keeps its previous
        state; the failure is logged and the other hooks still run.
        """
        self._reloader.hooks.append(hook)

    def loadSettings(self):
        """
        Read and validate the configuration the broker was started with
        again (its C{--config} file, or the embedded default): what a
        reload hook applies.  Without a file to read (a service built in a
        test), the running settings.

        @raise broker.config.ConfigError: the file no longer validates; the
            message names the key.
        """
        if self._loadSettings is None:
            return self.settings
        return self._loadSettings()
