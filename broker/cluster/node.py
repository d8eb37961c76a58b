# -*- test-case-name: tests.test_cluster_node -*-
"""
This node's place in the cluster: its id, node-to-node messages over Redis
pub/sub, and liveness (heartbeats, and the reaping of nodes that stopped
beating).

Every node subscribes to two channels: C{<prefix>:bus}, which every node
hears, and C{<prefix>:node:<id>}, its own.  A message is
C{topic LF origin LF payload}; handlers are registered per topic by the
engine and by the faces (IoT held requests, peer-group events...).

Liveness: every C{heartbeat} seconds a node refreshes
C{<prefix>:alive:<id>} (expiring after C{deadAfter}) and its score in the
sorted set C{<prefix>:nodes}.  Each node also looks for members of that set
whose alive key has expired; the first to claim C{<prefix>:reap:<id>} runs
the L{onNodeDead} hooks for it (the engine drops its connections from the
directory), then forgets it.  So a node killed with SIGKILL vanishes from
presence within C{deadAfter + heartbeat} seconds.
"""

import os
import secrets
import socket

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from broker.core.errors import Unavailable

log = Logger()

# Refresh our alive key; answer 1 when it had expired (we may have been
# reaped, or Redis lost its data), so the node re-registers itself.  A
# node (re)appearing also drops the reaping claim on its id, left by its
# own clean stop or by whoever reaped it, so it can be reaped again.
_BEAT = """
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if existed == 0 then redis.call('DEL', KEYS[3]) end
return 1 - existed
"""


def newNodeId():
    """
    A readable, unique node id: host name, process id, random suffix.
    """
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Cluster(service.Service):
    """
    @ivar nodeId: this node's id (unique per process start).
    @ivar redis: the L{broker.cluster.redis.RedisClient} (a child service of
        whoever builds this; see L{broker.cluster.setup}).
    @ivar prefix: the prefix of every Redis key and channel of this cluster.
    """

    name = "cluster"

    def __init__(self, reactor, redis, prefix="broker", nodeId=None,
                 heartbeat=1.0, deadAfter=5.0):
        self.reactor = reactor
        self.redis = redis
        self.prefix = prefix
        self.nodeId = nodeId or newNodeId()
        self.heartbeat = heartbeat
        self.deadAfter = deadAfter
        self._handlers = {}
        self._deadHooks = []
        self._resyncHooks = []
        self._beat = None
        self._beating = False
        self.reaped = 0
        self.busChannel = self.key("bus")
        self.nodeChannel = self.key("node", self.nodeId)
        redis.subscribe(self.busChannel, self._fromBus)
        redis.subscribe(self.nodeChannel, self._received)
        redis.onConnected(self._registerNode)

    def key(self, *parts):
        """
        The Redis key C{<prefix>:<part>:<part>...}.
        """
        return ":".join((self.prefix,) + tuple(str(p) for p in parts))

    @property
    def healthy(self):
        return self.redis.connected

    # -- messages ---------------------------------------------------------

    def onMessage(self, topic, handler):
        """
        Call C{handler(origin, payload)} for every message on C{topic} that
        reaches this node (broadcast or sent to it) from another node.
        """
        self._handlers[topic.encode("ascii")] = handler

    def _frame(self, topic, payload):
        return b"%s\n%s\n%s" % (topic.encode("ascii"), self.nodeId.encode("utf-8"), payload)

    def broadcast(self, topic, payload):
        """
        Send C{payload} (bytes) to every other node.

        @return: a L{Deferred} firing once Redis took it, or failing with
            L{RedisUnavailable}.
        """
        return self.redis.execute("PUBLISH", self.busChannel, self._frame(topic, payload))

    def send(self, nodeId, topic, payload):
        """
        Send C{payload} to the node C{nodeId} (which may be this one).

        @return: a L{Deferred} firing with the number of subscribers that
            got it (0: that node is gone).
        """
        return self.redis.execute("PUBLISH", self.key("node", nodeId),
                                  self._frame(topic, payload))

    def _fromBus(self, message):
        self._received(message, fromBus=True)

    def _received(self, message, fromBus=False):
        try:
            topic, origin, payload = message.split(b"\n", 2)
        except ValueError:
            log.warn("cluster: malformed bus message dropped ({n} bytes)", n=len(message))
            return
        origin = origin.decode("utf-8", "replace")
        # A broadcast comes back to its sender too, which handled it
        # locally already; a message sent to this node itself does not.
        if fromBus and origin == self.nodeId:
            return
        handler = self._handlers.get(topic)
        if handler is not None:
            handler(origin, payload)

    # -- liveness ---------------------------------------------------------

    def onNodeDead(self, hook):
        """
        Call C{hook(nodeId)} (may return a L{Deferred}) once, on one node of
        the cluster, for every node that stopped heartbeating.
        """
        self._deadHooks.append(hook)

    def onResync(self, hook):
        """
        Call C{hook()} (may return a L{Deferred}) whenever this node must
        re-register what it holds: after (re)connecting to Redis, and when
        its alive key had expired.
        """
        self._resyncHooks.append(hook)

    def liveNodes(self):
        """
        @return: a L{Deferred} firing with the ids of the nodes that beat
            within C{deadAfter}, this one included.
        """
        return self.redis.execute("ZRANGEBYSCORE", self.key("nodes"),
                                  self.reactor.seconds() - self.deadAfter, "+inf").addCallback(
            lambda ids: [i.decode("utf-8") for i in ids])

    def _beatArgs(self):
        return ([self.key("alive", self.nodeId), self.key("nodes"), self.key("reap", self.nodeId)],
                [self.nodeId, int(self.deadAfter * 1000), self.reactor.seconds()])

    @defer.inlineCallbacks
    def _registerNode(self):
        keys, args = self._beatArgs()
        yield self.redis.eval(_BEAT, keys, args, _early=True)
        for hook in list(self._resyncHooks):
            yield hook()

    def startService(self):
        super().startService()
        self._beat = task.LoopingCall(self._tick)
        self._beat.clock = self.reactor
        self._beat.start(self.heartbeat, now=False).addErrback(
            lambda f: log.failure("cluster heartbeat stopped", f))

    @defer.inlineCallbacks
    def stopService(self):
        """
        Leave the cluster at once rather than after C{deadAfter}: this
        node's dead-node hooks run for itself (the engine removes its
        connections from the directory, the faces what they registered),
        then it forgets its alive key.
        """
        super().stopService()
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        if not self.redis.connected:
            return
        try:
            yield self._bury(self.nodeId)
            yield self.redis.execute("DEL", self.key("alive", self.nodeId))
        except Exception:
            log.failure("cluster: leaving cleanly failed; the others will reap node {node}",
                        node=self.nodeId)

    @defer.inlineCallbacks
    def _tick(self):
        if self._beating or not self.redis.connected:
            return
        self._beating = True
        try:
            keys, args = self._beatArgs()
            expired = yield self.redis.eval(_BEAT, keys, args)
            if expired:
                log.warn("cluster: node {node} had been given up for dead; re-registering",
                         node=self.nodeId)
                for hook in list(self._resyncHooks):
                    yield hook()
            yield self._reap()
        except Unavailable:
            pass    # the Redis link logs the outage once
        except Exception:
            log.failure("cluster: heartbeat failed")
        finally:
            self._beating = False

    @defer.inlineCallbacks
    def _reap(self):
        members = yield self.redis.execute("ZRANGE", self.key("nodes"), 0, -1)
        for raw in members:
            node = raw.decode("utf-8")
            if node == self.nodeId:
                continue
            alive = yield self.redis.execute("EXISTS", self.key("alive", node))
            if alive:
                continue
            if (yield self._bury(node)):
                log.warn("cluster: node {node} stopped heartbeating; removed what it held",
                         node=node)
                self.reaped += 1

    @defer.inlineCallbacks
    def _bury(self, node):
        """
        Claim C{node} (only one node of the cluster runs the hooks for it),
        run the dead-node hooks, and forget it.

        @return: a L{Deferred} firing with whether this node did it.
        """
        claimed = yield self.redis.execute("SET", self.key("reap", node), self.nodeId,
                                           "NX", "PX", 60000)
        if not claimed:
            return False
        for hook in list(self._deadHooks):
            yield hook(node)
        yield self.redis.execute("ZREM", self.key("nodes"), node)
        return True
