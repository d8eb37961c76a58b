# -*- test-case-name: tests.test_collectors -*-
"""
The process-wide collectors of C{/metrics}, on the broker's own registry.

prometheus_client's C{ProcessCollector} (CPU seconds, resident and virtual
memory, open and maximum file descriptors, start time),
C{PlatformCollector} (C{python_info}) and C{GCCollector} (collections and
objects per generation), and L{broker.version.BuildInfoCollector}
(C{broker_build_info}), and C{broker_handshakes_refused_total}.  They register on the registry given, never on
prometheus_client's global one: each broker, and each worker process of
C{cluster.workers}, serves its own.
"""

from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

from broker.logs import RefusalCollector
from broker.version import BuildInfoCollector


def registerCollectors(registry, core):
    """
    Add the process, platform, GC and build-info collectors to C{registry},
    and the count of C{core}'s refused handshakes
    (L{broker.logs.RefusalCollector}).
    """
    registry.register(RefusalCollector(core.refusals))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(BuildInfoCollector())
