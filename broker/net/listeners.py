# -*- test-case-name: tests.test_http_bounds -*-
"""
Per-listener bookkeeping shared by every face: the open connections of a
listener, a cap on them, and the refusals its HTTP site or the cap made,
counted for C{/metrics} and logged at most once a minute per listener and
reason (a flood of refusals must not become a flood of log lines).

A listener here is one configuration key (C{webpubsub.listen}): all the
endpoints of that key share its counters and its cap.
"""

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from broker.core.limits import QuietLog


class ListenerStats:
    """
    The counters of one listener.

    @ivar name: the listener's configuration key, its C{listener} label.
    @ivar connections: connections open now (kept by L{CappedFactory}).
    @ivar refused: C{(kind, reason) -> n}; C{kind} is C{"http"} (a request
        refused by the site) or C{"connection"} (refused by the cap).
    """

    def __init__(self, name, clock):
        self.name = name
        self.connections = 0
        self.refused = {}
        self._log = QuietLog(clock.seconds)

    def refuse(self, kind, reason, why=""):
        """
        Count one refusal, and log it at most once a minute per kind and
        reason (the line then says how many were not logged since).
        """
        key = (kind, reason)
        self.refused[key] = self.refused.get(key, 0) + 1
        self._log.info(key, "{listener}: refused a {kind} ({reason}{why}); counted on /metrics",
                       listener=self.name, kind="request" if kind == "http" else "connection",
                       reason=reason, why=f": {why}" if why else "")

    def count(self, kind, reason):
        return self.refused.get((kind, reason), 0)


class Listeners:
    """
    The L{ListenerStats} of every listener of a broker, by key.
    """

    def __init__(self, clock):
        self._clock = clock
        self.byName = {}

    def get(self, name):
        stats = self.byName.get(name)
        if stats is None:
            stats = self.byName[name] = ListenerStats(name, self._clock)
        return stats


class ListenersCollector:
    """
    Prometheus: C{broker_http_refused_total{listener, reason}},
    C{broker_connections_refused_total{listener, reason}} and the gauge
    C{broker_listener_connections{listener}}.  Labels are bounded: listener
    keys and a fixed set of reasons.
    """

    def __init__(self, listeners):
        self.listeners = listeners

    def collect(self):
        http = CounterMetricFamily("broker_http_refused",
                                   "HTTP requests and connections refused by a listener's "
                                   "bounds, by reason.", labels=["listener", "reason"])
        conns = CounterMetricFamily("broker_connections_refused",
                                    "Connections refused at accept, by reason.",
                                    labels=["listener", "reason"])
        open_ = GaugeMetricFamily("broker_listener_connections",
                                  "Connections open on a listener.", labels=["listener"])
        for name, stats in sorted(self.listeners.byName.items()):
            open_.add_metric([name], stats.connections)
            for (kind, reason), n in sorted(stats.refused.items()):
                (http if kind == "http" else conns).add_metric([name, reason], n)
        yield http
        yield conns
        yield open_


class _Refuse(Protocol):
    """
    Accepted only to be closed at once: the listener is full.
    """

    def connectionMade(self):
        self.transport.abortConnection()


class _Counted(ProtocolWrapper):
    """
    A connection counted against its listener's cap.  Everything else is
    the wrapped protocol's (a WebSocket upgrade replaces C{wrappedProtocol}
    and stays counted).
    """


class CappedFactory(WrappingFactory):
    """
    Wraps a listener's factory so that at most C{maxConnections}
    connections are open at once: one more is accepted and closed at once
    (reset), counted as C{max_connections}.  One instance serves every
    endpoint of a listener key, so the cap is the key's total.

    @param stats: the listener's L{ListenerStats}.
    """

    protocol = _Counted

    def __init__(self, wrappedFactory, stats, maxConnections):
        super().__init__(wrappedFactory)
        self.stats = stats
        self.maxConnections = maxConnections

    def logPrefix(self):
        return self.stats.name

    def buildProtocol(self, addr):
        if len(self.protocols) >= self.maxConnections:
            self.stats.refuse("connection", "max_connections",
                              f"{self.maxConnections} connections open")
            return _Refuse()
        return super().buildProtocol(addr)

    def registerProtocol(self, p):
        super().registerProtocol(p)
        self.stats.connections = len(self.protocols)

    def unregisterProtocol(self, p):
        super().unregisterProtocol(p)
        self.stats.connections = len(self.protocols)
