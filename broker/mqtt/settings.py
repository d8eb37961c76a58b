# -*- test-case-name: tests.test_mqtt_process -*-
"""
The C{[mqtt]} section of the configuration (docs/configuration.md, docs/mqtt.md).
"""

from broker.config import (HUB_NAME, HUB_NAME_RULE, KIB, MIB, Bool, ConfigError, Endpoint,
                           Float, Int, List, Str, Table, connectionLimit, httpLimits,
                           inboundRateLimits, tlsListeners, TLSEndpoint)


class HubName(Str):
    def check(self, key, value):
        value = super().check(key, value)
        if not HUB_NAME.match(value):
            raise ConfigError(key, f"a hub name is {HUB_NAME_RULE}; got {value!r}")
        return value


TLS = tlsListeners(TLSEndpoint(), "MQTT over TLS endpoints (plain tcp:... descriptions: the "
                   "broker adds TLS), e.g. tcp:8883:interface=127.0.0.1.", "mqtt-tls-cert.pem")

WEBSOCKET = Table({
    "listen": List(Endpoint(), default=[],
                   doc="MQTT over WebSocket (subprotocol mqtt) on /mqtt and "
                       "/clients/mqtt/hubs/{hub}; ssl:... endpoints for wss."),
    **httpLimits(10000),
})

SECTION = Table({
    "enabled": Bool(False),
    "listen": List(Endpoint(), default=["tcp:1883:interface=127.0.0.1"],
                   doc="MQTT over TCP endpoints; ssl:... endpoints work too."),
    "tls": TLS,
    "websocket": WEBSOCKET,
    "hub": HubName("mqtt", doc="The hub of the TCP and TLS listeners and of /mqtt: an MQTT "
                               "topic is a group of this hub."),
    "persistence": Bool(True, doc="Keep persistent sessions, their queued QoS 1/2 messages and "
                                  "retained messages in SQLite across restarts."),
    "store_path": Str("", doc="The SQLite store; empty: {state_dir}/mqtt.sqlite."),
    "password_file": Str("", doc="Hashed user names and passwords, re-read on SIGHUP "
                                 "(broker.mqtt.auth); empty with no acl_file and no "
                                 "token keys: every client is allowed."),
    "acl_file": Str("", doc="Topic ACLs per user (broker.mqtt.auth)."),
    "max_packet_size": Int(1 * MIB, minimum=1 * KIB, maximum=256 * MIB,
                           doc="Largest inbound packet; larger: DISCONNECT 0x95 and closed."),
    "max_output_buffer": Int(4 * MIB, minimum=64 * KIB,
                             doc="Bytes waiting for a client that stopped reading before it "
                                 "is dropped as a slow consumer."),
    "max_queued_messages": Int(1000, minimum=1, maximum=10_000_000,
                               doc="QoS 1/2 messages queued or in flight per session (also "
                                   "offline); beyond, dropped and counted."),
    "max_subscriptions": Int(100, minimum=1, maximum=100_000,
                             doc="Subscriptions per session; beyond, SUBACK 0x97 (0x80)."),
    "max_persistent_sessions": Int(100_000, minimum=0,
                                   doc="Persistent sessions at once, connected or away; a "
                                       "CONNECT asking for one more: CONNACK 0x97 (3)."),
    "max_retained_messages": Int(100_000, minimum=0,
                                 doc="Retained messages per hub; a new one beyond is routed "
                                     "but not kept (counted)."),
    "max_retained_bytes": Int(256 * MIB, minimum=0,
                              doc="Bytes of retained payloads per hub; beyond, as above."),
    "max_session_expiry": Int(7 * 86400, minimum=0, maximum=0xFFFFFFFF,
                              doc="Longest session expiry interval granted, seconds (also "
                                  "for 3.1.1 clean session 0)."),
    "max_keep_alive": Int(0, minimum=0, maximum=65535,
                          doc="5.0: a longer (or no) keep alive is replaced by this (server "
                              "keep alive); 0: the client's."),
    "receive_maximum": Int(64, minimum=1, maximum=65535,
                           doc="QoS 1/2 publishes a client may have unacknowledged; beyond, "
                               "DISCONNECT 0x93."),
    "topic_alias_maximum": Int(16, minimum=0, maximum=65535,
                               doc="Topic aliases a 5.0 client may set."),
    "outbound_topic_aliases": Bool(True, doc="Use topic aliases towards 5.0 clients that "
                                             "allow them (topic_alias_maximum > 0)."),
    "max_client_id_length": Int(256, minimum=23, maximum=65535),
    "connect_timeout": Float(10.0, minimum=0.1,
                             doc="Seconds a connection has to send CONNECT."),
    "auth_timeout": Float(10.0, minimum=0.1, doc="Seconds an authentication may take."),
    "qos_from_other_faces": Int(1, minimum=0, maximum=2,
                                doc="The QoS messages from other faces (REST, Web PubSub, IoT "
                                    "telemetry) are published with."),
    "server_topic": Str("$server", nonEmpty=True,
                        doc="The topic of core sends to a connection, user or the whole hub "
                            "(delivered to sessions subscribed to it)."),
    "max_connections": connectionLimit(100_000),
    "max_connections_per_hub": Int(100_000, minimum=0,
                                   doc="Sessions in one hub; beyond, CONNACK 0x97 (3)."),
    "max_connections_per_user": Int(64, minimum=0,
                                    doc="Sessions of one user in a hub; beyond, CONNACK "
                                        "0x97 (3)."),
    "max_connections_per_address": Int(1000, minimum=0,
                                       doc="Connections from one source IP; beyond, reset."),
    **inboundRateLimits(8 * MIB, "connection"),
})
