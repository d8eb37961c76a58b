# -*- test-case-name: tests.test_peergroups -*-
"""
The peer-groups core: the broker as rendezvous, authenticator, record
database and relay for every group of every application.

Where Windows floods records over a mesh, here the broker holds the one
copy of each group database (write-through to the store) and tells each
online node of every change, once per registration; a node that was
offline is told on its next connect of everything that changed since it
left (tombstones make deletes part of that).  Protocol adapters hand the
core an L{IPeerTransport} and feed it decoded JSON objects through a
L{broker.peergroups.session.PeerSession}; the core never sees a frame.
"""

import secrets

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from broker.core.drain import LiveConnections
from broker.core.limits import AdmissionLimits, LimitCounters, QuietLog
from broker.core.errors import Unavailable
from broker.peergroups import constants as C
from broker.peergroups.credentials import Certificate
from broker.peergroups.metrics import Counters
from broker.peergroups.model import Application, Group, Member

log = Logger()

HUB_PREFIX = "pg."


class PeerGroups(service.Service):
    """
    @param reactor: for network-facing work.
    @param store: an L{IPeerGroupStore}.
    @param core: the routing core (L{broker.core.router.Core}); each
        application is its hub C{pg.<application>} and each authenticated
        session one of its connections.  May be C{None} in unit tests.
    @param clock: the time source and timer (C{IReactorTime}); the reactor
        unless a test injects a L{twisted.internet.task.Clock}.
    @param issuerKey: the broker's Ed25519 private key that signs password
        joiners' certificates (under a GMC the group creator issues it).
    @param exportKey: the HMAC key sealing exported databases.
    """

    name = "peergroups"

    def __init__(self, reactor, store, core=None, clock=None, issuerKey=None,
                 exportKey=b"", maxRecordSize=1024 * 1024, maxDataSize=1024 * 1024,
                 keepaliveInterval=30.0, keepaliveTimeout=90.0, sweepInterval=5.0,
                 maxOutputBuffer=4 * 1024 * 1024, passwordFailuresPerMinute=20,
                 applications=(), creators=(), maxGroupsPerCreator=100,
                 maxRecordsPerGroup=100000, maxMessageSize=4 * 1024 * 1024,
                 maxImportSize=64 * 1024 * 1024, maxCursorsPerSession=16,
                 cursorTimeout=60.0):
        self.reactor = reactor
        self.store = store
        self.core = core
        self.clock = clock if clock is not None else reactor
        self.issuerKey = issuerKey
        self.exportKey = exportKey
        self.maxRecordSize = maxRecordSize
        self.maxDataSize = maxDataSize
        self.keepaliveInterval = keepaliveInterval
        self.keepaliveTimeout = keepaliveTimeout
        self.sweepInterval = sweepInterval
        self.maxOutputBuffer = maxOutputBuffer
        self.passwordFailuresPerMinute = passwordFailuresPerMinute
        self.applications = frozenset(applications)
        self.creators = frozenset(creators)
        self.maxGroupsPerCreator = maxGroupsPerCreator
        self.maxRecordsPerGroup = maxRecordsPerGroup
        self.maxMessageSize = maxMessageSize
        self.maxImportSize = maxImportSize
        self.maxCursorsPerSession = maxCursorsPerSession
        self.cursorTimeout = cursorTimeout
        self.counters = Counters()
        # Admission limits (PER_ADDRESS on the transports; PER_HUB, an
        # application, and PER_USER, an identity, at registerIdentity) and
        # the inbound rate of a session: none unless the face sets them.
        self.admission = AdmissionLimits({})
        self.inboundRate = (0, 0, 2.0)
        self.limits = core.limits if core is not None else LimitCounters()
        self.quietLog = core.quietLog if core is not None else QuietLog(self.clock.seconds)
        self.apps = {}
        self.sessions = set()
        # Every connection of both transports, sessions or not (the drain).
        self.connections = LiveConnections()
        self.directs = {}
        self.loaded = False
        self._waiting = []
        self._inflight = set()
        self._sweeper = None
        self._reloading = False
        # The cluster link (L{broker.peergroups.cluster.PeerGroupsCluster})
        # when this broker is one node of several, else None.
        self.link = None

    # -- service ----------------------------------------------------------

    def startService(self):
        super().startService()
        if self.link is not None and not self.storeAvailable():
            # The cluster's Redis client is still connecting: the link
            # loads once it is up (its resync hook).
            pass
        else:
            d = self.loadState()
            d.addCallback(self._loaded)
            d.addErrback(self._loadFailed)
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(self.sweepInterval, now=False).addErrback(
            lambda f: log.failure("peer-groups sweeper stopped", f))

    def loadState(self):
        """
        The store's contents (and, in a cluster, who is online through the
        other nodes).
        """
        if self.link is not None:
            return self.link.load()
        return self.store.load()

    def _loaded(self, data):
        for row in data["groups"]:
            app = self.application(row["app"])
            app.groups[row["gpn"]] = Group.fromStore(row)
        for row in data["members"]:
            group = self.apps[row["app"]].groups.get(row["gpn"])
            if group is not None:
                group.members[row["peer"]] = Member.fromStore(row)
        for app, gpn, record in data["records"]:
            group = self.apps[app].groups.get(gpn)
            if group is not None:
                group.records[record.id] = record
        for app, gpn, serial in data["serials"]:
            group = self.apps[app].groups.get(gpn)
            if group is not None:
                group.serials.add(serial)
        if self.link is not None:
            self.link.loadedPresence(data.get("presence", ()))
        self.loaded = True
        log.info("peer groups: {groups} groups in {apps} applications loaded",
                 groups=sum(len(a.groups) for a in self.apps.values()), apps=len(self.apps))
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def _loadFailed(self, failure):
        if self.link is not None:
            # The shared store (Redis) is not reachable yet: requests wait
            # for it, and the load is retried until it answers.
            self.link.loadFailed(failure)
            return
        log.failure("peer groups: cannot load the store", failure)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)

    def retryLoad(self):
        if self.loaded or not self.running:
            return
        d = self.loadState()
        d.addCallback(self._loaded)
        d.addErrback(self._loadFailed)

    def whenLoaded(self):
        if self.loaded:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def stopService(self):
        super().stopService()
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        if self.link is not None:
            self.link.stop()
        self._closeSessions()
        return defer.DeferredList(list(self._inflight))

    def _closeSessions(self):
        for session in list(self.sessions):
            session.transport.abort("broker shutting down")
            session.lost("broker shutting down")

    def drain(self):
        """
        The broker is stopping: every session is closed with "broker
        shutting down" (1001 over WebSocket, a clean close over TCP), a
        handshake in progress is cut; a Deferred fires once every
        connection has gone.
        """
        self._closeSessions()
        for protocol in self.connections:
            if protocol.session is None and protocol.transport is not None:
                protocol.transport.loseConnection()
        return self.connections.whenEmpty()

    # -- helpers ------------------------------------------------------------

    def now(self):
        """
        Peer time: the broker's clock as a FILETIME.
        """
        ft = C.filetimeFromUnix(self.clock.seconds())
        # Millisecond resolution: multiples of 10,000 ticks stay exact as
        # JSON numbers in JavaScript peers (doubles) until 2057.
        return ft - ft % 10000

    def application(self, name):
        app = self.apps.get(name)
        if app is None:
            hub = self.core.hub(HUB_PREFIX + name) if self.core is not None else None
            if hub is not None:
                # Its label on /metrics and in the admin console.
                hub.face = "peergroups"
            app = self.apps[name] = Application(name, hub)
        return app

    def persist(self, changes, replicate=True):
        """
        Write C{changes} atomically.  The Deferred fails if the store does;
        callers answer the peer only after it fires.  In a cluster, once
        they are stored the other nodes are told of them (C{replicate}), so
        they hold the same model.  C{("event", app, gpn, eventType,
        payload[, typeFilter])} entries are not stored: the other nodes
        raise them after applying the rest.
        """
        events = [c for c in changes if c[0] == "event"]
        if events:
            changes = [c for c in changes if c[0] != "event"]
        d = self.store.apply(changes)
        self._inflight.add(d)

        def done(result):
            self._inflight.discard(d)
            return result
        d.addBoth(done)
        if self.link is not None and replicate:
            d.addCallback(lambda result: (self.link.replicate(changes, events), result)[1])
        return d

    def storeAvailable(self):
        """
        Whether the store can take a change now (always, for the SQLite
        store; while Redis is connected, for a cluster's).
        """
        return getattr(self.store, "available", True)

    def whenWritten(self):
        """
        A Deferred firing once every write started so far is committed (or
        has failed), the quiet ones included: sync points and
        memberships are written after the answer that caused them.
        """
        return defer.DeferredList(list(self._inflight), consumeErrors=True)

    def storeFailed(self, failure, what):
        """
        A change other than a record write (those undo themselves) could
        not be stored, so memory holds what the store does not.  Rather than
        undo each kind of change, start again from the store, as a restart
        would: once the current answer is out every session is closed (the
        peers reconnect and reopen their groups) and the state is reloaded.
        """
        if self._reloading:
            return  # logged once, for the failure that started the reload
        if failure.check(Unavailable):
            # The cluster's Redis went away under the change: an outage,
            # not a bug (no traceback); the reload waits for Redis.
            log.warn("peer groups: cannot store {what}: {why}; closing every session and "
                     "reloading the store once Redis is back", what=what,
                     why=failure.getErrorMessage())
        else:
            log.failure("peer groups: cannot store {what}; closing every session and "
                        "reloading the store", failure, what=what)
        self._reloading = True
        self.clock.callLater(0, self._reload)

    def _reload(self):
        for session in list(self.sessions):
            self.counters.dropped["store_failure"] += 1
            session.transport.abort("store failure")
            session.lost("store failure")
        self.apps, self.directs, self.loaded = {}, {}, False
        if self.link is not None:
            self.link.reset()
        d = self.whenWritten()
        d.addCallback(lambda _: self.loadState())
        d.addCallback(self._loaded)
        d.addErrback(self._loadFailed)
        d.addBoth(self._reloaded)

    def _reloaded(self, _):
        self._reloading = False

    def persistQuietly(self, changes, what, replicate=True):
        if self._reloading:
            # Sessions closing for a reload: their state is being dropped.
            return
        self.persist(changes, replicate).addErrback(self._quietFailure, what)

    def _quietFailure(self, failure, what):
        if not self.running and self.link is not None:
            # Shutting down: the Redis client stops with this service; a
            # sync point lost here means at-least-once at the next connect.
            return
        if failure.check(Unavailable) or not self.storeAvailable():
            # The cluster's Redis is down (logged once by the link): a
            # sync point or membership is written again at the next change.
            log.warn("peer groups: cannot store {what}: {why}", what=what,
                     why=failure.getErrorMessage())
            return
        log.failure("peer groups: cannot store {what}", failure, what=what)

    def newConnectionId(self):
        while True:
            cid = secrets.randbits(64)
            if cid and cid not in self.directs:
                return cid

    # -- events -----------------------------------------------------------

    def emit(self, node, eventType, payload, filterType=None):
        """
        Deliver one event to each of C{node}'s registrations for
        C{eventType} (with a matching type filter), once each.
        """
        for handle in list(node.handles):
            for regId, entries in list(handle.registrations.items()):
                for t, f in entries:
                    if t == eventType and (f is None or f == filterType):
                        handle.session.sendEvent(regId, handle.id, eventType, payload)
                        self.counters.events[eventType] += 1
                        break

    def broadcast(self, group, eventType, payload, filterType=None, exclude=None,
                  forward=True):
        """
        Raise an event to every node of C{group} online here and, in a
        cluster (unless C{forward} is false: an event each node raises on
        its own), to those online through the other nodes.
        """
        for node in Application.onlineNodes(group):
            if node is not exclude:
                self.emit(node, eventType, payload, filterType)
        if forward and self.link is not None:
            self.link.forwardEvent(group, eventType, payload, filterType)

    def memberChanged(self, group, peerName, changeType, exclude=None, forward=True):
        self.broadcast(group, C.EVENT_MEMBER_CHANGED,
                       {"memberChangeData": {"changeType": changeType, "identity": peerName}},
                       exclude=exclude, forward=forward)

    @staticmethod
    def _recordPayload(changeType, record):
        return {"recordChangeData": {"changeType": changeType, "recordId": record.id,
                                     "recordType": record.type}}

    def recordEvent(self, group, changeType, record):
        """
        C{RECORD_CHANGED} as an C{("event", ...)} entry of a change list: a
        cluster's other nodes raise it after applying the change.
        """
        return ("event", group.app, group.gpn, C.EVENT_RECORD_CHANGED,
                self._recordPayload(changeType, record), record.type)

    def recordChanged(self, group, changeType, record, node=None, forward=True):
        payload = self._recordPayload(changeType, record)
        if node is not None:
            self.emit(node, C.EVENT_RECORD_CHANGED, payload, record.type)
        else:
            self.broadcast(group, C.EVENT_RECORD_CHANGED, payload, record.type,
                           forward=forward)

    @staticmethod
    def present(group, peerName):
        """
        The online node (here) or remote peer (another node of the
        cluster) of C{peerName} in C{group}, or C{None}.
        """
        return group.online.get(peerName) or group.remote.get(peerName)

    @staticmethod
    def anyoneOnline(group):
        return bool(group.online or group.remote)

    def statusChanged(self, node):
        self.emit(node, C.EVENT_STATUS_CHANGED, {"status": node.status})

    # -- node life ----------------------------------------------------------

    def publishMembership(self, node):
        """
        Publish C{node}'s membership if it has not been: everyone online
        (the node included) sees C{MEMBER_CHANGED/JOINED} once.

        @return: the store changes to make.
        """
        member = node.member
        if member is None or member.published:
            return []
        member.published = True
        self.memberChanged(node.group, node.peerName, C.MEMBER_JOINED, forward=False)
        # The other nodes of a cluster raise it once they hold the member:
        # an ("event", ...) rides with the changes and is not stored.
        return [("member", node.app.name, node.group.gpn, member.peerName, member.toStore()),
                ("event", node.app.name, node.group.gpn, C.EVENT_MEMBER_CHANGED,
                 {"memberChangeData": {"changeType": C.MEMBER_JOINED,
                                       "identity": node.peerName}})]

    def goOnline(self, node, chain):
        """
        Bring C{node} online with credentials C{chain}: presence, membership,
        the catch-up of record changes since it was last online, status.
        Called once the store holds the member's new state.
        """
        group = node.group
        member = node.member
        if node.online or not node.handles or member is None:
            # Another session of the identity connected it meanwhile, or
            # every handle closed before the answer went out.
            return
        node.online = True
        node.chain = chain
        node.nodeId = secrets.randbits(64) or 1
        group.online[node.peerName] = node
        lastSeq = member.lastSeq if member.synced else 0
        published = []
        if not (group.flags & C.MEMBER_DATA_OPTIONAL):
            published = self.publishMembership(node)
            self.persistQuietly(published, "a membership")
        if self.link is not None:
            # The other nodes raise CONNECTED from the presence they get,
            # after the JOINED that rides with the membership.
            self.link.online(node, after=self.whenWritten() if published else None)
        self.memberChanged(group, node.peerName, C.MEMBER_CONNECTED, forward=False)
        self.catchUp(node, lastSeq)
        member.synced = True
        member.lastSeq = group.seq
        self.persistQuietly([("member", node.app.name, group.gpn, member.peerName,
                              member.toStore())], "a member's sync point")
        self.statusChanged(node)
        if group.flags & C.DEFER_EXPIRATION:
            self.expire(group)

    def catchUp(self, node, lastSeq):
        """
        Tell a node that comes back what changed while it was away: each
        record changed after C{lastSeq} once, as added, updated or (a
        tombstone of a record it had seen) deleted.
        """
        now = self.now()
        changed = sorted((r for r in node.group.records.values() if r.seq > lastSeq),
                         key=lambda r: r.seq)
        for r in changed:
            if r.deleted:
                if lastSeq and r.createdSeq <= lastSeq:
                    self.recordChanged(node.group, C.RECORD_DELETED, r, node)
            elif r.expiration > now:
                kind = C.RECORD_ADDED if r.createdSeq > lastSeq else C.RECORD_UPDATED
                self.recordChanged(node.group, kind, r, node)

    def goOffline(self, node, reason):
        """
        Take C{node} offline: its direct connections close (both ends told),
        the others see C{MEMBER_CHANGED/DISCONNECTED}, its own remaining
        handles (if any) see the status change.
        """
        if not node.online:
            return
        group = node.group
        for direct in list(node.directs.values()):
            self.closeDirect(direct)
        node.online = False
        node.chain = None
        group.online.pop(node.peerName, None)
        member = node.member
        if member is not None:
            member.lastSeq = group.seq
            self.persistQuietly([("member", node.app.name, group.gpn, member.peerName,
                                  member.toStore())], "a member's sync point")
        if self.link is not None:
            self.link.offline(node)
        self.memberChanged(group, node.peerName, C.MEMBER_DISCONNECTED, forward=False)
        self.statusChanged(node)
        log.info("peer {peer} left group {group} of {app}: {reason}", peer=node.peerName,
                 group=group.gpn, app=node.app.name, reason=reason)

    def closeHandle(self, handle, reason="closed"):
        node = handle.node
        handle.session.handles.pop(handle.id, None)
        if handle in node.handles:
            node.handles.remove(handle)
        if not node.handles:
            self.goOffline(node, reason)
            node.passwordChallenge = None
            node.app.nodes.pop((node.group.gpn, node.peerName), None)
            return
        address = node.handles[0].session.transport.address
        if address != node.address:
            # The node stays online through another session, elsewhere: its
            # member entry now shows that address.
            node.address = address
            if node.online:
                if self.link is not None:
                    self.link.online(node)
                self.memberChanged(node.group, node.peerName, C.MEMBER_UPDATED, forward=False)

    def deleteMembership(self, node):
        """
        C{PeerGroupDelete}: the identity's membership and credentials go;
        every handle of every session becomes invalid.
        """
        group = node.group
        for handle in list(node.handles):
            self.closeHandle(handle, "group deleted")
        node.app.nodes.pop((group.gpn, node.peerName), None)
        group.members.pop(node.peerName, None)

    # -- direct connections -------------------------------------------------

    def closeDirect(self, direct, notify=True):
        """
        Close C{direct}: both ends are told; an end on another node of the
        cluster through that node (unless it is the one that closed it,
        C{notify} false).
        """
        if self.directs.pop(direct.id, None) is None:
            return
        for node in (direct.initiator, direct.target):
            node.directs.pop(direct.id, None)
            if node.remote:
                if notify and self.link is not None:
                    self.link.closeRemote(node, direct)
                continue
            self.emit(node, C.EVENT_DIRECT_CONNECTION, {"connectionChangeData": {
                "status": C.PEER_DISCONNECTED, "connectionId": str(direct.id),
                "nodeId": str(direct.other(node).nodeId), "identity": direct.other(node).peerName}})

    # -- timers -------------------------------------------------------------

    def sweep(self):
        """
        Every C{sweepInterval}: drop sessions silent for longer than the
        keepalive timeout (so a vanished member leaves the present list well
        within the presence lifetime), ping the quiet ones, expire records.
        """
        now = self.clock.seconds()
        for session in list(self.sessions):
            idle = now - session.lastHeard
            if idle > self.keepaliveTimeout:
                log.info("peer session {addr}: silent for {idle:.0f}s, dropped",
                         addr=session.transport.address, idle=idle)
                self.counters.dropped["keepalive_timeout"] += 1
                session.transport.abort("keepalive timeout")
                session.lost("keepalive timeout")
            elif idle >= self.keepaliveInterval and now - session.lastPing >= self.keepaliveInterval:
                session.ping()
        if self.loaded:
            for app in list(self.apps.values()):
                for group in list(app.groups.values()):
                    if group.flags & C.DEFER_EXPIRATION and not self.anyoneOnline(group):
                        continue
                    self.expire(group)

    def expire(self, group):
        """
        Purge records and tombstones past their expiration; online nodes
        see C{RECORD_CHANGED/EXPIRED} for live records.
        """
        now = self.now()
        gone = [r for r in group.records.values() if r.expiration <= now]
        if not gone:
            return
        for r in gone:
            del group.records[r.id]
        # Every node of a cluster expires its own copy on its own clock and
        # tells its own sessions, so neither the drop nor the event travels.
        self.persistQuietly([("dropRecords", group.app, group.gpn, [r.id for r in gone])],
                            "expired records", replicate=False)
        for r in gone:
            if not r.deleted:
                self.recordChanged(group, C.RECORD_EXPIRED, r, forward=False)

    # -- password issuer ----------------------------------------------------

    def passwordGuessesLeft(self, group):
        """
        Whether C{group} may check one more password proof: it takes
        C{passwordFailuresPerMinute} wrong ones in any minute, so guessing
        online is capped however many connections and identities the
        guesser uses.  Beyond, proofs are refused unchecked (members who
        know the password retry after the minute).
        """
        now = self.clock.seconds()
        failures = group.passwordFailures
        while failures and failures[0] <= now - 60:
            failures.popleft()
        return len(failures) < self.passwordFailuresPerMinute

    def passwordFailed(self, group):
        """
        Count a wrong proof for C{group}; log when it reaches its limit.
        """
        group.passwordFailures.append(self.clock.seconds())
        self.counters.passwordFailures += 1
        if len(group.passwordFailures) == self.passwordFailuresPerMinute:
            log.warn("peer group {gpn} of {app}: {n} wrong passwords in a minute; "
                     "refusing password joins for now", gpn=group.gpn, app=group.app,
                     n=self.passwordFailuresPerMinute)

    def issuerPublicKey(self):
        from cryptography.hazmat.primitives import serialization
        return self.issuerKey.public_key().public_bytes(serialization.Encoding.Raw,
                                                        serialization.PublicFormat.Raw)

    def issuePasswordCredentials(self, group, node, friendlyName):
        """
        Sign a password joiner's GMC with the broker's issuer key, under the
        issuer GMC the creator gave the group: role = the group's password
        role, valid from now to the issuer's own end.
        """
        issuerLeaf = group.issuer[-1]
        cert = Certificate.make(
            self.issuerKey, "GMC", group.gpn, node.publicKey, node.peerName,
            [group.properties["groupPasswordRole"]], self.now(), issuerLeaf.notAfter,
            friendlyName=friendlyName, classifiers=["participant"])
        return list(group.issuer) + [cert]
