# -*- test-case-name: tests.test_iot_forward -*-
"""
Device -> central store-and-forward.

What a device sends its central (MESSAGEs, presence events, the delivery
feedback of its queued messages (L{broker.iot.feedback}) and, when
C{iot.forward_telemetry} is on, telemetry) must not be lost because the
central is away: a central that restarts, or a webhook down for a deploy,
gets it all once it is back, in order, each event with its durable id.

Each fleet has one durable FIFO, the I{central queue}: the fleet's queue
in the L{broker.iot.interfaces.IMessageStore} under the device id
L{CENTRAL_QUEUE} (C{""}, which no device can have), so SQLite on one node
and Redis in cluster mode keep it exactly as they keep device queues, with
the same TTL, a depth limit (C{iot.max_central_queue_depth}) and
C{QUEUE_FULL}.  Each entry is an I{envelope} (L{encodeEvent}): the frame
kind, the device id and the typed payload.

An event goes straight to the central (requestId 0, no ACK expected, as
before) only when a central TCP session is connected on this node and its
queue is drained and idle: otherwise it is written to the queue first, and
only then is the device's MESSAGE acknowledged.  The queue is drained by
one L{CentralOutbox}:

  - to a central session: up to C{window} frames in flight, each carrying
    its durable id as requestId, removed when the central ACKs it (the
    same ACK frame devices use);
  - to the webhook: one event at a time (so they arrive in order), removed
    when the webhook answers 2xx (or refuses it with a 4xx: a central that
    refuses an event will refuse it again; it is counted and logged); a
    webhook that keeps failing is retried with backoff, never skipped.

In cluster mode the node holding the fleet's newest central session drains
the queue; with no central session anywhere, the node holding a short
Redis lease (L{broker.iot.clustered}) drains it to the webhook.
"""

import struct

from twisted.internet import defer
from twisted.logger import Logger

from broker.iot import errors, frames
from broker.iot.frames import Payload

log = Logger()

# The store's device id of a fleet's central queue (device ids are 1 to
# 255 bytes, so no device has it).
CENTRAL_QUEUE = ""

DEVICE_CONNECTED = frames.DEVICE_CONNECTED
DEVICE_DISCONNECTED = frames.DEVICE_DISCONNECTED

# The reasons of DEVICE_DISCONNECTED, from the CLOSE code the session ended
# with (anything else, or none: the peer closed or the connection broke).
REASONS = {"DEAD": "dead", "REPLACED": "replaced", "KEY_REVOKED": "key_revoked",
           "SHUTDOWN": "shutdown"}
CLOSED = "closed"

# Webhook event kinds by frame kind.
WEBHOOK_KINDS = {frames.MESSAGE: "message", frames.TELEMETRY: "telemetry",
                 DEVICE_CONNECTED: "device_connected",
                 DEVICE_DISCONNECTED: "device_disconnected",
                 frames.MESSAGE_STATUS: "message_status"}

_ENVELOPE = struct.Struct(">BBB")


def encodeEvent(kind, deviceId, payload):
    """
    The stored form of one device -> central event: a binary Payload of
    C{kind u8 | ptype u8 | len(device) u8 | device | payload}.
    """
    dev = deviceId.encode("utf-8")
    return Payload(frames.BINARY, _ENVELOPE.pack(kind, frames.PAYLOAD_CODES[payload.type],
                                                 len(dev)) + dev + payload.data)


def decodeEvent(stored):
    """
    @return: C{(kind, deviceId, Payload)} of an envelope.
    """
    data = stored.data
    kind, ptype, n = _ENVELOPE.unpack_from(data)
    start = _ENVELOPE.size
    deviceId = data[start:start + n].decode("utf-8")
    return kind, deviceId, Payload(frames.PAYLOAD_TYPES[ptype], data[start + n:])


def presencePayload(at, reason=None):
    value = {"at": at}
    if reason is not None:
        value["reason"] = reason
    return Payload.json(value)


class SessionOutbox:
    """
    Drains a fleet's central queue to a central TCP session: a device
    L{broker.iot.concentrator.Outbox} over the queue L{CENTRAL_QUEUE} (a
    central session's C{peerId} is C{""}), whose frames are the events of
    the envelopes.  It also knows when the queue is I{idle}: drained,
    nothing in flight, no push under way, so that a new event may go
    straight to the session without overtaking a stored one.
    """

    webhook = False

    def __init__(self, outbox, forwarder):
        self.box = outbox
        self.fw = forwarder
        self.session = outbox.session
        self.drained = False
        outbox.deliver = self._deliver
        outbox.afterRead = self._afterRead
        outbox.ackStat = "centralDelivered"

    def _deliver(self, messageId, stored):
        try:
            kind, deviceId, payload = decodeEvent(stored)
        except Exception:
            log.failure("iot: a stored central event {id} is corrupt; dropped", id=messageId)
            self.box.acked(messageId)
            return
        self.session.forwardEvent(kind, messageId, deviceId, payload)

    def _afterRead(self, rows, room):
        if len(rows) < room and not self.box.inflight:
            self.drained = True

    def idle(self):
        b = self.box
        return (self.drained and not b.inflight and not b._pumping and not b._acks
                and not self.fw.pushing.get(self.session.fleet))

    def pump(self):
        self.drained = False
        self.box.pump()

    def acked(self, messageId):
        return self.box.acked(messageId)

    def stop(self):
        self.box.stop()


class WebhookOutbox:
    """
    Drains a fleet's central queue to its webhook, one event at a time.
    """

    webhook = True
    BATCH = 32

    def __init__(self, forwarder, fleet, link):
        self.fw = forwarder
        self.c = forwarder.c
        self.fleet = fleet
        self.link = link
        self.closed = False
        self.running = False
        self.again = False
        self.failures = 0
        self._retry = None
        self._delivery = None

    def idle(self):
        return False

    def pump(self):
        if self.closed:
            return
        if self.running:
            self.again = True
            return
        if self._retry is not None:
            return      # waiting out a failure; the retry pumps
        self.running = True
        self.again = False
        self._run().addErrback(self._failed).addBoth(self._ran)

    def _ran(self, result):
        self.running = False
        if self.again and not self.closed and self._retry is None:
            self.pump()

    @defer.inlineCallbacks
    def _run(self):
        store = self.c.store
        afterId = 0
        while not self.closed:
            # Cluster mode: the lease is renewed before each batch, and a
            # node that lost it stops.
            mine = yield self.fw.mayDrain(self.fleet)
            if not mine or self.closed:
                return
            rows = yield store.pending(self.fleet, CENTRAL_QUEUE, afterId, self.BATCH)
            if not rows:
                return
            for messageId, stored in rows:
                if self.closed:
                    return
                try:
                    kind, deviceId, payload = decodeEvent(stored)
                except Exception:
                    log.failure("iot: a stored central event {id} is corrupt; dropped",
                                id=messageId)
                else:
                    self._delivery = self.link.forwardEvent(
                        self.fleet, WEBHOOK_KINDS[kind], deviceId, payload, messageId)
                    try:
                        yield self._delivery
                    except defer.CancelledError:
                        return
                    except errors.Refused as e:
                        self.fw.stats["centralRefused"] += 1
                        log.warn("iot: the webhook of {fleet} refused event {id} "
                                 "({code}); dropped", fleet=self.fleet, id=messageId,
                                 code=e.code)
                    finally:
                        self._delivery = None
                yield store.ack(self.fleet, CENTRAL_QUEUE, messageId)
                self.failures = 0
                self.fw.stats["centralDelivered"] += 1
                afterId = messageId

    def _failed(self, f):
        if self.closed:
            return
        self.failures += 1
        if f.check(errors.Unavailable):
            self.c.storeUnavailable("draining a central queue", f)
        elif not f.check(errors.IoTError):
            log.failure("iot: draining the central queue of {fleet}", f, fleet=self.fleet)
        base = max(getattr(self.link, "backoff", 1.0), 0.05)
        delay = min(getattr(self.link, "maxBackoff", 30.0) or 30.0,
                    base * 2 ** min(self.failures - 1, 16))
        self._retry = self.c.reactor.callLater(delay, self._retried)

    def _retried(self):
        self._retry = None
        self.pump()

    def acked(self, messageId):
        return False

    def stop(self):
        self.closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._delivery is not None:
            # Unacknowledged: delivered again by whoever drains next.
            self._delivery.cancel()


class Forwarder:
    """
    The device -> central half of a concentrator: routes each event
    straight to the central or through the fleet's central queue, and
    keeps the one L{CentralOutbox} per fleet that drains it.

    @param concentrator: the L{broker.iot.concentrator.Concentrator}.
    @param forwardTelemetry: store telemetry too (else it is sent to a
        connected central or webhook, or dropped, as before).
    @param maxDepth: events a fleet's central queue may hold.
    """

    def __init__(self, concentrator, forwardTelemetry=False, maxDepth=100000):
        self.c = concentrator
        self.forwardTelemetry = forwardTelemetry
        self.maxDepth = maxDepth
        # Until the face starts (its store may not be open yet) outboxes
        # are made but not pumped; see L{resume}.
        self.paused = False
        self.stopped = False
        self.boxes = {}          # fleet -> SessionOutbox or WebhookOutbox
        self.pushing = {}        # fleet -> pushes under way
        self.stats = concentrator.stats
        self.stats.update(dict.fromkeys((
            "centralQueued", "centralDirect", "centralDelivered", "centralRefused",
            "centralQueueFull", "telemetryDropped"), 0))

    # -- where a fleet's queue is drained to ------------------------------

    def reachable(self, fleet):
        """
        Whether a central may ever take the fleet's events: it has a
        central key or a webhook (else NO_CENTRAL, and nothing is kept).
        """
        return (self.c.registry.central(fleet) is not None
                or self.c._fallbacks.get(fleet) is not None)

    def refresh(self, fleet):
        """
        The fleet's centrals changed: drain its queue to its newest local
        central session, else (when no other node has one) to its webhook,
        else not here.
        """
        if self.stopped:
            return
        c = self.c
        session = c._localCentral(fleet)
        box = self.boxes.get(fleet)
        if session is not None:
            if box is not None and not box.webhook and box.session is session:
                return
            new = SessionOutbox(c.newOutbox(session), self)
        else:
            link = c._fallbacks.get(fleet)
            if link is None or c.remoteCentral(fleet):
                new = None
            elif box is not None and box.webhook and box.link is link:
                return
            else:
                new = WebhookOutbox(self, fleet, link)
        if box is not None:
            box.stop()
        if new is None:
            self.boxes.pop(fleet, None)
            return
        self.boxes[fleet] = new
        if not self.paused:
            new.pump()

    def refreshAll(self):
        for fleet in set(self.boxes) | set(self.c._centrals) | set(self.c._fallbacks):
            self.refresh(fleet)

    def pump(self, fleet):
        box = self.boxes.get(fleet)
        if box is not None and not self.paused:
            box.pump()

    def pumpAll(self):
        if self.paused:
            return
        for box in list(self.boxes.values()):
            box.pump()

    def resume(self):
        """
        The face started: drain what the queues kept across a restart.
        """
        self.paused = False
        self.pumpAll()

    def mayDrain(self, fleet):
        """
        Whether this node drains C{fleet}'s queue to its webhook (cluster
        mode: only the lease holder does).
        """
        return defer.succeed(True)

    def acked(self, session, messageId):
        box = self.boxes.get(session.fleet)
        if box is None or box.webhook or box.session is not session:
            return False
        return box.acked(messageId)

    # -- events -----------------------------------------------------------

    def forward(self, fleet, kind, deviceId, payload):
        """
        Hand one event to the central: at once when it can take it now,
        else through the central queue.

        @return: a Deferred firing once the event is sent or stored (only
            then may a device's MESSAGE be acknowledged); failing with
            NoCentral (the fleet has no central key nor webhook),
            QueueFull, Unavailable.
        """
        if not self.reachable(fleet):
            return defer.fail(errors.NoCentral(f"fleet {fleet!r} has no central"))
        box = self.boxes.get(fleet)
        if box is not None and box.idle() and box.session.state == box.session.OPEN:
            self.stats["centralDirect"] += 1
            box.session.forwardEvent(kind, 0, deviceId, payload)
            return defer.succeed(None)
        self.pushing[fleet] = self.pushing.get(fleet, 0) + 1
        d = self.c.store.push(fleet, CENTRAL_QUEUE, encodeEvent(kind, deviceId, payload),
                              self.c.queueTTL, self.maxDepth)

        def done(result):
            n = self.pushing[fleet] - 1
            if n:
                self.pushing[fleet] = n
            else:
                del self.pushing[fleet]
            return result

        def stored(messageId):
            self.stats["centralQueued"] += 1
            if fleet in self.boxes:
                self.pump(fleet)
            else:
                self.c.centralQueued(fleet)
            return None

        def full(f):
            if f.check(errors.QueueFull):
                self.stats["centralQueueFull"] += 1
                raise errors.QueueFull(
                    f"the central queue of fleet {fleet!r} holds {self.maxDepth} events")
            return f
        return d.addBoth(done).addCallbacks(stored, full)

    def presence(self, fleet, deviceId, connected, reason=None):
        """
        DEVICE_CONNECTED or DEVICE_DISCONNECTED (with its reason) of a
        device, in order with its messages.  Never raises.
        """
        if not self.reachable(fleet):
            return
        kind = DEVICE_CONNECTED if connected else DEVICE_DISCONNECTED
        payload = presencePayload(self.c.wallClock(), None if connected else reason)
        self.forward(fleet, kind, deviceId, payload).addErrback(
            self._lost, "presence", fleet, deviceId)

    def telemetry(self, fleet, deviceId, payload):
        self.forward(fleet, frames.TELEMETRY, deviceId, payload).addErrback(
            self._lost, "telemetry", fleet, deviceId)

    def _lost(self, f, what, fleet, deviceId):
        if what == "telemetry":
            self.stats["telemetryDropped"] += 1
        self.c.core.quietLog.info(
            ("iot", "forward", what, f.value.__class__.__name__),
            "iot: {what} of {fleet}/{device} for the central was dropped: {why}",
            what=what, fleet=fleet, device=deviceId, why=f.getErrorMessage())

    def stop(self):
        self.stopped = True
        for box in self.boxes.values():
            box.stop()
        self.boxes.clear()
