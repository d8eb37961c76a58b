# -*- test-case-name: tests.test_tap -*-
"""
C{twistd broker}: options and the service tree.

C{makeService} returns a L{MultiService}: the core first, then one listening
service per configured listener, each named after its configuration key so a
listener that cannot start is reported by key.
"""

import os
import secrets
import sys

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from broker import config as brokerconfig
from broker.admin.resource import makeAdminSite
from broker.core.router import Core
from broker.webpubsub.site import makeFactory, makeSite

log = Logger()

ACCESS_KEY_FILE = "webpubsub-access-key"


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("Run the broker. With no --config, the embedded default "
                "etc/broker.toml is used (every face on loopback ports).")
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: the embedded etc/broker.toml)."],
    ]

    def postOptions(self):
        try:
            self["settings"] = brokerconfig.load(self["config"])
        except brokerconfig.ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}")


class ListenerService(StreamServerEndpointService):
    """
    Listens on one configured endpoint; a failure to listen stops start-up
    with one line naming the configuration key.
    """

    _raiseSynchronously = True

    def __init__(self, key, description, endpoint, factory):
        super().__init__(endpoint, factory)
        self.key = key
        self.description = description
        self.setName(key)

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except Exception as e:
            raise ListenError(f"{self.key}: cannot listen on {self.description!r}: {e}") from None


class ListenError(Exception):
    """
    A configured listener could not be opened.
    """


def developmentKey(stateDir):
    """
    Read or create the development access key used when none is configured.
    It is written with mode 0600 and never logged.
    """
    path = os.path.join(stateDir, ACCESS_KEY_FILE)
    try:
        with open(path, encoding="ascii") as f:
            key = f.read().strip()
        if key:
            return key, path
    except FileNotFoundError:
        pass
    os.makedirs(stateDir, exist_ok=True)
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key + "\n")
    return key, path


def buildService(settings, reactor):
    """
    The broker's service tree for validated C{settings}.
    """
    top = service.MultiService()
    core = Core(reactor, fanoutChunk=settings["webpubsub"]["fanout_chunk"])
    core.setServiceParent(top)
    top.core = core

    def listen(section, factory):
        for i, desc in enumerate(settings[section]["listen"]):
            key = f"{section}.listen[{i}]"
            ListenerService(key, desc, serverFromString(reactor, desc), factory).setServiceParent(top)

    wps = settings["webpubsub"]
    if wps["enabled"]:
        keys = wps["access_keys"]
        if not keys:
            key, path = developmentKey(settings["broker"]["state_dir"])
            keys = [key]
            log.warn("webpubsub.access_keys is empty: using the development key in {path}",
                     path=path)
        listen("webpubsub", makeSite(makeFactory(core, wps, keys, reactor)))
    listen("admin", makeAdminSite(core))
    return top


def makeService(options):
    from twisted.internet import reactor

    try:
        return buildService(options["settings"], reactor)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"broker: cannot start: {e}\n")
        raise SystemExit(1)
