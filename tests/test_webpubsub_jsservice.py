# -*- test-case-name: tests.test_webpubsub_jsservice -*-
"""
The Web PubSub REST API driven by Microsoft's JavaScript service SDK,
C{@azure/web-pubsub} (tests/js/service_client.js under node), against a
real broker listener, with real WebSocket clients watching the effects:
every hub, group, user, connection and permission verb, and the filtered
C{addConnectionsToGroups} / C{removeConnectionsFromGroups}.
"""

import json

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from tests.nodejs import JSONLines, requireNode, spawnNode
from tests.wsharness import KEY, BrokerHarness
JOIN = "webpubsub.joinLeaveGroup"
SEND = "webpubsub.sendToGroup"
TOML = """
[webpubsub]
max_groups_per_connection = 4
"""


def requireServiceSDK():
    requireNode("@azure/web-pubsub")


class ServiceSDK(JSONLines):
    """
    tests/js/service_client.js under node: C{call(op, *args)} makes one SDK
    call and fires with its result, or fails with L{SDKError}.
    """

    def __init__(self):
        super().__init__()
        self.ready = defer.Deferred()
        self._calls = {}
        self._next = 0

    def lineReceived(self, answer):
        if answer.get("ready"):
            self.ready.callback(answer)
            return
        d = self._calls.pop(answer["id"])
        if answer["ok"]:
            d.callback(answer["result"])
        else:
            d.errback(SDKError(answer["error"]))

    def processEnded(self, reason):
        for d in self._calls.values():
            d.errback(RuntimeError(f"node ended: {self.stderr!r}"))
        self._calls.clear()
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"node ended: {self.stderr!r}"))
        super().processEnded(reason)

    def call(self, op, *args, group=None):
        self._next += 1
        d = self._calls[self._next] = defer.Deferred()
        request = {"id": self._next, "op": op, "args": list(args)}
        if group is not None:
            request["group"] = group
        self.transport.write(json.dumps(request).encode("utf-8") + b"\n")
        return d


class SDKError(Exception):
    def __init__(self, error):
        super().__init__(error)
        self.error = error


def later(seconds=0.05):
    return task.deferLater(reactor, seconds, lambda: None)


def startSDK(testCase, endpoint, hub="chat"):
    """
    Start service_client.js against C{endpoint}; fires with its
    L{ServiceSDK} once the SDK is built.
    """
    sdk = ServiceSDK()
    spawnNode(testCase, sdk, "service_client.js",
              f"Endpoint={endpoint};AccessKey={KEY};Version=1.0;", hub)
    return sdk.ready.addCallback(lambda ready: (sdk, ready))


class JavaScriptServiceSDKTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        requireServiceSDK()
        self.broker = yield BrokerHarness(self, reactor, TOML).start()
        self.hub = self.broker.core.hub("chat")
        self.sdk, self.ready = yield startSDK(self, self.broker.url.replace("ws:", "http:"))

    def groups(self, client):
        return self.hub.session(client.connectionId).groups

    @defer.inlineCallbacks
    def nextData(self, client):
        frame = yield client.nextJSON()
        self.assertEqual(frame["type"], "message", frame)
        return frame["data"]

    @defer.inlineCallbacks
    def assertNothingMore(self, *clients):
        """
        A marker sent to each client must be the very next frame it sees.
        """
        for c in clients:
            yield self.sdk.call("sendToConnection", c.connectionId, "marker",
                                {"contentType": "text/plain"})
            self.assertEqual((yield self.nextData(c)), "marker")

    @defer.inlineCallbacks
    def test_filteredGroups(self):
        """
        addConnectionsToGroups / removeConnectionsFromGroups with a filter
        act on the connections it selects, and the group sends reach them.
        """
        a = yield self.broker.connectJSON(userId="alice", groups=["vip"])
        b = yield self.broker.connectJSON(userId="bob")
        c = yield self.broker.connectJSON(userId="carol", groups=["vip"])
        yield self.sdk.call("addConnectionsToGroups", ["room", "news"],
                            "userId ne 'bob' and 'vip' in groups")
        self.assertEqual([self.groups(x) for x in (a, b, c)],
                         [{"vip", "room", "news"}, set(), {"vip", "room", "news"}])
        yield self.sdk.call("sendToAll", "to room", {"contentType": "text/plain"},
                            group="room")
        for x in (a, c):
            self.assertEqual((yield self.nextData(x)), "to room")
        yield self.sdk.call("removeConnectionsFromGroups", ["room"], "userId eq 'alice'")
        self.assertEqual([self.groups(x) for x in (a, b, c)],
                         [{"vip", "news"}, set(), {"vip", "room", "news"}])
        yield self.sdk.call("addConnectionsToGroups", ["everyone"], "connectionId ne null")
        self.assertEqual(len(self.hub.groupConnections("everyone")), 3)
        # A malformed filter: the SDK's RestError, nothing done.
        e = yield self.assertFailure(
            self.sdk.call("addConnectionsToGroups", ["x"], "userId eq"), SDKError)
        self.assertEqual((e.error["statusCode"], e.error["code"]), (400, "BadRequest"))
        # More groups than a connection may join (4 here): refused whole.
        e = yield self.assertFailure(
            self.sdk.call("addConnectionsToGroups", ["1", "2", "3", "4", "5"], "userId eq 'bob'"),
            SDKError)
        self.assertEqual((e.error["statusCode"], e.error["code"]), (400, "LimitExceeded"))
        self.assertEqual(self.groups(b), {"everyone"})
        yield self.assertNothingMore(a, b, c)

    @defer.inlineCallbacks
    def test_sends(self):
        a = yield self.broker.connectJSON(userId="alice", groups=["g"])
        b = yield self.broker.connectJSON(userId="bob")
        yield self.sdk.call("sendToAll", {"hello": "all"})
        for x in (a, b):
            frame = yield x.nextJSON()
            self.assertEqual((frame["from"], frame["dataType"], frame["data"]),
                             ("server", "json", {"hello": "all"}))
        yield self.sdk.call("sendToAll", "not bob",
                            {"contentType": "text/plain", "filter": "userId ne 'bob'"})
        self.assertEqual((yield self.nextData(a)), "not bob")
        yield self.sdk.call("sendToUser", "bob", "to bob", {"contentType": "text/plain"})
        self.assertEqual((yield self.nextData(b)), "to bob")
        yield self.sdk.call("sendToConnection", a.connectionId, {"n": 1})
        self.assertEqual((yield self.nextData(a)), {"n": 1})
        yield self.sdk.call("sendToAll", "to g", {"contentType": "text/plain"}, group="g")
        frame = yield a.nextJSON()
        self.assertEqual((frame["from"], frame["group"], frame["data"]), ("group", "g", "to g"))
        yield self.assertNothingMore(a, b)

    @defer.inlineCallbacks
    def test_membershipAndExistence(self):
        a = yield self.broker.connectJSON(userId="alice")
        b = yield self.broker.connectJSON(userId="bob")
        call = self.sdk.call
        self.assertEqual([(yield call("connectionExists", a.connectionId)),
                          (yield call("connectionExists", "nope")),
                          (yield call("userExists", "alice")),
                          (yield call("userExists", "nobody")),
                          (yield call("groupExists", "g"))],
                         [True, False, True, False, False])
        yield call("addConnection", a.connectionId, group="g")
        yield call("addUser", "bob", group="h")
        self.assertEqual((self.groups(a), self.groups(b)), ({"g"}, {"h"}))
        self.assertTrue((yield call("groupExists", "g")))
        members = yield call("listConnections", group="g")
        self.assertEqual([m["connectionId"] for m in members], [a.connectionId])
        # The user's groups stick to its later connections.
        b2 = yield self.broker.connectJSON(userId="bob")
        yield later()
        self.assertEqual(self.groups(b2), {"h"})
        yield call("removeUser", "bob", group="h")
        self.assertEqual((self.groups(b), self.groups(b2)), (set(), set()))
        yield call("removeConnection", a.connectionId, group="g")
        self.assertFalse((yield call("groupExists", "g")))
        yield call("addConnection", a.connectionId, group="g2")
        yield call("removeConnectionFromAllGroups", a.connectionId)
        yield call("addUser", "alice", group="g3")
        yield call("removeUserFromAllGroups", "alice")
        self.assertEqual(self.groups(a), set())
        e = yield self.assertFailure(call("addConnection", "nope", group="g"), SDKError)
        self.assertEqual((e.error["statusCode"], e.error["code"]), (404, "NotFound"))
        yield self.assertNothingMore(a, b, b2)

    @defer.inlineCallbacks
    def test_permissions(self):
        a = yield self.broker.connectJSON(userId="alice")
        call = self.sdk.call
        cid = a.connectionId
        self.assertFalse((yield call("hasPermission", cid, "sendToGroup", {"targetName": "g"})))
        yield call("grantPermission", cid, "sendToGroup", {"targetName": "g"})
        self.assertTrue((yield call("hasPermission", cid, "sendToGroup", {"targetName": "g"})))
        a.send({"type": "sendToGroup", "group": "g", "ackId": 1, "dataType": "text",
                "data": "x"})
        self.assertTrue((yield a.nextJSON())["success"])
        yield call("revokePermission", cid, "sendToGroup", {"targetName": "g"})
        self.assertFalse((yield call("hasPermission", cid, "sendToGroup", {"targetName": "g"})))
        a.send({"type": "sendToGroup", "group": "g", "ackId": 2, "dataType": "text",
                "data": "x"})
        self.assertEqual((yield a.nextJSON())["error"]["name"], "Forbidden")
        yield call("grantPermission", cid, "joinLeaveGroup")
        self.assertTrue((yield call("hasPermission", cid, "joinLeaveGroup",
                                    {"targetName": "any"})))

    @defer.inlineCallbacks
    def test_closing(self):
        a = yield self.broker.connectJSON(userId="alice", groups=["g"])
        b = yield self.broker.connectJSON(userId="bob")
        c = yield self.broker.connectJSON(userId="carol")
        d = yield self.broker.connectJSON(userId="dan")
        e = yield self.broker.connectJSON(userId="eve")
        call = self.sdk.call
        yield call("closeConnection", a.connectionId, {"reason": "one"})
        frame = yield a.nextJSON()
        self.assertEqual((frame["event"], frame["message"]), ("disconnected", "one"))
        yield a.closed
        yield call("closeUserConnections", "bob", {"reason": "user"})
        yield b.closed
        yield call("closeAllConnections", {"reason": "all", "excluded": [e.connectionId]})
        for x in (c, d):
            yield x.closed
        self.assertEqual([s.connectionId for s in self.hub.sessions()], [e.connectionId])
        # Idempotent: a connection that has gone is fine to close.
        yield call("closeConnection", a.connectionId)
        yield self.assertNothingMore(e)

