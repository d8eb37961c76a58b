# -*- test-case-name: tests.test_cluster_engine -*-
"""
The Redis engine: every node delivers a publish to its own receivers at
once and sends it to the others over the cluster bus (Redis pub/sub), where
each delivers it to its own; so every receiver gets it exactly once, and a
publisher's messages arrive in the order it made them on every node.

Server commands (join a connection to a group, close a user's connections)
travel the same bus, so a command and a publish made after it arrive in
that order.  The directory (L{broker.cluster.directory}) answers
cluster-wide queries.

While Redis is unreachable, delivery to this node's receivers goes on and
what could not reach the other nodes is counted
(C{publishesLocalOnly}); server commands that need the cluster are refused
with L{broker.core.errors.Unavailable}.  Once Redis is back, the node
registers its connections again.

A bus message is C{header LF payload}: the header a compact JSON list
C{[hub, target, source, group, fromUserId, fromConnectionId, dataType,
history]}, the payload the message's bytes as they are (no base64).  A
message of a face's own kind (an MQTT publish with its QoS, retain flag and
properties) adds C{[kind, state]} as a ninth element: the face registers how
to rebuild it (L{registerMessageKind}); a node without that face delivers
it as a plain message.
"""

import json

from twisted.internet.defer import fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from broker.cluster.directory import RedisDirectory
from broker.core import jsonstrict
from broker.core.errors import Unavailable
from broker.core.interfaces import IEngine
from broker.core.message import Delivery, Message, Target

log = Logger()

_PUB = "pub"
_CMD = "cmd"


# One encoder for every header: json.dumps with options builds a new one
# per call, a measurable part of a small publish.
_encode = json.JSONEncoder(separators=(",", ":")).encode


# Message kinds a face carries over the bus beyond the core's fields: kind
# -> fromBus(dataType, data, state) giving the message back.  A message
# tells its kind and state by a C{busState()} method returning
# C{(kind, JSON-able state)}.
_kinds = {}


def registerMessageKind(kind, fromBus):
    """
    Rebuild messages of C{kind} (a face's L{Message} subclass) on the nodes
    receiving them with C{fromBus(dataType, data, state)}.
    """
    _kinds[kind] = fromBus


# Encoded headers by their fields: a device's telemetry or a chat member's
# messages repeat one header, so it is encoded once.
_headers = {}


def encodeDelivery(hubName, target, delivery):
    m = delivery.message
    busState = getattr(m, "busState", None)
    if busState is not None:
        return _encode([hubName, target.toJSON(), delivery.source, delivery.group,
                        delivery.fromUserId, delivery.fromConnectionId, m.dataType,
                        delivery.history, busState()]).encode("utf-8") + b"\n" + m.data
    key = (hubName, target.kind, target.name, target.excluded, target.filter, delivery.source,
           delivery.group, delivery.fromUserId, delivery.fromConnectionId, m.dataType,
           delivery.history)
    header = _headers.get(key)
    if header is None:
        header = _encode([hubName, target.toJSON(), delivery.source, delivery.group,
                          delivery.fromUserId, delivery.fromConnectionId, m.dataType,
                          delivery.history]).encode("utf-8") + b"\n"
        if delivery.history is None:
            if len(_headers) >= 4096:
                _headers.clear()
            _headers[key] = header
    return header + m.data


def decodeDelivery(payload):
    """
    @return: C{(hubName, target, delivery)}.
    @raise ValueError: for a malformed message.
    """
    try:
        header, data = payload.split(b"\n", 1)
        fields = jsonstrict.loads(header)
        hubName, target, source, group, fromUser, fromConn, dataType, history = fields[:8]
        message = None
        if len(fields) > 8:
            kind, state = fields[8]
            fromBus = _kinds.get(kind)
            if fromBus is not None:
                message = fromBus(dataType, data, state)
        if message is None:
            message = Message(dataType, data)
        delivery = Delivery(message, source, group, fromUser, fromConn)
        if history is not None:
            delivery.history = tuple(history)
        return hubName, Target.fromJSON(target), delivery
    except Exception as e:
        raise ValueError(f"malformed delivery: {e}") from None


@implementer(IEngine)
class RedisEngine:
    """
    @ivar publishesLocalOnly: publishes that reached this node's receivers
        only, because Redis was unreachable.
    @ivar badMessages: malformed bus messages dropped.
    """

    def __init__(self, cluster):
        self.cluster = cluster
        self.nodeId = cluster.nodeId
        self.directory = RedisDirectory(cluster)
        self._core = None
        self.publishesLocalOnly = 0
        self.publishesSent = 0
        self.publishesReceived = 0
        self.badMessages = 0
        self.reapedConnections = 0
        # (origin node, delivery) while a publish is being delivered on
        # this node: what a group resolver may ask to choose consistently
        # with the other nodes (the MQTT face's shared subscriptions).
        self.delivering = None
        cluster.onMessage(_PUB, self._published)
        cluster.onMessage(_CMD, self._commanded)
        cluster.onResync(self._register)
        cluster.onNodeDead(self._reap)

    def attach(self, core):
        self._core = core

    def healthy(self):
        return self._core is not None and self.cluster.healthy

    COUNTERS = ("publishesSent", "publishesReceived", "publishesLocalOnly", "badMessages",
                "reapedConnections")

    def stats(self):
        figures = {k: getattr(self, k) for k in self.COUNTERS}
        figures.update(node=self.nodeId, redisConnected=bool(self.cluster.redis.connected),
                       nodesReaped=self.cluster.reaped)
        return figures

    # -- publishing -------------------------------------------------------

    def _deliverLocal(self, origin, hubName, target, delivery):
        outer, self.delivering = self.delivering, (origin, delivery)
        try:
            self._core.deliverLocal(hubName, target, delivery)
        finally:
            self.delivering = outer

    def publish(self, hubName, target, delivery):
        self._deliverLocal(self.nodeId, hubName, target, delivery)
        if target.kind == Target.CONNECTION:
            hub = self._core.existingHub(hubName)
            if hub is not None and hub.connectionExists(target.name):
                # Its one receiver is here: nothing to tell the others.
                return succeed(None)
        if not self.cluster.healthy:
            self.publishesLocalOnly += 1
            return succeed(None)
        self.publishesSent += 1
        # Accepted once queued for this turn's PUBLISH: waiting for Redis
        # would cost a Deferred per message and add its round trip to acks.
        self.cluster.post(_PUB, encodeDelivery(hubName, target, delivery), self._localOnly)
        return succeed(None)

    def _localOnly(self, failure, count):
        failure.trap(Unavailable)
        self.publishesLocalOnly += count

    def _published(self, origin, payload):
        try:
            hubName, target, delivery = decodeDelivery(payload)
        except Exception as e:
            self.badMessages += 1
            log.warn("cluster: malformed publish from {origin} dropped: {e}", origin=origin, e=e)
            return
        self.publishesReceived += 1
        self._deliverLocal(origin, hubName, target, delivery)

    # -- commands ---------------------------------------------------------

    def command(self, hubName, command, node=None):
        if node == self.nodeId:
            self._core.applyCommand(hubName, command)
            return succeed(None)
        if not self.cluster.healthy:
            return self._refused()
        payload = json.dumps([hubName, command], separators=(",", ":")).encode("utf-8")
        if node is None:
            self._core.applyCommand(hubName, command)
            return self.cluster.broadcast(_CMD, payload).addCallback(lambda _: None)
        return self.cluster.send(node, _CMD, payload).addCallback(lambda _: None)

    def _refused(self):
        return fail(Unavailable("the cluster (Redis) is unreachable; try again later"))

    def _commanded(self, origin, payload):
        try:
            hubName, command = jsonstrict.loads(payload)
            command["op"]
        except Exception as e:
            self.badMessages += 1
            log.warn("cluster: malformed command from {origin} dropped: {e}", origin=origin, e=e)
            return
        self._core.applyCommand(hubName, command)

    # -- nodes ------------------------------------------------------------

    def _register(self):
        if self._core is None:
            return succeed(None)

        def registered(result):
            for hub in list(self._core.hubs.values()):
                hub.rejoinUserGroups()
            return result
        return self.directory.register(self._core.hubs).addCallback(registered)

    def _reap(self, nodeId):
        def removed(n):
            self.reapedConnections += n
            log.warn("cluster: removed {n} connections of node {node}", n=n, node=nodeId)
        return self.directory.reap(nodeId).addCallback(removed)
