# -*- test-case-name: tests.test_mqtt_protocol -*-
"""
The MQTT face's state behind its protocol adapters: the sessions by client
identifier, their subscriptions in the core (an exact topic is a core group
of the hub; wildcard and shared filters are in the hub's
L{broker.mqtt.topics.SubscriptionTrie}, asked by the hub for every group
send), retained messages, wills and session expiry, and the durable store.

One L{MqttServer} serves every MQTT listener of the broker; the protocol
adapters (L{broker.mqtt.protocol}) call it and never touch the core.
"""

import collections
import json

from twisted.logger import Logger

from broker.core.errors import BrokerError
from broker.core.message import FROM_GROUP, Delivery, Target
from broker.mqtt import codec
from broker.mqtt.interfaces import MqttIdentity
from broker.mqtt.message import FORWARDED, MqttMessage
from broker.mqtt.session import (OutMessage, MqttSession, SubOptions, makeTemplate)
from broker.mqtt.store import loadProps
from broker.mqtt.topics import SubscriptionTrie, TopicError, checkFilter, matches, parseShared

log = Logger()

# The core permissions of an MQTT session: topic access is the MQTT ACL's
# (L{broker.mqtt.interfaces.IMqttAcl}), checked before the core is asked.
ROLES = ("webpubsub.joinLeaveGroup", "webpubsub.sendToGroup")
NEVER_EXPIRES = 0xFFFFFFFF
FACE = "mqtt"


class HubRouting:
    """
    What the face keeps per hub: the trie of wildcard and shared
    subscriptions (installed as the hub's group resolver) and the retained
    messages by topic.
    """

    def __init__(self, hub):
        self.hub = hub
        self.trie = SubscriptionTrie()
        self.retained = {}
        self.retainedBytes = 0
        # Cluster mode: accept(topic, (share, filter)) says whether this
        # node delivers a message to that shared subscription
        # (L{broker.mqtt.clustered.ClusteredMqtt.accept}).
        self.accept = None
        hub.addGroupResolver(self.resolve)
        if hub.face == "core":
            # The hub's label on /metrics and in the console, unless another
            # face (Web PubSub) serves it too.
            hub.face = "mqtt"

    def resolve(self, group):
        if not self.trie.count or "+" in group or "#" in group:
            return None
        return self.trie.match(group, self.accept)


class MqttServer:
    """
    @param auth: the L{broker.mqtt.interfaces.IMqttAuth} (authenticator and
        ACL).
    @param store: L{broker.mqtt.store.SQLiteStore} or C{NullStore}.
    """

    def __init__(self, reactor, core, auth, store, defaultHub="mqtt", maxQueued=1000,
                 otherFacesQos=1, serverTopic="$server", maxSessionExpiry=7 * 86400,
                 maxSubscriptions=100, maxPersistentSessions=100_000,
                 maxRetained=100_000, maxRetainedBytes=256 * 1024 * 1024):
        self.reactor = reactor
        self.clock = reactor.seconds
        self.core = core
        self.auth = auth
        self.store = store
        self.defaultHub = defaultHub
        self.maxQueued = maxQueued
        self.otherFacesQos = otherFacesQos
        self.serverTopic = serverTopic
        self.maxSessionExpiry = maxSessionExpiry
        self.maxSubscriptions = maxSubscriptions
        self.maxPersistentSessions = maxPersistentSessions
        self.persistentCount = 0
        self.maxRetained = maxRetained
        self.maxRetainedBytes = maxRetainedBytes
        self.sessions = {}           # (hub, clientId) -> MqttSession
        self.routings = {}           # hub -> HubRouting
        self.counters = collections.Counter()
        self.quietLog = core.quietLog
        # Cluster mode: the L{broker.mqtt.clustered.ClusteredMqtt} told of
        # what the other nodes must know; None on one node.
        self.clustered = None

    def routing(self, hubName):
        r = self.routings.get(hubName)
        if r is None:
            r = self.routings[hubName] = HubRouting(self.core.hub(hubName))
            if self.clustered is not None:
                self.clustered.routingMade(hubName, r)
        return r

    # -- sessions -------------------------------------------------------------

    def mayPersist(self, c, hubName, clientId):
        """
        Whether a CONNECT asking for a persistent session may have one:
        at most C{maxPersistentSessions} exist (connected or away), so
        clients cannot fill the broker with sessions they leave behind.
        """
        asks = (c.properties.get("session_expiry_interval", 0) if c.version == codec.V5
                else not c.cleanStart)
        if not asks or not self.maxSessionExpiry:
            return True
        held = self.sessions.get((hubName, clientId))
        if held is not None and held.persistent:
            return True
        return self.persistentCount < self.maxPersistentSessions

    def connect(self, protocol, c, identity, hubName, clientId):
        """
        Attach C{protocol} to the session of C{clientId}, taking it over
        from a connection still open, starting a new one on a clean start.

        @return: C{(session, sessionPresent)}.
        """
        key = (hubName, clientId)
        old = self.sessions.get(key)
        if old is not None and old.protocol is not None:
            # MQTT-3.1.4-3: the existing connection is closed (5.0: 0x8E).
            oldProtocol = old.protocol
            oldProtocol.takenOver()
            self.detach(old, oldProtocol, graceful=False)
        if old is not None:
            self._cancel(old, "expiryCall")
            if c.cleanStart or old.userId != identity.userId or old.ended:
                # A delayed will still pending goes out as the session ends.
                self.endSession(old)
                old = None
            else:
                # Reconnected before its will delay ran out: no will.
                self._cancel(old, "willCall")
                old.will = None
        present = old is not None
        if old is None:
            session = MqttSession(self, hubName, clientId, None, identity.userId, identity,
                                  c.version)
            hub = self.core.hub(hubName)
            session.connectionId = hub.newConnectionId()
            session.core = hub.admit(session, userId=identity.userId, roles=ROLES)
            self.sessions[key] = session
            self.routing(hubName)
        else:
            session = old
        session.identity = identity
        session.version = c.version
        session.protocol = protocol
        session.receiveMaximum = c.properties.get("receive_maximum", 65535)
        if c.version == codec.V5:
            expiry = c.properties.get("session_expiry_interval", 0)
        else:
            expiry = 0 if c.cleanStart else NEVER_EXPIRES
        session.expiryInterval = min(expiry, self.maxSessionExpiry) if expiry else 0
        wasPersistent = session.persistent
        session.persistent = session.expiryInterval > 0
        if wasPersistent and not session.persistent:
            self.store.deleteSession(session)
            for out in list(session.inflight.values()) + list(session.queue):
                out.seq = None
        session.will = c.will
        if session.persistent:
            self.store.saveSession(session)
            if not wasPersistent:
                for out in list(session.inflight.values()) + list(session.queue):
                    self.store.addMessage(session, out)
        if self.clustered is not None:
            self.clustered.attached(session)
        return session, present

    def detach(self, session, protocol, graceful, willDelay=True):
        """
        C{protocol}'s network connection has gone (C{graceful}: after a
        DISCONNECT with reason 0, which discards the will).
        """
        if session.protocol is not protocol:
            return
        session.protocol = None
        will = session.will
        if graceful:
            will = session.will = None
        if self.clustered is not None:
            self.clustered.detached(session)
        if not session.persistent:
            if will is not None:
                self.publishWill(session)
            self.endSession(session)
            return
        self.store.saveSession(session)
        if session.expiryInterval != NEVER_EXPIRES:
            session.expiryCall = self.reactor.callLater(session.expiryInterval,
                                                        self._expire, session)
        if will is not None:
            delay = will.properties.get("will_delay_interval", 0) if willDelay else 0
            if delay:
                session.willCall = self.reactor.callLater(delay, self.publishWill, session)
            else:
                self.publishWill(session)

    def _expire(self, session):
        session.expiryCall = None
        self.counters["sessions_expired"] += 1
        self.endSession(session)

    @staticmethod
    def _cancel(session, name):
        call = getattr(session, name)
        setattr(session, name, None)
        if call is not None and call.active():
            call.cancel()

    def endSession(self, session):
        """The session ends: its will if one is pending, then it is forgotten."""
        if session.ended:
            return
        if session.willCall is not None:
            self._cancel(session, "willCall")
            self.publishWill(session)
        self._cancel(session, "expiryCall")
        session.ended = True
        self._forget(session, "session ended")
        if session.persistent:
            self.store.deleteSession(session)
            session.persistent = False
        if self.clustered is not None:
            self.clustered.ended(session)

    def _forget(self, session, why):
        """The session leaves this node's trie, hub and session table."""
        routing = self.routing(session.hubName)
        for opts in list(session.patterns.values()):
            routing.trie.remove(opts.filter, session, opts.share)
            if opts.share is not None:
                self.shareChanged(session.hubName, opts.share, opts.filter)
        if session.core is not None:
            session.core.hub.remove(session.core, why)
        key = (session.hubName, session.clientId)
        if self.sessions.get(key) is session:
            del self.sessions[key]

    def handOver(self, session, cleanStart):
        """
        Cluster mode: another node takes the session (its client connected
        there).  Its client here is told (MQTT-3.1.4-3, 5.0: 0x8E); the
        session leaves this node with its state in the store, a delayed
        will going out now if the new connection starts clean.
        """
        self.counters["sessions_handed_over"] += 1
        protocol = session.protocol
        if protocol is not None:
            protocol.takenOver()
            self.detach(session, protocol, graceful=False)
        if session.ended:
            return
        self._cancel(session, "expiryCall")
        if cleanStart:
            if session.willCall is not None:
                self._cancel(session, "willCall")
                self.publishWill(session)
        else:
            self._cancel(session, "willCall")
        session.ended = True
        self._forget(session, "session taken over by another node")
        session.persistent = False

    def shareChanged(self, hubName, share, topicFilter):
        if self.clustered is not None:
            self.clustered.shareChanged(hubName, share, topicFilter)

    def publishWill(self, session):
        session.willCall = None
        will, session.will = session.will, None
        if will is None:
            return
        if not self.auth.mayPublish(session.identity, will.topic):
            self.counters["acl_refused_publish"] += 1
            return
        self.counters["wills_published"] += 1
        self.publish(session, will.topic, self.makeMessage(
            will.payload, will.qos, will.retain, will.properties))
        if self.clustered is not None:
            self.clustered.willGone(session)

    # -- publishing -------------------------------------------------------------

    def makeMessage(self, payload, qos, retain, properties):
        props = {k: properties[k] for k in FORWARDED if k in properties}
        expiry = properties.get("message_expiry_interval")
        expiresAt = None if expiry is None else self.clock() + expiry
        return MqttMessage(payload, qos, retain, props, expiresAt)

    def publish(self, session, topic, message, hubName=None):
        """
        Route an MQTT publish through the core to group C{topic}, keeping
        it as the topic's retained message when its retain flag is set.
        """
        hubName = session.hubName if session is not None else hubName
        if message.retain:
            self.retain(hubName, topic, message)
        hub = self.core.hub(hubName)
        hub.stats.messagesIn += 1
        delivery = Delivery(message, FROM_GROUP, topic,
                            session.userId if session is not None else None,
                            session.connectionId if session is not None else None)
        d = hub.publish(Target(Target.GROUP, topic), delivery)
        d.addErrback(self._publishFailed, hubName)
        return d

    def _publishFailed(self, failure, hubName):
        # A cluster engine that could not reach other nodes: this node's
        # receivers have the message; counted, logged once a minute.
        self.counters["publish_failures"] += 1
        self.quietLog.info((FACE, "publish failed", hubName),
                           "mqtt: hub {hub}: a publish reached this node only: {why}",
                           hub=hubName, why=failure.getErrorMessage())

    def retain(self, hubName, topic, message):
        """
        Keep C{message} as C{topic}'s retained message (an empty one
        deletes), within the hub's bounds: past C{maxRetained} messages or
        C{maxRetainedBytes}, a new one is routed but not kept (counted).
        """
        routing = self.routing(hubName)
        retained = routing.retained
        old = retained.get(topic)
        if not message.data:
            # MQTT-3.3.1-10/11: an empty retained message deletes.
            if old is not None:
                del retained[topic]
                routing.retainedBytes -= len(old.data)
                self.store.setRetained(hubName, topic, None)
            if self.clustered is not None:
                self.clustered.retained(hubName, topic, None)
            return
        grows = len(message.data) - (len(old.data) if old is not None else 0)
        if ((old is None and len(retained) >= self.maxRetained) or
                routing.retainedBytes + grows > self.maxRetainedBytes):
            self.counters["retained_refused"] += 1
            self.quietLog.info((FACE, "retained", hubName),
                               "mqtt: hub {hub}: retained messages full; not kept",
                               hub=hubName)
            return
        retained[topic] = message
        routing.retainedBytes += grows
        self.store.setRetained(hubName, topic, message)
        if self.clustered is not None:
            self.clustered.retained(hubName, topic, message)

    # -- subscriptions --------------------------------------------------------

    def subscribe(self, session, subscribe):
        """
        @return: C{(codes, retainedSends)}: the SUBACK codes and a callable
            sending the retained messages (after the SUBACK).
        @raise codec.ProtocolError: a shared subscription with no local.
        """
        v5 = session.version == codec.V5
        failure = codec.UNSPECIFIED_ERROR
        subIds = subscribe.properties.get("subscription_identifier") or [None]
        subId = subIds[0]
        if subId == 0:
            raise codec.ProtocolError("subscription identifier 0")
        routing = self.routing(session.hubName)
        codes = []
        retainedFor = []
        for sub in subscribe.subscriptions:
            try:
                share, f = parseShared(sub.filter)
                wild = checkFilter(f)
            except TopicError:
                codes.append(codec.TOPIC_FILTER_INVALID if v5 else failure)
                continue
            if share is not None and sub.noLocal:
                raise codec.ProtocolError("no local on a shared subscription")  # MQTT-3.8.3-4
            if not self.auth.maySubscribe(session.identity, f):
                self.counters["acl_refused_subscribe"] += 1
                codes.append(codec.NOT_AUTHORIZED if v5 else failure)
                continue
            if sub.filter not in session.subs and len(session.subs) >= self.maxSubscriptions:
                self.counters["subscriptions_refused"] += 1
                codes.append(codec.QUOTA_EXCEEDED if v5 else failure)
                continue
            opts = SubOptions(sub.filter, f, share, sub.qos, sub.noLocal,
                              sub.retainAsPublished, sub.retainHandling, subId, wild)
            existed = session.addSubscription(opts)
            if wild or share is not None:
                routing.trie.add(f, session, share)
                if share is not None:
                    self.shareChanged(session.hubName, share, f)
            else:
                try:
                    session.core.joinGroup(f)
                except BrokerError:
                    session.removeSubscription(sub.filter)
                    self.counters["subscriptions_refused"] += 1
                    codes.append(codec.QUOTA_EXCEEDED if v5 else failure)
                    continue
            codes.append(sub.qos)
            if share is None and (opts.retainHandling == 0 or
                                  (opts.retainHandling == 1 and not existed)):
                retainedFor.append(opts)
        if session.persistent:
            self.store.saveSession(session)

        def sendRetained():
            for opts in retainedFor:
                self.sendRetained(session, routing, opts)
        return codes, sendRetained

    def sendRetained(self, session, routing, opts):
        now = self.clock()
        if opts.wild:
            found = [(t, m) for t, m in routing.retained.items() if matches(opts.filter, t)]
        else:
            m = routing.retained.get(opts.filter)
            found = [(opts.filter, m)] if m is not None else []
        subIds = (opts.subId,) if opts.subId else ()
        for topic, message in found:
            if message.expiresAt is not None and message.expiresAt <= now:
                if routing.retained.pop(topic, None) is not None:
                    routing.retainedBytes -= len(message.data)
                self.store.setRetained(session.hubName, topic, None)
                continue
            qos = min(opts.qos, message.qos)
            self.counters["retained_sent"] += 1
            if qos == 0:
                if session.protocol is not None:
                    session.protocol.sendTemplate(makeTemplate(
                        topic, message.data, 0, True, message.properties, message.expiresAt,
                        subIds, session.version, now), None)
            else:
                session.push(OutMessage(topic, message.data, qos, True, message.properties,
                                        message.expiresAt, subIds))

    def unsubscribe(self, session, filters):
        routing = self.routing(session.hubName)
        codes = []
        for key in filters:
            opts = session.removeSubscription(key)
            if opts is None:
                codes.append(codec.NO_SUBSCRIPTION_EXISTED)
                continue
            if opts.wild or opts.share is not None:
                routing.trie.remove(opts.filter, session, opts.share)
                if opts.share is not None:
                    self.shareChanged(session.hubName, opts.share, opts.filter)
            else:
                session.core.leaveGroup(opts.filter)
            codes.append(codec.SUCCESS)
        if session.persistent:
            self.store.saveSession(session)
        return codes

    # -- start-up and stop --------------------------------------------------

    def restore(self):
        """
        Bring back the persistent sessions, their queues and the retained
        messages from the store (at start-up): each session is admitted to
        its hub offline, its expiry counted from now.
        """
        sessions, messages, retained = self.store.load()
        self.restoreRetained(retained)
        byKey = collections.defaultdict(list)
        for m in messages:
            byKey[(m[1], m[2])].append(m)
        restored = 0
        for row in sessions:
            if self.restoreSession(row, byKey.get((row[0], row[1]), ())) is not None:
                restored += 1
        self.counters["sessions_restored"] += restored
        if restored:
            log.info("mqtt: {n} persistent sessions restored", n=restored)

    def restoreRetained(self, rows, replace=False):
        """
        Retained messages from C{(hub, topic, payload, qos, props JSON,
        expiresAt)} rows (C{replace}: instead of those held now).
        """
        if replace:
            for routing in self.routings.values():
                routing.retained.clear()
                routing.retainedBytes = 0
        now = self.clock()
        for hub, topic, payload, qos, props, expiresAt in rows:
            if expiresAt is not None and expiresAt <= now:
                continue
            self.keepRetained(hub, topic, MqttMessage(payload, qos, True, loadProps(props),
                                                      expiresAt))

    def keepRetained(self, hubName, topic, message):
        """
        Keep (C{None}: drop) a retained message another node accepted or
        the store holds, within this node's bounds, without writing it.
        """
        routing = self.routing(hubName)
        old = routing.retained.pop(topic, None)
        if old is not None:
            routing.retainedBytes -= len(old.data)
        if message is None:
            return
        if (len(routing.retained) >= self.maxRetained or
                routing.retainedBytes + len(message.data) > self.maxRetainedBytes):
            self.counters["retained_refused"] += 1
            return
        routing.retained[topic] = message
        routing.retainedBytes += len(message.data)

    def restoreSession(self, row, messages, since=None):
        """
        Admit a stored session offline with its subscriptions and queue:
        C{row} and C{messages} in L{broker.mqtt.store.SQLiteStore.load}'s
        shapes.  Its expiry runs from now, or from C{since} (when its
        client left, for a session another node held): one already past
        ends at once.

        @return: the L{MqttSession}, or C{None} if it had expired.
        """
        hub, clientId, userId, version, expiry, disconnectedAt, subs = row
        identity = MqttIdentity(userId=userId)
        session = MqttSession(self, hub, clientId, None, userId, identity, version)
        h = self.core.hub(hub)
        session.connectionId = h.newConnectionId()
        session.core = h.admit(session, userId=userId, roles=ROLES)
        session.persistent = True
        session.expiryInterval = expiry
        self.sessions[(hub, clientId)] = session
        routing = self.routing(hub)
        for value in json.loads(subs):
            opts = SubOptions.fromJSON(value)
            session.addSubscription(opts)
            if opts.wild or opts.share is not None:
                routing.trie.add(opts.filter, session, opts.share)
                if opts.share is not None:
                    self.shareChanged(hub, opts.share, opts.filter)
            else:
                try:
                    session.core.joinGroup(opts.filter)
                except BrokerError as e:
                    log.warn("mqtt: {session} cannot rejoin {topic}: {e}", session=session,
                             topic=opts.filter, e=e)
        for (seq, _, _, topic, payload, qos, retain, props, expiresAt, subIds, pid,
             state) in messages:
            out = OutMessage(topic, payload, qos, bool(retain), loadProps(props), expiresAt,
                             json.loads(subIds), pid, state, seq)
            if pid is not None and pid not in session.inflight:
                session.inflight[pid] = out
            else:
                out.pid = None
                session.queue.append(out)
        if expiry != NEVER_EXPIRES:
            left = expiry
            if since is not None:
                left = expiry - max(0.0, self.clock() - since)
            if left <= 0:
                self._expire(session)
                return None
            session.expiryCall = self.reactor.callLater(left, self._expire, session)
        return session

    def stop(self):
        """
        The broker stops: session expiry and will delay timers are
        cancelled (a restart counts expiry again from its start; a delayed
        will still pending is lost, docs/mqtt.md).
        """
        if self.clustered is not None:
            # Its away sessions go to another node (ClusteredMqtt.nodeDead).
            self.clustered.stopping = True
        for session in self.sessions.values():
            self._cancel(session, "expiryCall")
            self._cancel(session, "willCall")

    def onlineProtocols(self):
        return [s.protocol for s in self.sessions.values() if s.protocol is not None]
