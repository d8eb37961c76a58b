# -*- test-case-name: tests.test_collectors -*-
"""
Tests for L{broker.admin.collectors} and the per-hub series: what a
running broker's C{/metrics} has before any client came.
"""

import re

import treq
from prometheus_client import REGISTRY
from twisted.internet import defer, reactor
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from tests.test_tap import LOOPBACK, servicePort, startInProcess, writeConfig


def sample(text, name, **labels):
    """
    The value of the series C{name{labels}} in exposition C{text}, or
    C{None}.
    """
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(m.group(3))
    return None


class CollectorTests(TestCase):
    """
    A broker built by L{tap.buildService} with Web PubSub hubs and an IoT
    fleet configured, scraped over HTTP before any client connects.
    """

    @defer.inlineCallbacks
    def setUp(self):
        registry = FilePath(self.mktemp())
        registry.setContent(b'[fleets.plant]\ncentral_key = "k"\n'
                            b'[fleets.plant.devices.d1]\nkey = "x"\n')
        _, path = writeConfig(self, f'[webpubsub.hubs.quiet]\n'
                                    f'[iot]\nenabled = true\nlisten = ["{LOOPBACK}"]\n'
                                    f'registry_file = "{registry.path}"\n'
                                    f'[iot.udp]\nenabled = false\n[iot.tls]\nlisten = []\n'
                                    f'[iot.http]\nenabled = false\n')
        self.top = startInProcess(self, path)
        port = servicePort(self.top, "admin.listen[0]")
        response = yield treq.get(f"http://127.0.0.1:{port}/metrics", reactor=reactor,
                                  persistent=False)
        self.metrics = (yield treq.content(response)).decode("utf-8")

    def test_processCollectors(self):
        """
        The process (CPU, memory, file descriptors), platform and GC
        collectors are on the broker's registry.
        """
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                     "process_open_fds", "process_max_fds", "process_start_time_seconds"):
            self.assertGreater(sample(self.metrics, name), 0, name)
        self.assertEqual(sample(self.metrics, "python_info"), 1)
        self.assertIsNotNone(sample(self.metrics, "python_gc_collections_total",
                                    generation="0"))
        self.assertEqual(sample(self.metrics, "broker_build_info"), 1)

    def test_notTheGlobalRegistry(self):
        """
        The collectors are the broker's, not prometheus_client's global
        registry's: a second broker (a worker process's) has its own.
        """
        self.assertIsNone(REGISTRY.get_sample_value("broker_build_info"))
        self.assertIsNot(self.top.registry, REGISTRY)

    def test_hubSeriesFromTheStart(self):
        """
        Configured hubs and IoT fleets have their series, at zero, before
        their first connection.
        """
        for hub in ("chat", "quiet", "plant"):
            self.assertNotIn(hub, self.top.core.hubs)
            for name in ("broker_connections", "broker_users", "broker_groups",
                         "broker_messages_in_total", "broker_connections_accepted_total"):
                self.assertEqual(sample(self.metrics, name, hub=hub), 0, (name, hub))
        stats = self.top.core.stats()
        self.assertEqual(stats["hubs"]["chat"]["connections"], 0)
        self.assertEqual(stats["connections"], 0)
