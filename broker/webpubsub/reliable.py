# -*- test-case-name: tests.test_webpubsub_reliable -*-
"""
The reliable subprotocols, C{json.reliable.webpubsub.azure.v1} and
C{protobuf.reliable.webpubsub.azure.v1}: a connection that outlives its
WebSocket.

A reliable client numbers nothing itself: every message the broker sends it
carries a C{sequenceId} (1, 2, ...), and the client acknowledges the highest
it has with C{sequenceAck}.  When the socket drops without a normal close,
the connection stays in its hub (same connectionId, user, groups) for the
recovery window, and what it is sent meanwhile is kept.  The client
reconnects with C{awps_connection_id} and C{awps_reconnection_token}; every
message it has not acknowledged is sent again, in order, and it goes on.
After the window, or if it closes normally, the connection is removed and
C{disconnected} fires as for any other.

L{ReliableLink} is what the hub knows as the connection (it provides
L{IConnection}); the WebSocket protocol of the moment is attached to it.

The ackIds the client has used belong to the link too (L{RecentAckIds}), not
to the socket: a client whose socket dropped before it got an ack sends the
request again, with the same ackId, once it has recovered, and must be
answered C{Duplicate} rather than have it brokered twice.
"""

import hmac
import secrets
from collections import OrderedDict

from zope.interface import implementer

from broker.core.errors import CloseCode
from broker.core.interfaces import IConnection
from broker.webpubsub import subprotocols

# How many recent ackIds a connection remembers for duplicate detection.
ACK_WINDOW = 4096


class RecentAckIds:
    """
    The ackIds of a connection's last L{ACK_WINDOW} accepted requests: a
    request repeating one is answered C{Duplicate} and not carried out.

    @param ackIds: ackIds already used, oldest first (a link taken over
        from another node); only the newest C{limit} are kept.
    """

    __slots__ = ("_ids", "limit")

    def __init__(self, ackIds=(), limit=ACK_WINDOW):
        self.limit = limit
        ackIds = list(ackIds)
        self._ids = OrderedDict.fromkeys(ackIds[-limit:] if limit else ())

    def __contains__(self, ackId):
        return ackId in self._ids

    def __len__(self):
        return len(self._ids)

    def __iter__(self):
        """
        The ackIds, oldest first.
        """
        return iter(list(self._ids))

    def add(self, ackId):
        ids = self._ids
        ids[ackId] = None
        ids.move_to_end(ackId)
        if len(ids) > self.limit:
            ids.popitem(last=False)


@implementer(IConnection)
class ReliableLink:
    """
    One reliable connection, attached to at most one WebSocket at a time.

    @param maxBuffered: unacknowledged bytes kept at most; a client that
        falls further behind is closed as a slow consumer.
    @param token, sequence, unacked, ackIds: the state of a link taken over
        from another node (cluster mode, L{broker.webpubsub.handover}): its
        reconnection token, last sequenceId, C{[(sequenceId, frame)]} and
        the ackIds its client used (oldest first).

    @ivar moving: true while the link is handed from one node to another:
        its admission and removal then are no C{connected} /
        C{disconnected} events (the client stays connected).
    @ivar forward: set on the node giving the link up: every delivery goes
        to C{forward(delivery)} instead (to the node taking it over).
    @ivar overlap: set on the node taking the link over while both nodes
        may receive its messages; C{overlap(delivery)} is true for a
        duplicate to drop.
    @ivar recentAcks: the L{RecentAckIds} of the client's accepted
        requests, whichever socket carried them (C{None} until the first:
        idle connections should cost little).
    """

    moving = False
    # The wire format of its frames: the client's subprotocol's.
    codec = subprotocols.JSON
    forward = None
    overlap = None
    # {group: [pending recoveries, held deliveries]} while a joinGroup
    # recovery is asynchronous (cluster mode; see protocol.py).
    holding = None
    recentAcks = None
    # Open group streams (broker.webpubsub.streams), made on the first.
    streams = None

    def __init__(self, registry, hubName, connectionId, userId, reactor, window, maxBuffered,
                 token=None, sequence=0, unacked=(), ackIds=()):
        self.registry = registry
        self.hubName = hubName
        self.connectionId = connectionId
        self.userId = userId
        self.reactor = reactor
        self.window = window
        self.maxBuffered = maxBuffered
        self.token = token or secrets.token_urlsafe(32)
        self.session = None
        self.protocol = None
        self._sequence = sequence
        self._unacked = OrderedDict(unacked)
        self._bufferedBytes = sum(len(f) for f in self._unacked.values())
        self._expiry = None
        self.closed = False
        if ackIds:
            self.recentAcks = RecentAckIds(ackIds)

    # -- IConnection ---------------------------------------------------------

    def deliver(self, delivery):
        if self.closed:
            return
        if self.forward is not None:
            self.forward(delivery)
            return
        if self.overlap is not None and self.overlap(delivery, True):
            return
        if self.holding and delivery.group in self.holding:
            self.holding[delivery.group][1].append(delivery)
            return
        self.append(delivery)

    def append(self, delivery):
        """
        Number C{delivery}, keep it until acknowledged and send it.
        """
        self._sequence += 1
        frame = self.codec.messageFrame(delivery, sequenceId=self._sequence)
        self._unacked[self._sequence] = frame
        self._bufferedBytes += len(frame)
        if self._bufferedBytes > self.maxBuffered:
            self.slowConsumer("too many unacknowledged messages")
            return
        if self.protocol is not None:
            self.protocol.sendMessage(frame, self.codec.binary)

    def slowConsumer(self, reason="slow consumer: output buffer exceeded"):
        """
        The client fell too far behind (unacknowledged bytes over the bound,
        or its socket's output buffer over it): close for good, counted.
        """
        if self.closed:
            return
        self.registry.slowConsumer(self)
        if self.session is not None:
            self.session.hub.stats.slowConsumerDrops += 1
        self.close(CloseCode.SLOW_CONSUMER, reason)

    def close(self, code, reason):
        """
        Close for good: the WebSocket if one is attached, and the session.
        """
        if self.closed:
            return
        self.closed = True
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.linkClosed(code, reason)
        self._end(reason)

    def describe(self):
        """
        The admin console's details: the attached WebSocket's (if any) and
        the messages waiting for the client's acknowledgement.
        """
        protocol = self.protocol
        if protocol is not None and hasattr(protocol, "describe"):
            info = protocol.describe()
        else:
            info = {"reliable": True, "attached": False}
        info["unacknowledged"] = len(self._unacked)
        return info

    # -- the client's side ---------------------------------------------------

    @property
    def unacknowledged(self):
        """
        How many messages the client has not acknowledged yet.
        """
        return len(self._unacked)

    def ack(self, sequenceId):
        """
        The client has every message up to C{sequenceId}.
        """
        unacked = self._unacked
        while unacked:
            first = next(iter(unacked))
            if first > sequenceId:
                break
            self._bufferedBytes -= len(unacked.pop(first))

    def checkToken(self, token):
        return hmac.compare_digest(self.token.encode(), (token or "").encode())

    def attach(self, protocol):
        """
        A WebSocket takes the connection over: every unacknowledged message
        is sent again, in order (the client drops those it already has by
        their sequenceId).
        """
        if self._expiry is not None:
            if self._expiry.active():
                self._expiry.cancel()
            self._expiry = None
        self.protocol = protocol
        binary = self.codec.binary
        for frame in list(self._unacked.values()):
            protocol.sendMessage(frame, binary)

    def detach(self, protocol, normal):
        """
        The WebSocket C{protocol} went away.  A normal close ends the
        connection; otherwise it waits for the client's return until the
        recovery window ends.
        """
        if self.protocol is not protocol or self.closed:
            return
        self.protocol = None
        if normal:
            self.closed = True
            self._end("closed by the client")
            return
        self.waitForClient()

    def waitForClient(self):
        """
        Detached: end the connection unless a client attaches within the
        recovery window.
        """
        if self._expiry is None or not self._expiry.active():
            self._expiry = self.reactor.callLater(self.window, self._expired)

    def _expired(self):
        self._expiry = None
        if not self.closed:
            self.closed = True
            self._end("not recovered within the recovery window")

    def _end(self, reason):
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        self._unacked.clear()
        self._bufferedBytes = 0
        self.registry.forget(self)
        if self.streams is not None:
            self.streams.closeAll("ConnectionClosed", "the sender's connection closed")
        session, self.session = self.session, None
        if session is not None:
            session.hub.remove(session, reason)


class ReliableLinks:
    """
    The reliable connections of one factory, by (hub, connectionId), so a
    reconnecting client finds its own.
    """

    def __init__(self, reactor, window, maxBuffered):
        self.reactor = reactor
        self.window = window
        self.maxBuffered = maxBuffered
        self._links = {}
        self.slowConsumers = 0

    def new(self, hubName, connectionId, userId, **state):
        link = ReliableLink(self, hubName, connectionId, userId, self.reactor, self.window,
                            self.maxBuffered, **state)
        self._links[(hubName, connectionId)] = link
        return link

    def get(self, hubName, connectionId):
        return self._links.get((hubName, connectionId))

    def __iter__(self):
        return iter(list(self._links.values()))

    def find(self, hubName, connectionId, token):
        """
        The link a reconnection names, if it exists and the token is its own.
        """
        link = self._links.get((hubName, connectionId))
        if link is None or link.closed or not link.checkToken(token):
            return None
        return link

    def forget(self, link):
        if self._links.get((link.hubName, link.connectionId)) is link:
            del self._links[(link.hubName, link.connectionId)]

    def slowConsumer(self, link):
        self.slowConsumers += 1

    def closeAll(self):
        for link in list(self._links.values()):
            link.close(CloseCode.GOING_AWAY, "broker shutting down")
