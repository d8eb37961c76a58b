# -*- test-case-name: tests.test_peergroups_store -*-
"""
The Redis store of the peer-groups face, for a cluster: every node loads
the same groups, memberships, records and used serials from it, and writes
each accepted change there before the peer is answered.

Layout (every key made with C{cluster.key}):
  - C{pg:groups}   hash C{[app, gpn]} -> group JSON (without its seq)
  - C{pg:seq}      hash C{[app, gpn]} -> the group's change counter
  - C{pg:members}  hash C{[app, gpn, peer]} -> member JSON
  - C{pg:records}  hash C{[app, gpn, id]} -> record JSON (data in base64)
  - C{pg:recver}   hash C{[app, gpn, id]} -> the stored record's version
  - C{pg:serials}  set of C{[app, gpn, serial]}

Fields are JSON arrays, so no separator can be confused with a name.  A
batch is one Lua script, so it is applied whole or not at all: it is
encoded (and checked) before it is sent, and its commands cannot fail.
The seq only grows and a record is not replaced by a lower version, so two
nodes writing the same group at once cannot move the store backwards.

When Redis is unreachable, L{apply} fails at once with
L{broker.cluster.redis.RedisUnavailable}: the change is refused, never
parked nor acknowledged.  A batch cut off after it was sent fails with its
subclass C{RedisOutcomeUnknown}: Redis may have applied it.  What Redis acknowledged is as durable as its
persistence is configured (AOF with C{appendfsync always} for the
guarantee the SQLite store gives; see docs/peergroups.md).
"""

import json

from twisted.application import service
from twisted.internet import defer
from zope.interface import implementer

from broker.core import jsonstrict
from broker.peergroups.credentials import b64, unb64
from broker.peergroups.interfaces import IPeerGroupStore
from broker.peergroups.records import Record

_APPLY = """
for i = 1, #ARGV, 4 do
  local op, f, v, x = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if op == 'g' then
    redis.call('HSET', KEYS[1], f, v)
  elseif op == 's' then
    local cur = tonumber(redis.call('HGET', KEYS[2], f) or '0')
    if tonumber(v) > cur then redis.call('HSET', KEYS[2], f, v) end
  elseif op == 'm' then
    redis.call('HSET', KEYS[3], f, v)
  elseif op == 'M' then
    redis.call('HDEL', KEYS[3], f)
  elseif op == 'r' then
    local cur = tonumber(redis.call('HGET', KEYS[5], f) or '0')
    if tonumber(x) >= cur then
      redis.call('HSET', KEYS[4], f, v)
      redis.call('HSET', KEYS[5], f, x)
    end
  elseif op == 'R' then
    redis.call('HDEL', KEYS[4], f)
    redis.call('HDEL', KEYS[5], f)
  elseif op == 'n' then
    redis.call('SADD', KEYS[6], f)
  end
end
return #ARGV / 4
"""


def recordToJSON(r):
    return {"id": r.id, "type": r.type, "version": r.version, "flags": r.flags,
            "creatorId": r.creatorId, "modifiedById": r.modifiedById,
            "attributes": r.attributes, "creation": r.creation,
            "lastModified": r.lastModified, "expiration": r.expiration,
            "data": b64(r.data), "seq": r.seq, "createdSeq": r.createdSeq}


def recordFromJSON(o):
    return Record(o["id"], o["type"], o["version"], o["flags"], o["creatorId"],
                  o["modifiedById"], o["attributes"], o["creation"], o["lastModified"],
                  o["expiration"], unb64(o["data"]), o["seq"], o["createdSeq"])


def changeToJSON(change):
    """
    A store change (see L{broker.peergroups.store}) as a JSON-ready list:
    what goes to Redis and to the other nodes.

    @raise ValueError: for an unknown kind.
    """
    kind = change[0]
    if kind == "record":
        return [kind, change[1], change[2], recordToJSON(change[3])]
    if kind in ("group", "seq", "member", "dropMember", "dropRecords", "serial"):
        return list(change)
    raise ValueError(f"unknown store change {kind!r}")


def changeFromJSON(obj):
    if obj[0] == "record":
        return ("record", obj[1], obj[2], recordFromJSON(obj[3]))
    return tuple(obj)


def hashField(*parts):
    return json.dumps(parts, separators=(",", ":"))


def _ops(changes):
    """
    The script's arguments for C{changes}: C{op, field, value, extra}.
    """
    out = []
    for change in changes:
        kind, app, gpn = change[0], change[1], change[2]
        if kind == "group":
            g = dict(change[3])
            seq = g.pop("seq")
            out += ["g", hashField(app, gpn), json.dumps(g), ""]
            out += ["s", hashField(app, gpn), str(int(seq)), ""]
        elif kind == "seq":
            out += ["s", hashField(app, gpn), str(int(change[3])), ""]
        elif kind == "member":
            out += ["m", hashField(app, gpn, change[3]), json.dumps(change[4]), ""]
        elif kind == "dropMember":
            out += ["M", hashField(app, gpn, change[3]), "", ""]
        elif kind == "record":
            r = change[3]
            out += ["r", hashField(app, gpn, r.id), json.dumps(recordToJSON(r)), str(r.version)]
        elif kind == "dropRecords":
            for i in change[3]:
                out += ["R", hashField(app, gpn, i), "", ""]
        elif kind == "serial":
            out += ["n", hashField(app, gpn, change[3]), "", ""]
        else:
            raise ValueError(f"unknown store change {kind!r}")
    return out


@implementer(IPeerGroupStore)
class RedisPeerGroupStore(service.Service):
    """
    L{IPeerGroupStore} on the cluster's Redis.

    @param cluster: the L{broker.cluster.node.Cluster} (its C{redis} client
        and key prefix).
    """

    name = "peergroups.store"

    def __init__(self, cluster):
        self.cluster = cluster
        self.redis = cluster.redis
        self.keys = [cluster.key("pg", k) for k in
                     ("groups", "seq", "members", "records", "recver", "serials")]
        self._inflight = set()

    @property
    def available(self):
        """
        Whether a change can be written now (Redis connected).
        """
        return self.redis.connected

    # The SQLite store's service verbs, so the face and the harnesses
    # drive either store the same way.
    def start(self):
        self.startService()

    def close(self):
        self.stopService()
        return defer.DeferredList(list(self._inflight), consumeErrors=True)

    def apply(self, changes):
        try:
            args = _ops(changes)
        except (ValueError, KeyError, TypeError) as e:
            return defer.fail(ValueError(f"cannot encode store changes: {e}"))
        if not args:
            return defer.succeed(None)
        d = self.redis.eval(_APPLY, self.keys, args)
        self._inflight.add(d)

        def done(result):
            self._inflight.discard(d)
            return result
        return d.addBoth(done)

    @defer.inlineCallbacks
    def load(self):
        groups, seqs, members, records, serials = yield defer.gatherResults([
            self.redis.execute("HGETALL", self.keys[0]),
            self.redis.execute("HGETALL", self.keys[1]),
            self.redis.execute("HGETALL", self.keys[2]),
            self.redis.execute("HGETALL", self.keys[3]),
            self.redis.execute("SMEMBERS", self.keys[5])], consumeErrors=True).addErrback(
                lambda f: f.value.subFailure)
        seq = {k: int(v) for k, v in hashPairs(seqs)}
        out = {"groups": [], "members": [], "records": [], "serials": []}
        for field, value in hashPairs(groups):
            app, gpn = jsonstrict.loads(field)
            g = jsonstrict.loads(value)
            out["groups"].append({"app": app, "gpn": gpn, "grc": g["grc"],
                                  "properties": g["properties"], "verifier": g["verifier"],
                                  "issuer": g["issuer"], "seq": seq.get(field, 0)})
        for field, value in hashPairs(members):
            app, gpn, peer = jsonstrict.loads(field)
            out["members"].append({"app": app, "gpn": gpn, "peer": peer, **jsonstrict.loads(value)})
        rows = []
        for field, value in hashPairs(records):
            app, gpn, _ = jsonstrict.loads(field)
            rows.append((app, gpn, recordFromJSON(jsonstrict.loads(value))))
        out["records"] = sorted(rows, key=lambda row: row[2].seq)
        for member in serials:
            app, gpn, serial = jsonstrict.loads(member)
            out["serials"].append((app, gpn, serial))
        return out


def hashPairs(flat):
    """
    HGETALL's flat C{[field, value, ...]} reply as C{(str, str)} pairs.
    """
    if isinstance(flat, dict):
        items = flat.items()
    else:
        items = zip(flat[0::2], flat[1::2])
    for k, v in items:
        yield (k.decode("utf-8") if isinstance(k, bytes) else k,
               v.decode("utf-8") if isinstance(v, bytes) else v)
