# -*- test-case-name: tests.test_mqtt_redisstore -*-
"""
The MQTT face's durable state in Redis, for cluster mode: what
L{broker.mqtt.store.SQLiteStore} keeps in one node's file, shared by every
node, so a session left on one node is taken up on another.  Plus what
only a cluster needs: which node holds each session, the wills a node's
clients left (so a node killed with SIGKILL does not take them along), and
which nodes have members of each shared subscription.

Keys, under C{P = <prefix>:mqtt} and C{HK = P:<len(hub)>:<hub>}, a client
id written C{<len>:<id>} (so no two names collide, whatever they hold):

  - C{HK:s}          hash client id -> session C{[user, version, expiry,
                     disconnectedAt, subscriptions]} (JSON);
  - C{HK:o:<cid>}    sorted set of the session's queued message ids, by
                     their order (C{P:seq}, one counter for the cluster);
  - C{HK:m:<cid>}    hash id -> the message (JSON, payload in base64);
  - C{HK:p:<cid>}    hash id -> C{"pid state"} once it is in flight;
  - C{HK:r}          hash topic -> retained message (JSON);
  - C{P:hubs}        set of the hubs with state (retained messages are
                     loaded for every hub at start-up);
  - C{P:own}         hash C{[hub, cid]} -> the node holding that session;
  - C{P:n:<node>}    set of the C{[hub, cid]} a node holds, and
    C{P:owners}      the set of nodes holding any (to adopt a dead node's
                     sessions without a scan);
  - C{P:w:<node>}    hash C{[hub, cid]} -> the will of a client connected
                     to that node (JSON);
  - C{P:shares}      set of C{[hub, share, filter, node]}: the nodes with
                     members of a shared subscription.

Writes are sent in the order they are made on the node's one command
connection, so L{whenFlushed} is "every write made so far is answered": a
QoS 1/2 PUBLISH is acknowledged once Redis has taken what it queued on
this node.  A write that fails (Redis unreachable) is counted and logged
once a minute, as a failed SQLite write is.
"""

import base64
import json

from twisted.internet import defer
from twisted.logger import Logger

from broker.core.limits import QuietLog
from broker.mqtt.message import propsFromJSON, propsToJSON

log = Logger()

_dumps = json.JSONEncoder(separators=(",", ":")).encode

# ARGV: order key, messages key, seq key, id, row
_ADD = """
local n = redis.call('INCR', ARGV[3])
redis.call('ZADD', ARGV[1], n, ARGV[4])
redis.call('HSET', ARGV[2], ARGV[4], ARGV[5])
return n
"""

# ARGV: order, messages, pids -> flat [id, row, pidstate or '', ...] in order
_MESSAGES = """
local out = {}
for _, id in ipairs(redis.call('ZRANGE', ARGV[1], 0, -1)) do
  local row = redis.call('HGET', ARGV[2], id)
  if row then
    out[#out + 1] = id
    out[#out + 1] = row
    out[#out + 1] = redis.call('HGET', ARGV[3], id) or ''
  end
end
return out
"""

# Take a session for ARGV[2] (node); ARGV: P, entry, node -> the previous
# holder ('' for none).
_CLAIM = """
local old = redis.call('HGET', ARGV[1] .. ':own', ARGV[2]) or ''
if old ~= '' and old ~= ARGV[3] then
  redis.call('SREM', ARGV[1] .. ':n:' .. old, ARGV[2])
end
redis.call('HSET', ARGV[1] .. ':own', ARGV[2], ARGV[3])
redis.call('SADD', ARGV[1] .. ':n:' .. ARGV[3], ARGV[2])
redis.call('SADD', ARGV[1] .. ':owners', ARGV[3])
return old
"""

# Take a session over from ARGV[3] only if that node still holds it
# (the adoption of a dead node's sessions); ARGV: P, entry, from, to -> 1/0.
_ADOPT = """
local key = ARGV[1] .. ':n:' .. ARGV[3]
redis.call('SREM', key, ARGV[2])
if redis.call('SCARD', key) == 0 then redis.call('SREM', ARGV[1] .. ':owners', ARGV[3]) end
if redis.call('HGET', ARGV[1] .. ':own', ARGV[2]) ~= ARGV[3] then return 0 end
redis.call('HSET', ARGV[1] .. ':own', ARGV[2], ARGV[4])
redis.call('SADD', ARGV[1] .. ':n:' .. ARGV[4], ARGV[2])
redis.call('SADD', ARGV[1] .. ':owners', ARGV[4])
return 1
"""

# Hold a session again after an outage unless another node took it
# meanwhile; ARGV: P, entry, node -> 1 (held) / 0 (another node's).
_RECLAIM = """
local old = redis.call('HGET', ARGV[1] .. ':own', ARGV[2])
if old and old ~= ARGV[3] then return 0 end
redis.call('HSET', ARGV[1] .. ':own', ARGV[2], ARGV[3])
redis.call('SADD', ARGV[1] .. ':n:' .. ARGV[3], ARGV[2])
redis.call('SADD', ARGV[1] .. ':owners', ARGV[3])
return 1
"""

# Let a session go if this node (ARGV[3]) still holds it; ARGV: P, entry, node.
_DISOWN = """
redis.call('SREM', ARGV[1] .. ':n:' .. ARGV[3], ARGV[2])
redis.call('HDEL', ARGV[1] .. ':w:' .. ARGV[3], ARGV[2])
if redis.call('HGET', ARGV[1] .. ':own', ARGV[2]) == ARGV[3] then
  redis.call('HDEL', ARGV[1] .. ':own', ARGV[2])
  return 1
end
return 0
"""


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _part(name):
    return f"{len(name.encode('utf-8'))}:{name}"


def retainedToJSON(message):
    """A retained L{MqttMessage} as the JSON text Redis and the bus keep."""
    return _dumps([base64.b64encode(message.data).decode("ascii"), message.qos,
                   propsToJSON(message.properties), message.expiresAt])


def retainedFromJSON(text):
    """C{(payload, qos, props, expiresAt)} of L{retainedToJSON}'s text."""
    payload, qos, props, expiresAt = json.loads(text)
    return base64.b64decode(payload), qos, propsFromJSON(props), expiresAt


class RedisStore:
    """
    @param cluster: the node's L{broker.cluster.node.Cluster} (its Redis
        link, key prefix and node id).
    @param durable: whether sessions, their queues and retained messages
        are written (C{mqtt.persistence}); who holds a session, wills and
        share groups are, in any case.
    @ivar failures: writes Redis refused or could not take.
    """

    def __init__(self, reactor, cluster, durable=True):
        self._reactor = reactor
        self.cluster = cluster
        self.redis = cluster.redis
        self.nodeId = cluster.nodeId
        self.prefix = cluster.key("mqtt")
        self._hubKeys = {}
        self._pending = 0
        self._waiters = []
        self._ids = 0
        # Ids unique to this run of this node: messages queued on several
        # nodes for one session (before and after a take-over) never share one.
        self._run = cluster.run
        self.durable = durable
        self.failures = 0
        self._quiet = QuietLog(reactor.seconds)

    # -- keys -----------------------------------------------------------------

    def hubKey(self, hub):
        hk = self._hubKeys.get(hub)
        if hk is None:
            hk = self._hubKeys[hub] = f"{self.prefix}:{_part(hub)}"
        return hk

    def _sessionKeys(self, hub, clientId):
        hk, c = self.hubKey(hub), _part(clientId)
        return f"{hk}:o:{c}", f"{hk}:m:{c}", f"{hk}:p:{c}"

    @staticmethod
    def entry(hub, clientId):
        return _dumps([hub, clientId])

    # -- writes, in order -----------------------------------------------------

    def _write(self, d):
        self._pending += 1
        d.addErrback(self._failed)
        d.addBoth(self._written)
        return d

    def _execute(self, *args):
        return self._write(self.redis.execute(*args))

    def _eval(self, script, *args):
        return self._write(self.redis.eval(script, (), args))

    def _failed(self, failure):
        self.failures += 1
        self._quiet.info(("mqtt", "redis store"),
                         "mqtt: a write to the cluster store (Redis) failed: {why}",
                         why=failure.getErrorMessage())

    def _written(self, result):
        self._pending -= 1
        if not self._pending:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)
        return result

    def whenFlushed(self):
        """
        A Deferred firing once every write made so far is answered (they
        are answered in order).
        """
        if not self._pending:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    # -- the store interface (as SQLiteStore) ---------------------------------

    def addMessage(self, session, out):
        if not self.durable:
            return
        self._ids += 1
        out.seq = f"{self._run}.{self._ids}"
        order, messages, _ = self._sessionKeys(session.hubName, session.clientId)
        row = _dumps([out.topic, base64.b64encode(out.payload).decode("ascii"), out.qos,
                      bool(out.retain), propsToJSON(out.props), out.expiresAt,
                      list(out.subIds)])
        self._eval(_ADD, order, messages, f"{self.prefix}:seq", out.seq, row)
        if out.pid is not None:
            self.updateMessage(session, out)

    def updateMessage(self, session, out):
        if not self.durable:
            return
        if out.seq is not None and out.pid is not None:
            _, _, pids = self._sessionKeys(session.hubName, session.clientId)
            self._execute("HSET", pids, out.seq, f"{out.pid} {out.state}")

    def removeMessage(self, session, out):
        if not self.durable:
            return
        if out.seq is not None:
            order, messages, pids = self._sessionKeys(session.hubName, session.clientId)
            self._execute("ZREM", order, out.seq)
            self._execute("HDEL", messages, out.seq)
            self._execute("HDEL", pids, out.seq)
            out.seq = None

    def saveSession(self, session):
        if not self.durable:
            return
        record = _dumps([session.userId, session.version, session.expiryInterval,
                         None if session.online else self._reactor.seconds(),
                         [o.toJSON() for o in session.subs.values()]])
        self._execute("SADD", f"{self.prefix}:hubs", session.hubName)
        self._execute("HSET", self.hubKey(session.hubName) + ":s", session.clientId, record)

    def deleteSession(self, session):
        if not self.durable:
            return
        hub, clientId = session.hubName, session.clientId
        self._execute("HDEL", self.hubKey(hub) + ":s", clientId)
        self._execute("DEL", *self._sessionKeys(hub, clientId))

    def setRetained(self, hub, topic, message):
        if not self.durable:
            return
        key = self.hubKey(hub) + ":r"
        if message is None:
            self._execute("HDEL", key, topic)
        else:
            self._execute("SADD", f"{self.prefix}:hubs", hub)
            self._execute("HSET", key, topic, retainedToJSON(message))

    def load(self):
        """
        Nothing at start-up: in a cluster a session is read when a node
        takes it (L{loadSession}), retained messages once Redis is
        reachable (L{loadRetained}).
        """
        return [], [], []

    # -- reads ------------------------------------------------------------------

    @defer.inlineCallbacks
    def loadSession(self, hub, clientId):
        """
        @return: a Deferred firing with C{(session row, message rows)} in
            L{SQLiteStore.load}'s row shapes (C{None, []} for no session).
        """
        raw = yield self.redis.execute("HGET", self.hubKey(hub) + ":s", clientId)
        if raw is None:
            return None, []
        userId, version, expiry, disconnectedAt, subs = json.loads(raw)
        row = (hub, clientId, userId, version, expiry, disconnectedAt, json.dumps(subs))
        flat = yield self.redis.eval(_MESSAGES, (), self._sessionKeys(hub, clientId))
        messages = []
        for i in range(0, len(flat), 3):
            seq = _text(flat[i])
            topic, payload, qos, retain, props, expiresAt, subIds = json.loads(flat[i + 1])
            pid = state = None
            if flat[i + 2]:
                pid, state = (int(x) for x in _text(flat[i + 2]).split())
            messages.append((seq, hub, clientId, topic, base64.b64decode(payload), qos,
                             retain, json.dumps(props), expiresAt, json.dumps(subIds), pid,
                             state if state is not None else 0))
        return row, messages

    @defer.inlineCallbacks
    def loadRetained(self):
        """
        @return: a Deferred firing with every hub's retained messages as
            C{(hub, topic, payload, qos, props JSON, expiresAt)} rows.
        """
        hubs = yield self.redis.execute("SMEMBERS", f"{self.prefix}:hubs")
        rows = []
        for hub in sorted(_text(h) for h in hubs):
            flat = yield self.redis.execute("HGETALL", self.hubKey(hub) + ":r")
            for i in range(0, len(flat), 2):
                payload, qos, props, expiresAt = retainedFromJSON(flat[i + 1])
                rows.append((hub, _text(flat[i]), payload, qos, json.dumps(propsToJSON(props)),
                             expiresAt))
        return rows

    # -- who holds a session --------------------------------------------------

    def claim(self, hub, clientId):
        """
        This node now holds the session.

        @return: a Deferred firing with the node that held it (C{""} for
            none).
        """
        return self.redis.eval(_CLAIM, (), (self.prefix, self.entry(hub, clientId),
                                            self.nodeId)).addCallback(_text)

    def reclaim(self, hub, clientId):
        """
        After reconnecting to Redis: hold this node's session again (Redis
        may have lost the claim) unless another node took it.

        @return: a Deferred firing with whether this node still holds it.
        """
        return self.redis.eval(_RECLAIM, (), (self.prefix, self.entry(hub, clientId),
                                              self.nodeId), registering=True).addCallback(bool)

    def disown(self, hub, clientId):
        """The session ended here: nobody holds it (unless another node took it)."""
        return self._eval(_DISOWN, self.prefix, self.entry(hub, clientId), self.nodeId)

    def adopt(self, entry, fromNode):
        """
        Take the session C{entry} from C{fromNode} if it still holds it.

        @return: a Deferred firing with whether this node took it.
        """
        return self.redis.eval(_ADOPT, (), (self.prefix, entry, fromNode,
                                            self.nodeId)).addCallback(bool)

    def held(self, node):
        """A Deferred firing with the C{(hub, clientId)} the node holds."""
        return self.redis.execute("SMEMBERS", f"{self.prefix}:n:{node}").addCallback(
            lambda raw: sorted(tuple(json.loads(e)) for e in raw))

    def holders(self):
        """A Deferred firing with the nodes that hold sessions."""
        return self.redis.execute("SMEMBERS", f"{self.prefix}:owners").addCallback(
            lambda raw: sorted(_text(n) for n in raw))

    # -- wills of connected clients -----------------------------------------

    def setWill(self, hub, clientId, record):
        """Keep the will (a JSON-able record) of a client connected here."""
        return self._execute("HSET", f"{self.prefix}:w:{self.nodeId}",
                             self.entry(hub, clientId), _dumps(record))

    def clearWill(self, hub, clientId):
        return self._execute("HDEL", f"{self.prefix}:w:{self.nodeId}",
                             self.entry(hub, clientId))

    @defer.inlineCallbacks
    def takeWills(self, node):
        """
        The wills the clients of C{node} left, removed (so they are
        published once).

        @return: a Deferred firing with C{[((hub, clientId), record)]}.
        """
        key = f"{self.prefix}:w:{node}"
        flat = yield self.redis.execute("HGETALL", key)
        yield self.redis.execute("DEL", key)
        return [(tuple(json.loads(flat[i])), json.loads(flat[i + 1]))
                for i in range(0, len(flat), 2)]

    # -- shared subscriptions -------------------------------------------------

    def setShare(self, hub, share, topicFilter, present):
        """Whether this node has members of C{$share/share/topicFilter}."""
        entry = _dumps([hub, share, topicFilter, self.nodeId])
        return self._execute("SADD" if present else "SREM", f"{self.prefix}:shares", entry)

    def shares(self):
        """A Deferred firing with every C{(hub, share, filter, node)}."""
        return self.redis.execute("SMEMBERS", f"{self.prefix}:shares").addCallback(
            lambda raw: [tuple(json.loads(e)) for e in raw])

    def dropShares(self, node):
        """Forget the shared-subscription members of C{node} (dead)."""
        def drop(entries):
            gone = [e for e in entries if e[3] == node]
            if gone:
                return self.redis.execute("SREM", f"{self.prefix}:shares",
                                          *[_dumps(list(e)) for e in gone]).addCallback(
                    lambda _: gone)
            return gone
        return self.shares().addCallback(drop)
