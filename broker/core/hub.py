# -*- test-case-name: tests.test_core -*-
"""
A hub and the sessions inside it.

A hub holds its connections, users (all connections of one userId) and
groups.  Protocol adapters act through a L{Session} (client-side verbs,
permission-checked); server-side APIs act through the L{Hub} (trusted verbs).
Neither touches the maps directly.
"""

import secrets
from collections import deque

from twisted.internet.defer import (Deferred, FirstError, gatherResults,
                                    maybeDeferred, succeed)
from twisted.logger import Logger

from broker.core.errors import BadRequest, LimitExceeded, NotFound, Unavailable
from broker.core.message import FROM_GROUP, FROM_SERVER, Delivery, Target
from broker.core.permissions import PERMISSIONS, Permissions
from broker.core.session import MAX_NAME_LENGTH, HubStats, Session, checkName

log = Logger()

# A group map that held at least this many groups is rebuilt once it is
# down to a quarter of that (Hub._shrink).
SHRINK_FROM = 4096


def _checkPermission(permission, group):
    if permission not in PERMISSIONS:
        raise BadRequest(f"unknown permission {permission!r}; use one of {', '.join(PERMISSIONS)}")
    if group is not None:
        checkName("group", group)


def _firstError(failure):
    """
    The first error of a L{gatherResults}, unwrapped.
    """
    if failure.check(FirstError):
        return failure.value.subFailure
    return failure


class _PublishQueue:
    """
    Publishes waiting for an asynchronous history stamp, and those made
    after them: each goes out, in the order it was made, once everything
    before it has gone and its own stamp (if any) has fired, whether that
    succeeded or failed (a failed stamp leaves the delivery unstamped).
    """

    def __init__(self, publish):
        self._publish = publish
        self._queue = deque()      # [target, delivery, ready, result]

    def __bool__(self):
        return bool(self._queue)

    def submit(self, target, delivery, stamping):
        entry = [target, delivery, stamping is None, Deferred()]
        self._queue.append(entry)
        if stamping is None:
            self._drain()
        else:
            def ready(_):
                entry[2] = True
                self._drain()
            stamping.addBoth(ready)
        return entry[3]

    def _drain(self):
        queue = self._queue
        while queue and queue[0][2]:
            target, delivery, _, result = queue.popleft()
            maybeDeferred(self._publish, target, delivery).chainDeferred(result)


class Hub:
    """
    A namespace of connections, users and groups.

    @ivar upstream: an object with C{userEvent(session, event, message)}
        (see L{broker.core.interfaces}) or C{None}.
    """

    # Group limits (0: none), set by the face that serves the hub
    # (core.onNewHub); counted per node.
    maxGroupsPerConnection = 0
    maxGroups = 0
    maxGroupNameLength = MAX_NAME_LENGTH
    # The face label of the hub's limit counters on /metrics.
    face = "core"

    def __init__(self, name, core):
        self.name = name
        self._core = core
        self.upstream = None
        self.stats = HubStats()
        self._sessions = {}      # connectionId -> Session
        self._users = {}         # userId -> {connectionId: IConnection}
        self._groups = {}        # group -> {connectionId: IConnection}
        # The most groups the map has held since it was last rebuilt.
        self._groupsPeak = 0
        self._observers = []
        # Sessions whose user-level groups could not be read yet.
        self._userGroupsUnread = set()
        # The cluster-wide view (the engine's): user-level group
        # memberships live there, and every local change is mirrored there.
        self._engine = core.engine
        self.directory = core.engine.directory
        # Told of every group publish before its fan-out (an object with
        # C{record(target, delivery)}): the optional per-group history.  A
        # history that stamps asynchronously (in Redis) returns a Deferred:
        # the publish goes out once it fires, and the hub's later publishes
        # queue behind it, so they keep their order.
        self.history = None
        self._ordered = _PublishQueue(self._publishNow)
        # Callables C{resolver(group)} giving further receivers of a group
        # send ({connectionId: IConnection}) beyond the group's members: how
        # a face matches patterns (MQTT wildcard and shared subscriptions)
        # against group names without the core knowing their syntax.
        self._groupResolvers = []

    def addGroupResolver(self, resolver):
        """
        Ask C{resolver(group)} for further receivers of every group send
        on this node: a dict C{{connectionId: IConnection}} (a receiver
        already a member of the group is not delivered to twice: the
        resolver's stands in for the member's own).
        """
        self._groupResolvers.append(resolver)

    def removeGroupResolver(self, resolver):
        self._groupResolvers.remove(resolver)

    # -- admission --------------------------------------------------------

    def newConnectionId(self):
        while True:
            cid = secrets.token_urlsafe(16)
            if cid not in self._sessions:
                return cid

    def admit(self, connection, userId=None, roles=(), groups=(), connectionState=None):
        """
        Admit C{connection}; join it to C{groups} and to the groups its user
        was added to earlier (cluster-wide: read from the directory, at once
        with the in-memory engine, a Redis round trip later in a cluster).

        @return: its L{Session}.
        """
        if userId is not None:
            checkName("userId", userId)
        for g in groups:
            self.checkGroupName(g)
        if self.maxGroupsPerConnection and len(set(groups)) > self.maxGroupsPerConnection:
            self._groupRefused("per_connection")
            raise LimitExceeded(f"more than {self.maxGroupsPerConnection} groups for one "
                                f"connection")
        cid = connection.connectionId
        if cid in self._sessions:
            raise BadRequest(f"connection id {cid!r} already in use")
        session = Session(self, connection, userId, Permissions.fromRoles(roles))
        session.connectionState = connectionState
        session.connectedAt = self._core.reactor.seconds()
        self._sessions[cid] = session
        self._mirror(self.directory.added(self.name, cid, userId, session.permissions.roles()))
        if userId is not None:
            self._users.setdefault(userId, {})[cid] = connection
        for g in groups:
            self._join(session, g)
        if userId is not None:
            self._joinUserGroups(session)
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
        self._userGroupsUnread.discard(session)
        for g in list(session.groups):
            self._leave(session, g, mirror=False)
        if session.userId is not None:
            conns = self._users.get(session.userId)
            if conns is not None:
                conns.pop(session.connectionId, None)
                if not conns:
                    del self._users[session.userId]
        self._mirror(self.directory.removed(self.name, session.connectionId, session.userId))
        self.tellObservers("connectionRemoved", session, reason)

    def _joinUserGroups(self, session):
        def join(stuck):
            self._userGroupsUnread.discard(session)
            if session.open:
                for g in sorted(stuck):
                    self._join(session, g)

        def unread(failure):
            # Redis away: tried again when the node registers after it.
            self._userGroupsUnread.add(session)
            self._mirrorFailed(failure)
        self.directory.userGroups(self.name, session.userId).addCallbacks(join, unread)

    def rejoinUserGroups(self):
        """
        Join the sessions admitted while the directory was unreachable to
        the groups their users were added to (the engine calls it once it
        has registered this node again).
        """
        for session in list(self._userGroupsUnread):
            if session.open:
                self._joinUserGroups(session)
            else:
                self._userGroupsUnread.discard(session)

    # -- the directory mirror -------------------------------------------

    def _mirror(self, d):
        """
        A local change mirrored into the directory: it cannot be refused
        (the local state is the truth and is re-registered whole after a
        Redis outage), so a failure is only logged.
        """
        d.addErrback(self._mirrorFailed)

    @staticmethod
    def _mirrorFailed(failure):
        if not failure.check(Unavailable):
            log.failure("directory update failed", failure)

    def tellObservers(self, name, *args):
        """
        Call C{name} (an L{IHubObserver} method) on each observer, with this
        hub first.  An observer without the method is skipped (hooks added
        later, such as C{groupJoined}, are optional).
        """
        for o in list(self._observers):
            method = getattr(o, name, None)
            if method is not None:
                method(self, *args)

    def addObserver(self, observer):
        self._observers.append(observer)

    def removeObserver(self, observer):
        self._observers.remove(observer)

    # -- groups -----------------------------------------------------------

    def checkGroupName(self, group):
        """
        L{checkName}, with this hub's own (possibly shorter) length limit.
        """
        checkName("group", group)
        if len(group) > self.maxGroupNameLength:
            self._groupRefused("name_length")
            raise LimitExceeded(f"group is longer than {self.maxGroupNameLength} characters")
        return group

    def _groupRefused(self, reason):
        self._core.limits.groupLimit(self.face, self.name, reason)

    def _joinRefusal(self, session, group):
        """
        Why C{session} may not join C{group} now (a limit's C{reason}
        label), or C{None}.
        """
        if self.maxGroupsPerConnection and len(session.groups) >= self.maxGroupsPerConnection \
                and group not in session.groups:
            return "per_connection"
        if self.maxGroups and len(self._groups) >= self.maxGroups and group not in self._groups:
            return "per_hub"
        return None

    def _join(self, session, group, mirror=True, strict=False):
        """
        Join C{session} to C{group}.  Over a group limit, a client's or
        REST request (C{strict}) is refused with L{LimitExceeded}; a join
        the broker makes on its own (token groups, a user's groups, a
        command from another node) is skipped, counted and logged.
        """
        members = self._groups.get(group)
        if members is not None and session.connectionId in members:
            return
        reason = self._joinRefusal(session, group)
        if reason is not None:
            self._groupRefused(reason)
            limit = self.maxGroupsPerConnection if reason == "per_connection" else self.maxGroups
            what = "this connection" if reason == "per_connection" else f"hub {self.name!r}"
            if strict:
                raise LimitExceeded(f"{what} already has {limit} groups")
            self._core.quietLog.info(
                ("group limit", self.name, reason),
                "hub {hub}: join of {cid} to a group skipped: {what} already has {limit} groups",
                hub=self.name, cid=session.connectionId, what=what, limit=limit)
            return
        if members is None:
            members = self._groups[group] = {}
            if len(self._groups) > self._groupsPeak:
                self._groupsPeak = len(self._groups)
        members[session.connectionId] = session.connection
        session.groups.add(group)
        if mirror:
            self._mirror(self.directory.joined(self.name, session.connectionId, group))
        if session.open:
            self.tellObservers("membershipChanged", session, group, True)

    def _leave(self, session, group, mirror=True):
        members = self._groups.get(group)
        if members is None or members.pop(session.connectionId, None) is None:
            session.groups.discard(group)
            return
        if not members:
            del self._groups[group]
            if self._groupsPeak >= SHRINK_FROM and len(self._groups) * 4 <= self._groupsPeak:
                self._shrink()
        session.groups.discard(group)
        if mirror:
            self._mirror(self.directory.left(self.name, session.connectionId, group))
        if session.open:
            # Not while the connection is removed: its end is told once,
            # as connectionRemoved.
            self.tellObservers("membershipChanged", session, group, False)

    def _shrink(self):
        """
        The group map fell to a quarter of its peak: a Python dict never
        shrinks by itself, so copy it, and have the core give the freed
        memory back to the system (L{broker.core.memory}).
        """
        self._groups = dict(self._groups)
        self._groupsPeak = len(self._groups)
        self._core.memory.soon()

    def _leaveAll(self, session):
        for g in list(session.groups):
            self._leave(session, g)

    def _setRoles(self, session):
        self._mirror(self.directory.setRoles(self.name, session.connectionId,
                                             session.permissions.roles()))

    # -- local queries (this node only) ---------------------------------

    def session(self, connectionId):
        """
        The L{Session} of a connection on this node.

        @raise NotFound: none here.
        """
        s = self._sessions.get(connectionId)
        if s is None:
            raise NotFound(f"connection {connectionId!r} not found")
        return s

    def localSession(self, connectionId):
        """
        The L{Session} of a connection on this node, or C{None}.
        """
        return self._sessions.get(connectionId)

    def connectionExists(self, connectionId):
        return connectionId in self._sessions

    def userExists(self, userId):
        return userId in self._users

    def groupExists(self, group):
        return group in self._groups

    def groupConnections(self, group):
        """
        The sessions on this node in C{group} (a new list).
        """
        return [self._sessions[cid] for cid in self._groups.get(group, ())]

    def userSessions(self, userId):
        return [self._sessions[cid] for cid in self._users.get(userId, ())]

    # -- server verbs (trusted, cluster-wide) ----------------------------
    #
    # Each returns a Deferred: the connection, user or group named may live
    # on another node.  A connection on this node is acted on at once; one
    # elsewhere is looked up in the directory (NotFound if none) and the
    # change is written there and sent to its node as a command, so a query
    # that follows from this node already sees it.

    def _owner(self, connectionId):
        def check(info):
            if info is None:
                raise NotFound(f"connection {connectionId!r} not found")
            return info
        return self.directory.connection(self.name, connectionId).addCallback(check)

    def _elsewhere(self, connectionId, write, command):
        """
        Apply a change to a connection on another node: C{write()} updates
        the directory, C{command} goes to the node holding it.
        """
        def send(info):
            return gatherResults(
                [write(info), self._engine.command(self.name, command, node=info["node"])],
                consumeErrors=True).addCallback(lambda _: None)
        return self._owner(connectionId).addCallback(send).addErrback(_firstError)

    def findConnection(self, connectionId):
        """
        @return: a L{Deferred} firing with whether the connection exists on
            any node.
        """
        if connectionId in self._sessions:
            return succeed(True)
        return self.directory.connection(self.name, connectionId).addCallback(
            lambda info: info is not None)

    def findUser(self, userId):
        if userId in self._users:
            return succeed(True)
        return self.directory.userExists(self.name, userId)

    def findGroup(self, group):
        if group in self._groups:
            return succeed(True)
        return self.directory.groupExists(self.name, group)

    def listGroupConnections(self, group):
        """
        @return: a L{Deferred} firing with C{[(connectionId, userId)]} for
            C{group} on every node.
        """
        return maybeDeferred(checkName, "group", group).addCallback(
            lambda _: self.directory.groupMembers(self.name, group))

    def listGroupUsers(self, group):
        """
        @return: a L{Deferred} firing with C{{userId: connections}} for the
            users with a connection in C{group} on any node (anonymous
            connections are not counted).
        """
        def count(members):
            users = {}
            for _, uid in members:
                if uid is not None:
                    users[uid] = users.get(uid, 0) + 1
            return users
        return self.listGroupConnections(group).addCallback(count)

    def groupUsers(self, group):
        """
        The users with a connection on this node in C{group}:
        C{{userId: connections}}.
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

        @return: a L{Deferred}, failing with L{NotFound} (no such
            connection) or L{BadRequest} (an unknown permission).
        """
        return maybeDeferred(self._changePermission, "grant", connectionId, permission, group)

    def revokePermission(self, connectionId, permission, group=None):
        return maybeDeferred(self._changePermission, "revoke", connectionId, permission, group)

    def _changePermission(self, verb, connectionId, permission, group):
        _checkPermission(permission, group)
        s = self._sessions.get(connectionId)
        if s is not None:
            getattr(s.permissions, verb)(permission, group)
            self._setRoles(s)
            return None

        def write(info):
            perms = Permissions.fromRoles(info["roles"])
            getattr(perms, verb)(permission, group)
            return self.directory.setRoles(self.name, connectionId, perms.roles())
        return self._elsewhere(connectionId, write, {"op": verb, "c": connectionId,
                                                     "p": permission, "g": group})

    def hasPermission(self, connectionId, permission, group=None):
        """
        @return: a L{Deferred} firing with a bool.
        """
        def check():
            _checkPermission(permission, group)
            s = self._sessions.get(connectionId)
            if s is not None:
                return s.permissions.has(permission, group)
            return self._owner(connectionId).addCallback(
                lambda info: Permissions.fromRoles(info["roles"]).has(permission, group))
        return maybeDeferred(check)

    def addConnectionToGroup(self, connectionId, group):
        return maybeDeferred(self._groupVerb, "join", connectionId, group)

    def removeConnectionFromGroup(self, connectionId, group):
        return maybeDeferred(self._groupVerb, "leave", connectionId, group)

    def removeConnectionFromAllGroups(self, connectionId):
        return maybeDeferred(self._groupVerb, "leaveAll", connectionId, None)

    def _groupVerb(self, op, connectionId, group):
        """
        C{op} (C{join}, C{leave} or C{leaveAll}) for one connection, here
        or on its node.
        """
        if group is not None:
            if op == "join":
                self.checkGroupName(group)
            else:
                checkName("group", group)
        s = self._sessions.get(connectionId)
        if s is not None:
            if op == "join":
                self._join(s, group, strict=True)
            else:
                self.apply({"op": op, "c": connectionId, "g": group})
            return None
        if op == "join":
            def write(info):
                return self.directory.joined(self.name, connectionId, group)
        else:
            def write(info):
                return self.directory.left(self.name, connectionId, group)
        return self._elsewhere(connectionId, write, {"op": op, "c": connectionId, "g": group})

    def addConnectionsToGroups(self, groups, filterText=None):
        """
        Join every connection C{filterText} selects (every connection when
        C{None}), on every node, to each of C{groups}.  Each node applies
        the filter to its own connections; a join over a group limit is
        skipped for that connection (counted and logged), as for the other
        joins the broker makes on its own.

        @return: a L{Deferred} firing once the engine took the command,
            failing with L{BadRequest} (a bad name or filter) or
            L{LimitExceeded} (a group name over this hub's length limit)
            before anything is done.
        """
        return maybeDeferred(self._filteredGroups, "joinFiltered", groups, filterText)

    def removeConnectionsFromGroups(self, groups, filterText=None):
        """
        Remove every connection C{filterText} selects (every connection
        when C{None}), on every node, from each of C{groups}.
        """
        return maybeDeferred(self._filteredGroups, "leaveFiltered", groups, filterText)

    def _filteredGroups(self, op, groups, filterText):
        groups = list(dict.fromkeys(groups))
        for g in groups:
            if op == "joinFiltered":
                self.checkGroupName(g)
            else:
                checkName("group", g)
        if filterText is not None:
            # Refused here if malformed; compiled again on every node.
            self._core.sessionFilter(filterText)
        return self._engine.command(self.name, {"op": op, "g": groups, "f": filterText})

    def addUserToGroup(self, userId, group):
        """
        Add every connection of C{userId}, on every node, to C{group}, now
        and for the connections it makes later.
        """
        def add(stuck):
            if (self.maxGroupsPerConnection and group not in stuck
                    and len(stuck) >= self.maxGroupsPerConnection):
                self._groupRefused("per_user")
                raise LimitExceeded(f"user {userId!r} was already added to "
                                    f"{self.maxGroupsPerConnection} groups")
            return self._userChange(self.directory.setUserGroup(self.name, userId, group, True),
                                    {"op": "joinUser", "u": userId, "g": group})

        def check():
            checkName("userId", userId)
            self.checkGroupName(group)
            if not self.maxGroupsPerConnection:
                return add(())
            # The user's groups live in the directory (Redis in a cluster).
            return self.directory.userGroups(self.name, userId).addCallback(add)
        return maybeDeferred(check)

    def removeUserFromGroup(self, userId, group):
        def remove():
            checkName("group", group)
            return self._userChange(self.directory.setUserGroup(self.name, userId, group, False),
                                    {"op": "leaveUser", "u": userId, "g": group})
        return maybeDeferred(remove)

    def removeUserFromAllGroups(self, userId):
        return self._userChange(self.directory.setUserGroup(self.name, userId, None, False),
                                {"op": "leaveUserAll", "u": userId})

    def _userChange(self, written, command):
        # The directory write goes first, so a connection of the user admitted
        # anywhere after the command reads the new memberships.
        return gatherResults([written, self._engine.command(self.name, command)],
                             consumeErrors=True).addCallbacks(lambda _: None, _firstError)

    def close(self, target, code, reason):
        """
        Close the connections C{target} names, on every node.

        @return: a L{Deferred} firing once the engine took the command.
        """
        return self._engine.command(self.name, {"op": "close", "t": target.toJSON(),
                                                "code": code, "reason": reason})

    # -- commands (from the engine, on every node) -----------------------

    def apply(self, command):
        """
        Carry out one server command on this node's sessions.
        """
        op = command["op"]
        if op in ("joinUser", "leaveUser", "leaveUserAll"):
            for s in self.userSessions(command["u"]):
                if op == "joinUser":
                    self._join(s, command["g"])
                elif op == "leaveUser":
                    self._leave(s, command["g"])
                else:
                    self._leaveAll(s)
        elif op in ("joinFiltered", "leaveFiltered"):
            text = command["f"]
            keep = self._core.sessionFilter(text) if text is not None else None
            # Each connection is judged before any of its groups change.
            chosen = [s for s in self._sessions.values() if keep is None or keep(s)]
            for s in chosen:
                for g in command["g"]:
                    if op == "joinFiltered":
                        self._join(s, g)
                    else:
                        self._leave(s, g)
        elif op == "close":
            target = Target.fromJSON(command["t"])
            for c in self.receivers(target):
                c.close(command["code"], command["reason"])
        else:
            s = self._sessions.get(command["c"])
            if s is None:
                return
            if op == "join":
                self._join(s, command["g"])
            elif op == "leave":
                self._leave(s, command["g"])
            elif op == "leaveAll":
                self._leaveAll(s)
            elif op in ("grant", "revoke"):
                getattr(s.permissions, op)(command["p"], command["g"])
                self._setRoles(s)
            else:
                log.warn("unknown server command {op!r} ignored", op=op)

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
        """
        Close these sessions of this node.
        """
        for s in sessions:
            s.close(code, reason)

    def publish(self, target, delivery):
        stamping = None
        if self.history is not None and target.kind == Target.GROUP:
            stamping = self.history.record(target, delivery)
        if stamping is None and not self._ordered:
            return self._core.publish(self.name, target, delivery)
        return self._ordered.submit(target, delivery, stamping)

    def _publishNow(self, target, delivery):
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
            for resolver in self._groupResolvers:
                extra = resolver(target.name)
                if not extra:
                    continue
                if conns and any(cid in conns for cid in extra):
                    # A resolver's receiver for a member stands in for it
                    # (it may know more: the MQTT face's shared picks).
                    receivers = [extra.get(c.connectionId, c) for c in receivers]
                    receivers.extend(c for cid, c in extra.items() if cid not in conns)
                else:
                    receivers.extend(extra.values())
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
        if target.filter is not None and receivers:
            keep = self._core.sessionFilter(target.filter)
            sessions = self._sessions
            receivers = [c for c in receivers
                         if c.connectionId in sessions and keep(sessions[c.connectionId])]
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

    # -- listings for the admin console (no copy: one page of 100k) ------

    def iterSessions(self):
        """
        This node's sessions in the order they were admitted: a live view
        (with a length), to be read before the reactor runs again.
        """
        return self._sessions.values()

    def iterGroups(self):
        """
        C{(group, connections here)} for each group, in creation order.
        """
        return ((g, len(m)) for g, m in self._groups.items())

    def iterUsers(self):
        """
        C{(userId, connections here)} for each user, in order of arrival.
        """
        return ((u, len(c)) for u, c in self._users.items())
