# -*- test-case-name: tests.test_iot_concentrator -*-
"""
The concentrator: the core of the IoT face.

It knows which devices and centrals are connected, routes requests and
messages between them, keeps messages for offline devices in the store,
hands out UDP tokens and publishes telemetry into the routing core.  The
TCP sessions (L{broker.iot.protocol}) and the HTTP API are thin adapters
over it.  Everything here is scoped by fleet (a fleet is a hub of the
core): nothing takes a device id without its fleet.
"""

import time

from twisted.internet.defer import fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from broker.core.message import Target
from broker.iot import errors, frames
from broker.iot.auth import newSecret
from broker.iot.feedback import DELIVERED, Feedback
from broker.iot.forward import CLOSED, REASONS, Forwarder
from broker.iot.interfaces import ICentralLink, IConcentrator
from broker.iot.lastvalue import LastValueOnJoin, LastValues
from broker.iot.udp import TokenBook

log = Logger()

# Ids the server gives its own direct messages live above this, so they
# never collide with store ids in a device's ACK space.
DIRECT_BASE = 1 << 62


def telemetryGroup(deviceId):
    """
    The core group a device's telemetry is published to, in its fleet's
    hub: a WebSocket client joins it to follow the device.
    """
    return "telemetry." + deviceId


class Outbox:
    """
    Delivers a device's stored messages over its session: in id order, at
    most C{window} unacknowledged at a time, each removed from the store
    only when the device ACKs it.
    """

    def __init__(self, concentrator, session, window):
        self.c = concentrator
        self.session = session
        self.window = window
        self.inflight = set()
        self.lastId = 0
        self._pumping = False
        self._again = False
        self._acks = []
        self._flush = None
        self.closed = False
        # What a row becomes on the wire, and who hears of each read (the
        # central queue's outbox, broker.iot.forward, sets both).
        self.deliver = session.sendMessage
        self.afterRead = None
        self.ackStat = "messagesAcked"
        # Told C{(ids, allThere)} once acknowledged messages left the store
        # (a device outbox: the concentrator's delivery feedback).
        self.onAcked = None
        self._room = 0

    def pump(self):
        if self.closed:
            return
        if self._acks and self._flush is None:
            # Acks the store could not take (cluster mode: Redis was away)
            # are retried first.
            self._flush = self.c.reactor.callLater(0, self._removeAcked)
        if self._pumping:
            self._again = True
            return
        room = self.window - len(self.inflight)
        if room <= 0:
            return
        self._pumping = True
        self._again = False
        self._room = room
        s = self.session
        d = self.c.store.pending(s.fleet, s.peerId, self.lastId, room)
        d.addCallbacks(self._send, self._failed)

    def _send(self, rows):
        self._pumping = False
        if self.closed:
            return
        for messageId, payload in rows:
            self.inflight.add(messageId)
            self.lastId = max(self.lastId, messageId)
            self.deliver(messageId, payload)
        if self.afterRead is not None and not self._again:
            self.afterRead(rows, self._room)
        if self._again or (rows and len(self.inflight) < self.window):
            self.pump()

    def _failed(self, f, what="reading"):
        self._pumping = False
        if f.check(errors.Unavailable):
            # Cluster mode, Redis away: delivery resumes after the resync.
            self.c.storeUnavailable(f"{what} a device's queue", f)
            return
        log.failure("iot: {what} the queue of {fleet}/{device}", f, what=what,
                    fleet=self.session.fleet, device=self.session.peerId)

    def acked(self, messageId):
        """
        The device acknowledged C{messageId}; C{False} if it was not ours.
        Acks that arrive in one reactor turn are removed from the store in
        one transaction (one fsync), which is what makes draining a queue
        fast.
        """
        if messageId not in self.inflight or messageId in self._acks:
            return False
        self._acks.append(messageId)
        if self._flush is None:
            self._flush = self.c.reactor.callLater(0, self._removeAcked)
        return True

    def _removeAcked(self):
        self._flush = None
        ids, self._acks = self._acks, []
        s = self.session
        c = self.c

        def removed(allThere):
            self.inflight.difference_update(ids)
            c.stats[self.ackStat] += len(ids)
            if self.onAcked is not None:
                self.onAcked(ids, allThere)
            self.pump()

        def failed(f):
            # Still in flight: removed at a later pump (an acknowledged
            # message must not come back, nor hold a slot of the window).
            self._acks = ids + self._acks
            self._failed(f, "acknowledging in")
        c.store.ack(s.fleet, s.peerId, *ids).addCallbacks(removed, failed)

    def stop(self):
        self.closed = True
        if self._flush is not None and self._flush.active():
            # Acks already received are still honoured.
            self._flush.cancel()
            self._removeAcked()


@implementer(IConcentrator)
class Concentrator:
    """
    @param core: the routing core (L{broker.core.router.Core}).
    @param registry: an L{broker.iot.interfaces.IDeviceRegistry}.
    @param store: an L{broker.iot.interfaces.IMessageStore}.
    """

    def __init__(self, reactor, core, registry, store, requestTimeout=30.0,
                 queueTTL=86400.0, maxQueueDepth=1000, tokenTTL=300.0, tokenBatch=64,
                 window=32, tokens=None, forwardTelemetry=False,
                 maxCentralQueueDepth=100000, wallClock=time.time, maxOutcomes=10000,
                 lastValueInterval=1.0, lastValueOnJoin=False):
        self.reactor = reactor
        self.core = core
        self.registry = registry
        self.store = store
        self.requestTimeout = requestTimeout
        self.queueTTL = queueTTL
        self.maxQueueDepth = maxQueueDepth
        self.tokenBatch = tokenBatch
        self.window = window
        self.wallClock = wallClock
        # An ITokenBook: in memory on one node, in Redis in cluster mode.
        self.tokens = tokens if tokens is not None else TokenBook(tokenTTL,
                                                                  clock=reactor.seconds)
        self._devices = {}       # (fleet, deviceId) -> session
        self._outboxes = {}      # (fleet, deviceId) -> Outbox
        self._centrals = {}      # fleet -> [session], newest last
        self._fallbacks = {}     # fleet -> ICentralLink
        self._directId = DIRECT_BASE
        self._telemetryTargets = {}     # deviceId -> Target, built once
        self.stats = dict.fromkeys((
            "requestsToDevices", "requestsToCentral", "requestTimeouts", "messagesQueued",
            "messagesDirect", "messagesAcked", "queueFull", "telemetryAccepted",
            "groupMessages", "forbidden"), 0)
        # Device -> central events: straight to the central, or through
        # the fleet's durable central queue.
        self.forwarder = Forwarder(self, forwardTelemetry, maxCentralQueueDepth)
        # Delivery feedback of device queues (broker.iot.feedback).
        self.feedback = Feedback(self, maxOutcomes)
        # Each device's last telemetry (broker.iot.lastvalue), and the hub
        # observer sending it to a connection joining telemetry.<device>.
        self.lastValues = LastValues(reactor, store, lastValueInterval,
                                     shared=self.sharedStore,
                                     quietLog=getattr(core, "quietLog", None))
        if lastValueOnJoin:
            # Every hub: a fleet's hub may be created after this (the
            # observer ignores groups of devices not in the registry).
            onJoin = LastValueOnJoin(self)
            core.onNewHub(lambda hub: hub.addObserver(onJoin))

    # Whether other nodes write the store too (cluster mode).
    sharedStore = False

    # -- sessions (called by broker.iot.protocol) ---------------------------

    def deviceOnline(self, session):
        """
        A device authenticated: replace any older session of it, start
        delivering its queue and give it UDP tokens.
        """
        k = (session.fleet, session.peerId)
        old = self._devices.get(k)
        if old is not None and old is not session:
            self.deviceOffline(old, "replaced")
            old.close("REPLACED", "a newer session of this device authenticated")
        self._devices[k] = session
        self.forwarder.presence(session.fleet, session.peerId, True)
        box = self._outboxes[k] = self.newOutbox(session)
        box.onAcked = lambda ids, allThere: self._delivered(k[0], k[1], ids, allThere)
        # A new session gets a fresh batch; the previous session's tokens
        # die with it.
        self.tokens.revoke(session.fleet, session.peerId)
        self.refillTokens(session.fleet, session.peerId)
        box.pump()

    def _delivered(self, fleet, deviceId, ids, allThere):
        """
        The device ACKed C{ids}.  When some were no longer in the store
        (purged or expired while in flight), those that already have an
        outcome here are not reported again.
        """
        if not allThere:
            ids = [i for i in ids if self.feedback.outcomes.get(fleet, deviceId, i) is None]
        self.feedback.outcome(fleet, deviceId, ids, DELIVERED)

    def newOutbox(self, session):
        return Outbox(self, session, self.window)

    def deviceOffline(self, session, reason=None):
        """
        The device's session is gone (C{reason}: a DEVICE_DISCONNECTED
        reason; by default from the CLOSE code the session ended with).
        """
        k = (session.fleet, session.peerId)
        if self._devices.get(k) is session:
            del self._devices[k]
            box = self._outboxes.pop(k, None)
            if box is not None:
                box.stop()
            if reason is None:
                reason = REASONS.get(getattr(session, "closeCode", None), CLOSED)
            self.forwarder.presence(session.fleet, session.peerId, False, reason)

    def centralOnline(self, session):
        self._centrals.setdefault(session.fleet, []).append(session)
        self.forwarder.refresh(session.fleet)

    def centralOffline(self, session):
        sessions = self._centrals.get(session.fleet)
        if sessions and session in sessions:
            sessions.remove(session)
            if not sessions:
                del self._centrals[session.fleet]
            self.forwarder.refresh(session.fleet)

    def _localCentral(self, fleet):
        sessions = self._centrals.get(fleet)
        return sessions[-1] if sessions else None

    def remoteCentral(self, fleet):
        """
        Whether another node holds a central session of C{fleet} (cluster
        mode); that node drains the fleet's central queue.
        """
        return False

    def centralQueued(self, fleet):
        """
        An event was stored in C{fleet}'s central queue and no outbox here
        drains it (cluster mode: the node that does is told).
        """

    def stop(self):
        """
        The face stops: the central outboxes' timers are cancelled, the
        pending last values written (a Deferred).
        """
        self.forwarder.stop()
        return self.lastValues.stop()

    def lastValue(self, fleet, deviceId):
        """
        @return: a Deferred firing with the device's last telemetry,
            C{(payload, received, via)}; failing with UnknownDevice, or
            NoValue when it has reported nothing.
        """
        try:
            self._device(fleet, deviceId)
        except errors.IoTError as e:
            return fail(e)

        def found(value):
            if value is None:
                raise errors.NoValue(f"device {deviceId!r} has reported no telemetry")
            return value
        return self.lastValues.get(fleet, deviceId).addCallback(found)

    def storeUnavailable(self, what, f):
        """
        The store could not be reached for C{what} (cluster mode: Redis is
        away); the operation is retried later.
        """
        log.warn("iot: {what} failed: {why}", what=what, why=f.getErrorMessage())

    def isOnline(self, fleet, deviceId):
        return (fleet, deviceId) in self._devices

    def acked(self, session, messageId):
        if not session.peerId:
            return self.forwarder.acked(session, messageId)
        box = self._outboxes.get((session.fleet, session.peerId))
        return box is not None and box.session is session and box.acked(messageId)

    def refillTokens(self, fleet, deviceId, force=False):
        """
        Top the device's live tokens up to C{tokenBatch} once they fall to
        half of it (or now, when the device asks with C{force}).
        """
        session = self._devices.get((fleet, deviceId))
        if session is None:
            return
        have = self.tokens.outstanding(fleet, deviceId)
        if have > self.tokenBatch // 2 and not force:
            return
        n = self.tokenBatch - have
        if n > 0:
            session.sendTokens(self.tokens.ttl, self.tokens.issue(fleet, deviceId, n))

    def _device(self, fleet, deviceId):
        if self.registry.device(fleet, deviceId) is None:
            raise errors.UnknownDevice(f"fleet {fleet!r} has no device {deviceId!r}")
        return self._devices.get((fleet, deviceId))

    # -- central -> device --------------------------------------------------

    def request(self, fleet, deviceId, payload, timeout=None):
        try:
            session = self._device(fleet, deviceId)
        except errors.IoTError as e:
            return fail(e)
        if session is None:
            return fail(errors.DeviceOffline(f"device {deviceId!r} is not connected"))
        self.stats["requestsToDevices"] += 1
        d = session.request(payload, self.requestTimeout if timeout is None else timeout)
        d.addErrback(self._countTimeout)
        return d

    def _countTimeout(self, f):
        if f.check(errors.RequestTimeout):
            self.stats["requestTimeouts"] += 1
        return f

    def send(self, fleet, deviceId, payload, queue=True):
        try:
            session = self._device(fleet, deviceId)
        except errors.IoTError as e:
            return fail(e)
        if not queue:
            if session is None:
                return fail(errors.DeviceOffline(f"device {deviceId!r} is not connected"))
            self._directId += 1
            session.sendMessage(self._directId, payload)
            self.stats["messagesDirect"] += 1
            return succeed((str(self._directId), False))
        d = self.store.push(fleet, deviceId, payload, self.queueTTL, self.maxQueueDepth)

        def stored(messageId):
            self.stats["messagesQueued"] += 1
            box = self._outboxes.get((fleet, deviceId))
            if box is not None:
                box.pump()
                return str(messageId), False
            return self._queuedOffline(fleet, deviceId, messageId)

        def full(f):
            if f.check(errors.QueueFull):
                self.stats["queueFull"] += 1
            return f
        return d.addCallbacks(stored, full)

    def _queuedOffline(self, fleet, deviceId, messageId):
        """
        A message was stored for a device with no session here.

        @return: C{(messageId, queued)} (or a Deferred of it): C{queued}
            true while the message waits for the device to connect.
        """
        return str(messageId), True

    def devices(self, fleet):
        ids = self.registry.fleetDevices(fleet)

        def listed(depths):
            return [{"id": i, "online": (fleet, i) in self._devices,
                     "queueDepth": depths.get(i, 0)} for i in ids]
        return self.store.depths(fleet).addCallback(listed)

    def deviceStatus(self, fleet, deviceId):
        """
        @return: a Deferred firing with C{{"id", "online", "queueDepth"}}
            of one device (UnknownDevice if it does not exist).
        """
        return self.queueDepth(fleet, deviceId).addCallback(
            lambda depth: {"id": deviceId, "online": self.isOnline(fleet, deviceId),
                           "queueDepth": depth})

    def queueDepth(self, fleet, deviceId):
        try:
            self._device(fleet, deviceId)
        except errors.IoTError as e:
            return fail(e)
        return self.store.depth(fleet, deviceId)

    def issueKey(self, fleet, deviceId):
        if not isinstance(deviceId, str) or not deviceId or len(deviceId.encode()) > 255:
            return fail(errors.BadRequest("a device id is 1 to 255 bytes of UTF-8"))
        secret = newSecret()

        def recorded(_):
            self.registry.issued(fleet, deviceId, secret)
            self._dropDevice(fleet, deviceId, "the device's key was replaced")
            return secret
        return self.store.setKey(fleet, deviceId, secret).addCallback(recorded)

    def revokeKey(self, fleet, deviceId):
        if self.registry.device(fleet, deviceId) is None:
            return fail(errors.UnknownDevice(f"fleet {fleet!r} has no device {deviceId!r}"))

        def recorded(_):
            self.registry.issued(fleet, deviceId, None)
            self.tokens.revoke(fleet, deviceId)
            self._dropDevice(fleet, deviceId, "the device's key was revoked")
        return self.store.setKey(fleet, deviceId, None).addCallback(recorded)

    def registryChanged(self):
        """
        The registry was reloaded: close the sessions whose device or
        central is gone or now has another key (and forget the UDP tokens
        of those devices).
        """
        for (fleet, deviceId), session in list(self._devices.items()):
            entry = self.registry.device(fleet, deviceId)
            if entry is None or entry.key != session.entry.key:
                self.tokens.revoke(fleet, deviceId)
                self._dropDevice(fleet, deviceId, "the device's key changed or was removed")
        for fleet, sessions in list(self._centrals.items()):
            entry = self.registry.central(fleet)
            for session in list(sessions):
                if entry is None or entry.key != session.entry.key:
                    self.centralOffline(session)
                    session.close("KEY_REVOKED", "the central key changed or was removed")

    def _dropDevice(self, fleet, deviceId, why):
        session = self._devices.get((fleet, deviceId))
        if session is not None:
            self.deviceOffline(session, "key_revoked")
            session.close("KEY_REVOKED", why)

    # -- device -> central ---------------------------------------------------

    def setCentralFallback(self, fleet, link):
        if link is None:
            self._fallbacks.pop(fleet, None)
        else:
            self._fallbacks[fleet] = ICentralLink(link)
        self.forwarder.refresh(fleet)

    def centralLink(self, fleet):
        """
        The newest connected central session of C{fleet}, else its
        fallback link, else None.
        """
        sessions = self._centrals.get(fleet)
        if sessions:
            return sessions[-1]
        return self._fallbacks.get(fleet)

    def centralRequest(self, fleet, deviceId, payload, timeout=None):
        """
        A device's request to its central.

        @return: a Deferred firing with the central's Payload; failing with
            NoCentral, RequestTimeout, Refused.
        """
        link = self.centralLink(fleet)
        if link is None:
            return fail(errors.NoCentral(f"fleet {fleet!r} has no central connected"))
        self.stats["requestsToCentral"] += 1
        timeout = self.requestTimeout if timeout is None else timeout
        d = link.deviceRequest(fleet, deviceId, payload)

        def expired(result, t):
            return Failure(errors.RequestTimeout(f"the central did not answer in {t:g}s"))
        d.addTimeout(timeout, self.reactor, onTimeoutCancel=expired)
        return d.addErrback(self._countTimeout)

    def centralMessage(self, fleet, deviceId, payload):
        """
        A device's one-way message to its central.

        @return: a Deferred firing once the central has it or it is stored
            for it (see L{broker.iot.forward}); failing with NoCentral,
            QueueFull, Unavailable.
        """
        return self.forwarder.forward(fleet, frames.MESSAGE, deviceId, payload)

    def groupMessage(self, fleet, deviceId, group, payload):
        """
        Publish a device's message to a core group its registry entry
        allows.

        @raise Forbidden: for any other group.
        """
        entry = self.registry.device(fleet, deviceId)
        if entry is None or group not in entry.groups:
            self.stats["forbidden"] += 1
            raise errors.Forbidden(f"device {deviceId!r} may not publish to group {group!r}")
        self.stats["groupMessages"] += 1
        self.core.hub(fleet).send(Target(Target.GROUP, group), payload.toMessage())

    def telemetry(self, fleet, deviceId, payload, via="tcp"):
        """
        Accepted telemetry: into the device's telemetry group of its
        fleet's hub, and to the central.  Never raises.
        """
        self.stats["telemetryAccepted"] += 1
        self.lastValues.record(fleet, deviceId, payload, self.wallClock(), via)
        try:
            target = self._telemetryTargets.get(deviceId)
            if target is None:
                if len(self._telemetryTargets) > 100000:
                    self._telemetryTargets.clear()
                target = self._telemetryTargets[deviceId] = Target(
                    Target.GROUP, telemetryGroup(deviceId))
            self.core.hub(fleet).send(target, payload.toMessage())
            if self.forwarder.forwardTelemetry:
                self.forwarder.telemetry(fleet, deviceId, payload)
            else:
                link = self.centralLink(fleet)
                if link is not None:
                    link.telemetry(fleet, deviceId, payload)
        except Exception:
            log.failure("iot: publishing telemetry of {fleet}/{device}", fleet=fleet,
                        device=deviceId)
        if via == "udp" and self.tokens.outstanding(fleet, deviceId) <= self.tokenBatch // 2:
            self.refillTokens(fleet, deviceId)

    def onlineCount(self):
        return len(self._devices), sum(len(v) for v in self._centrals.values())
