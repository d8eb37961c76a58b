# -*- test-case-name: tests.test_webpubsub_reload -*-
"""
C{SIGHUP} for the Web PubSub face: the C{[webpubsub]} section is read
again from the configuration file the broker was started with and applied
to the running face without dropping a connection.

What a reload changes applies from then on, to new handshakes, REST calls,
joins and events; a connected client keeps what it was admitted with.

  - access keys (face-wide and per hub): a token signed with a key that is
    no longer configured is refused (401) from then on; rotate by adding
    the new key next to the old, reloading, moving the clients and
    backends to the new key, removing the old and reloading again;
  - audiences, anonymous access and roles, plain mode, hubs added (their
    settings) or removed (the face defaults);
  - admission, inbound rate and group limits;
  - event handlers (validated again, L{broker.webpubsub.validation}),
    C{event_origin}, C{event_timeout}, C{event_retries},
    C{max_events_in_flight}, the auto-ping timings;
  - event listeners (only the hubs whose listeners changed).

The rest (L{RESTART_KEYS}, L{HUB_RESTART_KEYS}) needs a restart: a reload
that changes them says so and runs on with the values it started with.

The new file is validated whole first; a file that does not validate, an
event handler URL or an event listener that cannot be used refuses the
reload in one line naming the key, and nothing changes.
"""

from twisted.logger import Logger

from broker.config import ConfigError
from broker.webpubsub.settings import HUB
from broker.webpubsub.site import admissionArguments, faceSettings, inboundRate

log = Logger()

# Keys of [webpubsub] read only at start-up.
RESTART_KEYS = ("enabled", "listen", "max_frame_size", "max_output_buffer", "fanout_chunk",
                "recovery_window", "header_timeout", "idle_timeout", "max_connections")
# Keys of [webpubsub.hubs.<name>] read only at start-up (or when the hub is
# first used).
HUB_RESTART_KEYS = ("history_messages", "history_max_age", "history_groups")

# What the summary line names, beyond keys, hubs and handlers.
_LIMIT_KEYS = ("max_connections_per_hub", "max_connections_per_user",
               "max_connections_per_address", "max_inbound_messages_per_second",
               "max_inbound_bytes_per_second", "inbound_burst", "max_groups_per_connection",
               "max_groups_per_hub", "max_group_name_length", "max_events_in_flight",
               "event_origin", "event_timeout", "event_retries", "auto_ping_interval",
               "auto_ping_timeout")
_HUB_KEYS = ("allow_anonymous", "anonymous_roles", "plain_mode", "plain_group",
             "max_connections_per_hub", "max_groups_per_hub")


class WebPubSubReload:
    """
    The face's reload hook (L{broker.faces.FaceContext.onReload}).

    @param loadSettings: C{callable()} returning the validated configuration
        read again, or raising L{ConfigError}.
    @param factory: the face's L{broker.webpubsub.factory.ClientFactory}.
    @param handlers: its L{broker.webpubsub.face.EventHandlers}.
    @param listeners: its L{broker.webpubsub.listeners.EventListeners}.
    @param cfg: the C{[webpubsub]} table it started with.
    @param developmentKey: C{callable()} returning the development key (used
        when no key is configured) and its file, or raising L{OSError}.
    """

    def __init__(self, loadSettings, factory, handlers, listeners, cfg, developmentKey):
        self.loadSettings = loadSettings
        self.factory = factory
        self.handlers = handlers
        self.listeners = listeners
        self.started = cfg
        self.current = cfg
        self.developmentKey = developmentKey

    def __call__(self):
        """
        Read the configuration again and apply its C{[webpubsub]} section.

        @return: whether the new settings are in force.
        """
        try:
            cfg = self.loadSettings()["webpubsub"]
            self.apply(cfg)
        except ConfigError as e:
            log.error("webpubsub: reload refused, the running settings stay: {error}",
                      error=str(e))
            return False
        return True

    def defaultKeys(self, cfg):
        if cfg["access_keys"]:
            return list(cfg["access_keys"])
        try:
            key, path = self.developmentKey()
        except OSError as e:
            raise ConfigError("broker.state_dir",
                              f"cannot keep the development access key there: {e}")
        log.warn("webpubsub.access_keys is empty: using the development key in {path}",
                 path=path)
        return [key]

    def apply(self, cfg):
        """
        Apply C{cfg} (a validated C{[webpubsub]} table): first what can
        fail (keys, handler URLs, listeners), then the swaps, which cannot.

        @raise ConfigError: nothing has changed.
        """
        old = self.current
        keys = self.defaultKeys(cfg)
        self.handlers.check(cfg)
        listenersChanged = self.listeners.reload(cfg["hubs"])
        factory = self.factory
        # One assignment: a handshake or REST call sees the old settings or
        # the new, never a mixture.
        factory.settings = faceSettings(cfg, keys)
        factory.admission.configure(*admissionArguments(cfg))
        factory.inboundRate = inboundRate(cfg)
        factory.maxEventsInFlight = cfg["max_events_in_flight"]
        # Autobahn copies these into each connection as it opens.
        factory.setProtocolOptions(autoPingInterval=cfg["auto_ping_interval"] or 0,
                                   autoPingTimeout=cfg["auto_ping_timeout"] or 0)
        factory.groupLimits.update(cfg)
        self.handlers.reload(cfg, keys)
        self.current = cfg
        log.info("webpubsub: reloaded: {changes}",
                 changes=describe(old, cfg, listenersChanged))
        restart = restartNeeded(self.started, cfg)
        if restart:
            log.warn("webpubsub: these changes need a restart, the running values stay: "
                     "{keys}", keys=", ".join(restart))


def restartNeeded(started, cfg):
    """
    The dotted keys whose new value in C{cfg} differs from what the face
    started with but is read only at start-up.  A hub not configured counts
    with the defaults (no history).
    """
    keys = [f"webpubsub.{k}" for k in RESTART_KEYS if started[k] != cfg[k]]
    default = HUB.defaultValue("")
    for name in sorted(set(started["hubs"]) | set(cfg["hubs"])):
        before = started["hubs"].get(name, default)
        after = cfg["hubs"].get(name, default)
        keys.extend(f"webpubsub.hubs.{name}.{k}" for k in HUB_RESTART_KEYS
                    if before[k] != after[k])
    return keys


def _count(keys, before):
    n, was = len(keys), len(before)
    if n == was:
        return f"{n} (replaced)" if list(keys) != list(before) else None
    return f"{n} (was {was})"


def _show(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def describe(old, new, listenersChanged=()):
    """
    One line saying what changed between two C{[webpubsub]} tables, without
    a key, URL or file name (they may hold secrets).
    """
    changes = []
    keys = _count(new["access_keys"], old["access_keys"])
    if keys:
        changes.append(f"access keys {keys}")
    if new["audiences"] != old["audiences"]:
        changes.append(f"audiences {len(new['audiences'])} (was {len(old['audiences'])})")
    for k in _LIMIT_KEYS:
        if new[k] != old[k]:
            changes.append(f"{k} {_show(new[k])} (was {_show(old[k])})")
    handlers = False
    for name in sorted(set(old["hubs"]) | set(new["hubs"])):
        before, after = old["hubs"].get(name), new["hubs"].get(name)
        if before is None:
            changes.append(f"hub {name} added")
            before = {}
        elif after is None:
            changes.append(f"hub {name} removed (face defaults)")
            after = {}
        hubKeys = _count(after.get("access_keys", []), before.get("access_keys", []))
        if hubKeys:
            changes.append(f"hub {name} access keys {hubKeys}")
        for k in _HUB_KEYS:
            if before and after and before[k] != after[k]:
                changes.append(f"hub {name} {k} {_show(after[k])} (was {_show(before[k])})")
        was, now = before.get("event_handlers", []), after.get("event_handlers", [])
        if was != now:
            handlers = True
            changes.append(f"hub {name} handlers changed" if len(was) == len(now) else
                           f"hub {name} handlers {len(now)} (was {len(was)})")
    for name in listenersChanged:
        changes.append(f"hub {name} listeners changed")
    if not changes:
        return "nothing changed"
    if not handlers:
        changes.append("handlers unchanged")
    return ", ".join(changes)
