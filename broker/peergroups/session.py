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
from broker.peergroups import records as rec
from broker.peergroups.bulk import LargeAnswers
from broker.peergroups.errors import HRESULTS, PeerError
from broker.peergroups.model import Direct, Group, Handle, Member
from broker.peergroups.paging import Cursors, budget, encodedSize
from broker.peergroups.records import Record

log = Logger()

APPLICATION_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,127}$")
MAX_ID_LENGTH = 64
# Per-session bounds, so one peer cannot grow the broker without limit.
MAX_QUEUED_REQUESTS = 1024
MAX_HANDLES = 256
MAX_REGISTRATIONS = 1024
MUTABLE_PROPERTIES = {"friendlyName", "comment", "flags", "passwordVerifier"}
IMMUTABLE_PROPERTIES = {"cloud", "classifier", "groupPeerName", "creatorPeerName",
                        "memberDataLifetime", "presenceLifetime", "authenticationSchemes",
                        "groupPasswordRole"}
# Methods allowed before startup / before an identity is registered.
NO_STARTUP = {"startup"}
NO_IDENTITY = {"startup", "shutdown", "registerIdentity"}
# Requests that change the store: refused up front while it cannot be
# written (a cluster's Redis is down), so nothing is half made in memory.
WRITES = {"create", "join", "connect", "delete", "addRecord", "updateRecord",
          "deleteRecord", "importDatabase", "setProperties", "issueCredentials",
          "createInvitation"}
STORE_DOWN = ("the cluster store (Redis) is unreachable: nothing was changed; "
              "retry once it is back")
# A write cut off in flight: Redis may have executed it (and will then
# raise it as an event on every node once it is back), so a retry could
# make it twice.
STORE_LOST = ("the cluster store (Redis) went away while the change was being written: "
              "it may or may not have been stored; once Redis is back, read before "
              "retrying (a stored change is then raised as an event)")
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


class Reply:
    """
    A handler's answer: C{result}, a success HRESULT other than S_OK, and
    C{after}, run once the answer is written (events the caller must see
    after the answer, as the Windows API raises them after the call).
    """

    def __init__(self, result=None, hr="S_OK", after=None):
        self.result = result if result is not None else {}
        self.hr = hr
        self.after = after


def _param(params, name, kind, required=True, default=None):
    value = params.get(name, None)
    if value is None:
        if required:
            raise PeerError("E_INVALIDARG", f"{name} is required")
        return default
    if kind is int:
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise PeerError("E_INVALIDARG", f"{name} must be an integer")
    elif not isinstance(value, kind):
        raise PeerError("E_INVALIDARG", f"{name} has the wrong type")
    return value


def _guid(params, name, required=True):
    value = params.get(name)
    if value is None and not required:
        return None
    g = C.normGUID(value)
    if g is None:
        raise PeerError("E_INVALIDARG", f"{name} must be a GUID")
    return g


def _bytes(params, name, limit=None):
    value = params.get(name)
    if value is None:
        return b""
    try:
        data = cred.unb64(value, name)
    except ValueError as e:
        raise PeerError("E_INVALIDARG", str(e))
    return data


def _connectionId(params):
    value = params.get("connectionId")
    try:
        cid = int(value)
    except (TypeError, ValueError):
        raise PeerError("E_INVALIDARG", "connectionId must be a 64-bit integer (string)")
    return cid


@implementer(IConnection)
class PeerSession(LargeAnswers):
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

    _param = staticmethod(_param)
    _guid = staticmethod(_guid)
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
        version = _param(params, "version", int, required=False, default=C.HIGHEST_VERSION)
        major, minor = version & 0xFF, (version >> 8) & 0xFF
        if (major, minor) > (C.HIGHEST_VERSION & 0xFF, C.HIGHEST_VERSION >> 8) or major < 1:
            raise PeerError("PEER_E_UNSUPPORTED_VERSION",
                            f"version {major}.{minor}; this broker speaks up to 1.1")
        application = _param(params, "application", str, required=False, default="default")
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
        info = cred.parseIdentityInfo(_param(params, "identityInfo", str))
        signature = _bytes(params, "signature")
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
        props = _param(params, "properties", dict, required=False, default={})
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
        inv = cred.decodeInvitation(_param(params, "invitation", str))
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
        inv = cred.decodeInvitation(_param(params, "invitation", str))
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
        group = self._group(_param(params, "groupPeerName", str))
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
        group = self._group(_param(params, "groupPeerName", str))
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

    # -- invitations and credentials -------------------------------------------

    def _authorizeIssue(self, node, params):
        """
        Check a GMC the caller signed for someone else: the caller may issue
        (not a plain member), the role is not above its own, the chain is
        not too long nor circular, and the GMC does not outlive the
        caller's.

        @return: the new chain.
        """
        role = node.role
        if role not in (C.ROLE_ADMIN, C.ROLE_INVITING_MEMBER):
            raise PeerError("PEER_E_NOT_AUTHORIZED", "members cannot invite or issue credentials")
        try:
            cert = cred.Certificate.fromJSON(_param(params, "certificate", dict))
        except (ValueError, KeyError, TypeError) as e:
            raise PeerError("E_INVALIDARG", f"malformed certificate: {e}")
        group = node.group
        if cert.kind != "GMC" or cert.group != group.gpn or not cert.signedBy(node.publicKey):
            raise PeerError("E_INVALIDARG", "the certificate must be a GMC of this group "
                            "signed with the caller's identity key")
        if not cert.roles or not all(cred.canIssue(role, r) for r in cert.roles):
            raise PeerError("PEER_E_NOT_AUTHORIZED", "cannot issue a role above one's own")
        chain = list(node.chain) + [cert]
        if len(chain) - 1 > C.MAX_CHAIN_LENGTH:
            raise PeerError("PEER_E_CHAIN_TOO_LONG", f"at most {C.MAX_CHAIN_LENGTH} links")
        if any(c.subject == cert.subject for c in node.chain):
            raise PeerError("PEER_E_CIRCULAR_CHAIN_DETECTED", "the subject is already an issuer")
        mine = node.chain[-1]
        if cert.notAfter > mine.notAfter:
            raise PeerError("PEER_E_INVALID_TIME_PERIOD",
                            "the expiration is beyond the issuer's remaining lifetime")
        if cert.notBefore < mine.notBefore or cert.notAfter <= max(cert.notBefore, self.pg.now()):
            raise PeerError("PEER_E_INVALID_TIME_PERIOD", "empty or past validity period")
        if cert.subjectName.split(".", 1)[0] != cred.authority(cert.subject):
            raise PeerError("E_INVALIDARG", "subjectName does not match the subject key")
        cred.validateChain(chain, group.gpn, group.grcKey)
        return chain

    def api_createInvitation(self, params):
        handle, node = self._ready(params)
        chain = self._authorizeIssue(node, params)
        group = node.group
        invitation = cred.encodeInvitation(self.app.name, group.gpn, chain,
                                           group.properties.get("friendlyName", ""))
        return self._persistThen(self.pg.publishMembership(node), {"invitation": invitation})

    def api_createPasswordInvitation(self, params):
        handle, node = self._ready(params)
        group = node.group
        if group.verifier is None:
            raise PeerError("PEER_E_NOT_AUTHORIZED", "not a password group")
        if node.role not in (C.ROLE_ADMIN, C.ROLE_INVITING_MEMBER):
            raise PeerError("PEER_E_NOT_AUTHORIZED", "members cannot invite")
        invitation = cred.encodeInvitation(
            self.app.name, group.gpn, None, group.properties.get("friendlyName", ""),
            password={"salt": group.verifier["salt"],
                      "iterations": group.verifier["iterations"]})
        return {"invitation": invitation}

    def api_issueCredentials(self, params):
        handle, node = self._ready(params)
        chain = self._authorizeIssue(node, params)
        flags = _param(params, "flags", int, required=False, default=0)
        cert = chain[-1]
        group = node.group
        subject = group.members.get(cert.subjectName)
        if subject is not None:
            if subject.publicKey != cert.subject:
                raise PeerError("PEER_E_INVALID_CREDENTIAL_INFO", "subject key mismatch")
            current = subject.pending or subject.chain
            if current and cert.notBefore <= current[-1].notBefore:
                raise PeerError("PEER_E_INVALID_TIME_PERIOD",
                                "ValidityStart must be later than the current credentials'")
        changes = self.pg.publishMembership(node)
        after = None
        if flags & C.STORE_CREDENTIALS:
            if subject is None:
                subject = Member(cert.subjectName, cert.subject, cert.friendlyName,
                                 local=False)
                group.members[cert.subjectName] = subject
            subject.pending = chain
            subject.published = True
            changes.append(self._memberChange(group, subject))
            peer = subject.peerName
            after = lambda: self.pg.memberChanged(group, peer, C.MEMBER_JOINED)  # noqa: E731
        invitation = cred.encodeInvitation(self.app.name, group.gpn, chain,
                                           group.properties.get("friendlyName", ""))
        return self._persistThen(changes, Reply({"invitation": invitation}, after=after))

    # -- members and properties ------------------------------------------------

    def api_enumMembers(self, params):
        handle, node = self._synced(params)
        member = node.member
        flags = _param(params, "flags", int, required=False, default=0)
        wanted = params.get("identity")
        group = node.group
        others = sorted((m for m in group.members.values()
                         if m.published and m.peerName != node.peerName
                         and (m.chain or m.pending)),
                        key=lambda m: m.peerName)
        out = []
        for m in [member] + others:
            peer = self.pg.present(group, m.peerName)
            if flags & C.MEMBER_PRESENT and peer is None:
                continue
            if wanted is not None and m.peerName != wanted:
                continue
            chain = peer.chain if peer is not None else (m.chain or m.pending)
            entry = {"identity": m.peerName, "flags": C.MEMBER_PRESENT if peer else 0,
                     "friendlyName": m.friendlyName, "attributes": "",
                     "nodeId": str(peer.nodeId) if peer else "0", "addresses": [],
                     "credentialInfo": chain[-1].info() if chain else None}
            if peer is not None and not (group.flags & C.DISABLE_PRESENCE):
                entry["addresses"] = [peer.address]
            out.append(entry)
        return {"members": out}

    def _propertiesView(self, group):
        out = dict(group.properties)
        out["hasPassword"] = group.verifier is not None
        return out

    def api_getProperties(self, params):
        handle, node = self._ready(params)
        return {"properties": self._propertiesView(node.group)}

    def api_setProperties(self, params):
        handle, node = self._ready(params)
        group = node.group
        if node.peerName != group.creator:
            raise PeerError("PEER_E_NOT_AUTHORIZED", "only the creator sets properties")
        props = _param(params, "properties", dict)
        bad = "PEER_E_INVALID_GROUP_PROPERTIES"
        for name, value in props.items():
            if name in IMMUTABLE_PROPERTIES:
                if value != group.properties.get(name):
                    raise PeerError(bad, f"{name} cannot be changed")
            elif name not in MUTABLE_PROPERTIES and name != "hasPassword":
                raise PeerError(bad, f"unknown property {name!r}")
        merged = dict(group.properties)
        merged.update({k: v for k, v in props.items() if k in MUTABLE_PROPERTIES
                       and k != "passwordVerifier"})
        checked = self._checkedProperties(merged)
        verifier = group.verifier
        if props.get("passwordVerifier") is not None:
            if verifier is None:
                raise PeerError(bad, "not a password group")
            verifier = cred.checkVerifier(props["passwordVerifier"])
        for name in ("friendlyName", "comment", "flags"):
            group.properties[name] = checked[name]
        group.verifier = verifier
        return self._persistThen(
            [("group", self.app.name, group.gpn, group.toStore())],
            Reply({}, after=lambda: self.pg.broadcast(group, C.EVENT_PROPERTY_CHANGED, {})))

    # -- records ----------------------------------------------------------------

    def _recordInput(self, params):
        r = _param(params, "record", dict)
        attributes = r.get("attributes") or ""
        rec.parseAttributes(attributes)
        expiration = _param(r, "expiration", int)
        data = _bytes(r, "data")
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
        rtype = _guid(r, "type")
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
        r = _param(params, "record", dict)
        old = self._existing(node, _guid(r, "id"))
        if _guid(r, "type") != old.type:
            raise PeerError("E_INVALIDARG", "a record's type cannot change")
        if r.get("flags", old.flags) != old.flags:
            raise PeerError("E_INVALIDARG", "a record's flags cannot be set")
        self._mayChange(node, old)
        attributes = r.get("attributes", old.attributes) or ""
        rec.parseAttributes(attributes)
        expiration = _param(r, "expiration", int, required=False, default=old.expiration)
        data = _bytes(r, "data") if "data" in r else old.data
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
        old = self._existing(node, _guid(params, "id"))
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
        return {"record": self._existing(node, _guid(params, "id")).toJSON()}

    # -- direct connections -------------------------------------------------------

    def api_openDirectConnection(self, params):
        handle, node = self._ready(params)
        peer = _param(params, "identity", str)
        if peer == node.peerName:
            raise PeerError("PEER_E_CONNECT_SELF", "a direct connection to oneself")
        group = node.group
        cid = self.pg.newConnectionId()
        target = self.pg.present(group, peer)

        def establish():
            if not node.online:
                return
            if target is not None and target.remote:
                # On another node: that node checks and answers (pg.direct).
                self.pg.link.openRemote(node, target, cid)
                return
            reason = "PEER_E_CONNECTION_FAILED" if target is None else target.refusesDirect()
            if reason is not None:
                self.pg.emit(node, C.EVENT_DIRECT_CONNECTION, {"connectionChangeData": {
                    "status": C.PEER_CONNECTION_FAILED, "connectionId": str(cid),
                    "nodeId": "0", "identity": peer, "nextConnectionId": "0",
                    "hrConnectionFailedReason": PeerError(reason).hr}})
                return
            direct = Direct(cid, node, target)
            self.pg.directs[cid] = direct
            node.directs[cid] = direct
            target.directs[cid] = direct
            for a, b in ((node, target), (target, node)):
                self.pg.emit(a, C.EVENT_DIRECT_CONNECTION, {"connectionChangeData": {
                    "status": C.PEER_CONNECTED, "connectionId": str(cid),
                    "nodeId": str(b.nodeId), "identity": b.peerName}})
        return Reply({"connectionId": str(cid)}, after=establish)

    def _direct(self, node, params):
        direct = node.directs.get(_connectionId(params))
        if direct is None:
            raise PeerError("PEER_E_CONNECTION_NOT_FOUND", "no such connection")
        return direct

    def _opening(self, node, params):
        """
        The id of a connection C{node} opened towards a peer on another
        node that has not answered yet (usable already, as on one node),
        else C{None}.
        """
        cid = _connectionId(params)
        link = self.pg.link
        if cid not in node.directs and link is not None and link.opening(node, cid):
            return cid
        return None

    def api_closeDirectConnection(self, params):
        handle, node = self._ready(params)
        opening = self._opening(node, params)
        if opening is not None:
            return Reply({}, after=lambda: self.pg.link.closePending(node, opening))
        direct = self._direct(node, params)
        return Reply({}, after=lambda: self.pg.closeDirect(direct))

    def api_sendData(self, params):
        handle, node = self._ready(params)
        opening = self._opening(node, params)
        direct = self._direct(node, params) if opening is None else None
        dtype = _guid(params, "type")
        if dtype == C.RESERVED_DATA_TYPE:
            raise PeerError("E_INVALIDARG", "reserved data type")
        data = _param(params, "data", str, required=False, default="")
        try:
            size = len(cred.unb64(data, "data"))
        except ValueError as e:
            raise PeerError("E_INVALIDARG", str(e))
        if size > self.pg.maxDataSize:
            raise PeerError("E_INVALIDARG", f"at most {self.pg.maxDataSize} bytes per send")
        self.pg.counters.dataMessages += 1
        self.pg.counters.dataBytes += size
        if opening is not None:
            self.pg.link.sendPending(node, opening, dtype, data)
            return {}
        other = direct.other(node)
        if other.remote:
            self.pg.link.sendData(other, direct, dtype, data)
            return {}
        self.pg.emit(other, C.EVENT_INCOMING_DATA, {"incomingData": {
            "connectionId": str(direct.id), "type": dtype, "data": data}}, dtype)
        return {}

    def api_enumConnections(self, params):
        handle, node = self._ready(params)
        flags = _param(params, "flags", int, required=False,
                       default=C.CONNECTION_DIRECT | C.CONNECTION_NEIGHBOR)
        out = []
        if flags & C.CONNECTION_DIRECT:
            for cid, direct in sorted(node.directs.items()):
                other = direct.other(node)
                out.append({"flags": C.CONNECTION_DIRECT, "connectionId": str(cid),
                            "nodeId": str(other.nodeId), "peerId": other.peerName,
                            "address": other.address})
        return {"connections": out}

    # -- events -------------------------------------------------------------------

    def api_registerEvent(self, params):
        handle = self._handle(params)
        entries = _param(params, "registrations", list)
        if not entries or len(entries) > 32:
            raise PeerError("E_INVALIDARG", "1 to 32 registrations")
        if len(self.registrations) >= MAX_REGISTRATIONS:
            raise PeerError("E_OUTOFMEMORY", f"at most {MAX_REGISTRATIONS} registrations")
        parsed = []
        for e in entries:
            if not isinstance(e, dict) or e.get("eventType") not in C.EVENT_TYPES:
                raise PeerError("E_INVALIDARG", f"unknown event type in {e!r}")
            parsed.append((e["eventType"], _guid(e, "type", required=False)))
        regId = self._nextRegistration
        self._nextRegistration += 1
        handle.registrations[regId] = parsed
        self.registrations[regId] = handle
        return {"registration": regId}

    def api_unregisterEvent(self, params):
        regId = params.get("registration")
        handle = self.registrations.pop(regId, None) if isinstance(regId, int) else None
        if handle is None:
            raise PeerError("E_INVALIDARG", "no such registration")
        handle.registrations.pop(regId, None)
        return {}

    # -- time -----------------------------------------------------------------------

    def api_universalTimeToPeerTime(self, params):
        self._ready(params)
        return {"time": _param(params, "time", int)}

    def api_peerTimeToUniversalTime(self, params):
        self._ready(params)
        return {"time": _param(params, "time", int)}
