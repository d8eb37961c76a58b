# -*- test-case-name: tests.test_webpubsub_listeners -*-
"""
Event listeners: listen-only sinks for a hub's client events.

Azure's event listeners receive the same events as event handlers but
cannot answer them: they are for audit trails, analytics and replication.
Azure sends them CloudEvents (to Event Hubs), each listener with a filter
of the system events (C{connected}, C{disconnected}) and user events it
takes.  Here too: each event is a CloudEvent in structured JSON form
(C{application/cloudevents+json}: C{specversion}, C{type} such as
C{azure.webpubsub.sys.connected} or C{azure.webpubsub.user.message},
C{source} C{/hubs/{hub}/client/{connectionId}}, C{id}, C{time}, and
Azure's extension attributes C{awpsversion}, C{hub}, C{eventname},
C{connectionid}, C{userid}; the payload in C{data}, or C{data_base64} for
binary), handed to each listener whose filter takes it.

A listener is anything providing L{IEventListener}.  One is built in,
L{JSONLinesFile}, which appends each event as one JSON line to a file;
operators add their own as Twisted plugins providing
L{IEventListenerFactory} (drop a module into C{twisted/plugins/} and name
it).  A hub's C{listeners} array configures both, each with its filter;
the older C{event_log} and C{event_listeners} keys still work, as
listeners taking every event.

Every event comes from an L{IHubObserver}: C{connected},
C{disconnected}, and client events (C{message} and custom events) whether
or not the hub has an event handler for them.  A listener that raises is
logged (once) and never disturbs the hub.
"""

import base64
import itertools
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
from broker.core.message import BINARY, JSON
from broker.files import openPrivate

log = Logger()


class IEventListener(Interface):
    """
    Told of every event of the hubs it listens to; its return value is
    ignored.
    """

    def eventReceived(event):
        """
        @param event: a CloudEvent in structured JSON form, a JSON-ready
            dict (see the module docstring): for C{disconnected}, C{data}
            is C{{"reason": ...}}; for user events C{datacontenttype} is
            C{text/plain; charset=utf-8}, C{application/json} or
            C{application/octet-stream} and the payload is in C{data} (a
            string, a JSON value) or C{data_base64}.
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


CONTENT_TYPES = {JSON: "application/json", BINARY: "application/octet-stream"}
TEXT_TYPE = "text/plain; charset=utf-8"
ALL_SYSTEM_EVENTS = ("connected", "disconnected")


class EventFilter:
    """
    Which events a listener takes, as Azure's listener filters say it:
    system events by name, user events by C{"*"} or comma-separated names.
    """

    def __init__(self, systemEvents=ALL_SYSTEM_EVENTS, userEvents="*"):
        self.systemEvents = frozenset(systemEvents)
        names = {e.strip() for e in userEvents.split(",") if e.strip()}
        self.allUserEvents = "*" in names
        self.userEvents = frozenset(names)

    def takes(self, system, event):
        if system:
            return event in self.systemEvents
        return self.allUserEvents or event in self.userEvents


@implementer(IHubObserver)
class _HubEvents:
    """
    One hub's listeners, each with its L{EventFilter}: turns the hub's
    events into CloudEvents for those that take them.
    """

    def __init__(self, hubName, listeners, clock):
        self.hubName = hubName
        self.listeners = listeners
        self.clock = clock
        self.running = True
        self._broken = set()
        self._ids = itertools.count(1)

    def cloudEvent(self, system, event, session):
        when = datetime.fromtimestamp(self.clock(), timezone.utc)
        kind = "sys" if system else "user"
        record = {
            "specversion": "1.0",
            "type": f"azure.webpubsub.{kind}.{event}",
            "source": f"/hubs/{self.hubName}/client/{session.connectionId}",
            "id": str(next(self._ids)),
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "awpsversion": "1.0",
            "hub": self.hubName,
            "eventname": event,
            "connectionid": session.connectionId,
        }
        if session.userId is not None:
            record["userid"] = session.userId
        return record

    def emit(self, system, event, session, data):
        """
        Hand the event to the listeners that take it; C{data(record)} fills
        in the payload, only when one does.
        """
        if not self.running:
            return
        record = None
        for listener, eventFilter in self.listeners:
            if not eventFilter.takes(system, event):
                continue
            if record is None:
                record = self.cloudEvent(system, event, session)
                data(record)
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
        self.emit(True, "connected", session, _jsonData({}))

    def connectionRemoved(self, hub, session, reason):
        if getattr(session.connection, "moving", False):
            return
        self.emit(True, "disconnected", session, _jsonData({"reason": reason or ""}))

    def clientEvent(self, hub, session, event, message):
        def data(record):
            record["datacontenttype"] = CONTENT_TYPES.get(message.dataType, TEXT_TYPE)
            if message.dataType == BINARY:
                record["data_base64"] = base64.b64encode(message.data).decode("ascii")
            else:
                record["data"] = jsonstrict.loads(message.jsonField())
        self.emit(False, event, session, data)


def _jsonData(value):
    def data(record):
        record["datacontenttype"] = "application/json"
        record["data"] = value
    return data


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
        self._package = package
        self._listeners = {}
        self._config = {}
        self._events = []
        try:
            for hubName, cfg in sorted(hubsConfig.items()):
                listeners = self._build(hubName, cfg)
                if listeners:
                    self._listeners[hubName] = listeners
                    self._config[hubName] = _listenerConfig(cfg)
        except Exception:
            self._closeAll()
            raise

    def _build(self, hubName, cfg):
        """
        The listeners of one hub, each with its filter; on a failure, those
        already opened are closed.

        @raise ConfigError: naming the key.
        """
        package = self._package
        listeners = []
        key = f"webpubsub.hubs.{hubName}"
        everything = EventFilter()
        try:
            for name in cfg["event_listeners"]:
                listeners.append((self._plugin(f"{key}.event_listeners", name, hubName,
                                               package), everything))
            if cfg["event_log"]:
                listeners.append((self._file(f"{key}.event_log", cfg["event_log"]),
                                  everything))
            for i, entry in enumerate(cfg.get("listeners") or ()):
                where = f"{key}.listeners[{i}]"
                if bool(entry["file"]) == bool(entry["plugin"]):
                    raise ConfigError(where, "give exactly one of file and plugin")
                eventFilter = EventFilter(entry["system_events"], entry["user_events"])
                if entry["file"]:
                    listener = self._file(f"{where}.file", entry["file"])
                else:
                    listener = self._plugin(f"{where}.plugin", entry["plugin"], hubName,
                                            package)
                listeners.append((listener, eventFilter))
        except Exception:
            _close(listeners)
            raise
        return listeners

    def reload(self, hubsConfig):
        """
        Take the listeners of C{hubsConfig} (a reloaded C{webpubsub.hubs}):
        a hub whose listener keys are unchanged keeps its listeners (files
        stay open); a changed hub's new listeners are opened, then put in
        place of the old ones, which are closed.  All or nothing: when one
        cannot be opened, those opened are closed and nothing changes.

        @return: the names of the hubs whose listeners changed.
        @raise ConfigError: naming the key.
        """
        wanted = {name: _listenerConfig(cfg) for name, cfg in hubsConfig.items()}
        wanted = {name: c for name, c in wanted.items() if any(c)}
        changed = sorted(name for name in set(wanted) | set(self._config)
                         if wanted.get(name) != self._config.get(name))
        built = {}
        try:
            for name in changed:
                if name in wanted:
                    built[name] = self._build(name, hubsConfig[name])
        except Exception:
            for listeners in built.values():
                _close(listeners)
            raise
        for name in changed:
            old = self._listeners.pop(name, [])
            self._config.pop(name, None)
            listeners = built.get(name)
            if listeners:
                self._listeners[name] = listeners
                self._config[name] = wanted[name]
            attached = [e for e in self._events if e.hubName == name]
            for events in attached:
                events.listeners = listeners or []
            hub = self.core.existingHub(name) if self.core is not None else None
            if not attached and hub is not None:
                self._setup(hub)
            _close(old)
        return changed

    def _plugin(self, key, name, hubName, package):
        factory = findFactory(name, package)
        if factory is None:
            raise ConfigError(key, f"no IEventListener plugin named {name!r}")
        return IEventListener(factory.build(hubName))

    def _file(self, key, path):
        try:
            return JSONLinesFile(path)
        except OSError as e:
            raise ConfigError(key, f"cannot open it: {e}")

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
            _close(listeners)


def _close(listeners):
    for listener, _ in listeners:
        try:
            listener.close()
        except Exception:
            log.failure("closing event listener {listener}", listener=listener)


def _listenerConfig(cfg):
    """
    The keys of a hub's configuration that say what its listeners are.
    """
    return (tuple(cfg["event_listeners"]), cfg["event_log"],
            tuple(tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                               for k, v in entry.items()))
                  for entry in cfg.get("listeners") or ()))


__all__ = ["IEventListener", "IEventListenerFactory", "JSONLinesFile", "EventFilter",
           "EventListeners", "findFactory"]
