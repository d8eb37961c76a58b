# -*- test-case-name: tests.test_core -*-
"""
A hub and the sessions inside it.

A hub holds its connections, users (all connections of one userId) and
groups.  Protocol adapters act through a L{Session} (client-side verbs,
permission-checked); server-side APIs act through the L{Hub} (trusted verbs).
Neither touches the maps directly.
"""

import secrets

from twisted.internet.defer import fail
from twisted.logger import Logger

from broker.core.errors import BadRequest, BrokerError, Forbidden, NotFound
from broker.core.message import FROM_GROUP, FROM_SERVER, Delivery, Target
from broker.core.permissions import (JOIN_LEAVE_GROUP, PERMISSIONS, SEND_TO_GROUP,
                                     Permissions)

log = Logger()

MAX_NAME_LENGTH = 1024


def checkName(kind, name):
    """
    Refuse empty, non-string or over-long group / user names.
    """
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{kind} must be a non-empty string")
    if len(name) > MAX_NAME_LENGTH:
        raise BadRequest(f"{kind} is longer than {MAX_NAME_LENGTH} characters")
    return name


def _checkPermission(permission, group):
    if permission not in PERMISSIONS:
        raise BadRequest(f"unknown permission {permission!r}; use one of {', '.join(PERMISSIONS)}")
    if group is not None:
        checkName("group", group)


class NoUpstream(BrokerError):
    """
    A client event arrived and the hub has no upstream to take it.
    """

    name = "NoUpstream"


class HubStats:
    """
    Plain counters, read by the admin face at scrape time: incrementing an
    int is the cheapest thing the hot path can do.
    """

    __slots__ = ("messagesIn", "messagesOut", "slowConsumerDrops",
                 "connectionsAccepted", "connectionsRejected", "publishersThrottled")

    def __init__(self):
        self.messagesIn = 0
        self.messagesOut = 0
        self.slowConsumerDrops = 0
        self.connectionsAccepted = 0
        self.connectionsRejected = 0
        self.publishersThrottled = 0


class Session:
    """
    One admitted connection: its identity, permissions and groups, and the
    client-side verbs, each checked against the permissions.
    """

    def __init__(self, hub, connection, userId, permissions):
        self.hub = hub
        self.connection = connection
        self.connectionId = connection.connectionId
        self.userId = userId
        self.permissions = permissions
        self.groups = set()
        self.open = True
        # Opaque state an upstream attached (Web PubSub's ce-connectionState).
        self.connectionState = None

    def joinGroup(self, group):
        checkName("group", group)
        if not self.permissions.has(JOIN_LEAVE_GROUP, group):
            raise Forbidden(f"connection may not join group {group!r}")
        self.hub._join(self, group)

    def leaveGroup(self, group):
        checkName("group", group)
        if not self.permissions.has(JOIN_LEAVE_GROUP, group):
            raise Forbidden(f"connection may not leave group {group!r}")
        self.hub._leave(self, group)

    def sendToGroup(self, group, message, noEcho=False):
        """
        Publish C{message} to C{group} as this connection.

        @return: the engine's L{Deferred}.
        @raise Forbidden: without the C{sendToGroup} permission.
        """
        checkName("group", group)
        if not self.permissions.has(SEND_TO_GROUP, group):
            raise Forbidden(f"connection may not send to group {group!r}")
        self.hub.stats.messagesIn += 1
        delivery = Delivery(message, FROM_GROUP, group, self.userId, self.connectionId)
        excluded = (self.connectionId,) if noEcho else ()
        return self.hub.publish(Target(Target.GROUP, group, excluded), delivery)

    def sendEvent(self, event, message):
        """
        Hand a client event to the hub's upstream.

        @return: a L{Deferred} firing with the upstream's reply (a
            L{Message} or C{None}).
        """
        self.hub.stats.messagesIn += 1
        self.hub.tellObservers("clientEvent", self, event, message)
        upstream = self.hub.upstream
        if upstream is None:
            return fail(NoUpstream(f"hub {self.hub.name!r} has no upstream for event {event!r}"))
        return upstream.userEvent(self, event, message)

    def close(self, code, reason):
        self.connection.close(code, reason)

    def __repr__(self):
        return f"<Session {self.hub.name}/{self.connectionId} user={self.userId!r}>"


class Hub:
    """
    A namespace of connections, users and groups.

    @ivar upstream: an object with C{userEvent(session, event, message)}
        (see L{broker.core.interfaces}) or C{None}.
    """

    def __init__(self, name, core):
        self.name = name
        self._core = core
        self.upstream = None
        self.stats = HubStats()
        self._sessions = {}      # connectionId -> Session
        self._users = {}         # userId -> {connectionId: IConnection}
        self._groups = {}        # group -> {connectionId: IConnection}
        self._userGroups = {}    # userId -> set(group), survives reconnects
        self._observers = []
        # Told of every group publish before its fan-out (an object with
        # C{record(target, delivery)}): the optional per-group history.
        self.history = None

    # -- admission --------------------------------------------------------

    def newConnectionId(self):
        while True:
            cid = secrets.token_urlsafe(16)
            if cid not in self._sessions:
                return cid

    def admit(self, connection, userId=None, roles=(), groups=(), connectionState=None):
        """
        Admit C{connection}; join it to C{groups} and to the groups its user
        was added to earlier.

        @return: its L{Session}.
        """
        if userId is not None:
            checkName("userId", userId)
        for g in groups:
            checkName("group", g)
        cid = connection.connectionId
        if cid in self._sessions:
            raise BadRequest(f"connection id {cid!r} already in use")
        session = Session(self, connection, userId, Permissions.fromRoles(roles))
        session.connectionState = connectionState
        self._sessions[cid] = session
        if userId is not None:
            self._users.setdefault(userId, {})[cid] = connection
            groups = list(groups) + sorted(self._userGroups.get(userId, ()))
        for g in groups:
            self._join(session, g)
        self.stats.connectionsAccepted += 1
        self.tellObservers("connectionAdded", session)
        return session

    def remove(self, session, reason=""):
        """
        Forget a session whose transport has gone.  Idempotent.
        """
        if self._sessions.pop(session.connectionId, None) is None:
            return
        session.open = False
        for g in list(session.groups):
            self._leave(session, g)
        if session.userId is not None:
            conns = self._users.get(session.userId)
            if conns is not None:
                conns.pop(session.connectionId, None)
                if not conns:
                    del self._users[session.userId]
        self.tellObservers("connectionRemoved", session, reason)

    def tellObservers(self, name, *args):
        """
        Call C{name} (an L{IHubObserver} method) on each observer, with this
        hub first.
        """
        for o in list(self._observers):
            getattr(o, name)(self, *args)

    def addObserver(self, observer):
        self._observers.append(observer)

    def removeObserver(self, observer):
        self._observers.remove(observer)

    # -- groups -----------------------------------------------------------

    def _join(self, session, group):
        members = self._groups.get(group)
        if members is None:
            members = self._groups[group] = {}
        members[session.connectionId] = session.connection
        session.groups.add(group)

    def _leave(self, session, group):
        members = self._groups.get(group)
        if members is not None:
            members.pop(session.connectionId, None)
            if not members:
                del self._groups[group]
        session.groups.discard(group)

    # -- server-side verbs (trusted) ------------------------------------

    def session(self, connectionId):
        s = self._sessions.get(connectionId)
        if s is None:
            raise NotFound(f"connection {connectionId!r} not found")
        return s

    def connectionExists(self, connectionId):
        return connectionId in self._sessions

    def userExists(self, userId):
        return userId in self._users

    def groupExists(self, group):
        return group in self._groups

    def groupConnections(self, group):
        """
        The sessions in C{group} (a new list).
        """
        return [self._sessions[cid] for cid in self._groups.get(group, ())]

    def userSessions(self, userId):
        return [self._sessions[cid] for cid in self._users.get(userId, ())]

    def groupUsers(self, group):
        """
        The users with a connection in C{group}: C{{userId: connections}}
        (anonymous connections are not counted).
        """
        users = {}
        for cid in self._groups.get(group, ()):
            uid = self._sessions[cid].userId
            if uid is not None:
                users[uid] = users.get(uid, 0) + 1
        return users

    def grantPermission(self, connectionId, permission, group=None):
        """
        Grant C{permission} to a connection for C{group}, or every group.

        @raise NotFound: no such connection.
        @raise BadRequest: an unknown permission.
        """
        s = self.session(connectionId)
        _checkPermission(permission, group)
        s.permissions.grant(permission, group)

    def revokePermission(self, connectionId, permission, group=None):
        s = self.session(connectionId)
        _checkPermission(permission, group)
        s.permissions.revoke(permission, group)

    def hasPermission(self, connectionId, permission, group=None):
        s = self.session(connectionId)
        _checkPermission(permission, group)
        return s.permissions.has(permission, group)

    def addConnectionToGroup(self, connectionId, group):
        checkName("group", group)
        self._join(self.session(connectionId), group)

    def removeConnectionFromGroup(self, connectionId, group):
        checkName("group", group)
        self._leave(self.session(connectionId), group)

    def removeConnectionFromAllGroups(self, connectionId):
        s = self.session(connectionId)
        for g in list(s.groups):
            self._leave(s, g)

    def addUserToGroup(self, userId, group):
        """
        Add every connection of C{userId} to C{group}, now and for the
        connections it makes later.
        """
        checkName("userId", userId)
        checkName("group", group)
        self._userGroups.setdefault(userId, set()).add(group)
        for s in self.userSessions(userId):
            self._join(s, group)

    def removeUserFromGroup(self, userId, group):
        checkName("group", group)
        groups = self._userGroups.get(userId)
        if groups is not None:
            groups.discard(group)
            if not groups:
                del self._userGroups[userId]
        for s in self.userSessions(userId):
            self._leave(s, group)

    def removeUserFromAllGroups(self, userId):
        self._userGroups.pop(userId, None)
        for s in self.userSessions(userId):
            for g in list(s.groups):
                self._leave(s, g)

    def send(self, target, message):
        """
        Publish a server message to C{target}.  Receivers see a message sent
        to a group as coming from that group, as in Azure.
        """
        if target.kind == Target.GROUP:
            delivery = Delivery(message, FROM_GROUP, target.name)
        else:
            delivery = Delivery(message, FROM_SERVER)
        return self.publish(target, delivery)

    def closeConnections(self, sessions, code, reason):
        for s in sessions:
            s.close(code, reason)

    def publish(self, target, delivery):
        if self.history is not None and target.kind == Target.GROUP:
            self.history.record(target, delivery)
        return self._core.publish(self.name, target, delivery)

    def backpressure(self):
        """
        C{None} while the core keeps up; else a L{Deferred} that fires once
        its fan-out backlog has drained, before which a publishing adapter
        should stop reading from its client.
        """
        if not self._core.fanout.congested:
            return None
        self.stats.publishersThrottled += 1
        return self._core.fanout.whenDrained()

    # -- local delivery (called by the engine) ---------------------------

    def receivers(self, target):
        """
        The L{IConnection}s on this node that C{target} names.
        """
        kind = target.kind
        if kind == Target.GROUP:
            conns = self._groups.get(target.name)
            receivers = list(conns.values()) if conns else []
        elif kind == Target.USER:
            conns = self._users.get(target.name)
            receivers = list(conns.values()) if conns else []
        elif kind == Target.CONNECTION:
            s = self._sessions.get(target.name)
            receivers = [s.connection] if s is not None else []
        else:
            receivers = [s.connection for s in self._sessions.values()]
        if target.excluded and receivers:
            ex = target.excluded
            receivers = [c for c in receivers if c.connectionId not in ex]
        return receivers

    # -- figures ----------------------------------------------------------

    @property
    def connectionCount(self):
        return len(self._sessions)

    @property
    def groupCount(self):
        return len(self._groups)

    @property
    def userCount(self):
        return len(self._users)

    def sessions(self):
        return list(self._sessions.values())
