# -*- test-case-name: tests.test_iot_cluster -*-
"""
UDP tokens in cluster mode: a token issued on one node can be spent on any
node (a load balancer may send a device's datagrams anywhere), and only
once across the cluster.

Each token is a Redis key C{iot:tok:HEX} holding the key of its datagram
(64 hex characters, L{broker.iot.auth.tokenKey}; absent for a legacy
token) followed by its device as JSON, with the token's TTL.  The node
that receives a datagram checks its MAC with that key before spending the
token, so a forged datagram leaves it live: a token this node issued is
checked at once (the key is in memory), one issued elsewhere after a first
read of its key.  Spending is one atomic Lua step that reads the key and
replaces it by a spent marker (kept for the rest of the TTL, so a replay on
another node is counted as a replay).  The datagrams of one reactor turn
are spent together in one script run: per datagram the work here is an
append and an HMAC, and telemetry is handed on after one Redis round trip
(two for tokens issued on another node).

What Redis holds is safe to hold: a token key authenticates the one
datagram of its token, dies with it, and reveals neither the session's
UDP key nor the device's key (both are behind HMAC); whoever can read
Redis could already spend the live tokens, and learns nothing more.

The issuing node also keeps its tokens in a memory L{TokenBook}: for the
per-device counts that drive refills, and so that UDP keeps working on that
node while Redis is unreachable.  A token spent locally during an outage is
remembered and marked spent in Redis when the node resyncs, and the node's
live tokens are written again (a restarted Redis has lost them).  The
documented limit: a token spent during an outage can be replayed on another
node in the moment between Redis coming back and this node's resync.
"""

import json
from collections import deque

from twisted.internet.defer import DeferredList
from twisted.logger import Logger
from zope.interface import implementer

from broker.core import jsonstrict
from broker.iot.interfaces import ITokenBook
from broker.iot.udp import ACCEPTED, BAD_MAC, EXPIRED, REPLAYED, UNKNOWN, TokenBook

log = Logger()

SPENT = b"-"

# The scripts take their tokens as one argument, the tokens' hex (32
# characters each) after the key prefix: a command of thousands of
# arguments cost more than the script (txredisapi encodes each in Python).

# ARGV: ttl ms, prefix, hex, owner JSON, the token keys' hex (64 characters
# each, or empty: legacy tokens)
_ISSUE = """
local ttl, prefix, hex, owner, keys = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
for i = 1, #hex / 32 do
  local v = owner
  if #keys > 0 then v = string.sub(keys, 64 * i - 63, 64 * i) .. owner end
  redis.call('SET', prefix .. string.sub(hex, 32 * i - 31, 32 * i), v, 'PX', ttl, 'NX')
end
return #hex / 32
"""

# ARGV: prefix, hex: the values, nothing changed (the keys to check MACs
# with, before spending)
_PEEK = """
local out = {}
local prefix, hex = ARGV[1], ARGV[2]
for i = 1, #hex / 32 do
  out[i] = redis.call('GET', prefix .. string.sub(hex, 32 * i - 31, 32 * i)) or ''
end
return out
"""

# ARGV: prefix, hex
_SPEND = """
local out = {}
local prefix, hex = ARGV[1], ARGV[2]
for i = 1, #hex / 32 do
  local k = prefix .. string.sub(hex, 32 * i - 31, 32 * i)
  local v = redis.call('GET', k)
  if v and v ~= '-' then
    redis.call('SET', k, '-', 'KEEPTTL')
  end
  out[i] = v or ''
end
return out
"""

# ARGV: ttl ms, prefix, hex
_MARK = """
local ttl, prefix, hex = ARGV[1], ARGV[2], ARGV[3]
for i = 1, #hex / 32 do
  redis.call('SET', prefix .. string.sub(hex, 32 * i - 31, 32 * i), '-', 'PX', ttl)
end
return #hex / 32
"""


def _hex(tokens):
    return "".join([t.hex() for t in tokens])


def _keysHex(keys):
    return "" if keys[0] is None else "".join([k.hex() for k in keys])


def _splitValue(value):
    """
    A live token's value: C{(tokenKey or None, owner JSON bytes)}.
    """
    if value[:1] == b"[":
        return None, value
    return bytes.fromhex(value[:64].decode("ascii")), value[64:]


@implementer(ITokenBook)
class ClusterTokenBook:
    """
    @param cluster: the L{broker.cluster.node.Cluster}.
    @param ttl: seconds a token is valid.
    @param clock: monotonic seconds for the local book.
    @param maxBatch: tokens spent per script run at most.
    @param retryDelay: seconds before a token unknown to Redis and to this
        node is looked up once more (it may have been issued on another
        node an instant ago) before it is counted unknown.
    """

    retryDelay = 0.1

    def __init__(self, cluster, ttl=300.0, clock=None, maxBatch=2000, offlineMemory=100000):
        self.cluster = cluster
        self.redis = cluster.redis
        self.reactor = cluster.reactor
        self.ttl = ttl
        self.local = TokenBook(ttl, clock=clock or self.reactor.seconds)
        self.maxBatch = maxBatch
        self._queue = []         # verified: (token, then, args, again)
        self._peekQueue = []     # to verify first: (token, (verify, then), args, again)
        self._flush = None
        self._spentOffline = deque(maxlen=offlineMemory)
        self._warned = False
        self._prefix = cluster.key("iot", "tok", "")
        # The owner JSON of accepted tokens, decoded once per device.
        self._owners = {}
        cluster.onResync(self.resync)

    def _key(self, token):
        return self._prefix + token.hex()

    def _outage(self, what, f):
        if not self._warned:
            self._warned = True
            log.warn("iot.udp: Redis unreachable while {what} ({why}); tokens issued on this "
                     "node are spent locally until it is back", what=what,
                     why=f.getErrorMessage())

    # -- ITokenBook -------------------------------------------------------

    @property
    def legacy(self):
        return self.local.legacy

    @legacy.setter
    def legacy(self, value):
        self.local.legacy = value

    def bindKey(self, fleet, deviceId, key):
        self.local.bindKey(fleet, deviceId, key)

    def unbindKey(self, fleet, deviceId, key):
        self.local.unbindKey(fleet, deviceId, key)

    def issue(self, fleet, deviceId, n):
        key = self.local.boundKey(fleet, deviceId)
        if key is None and not self.local.legacy:
            return []
        issued = self.local.issueWithKeys(fleet, deviceId, n, key)
        tokens = [t for t, _ in issued]
        owner = json.dumps([fleet, deviceId])
        self.redis.eval(_ISSUE, [], [int(self.ttl * 1000), self._prefix, _hex(tokens),
                                     owner, _keysHex([k for _, k in issued])]).addErrback(
            lambda f: self._outage("issuing tokens", f))
        return tokens

    def outstanding(self, fleet, deviceId):
        return self.local.outstanding(fleet, deviceId)

    def spend(self, token, verify, then, *args):
        if not self.redis.connected:
            self._spendLocally(token, verify, then, args)
            return
        here, key = self.local.tokenKey(token)
        if here:
            # Issued here: the MAC is checked at once, a forgery costs no
            # round trip and the token is spent only if it verifies.
            if not verify(key):
                then(BAD_MAC, None, None, *args)
                return
            self._enqueue(token, then, args, False, self._queue)
        else:
            self._enqueue(token, (verify, then), args, False, self._peekQueue)

    def _enqueue(self, token, then, args, again, queue):
        queue.append((token, then, args, again))
        if self._flush is None:
            self._flush = self.reactor.callLater(0, self._spendQueued)

    def revoke(self, fleet, deviceId):
        mine = self.local.deviceTokens(fleet, deviceId)
        self.local.revoke(fleet, deviceId)
        if mine and self.redis.connected:
            self.redis.execute("DEL", *[self._key(t) for t in mine]).addErrback(
                lambda f: self._outage("revoking tokens", f))

    def purge(self):
        return self.local.purge()

    def __len__(self):
        return len(self.local)

    # -- spending ---------------------------------------------------------

    def _spendQueued(self):
        self._flush = None
        peek, self._peekQueue = (self._peekQueue[:self.maxBatch],
                                 self._peekQueue[self.maxBatch:])
        batch, self._queue = self._queue[:self.maxBatch], self._queue[self.maxBatch:]
        if self._queue or self._peekQueue:
            self._flush = self.reactor.callLater(0, self._spendQueued)
        if peek:
            d = self.redis.eval(_PEEK, [], [self._prefix, _hex([e[0] for e in peek])])
            d.addCallbacks(self._peeked, self._peekFailed, callbackArgs=(peek,),
                           errbackArgs=(peek,))
            d.addErrback(lambda f: log.failure("iot.udp: checking tokens of other nodes", f))
        if batch:
            self._spendBatch(batch)

    def _spendBatch(self, batch):
        d = self.redis.eval(_SPEND, [], [self._prefix, _hex([e[0] for e in batch])])
        d.addCallbacks(self._spent, self._spendFailed, callbackArgs=(batch,),
                       errbackArgs=(batch,))
        d.addErrback(lambda f: log.failure("iot.udp: handing on spent tokens", f))

    def _peeked(self, values, peek):
        """
        The values of tokens this node did not issue: check each datagram
        against its token's key, then spend those that verify.
        """
        verified = []
        for (token, (verify, then), args, again), value in zip(peek, values):
            if value == SPENT:
                then(REPLAYED, None, None, *args)
            elif value:
                key, _ = _splitValue(value)
                if verify(key):
                    verified.append((token, then, args, again))
                else:
                    then(BAD_MAC, None, None, *args)
            else:
                here, key = self.local.tokenKey(token)
                if here:
                    # Issued here since (or Redis lost it): checked as ours.
                    if verify(key):
                        verified.append((token, then, args, again))
                    else:
                        then(BAD_MAC, None, None, *args)
                    continue
                outcome = self.local.redeem(token)
                if outcome[0] in (REPLAYED, EXPIRED):
                    then(outcome[0], None, None, *args)
                elif again:
                    then(UNKNOWN, None, None, *args)
                else:
                    # Neither Redis nor this node knows it: another node
                    # may have issued it an instant ago, its write still on
                    # the way.  One more look, a moment later.
                    self.reactor.callLater(self.retryDelay, self._enqueue, token,
                                           (verify, then), args, True, self._peekQueue)
        if verified:
            self._spendBatch(verified)

    def _peekFailed(self, f, peek):
        self._outage("checking tokens", f)
        for token, (verify, then), args, _ in peek:
            self._spendLocally(token, verify, then, args)

    def _spent(self, values, batch):
        local = self.local
        markLost = []
        for (token, then, args, again), value in zip(batch, values):
            if value == SPENT:
                if local.isLive(token):
                    local.redeem(token)
                then(REPLAYED, None, None, *args)
            elif value:
                if local.isLive(token):
                    local.redeem(token)
                ownerJSON = _splitValue(value)[1]
                owner = self._owners.get(ownerJSON)
                if owner is None:
                    if len(self._owners) > 10000:
                        self._owners.clear()
                    owner = self._owners[ownerJSON] = jsonstrict.loads(ownerJSON)
                then(ACCEPTED, owner[0], owner[1], *args)
            elif local.isLive(token):
                # Ours, but Redis lost it (it restarted): nobody else can
                # have spent it.
                outcome = local.redeem(token)
                if outcome[0] == ACCEPTED:
                    markLost.append(token)
                then(*outcome, *args)
            else:
                # Verified, then gone before it was spent: revoked or
                # expired meanwhile.
                outcome = local.redeem(token)
                then(outcome[0] if outcome[0] in (REPLAYED, EXPIRED) else UNKNOWN, None, None,
                     *args)
        if markLost:
            self._mark(markLost).addErrback(lambda f: self._outage("spending tokens", f))

    def _spendFailed(self, f, batch):
        self._outage("spending tokens", f)
        for token, then, args, _ in batch:
            # Verified already (a token of another node is unknown here).
            self._spendLocally(token, None, then, args)

    def _spendLocally(self, token, verify, then, args):
        outcome = self.local.redeem(token, verify)
        if outcome[0] == ACCEPTED:
            self._spentOffline.append(token)
        then(*outcome, *args)

    def _mark(self, tokens, early=False):
        return self.redis.eval(_MARK, [], [int(self.ttl * 1000), self._prefix, _hex(tokens)],
                               registering=early)

    # -- resync -----------------------------------------------------------

    def resync(self):
        """
        After (re)connecting: mark the tokens spent locally during the
        outage as spent, and write this node's live tokens again (NX: a
        token spent meanwhile keeps its marker).
        """
        self._warned = False
        spent, self._spentOffline = list(self._spentOffline), deque(
            maxlen=self._spentOffline.maxlen)
        # One script run per (second of TTL left, device), at most maxBatch
        # tokens each.
        groups = {}
        for token, fleet, deviceId, seconds, key in self.local.liveTokens():
            left = int(seconds * 1000)
            if left > 0:
                groups.setdefault((left // 1000, fleet, deviceId, key is None), []).append(
                    (token, left, key))
        ds = []
        for i in range(0, len(spent), self.maxBatch):
            ds.append(self._mark(spent[i:i + self.maxBatch], early=True))
        for (_, fleet, deviceId, _), rows in groups.items():
            owner = json.dumps([fleet, deviceId])
            for i in range(0, len(rows), self.maxBatch):
                chunk = rows[i:i + self.maxBatch]
                ds.append(self.redis.eval(
                    _ISSUE, [], [min(left for _, left, _ in chunk), self._prefix,
                                 _hex([t for t, _, _ in chunk]), owner,
                                 _keysHex([k for _, _, k in chunk])], registering=True))
        for d in ds:
            d.addErrback(lambda f: self._outage("re-registering tokens", f))
        return DeferredList(ds)
