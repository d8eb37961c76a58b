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

from twisted.logger import Logger
from twisted.python import usage

from broker import config as brokerconfig
from broker import configerrors, preflight, version
from broker.listening import ListenError, ListenerService  # noqa: F401 (re-exported)
from broker.logs import jsonFileLogObserver, observeApplication, twistdLogFile
from broker.service import BrokerService, Reloader, buildService  # noqa: F401 (re-exported)
from broker.webpubsub.face import ACCESS_KEY_FILE, developmentKey  # noqa: F401 (re-exported)
from broker.workers.supervisor import makeSupervisor

__all__ = ["Options", "makeService", "ListenError", "ListenerService", "BrokerService",
           "Reloader", "buildService", "ACCESS_KEY_FILE", "developmentKey"]

log = Logger()


class Options(usage.Options):
    """
    C{twistd broker} options.  The configuration is read and checked here,
    before twistd builds anything: a configuration error ends the process
    with status 78 (EX_CONFIG) and every problem on C{stderr}.
    """

    synopsis = "[--config FILE]"
    # Where configuration errors are written (a test replaces it).
    stderr = None
    longdesc = ("Run the broker. With no --config, the embedded default "
                "etc/broker.toml is used (every face on loopback ports).")
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: the embedded etc/broker.toml)."],
    ]

    def opt_version(self):
        """
        Display the broker's version (and Twisted's, Python's) and exit.
        """
        sys.stdout.write(version.versionText())
        sys.exit(0)

    def postOptions(self):
        # Absolute: a daemon changes directory, and SIGHUP reads it again.
        if self["config"] is not None:
            self["config"] = os.path.abspath(self["config"])
        try:
            self["settings"] = preflight.load(self["config"])
        except brokerconfig.ConfigError as e:
            # Not a UsageError: twistd would print its usage text first
            # and the errors on stdout.  Nothing is built yet, so nothing
            # is written under state_dir.
            configerrors.report(e, (self.stderr or sys.stderr).write)
            raise SystemExit(configerrors.EX_CONFIG)


def makeService(options):
    from twisted.internet import reactor

    # options.parent is twistd's own options (None when called otherwise).
    twistd = options.parent
    foreground = twistd is None or bool(twistd.get("nodaemon"))
    settings = options["settings"]
    path = options["config"]
    # Logged before twistd's own start-up lines: twistd replays what was
    # logged before its observer started.
    log.info("{line}", line=version.startupLine())
    if threading.current_thread() is threading.main_thread():
        # Until the Reloader (or a supervisor's WorkerPool) takes SIGHUP
        # over, the signal must not end the starting broker.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        if settings["cluster"]["workers"] > 1:
            top = makeSupervisor(settings, reactor, foreground, configPath=path or "")
        else:
            top = buildService(settings, reactor, foreground,
                               loadSettings=lambda: brokerconfig.load(path))
    except brokerconfig.ConfigError as e:
        sys.stderr.write(f"broker: cannot start: {e}\n")
        raise SystemExit(configerrors.EX_CONFIG)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"broker: cannot start: {e}\n")
        raise SystemExit(1)
    if settings["broker"]["log_format"] == "json":
        observeApplication(top, lambda: jsonFileLogObserver(twistdLogFile(twistd)))
    return top
