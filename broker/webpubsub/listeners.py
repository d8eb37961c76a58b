# -*- test-case-name: tests.test_webpubsub_listeners -*-
"""
Event listeners: listen-only sinks for a hub's client events.

Azure's event listeners receive the same events as event handlers but
cannot answer them: they are for audit trails, analytics and replication.
Here a listener is anything providing L{IEventListener}.  One is built in,
L{JSONLinesFile}, which appends each event as one JSON line to a file
(C{event_log} in a hub's table); operators add their own as Twisted plugins
providing L{IEventListenerFactory} (drop a module into C{twisted/plugins/}
and name it in C{event_listeners}).

Every event comes from an L{IHubObserver}: C{connected},
C{disconnected}, and client events (C{message} and custom events) whether
or not the hub has an event handler for them.  A listener that raises is logged (once) and never
disturbs the hub.
"""

import json
import os
import time
from datetime import datetime, timezone

from twisted.application import service
from twisted.logger import Logger
from twisted.plugin import getPlugins
from zope.interface import Attribute, Interface, implementer

from broker.config import ConfigError
from broker.core import jsonstrict
from broker.core.interfaces import IHubObserver
from broker.core.message import BINARY
from broker.files import openPrivate

log = Logger()


class IEventListener(Interface):
    """
    Told of every event of the hubs it listens to; its return value is
    ignored.
    """

    def eventReceived(event):
        """
        @param event: a JSON-ready dict: C{time} (ISO 8601, UTC), C{hub},
            C{type} (C{"sys"} or C{"user"}), C{event} (C{connected},
            C{disconnected}, C{message} or a custom name), C{connectionId},
            C{userId}; C{reason} for C{disconnected}; C{dataType} and
            C{data} (text, JSON value or base64) for user events.
        """

    def close():
        """
        The broker is stopping: flush and release what the listener holds.
        """


class IEventListenerFactory(Interface):
    """
    A plugin that makes listeners, found by L{twisted.plugin.getPlugins}.
    """

    name = Attribute("The name a hub's event_listeners setting uses (str).")

    def build(hubName):
        """
        @return: an L{IEventListener} for hub C{hubName}.
        """


@implementer(IEventListener)
class JSONLinesFile:
    """
    Appends each event as one JSON line to a file, flushed per event so a
    tail -f or a log shipper sees it at once.  Writes are small appends to
    a local file, as Twisted's own log files do; a failing write (disk
    full) is logged once and the event counted in L{dropped}.
    """

    def __init__(self, path):
        self.path = path
        # The events carry messages: a new file is 0600 (an existing one
        # keeps the mode its operator gave it, e.g. for a log shipper).
        fd = openPrivate(path, os.O_WRONLY | os.O_APPEND, narrow=False, makeDirectory=False)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self.dropped = 0
        self._failed = False

    def eventReceived(self, event):
        try:
            self._file.write(json.dumps(event, ensure_ascii=False, separators=(",", ":")))
            self._file.write("\n")
            self._file.flush()
        except (OSError, ValueError) as e:
            self.dropped += 1
            if not self._failed:
                self._failed = True
                log.error("event log {path}: cannot write ({why}); dropping events",
                          path=self.path, why=e)

    def close(self):
        if not self._file.closed:
            self._file.close()


def findFactory(name, package=None):
    """
    The L{IEventListenerFactory} plugin called C{name}, or None.

    @param package: where to look (default: C{twisted.plugins}).
    """
    for factory in getPlugins(IEventListenerFactory, package):
        if getattr(factory, "name", None) == name:
            return factory
    return None


@implementer(IHubObserver)
class _HubEvents:
    def __init__(self, hubName, listeners, clock):
        self.hubName = hubName
        self.listeners = listeners
        self.clock = clock
        self.running = True
        self._broken = set()

    def record(self, kind, event, session):
        when = datetime.fromtimestamp(self.clock(), timezone.utc)
        return {"time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "hub": self.hubName, "type": kind, "event": event,
                "connectionId": session.connectionId, "userId": session.userId}

    def emit(self, record):
        if not self.running:
            return
        for listener in self.listeners:
            try:
                listener.eventReceived(record)
            except Exception:
                if listener not in self._broken:
                    self._broken.add(listener)
                    log.failure("event listener {listener} failed on hub {hub}",
                                listener=listener, hub=self.hubName)

    def connectionAdded(self, hub, session):
        if getattr(session.connection, "moving", False):
            return  # a reliable connection moving between nodes (handover.py)
        self.emit(self.record("sys", "connected", session))

    def connectionRemoved(self, hub, session, reason):
        if getattr(session.connection, "moving", False):
            return
        record = self.record("sys", "disconnected", session)
        record["reason"] = reason
        self.emit(record)

    def clientEvent(self, hub, session, event, message):
        record = self.record("user", event, session)
        record["dataType"] = message.dataType
        if message.dataType == BINARY:
            record["data"] = message.jsonField().decode("ascii")[1:-1]
        else:
            record["data"] = jsonstrict.loads(message.jsonField())
        self.emit(record)


class EventListeners(service.Service):
    """
    The listeners of every hub that has some, attached to each hub as it is
    created and closed when the broker stops.

    @param hubsConfig: the C{webpubsub.hubs} table.
    @param package: where plugins are looked for (tests); default
        C{twisted.plugins}.
    @raise ConfigError: an unknown plugin name or an event log that cannot
        be opened, naming the key.
    """

    name = "webpubsub.listeners"

    def __init__(self, core, hubsConfig, clock=time.time, package=None):
        self.core = core
        self.clock = clock
        self._listeners = {}
        self._events = []
        try:
            for hubName, cfg in sorted(hubsConfig.items()):
                listeners = []
                key = f"webpubsub.hubs.{hubName}"
                for name in cfg["event_listeners"]:
                    factory = findFactory(name, package)
                    if factory is None:
                        raise ConfigError(f"{key}.event_listeners",
                                          f"no IEventListener plugin named {name!r}")
                    listeners.append(IEventListener(factory.build(hubName)))
                if cfg["event_log"]:
                    try:
                        listeners.append(JSONLinesFile(cfg["event_log"]))
                    except OSError as e:
                        raise ConfigError(f"{key}.event_log", f"cannot open it: {e}")
                if listeners:
                    self._listeners[hubName] = listeners
        except Exception:
            self._closeAll()
            raise

    @property
    def configured(self):
        """
        Whether any hub has a listener (else the service need not run).
        """
        return bool(self._listeners)

    def startService(self):
        super().startService()
        self.core.onNewHub(self._setup)

    def _setup(self, hub):
        listeners = self._listeners.get(hub.name)
        if listeners and self.running:
            events = _HubEvents(hub.name, listeners, self.clock)
            self._events.append(events)
            hub.addObserver(events)

    def stopService(self):
        super().stopService()
        self._closeAll()

    def _closeAll(self):
        for events in self._events:
            events.running = False
        for listeners in self._listeners.values():
            for listener in listeners:
                try:
                    listener.close()
                except Exception:
                    log.failure("closing event listener {listener}", listener=listener)


__all__ = ["IEventListener", "IEventListenerFactory", "JSONLinesFile",
           "EventListeners", "findFactory"]
