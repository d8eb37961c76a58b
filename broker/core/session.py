# -*- test-case-name: tests.test_core -*-
"""
A connection admitted to a hub (L{Session}: its identity, permissions,
groups and the client-side verbs, each permission-checked), and what a hub
counts; the hub itself is L{broker.core.hub.Hub}.
"""

from twisted.internet.defer import fail

from broker.core.errors import BadRequest, BrokerError, Forbidden
from broker.core.message import FROM_GROUP, Delivery, Target
from broker.core.permissions import JOIN_LEAVE_GROUP, SEND_TO_GROUP

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
        # For the admin console: when the hub admitted it (reactor time),
        # and what it sent (publishes and events).
        self.connectedAt = None
        self.messagesIn = 0

    def joinGroup(self, group):
        self.hub.checkGroupName(group)
        if not self.permissions.has(JOIN_LEAVE_GROUP, group):
            raise Forbidden(f"connection may not join group {group!r}")
        self.hub._join(self, group, strict=True)
        self.hub.tellObservers("groupJoined", self, group)

    def leaveGroup(self, group):
        checkName("group", group)
        if not self.permissions.has(JOIN_LEAVE_GROUP, group):
            raise Forbidden(f"connection may not leave group {group!r}")
        self.hub._leave(self, group)

    def checkSendToGroup(self, group):
        """
        Whether this connection may send to C{group}, as L{sendToGroup}
        checks it.

        @raise BadRequest: for an invalid group name.
        @raise Forbidden: without the C{sendToGroup} permission.
        """
        checkName("group", group)
        if not self.permissions.has(SEND_TO_GROUP, group):
            raise Forbidden(f"connection may not send to group {group!r}")

    def sendToGroup(self, group, message, noEcho=False):
        """
        Publish C{message} to C{group} as this connection.

        @return: the engine's L{Deferred}.
        @raise Forbidden: without the C{sendToGroup} permission.
        """
        self.checkSendToGroup(group)
        self.hub.stats.messagesIn += 1
        self.messagesIn += 1
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
        self.messagesIn += 1
        self.hub.tellObservers("clientEvent", self, event, message)
        upstream = self.hub.upstream
        if upstream is None:
            return fail(NoUpstream(f"hub {self.hub.name!r} has no upstream for event {event!r}"))
        return upstream.userEvent(self, event, message)

    def close(self, code, reason):
        self.connection.close(code, reason)

    def __repr__(self):
        return f"<Session {self.hub.name}/{self.connectionId} user={self.userId!r}>"
