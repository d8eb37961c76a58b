# -*- test-case-name: tests.test_mqtt_process -*-
"""
The durable part of the MQTT face: persistent sessions (their
subscriptions and their queued and in-flight QoS 1/2 messages) and
retained messages, in one SQLite database (L{broker.store.sqlite}).

Writes are batched: every change made during one reactor turn goes to the
database thread as one transaction.  A publisher's PUBACK / PUBREC waits
for the batch holding what its message queued (L{whenFlushed}), so a
message acknowledged to its publisher survives a SIGKILL of the broker.
Reading happens once, at start-up, synchronously (L{load}).
"""

import json
import sqlite3

from twisted.internet import defer
from twisted.logger import Logger

from broker.mqtt.message import propsFromJSON, propsToJSON
from broker.store.sqlite import SQLiteRunner

log = Logger()

SCHEMA = """
CREATE TABLE IF NOT EXISTS mqtt_sessions (
    hub TEXT NOT NULL, client_id TEXT NOT NULL, user_id TEXT, version INTEGER NOT NULL,
    expiry INTEGER NOT NULL, disconnected_at REAL, subscriptions TEXT NOT NULL,
    PRIMARY KEY (hub, client_id));
CREATE TABLE IF NOT EXISTS mqtt_messages (
    seq INTEGER PRIMARY KEY, hub TEXT NOT NULL, client_id TEXT NOT NULL,
    topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,
    props TEXT NOT NULL, expires_at REAL, sub_ids TEXT NOT NULL, pid INTEGER,
    state INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS mqtt_messages_session ON mqtt_messages (hub, client_id, seq);
CREATE TABLE IF NOT EXISTS mqtt_retained (
    hub TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL,
    props TEXT NOT NULL, expires_at REAL, PRIMARY KEY (hub, topic));
"""


def dumpProps(props):
    """Properties as JSON (correlation data is binary: base64)."""
    return json.dumps(propsToJSON(props))


def loadProps(text):
    return propsFromJSON(json.loads(text))


class NullStore:
    """No persistence (C{mqtt.persistence = false}): sessions live in memory."""

    def addMessage(self, session, out):
        pass

    def updateMessage(self, session, out):
        pass

    def removeMessage(self, session, out):
        pass

    def saveSession(self, session):
        pass

    def deleteSession(self, session):
        pass

    def setRetained(self, hub, topic, message):
        pass

    def whenFlushed(self):
        return defer.succeed(None)

    def load(self):
        return [], [], []


class SQLiteStore:
    """
    @ivar runner: the L{SQLiteRunner} (a service the face adds).
    """

    def __init__(self, reactor, path):
        self._reactor = reactor
        self.runner = SQLiteRunner(reactor, path, SCHEMA, name="mqtt.store")
        self._ops = []
        self._call = None
        self._flushing = None
        self._waiters = []
        self._seq = 0
        self.failures = 0

    # -- batching -------------------------------------------------------------

    def _add(self, op):
        self._ops.append(op)
        if self._call is None and self._flushing is None:
            self._call = self._reactor.callLater(0, self._flush)

    def _flush(self):
        self._call = None
        ops, self._ops = self._ops, []
        waiters, self._waiters = self._waiters, []
        if not ops:
            for d in waiters:
                d.callback(None)
            return
        d = self._flushing = self.runner.runInteraction(_apply, ops)

        def done(result):
            self._flushing = None
            for w in waiters:
                w.callback(None)
            if self._ops or self._waiters:
                self._flush()

        def failed(failure):
            self.failures += 1
            log.failure("mqtt: writing the session store", failure)
            return None
        d.addErrback(failed).addCallback(done)

    def whenFlushed(self):
        """
        A Deferred firing once every change made so far is committed (at
        once when nothing is pending).
        """
        if not self._ops and self._flushing is None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        if self._call is None and self._flushing is None:
            self._call = self._reactor.callLater(0, self._flush)
        return d

    # -- changes --------------------------------------------------------------

    def addMessage(self, session, out):
        self._seq += 1
        out.seq = self._seq
        self._add(("INSERT INTO mqtt_messages VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                   (out.seq, session.hubName, session.clientId, out.topic, out.payload,
                    out.qos, int(out.retain), dumpProps(out.props), out.expiresAt,
                    json.dumps(list(out.subIds)), out.pid, out.state)))

    def updateMessage(self, session, out):
        if out.seq is not None:
            self._add(("UPDATE mqtt_messages SET pid=?, state=? WHERE seq=?",
                       (out.pid, out.state, out.seq)))

    def removeMessage(self, session, out):
        if out.seq is not None:
            self._add(("DELETE FROM mqtt_messages WHERE seq=?", (out.seq,)))
            out.seq = None

    def saveSession(self, session):
        self._add(("INSERT OR REPLACE INTO mqtt_sessions VALUES (?,?,?,?,?,?,?)",
                   (session.hubName, session.clientId, session.userId, session.version,
                    session.expiryInterval,
                    None if session.online else self._reactor.seconds(),
                    json.dumps([o.toJSON() for o in session.subs.values()]))))

    def deleteSession(self, session):
        key = (session.hubName, session.clientId)
        self._add(("DELETE FROM mqtt_sessions WHERE hub=? AND client_id=?", key))
        self._add(("DELETE FROM mqtt_messages WHERE hub=? AND client_id=?", key))

    def setRetained(self, hub, topic, message):
        if message is None:
            self._add(("DELETE FROM mqtt_retained WHERE hub=? AND topic=?", (hub, topic)))
        else:
            self._add(("INSERT OR REPLACE INTO mqtt_retained VALUES (?,?,?,?,?,?)",
                       (hub, topic, message.data, message.qos, dumpProps(message.properties),
                        message.expiresAt)))

    # -- start-up ---------------------------------------------------------------

    def load(self):
        """
        Read everything back (at start-up, before any listener accepts):
        C{(sessions, messages, retained)} as lists of row tuples, messages
        in queue order.
        """
        runner = self.runner
        runner.start()
        if runner.path == ":memory:":
            return [], [], []
        connection = sqlite3.connect(runner.path)
        try:
            sessions = connection.execute(
                "SELECT hub, client_id, user_id, version, expiry, disconnected_at, "
                "subscriptions FROM mqtt_sessions").fetchall()
            messages = connection.execute(
                "SELECT seq, hub, client_id, topic, payload, qos, retain, props, expires_at, "
                "sub_ids, pid, state FROM mqtt_messages ORDER BY seq").fetchall()
            retained = connection.execute(
                "SELECT hub, topic, payload, qos, props, expires_at FROM mqtt_retained"
            ).fetchall()
        finally:
            connection.close()
        if messages:
            self._seq = max(m[0] for m in messages)
        return sessions, messages, retained


def _apply(cursor, ops):
    for sql, args in ops:
        cursor.execute(sql, args)
