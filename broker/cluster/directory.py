# -*- test-case-name: tests.test_cluster_engine -*-
"""
The cluster-wide directory in Redis: which connections each hub has, on
which node, with which user and roles, in which groups; and the user-level
group memberships that outlive connections.

Keys, under C{HK = <prefix>:h:<len(hub)>:<hub>} (the length keeps any two
hub names apart whatever characters they hold):

  - C{HK:c}            hash connectionId -> JSON C{{"u": user, "r": roles, "n": node}}
  - C{HK:g:<group>}    set of the group's connectionIds
  - C{HK:cg:<cid>}     set of the connection's groups (to leave them all)
  - C{HK:u:<user>}     set of the user's connectionIds
  - C{HK:ug:<user>}    set of the groups the user was added to
  - C{<prefix>:n:<node>} set of C{[hub, cid]} JSON entries a node holds, so
    a dead node's connections can be removed without a scan.

Every change is one Lua script, so it is atomic: a join for a connection
that has already gone is ignored (no ghost members), and a node removes
only the entries it owns (a reliable link handed over to another node
keeps its connectionId).
"""

import json

from twisted.internet.defer import gatherResults, succeed
from zope.interface import implementer

from broker.core import jsonstrict
from broker.core.interfaces import IDirectory

_REMOVE_FN = """
local function remove(hk, c, node)
  local raw = redis.call('HGET', hk .. ':c', c)
  if not raw then return 0 end
  local info = cjson.decode(raw)
  if node ~= '' and info.n ~= node then return 0 end
  for _, g in ipairs(redis.call('SMEMBERS', hk .. ':cg:' .. c)) do
    redis.call('SREM', hk .. ':g:' .. g, c)
  end
  redis.call('DEL', hk .. ':cg:' .. c)
  if type(info.u) == 'string' then redis.call('SREM', hk .. ':u:' .. info.u, c) end
  redis.call('HDEL', hk .. ':c', c)
  return 1
end
"""

# ARGV: HK, cid, info JSON, node set key, node entry, user ('' for none)
ADD = """
redis.call('HSET', ARGV[1] .. ':c', ARGV[2], ARGV[3])
redis.call('SADD', ARGV[4], ARGV[5])
if ARGV[6] ~= '' then redis.call('SADD', ARGV[1] .. ':u:' .. ARGV[6], ARGV[2]) end
return 1
"""

# ARGV: HK, cid, node set key, node entry, node
REMOVE = _REMOVE_FN + """
redis.call('SREM', ARGV[3], ARGV[4])
return remove(ARGV[1], ARGV[2], ARGV[5])
"""

# ARGV: HK, cid, group
JOIN = """
if redis.call('HEXISTS', ARGV[1] .. ':c', ARGV[2]) == 0 then return 0 end
redis.call('SADD', ARGV[1] .. ':g:' .. ARGV[3], ARGV[2])
redis.call('SADD', ARGV[1] .. ':cg:' .. ARGV[2], ARGV[3])
return 1
"""

# ARGV: HK, cid, group ('' for every group)
LEAVE = """
local hk, c, g = ARGV[1], ARGV[2], ARGV[3]
if g == '' then
  for _, x in ipairs(redis.call('SMEMBERS', hk .. ':cg:' .. c)) do
    redis.call('SREM', hk .. ':g:' .. x, c)
  end
  redis.call('DEL', hk .. ':cg:' .. c)
else
  redis.call('SREM', hk .. ':g:' .. g, c)
  redis.call('SREM', hk .. ':cg:' .. c, g)
end
return 1
"""

# ARGV: HK, cid, roles JSON
SET_ROLES = """
local raw = redis.call('HGET', ARGV[1] .. ':c', ARGV[2])
if not raw then return 0 end
local info = cjson.decode(raw)
info.r = cjson.decode(ARGV[3])
redis.call('HSET', ARGV[1] .. ':c', ARGV[2], cjson.encode(info))
return 1
"""

# ARGV: HK, group -> flat [cid, info, cid, info, ...]
MEMBERS = """
local out = {}
local cids = redis.call('SMEMBERS', ARGV[1] .. ':g:' .. ARGV[2])
for _, c in ipairs(cids) do
  local raw = redis.call('HGET', ARGV[1] .. ':c', c)
  if raw then
    out[#out + 1] = c
    out[#out + 1] = raw
  end
end
return out
"""

# ARGV: prefix, node set key, node -> connections removed
REAP = _REMOVE_FN + """
local n = 0
for _, raw in ipairs(redis.call('SMEMBERS', ARGV[2])) do
  local e = cjson.decode(raw)
  local hk = ARGV[1] .. ':h:' .. string.len(e[1]) .. ':' .. e[1]
  n = n + remove(hk, e[2], ARGV[3])
end
redis.call('DEL', ARGV[2])
return n
"""


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _roles(value):
    # cjson writes an empty list as {}.
    return list(value) if isinstance(value, list) else []


@implementer(IDirectory)
class RedisDirectory:
    """
    @param cluster: the L{broker.cluster.node.Cluster}; its node id is
        written with every connection this node admits.
    """

    def __init__(self, cluster):
        self.cluster = cluster
        self.redis = cluster.redis
        self.nodeId = cluster.nodeId
        self._hubKeys = {}

    def hubKey(self, hubName):
        hk = self._hubKeys.get(hubName)
        if hk is None:
            hk = self._hubKeys[hubName] = self.cluster.key(
                "h", len(hubName.encode("utf-8")), hubName)
        return hk

    def nodeKey(self, nodeId):
        return self.cluster.key("n", nodeId)

    def _eval(self, script, *args):
        # Directory writes only need the command connection: they are made
        # in order after a re-registration that may still be under way.
        return self.redis.eval(script, (), args, registering=True)

    @staticmethod
    def _entry(hubName, connectionId):
        return json.dumps([hubName, connectionId], separators=(",", ":"))

    # -- mirror writes ----------------------------------------------------

    def added(self, hubName, connectionId, userId, roles):
        info = json.dumps({"u": userId, "r": list(roles), "n": self.nodeId},
                          separators=(",", ":"))
        return self._eval(ADD, self.hubKey(hubName), connectionId, info,
                          self.nodeKey(self.nodeId), self._entry(hubName, connectionId),
                          userId or "")

    def removed(self, hubName, connectionId, userId):
        return self._eval(REMOVE, self.hubKey(hubName), connectionId, self.nodeKey(self.nodeId),
                          self._entry(hubName, connectionId), self.nodeId)

    def joined(self, hubName, connectionId, group):
        return self._eval(JOIN, self.hubKey(hubName), connectionId, group)

    def left(self, hubName, connectionId, group):
        return self._eval(LEAVE, self.hubKey(hubName), connectionId, group or "")

    def setRoles(self, hubName, connectionId, roles):
        return self._eval(SET_ROLES, self.hubKey(hubName), connectionId,
                          json.dumps(list(roles)))

    # -- queries ----------------------------------------------------------

    def connection(self, hubName, connectionId):
        def parse(raw):
            if raw is None:
                return None
            info = jsonstrict.loads(raw)
            return {"userId": info.get("u"), "roles": _roles(info.get("r")),
                    "node": info.get("n")}
        return self.redis.execute("HGET", self.hubKey(hubName) + ":c",
                                  connectionId).addCallback(parse)

    def userExists(self, hubName, userId):
        return self.redis.execute("EXISTS", f"{self.hubKey(hubName)}:u:{userId}").addCallback(bool)

    def groupExists(self, hubName, group):
        return self.redis.execute("EXISTS", f"{self.hubKey(hubName)}:g:{group}").addCallback(bool)

    def groupMembers(self, hubName, group):
        def pairs(flat):
            return [(_text(flat[i]), jsonstrict.loads(flat[i + 1]).get("u"))
                    for i in range(0, len(flat), 2)]
        return self.redis.eval(MEMBERS, (), (self.hubKey(hubName), group)).addCallback(pairs)

    def userGroups(self, hubName, userId):
        return self.redis.execute("SMEMBERS", f"{self.hubKey(hubName)}:ug:{userId}").addCallback(
            lambda members: {_text(m) for m in members})

    def setUserGroup(self, hubName, userId, group, member):
        key = f"{self.hubKey(hubName)}:ug:{userId}"
        if member:
            return self.redis.execute("SADD", key, group)
        if group is None:
            return self.redis.execute("DEL", key)
        return self.redis.execute("SREM", key, group)

    # -- nodes ------------------------------------------------------------

    def reap(self, nodeId):
        """
        Remove every connection the node C{nodeId} held.

        @return: a L{Deferred} firing with how many were removed.
        """
        return self._eval(REAP, self.cluster.prefix, self.nodeKey(nodeId), nodeId)

    def register(self, hubs):
        """
        Re-register this node's connections and groups whole, after an
        outage or when Redis lost them: first forget what Redis holds for
        this node, then write every local session again.  Every command is
        issued before this returns, so a local change made afterwards is
        ordered after them.

        @param hubs: C{{name: Hub}}.
        @return: a L{Deferred} firing once Redis has taken them all.
        """
        writes = [self.reap(self.nodeId)]
        for name, hub in list(hubs.items()):
            for s in hub.sessions():
                writes.append(self.added(name, s.connectionId, s.userId, s.permissions.roles()))
                writes.extend(self.joined(name, s.connectionId, g) for g in sorted(s.groups))
        if not writes:
            return succeed(None)
        return gatherResults(writes, consumeErrors=True)
