# -*- test-case-name: tests.test_admin_api -*-
"""
Builds the admin face from C{[admin]} once the other faces are built: the
admin token (L{broker.admin.auth}), the rate sampler of the console's
charts, and the admin site (probes, console, API) on each C{admin.listen}
endpoint.
"""

from prometheus_client.core import CounterMetricFamily
from twisted.logger import Logger

from broker.admin.auth import Guard, loadToken
from broker.admin.rates import RateSampler
from broker.admin.resource import makeAdminSite
from broker.config import ConfigError

log = Logger()

# The core's figures charted by the console: levels, not rates.
GAUGES = ("connections", "users", "groups")


class AdminCollector:
    """
    C{broker_admin_refused_total{reason}}: requests refused for want of the
    admin token (C{missing} or C{wrong}).
    """

    def __init__(self, guard):
        self.guard = guard

    def collect(self):
        c = CounterMetricFamily("broker_admin_refused",
                                "Admin requests refused without the admin token.",
                                labels=["reason"])
        for reason, n in sorted(self.guard.refused.items()):
            c.add_metric([reason], n)
        yield c


def coreCounters(core):
    """
    The core's totals for the rate sampler.
    """
    def sample():
        s = core.stats()
        return {"messagesIn": s["messagesIn"], "messagesOut": s["messagesOut"],
                "connections": s["connections"], "users": s["users"], "groups": s["groups"],
                "connectionsAccepted": s["connectionsAccepted"],
                "connectionsRejected": s["connectionsRejected"]}
    return sample


def build(context, listen, listeners):
    """
    @param context: the L{broker.faces.FaceContext} the faces were built
        with (their C{adminViews}).
    @param listen: L{broker.tap.buildService}'s C{listen}.
    @return: the admin site.
    """
    admin = context.settings["admin"]
    core = context.core
    try:
        token, path = loadToken(admin["token"], context.stateDir)
    except OSError as e:
        raise ConfigError("broker.state_dir", f"cannot keep the admin token there: {e}")
    if path is not None:
        log.info("admin: the admin token is in {path} (admin.token is empty)", path=path)
    guard = Guard(token, core.quietLog)
    context.registry.register(AdminCollector(guard))
    views = context.adminViews
    sources = [coreCounters(core)] + [v.counters for v in views.values()]
    rates = RateSampler(context.reactor, sources, gauges=GAUGES)
    context.addService(rates)
    site = makeAdminSite(core, context.registry, headerTimeout=admin["header_timeout"],
                         idleTimeout=admin["idle_timeout"],
                         stats=listeners.get("admin.listen"), guard=guard, views=views,
                         rates=rates, protectProbes=admin["protect_probes"],
                         cluster=context.cluster)
    listen("admin.listen", admin["listen"], site, admin["max_connections"])
    return site
