# -*- test-case-name: tests.test_peergroups -*-
"""
One peer's session: the Peer Grouping API as requests.

A request is C{{"id": ..., "method": "addRecord", "params": {...}}}; the
answer is C{{"id": ..., "hr": 0, "result": {...}}} or C{{"id": ...,
"error": {"name": "PEER_E_...", "hr": ..., "hex": "0x...", "message": ...}}}.
Requests of one session are handled one at a time, in order, so answers
come back in request order and a change is durable before it is answered.
Events are pushed as C{{"event": {"registration", "handle", "eventType",
...}}} (docs/peergroups-protocol.md).
"""

import os
import re
import secrets

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from broker.cluster.redis import RedisOutcomeUnknown
from broker.core.errors import Unavailable
from broker.core.interfaces import IConnection
from broker.core.limits import PER_HUB, PER_USER
from broker.peergroups import constants as C
from broker.peergroups import credentials as cred
from broker.peergroups.bulk import LargeAnswers
from broker.peergroups.directapi import DirectAPI
from broker.peergroups.membersapi import IMMUTABLE_PROPERTIES, MUTABLE_PROPERTIES, MembersAPI
from broker.peergroups.params import STORE_DOWN, Reply, bytesParam, guidParam, param
from broker.peergroups.recordsapi import RecordsAPI
from broker.peergroups.errors import HRESULTS, PeerError
from broker.peergroups.model import Group, Handle, Member
from broker.peergroups.paging import Cursors

log = Logger()

APPLICATION_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,127}$")
MAX_ID_LENGTH = 64
# Per-session bounds, so one peer cannot grow the broker without limit.
MAX_QUEUED_REQUESTS = 1024
MAX_HANDLES = 256

# Methods allowed before startup / before an identity is registered.
NO_STARTUP = {"startup"}
NO_IDENTITY = {"startup", "shutdown", "registerIdentity"}
# Requests that change the store: refused up front while it cannot be
# written (a cluster's Redis is down), so nothing is half made in memory.
WRITES = {"create", "join", "connect", "delete", "addRecord", "updateRecord",
          "deleteRecord", "importDatabase", "setProperties", "issueCredentials",
          "createInvitation"}
# The same for a change other than a record write: memory cannot be
# trusted, so the node starts again from Redis (sessions closed).
RELOAD_DOWN = ("the cluster store (Redis) is unreachable: nothing was changed; this node "
               "closes its sessions and reloads from Redis once it is back")
RELOAD_LOST = ("the cluster store (Redis) went away while the change was being written: "
               "it may or may not have been stored; this node closes its sessions and "
               "reloads from Redis once it is back")
# Requests whose later ones need not wait for their commit (see _next).
PIPELINED = {"addRecord", "updateRecord", "deleteRecord"}
_WAITING = object()


@implementer(IConnection)
class PeerSession(MembersAPI, RecordsAPI, DirectAPI, LargeAnswers):
    """
    The API for one connection (L{IPeerTransport}) to the broker.

    It is also the routing core's L{IConnection}: once authenticated it is
    a connection of its application's hub (so it counts in C{/stats} and
    is closed with the broker).
    """

    def __init__(self, peergroups, transport):
        self.pg = peergroups
        self.transport = transport
        self.started = False
        self.app = None
        self.version = None
        self.identity = None
        self.challenge = os.urandom(32)
        self.handles = {}
        self.registrations = {}
        self._nextHandle = 1
        self._nextRegistration = 1
        self._queue = []
        self._answers = []
        self._blocked = False
        self._gone = False
        self._warned = False
        self.connectionId = secrets.token_urlsafe(12)
        self.userId = None
        self.coreSession = None
        self._ticket = None
        now = peergroups.clock.seconds()
        self.lastHeard = now
        self.lastPing = now
        self.cursors = Cursors(peergroups.clock.seconds, peergroups.maxCursorsPerSession,
                               peergroups.cursorTimeout)
        peergroups.sessions.add(self)

    _param = staticmethod(param)
    _guid = staticmethod(guidParam)
    _reply = Reply

    @property
    def maxMessageSize(self):
        """
        The largest message either way (the transport's, else the face's).
        """
        return getattr(self.transport, "maxMessageSize", None) or self.pg.maxMessageSize

    # -- wire ---------------------------------------------------------------

    def hello(self):
        self.transport.sendObject({"hello": {
            "protocol": C.PROTOCOL, "challenge": cred.b64(self.challenge),
            "highestVersion": C.HIGHEST_VERSION, "peerTime": self.pg.now(),
            "limits": self._limits()}})

    def _limits(self):
        messages, octets, burst = self.pg.inboundRate
        return {"maxMessageSize": self.maxMessageSize, "inboundMessagesPerSecond": messages,
                "inboundBytesPerSecond": octets, "inboundBurst": burst}

    def received(self, obj):
        """
        One decoded JSON value from the peer.
        """
        if self._gone:
            return
        self.lastHeard = self.pg.clock.seconds()
        if not isinstance(obj, dict):
            self._badFrame(None, "a message must be a JSON object")
            return
        if "pong" in obj or "ping" in obj:
            if "ping" in obj:
                self.transport.sendObject({"pong": obj["ping"]})
            return
        rid = obj.get("id")
        if isinstance(rid, bool) or not isinstance(rid, (int, str)) or \
                (isinstance(rid, str) and len(rid) > MAX_ID_LENGTH):
            self._badFrame(None, "a request needs an id (integer or short string)")
            return
        method = obj.get("method")
        params = obj.get("params", {})
        if not isinstance(method, str) or not isinstance(params, dict):
            self._badFrame(rid, "a request needs a method (string) and params (object)")
            return
        if len(self._queue) + len(self._answers) >= MAX_QUEUED_REQUESTS:
            self.transport.sendObject({"id": rid, "error": PeerError(
                "E_OUTOFMEMORY", "too many requests waiting; wait for answers").toJSON()})
            return
        self._queue.append((rid, method, params))
        self._next()

    def _badFrame(self, rid, why):
        if not self._warned:
            self._warned = True
            log.info("peer session {addr}: bad request: {why}", addr=self.transport.address,
                     why=why)
        self.transport.sendObject({"id": rid, "error": PeerError("E_INVALIDARG", why).toJSON()})

    def _next(self):
        """
        Run queued requests in order.  A request that waits for something
        (the store loading, a write) holds back the ones after it, except
        record writes: their change is made in memory at once and only the
        commit is awaited, so a peer may pipeline them (the store commits
        them together).  Answers always go out in request order.
        """
        while self._queue and not self._gone and not self._blocked:
            rid, method, params = self._queue.pop(0)
            slot = [rid, method, _WAITING]
            self._answers.append(slot)
            d = defer.maybeDeferred(self._dispatch, method, params)

            def settle(result, slot=slot):
                slot[2] = result
                self._flush()
            d.addBoth(settle)
            if slot[2] is _WAITING and method not in PIPELINED:
                self._blocked = True

                def unblock(_):
                    self._blocked = False
                    self._next()
                d.addCallback(unblock)
                return

    def _flush(self):
        while self._answers and self._answers[0][2] is not _WAITING:
            rid, method, result = self._answers.pop(0)
            if isinstance(result, Failure):
                self._failed(result, rid, method)
            else:
                self._answered(result, rid, method)

    def _count(self, method, hr):
        known = method.isidentifier() and hasattr(self, "api_" + method)
        self.pg.counters.answers[(method if known else "unknown", hr)] += 1

    def _answered(self, reply, rid, method):
        if not isinstance(reply, Reply):
            reply = Reply(reply)
        self._count(method, reply.hr)
        if self._gone:
            return
        self.transport.sendObject({"id": rid, "hr": HRESULTS[reply.hr], "result": reply.result})
        if reply.after is not None:
            try:
                reply.after()
            except Exception:
                log.failure("peer groups: after-answer work failed")

    def _failed(self, failure, rid, method):
        if failure.check(PeerError):
            error = failure.value
        else:
            log.failure("peer groups: {method} failed", failure, method=method)
            error = PeerError("E_UNEXPECTED", "internal error")
        self._count(method, error.name)
        if not self._gone:
            self.transport.sendObject({"id": rid, "error": error.toJSON()})

    def _dispatch(self, method, params):
        handler = getattr(self, "api_" + method, None) if method.isidentifier() else None
        if handler is None:
            raise PeerError("E_NOTIMPL", f"unknown method {method!r}")
        if method not in NO_STARTUP and not self.started:
            raise PeerError("PEER_E_NOT_INITIALIZED", "call startup first")
        if method not in NO_IDENTITY and self.identity is None:
            raise PeerError("PEER_E_IDENTITY_NOT_FOUND", "call registerIdentity first")
        if (method in WRITES or not self.pg.loaded) and not self.pg.storeAvailable():
            raise PeerError("E_UNEXPECTED", STORE_DOWN)
        if not self.pg.loaded:
            return self.pg.whenLoaded().addCallback(lambda _: handler(params))
        return handler(params)

    def sendEvent(self, registration, handle, eventType, payload):
        event = {"registration": registration, "handle": handle, "eventType": eventType}
        event.update(payload)
        self.transport.sendObject({"event": event})

    def ping(self):
        self.lastPing = self.pg.clock.seconds()
        self.transport.sendObject({"ping": self.pg.now()})

    def lost(self, reason):
        """
        The connection is gone (closed, dropped, timed out): every handle
        closes, as an ungraceful leave.
        """
        if self._gone:
            return
        self._gone = True
        self._queue = []
        self.cursors = Cursors(self.pg.clock.seconds, 0)
        for handle in list(self.handles.values()):
            self.pg.closeHandle(handle, reason)
        self.pg.sessions.discard(self)
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            ticket.release()
        if self.coreSession is not None:
            self.coreSession.hub.remove(self.coreSession, reason)
            self.coreSession = None

    # -- IConnection (the routing core) -----------------------------------

    def deliver(self, delivery):
        msg = delivery.message
        self.transport.sendObject({"notice": {"dataType": msg.dataType,
                                              "data": msg.jsonField()}})

    def close(self, code, reason):
        self.transport.abort(reason)
        self.lost(reason)

    # -- helpers --------------------------------------------------------------

    def _handle(self, params):
        hid = params.get("handle")
        handle = self.handles.get(hid) if isinstance(hid, int) else None
        if handle is None:
            raise PeerError("PEER_E_INVALID_GROUP", "no such group handle (closed or deleted)")
        return handle

    def _ready(self, params):
        handle = self._handle(params)
        if not handle.node.online:
            raise PeerError("PEER_E_GROUP_NOT_READY", "connect the group first")
        return handle, handle.node

    def _synced(self, params):
        """
        The handle and node of a group connected at least once (its member
        list and records are then known), online now or not.
        """
        handle = self._handle(params)
        member = handle.node.member
        if member is None or not (handle.node.online or member.synced):
            raise PeerError("PEER_E_GROUP_NOT_READY", "connect the group at least once first")
        return handle, handle.node

    def _checkRoom(self):
        if len(self.handles) >= MAX_HANDLES:
            raise PeerError("E_OUTOFMEMORY", f"at most {MAX_HANDLES} open handles per session")

    def _newHandle(self, node):
        handle = Handle(self._nextHandle, self, node)
        self._nextHandle += 1
        self.handles[handle.id] = handle
        node.handles.append(handle)
        if not node.address:
            node.address = self.transport.address
        return handle

    def _group(self, gpn):
        if not isinstance(gpn, str):
            raise PeerError("E_INVALIDARG", "groupPeerName must be a string")
        return self.app.groups.get(gpn)

    def _unknownGroup(self, gpn, handler, params):
        """
        In a cluster, a group created on another node a moment ago may not
        have reached this one yet: merge the store and try once more.

        @return: the retried call's Deferred, or C{None} to go on.
        """
        if self.pg.link is None or params.get("_merged") or not isinstance(gpn, str):
            return None
        return self.pg.link.merge().addCallback(lambda _: handler(dict(params, _merged=True)))

    def _node(self, group):
        return self.app.node(group, self.identity["peerName"], self.identity["publicKey"])

    def _memberChange(self, group, member):
        return ("member", self.app.name, group.gpn, member.peerName, member.toStore())

    def _persistThen(self, changes, reply):
        if not changes:
            return reply

        def failed(failure):
            self.pg.storeFailed(failure, "a change")
            if failure.check(RedisOutcomeUnknown):
                raise PeerError("E_UNEXPECTED", RELOAD_LOST)
            if failure.check(Unavailable):
                raise PeerError("E_UNEXPECTED", RELOAD_DOWN)
            raise PeerError("E_UNEXPECTED", "the store could not save the change; the "
                            "broker closes every session and starts again from its store")
        return self.pg.persist(changes).addCallbacks(lambda _: reply, failed)

    # -- start-up and identity ----------------------------------------------

    def api_startup(self, params):
        version = param(params, "version", int, required=False, default=C.HIGHEST_VERSION)
        major, minor = version & 0xFF, (version >> 8) & 0xFF
        if (major, minor) > (C.HIGHEST_VERSION & 0xFF, C.HIGHEST_VERSION >> 8) or major < 1:
            raise PeerError("PEER_E_UNSUPPORTED_VERSION",
                            f"version {major}.{minor}; this broker speaks up to 1.1")
        application = param(params, "application", str, required=False, default="default")
        if not APPLICATION_NAME.match(application):
            raise PeerError("E_INVALIDARG", "application: a letter, then up to 127 "
                            "letters, digits or underscores")
        if self.started and application != self.app.name:
            raise PeerError("E_UNEXPECTED", "already started for another application")
        if self.pg.applications and application not in self.pg.applications:
            raise PeerError("E_ACCESSDENIED", f"application {application!r} is not served here")
        self.started = True
        self.version = version
        self.app = self.pg.application(application)
        return {"version": version, "highestVersion": C.HIGHEST_VERSION,
                "issuerKey": cred.b64(self.pg.issuerPublicKey()) if self.pg.issuerKey else None}

    def api_shutdown(self, params):
        for handle in list(self.handles.values()):
            self.pg.closeHandle(handle, "shutdown")
        self.registrations.clear()
        self.started = False
        return {}

    def api_registerIdentity(self, params):
        info = cred.parseIdentityInfo(param(params, "identityInfo", str))
        signature = bytesParam(params, "signature")
        message = cred.authMessage(self.challenge, self.app.name, info["publicKey"])
        # One challenge, one attempt: a new one for whatever comes next.
        self.challenge = os.urandom(32)
        if not cred.verify(info["publicKey"], signature, message):
            self.hello()
            log.info("peer session {addr}: identity proof failed for {peer}",
                     addr=self.transport.address, peer=info["peerName"])
            raise PeerError("PEER_E_NO_KEY_ACCESS", "the challenge signature does not verify")
        if self.identity is not None:
            if self.identity["publicKey"] != info["publicKey"]:
                raise PeerError("PEER_E_TOO_MANY_IDENTITIES", "one identity per session")
            return {"peerName": self.identity["peerName"],
                    "challenge": cred.b64(self.challenge)}
        self._admit(info["peerName"])
        self.identity = info
        self.userId = info["peerName"]
        if self.app.hub is not None:
            self.coreSession = self.app.hub.admit(self, userId=info["peerName"])
        return {"peerName": info["peerName"], "challenge": cred.b64(self.challenge)}

    def _admit(self, peerName):
        """
        Take this session's slots of its application (C{per_hub}) and of its
        identity (C{per_user}), or refuse registerIdentity with
        PEER_E_CONNECTION_REFUSED (the session stays, without an identity).
        """
        pg = self.pg
        claims = [(PER_HUB, self.app.name), (PER_USER, (self.app.name, peerName))]
        ticket, refused = pg.admission.admit(claims, self._ticket)
        if ticket is not None:
            self._ticket = ticket
            return
        hub = self.app.hub.name if self.app.hub is not None else ""
        pg.limits.refused("peergroups", hub, refused)
        limit = pg.admission.limit(refused, dict(claims)[refused])
        what = "application" if refused == PER_HUB else "identity"
        pg.quietLog.info(("peergroups", "admission", refused),
                         "peer session {addr}: refused: the {what} has {limit} sessions",
                         addr=self.transport.address, what=what, limit=limit)
        raise PeerError("PEER_E_CONNECTION_REFUSED",
                        f"this {what} already has {limit} sessions (limit)")

    # -- groups ---------------------------------------------------------------

    def api_create(self, params):
        self._checkRoom()
        props = param(params, "properties", dict, required=False, default={})
        bad = "PEER_E_INVALID_GROUP_PROPERTIES"
        unknown = set(props) - MUTABLE_PROPERTIES - IMMUTABLE_PROPERTIES
        if unknown:
            raise PeerError(bad, f"unknown properties {sorted(unknown)}")
        if props.get("groupPeerName") is not None:
            raise PeerError(bad, "the group peer name is generated, it cannot be supplied")
        me = self.identity["peerName"]
        if props.get("creatorPeerName") not in (None, me):
            raise PeerError("PEER_E_INVALID_PEER_NAME", "the creator is the caller")
        if self.pg.creators and me not in self.pg.creators:
            raise PeerError("PEER_E_NOT_AUTHORIZED", "this identity may not create groups here")
        created = sum(1 for g in self.app.groups.values() if g.creator == me)
        if created >= self.pg.maxGroupsPerCreator:
            raise PeerError("E_OUTOFMEMORY", f"quota: at most {self.pg.maxGroupsPerCreator} "
                            "groups created per identity")
        classifier = props.get("classifier") or "group"
        cred.checkClassifier(classifier)
        properties = self._checkedProperties(props)
        properties.update({"classifier": classifier, "creatorPeerName": me,
                           "cloud": props.get("cloud") or "Global_"})
        chain = cred.chainFromJSON(params.get("chain"))
        if len(chain) != 2:
            raise PeerError("PEER_E_INVALID_CREDENTIAL", "create takes [GRC, creator GMC]")
        grc = chain[0]
        gpn = f"{cred.authority(grc.subject)}.{classifier}"
        leaf = cred.validateChain(chain, gpn, grc.subject)
        if leaf.subject != self.identity["publicKey"] or leaf.subjectName != me:
            raise PeerError("PEER_E_INVALID_CREDENTIAL", "the creator GMC is not the caller's")
        if leaf.roles != [C.ROLE_ADMIN] or leaf.notAfter != grc.notAfter or \
                grc.notAfter - grc.notBefore < C.INFINITE_TICKS * 999 // 1000:
            raise PeerError("PEER_E_INVALID_CREDENTIAL",
                            "the creator is an administrator with an infinite GMC")
        cred.checkValidNow(leaf, self.pg.now())
        if gpn in self.app.groups:
            raise PeerError("PEER_E_ALREADY_EXISTS", "a group with this key exists")
        properties["groupPeerName"] = gpn
        verifier = issuer = None
        if properties["authenticationSchemes"] & C.PASSWORD_AUTHENTICATION:
            verifier = cred.checkVerifier(props.get("passwordVerifier"))
            issuer = self._issuerChain(params.get("issuer"), chain, gpn,
                                       properties["groupPasswordRole"])
        group = Group(self.app.name, gpn, grc, properties, verifier, issuer)
        member = Member(me, self.identity["publicKey"], self.identity["friendlyName"],
                        chain=chain, synced=True)
        group.members[me] = member
        group.serials.add(leaf.serial)
        self.app.groups[gpn] = group
        node = self._node(group)
        handle = self._newHandle(node)
        log.info("peer group {gpn} created in {app} by {me}", gpn=gpn, app=self.app.name, me=me)
        return self._persistThen(
            [("group", self.app.name, gpn, group.toStore()), self._memberChange(group, member),
             ("serial", self.app.name, gpn, leaf.serial)],
            {"handle": handle.id, "groupPeerName": gpn, "status": node.status,
             "credentials": cred.chainToJSON(chain)})

    def _checkedProperties(self, props):
        bad = "PEER_E_INVALID_GROUP_PROPERTIES"
        out = {}
        for name in ("friendlyName", "comment"):
            value = props.get(name, "")
            if not isinstance(value, str) or len(value) > 255:
                raise PeerError(bad, f"{name}: a string of at most 255 characters")
            out[name] = value
        flags = props.get("flags", 0)
        if not isinstance(flags, int) or flags & ~C.PROPERTY_FLAGS:
            raise PeerError(bad, "flags: PEER_MEMBER_DATA_OPTIONAL | PEER_DISABLE_PRESENCE"
                            " | PEER_DEFER_EXPIRATION")
        out["flags"] = flags
        presence = props.get("presenceLifetime", C.DEFAULT_PRESENCE_LIFETIME)
        if not isinstance(presence, int):
            raise PeerError(bad, "presenceLifetime: seconds")
        out["presenceLifetime"] = max(presence, C.MIN_PRESENCE_LIFETIME)
        lifetime = props.get("memberDataLifetime", C.DEFAULT_MEMBER_DATA_LIFETIME)
        if not isinstance(lifetime, int):
            raise PeerError(bad, "memberDataLifetime: seconds")
        if lifetime == 0:
            lifetime = C.MAX_MEMBER_DATA_LIFETIME
        elif not C.MIN_MEMBER_DATA_LIFETIME <= lifetime <= C.MAX_MEMBER_DATA_LIFETIME:
            lifetime = C.DEFAULT_MEMBER_DATA_LIFETIME
        out["memberDataLifetime"] = lifetime
        schemes = props.get("authenticationSchemes", C.GMC_AUTHENTICATION)
        if not isinstance(schemes, int) or not schemes or schemes & ~3:
            raise PeerError(bad, "authenticationSchemes: 0x1 (GMC) | 0x2 (password)")
        out["authenticationSchemes"] = schemes
        role = C.normGUID(props.get("groupPasswordRole") or C.ROLE_MEMBER)
        if role not in C.ROLE_RANK:
            raise PeerError("PEER_E_INVALID_ROLE_PROPERTY", "groupPasswordRole: a role GUID")
        out["groupPasswordRole"] = role
        return out

    def _issuerChain(self, obj, chain, gpn, role):
        """
        The GMC the creator issues to the broker's issuer key, under which
        the broker signs password joiners' certificates.
        """
        if self.pg.issuerKey is None:
            raise PeerError("E_NOTIMPL", "this broker has no password issuer key")
        issuer = cred.chainFromJSON(obj)
        if len(issuer) != 3 or [c.raw for c in issuer[:2]] != [c.raw for c in chain]:
            raise PeerError("PEER_E_INVALID_CREDENTIAL", "issuer: [GRC, creator GMC, issuer GMC]")
        leaf = cred.validateChain(issuer, gpn, chain[0].subject)
        if leaf.subject != self.pg.issuerPublicKey() or not cred.canIssue(leaf.role, role):
            raise PeerError("PEER_E_INVALID_CREDENTIAL",
                            "the issuer GMC must name the broker's key and a role able to "
                            "issue groupPasswordRole")
        return issuer

    def api_join(self, params):
        self._checkRoom()
        inv = cred.decodeInvitation(param(params, "invitation", str))
        if inv["version"] != "1.0":
            raise PeerError("PEER_E_INVITATION_NOT_TRUSTED",
                            "a password invitation: use passwordJoin")
        group = self._group(inv["groupPeerName"])
        if group is None:
            retry = self._unknownGroup(inv["groupPeerName"], self.api_join, params)
            if retry is not None:
                return retry
        if group is None or inv.get("application", self.app.name) != self.app.name:
            raise PeerError("PEER_E_INVITATION_NOT_TRUSTED", "no such group in this application")
        chain = inv["chain"]
        leaf = cred.validateChain(chain, group.gpn, group.grcKey)
        me = self.identity["peerName"]
        if leaf.subject != self.identity["publicKey"] or leaf.subjectName != me:
            log.info("peer {me}: refused someone else's invitation to {gpn}", me=me, gpn=group.gpn)
            raise PeerError("PEER_E_INVALID_CREDENTIAL", "the invitation is for another identity")
        now = self.pg.now()
        for cert in chain[1:]:
            cred.checkValidNow(cert, now)
        if leaf.serial in group.serials:
            raise PeerError("PEER_E_INVALID_CREDENTIAL", "this invitation was already used")
        node = self.app.nodes.get((group.gpn, me))
        if node is not None and node.handles:
            raise PeerError("PEER_E_GROUP_IN_USE", "the group is open; close it first")
        member = group.members.get(me)
        if member is not None and member.local and member.chain:
            if leaf.notBefore <= member.leaf.notBefore:
                raise PeerError("PEER_E_INVALID_TIME_PERIOD",
                                "not newer than the credentials held")
            member.pending = chain
        elif member is not None:
            member.chain, member.pending, member.local = chain, None, True
        else:
            member = Member(me, self.identity["publicKey"], self.identity["friendlyName"],
                            chain=chain)
            group.members[me] = member
        group.serials.add(leaf.serial)
        node = self._node(group)
        handle = self._newHandle(node)
        return self._persistThen(
            [self._memberChange(group, member), ("serial", self.app.name, group.gpn, leaf.serial)],
            {"handle": handle.id, "groupPeerName": group.gpn, "status": node.status})

    def api_passwordJoin(self, params):
        self._checkRoom()
        inv = cred.decodeInvitation(param(params, "invitation", str))
        group = self._group(inv["groupPeerName"])
        if group is None:
            retry = self._unknownGroup(inv["groupPeerName"], self.api_passwordJoin, params)
            if retry is not None:
                return retry
        if group is None or inv.get("application", self.app.name) != self.app.name:
            raise PeerError("PEER_E_INVITATION_NOT_TRUSTED", "no such group in this application")
        if inv["version"] != "1.1" or group.verifier is None:
            raise PeerError("PEER_E_INVITATION_NOT_TRUSTED", "not a password invitation")
        me = self.identity["peerName"]
        node = self.app.nodes.get((group.gpn, me))
        if node is not None and node.handles:
            raise PeerError("PEER_E_GROUP_IN_USE", "the group is open; close it first")
        node = self._node(group)
        handle = self._newHandle(node)
        member = group.members.get(me)
        if member is not None and member.local:
            return Reply({"handle": handle.id, "groupPeerName": group.gpn,
                          "status": node.status}, hr="PEER_S_ALREADY_A_MEMBER")
        node.passwordChallenge = os.urandom(32)
        return {"handle": handle.id, "groupPeerName": group.gpn, "status": node.status,
                "passwordChallenge": cred.b64(node.passwordChallenge),
                "salt": group.verifier["salt"], "iterations": group.verifier["iterations"]}

    def api_open(self, params):
        self._checkRoom()
        group = self._group(param(params, "groupPeerName", str))
        me = self.identity["peerName"]
        member = group.members.get(me) if group is not None else None
        if member is None or not member.local:
            retry = self._unknownGroup(params["groupPeerName"], self.api_open, params)
            if retry is not None:
                return retry
            raise PeerError("PEER_E_NOT_FOUND", "not a member of that group (join first)")
        node = self._node(group)
        handle = self._newHandle(node)
        return {"handle": handle.id, "groupPeerName": group.gpn, "status": node.status}

    def api_connect(self, params):
        handle = self._handle(params)
        node = handle.node
        if node.online:
            return Reply({"status": node.status}, hr="PEER_S_ALREADY_CONNECTED")
        group = node.group
        member = node.member
        now = self.pg.now()
        changes = []

        def failed(reason, quiet=False, **extra):
            if not quiet:
                log.info("peer {peer}: connect to {gpn} failed: {reason}", peer=node.peerName,
                         gpn=group.gpn, reason=reason)
            payload = {"hrConnectionFailedReason": PeerError(reason).hr,
                       "reason": reason, **extra}
            return Reply({}, after=lambda: self.pg.emit(node, C.EVENT_CONNECTION_FAILED, payload))

        if member is None or not member.local:
            if node.passwordChallenge is None:
                raise PeerError("PEER_E_INVALID_GROUP", "the membership was deleted")
            try:
                proof = cred.unb64(params.get("passwordProof"), "passwordProof")
            except ValueError as e:
                raise PeerError("E_INVALIDARG", str(e))
            message = cred.passwordAuthMessage(node.passwordChallenge, group.gpn, node.peerName)
            node.passwordChallenge = os.urandom(32)
            fresh = cred.b64(node.passwordChallenge)
            if not self.pg.passwordGuessesLeft(group):
                return failed("PEER_E_NOT_AUTHORIZED", quiet=True, passwordChallenge=fresh,
                              message="too many wrong passwords for this group; retry later")
            if not cred.checkPasswordProof(group.verifier, message, proof):
                self.pg.passwordFailed(group)
                return failed("PEER_E_NOT_AUTHORIZED", passwordChallenge=fresh)
            if not self.pg.anyoneOnline(group):
                return failed("PEER_E_NO_MEMBERS_FOUND", passwordChallenge=fresh)
            chain = self.pg.issuePasswordCredentials(group, node, self.identity["friendlyName"])
            member = Member(node.peerName, node.publicKey, self.identity["friendlyName"],
                            chain=chain)
            group.members[node.peerName] = member
            node.passwordChallenge = None
            changes.append(("serial", self.app.name, group.gpn, chain[-1].serial))
        else:
            pending = member.pending
            if pending is not None and pending[-1].notBefore <= now < pending[-1].notAfter:
                member.chain, member.pending = pending, None
            chain = member.chain
            if not (chain[-1].notBefore <= now < chain[-1].notAfter):
                return failed("PEER_E_CONNECTION_NOT_AUTHENTICATED")
            if not member.synced and not self.pg.anyoneOnline(group):
                return failed("PEER_E_NO_MEMBERS_FOUND")
        changes.append(self._memberChange(group, member))
        return self._persistThen(changes, Reply(
            {"status": C.STATUS_LISTENING | C.STATUS_HAS_CONNECTIONS},
            after=lambda: self.pg.goOnline(node, chain)))

    def api_close(self, params):
        handle = self._handle(params)
        self.pg.closeHandle(handle, "closed")
        self.cursors.releaseHandle(handle.id)
        for regId in [r for r, h in self.registrations.items() if h is handle]:
            del self.registrations[regId]
        return {}

    def api_delete(self, params):
        group = self._group(param(params, "groupPeerName", str))
        me = self.identity["peerName"]
        member = group.members.get(me) if group is not None else None
        if member is None or not member.local:
            raise PeerError("PEER_E_NOT_FOUND", "no such group")
        node = self.app.nodes.get((group.gpn, me))
        if node is not None:
            for handle in node.handles:
                handle.session.registrations = {
                    r: h for r, h in handle.session.registrations.items() if h is not handle}
            self.pg.deleteMembership(node)
        group.members.pop(me, None)
        log.info("peer {me} deleted its membership of {gpn}", me=me, gpn=group.gpn)
        return self._persistThen([("dropMember", self.app.name, group.gpn, me)], {})

    def api_getStatus(self, params):
        return {"status": self._handle(params).node.status}

    def api_getCredentials(self, params):
        handle, node = self._ready(params)
        return {"chain": cred.chainToJSON(node.chain),
                "credentialInfo": node.chain[-1].info()}

    # -- time -----------------------------------------------------------------------

    def api_universalTimeToPeerTime(self, params):
        self._ready(params)
        return {"time": param(params, "time", int)}

    def api_peerTimeToUniversalTime(self, params):
        self._ready(params)
        return {"time": param(params, "time", int)}
