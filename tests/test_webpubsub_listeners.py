# -*- test-case-name: tests.test_webpubsub_listeners -*-
"""
Event listeners: the built-in JSON-lines file and operator plugins found
through twisted.plugin, fed by real WebSocket clients.
"""

import importlib
import json
import os
import sys
import textwrap

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from broker import config
from broker.config import ConfigError
from broker.webpubsub.listeners import EventListeners
from tests.wsharness import BrokerHarness

PLUGIN = textwrap.dedent('''
    from twisted.plugin import IPlugin
    from zope.interface import implementer

    from broker.webpubsub.listeners import IEventListener, IEventListenerFactory

    EVENTS = []


    @implementer(IEventListener)
    class Recorder:
        def __init__(self, hubName):
            self.hubName = hubName

        def eventReceived(self, event):
            EVENTS.append((self.hubName, event))

        def close(self):
            EVENTS.append((self.hubName, "closed"))


    @implementer(IEventListener)
    class Broken(Recorder):
        def eventReceived(self, event):
            raise RuntimeError("listener bug")


    @implementer(IPlugin, IEventListenerFactory)
    class Factory:
        def __init__(self, name, cls):
            self.name = name
            self.cls = cls

        def build(self, hubName):
            return self.cls(hubName)


    recorder = Factory("recorder", Recorder)
    broken = Factory("broken", Broken)
''')


class _Base(unittest.TestCase):
    def makePluginPackage(self):
        """
        A throwaway plugin package on sys.path, as an operator's
        twisted/plugins/ would be.
        """
        root = os.path.abspath(self.mktemp())
        name = "listenerplugins_" + str(abs(hash(root)))
        os.makedirs(os.path.join(root, name))
        with open(os.path.join(root, name, "__init__.py"), "w") as f:
            f.write("")
        with open(os.path.join(root, name, "mylisteners.py"), "w") as f:
            f.write(PLUGIN)
        sys.path.insert(0, root)
        self.addCleanup(sys.path.remove, root)
        self.addCleanup(lambda: [sys.modules.pop(m) for m in list(sys.modules)
                                 if m.startswith(name)])
        importlib.invalidate_caches()
        package = importlib.import_module(name)
        return package

    @defer.inlineCallbacks
    def startBroker(self, toml, package=None):
        self.broker = yield BrokerHarness(self, reactor, toml).start()
        hubs = self.broker.settings["webpubsub"]["hubs"]
        self.listeners = EventListeners(self.broker.core, hubs, reactor.seconds, package)
        self.listeners.startService()
        self.addCleanup(self.listeners.stopService)

    @defer.inlineCallbacks
    def untilGone(self, hub):
        for _ in range(200):
            if hub.connectionCount == 0:
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail("connection never left the hub")


class FileTests(_Base):
    @defer.inlineCallbacks
    def test_jsonLines(self):
        path = os.path.abspath(self.mktemp())
        yield self.startBroker(f'[webpubsub.hubs.chat]\nevent_log = "{path}"\n')
        c = yield self.broker.connectJSON(userId="ann")
        hub = self.broker.core.hub("chat")
        # Client events reach the listeners though the hub has no event
        # handler (as in Azure, they are acked and dropped).
        for i, (event, dataType, data) in enumerate([
                ("message", "json", {"k": "v"}), ("chat", "text", "hi"),
                ("blob", "binary", "AAE=")]):
            c.send({"type": "event", "event": event, "dataType": dataType, "data": data,
                    "ackId": i + 1})
            ack = yield c.nextJSON()
            self.assertEqual((ack["type"], ack["ackId"], ack["success"]), ("ack", i + 1, True))
        c.transport.abortConnection()
        yield self.untilGone(hub)
        # A hub without listeners: nothing, and no error.
        other = self.broker.core.hub("other")
        d = yield self.broker.connectJSON(hub="other")
        d.send({"type": "event", "event": "message", "dataType": "text", "data": "x"})
        d.transport.abortConnection()
        yield self.untilGone(other)
        with open(path, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f]
        # CloudEvents in structured JSON form, as Azure's listeners get them.
        self.assertEqual([e["type"] for e in lines],
                         ["azure.webpubsub.sys.connected", "azure.webpubsub.user.message",
                          "azure.webpubsub.user.chat", "azure.webpubsub.user.blob",
                          "azure.webpubsub.sys.disconnected"])
        self.assertEqual([e["eventname"] for e in lines],
                         ["connected", "message", "chat", "blob", "disconnected"])
        for e in lines:
            self.assertEqual((e["specversion"], e["awpsversion"], e["hub"], e["connectionid"],
                              e["userid"], e["source"]),
                             ("1.0", "1.0", "chat", c.connectionId, "ann",
                              f"/hubs/chat/client/{c.connectionId}"))
            self.assertTrue(e["time"].endswith("Z"))
        self.assertEqual(len({e["id"] for e in lines}), 5)
        self.assertEqual((lines[0]["datacontenttype"], lines[0]["data"]),
                         ("application/json", {}))
        self.assertEqual((lines[1]["datacontenttype"], lines[1]["data"]),
                         ("application/json", {"k": "v"}))
        self.assertEqual((lines[2]["datacontenttype"], lines[2]["data"]),
                         ("text/plain; charset=utf-8", "hi"))
        self.assertEqual((lines[3]["datacontenttype"], lines[3]["data_base64"]),
                         ("application/octet-stream", "AAE="))
        self.assertNotIn("data", lines[3])
        self.assertIn("reason", lines[4]["data"])

    def test_unopenableLog(self):
        settings = config.parse('[webpubsub.hubs.chat]\nevent_log = "/nonexistent/dir/x.log"\n')
        e = self.assertRaises(ConfigError, EventListeners, None,
                              settings["webpubsub"]["hubs"])
        self.assertEqual(e.key, "webpubsub.hubs.chat.event_log")
        self.assertFalse(EventListeners(None, config.parse("")["webpubsub"]["hubs"]).configured)


class PluginTests(_Base):
    @defer.inlineCallbacks
    def test_pluginReceivesEvents(self):
        package = self.makePluginPackage()
        yield self.startBroker('[webpubsub.hubs.chat]\nevent_listeners = ["recorder"]\n',
                               package)
        events = sys.modules[package.__name__ + ".mylisteners"].EVENTS
        c = yield self.broker.connectJSON(userId="bo")
        c.transport.abortConnection()
        yield self.untilGone(self.broker.core.hub("chat"))
        self.assertEqual([(h, e["eventname"], e["userid"]) for h, e in events],
                         [("chat", "connected", "bo"), ("chat", "disconnected", "bo")])
        self.listeners.stopService()
        self.assertEqual(events[-1], ("chat", "closed"))

    @defer.inlineCallbacks
    def test_brokenPluginLoggedOnce(self):
        package = self.makePluginPackage()
        yield self.startBroker(
            '[webpubsub.hubs.chat]\nevent_listeners = ["broken", "recorder"]\n', package)
        events = sys.modules[package.__name__ + ".mylisteners"].EVENTS
        a = yield self.broker.connectJSON()
        b = yield self.broker.connectJSON()
        # Both admitted; the recorder after the broken one still hears both.
        self.assertEqual([e["connectionid"] for _, e in events],
                         [a.connectionId, b.connectionId])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_unknownPlugin(self):
        package = self.makePluginPackage()
        settings = config.parse('[webpubsub.hubs.chat]\nevent_listeners = ["nope"]\n')
        e = self.assertRaises(ConfigError, EventListeners, None,
                              settings["webpubsub"]["hubs"], package=package)
        self.assertEqual(e.key, "webpubsub.hubs.chat.event_listeners")
        self.assertIn("'nope'", e.problem)


class FilterTests(_Base):
    """
    The C{listeners} array: files and plugins, each with the events it
    takes, as Azure's listener filters.
    """

    @defer.inlineCallbacks
    def test_filters(self):
        package = self.makePluginPackage()
        sysOnly = os.path.abspath(self.mktemp())
        chatOnly = os.path.abspath(self.mktemp())
        yield self.startBroker(f'''
[[webpubsub.hubs.chat.listeners]]
file = "{sysOnly}"
system_events = ["disconnected"]
user_events = ""
[[webpubsub.hubs.chat.listeners]]
file = "{chatOnly}"
system_events = []
user_events = "chat, other"
[[webpubsub.hubs.chat.listeners]]
plugin = "recorder"
''', package)
        events = sys.modules[package.__name__ + ".mylisteners"].EVENTS
        c = yield self.broker.connectJSON(userId="ann")
        for i, event in enumerate(["message", "chat", "other"]):
            c.send({"type": "event", "event": event, "dataType": "text", "data": event,
                    "ackId": i + 1})
            yield c.nextJSON()
        c.transport.abortConnection()
        yield self.untilGone(self.broker.core.hub("chat"))

        def read(path):
            with open(path, encoding="utf-8") as f:
                return [json.loads(line)["type"] for line in f]
        self.assertEqual(read(sysOnly), ["azure.webpubsub.sys.disconnected"])
        self.assertEqual(read(chatOnly), ["azure.webpubsub.user.chat",
                                          "azure.webpubsub.user.other"])
        # No filter: every event.
        self.assertEqual([e["eventname"] for _, e in events],
                         ["connected", "message", "chat", "other", "disconnected"])

    def test_fileOrPlugin(self):
        for body in ("", 'file = "x"\nplugin = "y"\n'):
            settings = config.parse(f"[[webpubsub.hubs.chat.listeners]]\n{body}")
            e = self.assertRaises(ConfigError, EventListeners, None,
                                  settings["webpubsub"]["hubs"])
            self.assertEqual(e.key, "webpubsub.hubs.chat.listeners[0]")

    def test_badSystemEvent(self):
        e = self.assertRaises(ConfigError, config.parse,
                              '[[webpubsub.hubs.chat.listeners]]\nfile = "x"\n'
                              'system_events = ["connect"]\n')
        self.assertIn("listeners", e.key)


class FaceWiringTests(unittest.TestCase):
    """
    twistd's service tree (L{broker.tap.buildService}) gives configured hubs
    their history and event log.
    """

    def test_buildService(self):
        from broker import tap
        from broker.webpubsub.history import HubHistory
        from tests.recorder import RecordingConnection

        state = os.path.abspath(self.mktemp())
        log = os.path.join(state, "events.jsonl")
        os.makedirs(state)
        settings = config.parse(f'''
[broker]
state_dir = "{state}"
[admin]
listen = ["tcp:0:interface=127.0.0.1"]
[webpubsub]
listen = ["tcp:0:interface=127.0.0.1"]
[webpubsub.hubs.chat]
history_messages = 5
event_log = "{log}"
''')
        top = tap.buildService(settings, reactor)
        self.assertIn("webpubsub.listeners", [s.name for s in top])
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        chat = top.core.hub("chat")
        self.assertIsInstance(chat.history, HubHistory)
        self.assertIsNone(top.core.hub("other").history)
        chat.admit(RecordingConnection("c1", "u"), "u")
        with open(log, encoding="utf-8") as f:
            self.assertEqual(json.loads(f.readline())["connectionid"], "c1")
