# -*- test-case-name: tests.test_iot_store -*-
"""
Store-and-forward: the durable per-device queue of messages waiting for
the device's acknowledgement, and the keys issued at run time, in SQLite
through L{broker.store.sqlite.SQLiteRunner} (one thread, WAL,
synchronous=FULL: a message whose id was returned survives a SIGKILL).
"""

import time

from twisted.internet.defer import Deferred, fail, succeed

from zope.interface import implementer

from broker.iot.errors import QueueFull
from broker.iot.frames import Payload
from broker.iot.interfaces import IMessageStore
from broker.iot.lastvalue import ILastValueStore
from broker.store.sqlite import SQLiteRunner

SCHEMA = """
CREATE TABLE IF NOT EXISTS iot_queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    fleet TEXT NOT NULL,
    device TEXT NOT NULL,
    ptype TEXT NOT NULL,
    data BLOB NOT NULL,
    expires REAL NOT NULL,
    enqueued REAL
);
CREATE INDEX IF NOT EXISTS iot_queue_device ON iot_queue (fleet, device, id);
CREATE TABLE IF NOT EXISTS iot_keys (
    fleet TEXT NOT NULL,
    device TEXT NOT NULL,
    secret TEXT,
    PRIMARY KEY (fleet, device)
);
CREATE TABLE IF NOT EXISTS last_values (
    fleet TEXT NOT NULL,
    device TEXT NOT NULL,
    ptype TEXT NOT NULL,
    data BLOB NOT NULL,
    received REAL NOT NULL,
    via TEXT NOT NULL,
    PRIMARY KEY (fleet, device)
);
"""


def migrate(connection):
    """
    A queue table of an older version has no C{enqueued} column: add it
    (its rows keep NULL: their enqueue time is unknown).
    """
    columns = [row[1] for row in connection.execute("PRAGMA table_info(iot_queue)")]
    if "enqueued" not in columns:
        connection.execute("ALTER TABLE iot_queue ADD COLUMN enqueued REAL")


@implementer(IMessageStore, ILastValueStore)
class SQLiteMessageStore:
    """
    @param runner: a started (or to-be-started) L{SQLiteRunner} with
        L{SCHEMA}; see L{open}.
    @param clock: wall-clock seconds (TTLs must hold across restarts, so
        not a monotonic clock); injectable for tests.
    """

    def __init__(self, runner, clock=time.time, reactor=None):
        self.runner = runner
        self._clock = clock
        self._reactor = reactor
        self._pushes = []
        self._flush = None

    @classmethod
    def open(cls, reactor, path, clock=time.time):
        return cls(SQLiteRunner(reactor, path, SCHEMA, name="iot.store",
                                migrate=migrate), clock, reactor)

    def push(self, fleet, deviceId, payload, ttl, maxDepth):
        """
        See L{IMessageStore.push}.  With a reactor, the pushes of one
        reactor turn are committed together (group commit: one fsync for
        all of them); each still fires with its own id or QueueFull, in
        order, only after the commit.
        """
        now = self._clock()
        item = (fleet, deviceId, payload, now, now + ttl, maxDepth)
        if self._reactor is None:
            return self.runner.runInteraction(self._push, *item)
        d = Deferred()
        self._pushes.append((item, d))
        if self._flush is None:
            self._flush = self._reactor.callLater(0, self._pushAll)
        return d

    def _pushAll(self):
        self._flush = None
        batch, self._pushes = self._pushes, []

        def stored(results):
            for (_, d), result in zip(batch, results):
                if isinstance(result, QueueFull):
                    d.errback(result)
                else:
                    d.callback(result)

        def failed(f):
            for _, d in batch:
                d.errback(f)
        self.runner.runInteraction(self._pushMany, [item for item, _ in batch]).addCallbacks(
            stored, failed)

    @classmethod
    def _pushMany(cls, cursor, items):
        results = []
        for item in items:
            try:
                results.append(cls._push(cursor, *item))
            except QueueFull as e:
                results.append(e)
        return results

    @staticmethod
    def _push(cursor, fleet, deviceId, payload, now, expires, maxDepth):
        (count,) = cursor.execute(
            "SELECT count(*) FROM iot_queue WHERE fleet=? AND device=?",
            (fleet, deviceId)).fetchone()
        if count >= maxDepth:
            cursor.execute("DELETE FROM iot_queue WHERE fleet=? AND device=? AND expires<=?",
                           (fleet, deviceId, now))
            count -= cursor.rowcount
            if count >= maxDepth:
                raise QueueFull(f"device {deviceId!r} already has {count} queued messages")
        cursor.execute(
            "INSERT INTO iot_queue (fleet, device, ptype, data, expires, enqueued) "
            "VALUES (?,?,?,?,?,?)",
            (fleet, deviceId, payload.type, payload.data, expires, now))
        return cursor.lastrowid

    def pending(self, fleet, deviceId, afterId, limit):
        return self.runner.runInteraction(self._pending, fleet, deviceId, afterId, limit,
                                          self._clock())

    @staticmethod
    def _pending(cursor, fleet, deviceId, afterId, limit, now):
        rows = cursor.execute(
            "SELECT id, ptype, data FROM iot_queue WHERE fleet=? AND device=? AND id>? "
            "AND expires>? ORDER BY id LIMIT ?",
            (fleet, deviceId, afterId, now, limit)).fetchall()
        return [(i, Payload(t, bytes(d))) for i, t, d in rows]

    def ack(self, fleet, deviceId, *messageIds):
        return self.runner.runInteraction(self._ack, fleet, deviceId, messageIds)

    @staticmethod
    def _ack(cursor, fleet, deviceId, messageIds):
        cursor.executemany("DELETE FROM iot_queue WHERE fleet=? AND device=? AND id=?",
                           [(fleet, deviceId, i) for i in messageIds])
        return cursor.rowcount == len(messageIds)

    def depth(self, fleet, deviceId):
        return self.runner.runInteraction(self._depth, fleet, deviceId, self._clock())

    @staticmethod
    def _depth(cursor, fleet, deviceId, now):
        return cursor.execute(
            "SELECT count(*) FROM iot_queue WHERE fleet=? AND device=? AND expires>?",
            (fleet, deviceId, now)).fetchone()[0]

    def depths(self, fleet):
        return self.runner.runInteraction(self._depths, fleet, self._clock())

    @staticmethod
    def _depths(cursor, fleet, now):
        return dict(cursor.execute(
            "SELECT device, count(*) FROM iot_queue WHERE fleet=? AND expires>? "
            "GROUP BY device", (fleet, now)).fetchall())

    def listQueued(self, fleet, deviceId, limit):
        return self.runner.runInteraction(self._list, fleet, deviceId, limit)

    @staticmethod
    def _list(cursor, fleet, deviceId, limit):
        return [tuple(r) for r in cursor.execute(
            "SELECT id, length(data), enqueued, expires FROM iot_queue "
            "WHERE fleet=? AND device=? ORDER BY id LIMIT ?",
            (fleet, deviceId, limit)).fetchall()]

    def remove(self, fleet, deviceId, messageIds=None):
        return self.runner.runInteraction(self._remove, fleet, deviceId, messageIds)

    @staticmethod
    def _remove(cursor, fleet, deviceId, messageIds):
        rows = cursor.execute("SELECT id FROM iot_queue WHERE fleet=? AND device=? ORDER BY id",
                              (fleet, deviceId)).fetchall()
        ids = [i for (i,) in rows if messageIds is None or i in messageIds]
        cursor.executemany("DELETE FROM iot_queue WHERE id=?", [(i,) for i in ids])
        return ids

    def purgeExpired(self):
        return self.runner.runInteraction(self._purge, self._clock())

    @staticmethod
    def _purge(cursor, now):
        rows = cursor.execute("SELECT fleet, device, id FROM iot_queue WHERE expires<=? "
                              "ORDER BY id", (now,)).fetchall()
        cursor.execute("DELETE FROM iot_queue WHERE expires<=?", (now,))
        return [tuple(r) for r in rows]

    def keys(self):
        return self.runner.runInteraction(
            lambda c: c.execute("SELECT fleet, device, secret FROM iot_keys").fetchall())

    def setKey(self, fleet, deviceId, secret):
        return self.runner.runInteraction(
            lambda c: c.execute(
                "INSERT INTO iot_keys (fleet, device, secret) VALUES (?,?,?) "
                "ON CONFLICT (fleet, device) DO UPDATE SET secret=excluded.secret",
                (fleet, deviceId, secret)) and None)

    def saveLastValues(self, rows):
        """
        See L{ILastValueStore.saveLastValues}: one transaction per batch.
        """
        return self.runner.runInteraction(self._saveLastValues, rows)

    @staticmethod
    def _saveLastValues(cursor, rows):
        cursor.executemany(
            "INSERT INTO last_values (fleet, device, ptype, data, received, via) "
            "VALUES (?,?,?,?,?,?) ON CONFLICT (fleet, device) DO UPDATE SET "
            "ptype=excluded.ptype, data=excluded.data, received=excluded.received, "
            "via=excluded.via WHERE excluded.received >= last_values.received",
            [(f, d, p.type, p.data, r, v) for f, d, p, r, v in rows])

    def lastValue(self, fleet, deviceId):
        return self.runner.runInteraction(self._lastValue, fleet, deviceId)

    @staticmethod
    def _lastValue(cursor, fleet, deviceId):
        row = cursor.execute("SELECT ptype, data, received, via FROM last_values "
                             "WHERE fleet=? AND device=?", (fleet, deviceId)).fetchone()
        if row is None:
            return None
        return Payload(row[0], bytes(row[1])), row[2], row[3]


@implementer(IMessageStore, ILastValueStore)
class MemoryMessageStore:
    """
    The same queue in memory: not durable, for unit tests of the protocol
    and for a broker run without a disk (nothing survives a restart).
    """

    def __init__(self, clock=time.time):
        self._clock = clock
        self._queues = {}       # (fleet, device) -> {id: (payload, expires)}
        self._enqueued = {}     # id -> enqueue time
        self._keys = {}
        self._lastId = 0
        self._lastValues = {}   # (fleet, device) -> (payload, received, via)

    def push(self, fleet, deviceId, payload, ttl, maxDepth):
        now = self._clock()
        q = self._queues.setdefault((fleet, deviceId), {})
        if len(q) >= maxDepth:
            for i in [i for i, (_, exp) in q.items() if exp <= now]:
                del q[i]
            if len(q) >= maxDepth:
                return fail(QueueFull(f"device {deviceId!r} already has {len(q)} queued "
                                      "messages"))
        self._lastId += 1
        q[self._lastId] = (payload, now + ttl)
        self._enqueued[self._lastId] = now
        return succeed(self._lastId)

    def pending(self, fleet, deviceId, afterId, limit):
        now = self._clock()
        q = self._queues.get((fleet, deviceId), {})
        rows = [(i, p) for i, (p, exp) in sorted(q.items()) if i > afterId and exp > now]
        return succeed(rows[:limit])

    def ack(self, fleet, deviceId, *messageIds):
        q = self._queues.get((fleet, deviceId), {})
        for i in messageIds:
            self._enqueued.pop(i, None)
        return succeed(all([q.pop(i, None) is not None for i in messageIds]))

    def depth(self, fleet, deviceId):
        now = self._clock()
        return succeed(sum(1 for _, exp in self._queues.get((fleet, deviceId), {}).values()
                           if exp > now))

    def depths(self, fleet):
        now = self._clock()
        out = {}
        for (f, d), q in self._queues.items():
            n = sum(1 for _, exp in q.values() if exp > now)
            if f == fleet and n:
                out[d] = n
        return succeed(out)

    def listQueued(self, fleet, deviceId, limit):
        q = self._queues.get((fleet, deviceId), {})
        return succeed([(i, len(p.data), self._enqueued.get(i), exp)
                        for i, (p, exp) in sorted(q.items())][:limit])

    def remove(self, fleet, deviceId, messageIds=None):
        q = self._queues.get((fleet, deviceId), {})
        ids = [i for i in sorted(q) if messageIds is None or i in messageIds]
        for i in ids:
            del q[i]
            self._enqueued.pop(i, None)
        return succeed(ids)

    def purgeExpired(self):
        now = self._clock()
        out = []
        for (fleet, deviceId), q in self._queues.items():
            for i in [i for i, (_, exp) in q.items() if exp <= now]:
                del q[i]
                self._enqueued.pop(i, None)
                out.append((fleet, deviceId, i))
        return succeed(sorted(out, key=lambda r: r[2]))

    def keys(self):
        return succeed([(f, d, s) for (f, d), s in self._keys.items()])

    def setKey(self, fleet, deviceId, secret):
        self._keys[(fleet, deviceId)] = secret
        return succeed(None)

    def saveLastValues(self, rows):
        for fleet, deviceId, payload, received, via in rows:
            old = self._lastValues.get((fleet, deviceId))
            if old is None or old[1] <= received:
                self._lastValues[(fleet, deviceId)] = (payload, received, via)
        return succeed(None)

    def lastValue(self, fleet, deviceId):
        return succeed(self._lastValues.get((fleet, deviceId)))
