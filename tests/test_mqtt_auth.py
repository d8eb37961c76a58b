# -*- test-case-name: tests.test_mqtt_auth -*-
"""
The MQTT face's authentication and ACLs: topic filters, Mosquitto password
files (written by Debian's real C{mosquitto_passwd}), the password checks'
thread pool bound and cache, Mosquitto ACL files, Web PubSub access tokens
as MQTT credentials, and reloading on C{SIGHUP} through the broker's
L{Reloader}.
"""

import base64
import os
import shutil
import signal
import subprocess

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from broker.auth.tokens import makeClientToken
from broker.mqtt import acl, auth, passwords
from broker.mqtt import topicsets
from broker.mqtt.interfaces import (BAD_USER_NAME_OR_PASSWORD, NOT_AUTHORIZED, IMqttAuth,
                                    MqttAuthError, MqttIdentity)
from broker.tap import Reloader
from tests.tools import requireTool

KEY = "mqtt-hub-key-0123456789abcdef0123"
MQTT_AUD = "http://broker.example/clients/mqtt/hubs/devices"
JOIN = "webpubsub.joinLeaveGroup"
SEND = "webpubsub.sendToGroup"


def mosquittoPasswd(path, user, password, *options):
    """Add C{user} to the file at C{path} with Debian's mosquitto_passwd."""
    tool = shutil.which("mosquitto_passwd")
    requireTool(tool, "mosquitto_passwd (Debian package mosquitto) is not installed")
    create = ["-c"] if not os.path.exists(path) else []
    subprocess.run([tool, *options, *create, "-b", path, user, password], check=True,
                   capture_output=True)


class TopicTests(unittest.TestCase):
    def test_valid(self):
        for f in ["a", "a/b", "+", "#", "a/+/c", "a/#", "+/+", "/", "a//b", "$SYS/#"]:
            self.assertTrue(topicsets.validTopicFilter(f), f)
        for f in ["", "a#", "a/#/b", "a+", "a/b+/c", "##", "a\x00"]:
            self.assertFalse(topicsets.validTopicFilter(f), f)
        self.assertTrue(topicsets.validTopicName("a/b"))
        for n in ["", "a/+", "#", "a\x00b"]:
            self.assertFalse(topicsets.validTopicName(n), n)

    def test_matches(self):
        yes = [("a/#", "a"), ("a/#", "a/b/c"), ("#", "a/b"), ("+", "a"), ("a/+", "a/"),
               ("+/+", "/x"), ("a/+/c", "a/b/c"), ("$SYS/#", "$SYS/x"), ("a/b", "a/b")]
        no = [("a/+", "a"), ("a/+", "a/b/c"), ("+", "a/b"), ("#", "$SYS/x"),
              ("+/x", "$SYS/x"), ("a/b", "a/B"), ("a", "a/b")]
        for f, t in yes:
            self.assertTrue(topicsets.matches(f, t), (f, t))
        for f, t in no:
            self.assertFalse(topicsets.matches(f, t), (f, t))

    def test_covers(self):
        yes = [("#", "a/+/c"), ("a/#", "a"), ("a/#", "a/#"), ("a/#", "a/+/#"), ("a/+", "a/b"),
               ("a/+", "a/+"), ("+/+", "a/+"), ("$SYS/#", "$SYS/+")]
        no = [("a/+", "a/#"), ("a/b", "a/+"), ("#", "$SYS/x"), ("+/b", "$x/b"),
              ("a/+/c", "a/+"), ("a", "a/#"), ("a/+", "a")]
        for o, i in yes:
            self.assertTrue(topicsets.covers(o, i), (o, i))
        for o, i in no:
            self.assertFalse(topicsets.covers(o, i), (o, i))

    def test_overlaps(self):
        yes = [("a/secret", "a/+"), ("a/#", "a"), ("#", "x/y"), ("+/b", "a/+"),
               ("a/+/c", "a/b/#"), ("$SYS/#", "$SYS/a")]
        no = [("a/b", "a/c"), ("a/+", "a"), ("#", "$SYS/a"), ("+", "$x"), ("a/b/c", "a/+")]
        for a, b in yes:
            self.assertTrue(topicsets.overlaps(a, b) and topicsets.overlaps(b, a), (a, b))
        for a, b in no:
            self.assertFalse(topicsets.overlaps(a, b) or topicsets.overlaps(b, a), (a, b))

    # The relations checked against brute force over every topic of up to
    # four levels from a small alphabet ("$x" only first, as $-topics are).
    _filters = st.lists(st.sampled_from(["a", "b", "", "+", "#", "$x"]), min_size=1,
                        max_size=3).filter(lambda ls: "$x" not in ls[1:]).map(
        "/".join).filter(topicsets.validTopicFilter)
    _universe = None

    @classmethod
    def universe(cls):
        if cls._universe is None:
            names = [[w] for w in ["a", "b", "", "$x"]]
            out = list(names)
            for _ in range(3):
                names = [n + [w] for n in names for w in ["a", "b", ""]]
                out.extend(names)
            cls._universe = ["/".join(n) for n in out]
        return cls._universe

    @settings(max_examples=400, deadline=None)
    @given(_filters, _filters)
    def test_relationsAgainstBruteForce(self, outer, inner):
        universe = self.universe()
        innerTopics = {t for t in universe if topicsets.matches(inner, t)}
        outerTopics = {t for t in universe if topicsets.matches(outer, t)}
        self.assertEqual(topicsets.covers(outer, inner), outerTopics >= innerTopics,
                         (outer, inner))
        self.assertEqual(topicsets.overlaps(outer, inner), bool(outerTopics & innerTopics),
                         (outer, inner))


class PasswordFileTests(unittest.TestCase):
    def test_mosquittoPasswdFile(self):
        """
        A file written by the real mosquitto_passwd, in both its hashes
        (PBKDF2-SHA512 by default, salted SHA-512 with -H sha512), with a
        password holding a colon.
        """
        path = self.mktemp()
        mosquittoPasswd(path, "alice", "s3cret")
        mosquittoPasswd(path, "bob", "p@ss:word é")
        mosquittoPasswd(path, "carol", "old-style", "-H", "sha512")
        table = passwords.readPasswordFile(path)
        self.assertEqual(sorted(table), ["alice", "bob", "carol"])
        self.assertEqual((table["alice"].scheme, table["carol"].scheme), ("7", "6"))
        self.assertTrue(table["alice"].check(b"s3cret"))
        self.assertFalse(table["alice"].check(b"s3cret "))
        self.assertTrue(table["bob"].check("p@ss:word é".encode()))
        self.assertTrue(table["carol"].check(b"old-style"))
        self.assertFalse(table["carol"].check(b"old-styl"))

    def test_hashPasswordReadByMosquitto(self):
        """
        What hashPassword writes is what mosquitto_passwd writes: the real
        tool keeps our line when it adds another user, and we read both.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("dave:" + passwords.hashPassword("pw", 1000) + "\n")
        mosquittoPasswd(path, "erin", "x")
        table = passwords.readPasswordFile(path)
        self.assertTrue(table["dave"].check(b"pw"))
        self.assertEqual(table["dave"].iterations, 1000)
        self.assertTrue(table["erin"].check(b"x"))

    def test_commentsAndBlankLines(self):
        """Mosquitto's broker skips them (mosquitto_passwd itself refuses them)."""
        data = ("# users\n\n  u:" + passwords.hashPassword("p") + "  \r\n").encode()
        self.assertTrue(passwords.parsePasswordFile(data)["u"].check(b"p"))

    def test_malformed(self):
        good = "u:" + passwords.hashPassword("p")
        digest = base64.b64encode(bytes(64))
        cases = {
            b"u:plain": "line 1",
            good.encode() + b"\nnocolon": "line 2",
            good.encode() + b"\n" + good.encode(): "given twice",
            b"u:$7$0$AAAA$" + digest: "iterations",
            b"u:$7$99999999999$AAAA$" + digest: "iterations",
            b"u:$7$10$!!$" + digest: "base64",
            b"u:$7$10$AAAA$" + b"A" * 88: "64 bytes",
            b"u:$6$AAAA$AAAA": "64 bytes",
            b"\xff:x": "UTF-8",
        }
        for data, why in cases.items():
            e = self.assertRaises(passwords.PasswordFileError, passwords.parsePasswordFile, data)
            self.assertIn(why, str(e), data)
        e = self.assertRaises(passwords.PasswordFileError, passwords.readPasswordFile,
                              self.mktemp())
        self.assertIn("cannot read", str(e))


class PasswordCheckerTests(unittest.TestCase):
    def setUp(self):
        self.pool = ThreadPool(1, 2, "test-mqtt-passwords")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.table = {"alice": passwords.parseHash(passwords.hashPassword("right", 2000)),
                      "old": passwords.parseHash(
                          "$6$3SHJgJlBGimCxAd4$83QHT6WPg7UcUvMoCPaD4vfZQFFVkTTpr9VWtxYe5Ov1B"
                          "wJLi+ForfxfEmK+J4i03DHxVk0xTUU4w7BNgGfINA==")}

    def checker(self, **kw):
        return passwords.PasswordChecker(reactor, dict(self.table), threadpool=self.pool, **kw)

    @defer.inlineCallbacks
    def test_checksAndCache(self):
        c = self.checker()
        self.assertTrue((yield c.check("alice", b"right")))
        self.assertFalse((yield c.check("alice", b"wrong")))
        self.assertFalse((yield c.check("nobody", b"right")))
        self.assertTrue((yield c.check("old", b"abc")))
        self.assertEqual(c.stats["hashed"], 3)
        self.assertTrue((yield c.check("alice", b"right")))
        self.assertEqual((c.stats["hashed"], c.stats["cacheHits"]), (3, 1))
        # A failure is never cached; a reload drops what was.
        self.assertFalse((yield c.check("alice", b"wrong")))
        self.assertEqual(c.stats["hashed"], 4)
        c.replace({"alice": passwords.parseHash(passwords.hashPassword("new", 10))})
        self.assertFalse((yield c.check("alice", b"right")))
        self.assertTrue((yield c.check("alice", b"new")))
        self.assertNotIn(b"right", repr(c._cache).encode())

    @defer.inlineCallbacks
    def test_cacheExpires(self):
        clock = task.Clock()
        c = passwords.PasswordChecker(_ClockWithThreads(clock), dict(self.table),
                                      threadpool=self.pool, cacheSeconds=30)
        self.assertTrue((yield c.check("alice", b"right")))
        clock.advance(29)
        self.assertTrue((yield c.check("alice", b"right")))
        self.assertEqual(c.stats["hashed"], 1)
        clock.advance(2)
        self.assertTrue((yield c.check("alice", b"right")))
        self.assertEqual(c.stats["hashed"], 2)

    @defer.inlineCallbacks
    def test_queueBound(self):
        """
        A reconnect storm with wrong passwords: beyond maxConcurrent running
        and maxQueued waiting, checks are refused at once (counted), and
        every check admitted (the good peer's among them) is answered.
        """
        c = self.checker(maxConcurrent=1, maxQueued=3)
        good = c.check("alice", b"right")
        storm = [c.check("alice", b"guess%d" % i) for i in range(40)]
        results = yield defer.DeferredList([good] + storm, consumeErrors=True)
        self.assertEqual(results[0], (True, True))
        admitted = [value for ok, value in results[1:] if ok]
        refused = [value for ok, value in results[1:] if not ok]
        self.assertEqual(len(admitted), 3)
        self.assertEqual(admitted, [False] * 3)
        self.assertEqual(len(refused), 37)
        self.assertTrue(all(f.check(passwords.PasswordCheckBusy) for f in refused))
        self.assertEqual(c.stats["busy"], 37)
        # Once the storm has passed, checks are admitted again.
        self.assertTrue((yield c.check("alice", b"right")))


class _ClockWithThreads:
    """A Clock whose callFromThread lands in the real reactor's thread."""

    def __init__(self, clock):
        self._clock = clock

    def seconds(self):
        return self._clock.seconds()

    def callFromThread(self, f, *a, **kw):
        reactor.callFromThread(f, *a, **kw)



ACL = b"""\
# anonymous
topic read public/#

user alice
topic readwrite alice/#
topic deny alice/secret
topic write shared/in
topic   read   shared/+/out

user bob
topic $SYS/broker/#
topic read #
topic deny private/#

pattern write devices/%c/up
pattern read devices/%c/down/#
pattern readwrite users/%u/#
"""


class AclTests(unittest.TestCase):
    def entries(self, user, clientId="c1"):
        return acl.parseAclFile(ACL).entriesFor(user, clientId)

    def test_userEntries(self):
        a = self.entries("alice")
        self.assertTrue(a.mayPublish("alice/x/y"))
        self.assertFalse(a.mayPublish("alice/secret"))
        self.assertFalse(a.maySubscribe("alice/#"))  # overlaps the deny
        self.assertTrue(a.maySubscribe("alice/+/y"))
        self.assertFalse(a.maySubscribe("alice/secret"))
        self.assertTrue(a.mayPublish("shared/in"))
        self.assertFalse(a.maySubscribe("shared/in"))
        self.assertTrue(a.maySubscribe("shared/x/out"))
        self.assertTrue(a.maySubscribe("shared/+/out"))
        self.assertFalse(a.maySubscribe("shared/#"))
        self.assertFalse(a.mayPublish("shared/x/out"))
        self.assertFalse(a.mayPublish("public/news"))

    def test_wildcardsAndDollar(self):
        b = self.entries("bob")
        self.assertTrue(b.maySubscribe("news/#"))
        self.assertFalse(b.maySubscribe("#"))
        self.assertFalse(b.maySubscribe("private/x"))
        self.assertFalse(b.maySubscribe("+/x"))
        self.assertFalse(b.mayPublish("news"))
        # "#" does not reach $SYS: only the $SYS entry does (readwrite).
        self.assertTrue(b.maySubscribe("$SYS/broker/load"))
        self.assertTrue(b.mayPublish("$SYS/broker/x"))
        self.assertFalse(b.maySubscribe("$SYS/other"))

    def test_anonymousAndUnknownUser(self):
        anon = self.entries(None)
        self.assertTrue(anon.maySubscribe("public/#"))
        self.assertFalse(anon.mayPublish("public/x"))
        self.assertFalse(anon.maySubscribe("users/+/x"))
        self.assertTrue(anon.mayPublish("devices/c1/up"))
        stranger = self.entries("zed")
        self.assertFalse(stranger.maySubscribe("public/#"))
        self.assertTrue(stranger.maySubscribe("users/zed/#"))

    def test_patterns(self):
        a = self.entries("alice", "dev-7")
        self.assertTrue(a.mayPublish("devices/dev-7/up"))
        self.assertFalse(a.mayPublish("devices/dev-8/up"))
        self.assertTrue(a.maySubscribe("devices/dev-7/down/#"))
        self.assertFalse(a.maySubscribe("devices/+/down/#"))
        self.assertTrue(a.mayPublish("users/alice/notes"))
        self.assertFalse(a.mayPublish("users/bob/notes"))

    def test_dangerousNamesGetNoPatterns(self):
        """
        A client id or user name with + # or / would widen a pattern to
        other clients' topics: patterns are not applied to it at all.
        """
        for user, clientId in [("alice", "+"), ("alice", "#"), ("alice", "x/y"),
                               ("a+b", "c1"), ("a/b", "c1")]:
            e = self.entries(user, clientId)
            self.assertFalse(e.mayPublish("devices/x/up"), (user, clientId))
            self.assertFalse(e.mayPublish(f"devices/{clientId}/up"), (user, clientId))
            self.assertFalse(e.mayPublish("users/a/b/c"), (user, clientId))

    def test_malformed(self):
        cases = {
            b"topic": "line 1",
            b"user": "needs a name",
            b"topics read a": "unknown keyword",
            b"# c\ntopic rw a/b": "line 2",
            b"topic read a/#/b": "not a valid topic filter",
            b"pattern read a+": "not a valid topic filter",
            b"\xff": "UTF-8",
        }
        for data, why in cases.items():
            e = self.assertRaises(acl.AclFileError, acl.parseAclFile, data)
            self.assertIn(why, str(e), data)


class _Logged:
    def __init__(self, testCase):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        testCase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def errors(self, text):
        return [e for e in self.events
                if text in (e.get("log_format") or "") and e.get("log_level").name == "error"]


class MqttAuthTests(unittest.TestCase):
    def setUp(self):
        self.pw = self.mktemp()
        mosquittoPasswd(self.pw, "alice", "s3cret")
        mosquittoPasswd(self.pw, "bob", "hunter2")
        self.aclPath = self.mktemp()
        with open(self.aclPath, "wb") as f:
            f.write(ACL)

    def auth(self, **kw):
        options = {"passwordFile": self.pw, "aclFile": self.aclPath,
                   "tokenKeys": lambda hub: (KEY,) if hub == "devices" else ()}
        options.update(kw)
        a = auth.MqttAuth(reactor, **options).load()
        self.assertTrue(IMqttAuth.providedBy(a))
        return a

    @defer.inlineCallbacks
    def refused(self, d, code):
        e = yield self.assertFailure(d, MqttAuthError)
        self.assertEqual(e.reasonCode, code)
        return e

    @defer.inlineCallbacks
    def test_passwords(self):
        a = self.auth()
        who = yield a.authenticate("c1", "alice", b"s3cret", "devices")
        self.assertIsInstance(who, MqttIdentity)
        self.assertEqual(who.userId, "alice")
        self.assertTrue(a.mayPublish(who, "alice/x"))
        self.assertFalse(a.mayPublish(who, "bob/x"))
        e = yield self.refused(a.authenticate("c1", "alice", b"wrong", "devices"),
                               BAD_USER_NAME_OR_PASSWORD)
        self.assertEqual(e.returnCode311, 4)
        yield self.refused(a.authenticate("c1", "mallory", b"s3cret", "devices"),
                           BAD_USER_NAME_OR_PASSWORD)
        yield self.refused(a.authenticate("c1", "alice", None, "devices"),
                           BAD_USER_NAME_OR_PASSWORD)
        # MQTT 5 allows a password without a user name; it names nobody.
        yield self.refused(a.authenticate("c1", None, b"s3cret", "devices"),
                           BAD_USER_NAME_OR_PASSWORD)
        self.assertEqual(a.stats["refused"], 4)

    @defer.inlineCallbacks
    def test_anonymous(self):
        e = yield self.refused(self.auth().authenticate("c1", None, None, "devices"),
                               NOT_AUTHORIZED)
        self.assertEqual(e.returnCode311, 5)
        a = self.auth(allowAnonymous=True)
        who = yield a.authenticate("c1", None, None, "devices")
        self.assertIsNone(who.userId)
        self.assertTrue(a.maySubscribe(who, "public/+"))
        self.assertFalse(a.mayPublish(who, "public/x"))
        # No ACL file: an authenticated user may touch every topic.
        a = self.auth(aclFile=None)
        who = yield a.authenticate("c1", "bob", b"hunter2", "devices")
        self.assertTrue(a.mayPublish(who, "any/thing") and a.maySubscribe(who, "#"))

    @defer.inlineCallbacks
    def test_tokenAsPassword(self):
        """
        A clientType=MQTT token in the password (3.1.1 needs a user name
        with it: any) or alone in the user name: its sub is the user, its
        roles the topics (a topic is a group).
        """
        a = self.auth()
        token = makeClientToken(KEY, MQTT_AUD, "dev-1",
                                [f"{SEND}.telemetry/dev-1", f"{JOIN}.commands/dev-1"])
        for username, password in [("ignored", token.encode()), (None, token.encode()),
                                   (token, None)]:
            who = yield a.authenticate("c9", username, password, "devices")
            self.assertEqual(who.userId, "dev-1")
            self.assertEqual(who.roles, {f"{SEND}.telemetry/dev-1", f"{JOIN}.commands/dev-1"})
            self.assertTrue(a.mayPublish(who, "telemetry/dev-1"))
            self.assertFalse(a.mayPublish(who, "telemetry/dev-2"))
            self.assertFalse(a.mayPublish(who, "commands/dev-1"))
            self.assertTrue(a.maySubscribe(who, "commands/dev-1"))
            self.assertFalse(a.maySubscribe(who, "commands/+"))
            self.assertFalse(a.maySubscribe(who, "telemetry/dev-1"))
        everything = makeClientToken(KEY, MQTT_AUD, "ops", [JOIN, SEND])
        who = yield a.authenticate("c9", "x", everything.encode(), "devices")
        self.assertTrue(a.maySubscribe(who, "#") and a.mayPublish(who, "a/b"))
        # A Default (Web PubSub) token of the hub is good too.
        plain = makeClientToken(KEY, "http://h/client/hubs/devices", "w")
        self.assertEqual((yield a.authenticate("c", "x", plain.encode(), "devices")).userId,
                         "w")
        self.assertEqual(a.stats["tokens"], 5)

    @defer.inlineCallbacks
    def test_tokenRefusals(self):
        a = self.auth()
        cases = [
            makeClientToken("another-key-0123456789abcdef012345", MQTT_AUD, "x"),
            makeClientToken(KEY, MQTT_AUD, "x", lifetime=-60),
            makeClientToken(KEY, "http://h/clients/mqtt/hubs/other", "x"),
            makeClientToken(KEY, "http://h/clients/socketio/hubs/devices", "x"),
            makeClientToken(KEY, MQTT_AUD, "x")[:-3] + "abc",
        ]
        for token in cases:
            yield self.refused(a.authenticate("c", "x", token.encode(), "devices"),
                               BAD_USER_NAME_OR_PASSWORD)
        # Over WebSocket the face hands the URL's token directly.
        yield self.refused(a.authenticateToken(cases[0], "devices"), BAD_USER_NAME_OR_PASSWORD)
        # A hub without keys takes no tokens: the JWT is a (wrong) password.
        token = makeClientToken(KEY, "http://h/clients/mqtt/hubs/other", "x")
        yield self.refused(a.authenticate("c", "alice", token.encode(), "other"),
                           BAD_USER_NAME_OR_PASSWORD)

    @defer.inlineCallbacks
    def test_reloadOnSighup(self):
        """
        SIGHUP, through the broker's Reloader: a user added and one removed
        with mosquitto_passwd, an ACL changed, applied to a connected
        client's next check; then broken files keep the previous tables,
        each failure logged once.
        """
        a = self.auth()
        reloader = Reloader(reactor)
        reloader.hooks.append(a.reload)
        reloader.startService()
        self.addCleanup(reloader.stopService)
        alice = yield a.authenticate("c1", "alice", b"s3cret", "devices")
        self.assertFalse(a.mayPublish(alice, "news/today"))

        mosquittoPasswd(self.pw, "carol", "fresh")
        subprocess.run([shutil.which("mosquitto_passwd"), "-D", self.pw, "bob"], check=True)
        with open(self.aclPath, "ab") as f:
            f.write(b"user alice\ntopic write news/#\n")
        yield self.sighup(a)
        self.assertTrue(a.mayPublish(alice, "news/today"))
        self.assertEqual((yield a.authenticate("c3", "carol", b"fresh", "devices")).userId,
                         "carol")
        yield self.refused(a.authenticate("c2", "bob", b"hunter2", "devices"),
                           BAD_USER_NAME_OR_PASSWORD)

        logged = _Logged(self)
        with open(self.pw, "a") as f:
            f.write("dave:plaintext\n")
        with open(self.aclPath, "ab") as f:
            f.write(b"topic sometimes a/b\n")
        yield self.sighup(a)
        self.assertEqual(len(logged.errors("password file not reloaded")), 1)
        self.assertEqual(len(logged.errors("ACL file not reloaded")), 1)
        self.assertEqual(a.stats["reloadFailures"], 2)
        self.assertEqual((yield a.authenticate("c3", "carol", b"fresh", "devices")).userId,
                         "carol")
        self.assertTrue(a.mayPublish(alice, "news/today"))

        os.remove(self.pw)
        yield self.sighup(a)
        self.assertEqual(len(logged.errors("password file not reloaded")), 2)
        self.assertEqual((yield a.authenticate("c1", "alice", b"s3cret", "devices")).userId,
                         "alice")

    @defer.inlineCallbacks
    def sighup(self, a):
        before = a.checker.stats["checks"], a._generation, a.stats["reloadFailures"], \
            id(a.checker.table)
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(200):
            yield task.deferLater(reactor, 0.01, lambda: None)
            now = a.checker.stats["checks"], a._generation, a.stats["reloadFailures"], \
                id(a.checker.table)
            if now != before:
                return
        self.fail("SIGHUP did not reload")

    def test_badFilesAtStart(self):
        with open(self.pw, "a") as f:
            f.write("x:y\n")
        self.assertRaises(passwords.PasswordFileError, self.auth)
        self.assertRaises(acl.AclFileError, self.auth, passwordFile=None,
                          aclFile=self.mktemp())

    @defer.inlineCallbacks
    def test_fromSettings(self):
        a = auth.fromSettings(reactor, {"password_file": "pw", "acl_file": ""},
                              resolve=lambda p: self.pw)
        self.assertFalse(a.allowAnonymous)
        self.assertIsNone(a.aclFile)
        self.assertEqual((yield a.authenticate("c", "bob", b"hunter2", "h")).userId, "bob")
        a = auth.fromSettings(reactor, {}, tokenKeys=lambda hub: (KEY,))
        self.assertTrue(a.allowAnonymous)
        self.assertIsNone((yield a.authenticate("c", None, None, "h")).userId)
        token = makeClientToken(KEY, "http://b/clients/mqtt/hubs/h", "t", [f"{SEND}.x"])
        who = yield a.authenticate("c", "x", token.encode(), "h")
        self.assertFalse(a.mayPublish(who, "y"))
        a = auth.fromSettings(reactor, {"allow_anonymous": False}, tokenKeys=lambda hub: (KEY,))
        yield self.refused(a.authenticate("c", None, None, "h"), NOT_AUTHORIZED)
        self.assertEqual((yield a.authenticate("c", "x", token.encode(), "h")).userId, "t")


class BuildTests(unittest.TestCase):
    """
    C{build(context, cfg)}, as the face calls it: token keys from the
    C{[webpubsub]} section of the broker's configuration, read again on
    reload; files refused with the key named.
    """

    def setUp(self):
        self.stateDir = self.mktemp()
        os.makedirs(self.stateDir)
        self.text = self.toml(KEY, "devices-key-0123456789abcdef0123456")

    def toml(self, default, hub):
        return (f'[broker]\nstate_dir = "{self.stateDir}"\n'
                f'[webpubsub]\naccess_keys = ["{default}"]\n'
                f'[webpubsub.hubs.devices]\naccess_keys = ["{hub}"]\n')

    def context(self):
        from broker import config
        from broker.faces import FaceContext

        reloader = Reloader(reactor)
        context = FaceContext(reactor, None, config.parse(self.text), None, None, None,
                              reloader, loadSettings=lambda: config.parse(self.text))
        return context, reloader

    def token(self, key, hub, user="u"):
        return makeClientToken(key, f"http://b/clients/mqtt/hubs/{hub}", user,
                               [f"{SEND}.t"]).encode()

    @defer.inlineCallbacks
    def test_hubKeysAndReload(self):
        context, reloader = self.context()
        a = auth.build(context, {"password_file": "", "acl_file": ""})
        context.onReload(a.reload)
        devices = "devices-key-0123456789abcdef0123456"
        self.assertEqual((yield a.authenticate("c", "x", self.token(devices, "devices"),
                                               "devices")).userId, "u")
        yield self.assertFailure(a.authenticate("c", "x", self.token(KEY, "devices"), "devices"),
                                 MqttAuthError)
        self.assertEqual((yield a.authenticate("c", "x", self.token(KEY, "other"),
                                               "other")).userId, "u")
        # SIGHUP with a rotated hub key: the old one is refused from now on.
        rotated = "rotated-key-0123456789abcdef0123456"
        self.text = self.toml(KEY, rotated)
        reloader.reload()
        self.assertEqual((yield a.authenticate("c", "x", self.token(rotated, "devices"),
                                               "devices")).userId, "u")
        yield self.assertFailure(
            a.authenticate("c", "x", self.token(devices, "devices"), "devices"), MqttAuthError)
        # A configuration that no longer parses keeps the keys in force.
        logged = _Logged(self)
        self.text = "[webpubsub]\naccess_keys = 5\n"
        reloader.reload()
        self.assertEqual(len(logged.errors("token keys not reloaded")), 1)
        self.assertEqual((yield a.authenticate("c", "x", self.token(rotated, "devices"),
                                               "devices")).userId, "u")

    @defer.inlineCallbacks
    def test_developmentKey(self):
        """No key configured: the Web PubSub face's development key signs tokens."""
        from broker.webpubsub.face import developmentKey

        self.text = f'[broker]\nstate_dir = "{self.stateDir}"\n'
        context, _ = self.context()
        a = auth.build(context, {})
        key = developmentKey(self.stateDir)[0]
        self.assertEqual((yield a.authenticate("c", None, self.token(key, "h"), "h")).userId,
                         "u")

    def test_badFiles(self):
        from broker.config import ConfigError

        context, _ = self.context()
        bad = self.mktemp()
        with open(bad, "w") as f:
            f.write("user:plain\n")
        e = self.assertRaises(ConfigError, auth.build, context, {"password_file": bad})
        self.assertEqual(e.key, "mqtt.password_file")
        e = self.assertRaises(ConfigError, auth.build, context, {"acl_file": self.mktemp()})
        self.assertEqual(e.key, "mqtt.acl_file")


class FaceTests(unittest.TestCase):
    """
    The authentication through the real MQTT face (a broker built by
    L{broker.tap.buildService} with real paho-mqtt clients, both protocol
    versions): a password file from mosquitto_passwd and an ACL file in
    C{[mqtt]}, a clientType=MQTT token as the password, and a user added
    by SIGHUP through the broker's own Reloader.
    """

    def setUp(self):
        import importlib.util
        if importlib.util.find_spec("broker.mqtt.face") is None:
            raise unittest.SkipTest("the MQTT face (broker.mqtt.face) is not in this tree")
        self.pw = os.path.abspath(self.mktemp())
        mosquittoPasswd(self.pw, "alice", "s3cret")
        self.aclPath = os.path.abspath(self.mktemp())
        with open(self.aclPath, "wb") as f:
            f.write(ACL)

    @defer.inlineCallbacks
    def broker(self):
        from tests import mqttharness
        self.harness = mqttharness
        top, ports, _ = yield mqttharness.startBroker(
            self, mqtt=f'password_file = "{self.pw}"\nacl_file = "{self.aclPath}"\n',
            listeners=("mqtt.listen[0]",))
        self.top = top
        self.port = ports["mqtt.listen[0]"]

    def client(self, version, username=None, password=None, clientId="c1"):
        c = self.harness.Paho(self, self.port, clientId=clientId, version=version)
        if username is not None or password is not None:
            c.client.username_pw_set(username, password)
        return c

    @defer.inlineCallbacks
    def test_passwordsAndAcl(self):
        yield self.broker()
        # paho reports 3.1.1's CONNACK return codes 4 and 5 as 0x86 and 0x87.
        for version, denied in [(5, 0x87), (4, 0x80)]:
            bad = self.client(version, "alice", "wrong")
            _, code, _ = yield bad.connect()
            self.assertEqual(code, BAD_USER_NAME_OR_PASSWORD)
            anonymous = self.client(version, clientId="anon")
            _, code, _ = yield anonymous.connect()
            self.assertEqual(code, NOT_AUTHORIZED)
            alice = self.client(version, "alice", "s3cret", clientId=f"alice{version}")
            _, code, _ = yield alice.connect()
            self.assertEqual(code, 0)
            self.assertEqual((yield alice.subscribe("alice/+/y", 1)), [1])
            self.assertEqual((yield alice.subscribe("alice/#", 1)), [denied])
            yield alice.publish("alice/x/y", b"mine", 1)
            messages = yield alice.waitMessages(1)
            self.assertEqual([(m[0], m[1]) for m in messages], [("alice/x/y", b"mine")])
            yield alice.disconnect()

    @defer.inlineCallbacks
    def test_tokenAndSighup(self):
        from tests.mqttharness import ACCESS_KEY
        yield self.broker()
        token = makeClientToken(ACCESS_KEY, "http://h/clients/mqtt/hubs/mqtt", "dev-1",
                                [f"{SEND}.up/dev-1", f"{JOIN}.up/dev-1"])
        dev = self.client(4, "any", token, clientId="dev1")
        _, code, _ = yield dev.connect()
        self.assertEqual(code, 0)
        self.assertEqual((yield dev.subscribe("up/dev-1", 0)), [0])
        self.assertEqual((yield dev.subscribe("up/+", 0)), [0x80])

        mosquittoPasswd(self.pw, "carol", "fresh")
        before = self.client(5, "carol", "fresh", clientId="carol0")
        _, code, _ = yield before.connect()
        self.assertEqual(code, BAD_USER_NAME_OR_PASSWORD)
        self.top.getServiceNamed("reloader").reload()
        carol = self.client(5, "carol", "fresh", clientId="carol1")
        _, code, _ = yield carol.connect()
        self.assertEqual(code, 0)
        yield carol.disconnect()
        yield dev.disconnect()
