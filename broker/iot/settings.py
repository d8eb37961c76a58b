# -*- test-case-name: tests.test_iot_face -*-
"""
The C{[iot]} section of the configuration (docs/configuration.md).
"""

from broker.config import KIB, MIB, Bool, Endpoint, Float, Int, List, Str, Table

UDP = Table({
    "enabled": Bool(True, doc="Listen for UDP telemetry datagrams."),
    "interface": Str("127.0.0.1", doc="Address the UDP listener binds."),
    "port": Int(7001, minimum=0, maximum=65535),
    "max_datagram": Int(8 * KIB, minimum=18, maximum=65507,
                        doc="Larger datagrams are dropped as malformed."),
})

SECTION = Table({
    "enabled": Bool(False),
    "listen": List(Endpoint(), default=["tcp:7000:interface=127.0.0.1"],
                   doc="Device and central TCP endpoints; ssl:... endpoints for TLS."),
    "udp": UDP,
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
    "token_ttl": Float(300.0, minimum=1, doc="Seconds a UDP token stays valid."),
    "token_batch": Int(64, minimum=2, maximum=4096, doc="UDP tokens a device holds."),
})
