# -*- test-case-name: tests.test_peergroups -*-
"""
The seams of the peer-groups face: the store behind the core, and the wire
under a peer session.
"""

from zope.interface import Attribute, Interface


class IPeerGroupStore(Interface):
    """
    Where groups, memberships, records and used invitation serials live
    across restarts.  The core keeps the working copy in memory; the store
    is written through, one atomic batch per accepted change, and read
    once at start.
    """

    def load():
        """
        @return: a Deferred firing with
            C{{"groups": [...], "members": [...], "records": [...],
            "serials": [...]}}, rows as dicts (see
            L{broker.peergroups.store}).
        """

    def apply(changes):
        """
        Write C{changes} (a list of tuples, see L{broker.peergroups.store})
        in one transaction.

        @return: a Deferred firing once they are durable.
        """


class IPeerTransport(Interface):
    """
    One peer's connection as the core sees it: JSON objects in and out,
    whatever the framing (WebSocket text frames or length-prefixed TCP).
    """

    address = Attribute("The peer's address as 'host:port' (str).")

    def sendObject(obj):
        """
        Write one JSON object.  Must not block or raise; a peer that does
        not read is dropped once its output buffer is over the limit.
        """

    def abort(reason):
        """
        Drop the connection now (keepalive timeout, slow consumer, broker
        shutdown, protocol violation).  For C{"broker shutting down"} and
        C{"store failure"} what was written goes out first (a close
        handshake on WebSocket).
        """
