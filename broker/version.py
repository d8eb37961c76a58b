# -*- test-case-name: tests.test_version -*-
"""
The broker's version, and what an operator reads it from: C{twistd broker
--version}, the start-up log line, C{/healthz} (the C{X-Broker-Version}
header; C{version:} lines with C{?verbose}) and the C{broker_build_info}
gauge on C{/metrics}.

The one source is C{broker.__version__} (C{setup.py} reads it from
C{broker/__init__.py}); an installation whose package lost it falls back
to the installed distribution's metadata.
"""

import platform
import sys

import twisted
from prometheus_client.core import GaugeMetricFamily


def brokerVersion():
    import broker

    version = getattr(broker, "__version__", None)
    if version:
        return version
    from importlib import metadata
    try:
        return metadata.version("broker")
    except metadata.PackageNotFoundError:
        return "unknown"


def versions():
    """
    C{{"broker", "python", "twisted", "platform"}}: what a bug report needs.
    """
    return {
        "broker": brokerVersion(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "platform": f"{sys.platform}-{platform.machine()}",
    }


def versionText():
    """
    What C{twistd broker --version} prints.
    """
    v = versions()
    return (f"broker {v['broker']}\n"
            f"Twisted {v['twisted']}\n"
            f"Python {v['python']} ({platform.python_implementation()}, {v['platform']})\n")


def startupLine():
    v = versions()
    return (f"broker {v['broker']} starting (Twisted {v['twisted']}, "
            f"Python {v['python']}, {v['platform']})")


class BuildInfoCollector:
    """
    C{broker_build_info{version, python, twisted, platform} 1}: the usual
    Prometheus info gauge, to join on or to alert on mixed versions.
    """

    def collect(self):
        v = versions()
        g = GaugeMetricFamily("broker_build_info", "The broker's build; always 1.",
                              labels=["version", "python", "twisted", "platform"])
        g.add_metric([v["broker"], v["python"], v["twisted"], v["platform"]], 1)
        yield g
