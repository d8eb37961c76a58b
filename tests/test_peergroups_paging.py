"""
Answers of any size over real WebSocket and TCP connections: paged
enumRecords/searchRecords/enumGroups, the chunked export and import, the
error for an answer that cannot be sent, cursor misuse, and re-issuing
credentials from an enumMembers entry (docs/peergroups-protocol.md,
"Answers of any size").
"""

import json
import os
import shutil
import time

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from broker.peergroups import constants as C
from broker.peergroups import credentials as cred
from broker.peergroups.client import PeerError
from broker.peergroups.identities import IdentityStore
from broker.peergroups.paging import ExportStream
from tests.pgharness import PeerBroker
from tests.test_peergroups import T1, T2, Base, _transports

SMALL = 8192


def _attrs(n):
    return f'<attributes><attribute name="n" type="int">{n}</attribute></attributes>'


class Paging(Base):
    """
    With max_message_size 8 KiB: hundreds of records, each up to 6,000 bytes
    (an addRecord of that size fits in a message, its answer does not).
    """

    toml = f"max_message_size = {SMALL}\nmax_record_size = 6000\n"

    @defer.inlineCallbacks
    def fill(self, m, n, size=1500):
        ids = yield defer.gatherResults([
            m.client.addRecord(m.handle, T1 if i % 2 else T2, os.urandom(size),
                               attributes=_attrs(i)) for i in range(n)])
        return ids

    @defer.inlineCallbacks
    def test_enumRecordsPaged(self):
        """
        An enumeration many times the frame limit comes back whole, in
        modification order, through the cursor the client follows; each
        page fits in one message.
        """
        admin = yield self.group()
        ids = yield self.fill(admin, 200)
        records = yield admin.client.enumRecords(admin.handle)
        self.assertEqual([r["id"] for r in records], ids)
        typed = yield admin.client.enumRecords(admin.handle, T1)
        self.assertEqual([r["id"] for r in typed], ids[1::2])
        found = yield admin.client.searchRecords(
            admin.handle, '<peersearch><clause attrib="n" type="int" compare="less">50'
                          '</clause></peersearch>')
        self.assertEqual([r["id"] for r in found], ids[:50])
        first = yield admin.call("enumRecords")
        self.assertEqual(first["total"], 200)
        self.assertLess(len(json.dumps(first)), SMALL)
        self.assertTrue(first["cursor"])
        few = yield admin.call("enumRecords", count=3)
        self.assertEqual([r["id"] for r in few["records"]], ids[:3])
        yield admin.client.endEnumeration(first["cursor"])
        yield admin.client.endEnumeration(few["cursor"])

    @defer.inlineCallbacks
    def test_pagesSnapshot(self):
        """
        The set is fixed by the first call: a record added later is not
        listed, a deleted one is skipped, an updated one comes in its new
        version; none twice.
        """
        admin = yield self.group()
        ids = yield self.fill(admin, 40)
        first = yield admin.call("enumRecords", count=10)
        yield admin.client.deleteRecord(admin.handle, ids[20])
        old = yield admin.client.getRecord(admin.handle, ids[30])
        yield admin.client.updateRecord(admin.handle, dict(old, data=cred.b64(b"new")))
        yield admin.client.addRecord(admin.handle, T1, b"late")
        seen = [r["id"] for r in first["records"]]
        result = first
        versions = {}
        while result.get("cursor"):
            result = yield admin.call("enumRecords", cursor=result["cursor"], count=10)
            seen += [r["id"] for r in result["records"]]
            versions.update((r["id"], r["version"]) for r in result["records"])
        self.assertEqual(seen, ids[:20] + ids[21:])
        self.assertEqual(versions[ids[30]], 2)

    @defer.inlineCallbacks
    def test_cursorMisuse(self):
        """
        A made-up cursor, another session's, one used with another handle or
        method, one released, one expired: all E_HANDLE.  Too many open is
        E_OUTOFMEMORY.
        """
        admin = yield self.group()
        bob = yield self.invite(admin, "bob")
        yield self.fill(admin, 30)
        page = yield admin.call("enumRecords", count=2)
        cursor = page["cursor"]
        yield self.failsWith(admin.call("enumRecords", cursor="c" + "x" * 24), "E_HANDLE")
        yield self.failsWith(bob.call("enumRecords", cursor=cursor), "E_HANDLE")
        yield self.failsWith(admin.call("searchRecords", cursor=cursor), "E_HANDLE")
        yield self.failsWith(admin.call("exportDatabase", cursor=cursor), "E_HANDLE")
        second = yield admin.client.open(admin.client.groupPeerName(admin.handle))
        yield self.failsWith(admin.client.call("enumRecords", handle=second, cursor=cursor),
                             "E_HANDLE")
        yield self.failsWith(admin.call("enumRecords", cursor=12), "E_HANDLE")
        yield admin.client.endEnumeration(cursor)
        yield self.failsWith(admin.call("enumRecords", cursor=cursor), "E_HANDLE")
        yield self.failsWith(admin.client.endEnumeration(cursor), "E_HANDLE")
        # A cursor's handle closed: it goes with it.
        other = yield admin.client.call("enumRecords", handle=second, count=1)
        yield admin.client.close(second)
        self.assertEqual(len(self.sessionOf(admin).cursors), 0)
        self.assertTrue(other["cursor"])
        opened = []
        for _ in range(16):
            opened.append((yield admin.call("enumRecords", count=1))["cursor"])
        yield self.failsWith(admin.call("enumRecords", count=1), "E_OUTOFMEMORY")
        yield self.failsWith(admin.call("enumRecords", count=0), "E_INVALIDARG")
        # Idle past cursor_timeout: expired.
        session = self.sessionOf(admin)
        clock = session.cursors._clock
        session.cursors._clock = lambda: clock() + 61
        try:
            yield self.failsWith(admin.call("enumRecords", cursor=opened[0]), "E_HANDLE")
        finally:
            session.cursors._clock = clock
        page = yield admin.call("enumRecords", count=1)
        self.assertTrue(page["cursor"])

    def sessionOf(self, m):
        return next(s for s in self.broker.pg.sessions
                    if s.identity and s.identity["peerName"] == m.name)

    @defer.inlineCallbacks
    def test_tooLargeAnswer(self):
        """
        A record too large for one message: getRecord and enumRecords fail
        with E_MESSAGE_TOO_LARGE naming the limit (never silence), the
        session goes on, and the listing's cursor is released.
        """
        admin = yield self.group()
        yield self.fill(admin, 3)
        big = yield admin.client.addRecord(admin.handle, T1, os.urandom(5960))
        yield admin.client.addRecord(admin.handle, T1, b"after")
        e = yield self.failsWith(admin.client.getRecord(admin.handle, big),
                                 "E_MESSAGE_TOO_LARGE")
        self.assertIn(str(SMALL), e.message)
        e = yield self.failsWith(admin.client.enumRecords(admin.handle), "E_MESSAGE_TOO_LARGE")
        self.assertIn(big, e.message)
        self.assertEqual(len(self.sessionOf(admin).cursors), 0)
        self.assertEqual(dict(self.broker.pg.counters.oversized), {"answer": 1})
        self.assertEqual(len((yield admin.client.enumRecords(admin.handle, T2))), 2)

    @defer.inlineCallbacks
    def test_exportChunked(self):
        """
        An export many times the frame limit arrives in parts whose
        concatenation is the sealed database with every record; it is
        identical to the one-piece text the stream would make at once.
        """
        admin = yield self.group()
        ids = yield self.fill(admin, 60, size=3000)
        first = yield admin.call("exportDatabase")
        self.assertTrue(first["cursor"])
        self.assertLessEqual(len(json.dumps(first)), SMALL)
        yield admin.client.endEnumeration(first["cursor"])
        database = yield admin.client.exportDatabase(admin.handle)
        self.assertGreater(len(database), 20 * SMALL)
        outer = json.loads(database)["PEERGROUPDATABASE"]
        payload = cred.unb64(outer["payload"])
        self.assertEqual(cred.unb64(outer["seal"]),
                         self.sessionOf(admin)._seal(payload))
        db = json.loads(payload)
        self.assertEqual([r["id"] for r in db["records"]], ids)
        records = yield admin.client.enumRecords(admin.handle)
        self.assertEqual(db["records"], records)

    @defer.inlineCallbacks
    def test_importChunkedLimits(self):
        """
        Chunked import: over max_import_size is E_OUTOFMEMORY naming it;
        a second upload in a session is refused; an altered database
        applies nothing; the group must not be connected.
        """
        admin = yield self.group()
        yield self.fill(admin, 20, size=3000)
        database = yield admin.client.exportDatabase(admin.handle)
        yield self.failsWith(admin.client.importDatabase(admin.handle, database),
                             "PEER_E_GROUP_IN_USE")
        gpn = admin.client.groupPeerName(admin.handle)
        yield admin.client.close(admin.handle)
        admin.handle = yield admin.client.open(gpn)
        pg = self.broker.pg
        pg.maxImportSize = len(database) - 1
        e = yield self.failsWith(admin.client.importDatabase(admin.handle, database),
                                 "E_OUTOFMEMORY")
        self.assertIn("max_import_size", e.message)
        pg.maxImportSize = 64 * 1024 * 1024
        open_ = yield admin.call("importDatabase", database=database[:100], more=True)
        yield self.failsWith(admin.call("importDatabase", database="x", more=True),
                             "E_OUTOFMEMORY")
        yield admin.client.endEnumeration(open_["cursor"])
        altered = database[:5000] + ("A" if database[5000] != "A" else "B") + database[5001:]
        yield self.failsWith(admin.client.importDatabase(admin.handle, altered), "E_INVALIDARG")
        result = yield admin.client.importDatabase(admin.handle, database)
        self.assertEqual(result["imported"], 0)


PagingWS, PagingTCP = _transports(Paging)


class Groups(Base):
    """
    enumGroups and credentials re-issued from an enumMembers entry.
    """

    @defer.inlineCallbacks
    def test_enumGroupsAfterReconnect(self):
        """
        A returning identity lists the groups it may open, with its roles,
        after reconnecting; groups it left or never joined are not listed.
        """
        admin = yield self.group()
        gpn = admin.client.groupPeerName(admin.handle)
        bob = yield self.invite(admin, "bob")
        other = yield self.peer("carol")
        other.handle = yield other.client.create(friendlyName="Other")
        mine = yield admin.client.create(friendlyName="Second")
        gpn2 = admin.client.groupPeerName(mine)
        yield bob.client.disconnect()
        bob2 = yield self.peer("bob", identity=bob.identity)
        groups = yield bob2.client.enumGroups()
        self.assertEqual([(g["groupPeerName"], g["friendlyName"], g["roles"], g["status"])
                          for g in groups], [(gpn, "Team", [C.ROLE_MEMBER], 0)])
        handle = yield bob2.client.open(groups[0]["groupPeerName"])
        self.assertTrue(handle)
        listed = yield admin.client.enumGroups()
        self.assertEqual(sorted(g["groupPeerName"] for g in listed), sorted([gpn, gpn2]))
        self.assertEqual({g["groupPeerName"]: g["status"] for g in listed}[gpn], 3)
        yield admin.client.delete(gpn2)
        listed = yield admin.client.enumGroups()
        self.assertEqual([g["groupPeerName"] for g in listed], [gpn])

    @defer.inlineCallbacks
    def test_issueFromMemberEntry(self):
        """
        The admin re-issues Bob's credentials (inviting member) from his
        enumMembers entry; Bob has the new role at his next connect.
        """
        admin = yield self.group()
        bob = yield self.invite(admin, "bob")
        members = yield admin.client.enumMembers(admin.handle)
        entry = next(m for m in members if m["identity"] == bob.name)
        yield admin.client.issueCredentials(admin.handle, entry,
                                            roles=(C.ROLE_INVITING_MEMBER,),
                                            flags=C.STORE_CREDENTIALS)
        groups = yield bob.client.enumGroups()
        self.assertEqual(groups[0]["pendingRoles"], [C.ROLE_INVITING_MEMBER])
        gpn = admin.client.groupPeerName(admin.handle)
        yield bob.client.close(bob.handle)
        bob.handle = yield bob.client.open(gpn)
        yield self.register(bob)
        yield self.online(bob)
        creds = yield bob.client.call("getCredentials", handle=bob.handle)
        self.assertEqual(creds["credentialInfo"]["roles"], [C.ROLE_INVITING_MEMBER])
        forged = dict(entry["credentialInfo"], peerName="00" * 20 + ".bob")
        yield self.failsWith(admin.client.issueCredentials(admin.handle, forged),
                             "PEER_E_INVALID_CREDENTIAL_INFO")


GroupsWS, GroupsTCP = _transports(Groups)


class ExportImportAcrossBrokers(TestCase):
    """
    A database several times max_message_size exported from one broker and
    imported (uploaded in parts) into a broker started from an older copy
    of its state: the records come back, identical.
    """

    @defer.inlineCallbacks
    def roundTrip(self, transport):
        toml = f"max_message_size = {SMALL}\nmax_record_size = 5000\n"
        state = self.mktemp()
        first = yield PeerBroker(self, reactor, toml=toml, stateDir=state).start()
        base = Base()
        base.broker, base.transport, base.fail = first, transport, self.fail
        base.assertEqual = self.assertEqual
        admin = yield base.group()
        gpn = admin.client.groupPeerName(admin.handle)
        yield first.pg.whenWritten()
        snapshot = self.mktemp()
        shutil.copytree(state, snapshot)
        yield defer.gatherResults([admin.client.addRecord(admin.handle, T1, os.urandom(3000))
                                   for _ in range(40)])
        before = yield admin.client.enumRecords(admin.handle)
        exported = yield admin.client.exportDatabase(admin.handle)
        self.assertGreater(len(exported), 10 * SMALL)
        yield first.stop()
        second = yield PeerBroker(self, reactor, toml=toml, stateDir=snapshot).start()
        base.broker = second
        admin2 = yield base.peer("admin", identity=admin.identity)
        admin2.handle = yield admin2.client.open(gpn)
        result = yield admin2.client.importDatabase(admin2.handle, exported)
        self.assertEqual(result["imported"], 40)
        yield base.register(admin2)
        yield base.online(admin2)
        after = yield admin2.client.enumRecords(admin2.handle)
        self.assertEqual(after, before)

    def test_ws(self):
        return self.roundTrip("ws")

    def test_tcp(self):
        return self.roundTrip("tcp")


class PacedImport(TestCase):
    """
    An upload larger than the session's inbound byte burst is paced by the
    client under the rate announced in hello, so no part is dropped.
    """

    @defer.inlineCallbacks
    def test_paced(self):
        toml = (f"max_message_size = {SMALL}\nmax_inbound_bytes_per_second = 40000\n"
                "inbound_burst = 0.5\n")
        broker = yield PeerBroker(self, reactor, toml=toml).start()
        base = Base()
        base.broker, base.transport, base.fail = broker, "ws", self.fail
        base.assertEqual = self.assertEqual
        admin = yield base.peer("admin")
        admin.handle = yield admin.client.create(friendlyName="Team")
        self.assertEqual(admin.client.limits["inboundBytesPerSecond"], 40000)
        start = time.monotonic()
        # An altered database of 60 KB: every part reaches the broker, which
        # refuses the whole at the end (nothing was dropped on the way).
        text = json.dumps({"PEERGROUPDATABASE": {"payload": "A" * 60000, "seal": "AAAA"}})
        try:
            yield admin.client.importDatabase(admin.handle, text)
        except PeerError as e:
            self.assertEqual(e.name, "E_INVALIDARG")
        else:
            self.fail("an unsealed database was imported")
        self.assertGreater(time.monotonic() - start, 0.8)


class ExportStreamTests(TestCase):
    """
    The export stream alone: its text is the one-piece export's.
    """

    def test_sameText(self):
        key = b"k" * 32
        header = {"version": 1, "application": "a", "groupPeerName": "g", "identity": "i",
                  "exported": 5}
        records = {str(i): {"id": str(i), "data": cred.b64(os.urandom(i * 7))}
                   for i in range(50)}
        whole = ExportStream(key, header, list(records), records.get).nextPart(10 ** 9)
        for size in (1, 7, 100, 4096):
            stream = ExportStream(key, header, list(records), records.get)
            parts = []
            while not stream.done:
                part = stream.nextPart(size)
                self.assertLessEqual(len(part), size)
                parts.append(part)
            self.assertEqual("".join(parts), whole)
        import hashlib
        import hmac
        payload = cred.canonical(dict(header, records=list(records.values())))
        self.assertEqual(whole, json.dumps({"PEERGROUPDATABASE": {
            "payload": cred.b64(payload),
            "seal": cred.b64(hmac.new(key, payload, hashlib.sha256).digest())}}))


class IdentityStoreTests(TestCase):
    """
    The Python client's identity store (PeerIdentityCreate,
    PeerEnumIdentities, PeerIdentityGetXML, PeerIdentityDelete).
    """

    def test_store(self):
        path = self.mktemp()
        store = IdentityStore(path)
        alice = store.create("Alice", "alice")
        bob = store.create("Bob")
        again = IdentityStore(path)
        self.assertEqual(sorted(again.enumIdentities(), key=lambda e: e["friendlyName"]),
                         [{"peerName": alice.peerName, "friendlyName": "Alice"},
                          {"peerName": bob.peerName, "friendlyName": "Bob"}])
        loaded = again.get(alice.peerName)
        self.assertEqual((loaded.publicKey, loaded.classifier), (alice.publicKey, "alice"))
        self.assertEqual(cred.parseIdentityInfo(again.getXML(alice.peerName))["peerName"],
                         alice.peerName)
        self.assertEqual(os.stat(os.path.join(path, os.listdir(path)[0])).st_mode & 0o077, 0)
        again.delete(bob.peerName)
        self.assertEqual([e["peerName"] for e in again.enumIdentities()], [alice.peerName])
        self.assertRaises(KeyError, again.get, bob.peerName)
        self.assertRaises(KeyError, again.get, "../etc")


class Measure(TestCase):
    """
    How long the Python client takes to enumerate 10,000 records (default
    limits: 4 MiB messages), printed for the record.
    """

    @defer.inlineCallbacks
    def test_enum10000(self):
        broker = yield PeerBroker(self, reactor).start()
        base = Base()
        base.broker, base.transport, base.fail = broker, "ws", self.fail
        base.assertEqual = self.assertEqual
        admin = yield base.group()
        for start in range(0, 10000, 500):
            yield defer.gatherResults([
                admin.client.addRecord(admin.handle, T1, b"x" * 100, attributes=_attrs(i))
                for i in range(start, start + 500)])
        for transport in ("ws", "tcp"):
            client = admin.client
            if transport == "tcp":
                other = yield base.peer("admin", transport="tcp", identity=admin.identity)
                other.handle = yield other.client.open(
                    admin.client.groupPeerName(admin.handle))
                client = other.client
                handle = other.handle
            else:
                handle = admin.handle
            began = time.monotonic()
            records = yield client.enumRecords(handle)
            took = time.monotonic() - began
            self.assertEqual(len(records), 10000)
            print(f"\nenumRecords of 10,000 records ({transport}): {took * 1000:.0f} ms")
