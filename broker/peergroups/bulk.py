# -*- test-case-name: tests.test_peergroups_paging -*-
"""
The session's calls whose answers may be of any size: paged C{enumRecords},
C{searchRecords} and C{enumGroups}, the chunked C{exportDatabase} and
C{importDatabase}, and C{endEnumeration} (docs/peergroups-protocol.md,
"Answers of any size").  A mixin of L{broker.peergroups.session.PeerSession},
kept apart as its own concern.
"""

import hashlib
import hmac

from broker.core import jsonstrict
from broker.peergroups import constants as C
from broker.peergroups import credentials as cred
from broker.peergroups import records as rec
from broker.peergroups.errors import PeerError
from broker.peergroups.paging import (MAX_COUNT, Cursor, ExportStream, Listing, Upload,
                                      budget, page)
from broker.peergroups.records import Record


def _count(params):
    count = params.get("count")
    if count is None:
        return None
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
        raise PeerError("E_INVALIDARG", f"count must be an integer from 1 to {MAX_COUNT}")
    return count


class LargeAnswers:
    """
    Mixed into L{PeerSession}: needs C{self.cursors} (a
    L{broker.peergroups.paging.Cursors}), C{self.maxMessageSize}, C{self.pg},
    C{self.app}, C{self.identity} and the session's helpers (C{_ready},
    C{_synced}, C{_handle}, C{_param}, C{_persistThen}).
    """

    # -- paged listings ---------------------------------------------------------

    def _paged(self, method, params, handleId, key, start):
        """
        One page of a listing: a new one made by C{start()} (a L{Listing})
        or the one C{params["cursor"]} continues.
        """
        count = _count(params)
        token = params.get("cursor")
        if token is None:
            cursor = Cursor(method, handleId, start())
            fresh = True
        else:
            cursor = self.cursors.get(token, method, handleId)
            fresh = False
        listing = cursor.state
        try:
            items, done = page(listing, self.maxMessageSize, count)
        except PeerError:
            self.cursors.release(cursor)
            raise
        result = {key: items, "total": len(listing.keys)}
        if done:
            self.cursors.release(cursor)
        elif fresh:
            result["cursor"] = self.cursors.open(cursor)
        else:
            result["cursor"] = cursor.token
        return result

    def _recordListing(self, group, records, matches=None):
        """
        A listing of C{records} by id in modification order, each rendered
        in its version when its page is built (skipped if gone or, with
        C{matches}, no longer matching).
        """
        def render(rid):
            r = group.records.get(rid)
            if r is None or r.deleted or r.expiration <= self.pg.now():
                return None
            if matches is not None and not matches(r):
                return None
            return r.toJSON()
        ids = [r.id for r in sorted(records, key=lambda r: r.seq)]
        return Listing("records", ids, render)

    def api_enumRecords(self, params):
        handle, node = self._ready(params)
        group = node.group

        def start():
            rtype = self._guid(params, "type", required=False)
            return self._recordListing(group, group.liveRecords(self.pg.now(), rtype))
        return self._paged("enumRecords", params, handle.id, "records", start)

    def api_searchRecords(self, params):
        handle, node = self._ready(params)
        group = node.group

        def start():
            query = rec.parseSearch(self._param(params, "criteria", str))
            found = rec.search(query, group.liveRecords(self.pg.now()))
            return self._recordListing(group, found,
                                       lambda r: bool(rec.search(query, [r])))
        return self._paged("searchRecords", params, handle.id, "records", start)

    def api_enumGroups(self, params):
        me = self.identity["peerName"]
        app = self.app

        def render(gpn):
            group = app.groups.get(gpn)
            member = group.members.get(me) if group is not None else None
            if member is None or not member.local:
                return None
            leaf, pending = member.leaf, member.pending
            node = app.nodes.get((gpn, me))
            return {"groupPeerName": gpn,
                    "friendlyName": group.properties.get("friendlyName", ""),
                    "classifier": group.properties.get("classifier", ""),
                    "creatorPeerName": group.creator,
                    "roles": list(leaf.roles) if leaf is not None else [],
                    "validityEnd": leaf.notAfter if leaf is not None else 0,
                    "pendingRoles": list(pending[-1].roles) if pending else None,
                    "status": node.status if node is not None else 0}

        def start():
            mine = sorted(gpn for gpn, g in app.groups.items()
                          if getattr(g.members.get(me), "local", False))
            return Listing("groups", mine, render)
        if params.get("cursor") is None and self.pg.link is not None \
                and not params.get("_merged"):
            # A cluster: memberships made on another node a moment ago.
            return self.pg.link.merge().addCallback(
                lambda _: self.api_enumGroups(dict(params, _merged=True)))
        return self._paged("enumGroups", params, None, "groups", start)

    def api_endEnumeration(self, params):
        cursor = self.cursors.get(params.get("cursor"), anyKind=True)
        self.cursors.release(cursor)
        return {}

    # -- export ------------------------------------------------------------------

    def _seal(self, payload):
        return hmac.new(self.pg.exportKey, payload, hashlib.sha256).digest()

    def api_exportDatabase(self, params):
        handle, node = self._synced(params)
        token = params.get("cursor")
        if token is not None:
            cursor = self.cursors.get(token, "exportDatabase", handle.id)
        else:
            group = node.group
            now = self.pg.now()
            header = {"version": 1, "application": self.app.name, "groupPeerName": group.gpn,
                      "identity": node.peerName, "exported": now}
            ids = [r.id for r in sorted(group.records.values(), key=lambda r: r.seq)
                   if r.expiration > now]

            def render(rid):
                r = group.records.get(rid)
                return r.toJSON() if r is not None and r.expiration > now else None
            cursor = Cursor("exportDatabase", handle.id,
                            ExportStream(self.pg.exportKey, header, ids, render))
        stream = cursor.state
        part = stream.nextPart(budget(self.maxMessageSize))
        if stream.done:
            self.cursors.release(cursor)
            return {"database": part}
        if token is None:
            self.cursors.open(cursor)
        return {"database": part, "cursor": cursor.token}

    # -- import ------------------------------------------------------------------

    def api_importDatabase(self, params):
        handle = self._handle(params)
        node = handle.node
        part = self._param(params, "database", str)
        more = params.get("more", False)
        if not isinstance(more, bool):
            raise PeerError("E_INVALIDARG", "more must be true or false")
        token = params.get("cursor")
        if token is None and not more:
            return self._importText(handle, node, part)
        if token is None:
            self._importable(node)
            if self.cursors.find(lambda c: c.method == "importDatabase") is not None:
                raise PeerError("E_OUTOFMEMORY", "an import upload is already in progress in "
                                "this session; finish it or end it with endEnumeration")
            cursor = Cursor("importDatabase", handle.id, Upload(self.pg.maxImportSize))
            cursor.state.add(part)
            self.cursors.open(cursor)
            return {"cursor": cursor.token, "received": cursor.state.received}
        cursor = self.cursors.get(token, "importDatabase", handle.id)
        try:
            cursor.state.add(part)
        except PeerError:
            self.cursors.release(cursor)
            raise
        if more:
            return {"cursor": cursor.token, "received": cursor.state.received}
        self.cursors.release(cursor)
        return self._importText(handle, node, cursor.state.text())

    def _importable(self, node):
        if node.online:
            raise PeerError("PEER_E_GROUP_IN_USE", "import before connecting")
        if node.member is None or not node.member.local:
            raise PeerError("PEER_E_INVALID_GROUP", "not a member")

    def _importText(self, handle, node, text):
        """
        Check the seal of a whole database and merge its records at once.
        """
        self._importable(node)
        try:
            outer = jsonstrict.loads(text)["PEERGROUPDATABASE"]
            payload = cred.unb64(outer["payload"])
            seal = cred.unb64(outer["seal"])
        except (ValueError, KeyError, TypeError):
            raise PeerError("E_INVALIDARG", "not an exported database")
        if not hmac.compare_digest(seal, self._seal(payload)):
            raise PeerError("E_INVALIDARG", "the database was altered or not exported here")
        db = jsonstrict.loads(payload)
        group = node.group
        if (db["application"], db["groupPeerName"], db["identity"]) != \
                (self.app.name, group.gpn, node.peerName):
            raise PeerError("E_INVALIDARG", "a database of another group or identity")
        now = self.pg.now()
        changes, events = [], []
        for obj in db["records"]:
            incoming = Record.fromJSON(obj)
            if incoming.expiration <= now:
                continue
            old = group.records.get(incoming.id)
            if old is not None and not rec.beats(incoming, old):
                continue
            group.seq += 1
            incoming.seq = group.seq
            incoming.createdSeq = old.createdSeq if old is not None else group.seq
            group.records[incoming.id] = incoming
            changes.append(("record", self.app.name, group.gpn, incoming))
            if incoming.deleted:
                if old is not None and not old.deleted:
                    events.append((C.RECORD_DELETED, incoming))
            else:
                live = old is not None and not old.deleted
                events.append((C.RECORD_UPDATED if live else C.RECORD_ADDED, incoming))
        changes.append(("seq", self.app.name, group.gpn, group.seq))

        def after():
            for kind, r in events:
                self.pg.recordChanged(group, kind, r)
        return self._persistThen(changes, self._reply({"imported": len(changes) - 1},
                                                      after=after))
