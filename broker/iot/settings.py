# -*- test-case-name: tests.test_iot_face -*-
"""
The C{[iot]} section of the configuration (docs/configuration.md).
"""

from broker.config import (HUB_NAME, HUB_NAME_RULE, KIB, MIB, Bool, ConfigError, Endpoint,
                           Float, Int, List, MapOf, Str, Table, connectionLimit, httpLimits,
                           inboundRateLimits, tlsListeners, TLSEndpoint)
from broker.iot.apikeys import APIKeyError, parseLine


class APIKeyLine(Str):
    """
    A C{fleet:id:sha256hex} line from C{python -m broker.iot.apikeys new}.
    """

    def check(self, key, value):
        value = super().check(key, value)
        try:
            parseLine(value)
        except APIKeyError as e:
            raise ConfigError(key, str(e))
        return value


HTTP = Table({
    "enabled": Bool(True, doc="Serve the HTTP(S) JSON API for centrals."),
    "listen": List(Endpoint(), default=["tcp:8082:interface=127.0.0.1"],
                   doc="HTTP API endpoints; ssl:... endpoints for HTTPS."),
    "api_keys": List(APIKeyLine(), default=[],
                     doc="Hashed API keys, FLEET:ID:SHA256 (python -m broker.iot.apikeys new "
                         "FLEET); with none here nor in api_key_file, a development key for "
                         "fleet demo is generated in {state_dir}/iot-api-key."),
    "api_key_file": Str("", doc="A file of further FLEET:ID:SHA256 lines, re-read on SIGHUP."),
    "request_timeout": Float(30.0, minimum=0.01,
                             doc="Seconds a held request waits when the call names none."),
    "max_request_timeout": Float(300.0, minimum=0.01,
                                 doc="The longest timeout a call may ask for."),
    "max_body": Int(1 * MIB, minimum=1 * KIB, maximum=64 * MIB,
                    doc="Larger request bodies are refused with 413."),
    "max_held": Int(10000, minimum=1,
                    doc="Held requests at once; beyond, 503 OVERLOADED."),
    "max_held_per_fleet": Int(1000, minimum=1,
                              doc="Held requests of one fleet at once; beyond, 429 "
                                  "TOO_MANY_HELD."),
    **httpLimits(10000, idleTimeout=120.0),
})

class WebhookURL(Str):
    def check(self, key, value):
        value = super().check(key, value)
        if not value.startswith(("http://", "https://")):
            raise ConfigError(key, f"expected an http:// or https:// URL; got {value!r}")
        return value


WEBHOOK_FLEET = Table({
    "url": WebhookURL("", doc="http(s) URL the fleet's events are POSTed to (required)."),
    "api_key": Str("", doc="Sent as Authorization: Bearer; empty: not sent."),
    "signing_secret": Str("", nonEmpty=True,
                          doc="HMAC-SHA256 key of X-IoT-Signature (required)."),
    "timeout": Float(None, minimum=0.01, doc="Overrides iot.webhook.timeout."),
    "retries": Int(None, minimum=0, maximum=20, doc="Overrides iot.webhook.retries."),
    "backoff": Float(None, minimum=0, doc="Overrides iot.webhook.backoff."),
})

WEBHOOK = Table({
    "timeout": Float(10.0, minimum=0.01, doc="Seconds one attempt may take."),
    "retries": Int(3, minimum=0, maximum=20, doc="Retries after a 5xx, 408, 429, timeout or "
                                                 "connection failure (never another 4xx)."),
    "backoff": Float(0.5, minimum=0, doc="Seconds before the first retry, doubled after each."),
    "max_backoff": Float(10.0, minimum=0, doc="The longest wait between two attempts."),
    "max_in_flight": Int(256, minimum=1,
                         doc="Messages and telemetry posts under way; more are dropped."),
    "max_response": Int(1 * MIB, minimum=1 * KIB, doc="Largest answer read from a webhook."),
    "ca_file": Str("", doc="PEM CA certificate(s) trusted for https webhooks instead of "
                           "the system's."),
    "fleets": MapOf(WEBHOOK_FLEET, name=HUB_NAME, nameRule=HUB_NAME_RULE,
                    doc="Per fleet: where its central's webhook is."),
})

UDP = Table({
    "enabled": Bool(True, doc="Listen for UDP telemetry datagrams."),
    "interface": Str("127.0.0.1", doc="Address the UDP listener binds."),
    "port": Int(7001, minimum=0, maximum=65535),
    # A version 2 datagram with an empty payload: header and MAC.
    "max_datagram": Int(8 * KIB, minimum=34, maximum=65507,
                        doc="Larger datagrams are dropped as malformed."),
    "receive_buffer": Int(4 * MIB, minimum=0,
                          doc="SO_RCVBUF bytes (capped by net.core.rmem_max); 0: the "
                              "system default.  Absorbs bursts while the process is busy."),
    "accept_version_1": Bool(False, doc="Accept version 1 datagrams (a token, no MAC) from "
                                        "devices that do not announce UDP version 2.  "
                                        "Insecure: anyone on the path can change their "
                                        "payload.  Off: such devices get no UDP tokens."),
    # Rate limit (docs/configuration.md, "Admission, rate and group limits").
    "max_datagrams_per_second": Float(100_000.0, minimum=0,
                                      doc="Datagrams per second from one source address; "
                                          "beyond, dropped (0: no limit)."),
})


TLS = tlsListeners(TLSEndpoint(), "Device and central endpoints served with TLS "
                   "(tcp:PORT:...), with the certificate below.", "iot-tls-cert.pem")


SECTION = Table({
    "enabled": Bool(False),
    "listen": List(Endpoint(), default=["tcp:7000:interface=127.0.0.1"],
                   doc="Device and central TCP endpoints; ssl:... endpoints for TLS."),
    "tls": TLS,
    "udp": UDP,
    "http": HTTP,
    "webhook": WEBHOOK,
    "registry_file": Str("", doc="Device registry (TOML); empty: a development registry "
                                 "generated in {state_dir}/iot-registry.toml."),
    "store_path": Str("", doc="SQLite store; empty: {state_dir}/iot.sqlite."),
    "auth_timeout": Float(10.0, minimum=0.1, doc="Seconds a session has to authenticate."),
    "ping_interval": Float(30.0, minimum=0, doc="Idle seconds before a PING; 0: never."),
    "ping_timeout": Float(30.0, minimum=0.1,
                          doc="Further silent seconds before a session is dead."),
    "request_timeout": Float(30.0, minimum=0.01,
                             doc="Seconds a request waits for its answer."),
    "max_frame_size": Int(1 * MIB, minimum=64, maximum=64 * MIB),
    "max_output_buffer": Int(1 * MIB, minimum=16 * KIB),
    "queue_ttl": Float(86400.0, minimum=1, doc="Seconds a queued message is kept."),
    "max_queue_depth": Int(1000, minimum=1, doc="Queued messages per device."),
    "max_central_queue_depth": Int(100_000, minimum=1,
                                   doc="Device -> central events a fleet's central queue "
                                       "holds while its central is away; beyond, QUEUE_FULL."),
    "max_outcomes": Int(10_000, minimum=1,
                        doc="Delivery outcomes of queued messages remembered per fleet "
                            "(GET .../messages/{id})."),
    "forward_telemetry": Bool(False, doc="Keep telemetry in the central queue too while the "
                                         "central is away (else it is dropped then)."),
    "last_value_on_join": Bool(False, doc="Send a Web PubSub connection joining "
                                          "telemetry.<device> the device's last telemetry "
                                          "first."),
    "token_ttl": Float(300.0, minimum=1, doc="Seconds a UDP token stays valid."),
    "token_batch": Int(64, minimum=2, maximum=4096, doc="UDP tokens a device holds."),
    "max_connections": connectionLimit(10000),
    # Admission and rate limits (docs/configuration.md, "Admission, rate and
    # group limits"); 0 turns a limit off.  Counted per node.
    "max_connections_per_address": Int(256, minimum=0,
                                       doc="Sessions from one source IP not yet "
                                           "authenticated; beyond, LIMIT."),
    "max_connections_per_fleet": Int(100_000, minimum=0,
                                     doc="Authenticated sessions of one fleet; beyond, LIMIT."),
    **inboundRateLimits(8 * MIB, "session"),
})
