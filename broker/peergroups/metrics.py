# -*- test-case-name: tests.test_peergroups -*-
"""
The peer-groups face's figures for the admin C{/metrics}: plain counters
bumped on the hot path, turned into Prometheus families only when scraped.
"""

import collections

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from broker.peergroups import constants as C

EVENT_NAMES = {
    C.EVENT_STATUS_CHANGED: "status_changed",
    C.EVENT_PROPERTY_CHANGED: "property_changed",
    C.EVENT_RECORD_CHANGED: "record_changed",
    C.EVENT_DIRECT_CONNECTION: "direct_connection",
    C.EVENT_NEIGHBOR_CONNECTION: "neighbor_connection",
    C.EVENT_INCOMING_DATA: "incoming_data",
    C.EVENT_MEMBER_CHANGED: "member_changed",
    C.EVENT_CONNECTION_FAILED: "connection_failed",
    C.EVENT_AUTHENTICATION_FAILED: "authentication_failed",
}


class Counters:
    """
    What the face has done since start: answers by method and HRESULT name
    (methods outside the API count as C{unknown}, so the label set stays
    bounded), events pushed by type, direct data relayed, and sessions
    dropped by the broker.
    """

    def __init__(self):
        self.answers = collections.Counter()
        self.events = collections.Counter()
        self.dataMessages = 0
        self.dataBytes = 0
        self.dropped = collections.Counter()
        self.passwordFailures = 0
        # Messages over max_message_size: "answer" (replaced by an error) or "event".
        self.oversized = collections.Counter()


class PeerGroupsCollector:
    """
    A Prometheus collector over one L{broker.peergroups.core.PeerGroups}.
    """

    def __init__(self, peergroups):
        self.pg = peergroups

    def collect(self):
        counts = self.pg.counters
        answers = CounterMetricFamily(
            "broker_peergroups_requests", "Answered peer-groups requests by method and result.",
            labels=["method", "result"])
        for (method, result), n in sorted(counts.answers.items()):
            answers.add_metric([method, result], n)
        yield answers
        events = CounterMetricFamily(
            "broker_peergroups_events", "Events pushed to registrations, by type.",
            labels=["type"])
        for kind, n in sorted(counts.events.items()):
            events.add_metric([EVENT_NAMES.get(kind, str(kind))], n)
        yield events
        yield CounterMetricFamily("broker_peergroups_data_messages",
                                  "sendData messages relayed over direct connections.",
                                  value=counts.dataMessages)
        yield CounterMetricFamily("broker_peergroups_data_bytes",
                                  "Bytes of sendData payload relayed.", value=counts.dataBytes)
        dropped = CounterMetricFamily("broker_peergroups_dropped_sessions",
                                      "Sessions the broker closed, by reason.",
                                      labels=["reason"])
        for reason, n in sorted(counts.dropped.items()):
            dropped.add_metric([reason], n)
        yield dropped
        oversized = CounterMetricFamily(
            "broker_peergroups_oversized", "Answers (replaced by E_MESSAGE_TOO_LARGE) and "
            "events (dropped) over max_message_size.", labels=["kind"])
        for kind, n in sorted(counts.oversized.items()):
            oversized.add_metric([kind], n)
        yield oversized
        yield CounterMetricFamily("broker_peergroups_password_failures",
                                  "Wrong password proofs, in every group.",
                                  value=counts.passwordFailures)
        groups = online = records = 0
        for app in self.pg.apps.values():
            for group in app.groups.values():
                groups += 1
                online += len(group.online)
                records += sum(1 for r in group.records.values() if not r.deleted)
        yield GaugeMetricFamily("broker_peergroups_sessions", "Open peer sessions.",
                                value=len(self.pg.sessions))
        yield GaugeMetricFamily("broker_peergroups_groups", "Groups in every application.",
                                value=groups)
        yield GaugeMetricFamily("broker_peergroups_online_members",
                                "Members connected to their groups.", value=online)
        yield GaugeMetricFamily("broker_peergroups_records",
                                "Live records and records awaiting expiry (no tombstones).",
                                value=records)
        yield GaugeMetricFamily("broker_peergroups_direct_connections",
                                "Open direct connections.", value=len(self.pg.directs))
