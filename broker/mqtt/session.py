# -*- test-case-name: tests.test_mqtt_protocol -*-
"""
An MQTT session as the routing core sees it: one L{IConnection} that lives
as long as the MQTT session, not as long as one network connection.

A persistent session (3.1.1 clean session 0, 5.0 session expiry interval
above 0) stays admitted in its hub while its client is away, so its group
memberships and wildcard subscriptions keep receiving: QoS 1 and 2
messages are queued (bounded, and stored by L{broker.mqtt.store} so they
survive a restart), QoS 0 messages are dropped, as MQTT allows.  When the
client comes back (L{MqttSession.attach}), the unacknowledged messages are
sent again with DUP and the queue drains within the client's receive
maximum.
"""

import math
from collections import OrderedDict, deque

from zope.interface import implementer

from broker.core.interfaces import IConnection
from broker.mqtt import codec
from broker.mqtt.message import mqttView
from broker.mqtt.topics import matches

# Outgoing QoS 2 states.
SENT, RELEASED = 0, 1


class SubOptions:
    """One subscription of a session (MQTT 5.0 section 3.8.3.1)."""

    __slots__ = ("key", "filter", "share", "qos", "noLocal", "retainAsPublished",
                 "retainHandling", "subId", "wild")

    def __init__(self, key, filter, share, qos, noLocal=False, retainAsPublished=False,
                 retainHandling=0, subId=None, wild=False):
        self.key = key
        self.filter = filter
        self.share = share
        self.qos = qos
        self.noLocal = noLocal
        self.retainAsPublished = retainAsPublished
        self.retainHandling = retainHandling
        self.subId = subId
        self.wild = wild

    def toJSON(self):
        return [self.key, self.filter, self.share, self.qos, self.noLocal,
                self.retainAsPublished, self.retainHandling, self.subId, self.wild]

    @classmethod
    def fromJSON(cls, value):
        return cls(*value)


class OutMessage:
    """
    A QoS 1 or 2 message on its way to one session: queued, or in flight
    under packet identifier C{pid}.

    @ivar _template: C{(protocol version, PublishTemplate)} shared with the
        delivery's other receivers, or C{None} (made when sent).
    """

    __slots__ = ("topic", "payload", "qos", "retain", "props", "expiresAt", "subIds", "pid",
                 "state", "seq", "_template")

    def __init__(self, topic, payload, qos, retain, props, expiresAt, subIds=(), pid=None,
                 state=SENT, seq=None):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.props = props
        self.expiresAt = expiresAt
        self.subIds = tuple(subIds)
        self.pid = pid
        self.state = state
        self.seq = seq
        self._template = None

    def template(self, version, now):
        cached = self._template
        if cached is not None and cached[0] == version:
            return cached[1]
        return makeTemplate(self.topic, self.payload, self.qos, self.retain, self.props,
                            self.expiresAt, self.subIds, version, now)


def makeTemplate(topic, payload, qos, retain, props, expiresAt, subIds, version, now):
    properties = None
    if version == codec.V5:
        properties = dict(props)
        if expiresAt is not None:
            properties["message_expiry_interval"] = max(0, math.ceil(expiresAt - now))
        if subIds:
            properties["subscription_identifier"] = list(subIds)
    return codec.PublishTemplate(topic, payload, qos, retain, version, properties)


@implementer(IConnection)
class MqttSession:
    """
    @ivar protocol: the L{broker.mqtt.protocol.MqttProtocol} of the client
        while it is connected, else C{None}.
    @ivar core: the core L{broker.core.session.Session}.
    """

    def __init__(self, broker, hubName, clientId, connectionId, userId, identity, version):
        self.broker = broker
        self.hubName = hubName
        self.clientId = clientId
        self.connectionId = connectionId
        self.userId = userId
        self.identity = identity
        self.version = version
        self.protocol = None
        self.core = None
        self.subs = {}            # key as subscribed -> SubOptions
        self.exact = {}           # topic -> SubOptions (plain, no wildcard)
        self.patterns = {}        # key -> SubOptions (wildcards and shared)
        self.inflight = OrderedDict()   # pid -> OutMessage
        self.queue = deque()      # OutMessages waiting for the window or the client
        self.incoming = set()     # QoS 2 packet ids received, PUBREL not yet
        self._persistent = False
        self.expiryInterval = 0
        self.expiryCall = None
        self.will = None
        self.willCall = None
        self.receiveMaximum = 65535
        self._nextPid = 1
        self.ended = False

    @property
    def online(self):
        return self.protocol is not None

    @property
    def persistent(self):
        return self._persistent

    @persistent.setter
    def persistent(self, value):
        # Counted, so that mqtt.max_persistent_sessions costs nothing to check.
        value = bool(value)
        if value != self._persistent:
            self._persistent = value
            self.broker.persistentCount += 1 if value else -1

    def describe(self):
        """
        What the admin console shows of this connection beyond the core's
        figures (C{broker.admin.api.describeSession} on main).
        """
        info = {"protocol": "mqtt", "clientId": self.clientId,
                "mqttVersion": "5.0" if self.version == codec.V5 else "3.1.1",
                "attached": self.protocol is not None, "persistent": self.persistent,
                "sessionExpiry": self.expiryInterval, "subscriptions": len(self.subs),
                "queued": len(self.queue), "inFlight": len(self.inflight)}
        protocol = self.protocol
        if protocol is not None:
            try:
                peer = protocol.transport.getPeer()
                info["address"] = getattr(peer, "host", "?")
            except Exception:
                pass
        return info

    # -- IConnection ------------------------------------------------------

    def close(self, code, reason):
        """
        The core closes the session (a REST closeConnection, shutdown):
        the client is disconnected; a persistent session stays.
        """
        if self.protocol is not None:
            self.protocol.disconnect(codec.ADMINISTRATIVE_ACTION
                                     if code != 1001 else codec.SERVER_SHUTTING_DOWN,
                                     str(reason))

    def deliver(self, delivery, shares=()):
        """
        A core delivery to this session: matched against its subscriptions
        (QoS, no local, retain as published, subscription identifiers),
        written at once (QoS 0, or within the receive maximum), queued, or
        dropped (QoS 0 while away, expired, over the queue bound).

        @param shares: the C{(share name, filter)} of the shared
            subscriptions whose group chose this session for the message
            (L{broker.mqtt.topics.SharedPick}); its other shared
            subscriptions do not count.
        """
        broker = self.broker
        topic = delivery.group
        if topic is None:
            topic = broker.serverTopic
        qosMax = -1
        rap = False
        subIds = None
        own = delivery.fromConnectionId == self.connectionId
        opts = self.exact.get(topic)
        if opts is not None and not (own and opts.noLocal):
            qosMax = opts.qos
            rap = opts.retainAsPublished
            if opts.subId:
                subIds = [opts.subId]
        for opts in self.patterns.values():
            if opts.share is not None:
                if (opts.share, opts.filter) not in shares:
                    continue
            elif (own and opts.noLocal) or not matches(opts.filter, topic):
                continue
            if opts.qos > qosMax:
                qosMax = opts.qos
            rap = rap or opts.retainAsPublished
            if opts.subId:
                subIds = (subIds or []) + [opts.subId]
        if qosMax < 0:
            return
        message = delivery.message
        pubQos, retain, props, expiresAt = mqttView(message, broker.otherFacesQos)
        qos = pubQos if pubQos < qosMax else qosMax
        retain = retain and rap
        now = None
        if expiresAt is not None:
            now = broker.clock()
            if expiresAt <= now:
                broker.counters["expired"] += 1
                return
        protocol = self.protocol
        if qos == 0 and protocol is None:
            broker.counters["dropped_offline_qos0"] += 1
            return
        # One template per delivery for the subscribers who get it alike
        # (the packet identifier is patched in per subscriber).
        version = self.version
        remaining = None if expiresAt is None else math.ceil(expiresAt - now)
        key = ("mqtt", version, qos, retain, remaining, tuple(subIds) if subIds else None)
        template = delivery.encode(key, lambda d: makeTemplate(
            topic, message.data, qos, retain, props, expiresAt, subIds, version, now))
        if qos == 0:
            protocol.sendTemplate(template, None)
            return
        out = OutMessage(topic, message.data, qos, retain, props, expiresAt, subIds or ())
        if expiresAt is None:
            # Its remaining lifetime would change while it waits.
            out._template = (version, template)
        self.push(out, template)

    # -- outgoing QoS 1 / 2 -------------------------------------------------

    def push(self, out, template=None):
        """
        Queue C{out} (persisted for a persistent session) and pump; with
        its C{template} (built now, so not expired), sent at once when
        nothing waits before it and the window has room, the common case.
        """
        broker = self.broker
        if len(self.queue) + len(self.inflight) >= broker.maxQueued:
            broker.counters["queue_full"] += 1
            broker.quietLog.info(("mqtt", "queue full", self.hubName),
                                 "mqtt: hub {hub}: a session's queue is full "
                                 "({n} messages); dropping", hub=self.hubName,
                                 n=broker.maxQueued)
            return
        if self.persistent:
            broker.store.addMessage(self, out)
        protocol = self.protocol
        if (template is not None and protocol is not None and not self.queue
                and len(self.inflight) < self.receiveMaximum):
            self._send(out, protocol, template)
            return
        self.queue.append(out)
        self.pump()

    def pump(self):
        """Send queued messages while the client's receive maximum allows."""
        protocol = self.protocol
        if protocol is None:
            return
        queue = self.queue
        now = self.broker.clock()
        while queue and len(self.inflight) < self.receiveMaximum and self.protocol is protocol:
            out = queue.popleft()
            if out.expiresAt is not None and out.expiresAt <= now:
                self.broker.counters["expired"] += 1
                self._forget(out)
                continue
            self._send(out, protocol, out.template(self.version, now))

    def _send(self, out, protocol, template):
        """
        Put C{out} in flight under a new packet identifier and write it.
        """
        out.pid = self._allocatePid()
        out.state = SENT
        self.inflight[out.pid] = out
        if self._persistent:
            self.broker.store.updateMessage(self, out)
        if not protocol.sendTemplate(template, out.pid):
            # Over the client's maximum packet size: as if acknowledged
            # (MQTT-3.1.2-25).
            self.inflight.pop(out.pid, None)
            self._forget(out)

    def _allocatePid(self):
        pid = self._nextPid
        inflight = self.inflight
        while pid in inflight:
            pid = pid % 65535 + 1
        self._nextPid = pid % 65535 + 1
        return pid

    def _forget(self, out):
        if self.persistent and out.seq is not None:
            self.broker.store.removeMessage(self, out)

    def resend(self):
        """
        After a reconnect: every unacknowledged PUBLISH again with DUP,
        every PUBREL again, in their original order (MQTT-4.4.0-1).
        """
        protocol = self.protocol
        now = self.broker.clock()
        for pid, out in list(self.inflight.items()):
            if out.state == RELEASED:
                protocol.write(codec.encodeAck(codec.PUBREL, pid, self.version))
            else:
                protocol.sendTemplate(out.template(self.version, now), pid, dup=True)
        self.pump()

    def acked(self, kind, packetId, reasonCode=codec.SUCCESS):
        """A PUBACK, PUBREC or PUBCOMP (C{kind}) from the client."""
        out = self.inflight.get(packetId)
        if out is None:
            if kind == codec.PUBREC and self.protocol is not None:
                self.protocol.write(codec.encodeAck(
                    codec.PUBREL, packetId, self.version,
                    codec.PACKET_IDENTIFIER_NOT_FOUND))
            return
        if kind == codec.PUBACK and out.qos == 1 or kind == codec.PUBCOMP and out.qos == 2:
            del self.inflight[packetId]
            if self.persistent and out.seq is not None:     # _forget, written out
                self.broker.store.removeMessage(self, out)
            if self.queue:
                self.pump()
        elif kind == codec.PUBREC and out.qos == 2 and out.state == SENT:
            if reasonCode >= 0x80:
                del self.inflight[packetId]
                self._forget(out)
                self.pump()
                return
            out.state = RELEASED
            if self.persistent:
                self.broker.store.updateMessage(self, out)
            self.protocol.write(codec.encodeAck(codec.PUBREL, packetId, self.version))
        else:
            self.protocol.protocolError(f"unexpected acknowledgement for packet {packetId}")

    # -- subscriptions ------------------------------------------------------

    def addSubscription(self, opts):
        old = self.subs.get(opts.key)
        if old is not None:
            self.removeSubscription(opts.key)
        self.subs[opts.key] = opts
        if opts.wild or opts.share is not None:
            self.patterns[opts.key] = opts
        else:
            self.exact[opts.filter] = opts
        return old is not None

    def removeSubscription(self, key):
        opts = self.subs.pop(key, None)
        if opts is None:
            return None
        if opts.wild or opts.share is not None:
            self.patterns.pop(key, None)
        else:
            self.exact.pop(opts.filter, None)
        return opts

    def __repr__(self):
        return f"<MqttSession {self.hubName}/{self.clientId} online={self.online}>"
