# -*- test-case-name: tests.test_peergroups -*-
"""
The records part of a peer's session: add, update, delete and get a
record (listings and bulk transfers are in L{broker.peergroups.bulk}).
"""

from twisted.logger import Logger

from broker.cluster.redis import RedisOutcomeUnknown
from broker.core.errors import Unavailable
from broker.peergroups import constants as C
from broker.peergroups import records as rec
from broker.peergroups.errors import PeerError
from broker.peergroups.paging import budget, encodedSize
from broker.peergroups.params import STORE_DOWN, STORE_LOST, Reply, bytesParam, guidParam, param
from broker.peergroups.records import Record

log = Logger()

class RecordsAPI:
    """
    Mixed into L{broker.peergroups.session.PeerSession}, whose helpers
    (C{_ready}, C{_synced}, C{_persistThen}, C{_group}) it uses.
    """

    # -- records ----------------------------------------------------------------

    def _recordInput(self, params):
        r = param(params, "record", dict)
        attributes = r.get("attributes") or ""
        rec.parseAttributes(attributes)
        expiration = param(r, "expiration", int)
        data = bytesParam(r, "data")
        return r, attributes, expiration, data

    def _checkExpiration(self, node, expiration, now):
        leaf = node.chain[-1]
        if now >= leaf.notAfter:
            raise PeerError("PEER_E_INVALID_TIME_PERIOD", "the member's credentials have expired")
        if expiration <= now:
            raise PeerError("PEER_E_INVALID_RECORD_EXPIRATION", "the expiration is past")
        if expiration > leaf.notAfter:
            raise PeerError("PEER_E_INVALID_RECORD_EXPIRATION",
                            "the expiration is beyond the publisher's credentials")

    def _checkSize(self, data, attributes):
        if len(data) + 2 * len(attributes.encode("utf-8")) > self.pg.maxRecordSize:
            raise PeerError("PEER_E_MAX_RECORD_SIZE_EXCEEDED",
                            f"data + 2 x attributes over {self.pg.maxRecordSize} bytes")

    def _store(self, group, record, changeType, previous=None):
        """
        Commit C{record} (already in C{group}'s memory, replacing
        C{previous}); answer once it is durable.  If the store fails the
        change is undone in memory too (unless a later change built on it),
        so nobody sees a record the broker would forget at its restart.
        """
        # The other nodes of a cluster raise the event once they hold the
        # record: it rides with the change (never stored).
        changes = [("record", self.app.name, group.gpn, record),
                   ("seq", self.app.name, group.gpn, group.seq),
                   self.pg.recordEvent(group, changeType, record)]

        def failed(failure):
            if group.records.get(record.id) is record:
                if previous is None:
                    del group.records[record.id]
                else:
                    group.records[record.id] = previous
            if failure.check(RedisOutcomeUnknown):
                # Sent, then the connection dropped before the answer.
                raise PeerError("E_UNEXPECTED", STORE_LOST)
            if failure.check(Unavailable) or not self.pg.storeAvailable():
                # Redis went away under the write: refused, logged once by
                # the cluster link.
                raise PeerError("E_UNEXPECTED", STORE_DOWN)
            log.failure("peer groups: cannot store a record of {gpn}", failure, gpn=group.gpn)
            raise PeerError("E_UNEXPECTED", "the store could not save the change; "
                            "nothing changed")
        return self.pg.persist(changes).addCallbacks(
            lambda _: Reply({"id": record.id, "record": self._written(record)},
                            after=lambda: self.pg.recordChanged(group, changeType, record,
                                                                forward=False)),
            failed)

    def _written(self, record):
        """
        The record as an addRecord/updateRecord answer shows it: without
        its data (C{"dataOmitted": true}) when the whole would not fit in
        one message, so a durable write is never answered with an error.
        """
        out = record.toJSON()
        if encodedSize(out) > budget(self.maxMessageSize):
            del out["data"]
            out["dataOmitted"] = True
        return out

    def api_addRecord(self, params):
        handle, node = self._ready(params)
        r, attributes, expiration, data = self._recordInput(params)
        rtype = guidParam(r, "type")
        if rtype in C.RESERVED_RECORD_TYPES:
            raise PeerError("PEER_E_NOT_AUTHORIZED", "reserved record type")
        now = self.pg.now()
        self._checkExpiration(node, expiration, now)
        self._checkSize(data, attributes)
        group = node.group
        if len(group.records) >= self.pg.maxRecordsPerGroup:
            raise PeerError("E_OUTOFMEMORY", f"quota: the group holds "
                            f"{self.pg.maxRecordsPerGroup} records (tombstones included)")
        group.seq += 1
        record = Record(C.newGUID(), rtype, 1, 0, node.peerName, "", attributes, now, now,
                        expiration, data, group.seq, group.seq)
        group.records[record.id] = record
        extra = self.pg.publishMembership(node)
        if extra:
            self.pg.persistQuietly(extra, "a membership")
        return self._store(group, record, C.RECORD_ADDED)

    def _existing(self, node, rid):
        record = node.group.records.get(rid)
        if record is None or record.deleted or record.expiration <= self.pg.now():
            raise PeerError("PEER_E_RECORD_NOT_FOUND", "no such record")
        return record

    def _mayChange(self, node, record):
        if record.creatorId != node.peerName and node.role != C.ROLE_ADMIN:
            raise PeerError("PEER_E_NOT_AUTHORIZED",
                            "only the record's creator or an administrator")

    def api_updateRecord(self, params):
        handle, node = self._ready(params)
        r = param(params, "record", dict)
        old = self._existing(node, guidParam(r, "id"))
        if guidParam(r, "type") != old.type:
            raise PeerError("E_INVALIDARG", "a record's type cannot change")
        if r.get("flags", old.flags) != old.flags:
            raise PeerError("E_INVALIDARG", "a record's flags cannot be set")
        self._mayChange(node, old)
        attributes = r.get("attributes", old.attributes) or ""
        rec.parseAttributes(attributes)
        expiration = param(r, "expiration", int, required=False, default=old.expiration)
        data = bytesParam(r, "data") if "data" in r else old.data
        now = self.pg.now()
        if expiration < old.expiration:
            raise PeerError("PEER_E_INVALID_RECORD_EXPIRATION",
                            "keep the expiration the same or increase it")
        self._checkExpiration(node, expiration, now)
        self._checkSize(data, attributes)
        group = node.group
        group.seq += 1
        record = old.copy()
        record.version += 1
        record.modifiedById = node.peerName
        record.lastModified = max(now, old.lastModified + 10000)
        record.attributes, record.expiration, record.data = attributes, expiration, data
        record.seq = group.seq
        group.records[record.id] = record
        return self._store(group, record, C.RECORD_UPDATED, old)

    def api_deleteRecord(self, params):
        handle, node = self._ready(params)
        old = self._existing(node, guidParam(params, "id"))
        self._mayChange(node, old)
        group = node.group
        group.seq += 1
        tomb = old.copy()
        tomb.version += 1
        tomb.flags |= C.RECORD_FLAG_DELETED
        tomb.modifiedById = node.peerName
        tomb.lastModified = max(self.pg.now(), old.lastModified + 10000)
        tomb.attributes, tomb.data = "", b""
        tomb.seq = group.seq
        group.records[tomb.id] = tomb
        return self._store(group, tomb, C.RECORD_DELETED, old).addCallback(
            lambda reply: Reply({}, after=reply.after))

    def api_getRecord(self, params):
        handle, node = self._ready(params)
        return {"record": self._existing(node, guidParam(params, "id")).toJSON()}
