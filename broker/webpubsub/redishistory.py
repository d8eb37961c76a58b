# -*- test-case-name: tests.test_webpubsub_cluster -*-
"""
Group history in cluster mode: one history per (hub, group) in Redis,
shared by every node, so the C{(epoch, offset)} a receiver sees is the same
on every node and a joinGroup recovery on one node returns what was
published on another (the single-node rings are L{broker.webpubsub.history}).

Keys (standalone Redis; the scripts touch the keys of evicted groups, which
a Redis Cluster would refuse):

  - C{<prefix>:wps:hm:<hub>:<group>}: a hash, C{e} (epoch) and C{o} (the
    last offset);
  - C{<prefix>:wps:hl:<hub>:<group>}: a list of C{"<offset> <ms> <entry>"},
    oldest first, capped at C{history_messages} and trimmed by age
    (C{history_max_age}; the list also expires when its newest entry does);
  - C{<prefix>:wps:hg:<hub>}: a sorted set of the hub's groups by last
    write, so at most C{history_groups} keep a history (least recently
    written evicted first, as on one node).

Stamping happens before the publish leaves this node (the engine carries
C{Delivery.history} to the others), so it is asynchronous: a group publish
waits for its Lua script's reply: C{record} returns that L{Deferred}, and
the hub (L{broker.core.hub.Hub.publish}) keeps its publishes in the order
they were made, whatever order their replies or failures come back in: a
failing script (Redis down) fails at once while earlier ones are still in
flight, and must not overtake them.

Redis down: the message is still delivered, unstamped, and its group is
marked as having a gap; a new epoch is started for it when this node
reconnects (at once if only the reply was lost), or by its next write to
the group, so no later
recovery claims C{recovered: true} across messages the history never held.
Recovery itself answers C{recovered: false} with the reason.
"""

import secrets

from twisted.internet import defer
from twisted.logger import Logger

from broker.cluster.engine import decodeDelivery as _decodeBus
from broker.cluster.engine import encodeDelivery as _encodeBus
from broker.cluster.engine import registerMessageKind
from broker.core.message import Target
from broker.webpubsub.streams import BUS_KIND, StreamMessage

# Group stream fragments keep their stream on the bus and in the history.
registerMessageKind(BUS_KIND, StreamMessage.fromBus)

log = Logger()

# One call stamps a batch of publishes (those of one reactor turn), in
# order.  KEYS: the hub's groups.  ARGV: maxMessages, maxAge (ms),
# maxGroups, meta prefix, list prefix, then for each publish: group, epoch
# candidate, reset ("1": start a new epoch), entry.  Returns "epoch offset"
# per publish, space-separated, in one string (txredisapi parses a long
# multi-bulk reply slowly, element by element).
_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local maxMessages, maxAge = tonumber(ARGV[1]), tonumber(ARGV[2])
local keep = tonumber(ARGV[3]) - 1
local out = {}
for i = 6, #ARGV, 4 do
  local group = ARGV[i]
  local meta, list = ARGV[4] .. group, ARGV[5] .. group
  local epoch = redis.call('HGET', meta, 'e')
  if (not epoch) or ARGV[i + 2] == '1' then
    epoch = ARGV[i + 1]
    redis.call('DEL', list)
    redis.call('HSET', meta, 'e', epoch, 'o', 0)
  end
  local off = redis.call('HINCRBY', meta, 'o', 1)
  redis.call('RPUSH', list, off .. ' ' .. now .. ' ' .. ARGV[i + 3])
  redis.call('LTRIM', list, -maxMessages, -1)
  if maxAge > 0 then
    while true do
      local first = redis.call('LINDEX', list, 0)
      if not first then break end
      local _, _, ts = string.find(first, '^%d+ (%d+) ')
      if tonumber(ts) >= now - maxAge then break end
      redis.call('LPOP', list)
    end
    redis.call('PEXPIRE', list, maxAge)
  end
  redis.call('ZREM', KEYS[1], group)
  local excess = redis.call('ZCARD', KEYS[1]) - keep
  if excess > 0 then
    for _, g in ipairs(redis.call('ZRANGE', KEYS[1], 0, excess - 1)) do
      redis.call('DEL', ARGV[4] .. g, ARGV[5] .. g)
      redis.call('ZREM', KEYS[1], g)
    end
  end
  redis.call('ZADD', KEYS[1], now, group)
  out[#out + 1] = epoch .. ' ' .. off
end
return table.concat(out, ' ')
"""

# KEYS: meta, list.  ARGV: the new epoch.
_RESET = """
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'e', ARGV[1], 'o', 0)
return 1
"""

# Most publishes one call carries (a bigger turn is split).
BATCH = 256

# KEYS: meta, list, groups.  ARGV: epoch candidate, epoch asked ("" for the
# position only), offset asked, maxAge (ms), maxGroups, group, meta prefix,
# list prefix.  Returns {epoch, last offset, status, entries...}; status is
# pos, epoch (unknown epoch), ahead, lost (some missed entries are gone) or ok.
_SINCE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', epoch, 'o', 0)
  redis.call('DEL', KEYS[2])
  local excess = redis.call('ZCARD', KEYS[3]) - (tonumber(ARGV[5]) - 1)
  if excess > 0 then
    for _, g in ipairs(redis.call('ZRANGE', KEYS[3], 0, excess - 1)) do
      redis.call('DEL', ARGV[7] .. g, ARGV[8] .. g)
      redis.call('ZREM', KEYS[3], g)
    end
  end
  redis.call('ZADD', KEYS[3], now, ARGV[6])
end
local last = tonumber(redis.call('HGET', KEYS[1], 'o'))
local maxAge = tonumber(ARGV[4])
if maxAge > 0 then
  while true do
    local first = redis.call('LINDEX', KEYS[2], 0)
    if not first then break end
    local _, _, ts = string.find(first, '^%d+ (%d+) ')
    if tonumber(ts) >= now - maxAge then break end
    redis.call('LPOP', KEYS[2])
  end
end
if ARGV[2] == '' then return {epoch, last, 'pos'} end
if ARGV[2] ~= epoch then return {epoch, last, 'epoch'} end
local offset = tonumber(ARGV[3])
if offset > last then return {epoch, last, 'ahead'} end
local first = redis.call('LINDEX', KEYS[2], 0)
local oldest = last + 1
if first then
  local _, _, o = string.find(first, '^(%d+) ')
  oldest = tonumber(o)
end
local start = offset + 1 - oldest
if start < 0 then start = 0 end
local out = {epoch, last, (oldest > offset + 1) and 'lost' or 'ok'}
for _, e in ipairs(redis.call('LRANGE', KEYS[2], start, -1)) do
  out[#out + 1] = e
end
return out
"""

_REASONS = {
    "epoch": "unknown epoch: the group's history was reset",
    "ahead": "offset is ahead of the group's history",
    "lost": "some missed messages are no longer held",
}


def encodeDelivery(delivery, excluded=()):
    """
    A delivery as bytes, for the history list and for node-to-node
    hand-overs: the cluster bus's own format (L{broker.cluster.engine}),
    its target carrying the receivers excluded.
    """
    return _encodeBus("", Target(Target.GROUP, delivery.group, excluded), delivery)


def decodeDelivery(raw):
    """
    The inverse of L{encodeDelivery}: C{(delivery, excluded)}.

    @raise ValueError: for malformed bytes.
    """
    _, target, delivery = _decodeBus(raw)
    return delivery, target.excluded


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


class RedisHubHistory:
    """
    The history of one hub in Redis, installed as C{hub.history}.

    @ivar remote: true: recovery is asynchronous (L{sinceAsync}).
    """

    remote = True

    def __init__(self, cluster, hubName, maxMessages, maxAge, maxGroups):
        self.redis = cluster.redis
        self.hubName = hubName
        self.maxMessages = maxMessages
        self.maxAgeMs = int(maxAge * 1000)
        self.maxGroups = maxGroups
        self._metaPrefix = cluster.key("wps", "hm", hubName) + ":"
        self._listPrefix = cluster.key("wps", "hl", hubName) + ":"
        self._groups = cluster.key("wps", "hg", hubName)
        self.reactor = cluster.reactor
        self._gaps = set()
        self._warned = False
        self._batch = []
        self._flushing = None
        self.unstamped = 0

    def _keys(self, group):
        return [self._metaPrefix + group, self._listPrefix + group, self._groups]

    def _unavailable(self, failure, what):
        if not self._warned:
            self._warned = True
            log.warn("webpubsub history of hub {hub} unavailable ({what}): {why}",
                     hub=self.hubName, what=what, why=failure.getErrorMessage())

    # -- stamping -----------------------------------------------------------

    def record(self, target, delivery):
        """
        Called by the hub for every group publish: stamp it in Redis; the
        hub publishes it once the returned L{Deferred} fires (L{stamp}).
        """
        return self.stamp(target, delivery)

    def stamp(self, target, delivery):
        """
        Append C{delivery} to its group's history and set
        C{delivery.history}.

        @return: a L{Deferred} that never fails: on error the delivery goes
            out unstamped and the group's history will start a new epoch.
        """
        group = target.name
        reset = "1" if group in self._gaps else "0"
        self._gaps.discard(group)
        d = defer.Deferred()
        self._batch.append((group, secrets.token_urlsafe(9), reset,
                            encodeDelivery(delivery, target.excluded), d))
        if len(self._batch) >= BATCH:
            self._flush()
        elif self._flushing is None:
            # Every publish of this reactor turn in one call.
            self._flushing = self.reactor.callLater(0, self._flush)

        def stamped(reply):
            delivery.history = reply
            self._warned = False

        def failed(f):
            self._gaps.add(group)
            self.unstamped += 1
            self._unavailable(f, "publishing unstamped")
            if self.redis.connected:
                # A lost reply, not an outage: no resync will come to mark
                # the gap, so mark it now, before other nodes recover across it.
                self.resetGaps()
        return d.addCallbacks(stamped, failed)

    def _flush(self):
        if self._flushing is not None:
            if self._flushing.active():
                self._flushing.cancel()
            self._flushing = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        args = [self.maxMessages, self.maxAgeMs, self.maxGroups, self._metaPrefix,
                self._listPrefix]
        for group, epoch, reset, entry, _ in batch:
            args += (group, epoch, reset, entry)

        def answered(reply):
            stamps = reply.decode("ascii").split(" ")
            for i, (_, _, _, _, d) in enumerate(batch):
                d.callback((stamps[2 * i], int(stamps[2 * i + 1])))

        def failed(f):
            for _, _, _, _, d in batch:
                d.errback(f)
        self.redis.eval(_RECORD, [self._groups], args).addCallbacks(answered, failed)

    def resetGaps(self):
        """
        Start a new epoch in every group that missed messages while Redis
        was unreachable (called when this node reconnects).
        """
        gaps, self._gaps = self._gaps, set()
        ds = []
        for group in gaps:
            # A new epoch, empty: the next write gets offset 1 in it.
            d = self.redis.eval(_RESET, self._keys(group)[:2], [secrets.token_urlsafe(9)])
            d.addErrback(lambda f, g=group: self._gaps.add(g))
            ds.append(d)
        return defer.DeferredList(ds)

    # -- recovery -----------------------------------------------------------

    def sinceAsync(self, group, epoch, offset, connectionId=None):
        """
        @return: a L{Deferred} of C{(recovered, reason, deliveries, (epoch,
            offset))} as L{broker.webpubsub.history.HubHistory.since} and
            C{position} together; C{recovered} is C{None} for a position
            request (C{epoch} is C{None}).  Never fails: Redis down gives
            C{(False, reason, [], None)}.
        """
        d = self.redis.eval(_SINCE, self._keys(group), [
            secrets.token_urlsafe(9), "" if epoch is None else epoch, offset or 0,
            self.maxAgeMs, self.maxGroups, group, self._metaPrefix, self._listPrefix])

        def answered(reply):
            current = (_text(reply[0]), int(reply[1]))
            status = _text(reply[2])
            if status == "pos":
                return None, None, [], current
            out = []
            for raw in reply[3:]:
                off, _, rest = raw.partition(b" ")
                _, _, entry = rest.partition(b" ")
                delivery, excluded = decodeDelivery(entry)
                if connectionId in excluded:
                    continue
                delivery.history = (current[0], int(off))
                out.append(delivery)
            if status == "ok":
                return True, None, out, current
            return False, _REASONS[status], out, current

        def failed(f):
            self._unavailable(f, "recovery")
            return (False, f"the history store is unavailable: {f.getErrorMessage()}"[:200],
                    [], None)
        return d.addCallbacks(answered, failed)


def install(core, hubsConfig, cluster):
    """
    Give each hub whose configuration sets C{history_messages} its
    L{RedisHubHistory}: its C{record} returns the stamp's L{Deferred}, and
    the hub publishes each group message once it is stamped, in order.
    """
    histories = []

    def setup(hub):
        cfg = hubsConfig.get(hub.name)
        if not (cfg and cfg["history_messages"]):
            return
        history = RedisHubHistory(cluster, hub.name, cfg["history_messages"],
                                  cfg["history_max_age"], cfg["history_groups"])
        hub.history = history
        histories.append(history)

    core.onNewHub(setup)

    def resync():
        return defer.DeferredList([h.resetGaps() for h in histories])
    cluster.onResync(resync)
    return histories
