# -*- test-case-name: tests.test_core -*-
"""
The routing core as a service: the hubs of one node, the engine every publish
goes through, and the fan-out scheduler that writes deliveries.
"""

from twisted.application import service
from twisted.logger import Logger

from broker.core.engine import MemoryEngine
from broker.core.errors import BadRequest, CloseCode
from broker.core.fanout import Fanout
from broker.core.health import HealthNotes
from broker.core.hub import Hub
from broker.core.session import HubStats
from broker.core.interfaces import IEngine
from broker.core.limits import LimitCounters, QuietLog
from broker.core.directwrite import WriteBatch
from broker.core.memory import MemoryReleaser
from broker.logs import RefusalLog

log = Logger()


class Core(service.Service):
    """
    @ivar engine: the L{IEngine} every publish goes through.
    @ivar hubs: C{{name: Hub}}; hubs are created on first use.
    """

    name = "core"

    def __init__(self, reactor, engine=None, fanoutChunk=4096):
        self.reactor = reactor
        self.engine = IEngine(engine) if engine is not None else MemoryEngine()
        self.fanout = Fanout(reactor, fanoutChunk)
        self.hubs = {}
        # Hubs a face knows of before their first use (declareHubs).
        self.declaredHubs = set()
        self._hubSetup = []
        self.rejectedElsewhere = 0
        # True once the broker is stopping: /healthz answers 503 so load
        # balancers stop sending new clients.
        self.draining = False
        # What the faces' limits refused (/metrics), and their quiet log.
        self.limits = LimitCounters()
        self.quietLog = QuietLog(reactor.seconds)
        self.health = HealthNotes()
        # Refused handshakes of every face: counted, logged once a minute
        # per address (broker/logs.py).
        self.refusals = RefusalLog(reactor.seconds)
        # Gives freed memory back to the system after a hub shrank.
        self.memory = MemoryReleaser(reactor)
        # Deliveries kept within a reactor turn, sent at its end (directwrite).
        self.writeBatch = WriteBatch(reactor)
        self._filterCompiler = None
        self._filters = {}
        self.engine.attach(self)

    def onNewHub(self, setup):
        """
        Call C{setup(hub)} for every hub, existing and future: how faces
        attach upstreams and observers without the core importing them.
        """
        self._hubSetup.append(setup)
        for hub in list(self.hubs.values()):
            setup(hub)

    def hub(self, name):
        hub = self.hubs.get(name)
        if hub is None:
            hub = self.hubs[name] = Hub(name, self)
            for setup in self._hubSetup:
                setup(hub)
        return hub

    def existingHub(self, name):
        """
        The hub called C{name} if it exists, else C{None}: for readers (the
        admin API, the faces' views) that must not create hubs.
        """
        return self.hubs.get(name)

    def declareHubs(self, names):
        """
        Name hubs a face knows of before their first use (configured hubs,
        IoT fleets): L{stats} (and so C{/metrics}) reports them with zeros
        from the start, so their series exist before the first connection.
        They are not created: a hub is still made on first use.
        """
        self.declaredHubs.update(names)

    def hubLabel(self, hubName):
        """
        C{hubName} if that hub exists, else C{""}: the hub label of a
        counter about a client not admitted, which must not let it choose
        labels without bound.
        """
        return hubName if hubName in self.hubs else ""

    def countRejected(self, hubName):
        """
        Count a refused client against C{hubName} if that hub exists, else in
        L{rejectedElsewhere}; refusals never create hubs.
        """
        hub = self.hubs.get(hubName)
        if hub is None:
            self.rejectedElsewhere += 1
        else:
            hub.stats.connectionsRejected += 1

    def publish(self, hubName, target, delivery):
        return self.engine.publish(hubName, target, delivery)

    def deliverLocal(self, hubName, target, delivery):
        """
        Fan C{delivery} out to C{target}'s receivers on this node (the
        engine's entry point); an unknown hub is ignored, never created.
        """
        hub = self.hubs.get(hubName)
        if hub is None:
            return
        self.fanout.deliver(hub.receivers(target), delivery, hub.stats)

    def applyCommand(self, hubName, command):
        """
        Carry out a server command on this node's sessions (the engine's
        entry point for L{Hub}'s cluster-wide verbs); see L{Hub.apply}.
        """
        hub = self.hubs.get(hubName)
        if hub is None:
            return
        try:
            hub.apply(command)
        except Exception:
            log.failure("server command {command!r} on hub {hub} failed",
                        command=command, hub=hubName)

    # -- session filters --------------------------------------------------

    def setFilterCompiler(self, compiler):
        """
        C{compiler(text)} returns a predicate on a L{Session}, or raises
        L{broker.core.errors.BadRequest}: how L{Target.filter} texts are
        understood (Web PubSub's OData filter; the core never imports it).
        """
        self._filterCompiler = compiler
        self._filters.clear()

    def sessionFilter(self, text):
        """
        The compiled predicate for C{text}, cached (a fan-out to many
        nodes compiles it once per node, not once per receiver).
        """
        predicate = self._filters.get(text)
        if predicate is None:
            if self._filterCompiler is None:
                raise BadRequest("this broker has no session filter language")
            predicate = self._filterCompiler(text)
            if len(self._filters) >= 256:
                self._filters.clear()
            self._filters[text] = predicate
        return predicate

    def goingAway(self):
        """
        Close every session with "going away" so clients reconnect elsewhere.
        """
        for hub in self.hubs.values():
            hub.closeConnections(hub.sessions(), CloseCode.GOING_AWAY, "broker shutting down")

    def stopService(self):
        super().stopService()
        self.fanout.stop()
        self.writeBatch.stop()
        self.memory.stop()
        self.goingAway()

    # -- figures ----------------------------------------------------------

    def stats(self):
        """
        A JSON-ready snapshot: totals and per hub.
        """
        fields = ("connections", "groups", "users") + HubStats.__slots__
        total = dict.fromkeys(fields, 0)
        hubs = {}
        for name in sorted(self.declaredHubs.union(self.hubs)):
            hub = self.hubs.get(name)
            if hub is None:
                # Declared, not used yet: its series at zero.
                hubs[name] = dict.fromkeys(fields, 0)
                continue
            # Every HubStats counter is reported; a new one needs no edit here.
            h = {k: getattr(hub.stats, k) for k in HubStats.__slots__}
            h.update(connections=hub.connectionCount, groups=hub.groupCount,
                     users=hub.userCount)
            hubs[name] = h
            for k in fields:
                total[k] += h[k]
        total["connectionsRejected"] += self.rejectedElsewhere
        total["hubs"] = hubs
        total["fanoutPending"] = self.fanout.pending
        total["engineHealthy"] = bool(self.engine.healthy())
        total["cluster"] = self.engine.stats()
        return total
