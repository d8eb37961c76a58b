# -*- test-case-name: tests.test_iot_feedback -*-
"""
Delivery feedback of the messages queued for devices.

A central that queued a message (C{202 {"messageId"}}) learns its outcome:
each queued message ends I{delivered} (the device ACKed it), I{expired}
(its TTL ran out; found by the store's periodic purge) or I{purged} (the
central deleted it through the API).  Each outcome is

  - sent to the central as a C{MESSAGE_STATUS} event (frame 0x34, webhook
    kind C{message_status}) through the fleet's durable central queue
    (L{broker.iot.forward}), so a central that is away gets them later,
    in order with the device's other events; the payload is JSON
    C{{"messageId": str, "device": str, "status": str, "at": seconds}};
  - kept in a bounded per-fleet record (L{OutcomeLog}, the newest
    C{iot.max_outcomes} per fleet, in this node's memory), which answers
    C{GET .../messages/{id}} once the message has left the queue.

A message still in the store is I{queued} (or I{expired} once its TTL ran
out, before the purge removes it); one neither queued nor in the record is
I{unknown}.
"""

from collections import OrderedDict

from twisted.internet.defer import fail

from broker.iot import errors, frames
from broker.iot.forward import CENTRAL_QUEUE
from broker.iot.frames import Payload

QUEUED = "queued"
DELIVERED = "delivered"
EXPIRED = "expired"
PURGED = "purged"
UNKNOWN = "unknown"

# At most this many queued messages are listed (a device's queue is bounded
# by iot.max_queue_depth anyway).
LIST_LIMIT = 10000


class OutcomeLog:
    """
    The newest C{perFleet} outcomes of each fleet:
    C{(deviceId, messageId) -> (status, at)}.
    """

    def __init__(self, perFleet=10000):
        self.perFleet = perFleet
        self._fleets = {}

    def record(self, fleet, deviceId, messageId, status, at):
        kept = self._fleets.setdefault(fleet, OrderedDict())
        k = (deviceId, messageId)
        kept.pop(k, None)
        kept[k] = (status, at)
        while len(kept) > self.perFleet:
            kept.popitem(last=False)

    def get(self, fleet, deviceId, messageId):
        return self._fleets.get(fleet, {}).get((deviceId, messageId))


def statusPayload(messageId, deviceId, status, at):
    return Payload.json({"messageId": str(messageId), "device": deviceId,
                         "status": status, "at": at})


class Feedback:
    """
    The outcomes of a concentrator's queued messages.

    @param concentrator: the L{broker.iot.concentrator.Concentrator}.
    @param maxOutcomes: outcomes remembered per fleet.
    """

    def __init__(self, concentrator, maxOutcomes=10000):
        self.c = concentrator
        self.outcomes = OutcomeLog(maxOutcomes)
        self.stats = concentrator.stats
        self.stats.update(dict.fromkeys(("messagesExpired", "messagesPurged"), 0))

    def outcome(self, fleet, deviceId, messageIds, status):
        """
        Messages of a device's queue reached C{status}: record them and
        tell the central (in id order).  Never raises.
        """
        if deviceId == CENTRAL_QUEUE:
            return
        at = self.c.wallClock()
        for messageId in messageIds:
            self.outcomes.record(fleet, deviceId, messageId, status, at)
            if self.c.forwarder.reachable(fleet):
                self.c.forwarder.forward(
                    fleet, frames.MESSAGE_STATUS, deviceId,
                    statusPayload(messageId, deviceId, status, at)).addErrback(
                    self.c.forwarder._lost, "message status", fleet, deviceId)

    def expired(self, rows):
        """
        The store's purge deleted C{rows}, C{(fleet, deviceId, messageId)}.
        """
        for fleet, deviceId, messageId in rows:
            if deviceId != CENTRAL_QUEUE:
                self.stats["messagesExpired"] += 1
                self.outcome(fleet, deviceId, [messageId], EXPIRED)

    # -- the API ----------------------------------------------------------

    def _check(self, fleet, deviceId):
        if self.c.registry.device(fleet, deviceId) is None:
            raise errors.UnknownDevice(f"fleet {fleet!r} has no device {deviceId!r}")

    def queued(self, fleet, deviceId):
        """
        @return: a Deferred firing with the device's unexpired queued
            messages, C{[{"messageId", "size", "enqueued", "expires"}]},
            oldest first (UnknownDevice if it does not exist).
        """
        try:
            self._check(fleet, deviceId)
        except errors.IoTError as e:
            return fail(e)
        now = self.c.wallClock()
        return self.c.store.listQueued(fleet, deviceId, LIST_LIMIT).addCallback(
            lambda rows: [{"messageId": str(i), "size": size, "enqueued": enq,
                           "expires": exp} for i, size, enq, exp in rows if exp > now])

    def state(self, fleet, deviceId, messageId):
        """
        @return: a Deferred firing with C{{"messageId", "device", "status"}}
            (plus C{"at"} for an outcome, C{"expires"} for a queued one).
        """
        try:
            self._check(fleet, deviceId)
        except errors.IoTError as e:
            return fail(e)
        now = self.c.wallClock()

        def found(rows):
            base = {"messageId": str(messageId), "device": deviceId}
            for i, _, _, exp in rows:
                if i == messageId:
                    if exp > now:
                        return dict(base, status=QUEUED, expires=exp)
                    return dict(base, status=EXPIRED, at=exp)
            known = self.outcomes.get(fleet, deviceId, messageId)
            if known is not None:
                return dict(base, status=known[0], at=known[1])
            return dict(base, status=UNKNOWN)
        return self.c.store.listQueued(fleet, deviceId, LIST_LIMIT).addCallback(found)

    def purge(self, fleet, deviceId, messageId=None):
        """
        Delete one queued message (or, with None, all of the device's);
        each yields a C{purged} outcome.

        @return: a Deferred firing with the ids purged (str).
        """
        try:
            self._check(fleet, deviceId)
        except errors.IoTError as e:
            return fail(e)

        def removed(ids):
            self.stats["messagesPurged"] += len(ids)
            self.outcome(fleet, deviceId, ids, PURGED)
            return [str(i) for i in ids]
        d = self.c.store.remove(fleet, deviceId, None if messageId is None else [messageId])
        return d.addCallback(removed)
