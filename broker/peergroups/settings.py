# -*- test-case-name: tests.test_peergroups -*-
"""
The C{[peergroups]} section of the configuration (docs/configuration.md).
"""

from broker.config import (KIB, MIB, Bool, Endpoint, Float, Int, List, Str, Table,
                           connectionLimit, httpLimits, inboundRateLimits)

SECTION = Table({
    "enabled": Bool(False),
    "listen": List(Endpoint(), default=["tcp:8084:interface=127.0.0.1"],
                   doc="HTTP listeners for the WebSocket endpoint /peergroups/v1."),
    "tcp_listen": List(Endpoint(), default=["tcp:7100:interface=127.0.0.1"],
                       doc="Raw TCP/TLS listeners (4-byte length-prefixed JSON)."),
    "store": Str("peergroups.sqlite", nonEmpty=True,
                 doc="The SQLite database, relative to broker.state_dir."),
    "max_message_size": Int(4 * MIB, minimum=4 * KIB, maximum=64 * MIB),
    "max_import_size": Int(64 * MIB, minimum=4 * KIB, maximum=4096 * MIB,
                           doc="Largest database a chunked importDatabase uploads."),
    "max_cursors_per_session": Int(16, minimum=1, maximum=1024,
                                   doc="Open paging/export/import cursors per session."),
    "cursor_timeout": Float(60.0, minimum=1, maximum=3600,
                            doc="Seconds after which an unused cursor expires."),
    "max_record_size": Int(1 * MIB, minimum=1, maximum=60 * MIB),
    "max_data_size": Int(1 * MIB, minimum=1, maximum=48 * MIB),
    "max_output_buffer": Int(8 * MIB, minimum=64 * KIB),
    "keepalive_interval": Float(30.0, minimum=1),
    "keepalive_timeout": Float(90.0, minimum=2, maximum=299),
    "sweep_interval": Float(5.0, minimum=0.1, maximum=60),
    "applications": List(Str("", nonEmpty=True), default=[],
                         doc="Applications served; empty: any."),
    "creators": List(Str("", nonEmpty=True), default=[],
                     doc="Peer names that may create groups; empty: any identity."),
    "max_groups_per_creator": Int(100, minimum=1, doc="Groups one identity may create."),
    "max_records_per_group": Int(100000, minimum=1,
                                 doc="Records and tombstones one group may hold."),
    "password_failures_per_minute": Int(
        20, minimum=1, maximum=100000,
        doc="Wrong password proofs a group takes in a minute; beyond, none is checked."),
    **httpLimits(10000),
    "tcp_max_connections": connectionLimit(10000),
    # Admission and rate limits (docs/configuration.md, "Admission, rate and
    # group limits"); 0 turns a limit off.  Counted per node.
    "max_connections_per_application": Int(100_000, minimum=0,
                                           doc="Sessions with an identity in one application; "
                                               "beyond, PEER_E_CONNECTION_REFUSED."),
    "max_connections_per_identity": Int(64, minimum=0,
                                        doc="Sessions of one peer identity in an application; "
                                            "beyond, PEER_E_CONNECTION_REFUSED."),
    "max_connections_per_address": Int(1000, minimum=0,
                                       doc="Connections (both wires) from one source IP; "
                                           "beyond, 429 or PEER_E_CONNECTION_REFUSED."),
    **inboundRateLimits(8 * MIB, "session"),
})
