# -*- test-case-name: tests.test_webpubsub_express -*-
"""
Microsoft's own event-handler middleware, C{@azure/web-pubsub-express}
(C{WebPubSubEventHandler}, unchanged, default path), run by node as the
event handler of the broker; and Microsoft's C{@azure/web-pubsub-client}
calling C{invokeEvent()} through it.  tests/js/express_handler.js and
tests/js/invoke_client.js report what they saw as JSON lines.
"""

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from broker.auth.tokens import makeClientToken
from broker.webpubsub.face import attachEventHandlers
from tests.nodejs import JSONLines, requireNode, spawnNode
from tests.test_tap import TwistdTestsMixin, writeConfig
from tests.wsharness import KEY, BrokerHarness, Client


@defer.inlineCallbacks
def until(predicate, timeout=20.0):
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("timed out")


class ExpressEventHandlerTests(TestCase):
    """
    The middleware on express 4 (the module C{express}, as its samples
    use); L{ExpressFiveEventHandlerTests} runs the same on express 5.
    """

    timeout = 60
    # The npm module express_handler.js loads (tests/js/package.json), and
    # the major version it must be.
    expressModule = "express"
    expressMajor = "4"

    def spawn(self, script, *args):
        node = JSONLines()
        return node, spawnNode(self, node, script, *args,
                               env={"EXPRESS": self.expressModule})

    @defer.inlineCallbacks
    def startExpress(self):
        node, process = self.spawn("express_handler.js", "chat")
        self.addCleanup(process.closeStdin)
        yield until(lambda: node.events("listening") or node.ended.called)
        self.assertTrue(node.events("listening"), node.stderr.decode()[-2000:])
        listening = node.events("listening")[0]
        self.assertEqual(listening["express"].split(".")[0], self.expressMajor)
        return node, listening["port"]

    @defer.inlineCallbacks
    def startBroker(self, port, presence=False):
        toml = (f'[webpubsub]\nevent_timeout = 2.0\n[webpubsub.hubs.chat]\n'
                f'access_keys = ["{KEY}"]\n'
                '[[webpubsub.hubs.chat.event_handlers]]\n'
                f'url_template = "http://127.0.0.1:{port}/api/webpubsub/hubs/{{hub}}/{{event}}"\n'
                'user_events = "*"\n'
                'system_events = ["connect", "connected", "disconnected"]\n'
                + ('group_presence_events = ["joined", "left"]\n' if presence else ''))
        harness = BrokerHarness(self, reactor, toml)
        handlers = attachEventHandlers(reactor, harness.core, harness.settings["webpubsub"],
                                       [KEY])
        self.addCleanup(handlers.stop)
        self.addCleanup(lambda: defer.DeferredList(
            [hub.upstream.whenIdle() for hub in harness.core.hubs.values()]))
        yield harness.start()
        return harness, handlers

    @defer.inlineCallbacks
    def test_expressMiddlewareUnchanged(self):
        """
        The broker validates the middleware when the handlers load (on the
        C{validate} URL, which the middleware answers), then: connect
        accepted (its userId and groups applied) and refused (401),
        connected, a user event answered, disconnected.
        """
        requireNode(self.expressModule, "@azure/web-pubsub-express")
        express, port = yield self.startExpress()
        harness, handlers = yield self.startBroker(port)
        yield until(lambda: express.events("options"))
        self.assertEqual(express.events("options")[0]["path"],
                         "/api/webpubsub/hubs/chat/validate")
        handler = harness.core.hub("chat").upstream.handlers[0]
        yield until(lambda: handlers.validation.state("chat", handler)[0] != "pending")
        self.assertEqual(handlers.validation.state("chat", handler), ("valid", None))

        c = yield harness.connectJSON(query="user=ann", userId=None)
        self.assertEqual(c.hello["userId"], "ann")
        session = harness.core.hub("chat").session(c.connectionId)
        self.assertIn("express", session.groups)
        yield until(lambda: express.events("connected"))
        self.assertEqual(express.events("connected")[0]["userId"], "ann")

        c.send({"type": "event", "event": "greet", "dataType": "text", "data": "hi",
                "ackId": 1})
        frames = [(yield c.nextJSON()), (yield c.nextJSON())]
        message = [f for f in frames if f["type"] == "message"][0]
        self.assertEqual((message["dataType"], message["data"]), ("text", "echo:hi"))
        self.assertIn({"type": "ack", "ackId": 1, "success": True}, frames)
        user = express.events("user")[0]
        self.assertEqual((user["name"], user["data"], user["userId"]), ("greet", "hi", "ann"))

        refusal = yield harness.refused(query="deny=1")
        self.assertIn("401", refusal)

        c.transport.abortConnection()
        yield until(lambda: express.events("disconnected"))
        self.assertEqual(express.events("disconnected")[0]["connectionId"], c.connectionId)

    @defer.inlineCallbacks
    def test_groupPresenceEvents(self):
        """
        A handler configured for group presence events gets joined and
        left (the middleware's onGroupJoined / onGroupLeft) for the
        connection's token groups, its own joinGroup and leaveGroup and a
        REST addition; the groups it leaves as it disconnects are not
        told one by one.
        """
        requireNode(self.expressModule, "@azure/web-pubsub-express")
        express, port = yield self.startExpress()
        harness, handlers = yield self.startBroker(port, presence=True)
        c = yield harness.connectJSON(query="user=ann", userId=None,
                                      roles=("webpubsub.joinLeaveGroup",))
        c.send({"type": "joinGroup", "group": "mine", "ackId": 1})
        yield c.nextJSON()
        c.send({"type": "leaveGroup", "group": "mine", "ackId": 2})
        yield c.nextJSON()
        yield harness.core.hub("chat").addConnectionToGroup(c.connectionId, "added")
        yield until(lambda: len(express.events("groupJoined")) == 3
                    and express.events("groupLeft"))
        self.assertEqual(sorted(e["group"] for e in express.events("groupJoined")),
                         ["added", "express", "mine"])
        self.assertEqual([e["group"] for e in express.events("groupLeft")], ["mine"])
        self.assertEqual({e["connectionId"] for e in express.events("groupJoined")},
                         {c.connectionId})
        c.transport.abortConnection()
        yield until(lambda: express.events("disconnected"))
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(len(express.events("groupLeft")), 1)

    @defer.inlineCallbacks
    def test_noPresenceUnlessAsked(self):
        """
        Without group_presence_events, a join is not told.
        """
        requireNode(self.expressModule, "@azure/web-pubsub-express")
        express, port = yield self.startExpress()
        harness, handlers = yield self.startBroker(port)
        c = yield harness.connectJSON(query="user=bob", userId=None)
        yield until(lambda: express.events("connected"))
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(express.events("groupJoined"), [])
        c.sendClose()
        yield c.closed

    @defer.inlineCallbacks
    def test_invokeEventThroughExpress(self):
        """
        C{WebPubSubClient.invokeEvent()} is answered through the handler;
        a failing handler, an event nobody takes and a handler that never
        answers come back as the documented errors.
        """
        requireNode(self.expressModule, "@azure/web-pubsub-express",
                    "@azure/web-pubsub-client")
        express, port = yield self.startExpress()
        harness, handlers = yield self.startBroker(port)
        url = f"{harness.url}/client/hubs/chat?access_token=" + harness.token(userId="js")
        client, _ = self.spawn("invoke_client.js", url, "echo", "fail", "slow")
        yield until(lambda: client.events("done") or client.events("failed")
                    or client.ended.called, timeout=40)
        self.assertEqual(client.events("failed"), [], client.stderr.decode()[-2000:])
        results = {e["name"]: e for e in client.events("result") + client.events("error")}
        self.assertEqual((results["echo"]["event"], results["echo"]["data"],
                          results["echo"]["dataType"]), ("result", "echo:ping-echo", "text"))
        self.assertEqual((results["fail"]["event"], results["fail"]["errorName"]),
                         ("error", "InternalServerError"))
        self.assertEqual((results["slow"]["event"], results["slow"]["errorName"]),
                         ("error", "Timeout"))
        names = [e["name"] for e in express.events("user")]
        self.assertEqual(names, ["echo", "fail", "slow"])


class ExpressWithTwistdTests(TwistdTestsMixin, TestCase):
    """
    The same middleware as the event handler of a real C{twistd broker}
    process: validated when the broker starts, then connect, connected, a
    user event and disconnected, as a backend moving from Azure would run
    it.
    """

    timeout = 60
    expressModule = "express"
    expressMajor = "4"

    @defer.inlineCallbacks
    def test_realBroker(self):
        requireNode(self.expressModule, "@azure/web-pubsub-express")
        express = JSONLines()
        process = spawnNode(self, express, "express_handler.js", "chat",
                            env={"EXPRESS": self.expressModule})
        self.addCleanup(process.closeStdin)
        yield until(lambda: express.events("listening") or express.ended.called)
        listening = express.events("listening")[0]
        self.assertEqual(listening["express"].split(".")[0], self.expressMajor)
        port = listening["port"]
        directory, path = writeConfig(self, (
            f'access_keys = ["{KEY}"]\n'
            '[[webpubsub.hubs.chat.event_handlers]]\n'
            f'url_template = "http://127.0.0.1:{port}/api/webpubsub/hubs/{{hub}}/{{event}}"\n'
            'user_events = "*"\n'
            'system_events = ["connect", "connected", "disconnected"]\n'))
        proc = self.spawn(["-n", "--pidfile=", "broker", "--config", path.path], directory,
                          ["webpubsub.listen[0]", "admin.listen[0]"])
        ports = yield proc.listening
        yield until(lambda: express.events("options"))
        self.assertEqual(express.events("options")[0]["path"],
                         "/api/webpubsub/hubs/chat/validate")

        url = f"ws://127.0.0.1:{ports['webpubsub.listen[0]']}/client/hubs/chat"
        token = makeClientToken(KEY, url)
        factory = WebSocketClientFactory(f"{url}?access_token={token}&user=ann",
                                         protocols=["json.webpubsub.azure.v1"],
                                         reactor=reactor)
        factory.protocol = Client
        factory.setProtocolOptions(autoPingInterval=0, failByDrop=False)
        c = yield TCP4ClientEndpoint(reactor, "127.0.0.1",
                                     ports["webpubsub.listen[0]"]).connect(factory)
        yield c.opened
        hello = yield c.nextJSON()
        self.assertEqual(hello["userId"], "ann")
        yield until(lambda: express.events("connected"))
        c.send({"type": "event", "event": "greet", "dataType": "text", "data": "hi",
                "ackId": 1})
        frames = [(yield c.nextJSON()), (yield c.nextJSON())]
        message = [f for f in frames if f["type"] == "message"][0]
        self.assertEqual(message["data"], "echo:hi")
        c.sendClose()
        yield c.closed
        yield until(lambda: express.events("disconnected"))
        self.assertEqual(express.events("disconnected")[0]["connectionId"],
                         hello["connectionId"])
        self.assertNotIn("not validated", proc.text())


class ExpressFiveEventHandlerTests(ExpressEventHandlerTests):
    """
    The same on express 5, what C{npm install express} gives a new
    project (its routing and request objects changed from 4).
    """

    expressModule = "express5"
    expressMajor = "5"


class ExpressFiveWithTwistdTests(ExpressWithTwistdTests):
    """
    L{ExpressWithTwistdTests} on express 5.
    """

    expressModule = "express5"
    expressMajor = "5"
