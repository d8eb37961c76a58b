# -*- test-case-name: tests.test_webpubsub_reload -*-
"""
C{SIGHUP} and the Web PubSub face (L{broker.webpubsub.reload}): real
C{twistd broker} processes that keep running and keep their clients while
their access keys rotate, and the service tree of L{broker.tap} reloading
anonymous access, event handlers, hubs, limits and listeners from its
configuration file, over real sockets.
"""

import json

import treq
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.application.service import IServiceCollection
from azure.core.exceptions import HttpResponseError
from azure.messaging.webpubsubservice import WebPubSubServiceClient
from twisted.internet import defer, reactor, task, threads
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import capturedLogs, formatEvent
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from broker import config, tap
from broker.auth.tokens import makeClientToken
from tests.test_iot_face import listeningPort
from tests.test_tap import TwistdTestsMixin, handshake
from tests.wsharness import Client, ConnectionRefusedByServer

OLD = "old-access-key-0123456789abcdef0123"
NEW = "new-access-key-fedcba9876543210fedc"
LOOPBACK = "tcp:0:interface=127.0.0.1"


def configText(state, hubText="", webpubsub="", faces=True):
    """
    A configuration with only the Web PubSub face (and admin) on loopback
    ports; C{faces=False} disables Web PubSub too.
    """
    return (f'[broker]\nstate_dir = "{state}"\ndrain_timeout = 0\n'
            f'[admin]\nlisten = ["{LOOPBACK}"]\n'
            f'[webpubsub]\nenabled = {"true" if faces else "false"}\n'
            f'listen = ["{LOOPBACK}"]\n{webpubsub}\n'
            f'[webpubsub.hubs.chat]\n{hubText}')


def keysText(*keys):
    return f"access_keys = {json.dumps(list(keys))}\n"


def deferLater(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def connect(testCase, port, hub="chat", key=None, userId=None, anonymous=False):
    """
    A JSON-subprotocol client of the broker on C{port}, its C{connected}
    message consumed; aborted when the test ends.

    @param key: the access key signing its token; none with C{anonymous}.
    """
    path = f"/client/hubs/{hub}"
    if not anonymous:
        token = makeClientToken(key, f"http://127.0.0.1:{port}{path}", userId=userId,
                                roles=["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"])
        path += "?access_token=" + token
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}",
                                     protocols=["json.webpubsub.azure.v1"], reactor=reactor)
    factory.protocol = Client
    factory.setProtocolOptions(autoPingInterval=0, failByDrop=False)
    proto = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)

    def abort():
        if proto.transport is not None and proto.state != proto.STATE_CLOSED:
            proto.transport.abortConnection()
        return proto.closed
    testCase.addCleanup(abort)
    yield proto.opened
    hello = yield proto.nextJSON()
    proto.connectionId = hello["connectionId"]
    return proto


@defer.inlineCallbacks
def refusedStatus(port, hub="chat", key=None):
    """
    The status line's code of a handshake with a token signed by C{key}
    (none without a key).
    """
    path = f"/client/hubs/{hub}"
    if key is not None:
        path += "?access_token=" + makeClientToken(key, f"http://127.0.0.1:{port}{path}")
    status = yield handshake(port, path)
    return status.split(b" ", 2)[1]


class SDK:
    """
    The official service SDK (a connection string per key), its blocking
    calls run in threads.
    """

    def __init__(self, testCase, port, key, hub="chat"):
        self.client = WebPubSubServiceClient.from_connection_string(
            f"Endpoint=http://127.0.0.1:{port};AccessKey={key};Version=1.0;", hub=hub)
        testCase.addCleanup(threads.deferToThread, self.client.close)

    def sendToAll(self, text):
        return threads.deferToThread(self.client.send_to_all, text, content_type="text/plain")

    @defer.inlineCallbacks
    def status(self, text):
        """
        The status of a send to all: 202, or the refusal's.
        """
        try:
            yield self.sendToAll(text)
        except HttpResponseError as e:
            return e.status_code
        return 202


@defer.inlineCallbacks
def receives(testCase, client, text):
    frame = yield client.nextJSON()
    testCase.assertEqual((frame["type"], frame.get("data")), ("message", text), frame)


class ProcessTests(TwistdTestsMixin, TestCase):
    """
    C{twistd -n broker --config FILE} given C{SIGHUP}.
    """

    timeout = 90

    @defer.inlineCallbacks
    def start(self, text=None, listeners=("webpubsub.listen[0]", "admin.listen[0]")):
        self.directory = FilePath(self.mktemp())
        self.directory.makedirs()
        self.state = self.directory.child("state").path
        self.path = self.directory.child("broker.toml")
        self.path.setContent((text or configText(self.state, keysText(OLD))).encode())
        self.proc = self.spawn(["-n", "--pidfile=", "broker", "--config", self.path.path],
                               self.directory, listeners)
        ports = yield self.proc.listening
        self.admin = ports["admin.listen[0]"]
        self.port = ports.get("webpubsub.listen[0]")
        # Listening happens before the reactor runs; a served request
        # proves the signal handlers are in place.
        yield self.healthz()

    @defer.inlineCallbacks
    def healthz(self):
        response = yield treq.get(f"http://127.0.0.1:{self.admin}/healthz", reactor=reactor,
                                  persistent=False)
        body = yield treq.content(response)
        return response.code, body

    def rewrite(self, hubText, webpubsub=""):
        self.path.setContent(configText(self.state, hubText, webpubsub).encode())

    @defer.inlineCallbacks
    def hangup(self, expect):
        """
        SIGHUP the broker and wait until it logs C{expect}.

        @return: the lines logged since the signal.
        """
        before = len(self.proc.lines())
        self.proc.transport.signalProcess("HUP")
        for _ in range(200):
            lines = self.proc.lines()[before:]
            if any(expect in line for line in lines):
                return lines
            if self.proc.ended.called:
                break
            yield deferLater(0.05)
        self.fail(f"no {expect!r} after SIGHUP:\n{self.proc.text()}")

    @defer.inlineCallbacks
    def test_onlyWebPubSubSurvivesAndKeepsClients(self):
        """
        With only the Web PubSub face, SIGHUP reloads it: the broker runs on
        and a client connected before still receives.
        """
        yield self.start()
        client = yield connect(self, self.port, key=OLD)
        lines = yield self.hangup("webpubsub: reloaded:")
        self.assertIn("webpubsub: reloaded: nothing changed",
                      [line.split("] ", 1)[-1] for line in lines])
        yield self.hangup("webpubsub: reloaded:")
        self.assertFalse(self.proc.ended.called)
        yield SDK(self, self.port, OLD).sendToAll("after")
        yield receives(self, client, "after")
        self.assertNotIn("Traceback", self.proc.text())

    @defer.inlineCallbacks
    def test_everyFaceDisabledSurvives(self):
        """
        With every face disabled but admin, SIGHUP is taken all the same.
        """
        yield self.start(configText(FilePath(self.mktemp()).path, faces=False),
                         ["admin.listen[0]"])
        yield self.hangup("SIGHUP: reloading")
        yield self.hangup("SIGHUP: reloading")
        code, body = yield self.healthz()
        self.assertEqual((code, body), (200, b"ok\n"))
        self.assertFalse(self.proc.ended.called)

    @defer.inlineCallbacks
    def test_keyRotation(self):
        """
        The documented rotation: add the new key next to the old, SIGHUP,
        move to the new key, remove the old, SIGHUP.  Clients connected
        with the old key stay connected throughout; in between both keys
        work (WebSocket and REST); afterwards the old key is refused (401)
        and the clients it admitted still receive what the new key sends.
        """
        yield self.start()
        early = yield connect(self, self.port, key=OLD, userId="early")
        oldSDK, newSDK = SDK(self, self.port, OLD), SDK(self, self.port, NEW)
        self.assertEqual((yield newSDK.status("refused")), 401)
        self.assertEqual((yield refusedStatus(self.port, key=NEW)), b"401")

        self.rewrite(keysText(NEW, OLD))
        lines = yield self.hangup("webpubsub: reloaded:")
        self.assertTrue(any("hub chat access keys 2 (was 1)" in line for line in lines), lines)
        late = yield connect(self, self.port, key=NEW, userId="late")
        also = yield connect(self, self.port, key=OLD, userId="also")
        yield oldSDK.sendToAll("from old")
        yield newSDK.sendToAll("from new")
        for client in (early, late, also):
            yield receives(self, client, "from old")
            yield receives(self, client, "from new")

        self.rewrite(keysText(NEW))
        lines = yield self.hangup("webpubsub: reloaded:")
        self.assertTrue(any("hub chat access keys 1 (was 2)" in line for line in lines), lines)
        self.assertEqual((yield refusedStatus(self.port, key=OLD)), b"401")
        self.assertEqual((yield oldSDK.status("refused")), 401)
        yield newSDK.sendToAll("after rotation")
        for client in (early, late, also):
            yield receives(self, client, "after rotation")
            self.assertIsNone(client.closeCode)
        self.assertNotIn("Traceback", self.proc.text())

    @defer.inlineCallbacks
    def test_invalidFileChangesNothing(self):
        """
        A file that no longer validates is refused in one line naming the
        key; the running settings stay, and a later good file is taken.
        """
        yield self.start()
        client = yield connect(self, self.port, key=OLD)
        self.rewrite(keysText(NEW) + "plain_mode = 'loud'\n")
        lines = yield self.hangup("webpubsub: reload refused")
        refused = [line for line in lines if "reload refused" in line]
        self.assertEqual(len(refused), 1, lines)
        self.assertIn("webpubsub.hubs.chat.plain_mode", refused[0])
        self.assertNotIn("Traceback", "\n".join(lines))
        self.assertEqual((yield refusedStatus(self.port, key=NEW)), b"401")
        yield SDK(self, self.port, OLD).sendToAll("still")
        yield receives(self, client, "still")

        self.rewrite(keysText(NEW))
        yield self.hangup("webpubsub: reloaded:")
        yield SDK(self, self.port, NEW).sendToAll("fixed")
        yield receives(self, client, "fixed")


class Upstream(Resource):
    """
    An event handler that agrees to be validated and records the events
    it is sent, by name.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.events = []

    def render_OPTIONS(self, request):
        request.setHeader(b"WebHook-Allowed-Origin", b"*")
        return b""

    def render_POST(self, request):
        self.events.append(request.getHeader(b"ce-eventname").decode())
        request.setResponseCode(204)
        return b""


class ServiceTreeTests(TestCase):
    """
    L{tap.buildService} with its configuration file, reloaded as SIGHUP
    does (C{top.reloader.reload()}).
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.directory = FilePath(self.mktemp())
        self.directory.makedirs()
        self.state = self.directory.child("state").path
        self.path = self.directory.child("broker.toml")
        yield self.startBroker(keysText(OLD))

    @defer.inlineCallbacks
    def startBroker(self, hubText, webpubsub=""):
        self.rewrite(hubText, webpubsub)
        self.top = tap.buildService(config.load(self.path.path), reactor,
                                    loadSettings=lambda: config.load(self.path.path))
        self.top.privilegedStartService()
        self.top.startService()
        self.addCleanup(self.top.stopService)
        listener = IServiceCollection(self.top).getServiceNamed("webpubsub.listen[0]")
        self.port = (yield listeningPort(listener)).getHost().port

    def rewrite(self, hubText, webpubsub=""):
        self.path.setContent(configText(self.state, hubText, webpubsub).encode())

    def reload(self, hubText, webpubsub=""):
        """
        Rewrite the file and reload; the lines logged.
        """
        self.rewrite(hubText, webpubsub)
        with capturedLogs() as events:
            self.top.reloader.reload()
        return [formatEvent(e) for e in events]

    def handlerServer(self):
        upstream = Upstream()
        port = reactor.listenTCP(0, Site(upstream), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return upstream, f"http://127.0.0.1:{port.getHost().port}"

    @defer.inlineCallbacks
    def test_allowAnonymous(self):
        """
        Turning C{allow_anonymous} on admits anonymous clients from then on;
        turning it off again refuses new ones, and the one admitted stays.
        """
        self.assertEqual((yield refusedStatus(self.port)), b"401")
        lines = self.reload(keysText(OLD) + "allow_anonymous = true\n")
        self.assertIn("hub chat allow_anonymous true (was false)", lines[-1])
        anonymous = yield connect(self, self.port, anonymous=True)
        self.reload(keysText(OLD))
        self.assertEqual((yield refusedStatus(self.port)), b"401")
        yield SDK(self, self.port, OLD).sendToAll("hello")
        yield receives(self, anonymous, "hello")

    @defer.inlineCallbacks
    def test_eventHandlerURL(self):
        """
        A new event handler URL takes the events of new connections; hubs
        that gain handlers get them, hubs that lose them send none.
        """
        first, firstURL = self.handlerServer()
        second, secondURL = self.handlerServer()
        handler = ('[[webpubsub.hubs.chat.event_handlers]]\n'
                   'url_template = "{url}/{{event}}"\nsystem_events = ["connect"]\n')
        self.reload(keysText(OLD) + handler.format(url=firstURL))
        yield connect(self, self.port, key=OLD)
        self.assertEqual(first.events, ["connect"])
        lines = self.reload(keysText(OLD) + handler.format(url=secondURL))
        self.assertIn("hub chat handlers changed", lines[-1])
        yield connect(self, self.port, key=OLD)
        self.assertEqual((first.events, second.events), (["connect"], ["connect"]))
        self.reload(keysText(OLD))
        yield connect(self, self.port, key=OLD)
        self.assertEqual((first.events, second.events), (["connect"], ["connect"]))

    @defer.inlineCallbacks
    def test_badHandlerURLChangesNothing(self):
        lines = self.reload(keysText(NEW) + '[[webpubsub.hubs.chat.event_handlers]]\n'
                                            'url_template = "ftp://example/{event}"\n')
        refused = [line for line in lines if "reload refused" in line]
        self.assertEqual(len(refused), 1, lines)
        self.assertIn("webpubsub.hubs.chat.event_handlers[0].url_template", refused[0])
        yield connect(self, self.port, key=OLD)
        self.assertEqual((yield refusedStatus(self.port, key=NEW)), b"401")

    @defer.inlineCallbacks
    def test_hubsAddedAndRemoved(self):
        """
        A hub added with its own keys takes them; once removed from the
        file it falls back to the face's keys.  Its clients stay.
        """
        self.reload(keysText(OLD), webpubsub=keysText(OLD) + "\n[webpubsub.hubs.other]\n"
                    + keysText(NEW))
        self.assertEqual((yield refusedStatus(self.port, "other", OLD)), b"401")
        client = yield connect(self, self.port, "other", NEW)
        lines = self.reload(keysText(OLD), webpubsub=keysText(OLD))
        self.assertIn("hub other removed (face defaults)", lines[-1])
        yield connect(self, self.port, "other", OLD)
        self.assertEqual((yield refusedStatus(self.port, "other", NEW)), b"401")
        yield SDK(self, self.port, OLD, hub="other").sendToAll("kept")
        yield receives(self, client, "kept")

    @defer.inlineCallbacks
    def test_developmentKey(self):
        """
        With no key configured the development key signs tokens; a reload
        that configures keys replaces it, one that removes them brings it
        back.
        """
        self.reload("")
        dev = self.directory.child("state").child("webpubsub-access-key").getContent()
        dev = dev.decode().strip()
        yield connect(self, self.port, key=dev)
        self.reload(keysText(NEW))
        self.assertEqual((yield refusedStatus(self.port, key=dev)), b"401")
        lines = self.reload("")
        self.assertTrue(any("using the development key" in line for line in lines), lines)
        yield connect(self, self.port, key=dev)

    @defer.inlineCallbacks
    def test_connectionLimit(self):
        """
        A lowered C{max_connections_per_user} refuses new connections
        (429) and leaves the open ones be.
        """
        first = yield connect(self, self.port, key=OLD, userId="u")
        yield connect(self, self.port, key=OLD, userId="u")
        lines = self.reload(keysText(OLD), webpubsub="max_connections_per_user = 1\n")
        self.assertIn("max_connections_per_user 1 (was 100)", lines[-1])
        with self.assertRaises(ConnectionRefusedByServer) as e:
            yield connect(self, self.port, key=OLD, userId="u")
        self.assertIn("429", str(e.exception))
        yield SDK(self, self.port, OLD).sendToAll("both")
        yield receives(self, first, "both")

    @defer.inlineCallbacks
    def test_listenersAdded(self):
        """
        A file listener added by a reload gets the events that follow.
        """
        log = self.directory.child("events.jsonl")
        lines = self.reload(keysText(OLD) + f'event_log = "{log.path}"\n')
        self.assertIn("hub chat listeners changed", lines[-1])
        client = yield connect(self, self.port, key=OLD, userId="ann")
        self.assertEqual(client.closeCode, None)
        records = [json.loads(line) for line in log.getContent().splitlines()]
        self.assertEqual([r["type"] for r in records], ["azure.webpubsub.sys.connected"])

    def test_restartKeysNamed(self):
        """
        Keys read only at start-up are named in a warning; their running
        values stay.
        """
        lines = self.reload(keysText(OLD) + "history_messages = 10\n",
                            webpubsub="max_frame_size = 2048\n")
        warning = [line for line in lines if "need a restart" in line]
        self.assertEqual(len(warning), 1, lines)
        self.assertIn("webpubsub.max_frame_size, webpubsub.hubs.chat.history_messages",
                      warning[0])
