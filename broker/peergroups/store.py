# -*- test-case-name: tests.test_peergroups -*-
"""
The SQLite store of the peer-groups face: one database file in
C{broker.state_dir} shared by every application (hub), each row keyed by
its application so applications never see each other's data.

A batch of changes is one transaction on L{SQLiteRunner}'s thread, so an
accepted change (a record the peer was told is added) survives a crash.
"""

import json

from twisted.internet import defer
from twisted.python import failure
from zope.interface import implementer

from broker.peergroups.interfaces import IPeerGroupStore
from broker.peergroups.records import Record
from broker.store.sqlite import SQLiteRunner

SCHEMA = """
CREATE TABLE IF NOT EXISTS pg_groups (
    app TEXT NOT NULL, gpn TEXT NOT NULL,
    grc TEXT NOT NULL, properties TEXT NOT NULL, verifier TEXT,
    issuer TEXT, seq INTEGER NOT NULL,
    PRIMARY KEY (app, gpn));
CREATE TABLE IF NOT EXISTS pg_members (
    app TEXT NOT NULL, gpn TEXT NOT NULL, peer TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (app, gpn, peer));
CREATE TABLE IF NOT EXISTS pg_records (
    app TEXT NOT NULL, gpn TEXT NOT NULL, id TEXT NOT NULL,
    type TEXT NOT NULL, version INTEGER NOT NULL, flags INTEGER NOT NULL,
    creator TEXT NOT NULL, modifier TEXT NOT NULL, attributes TEXT NOT NULL,
    creation INTEGER NOT NULL, modified INTEGER NOT NULL, expiration INTEGER NOT NULL,
    data BLOB NOT NULL, seq INTEGER NOT NULL, created_seq INTEGER NOT NULL,
    PRIMARY KEY (app, gpn, id));
CREATE TABLE IF NOT EXISTS pg_serials (
    app TEXT NOT NULL, gpn TEXT NOT NULL, serial TEXT NOT NULL,
    PRIMARY KEY (app, gpn, serial));
"""


@implementer(IPeerGroupStore)
class SQLitePeerGroupStore(SQLiteRunner):
    """
    L{IPeerGroupStore} on one SQLite file (or C{":memory:"}).

    Changes are tuples:
      - C{("group", app, gpn, {"grc", "properties", "verifier", "issuer", "seq"})}
      - C{("seq", app, gpn, seq)}
      - C{("member", app, gpn, peerName, dict)} / C{("dropMember", app, gpn, peerName)}
      - C{("record", app, gpn, Record)} / C{("dropRecords", app, gpn, [ids])}
      - C{("serial", app, gpn, serial)}
    """

    def load(self):
        return self.runInteraction(self._load)

    @staticmethod
    def _load(cursor):
        out = {"groups": [], "members": [], "records": [], "serials": []}
        for app, gpn, grc, props, verifier, issuer, seq in cursor.execute(
                "SELECT app, gpn, grc, properties, verifier, issuer, seq FROM pg_groups"):
            out["groups"].append({
                "app": app, "gpn": gpn, "grc": json.loads(grc),
                "properties": json.loads(props),
                "verifier": json.loads(verifier) if verifier else None,
                "issuer": json.loads(issuer) if issuer else None, "seq": seq})
        for app, gpn, peer, data in cursor.execute(
                "SELECT app, gpn, peer, data FROM pg_members"):
            out["members"].append({"app": app, "gpn": gpn, "peer": peer,
                                   **json.loads(data)})
        for row in cursor.execute(
                "SELECT app, gpn, id, type, version, flags, creator, modifier, attributes,"
                " creation, modified, expiration, data, seq, created_seq FROM pg_records"
                " ORDER BY seq"):
            app, gpn = row[0], row[1]
            out["records"].append((app, gpn, Record(*row[2:12], bytes(row[12]), *row[13:])))
        for app, gpn, serial in cursor.execute("SELECT app, gpn, serial FROM pg_serials"):
            out["serials"].append((app, gpn, serial))
        return out

    def __init__(self, reactor, path, name="peergroups.store"):
        super().__init__(reactor, path, SCHEMA, name=name)
        self._pending = []
        self._writing = False
        self._idle = []

    def apply(self, changes):
        """
        Group commit: batches asked for while one is being written go
        together in the next transaction (one fsync for many accepted
        changes); each caller's Deferred fires once its batch is durable.
        """
        d = defer.Deferred()
        self._pending.append((list(changes), d))
        if not self._writing:
            self._write()
        return d

    def _write(self):
        batch, self._pending = self._pending, []
        self._writing = True
        changes = [c for part, _ in batch for c in part]
        w = defer.maybeDeferred(self.runInteraction, self._apply, changes)

        def done(result):
            for _, d in batch:
                if isinstance(result, failure.Failure):
                    d.errback(result)
                else:
                    d.callback(None)
            if self._pending:
                self._write()
            else:
                self._writing = False
                idle, self._idle = self._idle, []
                for i in idle:
                    i.callback(None)
        w.addBoth(done)

    def close(self):
        """
        Write what was accepted, then close.
        """
        if not self._writing:
            return super().close()
        d = defer.Deferred()
        self._idle.append(d)
        return d.addCallback(lambda _: super(SQLitePeerGroupStore, self).close())

    @staticmethod
    def _apply(cursor, changes):
        for change in changes:
            kind = change[0]
            if kind == "group":
                _, app, gpn, g = change
                cursor.execute(
                    "INSERT OR REPLACE INTO pg_groups VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (app, gpn, json.dumps(g["grc"]), json.dumps(g["properties"]),
                     json.dumps(g["verifier"]) if g["verifier"] else None,
                     json.dumps(g["issuer"]) if g["issuer"] else None, g["seq"]))
            elif kind == "seq":
                _, app, gpn, seq = change
                cursor.execute("UPDATE pg_groups SET seq = ? WHERE app = ? AND gpn = ?",
                               (seq, app, gpn))
            elif kind == "member":
                _, app, gpn, peer, data = change
                cursor.execute("INSERT OR REPLACE INTO pg_members VALUES (?, ?, ?, ?)",
                               (app, gpn, peer, json.dumps(data)))
            elif kind == "dropMember":
                _, app, gpn, peer = change
                cursor.execute("DELETE FROM pg_members WHERE app = ? AND gpn = ? AND peer = ?",
                               (app, gpn, peer))
            elif kind == "record":
                _, app, gpn, r = change
                cursor.execute(
                    "INSERT OR REPLACE INTO pg_records VALUES"
                    " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (app, gpn, r.id, r.type, r.version, r.flags, r.creatorId, r.modifiedById,
                     r.attributes, r.creation, r.lastModified, r.expiration, r.data,
                     r.seq, r.createdSeq))
            elif kind == "dropRecords":
                _, app, gpn, ids = change
                cursor.executemany(
                    "DELETE FROM pg_records WHERE app = ? AND gpn = ? AND id = ?",
                    [(app, gpn, i) for i in ids])
            elif kind == "serial":
                _, app, gpn, serial = change
                cursor.execute("INSERT OR IGNORE INTO pg_serials VALUES (?, ?, ?)",
                               (app, gpn, serial))
            else:
                raise ValueError(f"unknown store change {kind!r}")
