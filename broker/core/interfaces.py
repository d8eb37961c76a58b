# -*- test-case-name: tests -*-
"""
The interfaces between the routing core, its engines and the protocol
adapters.

The core knows hubs, groups, users and connections; it never knows a wire
format.  A protocol adapter hands the core an L{IConnection} for every session
it accepts, and the core hands that connection L{Delivery} objects to write.
Every publish goes through an L{IEngine}, even on a single node, so that a
cluster engine can be swapped in without touching the adapters.
"""

from zope.interface import Attribute, Interface


class IConnection(Interface):
    """
    One client session as the core sees it, whatever its protocol.

    In the spirit of twisted.words' C{IChatClient}: the core calls
    L{deliver} for every message routed to this session.
    """

    connectionId = Attribute("Unique id of this connection within its hub (str).")
    userId = Attribute("The user this connection is authenticated as, or None.")

    def deliver(delivery):
        """
        Hand a L{broker.core.message.Delivery} to the wire.

        Must not block and must not raise: a session that cannot keep up
        closes itself (slow consumer) instead of buffering without bound.
        """

    def close(code, reason):
        """
        Close the session, telling the peer C{reason} where the protocol can.

        @param code: a L{broker.core.errors.CloseCode} naming why.
        @param reason: human-readable text.
        """


class IEngine(Interface):
    """
    Carries every publish and every cluster-wide server command from the
    node where it was made to the nodes holding its receivers, and keeps the
    cluster-wide directory of connections, groups and users.  The in-memory
    engine hands both straight back to the local core; a cluster engine goes
    through Redis.
    """

    directory = Attribute("The L{IDirectory}: who is connected where, cluster-wide.")

    def attach(core):
        """
        Register the local core: the engine calls its
        C{deliverLocal(hubName, target, delivery)} (fan a delivery out to the
        receivers on this node) and C{applyCommand(hubName, command)} (carry
        out a server command on this node's sessions), and reads its hubs
        to re-register this node after an outage.
        """

    def publish(hubName, target, delivery):
        """
        Route C{delivery} to C{target} (a L{broker.core.message.Target}) in
        hub C{hubName} on every node, exactly once per receiver.

        @return: a L{Deferred} that fires when the engine has accepted the
            publish (not when every receiver has it); it fails with
            L{broker.core.errors.Unavailable} when the publish reached this
            node's receivers only.
        """

    def command(hubName, command, node=None):
        """
        Carry out C{command} (a JSON-ready dict, see
        L{broker.core.router.Core.applyCommand}) on every node, this one
        first and synchronously, or only on the node C{node}.

        @return: a L{Deferred} firing once the engine accepted it.
        """

    def healthy():
        """
        @return: C{True} when the engine can accept publishes.
        """

    def stats():
        """
        @return: a JSON-ready dict of the engine's own figures (empty for
            the in-memory engine; node id and bus counters in a cluster).
        """


class IDirectory(Interface):
    """
    The cluster-wide view of a hub's connections, groups and users, which
    server verbs (the REST API) ask when the connection named may live on
    another node.  The hubs mirror every local change into it; queries
    return L{Deferred}s.  With the in-memory engine it is the local hubs.
    """

    def added(hubName, connectionId, userId, roles):
        """
        A connection was admitted on this node.  Mirror writes (this and the
        four below) return a L{Deferred}; they never raise.
        """

    def removed(hubName, connectionId, userId):
        """
        A connection of this node left (with all its groups).
        """

    def joined(hubName, connectionId, group):
        """
        A connection joined C{group}.
        """

    def left(hubName, connectionId, group):
        """
        A connection left C{group}.
        """

    def setRoles(hubName, connectionId, roles):
        """
        A connection's permissions changed; C{roles} is the whole new list.
        """

    def connection(hubName, connectionId):
        """
        @return: a L{Deferred} firing with C{None} or a dict with
            C{userId}, C{roles} and C{node} (the node holding it).
        """

    def userExists(hubName, userId):
        """
        @return: a L{Deferred} firing with a bool.
        """

    def groupExists(hubName, group):
        """
        @return: a L{Deferred} firing with a bool.
        """

    def groupMembers(hubName, group):
        """
        @return: a L{Deferred} firing with C{[(connectionId, userId)]}.
        """

    def userGroups(hubName, userId):
        """
        @return: a L{Deferred} firing with the set of groups C{userId} was
            added to with C{addUserToGroup} (they apply to its future
            connections too).
        """

    def setUserGroup(hubName, userId, group, member):
        """
        Add (C{member} true) or remove C{userId}'s membership of C{group};
        C{group} C{None} with C{member} false removes them all.

        @return: a L{Deferred}.
        """


class IHubObserver(Interface):
    """
    Told of connection life-cycle changes in a hub: upstream event handlers,
    event listeners and metrics hang off this.
    """

    def connectionAdded(hub, session):
        """
        A connection was admitted to C{hub}; C{session} is its
        L{broker.core.session.Session}.
        """

    def connectionRemoved(hub, session, reason):
        """
        A connection left C{hub}.
        """

    def clientEvent(hub, session, event, message):
        """
        C{session} sent the client event C{event} (C{message} or a custom
        name) with payload C{message}; told before the hub's upstream gets
        it, and whether or not the hub has one.
        """

    def membershipChanged(hub, session, group, joined):
        """
        C{session} joined (C{joined} true) or left C{group}, for whatever
        reason (its own request, the REST API, its token's or its user's
        groups, another node's command); not told for the groups a
        connection leaves as it is removed.  Optional.
        """

    def groupJoined(hub, session, group):
        """
        C{session} joined C{group} at its own request (a client's
        joinGroup), after it became a member and before the join is
        acknowledged: what is delivered to C{session.connection} now
        arrives first.  Optional: observers without it are skipped.
        """


class IUpstream(Interface):
    """
    Where a hub sends client events it does not route itself (Web PubSub's
    event handlers, the IoT central's webhook).
    """

    def userEvent(session, event, message):
        """
        Hand the client event C{event} with payload C{message} (a
        L{broker.core.message.Message}) from C{session} upstream.

        @return: a L{Deferred} firing with the upstream's reply, a
            L{broker.core.message.Message} or C{None}; failing when the
            upstream refused or could not be reached.
        """
