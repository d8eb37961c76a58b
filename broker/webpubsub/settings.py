# -*- test-case-name: tests.test_config -*-
"""
The C{[webpubsub]} section of the configuration (docs/configuration.md).
"""

from broker.config import (HUB_NAME, HUB_NAME_RULE, KIB, MIB, Bool, Endpoint, Float, Int,
                           List, MapOf, Str, Table, httpLimits, inboundRateLimits)

EVENT_HANDLER = Table({
    "url_template": Str(nonEmpty=True,
                        doc="Handler URL; {event} and {hub} are replaced."),
    "user_events": Str("", doc='"*", or comma-separated user event names; empty: none.'),
    "system_events": List(Str(choices=("connect", "connected", "disconnected")), default=[]),
    "group_presence_events": List(Str(choices=("joined", "left")), default=[],
                                  doc="Group presence events it takes (Azure's preview "
                                      "groupPresenceEvents)."),
})

# One event listener (listeners.py): a file or a plugin, and the events it
# takes, as Azure's listener filters say it.
EVENT_LISTENER = Table({
    "file": Str("", doc="Append the events as CloudEvents JSON lines to this file."),
    "plugin": Str("", doc="Or: the IEventListener plugin (by name) told of them."),
    "system_events": List(Str(choices=("connected", "disconnected")),
                          default=["connected", "disconnected"],
                          doc="System events it takes."),
    "user_events": Str("*", doc='"*", or comma-separated user event names; empty: none.'),
})

# What one tenant, user or address may take (docs/configuration.md,
# "Admission, rate and group limits"); 0 turns a limit off.  Counted per
# node in cluster mode.
LIMITS = {
    "max_connections_per_hub": Int(100_000, minimum=0,
                                   doc="Open WebSockets of one hub; beyond, 429."),
    "max_connections_per_user": Int(100, minimum=0,
                                    doc="Open WebSockets of one userId in a hub's face; "
                                        "beyond, 429."),
    "max_connections_per_address": Int(20_000, minimum=0,
                                       doc="Open WebSockets from one source IP; beyond, 429."),
    **inboundRateLimits(16 * MIB, "connection"),
    "max_groups_per_connection": Int(1000, minimum=0,
                                     doc="Groups one connection (or one user, through "
                                         "addUserToGroup) may be in."),
    "max_groups_per_hub": Int(100_000, minimum=0, doc="Groups with members in one hub."),
    "max_group_name_length": Int(1024, minimum=1, maximum=1024,
                                 doc="Longest group name, in characters."),
}

HUB = Table({
    "access_keys": List(Str(nonEmpty=True), default=[],
                        doc="Keys for this hub's tokens, replacing webpubsub.access_keys."),
    "allow_anonymous": Bool(False, doc="Admit clients without a token (development only)."),
    "plain_mode": Str("sendEvent", choices=("sendEvent", "sendToGroup"),
                      doc="How frames from plain WebSocket clients are routed."),
    "plain_group": Str("", doc="Default group for plain clients in sendToGroup mode."),
    "anonymous_roles": List(Str(), default=[],
                            doc="Roles of anonymous clients when allow_anonymous is true."),
    "history_messages": Int(0, minimum=0, maximum=1_000_000,
                            doc="Messages kept per group for recovery; 0 turns history off."),
    "history_max_age": Float(3600.0, minimum=0,
                             doc="Seconds a group message is kept; 0 keeps it until evicted."),
    "history_groups": Int(10000, minimum=1, doc="Groups with a history ring, at most."),
    "event_log": Str("", doc="Append the hub's events as JSON lines to this file."),
    "event_handlers": List(EVENT_HANDLER, default=[],
                           doc="Upstream CloudEvents handlers, in order (first match)."),
    "event_listeners": List(Str(nonEmpty=True), default=[],
                            doc="IEventListener plugins (by name) told of the hub's events."),
    "listeners": List(EVENT_LISTENER, default=[],
                      doc="Event listeners, each with its event filter."),
    # Admission and group limits of this hub, replacing the face-wide ones.
    "max_connections_per_hub": Int(None, minimum=0,
                                   doc="Overrides webpubsub.max_connections_per_hub."),
    "max_groups_per_hub": Int(None, minimum=0, doc="Overrides webpubsub.max_groups_per_hub."),
})

SECTION = Table({
    "enabled": Bool(True),
    "listen": List(Endpoint(), default=["tcp:8080:interface=127.0.0.1"]),
    "access_keys": List(Str(nonEmpty=True), default=[]),
    "audiences": List(Str(nonEmpty=True), default=[],
                      doc="Accepted token audience origins; empty accepts any origin."),
    "max_frame_size": Int(1 * MIB, minimum=1, maximum=64 * MIB),
    "max_output_buffer": Int(4 * MIB, minimum=16 * KIB),
    "fanout_chunk": Int(4096, minimum=1),
    "auto_ping_interval": Float(30.0, minimum=0),
    "auto_ping_timeout": Float(30.0, minimum=0),
    "hubs": MapOf(HUB, name=HUB_NAME, nameRule=HUB_NAME_RULE),
    "recovery_window": Float(30.0, minimum=0,
                             doc="Seconds a dropped reliable connection waits for its client."),
    "event_origin": Str("localhost", nonEmpty=True,
                        doc="WebHook-Request-Origin sent to event handlers."),
    "event_timeout": Float(10.0, minimum=0.1, doc="Seconds an event handler may take."),
    "max_events_in_flight": Int(16, minimum=1, maximum=10000,
                                doc="User events of one connection under way to the event "
                                    "handler; past it the client is not read until one is "
                                    "answered."),
    "event_retries": Int(2, minimum=0, maximum=10,
                         doc="Retries of a failed connected/disconnected notification."),
    **httpLimits(10000),
    **LIMITS,
})
