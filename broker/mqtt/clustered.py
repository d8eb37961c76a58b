# -*- test-case-name: tests.test_mqtt_cluster_process -*-
"""
The MQTT face in cluster mode: the MQTT face of every node of a cluster
behaves as one MQTT broker.

What each node already shares through the core: every publish travels the
cluster bus to every node, which delivers it to its own receivers
(L{broker.core.router.Router.deliverLocal}), asking the hub's resolvers,
so a wildcard subscriber on any node gets a publish made on any node; an
MQTT publish crosses with its QoS, retain flag and properties
(L{broker.mqtt.message.MqttMessage.busState}).

What this module adds, over L{broker.mqtt.redisstore.RedisStore}:

  - B{One node holds a session.}  C{P:own} says which.  A client connecting
    to a node that does not hold its session makes that node claim it;
    the node that held it is asked (C{mqtt.release} on its node channel)
    to let it go: its client is disconnected (MQTT-3.1.4-3; 5.0 0x8E),
    its writes reach Redis, and it answers (C{mqtt.released}); the
    claiming node then loads the session (subscriptions, queue) from
    Redis.  A holder that does not answer within C{releaseTimeout} (or
    is gone: nobody hears its channel) is not waited for.  An away
    persistent session stays with its holder, in its trie and groups, so
    it queues what any node publishes; its expiry runs there, once for
    the cluster.
  - B{A dead node's sessions are adopted} by the node that reaps it
    (L{broker.cluster.node.Cluster.onNodeDead}): each is moved to the
    reaper only if the dead node still holds it (so a client that already
    reconnected elsewhere keeps its session), loaded, and its expiry
    counted from when its client left.  A node stopping cleanly asks
    another live node to adopt its sessions (C{mqtt.adopt}); sessions
    left held by a node that is no longer alive (the last node stopped)
    are adopted by the next node to connect to Redis.
  - B{Wills}: the will of a client connected here is kept in
    C{P:w:<node>} while it is connected; the node publishes it as on one
    node, and the reaper of a node killed with SIGKILL publishes the wills
    that node left (at once: a will delay is not honoured then).
  - B{Retained messages}: each node keeps a copy (so a SUBSCRIBE is
    answered from memory); a change is written to Redis and broadcast
    (C{mqtt.retain}); the copy is loaded from Redis whenever the node
    (re)connects to it.
  - B{Shared subscriptions}: every node knows which nodes have members of
    each share group (C{P:shares}, changes broadcast on C{mqtt.share}).
    For a message to a share group, the publishing node delivers it if it
    has a member; otherwise the node at C{crc32(topic + payload) mod n}
    of the sorted member nodes does.  Every node decides alone, from the
    same view, so exactly one node delivers (and within it one member).
    While a change of membership is on its way (a bus round trip), two
    nodes' views may differ: a message published then may reach two
    members or none.
"""

import base64
import json
import zlib

from twisted.internet import defer
from twisted.logger import Logger

from broker.cluster.engine import registerMessageKind
from broker.core.errors import Unavailable
from broker.mqtt.message import MqttMessage, propsFromJSON, propsToJSON
from broker.mqtt.redisstore import retainedFromJSON, retainedToJSON

log = Logger()

RELEASE, RELEASED, RETAIN, SHARE, ADOPT = (
    "mqtt.release", "mqtt.released", "mqtt.retain", "mqtt.share", "mqtt.adopt")

_dumps = json.JSONEncoder(separators=(",", ":")).encode

registerMessageKind("mqtt", MqttMessage.fromBus)


class ClusteredMqtt:
    """
    @param server: the node's L{broker.mqtt.server.MqttServer}.
    @param cluster: the node's L{broker.cluster.node.Cluster}.
    @param store: the L{broker.mqtt.redisstore.RedisStore}.
    @param engine: the L{broker.cluster.engine.RedisEngine} (who published
        the message being delivered).
    @ivar ready: fires once the node has loaded the cluster's retained
        messages and shared-subscription members the first time.
    """

    def __init__(self, reactor, server, cluster, store, engine, releaseTimeout=3.0):
        self.reactor = reactor
        self.server = server
        self.cluster = cluster
        self.store = store
        self.engine = engine
        self.nodeId = cluster.nodeId
        self.releaseTimeout = releaseTimeout
        self.stopping = False
        self.ready = defer.Deferred()
        self._releases = {}      # (hub, clientId) -> Deferred fired by RELEASED
        self._preparing = {}     # (hub, clientId) -> Deferred of a prepare under way
        self._wills = set()      # (hub, clientId) whose will is in Redis
        # (hub, share, filter) -> the nodes with members, this one included
        # as soon as it has one.
        self.shareNodes = {}
        self._localShares = set()
        server.clustered = self
        for name, routing in server.routings.items():
            self.routingMade(name, routing)
        cluster.onMessage(RELEASE, self._releaseAsked)
        cluster.onMessage(RELEASED, self._releasedHeard)
        cluster.onMessage(RETAIN, self._retainHeard)
        cluster.onMessage(SHARE, self._shareHeard)
        cluster.onMessage(ADOPT, self._adoptAsked)
        cluster.onNodeDead(self.nodeDead)
        cluster.onResync(self.resync)

    # -- taking a session ---------------------------------------------------------

    def prepare(self, hub, clientId, cleanStart):
        """
        Before a CONNECT for a session this node does not hold: claim it,
        have its holder let it go, and load it.

        @return: a Deferred firing once the session (if any) is here.
        """
        key = (hub, clientId)
        under = self._preparing.get(key)
        if under is not None:
            d = defer.Deferred()
            under.addBoth(lambda r: (d.callback(None), r)[1])
            return d
        d = self._preparing[key] = self._prepare(hub, clientId, cleanStart)

        def done(result):
            if self._preparing.get(key) is d:
                del self._preparing[key]
            return result
        return d.addBoth(done)

    @defer.inlineCallbacks
    def _prepare(self, hub, clientId, cleanStart):
        if not self.ready.called:
            # Not yet in touch with the cluster (just started, or Redis
            # unreachable since): wait a little, then refuse.
            waiting = defer.Deferred()
            self.ready.addCallback(lambda r: (waiting.called or waiting.callback(True), r)[1])
            timer = self.reactor.callLater(self.releaseTimeout, waiting.callback, False)
            if not (yield waiting):
                raise Unavailable("this node has not reached the cluster (Redis) yet")
            timer.cancel()
        server = self.server
        key = (hub, clientId)
        if key in server.sessions:
            return
        old = yield self.store.claim(hub, clientId)
        if old and old != self.nodeId:
            released = self._releases[key] = defer.Deferred()
            heard = yield self.cluster.send(
                old, RELEASE, _dumps([hub, clientId, cleanStart]).encode("utf-8"))
            if heard:
                timer = self.reactor.callLater(self.releaseTimeout, released.callback, False)
                answered = yield released
                if timer.active():
                    timer.cancel()
                if not answered:
                    server.counters["handover_timeouts"] += 1
                    log.warn("mqtt: node {node} did not let session {hub}/{client} go within "
                             "{t} s; taking it as Redis has it", node=old, hub=hub,
                             client=clientId, t=self.releaseTimeout)
            if self._releases.get(key) is released:
                del self._releases[key]
        if key in server.sessions:
            return
        row, messages = yield self.store.loadSession(hub, clientId)
        if row is not None and key not in server.sessions:
            server.restoreSession(row, messages, since=row[5])
            server.counters["sessions_taken_from_cluster"] += 1

    def _releaseAsked(self, origin, payload):
        """Another node took a session this node held: let it go, then say so."""
        hub, clientId, cleanStart = json.loads(payload)
        under = self._preparing.get((hub, clientId))
        if under is not None:
            # Its client is connecting here too: once that connection has
            # the session (or not), the later claim takes it.
            under.addBoth(lambda r: (self._release(origin, hub, clientId, cleanStart), r)[1])
            return
        self._release(origin, hub, clientId, cleanStart)

    def _release(self, origin, hub, clientId, cleanStart):
        session = self.server.sessions.get((hub, clientId))
        if session is not None:
            self.server.handOver(session, cleanStart)

        def answer(_):
            return self.cluster.send(origin, RELEASED, _dumps([hub, clientId]).encode("utf-8"))
        self.store.whenFlushed().addCallback(answer).addErrback(
            lambda f: log.warn("mqtt: answering a hand-over failed: {why}",
                               why=f.getErrorMessage()))

    def _releasedHeard(self, origin, payload):
        hub, clientId = json.loads(payload)
        d = self._releases.pop((hub, clientId), None)
        if d is not None and not d.called:
            d.callback(True)

    # -- what the server tells ------------------------------------------------------

    def attached(self, session):
        """A client connected here: its will kept in Redis while it is."""
        key = (session.hubName, session.clientId)
        will = session.will
        if will is not None and self.server.auth.mayPublish(session.identity, will.topic):
            self._wills.add(key)
            self.store.setWill(session.hubName, session.clientId, [
                will.topic, base64.b64encode(will.payload).decode("ascii"), will.qos,
                bool(will.retain), propsToJSON(will.properties), session.userId])
        elif key in self._wills:
            self.willGone(session)

    def detached(self, session):
        """Its client left: this node publishes the will (or drops it) itself."""
        self.willGone(session)

    def willGone(self, session):
        key = (session.hubName, session.clientId)
        if key in self._wills:
            self._wills.discard(key)
            self.store.clearWill(*key)

    def ended(self, session):
        self.willGone(session)
        self.store.disown(session.hubName, session.clientId)

    # -- retained messages ----------------------------------------------------------

    def retained(self, hub, topic, message):
        payload = _dumps([hub, topic, None if message is None else retainedToJSON(message)])
        self.cluster.broadcast(RETAIN, payload.encode("utf-8")).addErrback(lambda f: None)

    def _retainHeard(self, origin, payload):
        hub, topic, record = json.loads(payload)
        message = None
        if record is not None:
            data, qos, props, expiresAt = retainedFromJSON(record)
            message = MqttMessage(data, qos, True, props, expiresAt)
        self.server.keepRetained(hub, topic, message)

    # -- shared subscriptions -------------------------------------------------------

    def routingMade(self, hubName, routing):
        routing.accept = lambda topic, key: self.accept(hubName, topic, key)

    def shareChanged(self, hub, share, topicFilter):
        """This node's members of a share group may have come or gone."""
        key = (hub, share, topicFilter)
        present = self.server.routing(hub).trie.hasShared(topicFilter, share)
        if present == (key in self._localShares):
            return
        if present:
            self._localShares.add(key)
        else:
            self._localShares.discard(key)
        self._setShareNode(key, self.nodeId, present)
        self.store.setShare(hub, share, topicFilter, present)
        self._tellShare(hub, share, topicFilter, self.nodeId, present)

    def _tellShare(self, hub, share, topicFilter, node, present):
        payload = _dumps([hub, share, topicFilter, node, present]).encode("utf-8")
        self.cluster.broadcast(SHARE, payload).addErrback(lambda f: None)

    def _setShareNode(self, key, node, present):
        nodes = self.shareNodes.get(key)
        if present:
            if nodes is None:
                nodes = self.shareNodes[key] = set()
            nodes.add(node)
        elif nodes is not None:
            nodes.discard(node)
            if not nodes:
                del self.shareNodes[key]

    def _shareHeard(self, origin, payload):
        hub, share, topicFilter, node, present = json.loads(payload)
        self._setShareNode((hub, share, topicFilter), node, present)

    def accept(self, hub, topic, key):
        """
        Whether this node delivers the message being delivered to the
        share group C{key = (share, filter)}: the publishing node if it has
        members, else one chosen by the message.
        """
        nodes = self.shareNodes.get((hub,) + key)
        if not nodes or len(nodes) == 1:
            return True
        delivering = self.engine.delivering
        origin, delivery = delivering if delivering is not None else (self.nodeId, None)
        if origin in nodes:
            return origin == self.nodeId
        data = delivery.message.data if delivery is not None else b""
        ordered = sorted(nodes)
        return ordered[zlib.crc32(data, zlib.crc32(topic.encode("utf-8"))) % len(ordered)] \
            == self.nodeId

    # -- nodes ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def resync(self):
        """
        After (re)connecting to Redis: the cluster's retained messages and
        share-group members loaded; this node's own claims written again
        (Redis may have lost them); sessions left by nodes no longer alive
        adopted.
        """
        try:
            rows = yield self.store.loadRetained()
            self.server.restoreRetained(rows, replace=True)
            view = {}
            for hub, share, topicFilter, node in (yield self.store.shares()):
                view.setdefault((hub, share, topicFilter), set()).add(node)
            for key in self._localShares:
                view.setdefault(key, set()).add(self.nodeId)
                self.store.setShare(*key, True)
            self.shareNodes = view
            for (hub, clientId), session in list(self.server.sessions.items()):
                if not (yield self.store.reclaim(hub, clientId)):
                    # Taken by another node while this one was out of
                    # touch: that node has it now.
                    log.warn("mqtt: session {hub}/{client} was taken by another node while "
                             "Redis was unreachable; letting it go", hub=hub, client=clientId)
                    self.server.handOver(session, False)
            live = set((yield self.cluster.liveNodes()))
            for node in (yield self.store.holders()):
                if node not in live and node != self.nodeId:
                    yield self.adoptFrom(node)
        except Exception:
            log.failure("mqtt: loading the cluster's MQTT state failed")
        finally:
            if not self.ready.called:
                self.ready.callback(None)

    @defer.inlineCallbacks
    def nodeDead(self, node):
        """
        The L{Cluster.onNodeDead} hook: publish the wills of the dead
        node's clients, forget its share-group members, adopt its
        sessions.  For this node itself (a clean stop), another live node
        is asked to adopt them instead.
        """
        if node == self.nodeId and self.stopping:
            # The sessions leave this node first, so that nothing it still
            # hears from the bus is queued behind the adopter's back.
            for session in list(self.server.sessions.values()):
                self.server.handOver(session, False)
            yield self.store.whenFlushed()
            live = yield self.cluster.liveNodes()
            others = sorted(n for n in live if n != self.nodeId)
            if others:
                yield self.cluster.send(others[0], ADOPT, node.encode("utf-8"))
            return
        for (hub, clientId), record in (yield self.store.takeWills(node)):
            topic, payload, qos, retain, props, userId = record
            self.server.counters["wills_published"] += 1
            self.server.publish(None, topic, MqttMessage(
                base64.b64decode(payload), qos, retain, propsFromJSON(props)), hubName=hub)
        for hub, share, topicFilter, _ in (yield self.store.dropShares(node)):
            self._setShareNode((hub, share, topicFilter), node, False)
            self._tellShare(hub, share, topicFilter, node, False)
        yield self.adoptFrom(node)

    def _adoptAsked(self, origin, payload):
        self.adoptFrom(payload.decode("utf-8")).addErrback(
            lambda f: log.failure("mqtt: adopting the sessions of {node}", f, node=origin))

    @defer.inlineCallbacks
    def adoptFrom(self, node):
        """Take the sessions C{node} still holds; fire with how many came."""
        adopted = 0
        for hub, clientId in (yield self.store.held(node)):
            if not (yield self.store.adopt(self.store.entry(hub, clientId), node)):
                continue
            if (hub, clientId) in self.server.sessions:
                continue
            row, messages = yield self.store.loadSession(hub, clientId)
            if row is None:
                # A clean session: it ended with its node.
                self.store.disown(hub, clientId)
                continue
            if (hub, clientId) not in self.server.sessions:
                if self.server.restoreSession(row, messages, since=row[5]) is not None:
                    adopted += 1
        if adopted:
            self.server.counters["sessions_adopted"] += adopted
            log.info("mqtt: adopted {n} sessions of node {node}", n=adopted, node=node)
        return adopted
