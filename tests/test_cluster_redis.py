# -*- test-case-name: tests.test_cluster_redis -*-
"""
The Redis link against a real redis-server: commands, fail-fast while Redis
is down, reconnection with backoff, and subscriptions that outlive a Redis
restart.
"""

from twisted.internet import defer, reactor
from twisted.trial import unittest

from broker.cluster.redis import RedisClient, RedisOutcomeUnknown, RedisUnavailable, parseURL
from tests.redisserver import RedisServer, settle


def waitFor(predicate, timeout=10.0, step=0.02):
    """
    Fire once C{predicate()} holds; fail after C{timeout} seconds.
    """
    @defer.inlineCallbacks
    def poll():
        waited = 0.0
        while not predicate():
            if waited > timeout:
                raise AssertionError(f"condition not met within {timeout} s")
            yield settle(reactor, step)
            waited += step
    return poll()


class ParseURLTests(unittest.TestCase):
    def test_forms(self):
        self.assertEqual(parseURL("redis://h"), ("h", 6379, None, 0))
        self.assertEqual(parseURL("redis://:p%40ss@h:7/3"), ("h", 7, "p@ss", 3))
        self.assertRaises(ValueError, parseURL, "http://h")
        self.assertRaises(ValueError, parseURL, "redis://h/x")


class RedisClientTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(self, reactor)
        yield self.redis.start()
        self.client = RedisClient(reactor, self.redis.url, maxDelay=0.3)
        self.client.startService()
        self.addCleanup(self.client.stopService)
        yield waitFor(lambda: self.client.connected)

    @defer.inlineCallbacks
    def test_commandsAreBytes(self):
        yield self.client.execute("SET", "k", b"\xff\x00")
        self.assertEqual((yield self.client.execute("GET", "k")), b"\xff\x00")
        self.assertEqual((yield self.client.eval("return redis.call('INCR', KEYS[1])", ["n"])), 1)

    @defer.inlineCallbacks
    def test_failsFastWhileDownThenReconnects(self):
        ups = []
        self.client.onConnected(lambda: ups.append(1))
        yield self.redis.stop()
        yield waitFor(lambda: not self.client.connected)
        yield self.assertFailure(self.client.execute("PING"), RedisUnavailable)
        yield self.redis.start()
        yield waitFor(lambda: self.client.connected)
        self.assertEqual(ups, [1])
        self.assertEqual((yield self.client.execute("PING")), b"PONG")

    @defer.inlineCallbacks
    def test_subscriptionOutlivesRestart(self):
        got = []
        yield self.client.subscribe("ch", got.append)
        yield self.client.execute("PUBLISH", "ch", b"one")
        yield waitFor(lambda: got == [b"one"])
        yield self.redis.kill()
        yield waitFor(lambda: not self.client.connected)
        yield self.redis.start()
        yield waitFor(lambda: self.client.connected)
        yield self.client.execute("PUBLISH", "ch", b"two")
        yield waitFor(lambda: got == [b"one", b"two"])


class InFlightTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_cutOffOutcomeUnknown(self):
        """
        A command cut off after it was sent is L{RedisOutcomeUnknown}: Redis
        may have executed it (writes pipelined when Redis shuts down are
        often in its append-only file though never answered).  One refused
        because Redis was already down is a plain RedisUnavailable: it was
        never sent.
        """
        redis = RedisServer(self, reactor)
        yield redis.start()
        client = RedisClient(reactor, redis.url, maxDelay=0.3)
        client.startService()
        self.addCleanup(client.stopService)
        yield waitFor(lambda: client.connected)
        d = client.execute("BLPOP", "never", 0)
        yield redis.kill()
        cut = yield self.assertFailure(d, RedisOutcomeUnknown)
        # Whoever catches RedisUnavailable (and Unavailable) catches it too.
        self.assertIsInstance(cut, RedisUnavailable)
        yield waitFor(lambda: not client.connected)
        refused = yield self.assertFailure(client.execute("SET", "k", "v"), RedisUnavailable)
        self.assertNotIsInstance(refused, RedisOutcomeUnknown)
        refused = yield self.assertFailure(client.eval("return 1"), RedisUnavailable)
        self.assertNotIsInstance(refused, RedisOutcomeUnknown)
