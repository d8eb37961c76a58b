# -*- test-case-name: tests.test_cluster_node -*-
"""
This node's place in the cluster: its id, node-to-node messages over Redis
pub/sub, and liveness (heartbeats, and the reaping of nodes that stopped
beating).

Every node subscribes to two channels: C{<prefix>:bus}, which every node
hears, and C{<prefix>:node:<id>}, its own.  A Redis message is
C{origin LF topic LF payload}, or, for the messages one reactor turn made,
C{origin LF * LF} then each C{topic LF payload} behind its 4-byte length;
handlers are registered per topic by the
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
import struct

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from broker.cluster.redis import RedisUnavailable
from broker.core.errors import Unavailable

log = Logger()

# Refresh our alive key (it holds this run's token); answer 1 when it had
# expired (we may have been reaped, or Redis lost its data), so the node
# re-registers itself, and 2 when it held another run's token: an earlier
# run of this node id died (SIGKILL) and this one started before the
# others gave it up, so nobody reaps what that run held unless we do.  A
# node (re)appearing also drops the reaping claim on its id, left by its
# own clean stop or by whoever reaped it, so it can be reaped again.
_BEAT = """
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if not old then
  redis.call('DEL', KEYS[3])
  return 1
end
if old ~= ARGV[4] then return 2 end
return 0
"""

EXPIRED, EARLIER_RUN = 1, 2


_LENGTH = struct.Struct(">I")


def _fireAll(result, waiters):
    """
    Fire each waiter of one PUBLISH: a L{Deferred}, or the C{onFailure}
    of L{Cluster.post} messages (told once, with their count).
    """
    failed = {}
    for w in waiters:
        if isinstance(w, defer.Deferred):
            if isinstance(result, Failure):
                w.errback(result)
            else:
                w.callback(result)
        elif isinstance(result, Failure):
            failed[w] = failed.get(w, 0) + 1
    for onFailure, count in failed.items():
        onFailure(result, count)


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
        # Tells this run from an earlier one under the same (configured) id.
        self.run = secrets.token_hex(8)
        self.heartbeat = heartbeat
        self.deadAfter = deadAfter
        self._handlers = {}
        self._deadHooks = []
        self._resyncHooks = []
        self._beat = None
        self._beating = False
        self._outbox = []
        self._flushing = None
        self._origin = self.nodeId.encode("utf-8")
        self.badMessages = 0
        self.reaped = 0
        self.busChannel = self.key("bus")
        self.nodeChannel = self.key("node", self.nodeId)
        for channel, handler in ((self.busChannel, self._fromBus),
                                 (self.nodeChannel, self._received)):
            # Subscribed again on every reconnection; a failure here is the
            # outage the link reports.
            redis.subscribe(channel, handler).addErrback(lambda f: None)
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
        return b"%s\n%s" % (topic.encode("ascii"), payload)

    def broadcast(self, topic, payload, registering=False):
        """
        Send C{payload} (bytes) to every other node.

        @param registering: see L{RedisClient.execute} (from an
            L{onResync} hook).
        @return: a L{Deferred} firing once Redis took it, or failing with
            L{RedisUnavailable}.
        """
        return self._enqueue(self.busChannel, self._frame(topic, payload), registering)

    def send(self, nodeId, topic, payload, registering=False):
        """
        Send C{payload} to the node C{nodeId} (which may be this one).

        @return: a L{Deferred} firing with the number of subscribers that
            got it (0: that node is gone).
        """
        return self._enqueue(self.key("node", nodeId), self._frame(topic, payload), registering)

    def post(self, topic, payload, onFailure):
        """
        L{broadcast} without a L{Deferred} per message, for the engine's
        publishes: when a PUBLISH carrying some fails,
        C{onFailure(failure, count)} is called once with how many.
        """
        if not self.redis.connected:
            onFailure(Failure(RedisUnavailable("Redis is not reachable")), 1)
            return
        self._outbox.append((self.busChannel, self._frame(topic, payload), onFailure))
        if self._flushing is None:
            self._flushing = self.reactor.callLater(0, self.flush)

    # Messages made in one reactor turn leave in one PUBLISH per run of
    # messages to the same channel, in the order they were made: a burst of
    # small publishes (UDP telemetry, a busy group) costs Redis one command,
    # not one each.

    def _enqueue(self, channel, frame, registering):
        if not (self.redis.connected or registering):
            return defer.fail(RedisUnavailable(
                f"Redis at {self.redis.host}:{self.redis.port} is not reachable"))
        d = defer.Deferred()
        self._outbox.append((channel, frame, d))
        if registering:
            self.flush(registering=True)
        elif self._flushing is None:
            self._flushing = self.reactor.callLater(0, self.flush)
        return d

    def flush(self, registering=False):
        """
        Send what is queued now (the engine calls it before anything it
        sends outside the bus, so order holds).
        """
        if self._flushing is not None:
            if self._flushing.active():
                self._flushing.cancel()
            self._flushing = None
        queue, self._outbox = self._outbox, []
        origin = self.nodeId.encode("utf-8")
        i = 0
        while i < len(queue):
            channel = queue[i][0]
            j = i + 1
            while j < len(queue) and queue[j][0] == channel:
                j += 1
            run = queue[i:j]
            if len(run) == 1:
                message = b"%s\n%s" % (origin, run[0][1])
            else:
                message = b"".join([b"%s\n*\n" % origin]
                                   + [_LENGTH.pack(len(f)) + f for _, f, _ in run])
            waiters = [d for _, _, d in run]
            self.redis.execute("PUBLISH", channel, message, registering=registering) \
                .addBoth(_fireAll, waiters)
            i = j

    def _fromBus(self, message):
        self._received(message, fromBus=True)

    def _received(self, message, fromBus=False):
        try:
            origin, rest = message.split(b"\n", 1)
            # A broadcast comes back to its sender too, which handled it
            # locally already; a message sent to this node itself does not.
            if fromBus and origin == self._origin:
                return
            origin = origin.decode("utf-8", "replace")
            if rest.startswith(b"*\n"):
                frames, at = [], 2
                while at < len(rest):
                    (n,) = _LENGTH.unpack_from(rest, at)
                    if at + 4 + n > len(rest):
                        raise ValueError("truncated batch")
                    frames.append(rest[at + 4:at + 4 + n])
                    at += 4 + n
            else:
                frames = [rest]
            parsed = [f.split(b"\n", 1) for f in frames]
        except Exception:
            self.badMessages += 1
            log.warn("cluster: malformed bus message dropped ({n} bytes)", n=len(message))
            return
        for parts in parsed:
            if len(parts) != 2:
                self.badMessages += 1
                continue
            handler = self._handlers.get(parts[0])
            if handler is not None:
                try:
                    handler(origin, parts[1])
                except Exception:
                    log.failure("cluster: handling {topic} from {origin} failed",
                                topic=parts[0], origin=origin)

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
        its alive key had expired.  After a (re)connection the hooks run
        before the link reports itself connected (so nobody sees the node
        healthy before it is registered): their commands pass
        C{registering=True}.
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
                [self.nodeId, int(self.deadAfter * 1000), self.reactor.seconds(), self.run])

    @defer.inlineCallbacks
    def _registerNode(self):
        keys, args = self._beatArgs()
        state = yield self.redis.eval(_BEAT, keys, args, registering=True)
        if state == EARLIER_RUN:
            # Before this run is reported connected (so before it can take
            # any cluster-wide request): what its earlier run held goes
            # first, then this run registers what it holds.
            yield self._buryEarlierRun()
            return
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
            if self._flushing is not None and self._flushing.active():
                self._flushing.cancel()
            self._flushing = None
            queue, self._outbox = self._outbox, []
            _fireAll(Failure(RedisUnavailable("the node stopped")), [d for _, _, d in queue])
            return
        self.flush()
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
            state = yield self.redis.eval(_BEAT, keys, args)
            if state == EARLIER_RUN:
                yield self._buryEarlierRun()
            elif state == EXPIRED:
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
    def _buryEarlierRun(self):
        """
        An earlier run of this node id died without leaving and this run
        took its alive key over before anyone reaped it: do what reaping
        it would have done (the dead-node hooks for this id, here), then
        register again what this run holds, as a node that was given up
        for dead does.
        """
        log.warn("cluster: an earlier run of node {node} ended without leaving (or another "
                 "process uses this node_id); removing what it held", node=self.nodeId)
        for hook in list(self._deadHooks):
            yield hook(self.nodeId)
        for hook in list(self._resyncHooks):
            yield hook()

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
