# -*- test-case-name: tests.test_tap -*-
"""
Builds the Web PubSub face from C{[webpubsub]}: the client WebSocket site on
each C{webpubsub.listen} endpoint.
"""

import os
import secrets

from twisted.application import service
from twisted.logger import Logger

from broker.config import ConfigError
from broker.files import writePrivate
from broker.plugins import streamListeners
from broker.webpubsub.listeners import EventListeners
from broker.webpubsub.adminview import WebPubSubView
from broker.webpubsub.reload import WebPubSubReload
from broker.webpubsub.upstream import (CloudEventsUpstream, EventHandler, UpstreamCollector,
                                      makeHTTPClient)
from broker.webpubsub.validation import HandlerValidation
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


class EventHandlers(service.Service):
    """
    The event handlers of the configured hubs: their HTTP client, their
    validation (L{HandlerValidation}), and the upstream attached to each
    hub as it is created.

    L{reload} validates every handler again (a configuration reload), with
    new settings when given; L{stop} (or stopping the service) releases the
    connections and cancels the retries.
    """

    name = "webpubsub.handlers"

    def __init__(self, reactor, core, wps, defaultKeys):
        self.reactor = reactor
        self.core = core
        self.http, _ = makeHTTPClient(reactor)
        self.validation = HandlerValidation(
            reactor, self.http, wps["event_origin"], health=getattr(core, "health", None),
            timeout=wps["event_timeout"])
        # Hub name -> the CloudEventsUpstream attached to that hub.
        self._upstreams = {}
        self._configure(wps, defaultKeys)

    def _configure(self, wps, defaultKeys):
        checkHandlerURLs(wps)
        self.wps = wps
        self.defaultKeys = defaultKeys
        self._configured = {name: h for name, h in wps["hubs"].items() if h["event_handlers"]}
        self._handlers = {name: [EventHandler(e["url_template"], e["user_events"],
                                              e["system_events"], e["group_presence_events"])
                                 for e in h["event_handlers"]]
                          for name, h in self._configured.items()}

    @staticmethod
    def check(wps):
        """
        @raise ConfigError: a handler of C{wps} cannot be used (see
            L{checkHandlerURLs}).
        """
        checkHandlerURLs(wps)

    def upstreams(self):
        """
        C{{hub name: CloudEventsUpstream}} of the hubs that have handlers
        and exist (the metrics' view).
        """
        return dict(self._upstreams)

    @property
    def configured(self):
        """
        Whether any hub has event handlers.
        """
        return bool(self._configured)

    def start(self):
        """
        Validate every handler now, as Azure does when it is configured,
        and attach the upstreams to the hubs as they come.

        @return: a Deferred firing once each handler has had a first answer.
        """
        self.core.onNewHub(self._setup)
        return self.validation.load(self._handlers)

    def reload(self, wps=None, defaultKeys=None):
        """
        Validate every handler again: the entry point for a configuration
        reload (SIGHUP).  With C{wps} (a new C{[webpubsub]} table), its
        handlers, keys, origin, timeout and retries replace the running
        ones first: the existing hubs' upstreams are updated in place (an
        event under way finishes with the handler it had), hubs that lost
        every handler lose their upstream, and hubs that gained some get
        one.

        @raise ConfigError: a handler URL that is not http(s); nothing
            changes then.
        """
        if wps is not None:
            self._configure(wps, self.defaultKeys if defaultKeys is None else defaultKeys)
            self.validation.origin = wps["event_origin"]
            self.validation.timeout = wps["event_timeout"]
            for name, upstream in list(self._upstreams.items()):
                if name in self._configured:
                    self._update(upstream)
                    continue
                del self._upstreams[name]
                hub = self.core.existingHub(name)
                if hub is not None:
                    hub.removeObserver(upstream)
                    if hub.upstream is upstream:
                        hub.upstream = None
            for name in self._configured:
                hub = self.core.existingHub(name)
                if hub is not None and name not in self._upstreams:
                    self._setup(hub)
        return self.validation.reload(self._handlers)

    def _update(self, upstream):
        wps, name = self.wps, upstream.hubName
        upstream.handlers = list(self._handlers[name])
        upstream.accessKeys = list(self._configured[name]["access_keys"] or self.defaultKeys)
        upstream.origin = wps["event_origin"]
        upstream.timeout = wps["event_timeout"]
        upstream.retries = wps["event_retries"]

    def _setup(self, hub):
        h = self._configured.get(hub.name)
        if h is None:
            return
        wps = self.wps
        upstream = CloudEventsUpstream(
            self.reactor, hub.name, self._handlers[hub.name],
            h["access_keys"] or self.defaultKeys, wps["event_origin"], self.http,
            timeout=wps["event_timeout"], retries=wps["event_retries"],
            validation=self.validation)
        hub.upstream = upstream
        hub.addObserver(upstream)
        self._upstreams[hub.name] = upstream

    def stop(self):
        self.validation.stop()
        return self.http.closeCachedConnections()

    def stopService(self):
        super().stopService()
        return self.stop()

    # What shutdown and the tests call.
    closeCachedConnections = stop


def checkHandlerURLs(wps):
    """
    @raise ConfigError: naming the first handler whose URL is not http(s).
    """
    for name, h in wps["hubs"].items():
        for i, handler in enumerate(h["event_handlers"]):
            url = handler["url_template"]
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"webpubsub.hubs.{name}.event_handlers[{i}].url_template",
                                  "must be an http:// or https:// URL")


def attachEventHandlers(reactor, core, wps, defaultKeys):
    """
    Attach a L{CloudEventsUpstream} to each hub with event handlers, and
    start validating the handlers.

    @return: the L{EventHandlers} (to L{EventHandlers.stop} at shutdown),
        or C{None} when no hub has any.
    """
    handlers = EventHandlers(reactor, core, wps, defaultKeys)
    if not handlers.configured:
        return None
    handlers.start()
    return handlers


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
    # The configured hubs' series on /metrics from the start.
    context.core.declareHubs(wps["hubs"])
    factory = makeFactory(context.core, wps, keys, context.reactor,
                          cluster=getattr(context, "cluster", None))
    stopLinks = getattr(factory.links, "stop", None)
    if stopLinks is not None:
        context.reactor.addSystemEventTrigger("before", "shutdown", stopLinks)
    listeners = EventListeners(context.core, wps["hubs"], context.reactor.seconds)
    # Running even without listeners: a reload may add some.
    context.addService(listeners)
    handlers = EventHandlers(context.reactor, context.core, wps, keys)
    handlers.start()
    context.addService(handlers)
    # SIGHUP applies the [webpubsub] section read again, and validates
    # every event handler again.
    context.onReload(WebPubSubReload(context.loadSettings, factory, handlers, listeners, wps,
                                     lambda: developmentKey(context.stateDir)))
    site = makeSite(factory, headerTimeout=wps["header_timeout"],
                    idleTimeout=wps["idle_timeout"],
                    stats=context.listeners.get("webpubsub.listen"))
    # After the settings swap above: the REST API's verified tokens go.
    context.onReload(site.restAPI.reloaded)
    context.onDrain(factory.drain)
    context.registry.register(RestCollector(site.restAPI))
    context.registry.register(UpstreamCollector(handlers.upstreams))
    context.addAdminView(WebPubSubView(context.core, site.restAPI))
    context.listen("webpubsub.listen", wps["listen"], site, wps["max_connections"])


def listeners(settings):
    """
    The listeners L{build} opens (L{broker.plugins.IBrokerFace.listeners}).
    """
    wps = settings["webpubsub"]
    return streamListeners("webpubsub.listen", wps["listen"]) if wps["enabled"] else []
