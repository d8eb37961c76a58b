# -*- test-case-name: tests.test_ecdn -*-
"""
The C{[ecdn]} section of the configuration (docs/configuration.md, docs/ecdn.md).
"""

from broker.config import MIB, Bool, Endpoint, Float, Int, List, Str, Table, httpLimits

SECTION = Table({
    "enabled": Bool(False),
    "listen": List(Endpoint(), default=["tcp:8081:interface=127.0.0.1"],
                   doc="Meet calls HTTPS: use ssl:... endpoints in production."),
    "policy": Str("rules", choices=("rules", "subnet", "random"),
                  doc="How get-peering-group maps addresses to groups."),
    "rules_file": Str("", doc="Ordered rules (docs/ecdn.md); reloaded on SIGHUP."),
    "subnet_prefix_v4": Int(24, minimum=0, maximum=32),
    "subnet_prefix_v6": Int(64, minimum=0, maximum=128),
    "random_group_size": Int(50, minimum=1),
    "fallback": Str("block", choices=("block", "allow", "end"),
                    doc="Unmatched viewers: blocked, allowed in fallback_group, "
                        "or the session ended (empty result / NOT_FOUND)."),
    "fallback_group": Str("unmatched", nonEmpty=True),
    "empty_list": Str("error", choices=("error", "fallback"),
                      doc="An empty availableIPs list: an error, or the fallback."),
    "response_style": Str("current", choices=("current", "legacy")),
    "allowed_origins": List(Str(nonEmpty=True), default=["https://meet.google.com"]),
    "origin_mode": Str("echo", choices=("echo", "doc-literal"),
                       doc="echo: the request's Origin if allowed; doc-literal: "
                           "Google's scheme-less 'meet.google.com' (conformance only)."),
    "preflight_max_age": Int(600, minimum=0),
    "key_file": Str("", doc="The SDP key ring (docs/ecdn.md); reloaded on SIGHUP. "
                            "Empty: a development ring in state_dir."),
    "max_token_age": Float(0.0, minimum=0, doc="Seconds; 0 accepts tokens of any age."),
    "max_body": Int(1 * MIB, minimum=1024, maximum=64 * MIB),
    **httpLimits(10000),
})
