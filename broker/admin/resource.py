# -*- test-case-name: tests.test_admin -*-
"""
Admin HTTP endpoints, on a listener of their own so they can stay on a
private interface:

  - C{/healthz}: 200 C{ok} while the engine accepts publishes, else 503;
    the faces' health notes (L{broker.core.health}) follow, one
    C{warning:} line each; the C{X-Broker-Version} header, and with
    C{?verbose} the versions (L{broker.version}) as C{name: value} lines;
  - C{/stats}: a JSON snapshot (totals and per hub, and each face's
    section);
  - C{/metrics}: the same figures in Prometheus text format;
  - C{/}: the console (L{broker.admin.console}) over the JSON API under
    C{/api} (L{broker.admin.api}), both behind the admin token
    (L{broker.admin.auth}), as the probes are with C{admin.protect_probes}.

The core keeps plain integer counters; the Prometheus collector reads them
at scrape time, so the hot path never pays for a metrics library.
"""

import json
import secrets
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry
from twisted.web.resource import Resource

from broker import version
from broker.admin.api import MAX_BODY, AdminAPI
from broker.admin.auth import Guard
from broker.admin.console import AdminRoot, loadFiles
from broker.admin.rates import RateSampler
from broker.net.http import NO_BODY, BoundedSite, Routes


class CoreCollector:
    """
    A Prometheus collector over L{broker.core.router.Core.stats}.
    """

    _GAUGES = (
        ("connections", "broker_connections", "Open client connections."),
        ("groups", "broker_groups", "Groups with at least one member."),
        ("users", "broker_users", "Users with at least one connection."),
    )
    _COUNTERS = (
        ("messagesIn", "broker_messages_in", "Messages received from clients."),
        ("messagesOut", "broker_messages_out", "Messages delivered to connections."),
        ("slowConsumerDrops", "broker_slow_consumer_drops",
         "Connections closed because their output buffer overflowed."),
        ("connectionsAccepted", "broker_connections_accepted", "Connections admitted."),
        ("connectionsRejected", "broker_connections_rejected", "Handshakes refused."),
        ("publishersThrottled", "broker_publishers_throttled",
         "Times a publisher stopped being read while the fan-out backlog drained."),
    )

    _CLUSTER = (
        ("publishesSent", "broker_cluster_publishes_sent", "Publishes sent to the other nodes."),
        ("publishesReceived", "broker_cluster_publishes_received",
         "Publishes received from other nodes."),
        ("publishesLocalOnly", "broker_cluster_publishes_local_only",
         "Publishes delivered on this node only, because Redis was unreachable."),
        ("badMessages", "broker_cluster_bad_messages", "Malformed bus messages dropped."),
        ("reapedConnections", "broker_cluster_reaped_connections",
         "Connections of dead nodes removed from the directory by this node."),
        ("nodesReaped", "broker_cluster_nodes_reaped", "Dead nodes reaped by this node."),
    )

    def __init__(self, core):
        self._core = core

    def collect(self):
        stats = self._core.stats()
        for key, name, doc in self._GAUGES:
            g = GaugeMetricFamily(name, doc, labels=["hub"])
            for hub, h in stats["hubs"].items():
                g.add_metric([hub], h[key])
            yield g
        for key, name, doc in self._COUNTERS:
            c = CounterMetricFamily(name, doc, labels=["hub"])
            for hub, h in stats["hubs"].items():
                c.add_metric([hub], h[key])
            yield c
        yield GaugeMetricFamily("broker_fanout_pending", "Fan-out jobs waiting for a reactor turn.",
                                value=stats["fanoutPending"])
        yield GaugeMetricFamily("broker_engine_healthy", "1 when the engine accepts publishes.",
                                value=1 if stats["engineHealthy"] else 0)
        yield from self._limits()
        cluster = stats["cluster"]
        if cluster:
            yield GaugeMetricFamily("broker_cluster_redis_connected",
                                    "1 while this node's link to Redis is up.",
                                    value=1 if cluster["redisConnected"] else 0)
            for key, name, doc in self._CLUSTER:
                yield CounterMetricFamily(name, doc, value=cluster[key])


    _LIMITS = (
        ("admissionRefused", "broker_admission_refused", "reason",
         "Connections refused by an admission limit (per node)."),
        ("rateLimited", "broker_rate_limited", "action",
         "Inbound frames dropped, and connections closed, over their rate limit."),
        ("groupRefused", "broker_group_limit_refused", "reason",
         "Group joins refused or skipped over a group limit."),
    )

    def _limits(self):
        """
        What the faces' limits refused (L{broker.core.limits.LimitCounters}).
        """
        limits = self._core.limits
        for attr, name, label, doc in self._LIMITS:
            c = CounterMetricFamily(name, doc, labels=["face", "hub", label])
            for (face, hub, why), n in sorted(getattr(limits, attr).items()):
                c.add_metric([face, hub, why], n)
            yield c


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, core):
        super().__init__()
        self.core = core


class Healthz(_Leaf):
    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        versions = version.versions()
        request.setHeader(b"x-broker-version", versions["broker"].encode("ascii", "replace"))
        body = self._health(request)
        if b"verbose" in parse_qs(request.uri.partition(b"?")[2], keep_blank_values=True):
            # Extra lines only when asked: probes and scripts compare the
            # plain answer with b"ok\n".
            body += "".join(f"{k}: {v}\n" for k, v in versions.items()).encode("utf-8")
        return body

    def _health(self, request):
        if self.core.draining:
            request.setResponseCode(503)
            return b"draining: the broker is stopping\n"
        if self.core.running and self.core.engine.healthy():
            # Problems a face noted (broker/core/health.py) that leave the
            # broker serving: still 200, each on a line of its own.
            notes = getattr(self.core, "health", None)
            lines = ["ok"] + [f"warning: {n}" for n in (notes.notes() if notes else ())]
            return ("\n".join(lines) + "\n").encode("utf-8")
        request.setResponseCode(503)
        if self.core.running and self.core.stats()["cluster"]:
            return b"unhealthy: the cluster (Redis) is unreachable\n"
        return b"unhealthy\n"


class Stats(_Leaf):
    """
    The core's figures (the Web PubSub keys, unchanged), plus one section
    per face view (C{iot}, C{peergroups}, C{ecdn}, ...).
    """

    def __init__(self, core, views=None):
        super().__init__(core)
        self.views = views if views is not None else {}

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        stats = self.core.stats()
        for name, view in self.views.items():
            stats[name] = view.summary()
        return json.dumps(stats, sort_keys=True).encode("utf-8") + b"\n"


class Guarded(Resource):
    """
    A resource answered only with the admin token (L{broker.admin.auth.Guard}).
    """

    isLeaf = True

    def __init__(self, resource, guard):
        super().__init__()
        self.resource = resource
        self.guard = guard

    def render(self, request):
        if not self.guard.allows(request):
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"unauthorized: the admin token is required (Authorization: Bearer)\n"
        return self.resource.render(request)


class Metrics(_Leaf):
    def __init__(self, core, registry):
        super().__init__(core)
        self.registry = registry

    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


class AdminSite(BoundedSite):
    """
    The admin listener's site: the console polls its API every two
    seconds, so its successful reads write no access-log line; its actions
    and refusals still do (the actions are also logged by the API).
    """

    def log(self, request):
        if (request.method in (b"GET", b"HEAD") and request.path.startswith(b"/api/")
                and request.code < 400):
            return
        super().log(request)


def makeAdminSite(core, registry=None, headerTimeout=10.0, idleTimeout=60.0, stats=None,
                  guard=None, views=None, rates=None, protectProbes=False, cluster=None):
    """
    @param registry: a Prometheus registry other faces add collectors to; a
        new one by default, holding the core's collector.
    @param stats: the listener's L{broker.net.listeners.ListenerStats}.
    @param guard: the L{broker.admin.auth.Guard} of the admin token; by
        default one over a random token nobody knows (the API is shut).
    @param views: C{{name: IFaceView}}: the faces' sections of C{/stats}
        and their parts of the API.
    @param rates: the L{broker.admin.rates.RateSampler} of the charts.
    @param protectProbes: require the token on C{/healthz}, C{/stats} and
        C{/metrics} too.

    No admin path but the API's actions takes a request body: one is
    refused (405 or 413) before it is read.
    """
    if registry is None:
        registry = CollectorRegistry()
    registry.register(CoreCollector(core))
    if guard is None:
        guard = Guard(secrets.token_urlsafe(32), core.quietLog)
    views = dict(views or {})
    if rates is None:
        rates = RateSampler(core.reactor, [])
    root = AdminRoot(loadFiles())
    probes = {b"healthz": Healthz(core), b"stats": Stats(core, views),
              b"metrics": Metrics(core, registry)}
    for name, resource in probes.items():
        root.putChild(name, Guarded(resource, guard) if protectProbes else resource)
    root.putChild(b"api", AdminAPI(core, views, guard, rates, cluster=cluster))
    routes = Routes([(b"/healthz", NO_BODY), (b"/stats", NO_BODY), (b"/metrics", NO_BODY),
                     (b"/api", {b"GET": 0, b"HEAD": 0, b"POST": MAX_BODY, b"DELETE": 0})])
    site = AdminSite(root, reactor=core.reactor, bodyLimit=routes, headerTimeout=headerTimeout,
                     idleTimeout=idleTimeout, stats=stats, name="admin.listen")
    site.registry = registry
    # Probes and scrapes every few seconds: no access-log line each.
    site.quietPaths = frozenset((b"/healthz", b"/metrics", b"/stats"))
    site.guard = guard
    site.views = views
    site.rates = rates
    return site
