# -*- test-case-name: tests.test_iot_store -*-
"""
Store-and-forward in cluster mode: the per-device queues and the issued
keys in Redis, shared by every node, so a message accepted on one node is
delivered by whichever node the device connects to.

Per device (names through L{part}, so a ":" in an id cannot make two keys
collide):

  - C{iot:FLEET:q:DEV}, a sorted set of message ids (score = id): the order;
  - C{iot:FLEET:qe:DEV}, the same ids scored by expiry (wall-clock seconds);
  - C{iot:FLEET:qm:DEV}, a hash id -> C{ptype "\\n" data};
  - C{iot:FLEET:qt:DEV}, a hash id -> enqueue time (wall-clock seconds);
  - C{iot:FLEET:queued}, the set of the fleet's devices with a queue, and
    C{iot:fleets} the set of fleets that ever had one (for L{depths} and
    L{purgeExpired});
  - C{iot:FLEET:last}, a hash device -> its last telemetry,
    C{received "\\n" via "\\n" ptype "\\n" data} (L{broker.iot.lastvalue});
  - C{iot:ids}, the cluster-wide id counter (INCR), so ids increase across
    nodes and a device's ACK space never sees two messages with one id.
    Ids must keep increasing even when Redis loses the counter (it
    restarted without persistence, or a replica that lagged took over): a
    device's live session delivers only ids above the last it was sent, and
    a stale ACK must never remove a newer message that reused an id.  So a
    push first raises the counter to the pushing node's wall clock in
    microseconds, or the highest id that node has seen if that is more:
    the ids handed out before a loss were below that unless the cluster
    pushed more than a million messages a second (or the nodes' clocks
    disagree by more than the time since the last push before the loss).

Each operation that must be atomic (push with its depth check, ack, purge)
is one Lua script.  When Redis cannot be reached every operation fails at
once with L{broker.iot.errors.Unavailable}: a push is then refused, never
accepted and lost.  Redis' own durability (appendonly, fsync policy) is the
operator's to configure; docs/iot.md says so.
"""

import json
import time

from twisted.internet import error as netError
from twisted.internet.defer import DeferredList, FirstError, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

import txredisapi

from broker.cluster.redis import RedisUnavailable
from broker.core import jsonstrict
from broker.iot import errors
from broker.iot.frames import Payload
from broker.iot.interfaces import IMessageStore
from broker.iot.lastvalue import ILastValueStore

_LOST = (RedisUnavailable, txredisapi.ConnectionError, txredisapi.TimeoutError,
         netError.ConnectionLost, netError.ConnectionDone)


def part(name):
    """
    A fleet or device id as one component of a Redis key.
    """
    return name.replace("%", "%25").replace(":", "%3A")


def unavailable(f):
    """
    An errback: a Redis outage becomes L{errors.Unavailable}, other
    failures pass through.
    """
    if f.check(*_LOST):
        return Failure(errors.Unavailable(
            f"the cluster store (Redis) is unreachable: {f.getErrorMessage()}"))
    return f


# Drop a queue's messages whose TTL ran out (KEYS[1] the ids by order,
# KEYS[2] the ids by expiry, KEYS[3] the payloads, tkey the enqueue
# times); the ids that went.
_EXPIRE_FN = """
local function expire(now, tkey)
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
  for _, i in ipairs(old) do
    redis.call('ZREM', KEYS[1], i)
    redis.call('HDEL', KEYS[3], i)
    redis.call('HDEL', tkey, i)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  return old
end
"""

_PUSH = _EXPIRE_FN + """
local n = redis.call('ZCARD', KEYS[1])
local maxDepth = tonumber(ARGV[3])
if n >= maxDepth then
  n = n - #expire(ARGV[1], KEYS[7])
  if n >= maxDepth then return -n end
end
if tonumber(redis.call('GET', KEYS[4]) or '0') < tonumber(ARGV[7]) then
  redis.call('SET', KEYS[4], ARGV[7])
end
-- As a string: Lua would print a number above 1e14 in exponent notation.
local id = string.format('%d', redis.call('INCR', KEYS[4]))
redis.call('ZADD', KEYS[1], id, id)
redis.call('ZADD', KEYS[2], ARGV[2], id)
redis.call('HSET', KEYS[3], id, ARGV[4])
redis.call('HSET', KEYS[7], id, ARGV[1])
redis.call('SADD', KEYS[5], ARGV[5])
redis.call('SADD', KEYS[6], ARGV[6])
return id
"""

_PENDING = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')
local limit = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local out = {}
for _, i in ipairs(ids) do
  if #out >= 2 * limit then break end
  local exp = redis.call('ZSCORE', KEYS[2], i)
  if exp and tonumber(exp) > now then
    local blob = redis.call('HGET', KEYS[3], i)
    if blob then
      out[#out + 1] = i
      out[#out + 1] = blob
    end
  end
end
return out
"""

_ACK = """
local removed = 0
for _, i in ipairs(ARGV) do
  removed = removed + redis.call('ZREM', KEYS[1], i)
  redis.call('ZREM', KEYS[2], i)
  redis.call('HDEL', KEYS[3], i)
  redis.call('HDEL', KEYS[4], i)
end
return removed
"""

# KEYS as _ACK; ARGV the ids to delete, none for all: the ids deleted.
_REMOVE = """
local ids = ARGV
if #ids == 0 then ids = redis.call('ZRANGE', KEYS[1], 0, -1) end
local out = {}
for _, i in ipairs(ids) do
  if redis.call('ZREM', KEYS[1], i) == 1 then out[#out + 1] = i end
  redis.call('ZREM', KEYS[2], i)
  redis.call('HDEL', KEYS[3], i)
  redis.call('HDEL', KEYS[4], i)
end
return out
"""

# KEYS as _ACK; ARGV[1] the limit: id, size, enqueued, expires of each.
_LIST = """
local out = {}
for _, i in ipairs(redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)) do
  out[#out + 1] = i
  local blob = redis.call('HGET', KEYS[3], i) or '\\n'
  out[#out + 1] = tostring(#blob - string.find(blob, '\\n', 1, true))
  out[#out + 1] = redis.call('HGET', KEYS[4], i) or ''
  out[#out + 1] = redis.call('ZSCORE', KEYS[2], i) or '0'
end
return out
"""

_PURGE = _EXPIRE_FN + """
local old = expire(ARGV[1], KEYS[5])
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[4], ARGV[2])
end
return old
"""


@implementer(IMessageStore, ILastValueStore)
class RedisMessageStore:
    """
    @param cluster: the L{broker.cluster.node.Cluster} (its C{redis} and
        C{key}).
    @param clock: wall-clock seconds, shared meaning across nodes (TTLs are
        absolute expiry times); injectable for tests.
    """

    def __init__(self, cluster, clock=time.time):
        self.cluster = cluster
        self.redis = cluster.redis
        self._clock = clock
        self.highest = 0           # the highest message id this node has seen

    def _seen(self, messageId):
        if messageId > self.highest:
            self.highest = messageId

    def _keys(self, fleet, deviceId):
        k, f, d = self.cluster.key, part(fleet), part(deviceId)
        return [k("iot", f, "q", d), k("iot", f, "qe", d), k("iot", f, "qm", d)]

    def _timesKey(self, fleet, deviceId):
        return self.cluster.key("iot", part(fleet), "qt", part(deviceId))

    def _eval(self, script, keys, args):
        return self.redis.eval(script, keys, args).addErrback(unavailable)

    def push(self, fleet, deviceId, payload, ttl, maxDepth):
        now = self._clock()
        keys = self._keys(fleet, deviceId) + [
            self.cluster.key("iot", "ids"), self.cluster.key("iot", part(fleet), "queued"),
            self.cluster.key("iot", "fleets"), self._timesKey(fleet, deviceId)]
        blob = payload.type.encode("ascii") + b"\n" + payload.data
        floor = max(self.highest, int(now * 1e6))
        d = self._eval(_PUSH, keys, [repr(now), repr(now + ttl), maxDepth, blob, deviceId,
                                     fleet, floor])

        def pushed(result):
            result = int(result)
            if result < 0:
                raise errors.QueueFull(
                    f"device {deviceId!r} already has {-result} queued messages")
            self._seen(result)
            return result
        return d.addCallback(pushed)

    def pending(self, fleet, deviceId, afterId, limit):
        d = self._eval(_PENDING, self._keys(fleet, deviceId),
                       [int(afterId), int(limit), repr(self._clock())])

        def rows(flat):
            out = []
            for i in range(0, len(flat), 2):
                ptype, _, data = flat[i + 1].partition(b"\n")
                out.append((int(flat[i]), Payload(ptype.decode("ascii"), data)))
            if out:
                self._seen(out[-1][0])
            return out
        return d.addCallback(rows)

    def ack(self, fleet, deviceId, *messageIds):
        if not messageIds:
            return succeed(True)
        return self._eval(_ACK, self._keys(fleet, deviceId) + [self._timesKey(fleet, deviceId)],
                          [int(i) for i in messageIds]).addCallback(
            lambda n: int(n) == len(messageIds))

    def listQueued(self, fleet, deviceId, limit):
        def rows(flat):
            out = []
            for i in range(0, len(flat), 4):
                out.append((int(flat[i]), int(flat[i + 1]),
                            float(flat[i + 2]) if flat[i + 2] else None, float(flat[i + 3])))
            return out
        return self._eval(_LIST, self._keys(fleet, deviceId) + [self._timesKey(fleet, deviceId)],
                          [int(limit)]).addCallback(rows)

    def remove(self, fleet, deviceId, messageIds=None):
        ids = [] if messageIds is None else [int(i) for i in messageIds]
        if messageIds is not None and not ids:
            return succeed([])
        return self._eval(_REMOVE, self._keys(fleet, deviceId) + [self._timesKey(fleet, deviceId)],
                          ids).addCallback(lambda out: sorted(int(i) for i in out))

    def depth(self, fleet, deviceId):
        return self.redis.execute(
            "ZCOUNT", self._keys(fleet, deviceId)[1], "(" + repr(self._clock()),
            "+inf").addCallbacks(int, unavailable)

    def depths(self, fleet):
        now = "(" + repr(self._clock())

        def counted(devices):
            names = [d.decode("utf-8") for d in devices]
            return _all([self.redis.execute("ZCOUNT", self._keys(fleet, n)[1], now, "+inf")
                         for n in names]).addCallback(
                lambda counts: {n: int(c) for n, c in zip(names, counts) if int(c)})
        return self.redis.execute(
            "SMEMBERS", self.cluster.key("iot", part(fleet), "queued")).addCallback(
            counted).addErrback(unavailable)

    def purgeExpired(self):
        now = repr(self._clock())
        k = self.cluster.key

        def fleets(names):
            ds = [self.redis.execute("SMEMBERS", k("iot", part(f.decode("utf-8")), "queued"))
                  .addCallback(devices, f.decode("utf-8")) for f in names]
            return _all(ds).addCallback(flat)

        def devices(names, fleet):
            queued = k("iot", part(fleet), "queued")
            names = [d.decode("utf-8") for d in names]
            ds = [self._eval(_PURGE, self._keys(fleet, d) + [queued, self._timesKey(fleet, d)],
                             [now, d]).addCallback(
                lambda ids, d=d: [(fleet, d, int(i)) for i in ids]) for d in names]
            return _all(ds).addCallback(lambda lists: [r for rs in lists for r in rs])

        def flat(lists):
            return sorted((r for rs in lists for r in rs), key=lambda r: r[2])
        return self.redis.execute("SMEMBERS", k("iot", "fleets")).addCallback(
            fleets).addErrback(unavailable)

    def keys(self, registering=False):
        """
        See L{IMessageStore.keys}; C{registering} while the Redis link is still
        running its (re)connection hooks (a resync).
        """
        def rows(flat):
            out = []
            for i in range(0, len(flat), 2):
                fleet, deviceId = jsonstrict.loads(flat[i])
                out.append((fleet, deviceId, jsonstrict.loads(flat[i + 1])))
            return out
        return self.redis.execute("HGETALL", self.cluster.key("iot", "keys"),
                                  registering=registering).addCallbacks(rows, unavailable)

    def setKey(self, fleet, deviceId, secret):
        return self.redis.execute(
            "HSET", self.cluster.key("iot", "keys"), json.dumps([fleet, deviceId]),
            json.dumps(secret)).addCallbacks(lambda _: None, unavailable)

    def _lastKey(self, fleet):
        return self.cluster.key("iot", part(fleet), "last")

    def saveLastValues(self, rows):
        """
        See L{ILastValueStore.saveLastValues}: one script per
        L{LAST_CHUNK} rows.
        """
        ds = []
        for start in range(0, len(rows), LAST_CHUNK):
            keys, args = [], []
            for fleet, deviceId, payload, received, via in rows[start:start + LAST_CHUNK]:
                keys.append(self._lastKey(fleet))
                args += [deviceId, b"\n".join((repr(received).encode("ascii"),
                                                via.encode("ascii"),
                                                payload.type.encode("ascii"), payload.data))]
            ds.append(self._eval(_LAST, keys, args))
        return _all(ds).addCallback(lambda _: None)

    def lastValue(self, fleet, deviceId):
        def parsed(raw):
            if raw is None:
                return None
            received, via, ptype, data = raw.split(b"\n", 3)
            return Payload(ptype.decode("ascii"), data), float(received), via.decode("ascii")
        return self.redis.execute("HGET", self._lastKey(fleet), deviceId).addCallbacks(
            parsed, unavailable)


# Record last values: KEYS[i] a fleet's hash, ARGV[2i-1] the device,
# ARGV[2i] its value; a value replaces one only if it is not older (its
# first line is the time it was received), so nodes flushing at different
# moments never put an older reading back.
_LAST = """
for i = 1, #KEYS do
  local dev, value = ARGV[2 * i - 1], ARGV[2 * i]
  local old = redis.call('HGET', KEYS[i], dev)
  if not old or tonumber(string.match(old, '^[^\\n]*'))
      <= tonumber(string.match(value, '^[^\\n]*')) then
    redis.call('HSET', KEYS[i], dev, value)
  end
end
return #KEYS
"""

# Rows per EVAL of _LAST: a flush of many devices is split so no one
# script holds Redis long.
LAST_CHUNK = 500


def _firstError(f):
    if f.check(FirstError):
        return f.value.subFailure
    return f


def _all(ds):
    """
    A Deferred of every result of C{ds}, or the first failure.
    """
    return DeferredList(ds, fireOnOneErrback=True, consumeErrors=True).addCallbacks(
        lambda results: [r for _, r in results], _firstError)

