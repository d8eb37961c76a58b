# -*- test-case-name: tests.test_tap -*-
"""
C{twistd broker}: options, and the service twistd runs: one broker
(L{broker.service.buildService}), or with C{cluster.workers} > 1 a
supervisor of worker processes (L{broker.workers.supervisor}).

The service tree's parts are re-exported here under their former names.
"""

import os
import signal
import sys
import threading

from twisted.python import usage

from broker import config as brokerconfig
from broker.listening import ListenError, ListenerService  # noqa: F401 (re-exported)
from broker.service import BrokerService, Reloader, buildService  # noqa: F401 (re-exported)
from broker.webpubsub.face import ACCESS_KEY_FILE, developmentKey  # noqa: F401 (re-exported)
from broker.workers.supervisor import makeSupervisor

__all__ = ["Options", "makeService", "ListenError", "ListenerService", "BrokerService",
           "Reloader", "buildService", "ACCESS_KEY_FILE", "developmentKey"]


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("Run the broker. With no --config, the embedded default "
                "etc/broker.toml is used (every face on loopback ports).")
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: the embedded etc/broker.toml)."],
    ]

    def postOptions(self):
        # Absolute: a daemon changes directory, and SIGHUP reads it again.
        if self["config"] is not None:
            self["config"] = os.path.abspath(self["config"])
        try:
            self["settings"] = brokerconfig.load(self["config"])
        except brokerconfig.ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}")


def makeService(options):
    from twisted.internet import reactor

    # options.parent is twistd's own options (None when called otherwise).
    twistd = options.parent
    foreground = twistd is None or bool(twistd.get("nodaemon"))
    settings = options["settings"]
    path = options["config"]
    if threading.current_thread() is threading.main_thread():
        # Until the Reloader (or a supervisor's WorkerPool) takes SIGHUP
        # over, the signal must not end the starting broker.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        if settings["cluster"]["workers"] > 1:
            return makeSupervisor(settings, reactor, foreground, configPath=path or "")
        return buildService(settings, reactor, foreground,
                            loadSettings=lambda: brokerconfig.load(path))
    except (brokerconfig.ConfigError, OSError, ValueError) as e:
        sys.stderr.write(f"broker: cannot start: {e}\n")
        raise SystemExit(1)
