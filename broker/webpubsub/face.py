# -*- test-case-name: tests.test_tap -*-
"""
Builds the Web PubSub face from C{[webpubsub]}: the client WebSocket site on
each C{webpubsub.listen} endpoint.
"""

import os
import secrets

from twisted.logger import Logger

from broker.config import ConfigError
from broker.webpubsub.listeners import EventListeners
from broker.webpubsub.rest import RestCollector
from broker.webpubsub.site import makeFactory, makeSite

log = Logger()

ACCESS_KEY_FILE = "webpubsub-access-key"


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


def build(context):
    wps = context.settings["webpubsub"]
    if not wps["enabled"]:
        return
    keys = wps["access_keys"]
    if not keys:
        try:
            key, path = developmentKey(context.stateDir)
        except OSError as e:
            raise ConfigError(
                "broker.state_dir", f"cannot keep the development access key there: {e}")
        keys = [key]
        log.warn("webpubsub.access_keys is empty: using the development key in {path}",
                 path=path)
    factory = makeFactory(context.core, wps, keys, context.reactor)
    listeners = EventListeners(context.core, wps["hubs"], context.reactor.seconds)
    if listeners.configured:
        context.addService(listeners)
    site = makeSite(factory)
    context.registry.register(RestCollector(site.restAPI))
    context.listen("webpubsub.listen", wps["listen"], site)
