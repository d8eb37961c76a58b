# -*- test-case-name: tests.test_webpubsub_history -*-
"""
Optional per-group message history, so a client that lost its connection
can rejoin a group and get what it missed (beyond Azure; its users ask for
it in Azure/azure-webpubsub #183, #198, #325).

Each group of a hub with history on keeps a bounded ring of its recent
messages, by count and by age.  Every message published to the group gets a
position: an C{epoch} (random, new whenever the ring is created, so after a
restart or an eviction old positions are recognisably stale) and an
C{offset} (1, 2, 3... within the epoch).  JSON clients see the position on
each group message (C{"history": {"epoch": ..., "offset": ...}}) and may
rejoin with it::

    {"type": "joinGroup", "group": "g", "ackId": 7,
     "history": {"epoch": "...", "offset": 41}}

The broker then sends, before the ack, one system frame::

    {"type": "system", "event": "groupHistory", "group": "g",
     "epoch": "...", "offset": 45, "recovered": true}

followed by the missed messages (offsets 42 to 45), then live ones.
C{recovered} is C{false} (with a C{reason}) when the broker cannot prove
that nothing was lost: history off, an unknown or stale epoch, or messages
that aged out of the ring; whatever the ring still holds after the offset
is sent all the same.  C{"history": {}} asks only for the position.

Memory: at most C{max_messages} per group and C{max_groups} groups per hub
(least recently written evicted first); each entry holds the published
L{Delivery} (payload and its encoded frame).
"""

import secrets
from collections import OrderedDict, deque

from twisted.internet.defer import succeed

from broker.core.errors import BadRequest

EVENT = "groupHistory"
MAX_EPOCH_LENGTH = 64


class _Ring:
    __slots__ = ("epoch", "offset", "entries")

    def __init__(self):
        self.epoch = secrets.token_urlsafe(9)
        self.offset = 0
        self.entries = deque()   # (offset, time, delivery, excluded)


class HubHistory:
    """
    The history rings of one hub; installed as C{hub.history}, which the
    hub calls for every group publish (L{record}).

    @param clock: C{callable() -> float}, seconds (the reactor's C{seconds}).
    """

    def __init__(self, maxMessages, maxAge, maxGroups, clock):
        if maxMessages < 1:
            raise ValueError("maxMessages must be positive")
        self.maxMessages = maxMessages
        self.maxAge = maxAge
        self.maxGroups = maxGroups
        self.clock = clock
        self._rings = OrderedDict()   # group -> _Ring, least recently written first

    def _ring(self, group):
        ring = self._rings.get(group)
        if ring is None:
            ring = self._rings[group] = _Ring()
            while len(self._rings) > self.maxGroups:
                self._rings.popitem(last=False)
        return ring

    def _expire(self, ring, now):
        if self.maxAge:
            entries = ring.entries
            limit = now - self.maxAge
            while entries and entries[0][1] < limit:
                entries.popleft()

    def record(self, target, delivery):
        ring = self._ring(target.name)
        self._rings.move_to_end(target.name)
        ring.offset += 1
        delivery.history = (ring.epoch, ring.offset)
        now = self.clock()
        ring.entries.append((ring.offset, now, delivery, target.excluded))
        if len(ring.entries) > self.maxMessages:
            ring.entries.popleft()
        self._expire(ring, now)

    def position(self, group):
        """
        C{(epoch, offset)} of the last message of C{group}.
        """
        ring = self._ring(group)
        return ring.epoch, ring.offset

    def since(self, group, epoch, offset, connectionId=None):
        """
        What C{group} published after C{(epoch, offset)}.

        @return: C{(recovered, reason, deliveries)}; C{recovered} is true
            only when every message after the offset is still held.
        """
        ring = self._ring(group)
        if epoch != ring.epoch:
            return False, "unknown epoch: the group's history was reset", []
        if offset > ring.offset:
            return False, "offset is ahead of the group's history", []
        self._expire(ring, self.clock())
        out = [d for off, _, d, excluded in ring.entries
               if off > offset and connectionId not in excluded]
        oldest = ring.entries[0][0] if ring.entries else ring.offset + 1
        if oldest > offset + 1:
            return False, "some missed messages are no longer held", out
        return True, None, out


def parsePosition(value):
    """
    Validate the C{history} field of a joinGroup request.

    @return: C{(epoch, offset)}, or C{(None, None)} for C{{}}.
    @raise BadRequest: for anything else.
    """
    if not isinstance(value, dict):
        raise BadRequest("history must be an object")
    epoch = value.get("epoch")
    offset = value.get("offset")
    if epoch is None and offset is None:
        return None, None
    if not isinstance(epoch, str) or not epoch or len(epoch) > MAX_EPOCH_LENGTH:
        raise BadRequest("history.epoch must be a non-empty string")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise BadRequest("history.offset must be a non-negative integer")
    return epoch, offset


def recover(hub, group, position, connectionId):
    """
    The answer to a joinGroup with C{history}: the system frame (a JSON
    value) and the deliveries to replay, oldest first.
    """
    epoch, offset = position
    frame = {"type": "system", "event": EVENT, "group": group}
    history = hub.history
    if history is None:
        frame.update(recovered=False, reason="history is off for this hub")
        return frame, []
    if epoch is None:
        missed = []
    else:
        recovered, reason, missed = history.since(group, epoch, offset, connectionId)
        frame["recovered"] = recovered
        if reason:
            frame["reason"] = reason
    frame["epoch"], frame["offset"] = history.position(group)
    return frame, missed


def recoverAsync(hub, group, position, connectionId):
    """
    L{recover} for a history that may live elsewhere (cluster mode,
    L{broker.webpubsub.redishistory}).

    @return: a L{Deferred} of C{(frame, missed, current)}, C{current} being
        the group's C{(epoch, offset)} when the frame was made, or C{None}
        when unknown; it never fails.
    """
    history = hub.history
    if not getattr(history, "remote", False):
        frame, missed = recover(hub, group, position, connectionId)
        current = (frame["epoch"], frame["offset"]) if "epoch" in frame else None
        return succeed((frame, missed, current))
    epoch, offset = position

    def answered(result):
        recovered, reason, missed, current = result
        frame = {"type": "system", "event": EVENT, "group": group}
        if recovered is not None:
            frame["recovered"] = recovered
        if reason:
            frame["reason"] = reason
        if current is None:
            frame["recovered"] = False
        else:
            frame["epoch"], frame["offset"] = current
        return frame, missed, current
    return history.sinceAsync(group, epoch, offset, connectionId).addCallback(answered)


def installHistory(core, hubsConfig, clock):
    """
    Give each hub whose C{[webpubsub.hubs.<name>]} table sets
    C{history_messages} its L{HubHistory}, now and when it is created.
    """
    def setup(hub):
        cfg = hubsConfig.get(hub.name)
        if cfg and cfg["history_messages"]:
            hub.history = HubHistory(cfg["history_messages"], cfg["history_max_age"],
                                     cfg["history_groups"], clock)

    core.onNewHub(setup)
