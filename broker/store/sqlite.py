# -*- test-case-name: tests.test_store -*-
"""
One SQLite database run on a thread of its own, so the reactor never waits
for the disk.

SQLite serialises writers anyway, so one thread and one connection per
database is the fastest safe shape: no lock contention, statements run in
the order they were asked for (a queue's order is the order of its
inserts), and every interaction is one transaction, committed before its
Deferred fires.  C{synchronous=FULL} with WAL makes a committed transaction
survive a SIGKILL of the process (and a power loss, as far as the disk
honours fsync): what a face acknowledged as stored is stored.
"""

import sqlite3

from twisted.application import service
from twisted.internet.defer import fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from broker.files import privateDatabase


class SQLiteRunner(service.Service):
    """
    Runs interactions C{f(cursor, *args)} on one connection in one thread.

    Start it (as a service or with L{start}) before use; L{stopService}
    finishes queued interactions, then closes the database.

    @param path: the database file (created mode 0600 in a directory
        created 0700: L{broker.files}), or
        C{":memory:"} in unit tests.
    @param schema: SQL run once at open (C{CREATE TABLE IF NOT EXISTS ...}).
    @param migrate: called with the connection after C{schema}, at open:
        to upgrade a database an older version made (e.g. add a column).
    """

    def __init__(self, reactor, path, schema="", name=None, migrate=None):
        self._reactor = reactor
        self.path = path
        self._schema = schema
        self._migrate = migrate
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=f"sqlite:{path}")
        self._connection = None
        self._shutdownTrigger = None
        if name is not None:
            self.setName(name)

    def start(self):
        """
        Open the database now (synchronously: start-up is the one time the
        broker may wait, and a broken database must stop it with a clear
        error).
        """
        if self._connection is not None:
            return
        if self.path != ":memory:":
            # Every store holds keys, verifiers or messages: 0600 in 0700.
            privateDatabase(self.path)
        connection = sqlite3.connect(self.path, check_same_thread=False,
                                     isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA foreign_keys=ON")
        if self._schema:
            connection.executescript(self._schema)
        if self._migrate is not None:
            self._migrate(connection)
        self._connection = connection
        self._pool.start()
        # Stop the thread even if the service is never stopped (tests).
        self._shutdownTrigger = self._reactor.addSystemEventTrigger(
            "during", "shutdown", self._stopPool)

    def startService(self):
        self.start()
        super().startService()

    def stopService(self):
        super().stopService()
        return self.close()

    def close(self):
        """
        Finish what is queued, close the database; a Deferred that fires
        when it is closed.
        """
        if self._connection is None:
            return succeed(None)
        d = self.runInteraction(lambda cursor: None)

        def closeIt(_):
            self._stopPool()
            if self._connection is not None:
                self._connection.close()
                self._connection = None
        return d.addBoth(closeIt)

    def _stopPool(self):
        if self._shutdownTrigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdownTrigger)
            self._shutdownTrigger = None
        if self._pool.started:
            self._pool.stop()

    def runInteraction(self, f, *args, **kwargs):
        """
        Run C{f(cursor, *args, **kwargs)} in one transaction on the database
        thread.

        @return: a Deferred firing with C{f}'s result after the commit, or
            failing with its exception after a rollback.
        """
        if self._connection is None:
            return fail(sqlite3.ProgrammingError(f"the database {self.path} is closed"))
        return deferToThreadPool(self._reactor, self._pool, self._transact, f, args, kwargs)

    def _transact(self, f, args, kwargs):
        connection = self._connection
        if connection is None:
            raise sqlite3.ProgrammingError("the database is closed")
        cursor = connection.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        try:
            result = f(cursor, *args, **kwargs)
        except BaseException:
            connection.rollback()
            raise
        else:
            connection.commit()
            return result
        finally:
            cursor.close()
