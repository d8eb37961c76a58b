# -*- test-case-name: tests.test_iot_lastvalue -*-
"""
Each device's last-known telemetry: what it last reported, when and over
which transport, so a central that just connected (C{GET
.../telemetry/last}) or a Web PubSub client that just joined
C{telemetry.<device>} (with C{iot.last_value_on_join}) need not wait for
the next reading.

Telemetry runs at tens of thousands of readings a second, so the hot path
only replaces an entry of a dict; the values that changed are written to
the store at most once per device per C{interval} seconds, all of them in
one batch (one SQLite transaction, or one round of HSETs to Redis).  A
value younger than the interval is lost with a crash; a stop flushes.
"""

from twisted.internet.defer import succeed
from twisted.logger import Logger
from zope.interface import Interface, implementer

from broker.core.interfaces import IHubObserver
from broker.core.message import FROM_GROUP, Delivery
from broker.iot import errors

log = Logger()

TRANSPORTS = ("tcp", "udp")


class ILastValueStore(Interface):
    """
    Where the last values are kept durably: the SQLite store on one node,
    Redis (one hash per fleet) in cluster mode.
    """

    def saveLastValues(rows):
        """
        Record C{rows}, a list of C{(fleet, deviceId, payload, received,
        via)}; at most one row per device.  A row older (by C{received})
        than the stored value of its device does not replace it (another
        cluster node may have written a newer one).

        @return: a Deferred firing when they are stored.
        """

    def lastValue(fleet, deviceId):
        """
        @return: a Deferred firing with C{(payload, received, via)} or
            C{None} when the device has reported nothing.
        """


class LastValues:
    """
    The last values in memory, flushed to an L{ILastValueStore}.

    @param shared: whether other nodes write the same store (cluster
        mode): then a read asks the store too and the newer answer wins;
        on one node the memory is never older than the store.
    """

    def __init__(self, reactor, store, interval=1.0, shared=False, quietLog=None):
        self.reactor = reactor
        self.store = store
        self.interval = interval
        self.shared = shared
        self.quietLog = quietLog
        self._values = {}       # (fleet, deviceId) -> (payload, received, via)
        self._dirty = {}        # the same, not yet written
        self._flush = None
        self.stopped = False
        self.stats = {"lastValueWrites": 0, "lastValueBatches": 0}

    def record(self, fleet, deviceId, payload, received, via):
        """
        Accepted telemetry of a device (the hot path: no I/O).
        """
        k = (fleet, deviceId)
        self._values[k] = self._dirty[k] = (payload, received, via)
        if self._flush is None and not self.stopped:
            self._flush = self.reactor.callLater(self.interval, self.flush)

    def cached(self, fleet, deviceId):
        """
        The value this node saw last, or C{None}.
        """
        return self._values.get((fleet, deviceId))

    def get(self, fleet, deviceId):
        """
        @return: a Deferred firing with C{(payload, received, via)} or
            C{None}.
        """
        local = self._values.get((fleet, deviceId))
        if local is not None and not self.shared:
            return succeed(local)

        def newest(stored):
            if stored is None or (local is not None and local[1] >= stored[1]):
                return local
            return stored
        return self.store.lastValue(fleet, deviceId).addCallback(newest)

    def flush(self):
        """
        Write the values that changed since the last flush, in one batch.
        If the store fails they are kept (unless newer ones came) and tried
        again after the interval.
        """
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        if not self._dirty:
            return succeed(None)
        batch, self._dirty = self._dirty, {}
        rows = [(f, d, p, r, v) for (f, d), (p, r, v) in batch.items()]
        self.stats["lastValueBatches"] += 1

        def written(_):
            self.stats["lastValueWrites"] += len(rows)

        def failed(f):
            for k, v in batch.items():
                self._dirty.setdefault(k, v)
            if self.quietLog is not None:
                self.quietLog.info(("iot", "lastvalue", f.value.__class__.__name__),
                                   "iot: writing {n} last telemetry values failed "
                                   "(retried): {why}", n=len(rows), why=f.getErrorMessage())
            else:
                log.warn("iot: writing last telemetry values failed: {why}",
                         why=f.getErrorMessage())
            if self._flush is None and not self.stopped:
                self._flush = self.reactor.callLater(self.interval, self.flush)
        return self.store.saveLastValues(rows).addCallbacks(written, failed)

    def stop(self):
        """
        The broker stops: write what is pending (a Deferred).
        """
        self.stopped = True
        return self.flush()


def lastValueJSON(deviceId, value, toJSON):
    """
    The API's answer for a device's last value.
    """
    payload, received, via = value
    return {"id": deviceId, "payload": toJSON(payload), "received": received, "via": via}


@implementer(IHubObserver)
class LastValueOnJoin:
    """
    A hub observer of a fleet's hub: a connection that joins
    C{telemetry.<device>} is sent the device's last value first, as the
    same group message a live reading is, to that connection only.
    """

    PREFIX = "telemetry."

    def __init__(self, concentrator):
        self.c = concentrator

    def connectionAdded(self, hub, session):
        pass

    def connectionRemoved(self, hub, session, reason):
        pass

    def clientEvent(self, hub, session, event, message):
        pass

    def groupJoined(self, hub, session, group):
        if not group.startswith(self.PREFIX):
            return
        fleet, deviceId = hub.name, group[len(self.PREFIX):]
        values = self.c.lastValues
        if self.c.registry.device(fleet, deviceId) is None:
            return
        local = values.cached(fleet, deviceId)
        if local is not None and not values.shared:
            self._deliver(session, group, local)
            return

        def found(value):
            # A live reading that arrived meanwhile already reached the
            # member: an older value must not follow it.
            if value is None or values.cached(fleet, deviceId) not in (None, local):
                return
            self._deliver(session, group, value)
        values.get(fleet, deviceId).addCallbacks(found, self._failed, errbackArgs=(fleet,))

    def _failed(self, f, fleet):
        if f.check(errors.Unavailable) and self.c.core.quietLog is not None:
            self.c.core.quietLog.info(("iot", "lastvalue", "join"),
                                      "iot: no last value on join in {fleet}: {why}",
                                      fleet=fleet, why=f.getErrorMessage())
            return
        log.failure("iot: last value on join in {fleet}", f, fleet=fleet)

    @staticmethod
    def _deliver(session, group, value):
        if session.open and group in session.groups:
            session.connection.deliver(Delivery(value[0].toMessage(), FROM_GROUP, group))
