# -*- test-case-name: tests.test_tap -*-
"""
Builds the Web PubSub face from C{[webpubsub]}: the client WebSocket site on
each C{webpubsub.listen} endpoint.
"""

import os
import secrets

from twisted.logger import Logger

from broker.config import ConfigError
from broker.files import writePrivate
from broker.webpubsub.listeners import EventListeners
from broker.webpubsub.upstream import CloudEventsUpstream, EventHandler, makeHTTPClient
from broker.webpubsub.rest import RestCollector
from broker.webpubsub.site import makeFactory, makeSite

log = Logger()

ACCESS_KEY_FILE = "webpubsub-access-key"


def developmentKey(stateDir):
    """
    Read or create the development access key used when none is configured.
    It is written with mode 0600 and never logged.
    """
    path = os.path.join(stateDir, ACCESS_KEY_FILE)
    try:
        with open(path, encoding="ascii") as f:
            key = f.read().strip()
        if key:
            return key, path
    except FileNotFoundError:
        pass
    key = secrets.token_urlsafe(32)
    writePrivate(path, key + "\n")
    return key, path


def attachEventHandlers(reactor, core, wps, defaultKeys):
    """
    Attach a L{CloudEventsUpstream} to each hub with event handlers.

    @return: their HTTP connection pool (to close at shutdown), or C{None}.
    """
    configured = {name: h for name, h in wps["hubs"].items() if h["event_handlers"]}
    if not configured:
        return None
    for name, h in configured.items():
        for i, handler in enumerate(h["event_handlers"]):
            url = handler["url_template"]
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"webpubsub.hubs.{name}.event_handlers[{i}].url_template",
                                  "must be an http:// or https:// URL")
    client, pool = makeHTTPClient(reactor)

    def setup(hub):
        h = configured.get(hub.name)
        if h is None:
            return
        upstream = CloudEventsUpstream(
            reactor, hub.name,
            [EventHandler(e["url_template"], e["user_events"], e["system_events"])
             for e in h["event_handlers"]],
            h["access_keys"] or defaultKeys, wps["event_origin"], client,
            timeout=wps["event_timeout"], retries=wps["event_retries"])
        hub.upstream = upstream
        hub.addObserver(upstream)
    core.onNewHub(setup)
    return pool


def build(context):
    wps = context.settings["webpubsub"]
    if not wps["enabled"]:
        return
    keys = wps["access_keys"]
    if not keys:
        try:
            key, path = developmentKey(context.stateDir)
        except OSError as e:
            raise ConfigError(
                "broker.state_dir", f"cannot keep the development access key there: {e}")
        keys = [key]
        log.warn("webpubsub.access_keys is empty: using the development key in {path}",
                 path=path)
    factory = makeFactory(context.core, wps, keys, context.reactor,
                          cluster=getattr(context, "cluster", None))
    stopLinks = getattr(factory.links, "stop", None)
    if stopLinks is not None:
        context.reactor.addSystemEventTrigger("before", "shutdown", stopLinks)
    listeners = EventListeners(context.core, wps["hubs"], context.reactor.seconds)
    if listeners.configured:
        context.addService(listeners)
    pool = attachEventHandlers(context.reactor, context.core, wps, keys)
    if pool is not None:
        context.reactor.addSystemEventTrigger("before", "shutdown", pool.closeCachedConnections)
    site = makeSite(factory, headerTimeout=wps["header_timeout"],
                    idleTimeout=wps["idle_timeout"],
                    stats=context.listeners.get("webpubsub.listen"))
    context.onDrain(factory.drain)
    context.registry.register(RestCollector(site.restAPI))
    context.listen("webpubsub.listen", wps["listen"], site, wps["max_connections"])
