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
    Carries every publish from the node where it was made to the nodes
    holding its receivers.  The in-memory engine hands it straight back to
    the local core; a cluster engine goes through a broker such as Redis.
    """

    def attach(deliverLocal):
        """
        Register the local core's entry point.

        @param deliverLocal: C{callable(hubName, target, delivery)} that fans
            a delivery out to the receivers connected to this node.
        """

    def publish(hubName, target, delivery):
        """
        Route C{delivery} to C{target} (a L{broker.core.message.Target}) in
        hub C{hubName} on every node.

        @return: a L{Deferred} that fires when the engine has accepted the
            publish (not when every receiver has it).
        """

    def healthy():
        """
        @return: C{True} when the engine can accept publishes.
        """


class IHubObserver(Interface):
    """
    Told of connection life-cycle changes in a hub: upstream event handlers,
    event listeners and metrics hang off this.
    """

    def connectionAdded(hub, session):
        """
        A connection was admitted to C{hub}; C{session} is its
        L{broker.core.hub.Session}.
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
