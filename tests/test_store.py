# -*- test-case-name: tests.test_store -*-
"""
Tests for L{broker.store.sqlite}.
"""

import os
import sqlite3

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from broker.store.sqlite import SQLiteRunner

SCHEMA = "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, value TEXT NOT NULL);"


class SQLiteRunnerTests(TestCase):
    def runner(self, path=None):
        path = path or os.path.join(self.mktemp(), "db.sqlite")
        r = SQLiteRunner(reactor, path, SCHEMA)
        r.startService()
        self.addCleanup(r.stopService)
        return r

    @defer.inlineCallbacks
    def test_commitAndOrder(self):
        """
        Interactions run in the order asked for, each committed: a second
        runner on the same file sees them all.
        """
        path = os.path.join(self.mktemp(), "db.sqlite")
        r = self.runner(path)
        yield defer.gatherResults([
            r.runInteraction(lambda c, i=i: c.execute("INSERT INTO items (value) VALUES (?)",
                                                      (str(i),)))
            for i in range(50)])
        yield r.close()
        r2 = self.runner(path)
        rows = yield r2.runInteraction(
            lambda c: c.execute("SELECT value FROM items ORDER BY id").fetchall())
        self.assertEqual([v for (v,) in rows], [str(i) for i in range(50)])

    @defer.inlineCallbacks
    def test_rollback(self):
        """
        An interaction that raises is rolled back and its Deferred fails.
        """
        r = self.runner()

        def bad(c):
            c.execute("INSERT INTO items (value) VALUES ('x')")
            raise ValueError("no")
        yield self.assertFailure(r.runInteraction(bad), ValueError)
        n = yield r.runInteraction(lambda c: c.execute("SELECT COUNT(*) FROM items").fetchone())
        self.assertEqual(n, (0,))

    @defer.inlineCallbacks
    def test_closed(self):
        r = self.runner()
        yield r.close()
        yield self.assertFailure(r.runInteraction(lambda c: None), sqlite3.ProgrammingError)
