# -*- test-case-name: tests.test_webpubsub_rest -*-
"""
The Web PubSub REST API, driven by Microsoft's own service SDK
(C{azure-messaging-webpubsubservice}) against a real broker listener, with
real WebSocket clients watching what arrives; and raw HTTP for what the SDK
never sends (bad tokens, bad bodies).

The SDK is synchronous (requests): every call runs in the reactor's thread
pool so the reactor keeps serving it.
"""

import base64
import json
import time

import jwt
import treq
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.core.rest import HttpRequest
from azure.messaging.webpubsubservice import WebPubSubServiceClient
from azure.messaging.webpubsubservice._operations._operations import (
    WebPubSubServiceClientOperationsMixin as GeneratedOperations)
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from broker.core.errors import CloseCode
from broker.webpubsub.hubsettings import HubSettings
from broker.webpubsub.rest import API_VERSIONS
from tests.recorder import RecordingConnection
from tests.wsharness import KEY, BrokerHarness

JOIN = "webpubsub.joinLeaveGroup"
SEND = "webpubsub.sendToGroup"
OTHER_KEY = "other-hub-key-abcdefabcdefabcdef"

TOML = f"""
[webpubsub.hubs.other]
access_keys = ["{OTHER_KEY}"]
"""


class _ServerConnections:
    """
    Tracks the broker's accepted HTTP connections so a test can drop the
    SDK's keep-alive connections at the end and leave a clean reactor.
    """

    def __init__(self, site):
        self.protocols = []
        build = site.buildProtocol

        def tracking(addr):
            p = build(addr)
            if p is not None:
                self.protocols.append(p)
            return p

        site.buildProtocol = tracking

    @defer.inlineCallbacks
    def abort(self):
        transports = []
        for p in self.protocols:
            t = getattr(getattr(p, "_channel", p), "transport", None)
            if t is not None and t.connected:
                t.abortConnection()
                transports.append(t)
        for _ in range(100):
            if not any(t.connected for t in transports):
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        # The channel's idle timeout is cancelled in connectionLost.
        yield task.deferLater(reactor, 0, lambda: None)


class _Base(unittest.TestCase):
    toml = TOML

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield BrokerHarness(self, reactor, self.toml).start()
        self.connections = _ServerConnections(self.broker.site)
        self.port = self.broker.port.getHost().port
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.sdks = []
        # Runs before the harness's own clean-up (cleanups are LIFO).
        self.addCleanup(self._closeSDKs)

    @defer.inlineCallbacks
    def _closeSDKs(self):
        for c in self.sdks:
            yield threads.deferToThread(c.close)
        yield self.connections.abort()

    def sdk(self, hub="chat", key=KEY):
        c = WebPubSubServiceClient.from_connection_string(
            f"Endpoint={self.endpoint};AccessKey={key};Version=1.0;", hub=hub)
        self.sdks.append(c)
        return c

    def call(self, f, *args, **kw):
        """
        Run one blocking SDK call in a thread.
        """
        return threads.deferToThread(f, *args, **kw)

    def hub(self, name="chat"):
        return self.broker.core.hub(name)

    def hubKeys(self, name):
        """The hub's access keys, as the broker's REST API holds them."""
        return self.broker.site.restAPI.hubSettings(name).accessKeys

    @defer.inlineCallbacks
    def nextMessage(self, client):
        """
        The next C{message} frame, skipping nothing: every frame the test
        did not expect is a failure.
        """
        frame = yield client.nextJSON()
        self.assertEqual(frame["type"], "message", frame)
        return frame

    @defer.inlineCallbacks
    def assertNothingMore(self, sdk, *clients):
        """
        Prove that C{clients} got nothing else: a marker sent to each
        connection afterwards must be the very next frame it sees.
        """
        for c in clients:
            yield self.call(sdk.send_to_connection, c.connectionId, "marker",
                            content_type="text/plain")
            frame = yield self.nextMessage(c)
            self.assertEqual(frame["data"], "marker")


class SendTests(_Base):
    @defer.inlineCallbacks
    def test_sendToAllContentTypes(self):
        a = yield self.broker.connectJSON()
        b = yield self.broker.connectJSON()
        sdk = self.sdk()
        yield self.call(sdk.send_to_all, {"hello": ["world", 1]})
        yield self.call(sdk.send_to_all, "plain text é", content_type="text/plain")
        yield self.call(sdk.send_to_all, b"\x00\x01\xff",
                        content_type="application/octet-stream")
        for c in (a, b):
            f = yield self.nextMessage(c)
            self.assertEqual((f["from"], f["dataType"], f["data"]),
                             ("server", "json", {"hello": ["world", 1]}))
            f = yield self.nextMessage(c)
            self.assertEqual((f["dataType"], f["data"]), ("text", "plain text é"))
            f = yield self.nextMessage(c)
            self.assertEqual((f["dataType"], base64.b64decode(f["data"])),
                             ("binary", b"\x00\x01\xff"))

    @defer.inlineCallbacks
    def test_sendToAllExcludedAndFilter(self):
        alice = yield self.broker.connectJSON(userId="alice", groups=["g"])
        bob = yield self.broker.connectJSON(userId="bob")
        anon = yield self.broker.connectJSON()
        sdk = self.sdk()
        yield self.call(sdk.send_to_all, "1", content_type="text/plain",
                        excluded=[alice.connectionId])
        yield self.call(sdk.send_to_all, "2", content_type="text/plain",
                        filter="userId eq 'alice' or userId eq null")
        yield self.call(sdk.send_to_all, "3", content_type="text/plain",
                        filter="'g' in groups", excluded=[alice.connectionId])
        self.assertEqual((yield self.nextMessage(alice))["data"], "2")
        self.assertEqual((yield self.nextMessage(bob))["data"], "1")
        self.assertEqual((yield self.nextMessage(anon))["data"], "1")
        self.assertEqual((yield self.nextMessage(anon))["data"], "2")
        yield self.assertNothingMore(sdk, alice, bob, anon)

    @defer.inlineCallbacks
    def test_sendToGroup(self):
        a = yield self.broker.connectJSON(userId="a", groups=["g", "vip"])
        b = yield self.broker.connectJSON(userId="b", groups=["g"])
        c = yield self.broker.connectJSON(userId="c")
        sdk = self.sdk()
        yield self.call(sdk.send_to_group, "g", {"n": 1})
        yield self.call(sdk.send_to_group, "g", "x", content_type="text/plain",
                        excluded=[a.connectionId])
        yield self.call(sdk.send_to_group, "g", "vip only", content_type="text/plain",
                        filter="'vip' in groups")
        f = yield self.nextMessage(a)
        self.assertEqual((f["from"], f["group"], f["data"]), ("group", "g", {"n": 1}))
        self.assertEqual((yield self.nextMessage(a))["data"], "vip only")
        self.assertEqual((yield self.nextMessage(b))["data"], {"n": 1})
        self.assertEqual((yield self.nextMessage(b))["data"], "x")
        yield self.assertNothingMore(sdk, a, b, c)

    @defer.inlineCallbacks
    def test_sendToUserAndConnection(self):
        u1 = yield self.broker.connectJSON(userId="u", groups=["g"])
        u2 = yield self.broker.connectJSON(userId="u")
        other = yield self.broker.connectJSON(userId="v")
        sdk = self.sdk()
        yield self.call(sdk.send_to_user, "u", "to u", content_type="text/plain")
        yield self.call(sdk.send_to_user, "u", "filtered", content_type="text/plain",
                        filter="not ('g' in groups)")
        yield self.call(sdk.send_to_connection, other.connectionId, {"just": "you"})
        yield self.call(sdk.send_to_user, "nobody", "lost", content_type="text/plain")
        yield self.call(sdk.send_to_connection, "no-such-connection", "lost",
                        content_type="text/plain")
        self.assertEqual((yield self.nextMessage(u1))["data"], "to u")
        self.assertEqual((yield self.nextMessage(u2))["data"], "to u")
        self.assertEqual((yield self.nextMessage(u2))["data"], "filtered")
        self.assertEqual((yield self.nextMessage(other))["data"], {"just": "you"})
        yield self.assertNothingMore(sdk, u1, u2, other)

    @defer.inlineCallbacks
    def test_oddNames(self):
        """
        Names with spaces, slashes, quotes and non-ASCII travel in the path
        percent-encoded; the token's audience still matches.
        """
        group, user = "room 1/é?#'", "user@example.com/ü"
        a = yield self.broker.connectJSON(userId=user, groups=[group])
        sdk = self.sdk()
        self.assertTrue((yield self.call(sdk.group_exists, group)))
        self.assertTrue((yield self.call(sdk.user_exists, user)))
        yield self.call(sdk.send_to_group, group, "g", content_type="text/plain",
                        filter=f"userId eq '{user}'")
        yield self.call(sdk.send_to_user, user, "u", content_type="text/plain")
        f = yield self.nextMessage(a)
        self.assertEqual((f["group"], f["data"]), (group, "g"))
        self.assertEqual((yield self.nextMessage(a))["data"], "u")

    @defer.inlineCallbacks
    def test_badFilterIs400(self):
        sdk = self.sdk()
        e = yield self.assertFailure(
            self.call(sdk.send_to_all, "x", content_type="text/plain", filter="nick eq 'a'"),
            HttpResponseError)
        self.assertEqual(e.status_code, 400)
        self.assertIn("unknown field", e.error.message)


class CloseTests(_Base):
    @defer.inlineCallbacks
    def assertClosed(self, client, reason):
        f = yield client.nextJSON()
        self.assertEqual(f, {"type": "system", "event": "disconnected", "message": reason})
        code, _ = yield client.closed
        self.assertEqual(code, CloseCode.POLICY_VIOLATION)

    @defer.inlineCallbacks
    def test_closeConnection(self):
        a = yield self.broker.connectJSON()
        sdk = self.sdk()
        yield self.call(sdk.close_connection, a.connectionId, reason="bye now")
        yield self.assertClosed(a, "bye now")
        self.assertFalse((yield self.call(sdk.connection_exists, a.connectionId)))
        # Idempotent: closing a connection that has gone is not an error.
        yield self.call(sdk.close_connection, a.connectionId)

    @defer.inlineCallbacks
    def test_closeAllExcluded(self):
        a = yield self.broker.connectJSON()
        b = yield self.broker.connectJSON()
        sdk = self.sdk()
        yield self.call(sdk.close_all_connections, excluded=[b.connectionId],
                        reason="maintenance")
        yield self.assertClosed(a, "maintenance")
        self.assertTrue((yield self.call(sdk.connection_exists, b.connectionId)))

    @defer.inlineCallbacks
    def test_closeGroupAndUser(self):
        g1 = yield self.broker.connectJSON(groups=["g"])
        g2 = yield self.broker.connectJSON(groups=["g"])
        u1 = yield self.broker.connectJSON(userId="u")
        u2 = yield self.broker.connectJSON(userId="u")
        sdk = self.sdk()
        yield self.call(sdk.close_group_connections, "g", excluded=[g2.connectionId],
                        reason="group closed")
        yield self.assertClosed(g1, "group closed")
        yield self.call(sdk.close_user_connections, "u", reason="user closed")
        yield self.assertClosed(u1, "user closed")
        yield self.assertClosed(u2, "user closed")
        self.assertFalse((yield self.call(sdk.user_exists, "u")))
        self.assertTrue((yield self.call(sdk.group_exists, "g")))
        self.assertEqual(self.hub().connectionCount, 1)


class GroupTests(_Base):
    @defer.inlineCallbacks
    def test_exists(self):
        a = yield self.broker.connectJSON(userId="u", groups=["g"])
        sdk = self.sdk()
        self.assertTrue((yield self.call(sdk.connection_exists, a.connectionId)))
        self.assertFalse((yield self.call(sdk.connection_exists, "nope")))
        self.assertTrue((yield self.call(sdk.group_exists, "g")))
        self.assertFalse((yield self.call(sdk.group_exists, "h")))
        self.assertTrue((yield self.call(sdk.user_exists, "u")))
        self.assertFalse((yield self.call(sdk.user_exists, "v")))

    @defer.inlineCallbacks
    def test_connectionGroups(self):
        a = yield self.broker.connectJSON()
        sdk = self.sdk()
        yield self.call(sdk.add_connection_to_group, "g1", a.connectionId)
        yield self.call(sdk.add_connection_to_group, "g2", a.connectionId)
        yield self.call(sdk.send_to_group, "g1", "one", content_type="text/plain")
        self.assertEqual((yield self.nextMessage(a))["group"], "g1")
        yield self.call(sdk.remove_connection_from_group, "g1", a.connectionId)
        self.assertFalse((yield self.call(sdk.group_exists, "g1")))
        self.assertTrue((yield self.call(sdk.group_exists, "g2")))
        yield self.call(sdk.remove_connection_from_all_groups, a.connectionId)
        self.assertFalse((yield self.call(sdk.group_exists, "g2")))
        e = yield self.assertFailure(
            self.call(sdk.add_connection_to_group, "g1", "no-such-connection"),
            ResourceNotFoundError)
        self.assertEqual(e.error.code, "NotFound")

    @defer.inlineCallbacks
    def test_userGroupsStickForLaterConnections(self):
        a = yield self.broker.connectJSON(userId="u")
        sdk = self.sdk()
        yield self.call(sdk.add_user_to_group, "g", "u")
        yield self.call(sdk.add_user_to_group, "h", "u")
        # A user with no connection yet may be added too.
        yield self.call(sdk.add_user_to_group, "g", "later")
        b = yield self.broker.connectJSON(userId="u")
        c = yield self.broker.connectJSON(userId="later")
        yield self.call(sdk.send_to_group, "g", "hi", content_type="text/plain")
        for x in (a, b, c):
            self.assertEqual((yield self.nextMessage(x))["data"], "hi")
        yield self.call(sdk.remove_user_from_group, "g", "u")
        yield self.call(sdk.send_to_group, "g", "only later", content_type="text/plain")
        self.assertEqual((yield self.nextMessage(c))["data"], "only later")
        yield self.call(sdk.remove_user_from_all_groups, "u")
        self.assertFalse((yield self.call(sdk.group_exists, "h")))
        d = yield self.broker.connectJSON(userId="u")
        self.assertEqual(self.hub().session(d.connectionId).groups, set())
        yield self.assertNothingMore(sdk, a, b, c, d)

    @defer.inlineCallbacks
    def test_listConnectionsBeyond200(self):
        """
        Presence without Azure's cap: 450 members, listed in pages through
        the SDK's paging, and a top that stops part-way.
        """
        hub = self.hub()
        for i in range(450):
            hub.admit(RecordingConnection(f"c{i:04d}", f"user{i % 150}"), f"user{i % 150}",
                      groups=["big"])
        real = yield self.broker.connectJSON(userId="real", groups=["big"])
        sdk = self.sdk()
        members = yield self.call(lambda: list(sdk.list_connections(group="big")))
        self.assertEqual(len(members), 451)
        self.assertEqual(len({m.connection_id for m in members}), 451)
        self.assertIn((real.connectionId, "real"),
                      [(m.connection_id, m.user_id) for m in members])
        pages = yield self.call(lambda: [len(p) for p in
                                         sdk.list_connections(group="big").by_page()])
        self.assertEqual(pages, [200, 200, 51])
        some = yield self.call(lambda: list(sdk.list_connections(group="big", top=250)))
        self.assertEqual(len(some), 250)
        none = yield self.call(lambda: list(sdk.list_connections(group="empty")))
        self.assertEqual(none, [])

    @defer.inlineCallbacks
    def test_listingWhileMembersChange(self):
        """
        Members that leave or join between pages are never repeated, and
        the ones present throughout are all listed.
        """
        hub = self.hub()
        for i in range(300):
            hub.admit(RecordingConnection(f"c{i:03d}"), None, groups=["g"])
        sdk = self.sdk()

        def change():
            hub.remove(hub.session("c000"), "gone")
            hub.remove(hub.session("c299"), "gone")
            hub.admit(RecordingConnection("a-new-first"), None, groups=["g"])
            hub.admit(RecordingConnection("d-new-last"), None, groups=["g"])

        def listWithChange():
            seen = []
            for n, page in enumerate(sdk.list_connections(group="g").by_page()):
                seen.extend(m.connection_id for m in page)
                if n == 0:
                    threads.blockingCallFromThread(reactor, change)
            return seen

        seen = yield self.call(listWithChange)
        self.assertEqual(len(seen), len(set(seen)))
        self.assertEqual(seen[:200], [f"c{i:03d}" for i in range(200)])
        self.assertEqual(seen[200:], [f"c{i:03d}" for i in range(200, 299)] + ["d-new-last"])

    @defer.inlineCallbacks
    def test_listUsersInGroup(self):
        hub = self.hub()
        for i in range(300):
            hub.admit(RecordingConnection(f"c{i}", f"user{i % 250:03d}"),
                      f"user{i % 250:03d}", groups=["big"])
        hub.admit(RecordingConnection("anon"), None, groups=["big"])
        sdk = self.sdk()

        def listUsers():
            users, url = [], "/api/hubs/chat/groups/big/users?api-version=2024-12-01"
            while url:
                r = sdk.send_request(HttpRequest("GET", url))
                r.raise_for_status()
                body = r.json()
                users.extend(body["value"])
                url = body.get("nextLink")
                if url and "api-version" not in url:
                    url += "&api-version=2024-12-01"
            return users

        users = yield self.call(listUsers)
        self.assertEqual(len(users), 250)
        counts = {u["userId"]: u["connectionCount"] for u in users}
        self.assertEqual(counts["user000"], 2)
        self.assertEqual(counts["user249"], 1)
        self.assertEqual(sum(counts.values()), 300)


class FilteredGroupsTests(_Base):
    """
    C{:addToGroups} / C{:removeFromGroups}: the connections an OData filter
    selects join or leave several groups at once (the Python SDK has no
    method for them: its generic C{send_request}, as Azure documents; the
    JS SDK's methods are in tests/test_webpubsub_jsservice.py).
    """

    toml = TOML + """
[webpubsub]
max_groups_per_connection = 3
"""

    def bulk(self, sdk, op, body, version="2024-12-01"):
        def call():
            r = sdk.send_request(HttpRequest(
                "POST", f"/api/hubs/chat/:{op}?api-version={version}", json=body))
            return r.status_code, r.text()
        return self.call(call)

    @defer.inlineCallbacks
    def test_pythonSDK(self):
        a = yield self.broker.connectJSON(userId="alice", groups=["x"])
        b = yield self.broker.connectJSON(userId="bob")
        c = yield self.broker.connectJSON(userId="alice")
        d = yield self.broker.connectJSON()
        sdk = self.sdk()
        answer = yield self.bulk(sdk, "addToGroups",
                                 {"groups": ["g1", "g2"], "filter": "userId eq 'alice'"})
        self.assertEqual(answer, (200, ""))
        groups = lambda x: self.hub().session(x.connectionId).groups  # noqa: E731
        self.assertEqual([groups(x) for x in (a, b, c, d)],
                         [{"x", "g1", "g2"}, set(), {"g1", "g2"}, set()])
        # Judged before the change: 'x' members leave g1.
        self.assertEqual((yield self.bulk(sdk, "removeFromGroups",
                                          {"groups": ["g1"], "filter": "'x' in groups"}))[0],
                         200)
        yield self.call(sdk.send_to_group, "g1", "to g1", content_type="text/plain")
        self.assertEqual((yield self.nextMessage(c))["data"], "to g1")
        # No filter: every connection.
        yield self.bulk(sdk, "removeFromGroups", {"groups": ["g2", "x"]})
        self.assertEqual([groups(x) for x in (a, b, c, d)], [set(), set(), {"g1"}, set()])
        yield self.bulk(sdk, "addToGroups", {"groups": ["all"], "filter": None})
        self.assertEqual(len(self.hub().groupConnections("all")), 4)
        yield self.call(sdk.send_to_group, "all", "everyone", content_type="text/plain")
        for x in (a, b, c, d):
            self.assertEqual((yield self.nextMessage(x))["data"], "everyone")
        # A newer api-version than the broker knows is served the same.
        self.assertEqual((yield self.bulk(sdk, "removeFromGroups", {"groups": ["all"]},
                                          version="2099-01-01"))[0], 200)
        self.assertFalse(self.hub().groupExists("all"))
        yield self.assertNothingMore(sdk, a, b, c, d)

    @defer.inlineCallbacks
    def test_newerApiVersion(self):
        """
        An SDK sending an api-version newer than any the broker knows (as a
        future release would by default) works unchanged.
        """
        a = yield self.broker.connectJSON(userId="alice")
        sdk = WebPubSubServiceClient.from_connection_string(
            f"Endpoint={self.endpoint};AccessKey={KEY};Version=1.0;", hub="chat",
            api_version="2099-01-01")
        self.sdks.append(sdk)
        yield self.call(sdk.add_connection_to_group, "g", a.connectionId)
        yield self.call(sdk.send_to_group, "g", "hi", content_type="text/plain")
        self.assertEqual((yield self.nextMessage(a))["data"], "hi")
        self.assertTrue((yield self.call(sdk.group_exists, "g")))

    @defer.inlineCallbacks
    def test_groupLimit(self):
        """
        A connection at its group limit is skipped for the groups it has no
        room for; a request naming more groups than any connection may
        hold is refused whole.
        """
        a = yield self.broker.connectJSON(groups=["x", "y"])
        b = yield self.broker.connectJSON()
        sdk = self.sdk()
        self.assertEqual((yield self.bulk(sdk, "addToGroups", {"groups": ["g1", "g2"]}))[0],
                         200)
        self.assertEqual(self.hub().session(a.connectionId).groups, {"x", "y", "g1"})
        self.assertEqual(self.hub().session(b.connectionId).groups, {"g1", "g2"})
        code, text = yield self.bulk(sdk, "addToGroups", {"groups": ["1", "2", "3", "4"]})
        self.assertEqual((code, json.loads(text)["code"]), (400, "LimitExceeded"))
        self.assertNotIn("1", self.hub().session(b.connectionId).groups)

    @defer.inlineCallbacks
    def test_refused(self):
        """
        A bad body, group name or filter is refused whole, with nothing
        done.
        """
        a = yield self.broker.connectJSON()
        sdk = self.sdk()
        for body, why in (({"groups": ["g"], "filter": "userId eq"}, "filter"),
                          ({"groups": ["g"], "filter": ""}, "filter is empty"),
                          ({"groups": ["g"], "filter": 3}, "filter must be a string"),
                          ({"filter": "userId eq 'a'"}, "groups"),
                          ({"groups": []}, "groups"),
                          ({"groups": ["g", ""]}, "group"),
                          ({"groups": ["g", 7]}, "groups"),
                          ({"groups": ["g" * 1025]}, "group"),
                          (["g"], "JSON object")):
            for op in ("addToGroups", "removeFromGroups"):
                code, text = yield self.bulk(sdk, op, body)
                error = json.loads(text)
                self.assertEqual(code, 400, (op, body))
                self.assertIn(why, error["message"], (op, body))
        self.assertEqual(self.hub().session(a.connectionId).groups, set())
        url = "/api/hubs/chat/:addToGroups?api-version=2024-12-01"

        def raw(data, ctype):
            r = sdk.send_request(HttpRequest("POST", url, content=data,
                                             headers={"Content-Type": ctype}))
            return r.status_code, r.json()["code"]
        self.assertEqual((yield self.call(raw, b'{"groups": ["g"]}', "text/plain")),
                         (415, "UnsupportedMediaType"))
        self.assertEqual((yield self.call(raw, b'{"groups": ["g"], "groups": []}',
                                          "application/json")), (400, "BadRequest"))
        self.assertEqual((yield self.call(raw, b'\xff', "application/json")),
                         (400, "BadRequest"))
        self.assertEqual(self.hub().session(a.connectionId).groups, set())


class PermissionTests(_Base):
    @defer.inlineCallbacks
    def test_grantCheckRevoke(self):
        a = yield self.broker.connectJSON()
        b = yield self.broker.connectJSON(groups=["g"])
        sdk = self.sdk()
        has = lambda p, t=None: self.call(sdk.has_permission, p, a.connectionId,
                                          target_name=t)
        self.assertFalse((yield has("sendToGroup", "g")))
        a.send({"type": "sendToGroup", "group": "g", "data": "no", "ackId": 1})
        self.assertFalse((yield a.nextJSON())["success"])
        yield self.call(sdk.grant_permission, "sendToGroup", a.connectionId, target_name="g")
        self.assertTrue((yield has("sendToGroup", "g")))
        self.assertFalse((yield has("sendToGroup", "other")))
        a.send({"type": "sendToGroup", "group": "g", "data": "yes", "ackId": 2})
        self.assertTrue((yield a.nextJSON())["success"])
        self.assertEqual((yield self.nextMessage(b))["data"], "yes")
        yield self.call(sdk.revoke_permission, "sendToGroup", a.connectionId, target_name="g")
        self.assertFalse((yield has("sendToGroup", "g")))
        # joinLeaveGroup for every group, then revoked for every group.
        yield self.call(sdk.grant_permission, "joinLeaveGroup", a.connectionId)
        self.assertTrue((yield has("joinLeaveGroup", "anything")))
        a.send({"type": "joinGroup", "group": "x", "ackId": 3})
        self.assertTrue((yield a.nextJSON())["success"])
        yield self.call(sdk.revoke_permission, "joinLeaveGroup", a.connectionId)
        self.assertFalse((yield has("joinLeaveGroup")))
        a.send({"type": "leaveGroup", "group": "x", "ackId": 4})
        ack = yield a.nextJSON()
        self.assertEqual(ack["error"]["name"], "Forbidden")

    @defer.inlineCallbacks
    def test_errors(self):
        sdk = self.sdk()
        self.assertFalse((yield self.call(sdk.has_permission, "sendToGroup", "nope")))
        e = yield self.assertFailure(
            self.call(sdk.grant_permission, "sendToGroup", "nope"), ResourceNotFoundError)
        self.assertEqual(e.status_code, 404)
        a = yield self.broker.connectJSON()
        e = yield self.assertFailure(
            self.call(sdk.grant_permission, "fly", a.connectionId), HttpResponseError)
        self.assertEqual((e.status_code, e.error.code), (400, "BadRequest"))


class TokenAndHealthTests(_Base):
    @defer.inlineCallbacks
    def test_generateToken(self):
        """
        The SDK signs tokens itself when it holds the key; C{:generateToken}
        is what it calls otherwise: the generated operation is called here.
        """
        sdk = self.sdk()
        answer = yield self.call(GeneratedOperations.get_client_access_token, sdk,
                                 user_id="zoe", roles=[JOIN], groups=["start"],
                                 minutes_to_expire=5)
        claims = jwt.decode(answer["token"], KEY, algorithms=["HS256"],
                            options={"verify_aud": False})
        self.assertEqual(claims["aud"], f"{self.endpoint}/client/hubs/chat")
        self.assertTrue(290 < claims["exp"] - time.time() <= 301, claims)
        c = yield self.broker.connectJSON(token=answer["token"])
        self.assertEqual(c.hello["userId"], "zoe")
        self.assertEqual(self.hub().session(c.connectionId).groups, {"start"})
        c.send({"type": "joinGroup", "group": "more", "ackId": 1})
        self.assertTrue((yield c.nextJSON())["success"])

    @defer.inlineCallbacks
    def test_generateTokenMqtt(self):
        """
        C{clientType=MQTT} (the SDK's C{client_protocol="MQTT"}): the
        audience is the MQTT client endpoint C{/clients/mqtt/hubs/<hub>},
        and the MQTT face's authenticator takes the token (as CONNECT's
        password or the WebSocket URL's access_token) with its roles.
        """
        from broker.mqtt.auth import MqttAuth
        sdk = self.sdk()
        answer = yield self.call(GeneratedOperations.get_client_access_token, sdk,
                                 user_id="dev-1", roles=[f"{SEND}.telemetry/dev-1"],
                                 minutes_to_expire=5, client_protocol="MQTT")
        claims = jwt.decode(answer["token"], KEY, algorithms=["HS256"],
                            options={"verify_aud": False})
        self.assertEqual(claims["aud"], f"{self.endpoint}/clients/mqtt/hubs/chat")
        self.assertEqual((claims["sub"], claims["role"]), ("dev-1", [f"{SEND}.telemetry/dev-1"]))
        # Case-insensitive, as in Azure.
        lower = yield self.call(GeneratedOperations.get_client_access_token, sdk,
                                client_protocol="mqtt")
        self.assertEqual(jwt.decode(lower["token"], KEY, algorithms=["HS256"],
                                    options={"verify_aud": False})["aud"],
                         f"{self.endpoint}/clients/mqtt/hubs/chat")

        mqtt = MqttAuth(reactor, tokenKeys=self.hubKeys)
        who = yield mqtt.authenticate("c1", "any", answer["token"].encode(), "chat")
        self.assertEqual(who.userId, "dev-1")
        self.assertTrue(mqtt.mayPublish(who, "telemetry/dev-1"))
        self.assertFalse(mqtt.mayPublish(who, "telemetry/dev-2"))
        # The token is refused by the Web PubSub client endpoint: it names
        # the MQTT one.
        refusal = yield self.broker.refused(token=answer["token"])
        self.assertIn("401", refusal)

    @defer.inlineCallbacks
    def test_sdkSignsMqttToken(self):
        """
        With the key in hand the SDK signs the MQTT token itself; its URL is
        Azure's MQTT client endpoint, and the MQTT authenticator takes it.
        """
        from broker.mqtt.auth import MqttAuth
        sdk = self.sdk()
        answer = yield self.call(sdk.get_client_access_token, user_id="m", roles=[JOIN],
                                 client_protocol="MQTT")
        self.assertEqual(answer["baseUrl"], f"ws://127.0.0.1:{self.port}/clients/mqtt/hubs/chat")
        self.assertEqual(answer["url"], answer["baseUrl"] + "?access_token=" + answer["token"])
        mqtt = MqttAuth(reactor, tokenKeys=self.hubKeys)
        who = yield mqtt.authenticateToken(answer["token"], "chat")
        self.assertEqual(who.userId, "m")
        self.assertTrue(mqtt.maySubscribe(who, "rooms/+/news"))

    @defer.inlineCallbacks
    def test_generateTokenPerHubKey(self):
        sdk = self.sdk("other", OTHER_KEY)
        answer = yield self.call(GeneratedOperations.get_client_access_token, sdk,
                                 user_id="o")
        jwt.decode(answer["token"], OTHER_KEY, algorithms=["HS256"],
                   options={"verify_aud": False})
        c = yield self.broker.connectJSON(hub="other", token=answer["token"])
        self.assertEqual(c.hello["userId"], "o")

    @defer.inlineCallbacks
    def test_sdkTokenWorks(self):
        sdk = self.sdk()
        answer = yield self.call(sdk.get_client_access_token, user_id="local",
                                 roles=[SEND])
        c = yield self.broker.connectJSON(token=answer["token"])
        self.assertEqual(c.hello["userId"], "local")

    @defer.inlineCallbacks
    def test_metrics(self):
        from prometheus_client import generate_latest
        from prometheus_client.registry import CollectorRegistry

        from broker.webpubsub.rest import RestCollector

        registry = CollectorRegistry()
        registry.register(RestCollector(self.broker.site.restAPI))
        sdk = self.sdk()
        yield self.call(sdk.send_to_all, "x", content_type="text/plain")
        yield self.call(sdk.send_to_all, "y", content_type="text/plain")
        yield self.call(sdk.group_exists, "nope")
        text = generate_latest(registry).decode()
        name = "broker_webpubsub_rest_requests_total"
        self.assertIn(name + '{code="202",operation="sendToAll"} 2.0', text)
        self.assertIn(name + '{code="404",operation="groupExists"} 1.0', text)

    @defer.inlineCallbacks
    def test_health(self):
        sdk = self.sdk()
        r = yield self.call(sdk.send_request, HttpRequest("HEAD", "/api/health"))
        self.assertEqual(r.status_code, 200)
        r = yield treq.get(f"{self.endpoint}/api/health", reactor=reactor, persistent=False)
        self.assertEqual(r.code, 200)
        yield r.content()


class PublicEndpointTests(_Base):
    """
    The SDK built as its README shows for a service behind a gateway:
    C{WebPubSubServiceClient(endpoint, hub, AzureKeyCredential(key),
    reverse_proxy_endpoint=...)}.  Requests go to the proxy's address (the
    broker's), tokens name the public endpoint, which the broker accepts
    because it is in C{webpubsub.audiences}; client URLs name the public
    endpoint too.
    """

    PUBLIC = "https://pubsub.example.com"

    @defer.inlineCallbacks
    def setUp(self):
        yield _Base.setUp(self)
        self.broker.site.resource.children[b"api"].audiences = (self.PUBLIC,)

    def publicSDK(self):
        from azure.core.credentials import AzureKeyCredential
        c = WebPubSubServiceClient(self.PUBLIC, "chat", AzureKeyCredential(KEY),
                                   reverse_proxy_endpoint=self.endpoint)
        self.sdks.append(c)
        return c

    @defer.inlineCallbacks
    def test_throughTheProxyAddress(self):
        a = yield self.broker.connectJSON(userId="a", groups=["g"])
        sdk = self.publicSDK()
        yield self.call(sdk.send_to_group, "g", {"via": "proxy"})
        self.assertTrue((yield self.call(sdk.connection_exists, a.connectionId)))
        self.assertEqual((yield self.nextMessage(a))["data"], {"via": "proxy"})
        answer = yield self.call(sdk.get_client_access_token, user_id="b")
        self.assertEqual(answer["baseUrl"], "wss://pubsub.example.com/client/hubs/chat")
        # The direct address is not an accepted audience any more.
        e = yield self.assertFailure(self.call(self.sdk().send_to_all, "x",
                                               content_type="text/plain"),
                                     HttpResponseError)
        self.assertEqual(e.status_code, 401)


class RawHTTPTests(_Base):
    """
    What the SDK never sends: missing, forged, misdirected and expired
    tokens, and malformed requests.
    """

    def token(self, url, key=KEY, lifetime=60, **extra):
        claims = {"aud": url, "exp": int(time.time() + lifetime)}
        claims.update(extra)
        return jwt.encode(claims, key, algorithm="HS256")

    @defer.inlineCallbacks
    def request(self, method, path, token=True, key=KEY, body=None, headers=None,
                aud=None, lifetime=60):
        url = self.endpoint + path
        h = dict(headers or {})
        if token is True:
            token = self.token(aud or url, key, lifetime)
        if token:
            h["Authorization"] = "Bearer " + token
        r = yield treq.request(method, url, data=body, headers=h, reactor=reactor,
                               persistent=False)
        content = yield r.content()
        error = json.loads(content) if content and r.code >= 400 else None
        return r.code, error

    SEND = "/api/hubs/chat/:send?api-version=2024-12-01"

    @defer.inlineCallbacks
    def assertUnauthorized(self, **kw):
        code, error = yield self.request("POST", self.SEND, body=b"x",
                                         headers={"Content-Type": "text/plain"}, **kw)
        self.assertEqual(code, 401)
        self.assertEqual(error, {"code": "Unauthorized",
                                 "message": "invalid or missing access token"})

    def test_noToken(self):
        return self.assertUnauthorized(token=None)

    @defer.inlineCallbacks
    def test_notBearer(self):
        code, _ = yield self.request("POST", self.SEND, token=None, body=b"x",
                                     headers={"Content-Type": "text/plain",
                                              "Authorization": "Basic eDp5"})
        self.assertEqual(code, 401)

    def test_badSignature(self):
        return self.assertUnauthorized(key="not-the-key-not-the-key-not-the-key")

    def test_otherHubsKey(self):
        return self.assertUnauthorized(key=OTHER_KEY)

    def test_expired(self):
        return self.assertUnauthorized(lifetime=-60)

    def test_garbage(self):
        return self.assertUnauthorized(token="not.a.jwt")

    def test_wrongAudience(self):
        return self.assertUnauthorized(
            aud=f"{self.endpoint}/api/hubs/chat/:closeConnections?api-version=2024-12-01")

    def test_audienceQueryMustMatch(self):
        return self.assertUnauthorized(
            aud=f"{self.endpoint}/api/hubs/chat/:send?api-version=2024-12-01&excluded=x")

    @defer.inlineCallbacks
    def test_noExp(self):
        url = self.endpoint + self.SEND
        token = jwt.encode({"aud": url}, KEY, algorithm="HS256")
        yield self.assertUnauthorized(token=token)

    @defer.inlineCallbacks
    def test_cachedToken(self):
        """
        A token used again is taken from the cache of verified tokens, and
        still checked: on another URL it is refused; once its signing key
        is no longer the hub's, or once it has expired, it is refused (and
        an expired one dropped); a reload empties the cache.
        """
        rest = self.broker.site.restAPI
        token = self.token(self.endpoint + self.SEND)
        for _ in range(3):
            code, _ = yield self.request("POST", self.SEND, token=token, body=b"x",
                                         headers={"Content-Type": "text/plain"})
            self.assertEqual(code, 202)
        self.assertEqual((len(rest.tokens), rest.tokens.hits), (1, 2))
        code, _ = yield self.request(
            "POST", "/api/hubs/chat/:closeConnections?api-version=2024-12-01", token=token)
        self.assertEqual(code, 401)

        settings = rest.hubSettings
        self.patch(rest, "hubSettings", lambda hub: HubSettings(accessKeys=(OTHER_KEY,)))
        yield self.assertUnauthorized(token=token)
        self.patch(rest, "hubSettings", settings)
        code, _ = yield self.request("POST", self.SEND, token=token, body=b"x",
                                     headers={"Content-Type": "text/plain"})
        self.assertEqual(code, 202)

        self.patch(rest, "clock", lambda: time.time() + 3600)
        yield self.assertUnauthorized(token=token)
        self.assertEqual(len(rest.tokens), 0)
        self.patch(rest, "clock", time.time)
        code, _ = yield self.request("POST", self.SEND, token=token, body=b"x",
                                     headers={"Content-Type": "text/plain"})
        self.assertEqual((code, len(rest.tokens)), (202, 1))
        self.assertTrue(rest.reloaded())
        self.assertEqual(len(rest.tokens), 0)

    @defer.inlineCallbacks
    def test_rightTokenAccepted(self):
        code, _ = yield self.request("POST", self.SEND, body=b"x",
                                     headers={"Content-Type": "text/plain"})
        self.assertEqual(code, 202)

    @defer.inlineCallbacks
    def test_audiencesRestrictOrigin(self):
        self.broker.site.resource.children[b"api"].audiences = ("https://public.example",)
        yield self.assertUnauthorized()
        code, _ = yield self.request(
            "POST", self.SEND, body=b"x", headers={"Content-Type": "text/plain"},
            aud="https://public.example/api/hubs/chat/:send?api-version=2024-12-01")
        self.assertEqual(code, 202)

    @defer.inlineCallbacks
    def test_perHubKey(self):
        path = "/api/hubs/other/:send?api-version=2024-12-01"
        code, _ = yield self.request("POST", path, key=OTHER_KEY, body=b"x",
                                     headers={"Content-Type": "text/plain"})
        self.assertEqual(code, 202)
        code, _ = yield self.request("POST", path, key=KEY, body=b"x",
                                     headers={"Content-Type": "text/plain"})
        self.assertEqual(code, 401)

    @defer.inlineCallbacks
    def test_apiVersion(self):
        code, error = yield self.request("POST", "/api/hubs/chat/:send", body=b"x",
                                         headers={"Content-Type": "text/plain"})
        self.assertEqual((code, error["code"]), (400, "MissingApiVersion"))
        # Malformed, or older than the oldest supported: refused.
        for v in ("1999-01-01", "2021-07-31", "2024-1-1", "latest", "2099-02-30",
                  "2099-01-01-beta", "2099-01-01%0A"):
            code, error = yield self.request("POST", f"/api/hubs/chat/:send?api-version={v}",
                                             body=b"x", headers={"Content-Type": "text/plain"})
            self.assertEqual((code, error["code"]), (400, "UnsupportedApiVersion"), v)
        # Any later well-formed version is served as the newest known.
        for v in API_VERSIONS + ("2099-01-01", "2099-01-01-preview"):
            code, _ = yield self.request("POST", f"/api/hubs/chat/:send?api-version={v}",
                                         body=b"x", headers={"Content-Type": "text/plain"})
            self.assertEqual(code, 202, v)

    @defer.inlineCallbacks
    def test_routing(self):
        code, error = yield self.request("GET", "/api/hubs/chat/nothing?api-version=2024-12-01")
        self.assertEqual((code, error["code"]), (404, "NotFound"))
        code, error = yield self.request("GET", "/api/hubs/chat/:send?api-version=2024-12-01")
        self.assertEqual((code, error["code"]), (405, "MethodNotAllowed"))
        code, error = yield self.request("POST", "/api/hubs/b%20d/:send?api-version=2024-12-01")
        self.assertEqual(code, 400)

    @defer.inlineCallbacks
    def test_badBodies(self):
        def send(body, ctype):
            return self.request("POST", self.SEND, body=body,
                                headers={"Content-Type": ctype} if ctype else None)

        code, error = yield send(b"x", "application/xml")
        self.assertEqual((code, error["code"]), (415, "UnsupportedMediaType"))
        code, error = yield send(b"x", None)
        self.assertEqual(code, 415)
        code, error = yield send(b"{nope", "application/json")
        self.assertEqual((code, error["code"]), (400, "BadRequest"))
        code, error = yield send(b"NaN", "application/json")
        self.assertEqual(code, 400)
        code, error = yield send(b"\xff\xfe", "text/plain")
        self.assertEqual((code, error["message"]), (400, "the body is not valid UTF-8"))
        code, error = yield send(b"x" * (1024 * 1024 + 1), "application/octet-stream")
        self.assertEqual((code, error["code"]), (413, "PayloadTooLarge"))
        code, _ = yield send(b"x" * (1024 * 1024), "application/octet-stream")
        self.assertEqual(code, 202)

    @defer.inlineCallbacks
    def rawExchange(self, data):
        """
        Write C{data} on a plain TCP connection; return all the broker
        answers until it closes the connection.
        """
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.protocol import Protocol

        class Collect(Protocol):
            def __init__(self):
                self.received = b""
                self.done = defer.Deferred()

            def dataReceived(self, d):
                self.received += d

            def connectionLost(self, reason):
                self.done.callback(self.received)

        p = Collect()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), p)
        p.transport.write(data)
        received = yield p.done
        return received

    @defer.inlineCallbacks
    def test_hugeBodyRefusedBeforeReading(self):
        """
        A body far over the limit is refused from its Content-Length alone,
        without a token: nothing is spooled, the connection is closed.
        """
        head = (b"POST /api/hubs/chat/:send?api-version=2024-12-01 HTTP/1.1\r\n"
                b"Host: x\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 1000000000\r\n\r\n")
        answer = yield self.rawExchange(head + b"x" * 1000)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertIn(b'"code": "PayloadTooLarge"', answer)

    @defer.inlineCallbacks
    def test_hugeChunkedBodyRefused(self):
        yield self.broker.connectJSON()
        head = (b"POST /api/hubs/chat/:send?api-version=2024-12-01 HTTP/1.1\r\n"
                b"Host: x\r\nContent-Type: text/plain\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (256 * 1024, b"x" * 256 * 1024)
        answer = yield self.rawExchange(head + chunk * 6)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertEqual(self.hub().stats.messagesOut, 0)

    @defer.inlineCallbacks
    def test_badQuery(self):
        code, error = yield self.request(
            "GET", "/api/hubs/chat/groups/g/connections?api-version=2024-12-01&maxpagesize=0")
        self.assertEqual((code, error["code"]), (400, "BadRequest"))
        code, error = yield self.request(
            "GET", "/api/hubs/chat/groups/g/connections?api-version=2024-12-01"
            "&continuationToken=%21%21")
        self.assertEqual((code, error["message"]), (400, "invalid continuationToken"))
        code, error = yield self.request(
            "POST", "/api/hubs/chat/:generateToken?api-version=2024-12-01&clientType=SocketIO")
        self.assertEqual((code, error["code"]), (400, "BadRequest"))
        code, error = yield self.request(
            "POST", "/api/hubs/chat/:generateToken?api-version=2024-12-01&minutesToExpire=0")
        self.assertEqual(code, 400)


class TLSTests(_Base):
    """
    The SDK over HTTPS to an ssl: listener with a throwaway certificate.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield BrokerHarness(self, reactor, self.toml, tls=True).start()
        self.connections = _ServerConnections(self.broker.site)
        self.port = self.broker.port.getHost().port
        self.endpoint = f"https://localhost:{self.port}"
        self.sdks = []
        self.addCleanup(self._closeSDKs)
        self.caPath = self.mktemp()
        with open(self.caPath, "wb") as f:
            f.write(self.broker.certPEM if isinstance(self.broker.certPEM, bytes)
                    else self.broker.certPEM.encode("ascii"))

    @defer.inlineCallbacks
    def test_sendOverTLS(self):
        a = yield self.broker.connectJSON(userId="t", groups=["g"])
        sdk = WebPubSubServiceClient.from_connection_string(
            f"Endpoint={self.endpoint};AccessKey={KEY};Version=1.0;", hub="chat",
            connection_verify=self.caPath)
        self.sdks.append(sdk)
        yield self.call(sdk.send_to_group, "g", "secure", content_type="text/plain")
        self.assertEqual((yield self.nextMessage(a))["data"], "secure")
        answer = yield self.call(GeneratedOperations.get_client_access_token, sdk,
                                 user_id="t2")
        claims = jwt.decode(answer["token"], KEY, algorithms=["HS256"],
                            options={"verify_aud": False})
        self.assertEqual(claims["aud"], f"https://localhost:{self.port}/client/hubs/chat")


class BothSDKsTests(_Base):
    """
    The two official SDKs together, as an Azure application uses them: the
    service SDK mints the client URL and publishes; the client SDK
    (C{azure-messaging-webpubsubclient}, JSON subprotocol) joins and
    receives, with group history on (its extra field must not disturb it).
    """

    toml = TOML + """
[webpubsub.hubs.chat]
history_messages = 10
"""

    @defer.inlineCallbacks
    def test_serviceToClient(self):
        import threading

        from azure.messaging.webpubsubclient import WebPubSubClient
        from azure.messaging.webpubsubclient.models import WebPubSubProtocolType

        sdk = self.sdk()
        answer = yield self.call(sdk.get_client_access_token, user_id="cli",
                                 roles=[JOIN, SEND])
        client = WebPubSubClient(answer["url"], protocol_type=WebPubSubProtocolType.JSON,
                                 auto_reconnect=False, auto_rejoin_groups=False)
        got = []
        done = threading.Event()

        def onGroup(e):
            got.append(("group", e.group, e.data, e.from_user_id))
            if len(got) == 3:
                done.set()

        def onServer(e):
            got.append(("server", e.data))
            if len(got) == 3:
                done.set()

        client.subscribe("group-message", onGroup)
        client.subscribe("server-message", onServer)

        def run():
            client.open()
            try:
                client.join_group("g")
                client.send_to_group("g", "from the client", "text")
                sdk.send_to_group("g", {"from": "service"})
                sdk.send_to_user("cli", "direct", content_type="text/plain")
                return done.wait(10)
            finally:
                client.close()

        self.assertTrue((yield self.call(run)), got)
        self.assertEqual(sorted(got, key=str), sorted([
            ("group", "g", "from the client", "cli"),
            ("group", "g", {"from": "service"}, None),
            ("server", "direct")], key=str))
        self.assertEqual(self.hub().history.position("g")[1], 2)
