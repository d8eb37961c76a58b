# -*- test-case-name: tests.test_iot_cluster -*-
"""
The concentrator in cluster mode: N nodes that behave as one IoT face.

What must outlive a node, or be seen by every node, is in Redis (keys via
C{cluster.key}, ids through L{broker.iot.redisstore.part}):

  - presence: C{iot:FLEET:dev:DEV} -> C{[nodeId, sessionId, since]} of
    the device's live session (C{since}: when it authenticated, wall-clock
    seconds; set when it authenticates, removed when it goes), and per
    node the set C{iot:nodedevs:NODE} of what it holds, so the
    L{Cluster.onNodeDead} hook can remove a dead node's devices;
  - centrals: the sorted set C{iot:FLEET:centrals} of the nodes with a
    central session of the fleet (score: when the newest connected), and
    C{iot:nodecentrals:NODE};
  - the store-and-forward queues and issued keys (L{RedisMessageStore}) and
    the UDP tokens (L{ClusterTokenBook}).

Routing: a central's held request or direct message for a device on
another node is forwarded to that node (C{cluster.send}, topic C{iot.req}
or C{iot.msg}); the answer comes back on C{iot.ans} to the asking node,
which answers its HTTP request or TCP frame.  The asking node keeps its own
timer, so a node dying mid-request still ends in TIMEOUT (or at once in
DEVICE_OFFLINE when the node is known gone).  A queued message is pushed to
the shared store and the holding node told to deliver (C{iot.pump}).  A
device's request, message and telemetry reach its fleet's central on this
node if there is one, else on the node whose central connected last, else
the webhook fallback.

A device that authenticates on node B while a session of it lives on node
A: B's claim of the presence key returns A's session, and A is told to
close it (C{REPLACED}), as one node does.

Redis unreachable: local routing goes on (a central and a device on this
node, UDP with this node's tokens); what needs Redis fails at once with
UNAVAILABLE (HTTP 503), and a queued message is refused rather than
accepted and lost.  After (re)connecting, the L{Cluster.onResync} hook
writes back what this node holds.
"""

import json
import time

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from broker.core import jsonstrict
from broker.iot import errors
from broker.iot.concentrator import Concentrator
from broker.iot.frames import Payload
from broker.iot.interfaces import ICentralLink
from broker.iot.redisstore import part, unavailable

log = Logger()

_CLAIM = """
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return old
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""

# After a reconnection: take the key back unless a session that
# authenticated later holds it (it connected elsewhere while we were cut
# off).  {1, older holder or ''} when taken, {0, newer holder} when not.
_RECLAIM = """
local old = redis.call('GET', KEYS[1])
if old == ARGV[1] then old = false end
if old and (tonumber(cjson.decode(old)[3]) or 0) > tonumber(ARGV[3]) then
  return {0, old}
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return {1, old or ''}
"""

_DROP_IF_NODE = """
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v)[1] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# The lease of the node that drains a fleet's central queue to its webhook
# while no node has a central session of it (broker.iot.forward): taken
# when free, renewed by its holder.
_LEASE = """
local v = redis.call('GET', KEYS[1])
if (not v) or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
LEASE_MS = 15000

_ERRORS = {cls.code: cls for cls in (
    errors.UnknownDevice, errors.DeviceOffline, errors.RequestTimeout, errors.QueueFull,
    errors.Forbidden, errors.NoCentral, errors.Busy, errors.BadRequest, errors.Unavailable)}


def encode(header, payload=None):
    """
    A node-to-node message: a JSON header, LF, the payload's bytes.
    """
    if payload is not None:
        header["t"] = payload.type
    return json.dumps(header).encode("utf-8") + b"\n" + (
        payload.data if payload is not None else b"")


def decode(raw):
    head, _, data = raw.partition(b"\n")
    header = jsonstrict.loads(head)
    payload = Payload(header["t"], data) if "t" in header else None
    return header, payload


def errorOf(header):
    code, message = header.get("code", "INTERNAL"), header.get("message", "")
    if header.get("refused"):
        return errors.Refused(message, code)
    cls = _ERRORS.get(code)
    if cls is not None:
        return cls(message)
    e = errors.IoTError(message)
    e.code = code
    return e


@implementer(ICentralLink)
class RemoteCentral:
    """
    The fleet's central connected to another node, as an L{ICentralLink}.
    """

    def __init__(self, concentrator, nodeId):
        self.c = concentrator
        self.nodeId = nodeId

    def deviceRequest(self, fleet, deviceId, payload):
        return self.c._forward(self.nodeId, "iot.creq", {"fleet": fleet, "dev": deviceId},
                               payload, None, errors.NoCentral)

    def message(self, fleet, deviceId, payload):
        self.c._tell(self.nodeId, "iot.cmsg", {"fleet": fleet, "dev": deviceId}, payload)

    def telemetry(self, fleet, deviceId, payload):
        self.c._tell(self.nodeId, "iot.ctel", {"fleet": fleet, "dev": deviceId}, payload)


class ClusterConcentrator(Concentrator):
    """
    L{Concentrator} whose sessions, queues and tokens are cluster-wide.

    @param cluster: the L{broker.cluster.node.Cluster}.
    @param store: a L{broker.iot.redisstore.RedisMessageStore}.
    @param tokens: a L{broker.iot.clustertokens.ClusterTokenBook}.
    """

    # The last values are in Redis, written by every node.
    sharedStore = True

    def __init__(self, reactor, core, registry, store, cluster, clock=time.time, **kw):
        super().__init__(reactor, core, registry, store, **kw)
        self.cluster = cluster
        self.redis = cluster.redis
        self.nodeId = cluster.nodeId
        self._clock = clock
        self._sids = {}              # (fleet, deviceId) -> our session's presence value
        self._nextSid = 0
        self._waiting = {}           # request id -> (Deferred, node, timer)
        self._nextRid = 0
        self._remoteCentrals = {}    # fleet -> {nodeId: since}
        self._links = {}             # nodeId -> RemoteCentral
        self._warned = set()
        self._unreleased = {}        # (fleet, deviceId) -> presence value gone while cut off
        self._sweepCall = None
        self.stats.update(forwarded=0, forwardedIn=0)
        for topic, handler in (
                ("iot.req", self._onRequest), ("iot.msg", self._onMessage),
                ("iot.creq", self._onCentralRequest), ("iot.cmsg", self._onCentralMessage),
                ("iot.ctel", self._onCentralTelemetry), ("iot.ans", self._onAnswer),
                ("iot.pump", self._onPump), ("iot.replaced", self._onReplaced),
                ("iot.central", self._onCentral), ("iot.gone", self._onGone),
                ("iot.key", self._onKey), ("iot.cpump", self._onCentralPump)):
            cluster.onMessage(topic, handler)
        cluster.onNodeDead(self.nodeDead)
        cluster.onResync(self.resync)
        self.forwarder.mayDrain = self._mayDrain

    # -- keys -------------------------------------------------------------

    def _presenceKey(self, fleet, deviceId):
        return self.cluster.key("iot", part(fleet), "dev", part(deviceId))

    def _nodeDevs(self, nodeId):
        return self.cluster.key("iot", "nodedevs", nodeId)

    def _centralsKey(self, fleet):
        return self.cluster.key("iot", part(fleet), "centrals")

    def _nodeCentrals(self, nodeId):
        return self.cluster.key("iot", "nodecentrals", nodeId)

    def storeUnavailable(self, what, f):
        self._outage(what, f)

    def _outage(self, what, f):
        """
        Log a Redis outage once per kind of operation until the next
        resync; other failures always.
        """
        if f.check(errors.Unavailable) or unavailable(f).check(errors.Unavailable):
            if what not in self._warned:
                self._warned.add(what)
                log.warn("iot: Redis unreachable while {what}: {why} (logged once until "
                         "it is back)", what=what, why=f.getErrorMessage())
            return None
        log.failure("iot: {what}", f, what=what)

    # -- presence ---------------------------------------------------------

    def deviceOnline(self, session):
        super().deviceOnline(session)
        k = (session.fleet, session.peerId)
        if self._devices.get(k) is not session:
            return
        value = self._sids[k] = self._newPresence()
        member = json.dumps(list(k))
        d = self.redis.eval(_CLAIM, [self._presenceKey(*k), self._nodeDevs(self.nodeId)],
                            [value, member])
        d.addCallback(lambda old: self._replace(k, old)).addErrback(
            lambda f: self._outage("recording presence", f))

    def _newPresence(self):
        self._nextSid += 1
        return json.dumps([self.nodeId, str(self._nextSid), self._clock()])

    def _replace(self, k, old, early=False):
        """
        This node's session of device C{k} took presence over from C{old}
        (a presence value, or None): tell the node holding that session
        to close it.
        """
        if old:
            node, oldSid = jsonstrict.loads(old)[:2]
            if node != self.nodeId:
                self._tell(node, "iot.replaced", {"fleet": k[0], "dev": k[1], "sid": oldSid},
                           registering=early)

    def deviceOffline(self, session, reason=None):
        k = (session.fleet, session.peerId)
        mine = self._devices.get(k) is session
        super().deviceOffline(session, reason)
        if not mine:
            return
        value = self._sids.pop(k, None)
        if value is not None:
            self._release(k, value)

    def _release(self, k, value, early=False):
        def failed(f):
            # Removed at the next resync instead, unless a newer session
            # of the device is here by then.
            self._unreleased[k] = value
            self._outage("removing presence", f)
        return self.redis.eval(
            _RELEASE, [self._presenceKey(*k), self._nodeDevs(self.nodeId)],
            [value, json.dumps(list(k))], registering=early).addErrback(failed)

    def centralOnline(self, session):
        super().centralOnline(session)
        self._announceCentral(session.fleet, True)

    def centralOffline(self, session):
        had = bool(self._centrals.get(session.fleet))
        super().centralOffline(session)
        if had and not self._centrals.get(session.fleet):
            self._announceCentral(session.fleet, False)

    def _announceCentral(self, fleet, up, early=False):
        since = self._clock()
        r = self.redis
        if up:
            ds = [r.execute("ZADD", self._centralsKey(fleet), since, self.nodeId, registering=early),
                  r.execute("SADD", self._nodeCentrals(self.nodeId), fleet, registering=early)]
        else:
            ds = [r.execute("ZREM", self._centralsKey(fleet), self.nodeId, registering=early),
                  r.execute("SREM", self._nodeCentrals(self.nodeId), fleet, registering=early)]
        if not early:
            ds.append(self.cluster.broadcast("iot.central", encode(
                {"fleet": fleet, "node": self.nodeId, "since": since, "up": up})))
        for d in ds:
            d.addErrback(lambda f: self._outage("recording a central", f))
        return DeferredList(ds)

    def _onCentral(self, origin, raw):
        h, _ = decode(raw)
        nodes = self._remoteCentrals.setdefault(h["fleet"], {})
        if h["up"]:
            nodes[h["node"]] = h["since"]
        else:
            nodes.pop(h["node"], None)
        self.forwarder.refresh(h["fleet"])

    def _forgetNode(self, nodeId):
        for nodes in self._remoteCentrals.values():
            nodes.pop(nodeId, None)
        self._links.pop(nodeId, None)
        self.forwarder.refreshAll()
        for rid, (d, node, timer) in list(self._waiting.items()):
            if node == nodeId:
                self._settle(rid, errors.DeviceOffline(f"node {nodeId} is gone"))

    def _onGone(self, origin, raw):
        self._forgetNode(decode(raw)[0]["node"])

    def _onReplaced(self, origin, raw):
        h, _ = decode(raw)
        k = (h["fleet"], h["dev"])
        session = self._devices.get(k)
        value = self._sids.get(k)
        if session is not None and value is not None and jsonstrict.loads(value)[1] == h["sid"]:
            self.deviceOffline(session, "replaced")
            self.tokens.revoke(*k)
            session.close("REPLACED", "a newer session of this device authenticated on "
                          "another node")

    def nodeDead(self, nodeId):
        """
        The L{Cluster.onNodeDead} hook (run on one surviving node): remove
        the dead node's devices and centrals from presence.
        """
        r = self.redis
        nodeDevs = self._nodeDevs(nodeId)

        def devices(members):
            ds = []
            for m in members:
                fleet, deviceId = jsonstrict.loads(m)
                ds.append(r.eval(_DROP_IF_NODE, [self._presenceKey(fleet, deviceId)],
                                 [nodeId]))
            return DeferredList(ds, fireOnOneErrback=True, consumeErrors=True).addCallback(
                lambda results: sum(int(n) for _, n in results))

        def centrals(fleets):
            ds = [r.execute("ZREM", self._centralsKey(f.decode("utf-8")), nodeId)
                  for f in fleets]
            return DeferredList(ds, fireOnOneErrback=True, consumeErrors=True)

        def done(dropped):
            log.info("iot: node {node} is dead: {n} of its devices left presence",
                     node=nodeId, n=dropped)
            self._forgetNode(nodeId)
            return r.execute("DEL", nodeDevs, self._nodeCentrals(nodeId)).addCallback(
                lambda _: self.cluster.broadcast("iot.gone", encode({"node": nodeId})))
        d = r.execute("SMEMBERS", self._nodeCentrals(nodeId)).addCallback(centrals)
        d.addCallback(lambda _: r.execute("SMEMBERS", nodeDevs)).addCallback(devices)
        return d.addCallback(done).addErrback(
            lambda f: self._outage(f"removing the devices of dead node {nodeId}", f))

    def resync(self):
        """
        The L{Cluster.onResync} hook: after (re)connecting to Redis, or
        after this node was given up for dead, write back what it holds
        and reload what the others changed meanwhile.
        """
        self._warned.clear()

        def issued(rows):
            # Keys issued or revoked meanwhile: close what they invalidate.
            self.registry.loadIssued(rows)
            self.registryChanged()
        ds = [self.store.keys(registering=True).addCallback(issued)]
        unreleased, self._unreleased = self._unreleased, {}
        for k, value in unreleased.items():
            if k not in self._devices:
                ds.append(self._release(k, value, early=True))
        for k, session in list(self._devices.items()):
            value = self._sids.get(k)
            if value is None:
                value = self._sids[k] = self._newPresence()
            ds.append(self._reclaim(k, session, value, early=True))
        for fleet in list(self._centrals):
            ds.append(self._announceCentral(fleet, True, early=True))
        ds.append(self.refreshCentrals(early=True))
        d = DeferredList(ds, consumeErrors=True)

        def done(results):
            for ok, f in results:
                if not ok:
                    self._outage("re-registering this node", f)
            # The link reports itself connected only once every resync
            # hook is done; deliver what was queued meanwhile after that.
            if self._sweepCall is None or not self._sweepCall.active():
                self._sweepCall = self.reactor.callLater(0, self.sweep)
        return d.addCallback(done)

    def stop(self):
        """
        The face stops: cancel what is scheduled and fail what waits for
        another node (a Deferred: the last values written).
        """
        flushed = super().stop()
        if self._sweepCall is not None and self._sweepCall.active():
            self._sweepCall.cancel()
        for rid in list(self._waiting):
            self._settle(rid, errors.Unavailable("this node is stopping"))
        return flushed

    def _reclaim(self, k, session, value, early=False):
        """
        Take presence back for our session of device C{k} unless a session
        that authenticated later holds it (then ours is closed).
        """
        d = self.redis.eval(_RECLAIM, [self._presenceKey(*k), self._nodeDevs(self.nodeId)],
                            [value, json.dumps(list(k)), jsonstrict.loads(value)[2]],
                            registering=early)
        return d.addCallback(self._reclaimed, session, early)

    def _reclaimed(self, result, session, early):
        taken, other = result
        k = (session.fleet, session.peerId)
        if int(taken):
            # An older session elsewhere (it authenticated before ours,
            # while this node was cut off) is closed.
            self._replace(k, other.decode("utf-8") if other else None, early)
            return
        if self._devices.get(k) is session:
            log.info("iot: device {fleet}/{device} connected elsewhere while this node was "
                     "cut off from Redis; closing the older session here",
                     fleet=k[0], device=k[1])
            self._sids.pop(k, None)
            Concentrator.deviceOffline(self, session, "replaced")
            session.close("REPLACED", "a newer session of this device authenticated on "
                          "another node")

    def refreshCentrals(self, early=False):
        """
        Re-read which nodes hold each fleet's central (heals a missed
        announcement).
        """
        fleets = self.registry.fleets()
        ds = [self.redis.execute("ZRANGE", self._centralsKey(f), 0, -1, "WITHSCORES",
                                 registering=early) for f in fleets]

        def read(results):
            fresh = {}
            for fleet, (ok, flat) in zip(fleets, results):
                if not ok:
                    return
                nodes = {}
                for i in range(0, len(flat), 2):
                    node = flat[i].decode("utf-8")
                    if node != self.nodeId:
                        nodes[node] = float(flat[i + 1])
                if nodes:
                    fresh[fleet] = nodes
            self._remoteCentrals = fresh
            self.forwarder.refreshAll()
        return DeferredList(ds, consumeErrors=True).addCallback(read)

    def sweep(self):
        """
        Periodically (and after a resync): pump every local outbox, so a
        message queued by a node that could not tell us is still
        delivered; check that presence still names this node's sessions
        (a reaper that ran while this node was resyncing may have removed
        them) and its centrals; re-read the other nodes' centrals.
        """
        if not self.redis.connected:
            # Nothing to read meanwhile; the resync sweeps when it is back.
            return succeed(None)
        for box in list(self._outboxes.values()):
            box.pump()
        self.forwarder.pumpAll()
        r = self.redis
        ds = [self.refreshCentrals()]
        unreleased, self._unreleased = self._unreleased, {}
        for k, sid in unreleased.items():
            if k not in self._devices:
                ds.append(self._release(k, sid))
        for fleet in list(self._centrals):
            # NX: the score (when the newest connected) stays as it is.
            ds.append(r.execute("ZADD", self._centralsKey(fleet), "NX", self._clock(),
                                self.nodeId))
            ds.append(r.execute("SADD", self._nodeCentrals(self.nodeId), fleet))
        held = [(k, s) for k, s in self._devices.items() if k in self._sids]
        for i in range(0, len(held), 1000):
            chunk = held[i:i + 1000]
            ds.append(r.execute("MGET", *[self._presenceKey(*k) for k, _ in chunk])
                      .addCallback(self._checkPresence, chunk))
        d = DeferredList(ds, consumeErrors=True)

        def done(results):
            for ok, f in results:
                if not ok:
                    self._outage("checking presence", f)
        return d.addCallback(done)

    def _checkPresence(self, values, chunk):
        ds = []
        for (k, session), value in zip(chunk, values):
            mine = self._sids.get(k)
            if self._devices.get(k) is not session or mine is None:
                continue
            if value is not None and value.decode("utf-8") == mine:
                continue
            ds.append(self._reclaim(k, session, mine))
        return DeferredList(ds, fireOnOneErrback=True, consumeErrors=True)

    # -- locating a device ------------------------------------------------

    def _locate(self, fleet, deviceId):
        """
        @return: a Deferred firing with the node holding the device (None:
            no node), failing with Unavailable.
        """
        return self.redis.execute("GET", self._presenceKey(fleet, deviceId)).addCallbacks(
            lambda v: jsonstrict.loads(v)[0] if v is not None else None, unavailable)

    def deviceStatus(self, fleet, deviceId):
        try:
            local = self._device(fleet, deviceId)
        except errors.IoTError as e:
            return fail(e)
        d = succeed(True) if local is not None else self._locate(fleet, deviceId).addCallback(
            lambda node: node is not None)

        def depth(online):
            return self.store.depth(fleet, deviceId).addCallback(
                lambda n: {"id": deviceId, "online": online, "queueDepth": n})
        return d.addCallback(depth)

    def devices(self, fleet):
        ids = self.registry.fleetDevices(fleet)
        if not ids:
            return succeed([])
        online = self.redis.execute("MGET", *[self._presenceKey(fleet, i) for i in ids])
        online.addErrback(unavailable)

        def listed(values):
            return self.store.depths(fleet).addCallback(lambda depths: [
                {"id": i, "online": v is not None or (fleet, i) in self._devices,
                 "queueDepth": depths.get(i, 0)} for i, v in zip(ids, values)])
        return online.addCallback(listed)

    # -- central -> device ------------------------------------------------

    def request(self, fleet, deviceId, payload, timeout=None):
        try:
            session = self._device(fleet, deviceId)
        except errors.IoTError as e:
            return fail(e)
        if session is not None:
            return super().request(fleet, deviceId, payload, timeout)
        timeout = self.requestTimeout if timeout is None else timeout

        def located(node):
            if node is None or node == self.nodeId:
                raise errors.DeviceOffline(f"device {deviceId!r} is not connected")
            self.stats["forwarded"] += 1
            return self._forward(node, "iot.req", {"fleet": fleet, "dev": deviceId,
                                                   "timeout": timeout},
                                 payload, timeout, errors.DeviceOffline)
        return self._locate(fleet, deviceId).addCallback(located).addErrback(
            self._countTimeout)

    def send(self, fleet, deviceId, payload, queue=True):
        try:
            session = self._device(fleet, deviceId)
        except errors.IoTError as e:
            return fail(e)
        if not queue:
            if session is not None:
                return super().send(fleet, deviceId, payload, queue=False)

            def located(node):
                if node is None or node == self.nodeId:
                    raise errors.DeviceOffline(f"device {deviceId!r} is not connected")
                self.stats["forwarded"] += 1
                return self._forward(node, "iot.msg", {"fleet": fleet, "dev": deviceId},
                                     payload, self.requestTimeout, errors.DeviceOffline)
            return self._locate(fleet, deviceId).addCallback(located).addCallback(
                lambda h: (h["mid"], False))
        return super().send(fleet, deviceId, payload, queue=True)

    def _queuedOffline(self, fleet, deviceId, messageId):
        # The shared queue has it; the node holding the device (if any)
        # is told to pump its outbox.
        def pumped(node):
            if node is None or node == self.nodeId:
                return str(messageId), True
            self._tell(node, "iot.pump", {"fleet": fleet, "dev": deviceId})
            return str(messageId), False
        return self._locate(fleet, deviceId).addCallbacks(
            pumped, lambda f: (str(messageId), True))

    # -- keys -------------------------------------------------------------

    def issueKey(self, fleet, deviceId):
        d = super().issueKey(fleet, deviceId)

        def issued(secret):
            self._tell(None, "iot.key", {"fleet": fleet, "dev": deviceId, "secret": secret})
            return secret
        return d.addCallback(issued)

    def revokeKey(self, fleet, deviceId):
        d = super().revokeKey(fleet, deviceId)
        return d.addCallback(lambda _: self._tell(
            None, "iot.key", {"fleet": fleet, "dev": deviceId, "secret": None}))

    def _onKey(self, origin, raw):
        h, _ = decode(raw)
        fleet, deviceId = h["fleet"], h["dev"]
        self.registry.issued(fleet, deviceId, h["secret"])
        if h["secret"] is None:
            self.tokens.revoke(fleet, deviceId)
        self._dropDevice(fleet, deviceId, "the device's key was replaced or revoked")

    # -- device -> central ------------------------------------------------

    def centralLink(self, fleet):
        sessions = self._centrals.get(fleet)
        if sessions:
            return sessions[-1]
        nodes = self._remoteCentrals.get(fleet)
        if nodes:
            node = max(nodes, key=nodes.get)
            link = self._links.get(node)
            if link is None:
                link = self._links[node] = RemoteCentral(self, node)
            return link
        return self._fallbacks.get(fleet)

    def remoteCentral(self, fleet):
        return bool(self._remoteCentrals.get(fleet))

    def centralQueued(self, fleet):
        # The node of the newest central drains the queue; with none, the
        # webhook lease holder (any node may be: all are told).
        nodes = self._remoteCentrals.get(fleet)
        if nodes:
            self._tell(max(nodes, key=nodes.get), "iot.cpump", {"fleet": fleet})
        elif fleet in self._fallbacks:
            self._tell(None, "iot.cpump", {"fleet": fleet})

    def _onCentralPump(self, origin, raw):
        self.forwarder.pump(decode(raw)[0]["fleet"])

    def _mayDrain(self, fleet):
        return self.redis.eval(_LEASE, [self.cluster.key("iot", part(fleet), "cdrain")],
                               [self.nodeId, LEASE_MS]).addCallbacks(
            lambda taken: bool(int(taken)), unavailable)

    # -- node-to-node -----------------------------------------------------

    def _tell(self, node, topic, header, payload=None, registering=False):
        """
        Fire and forget to C{node} (None: every other node).
        """
        raw = encode(header, payload)
        d = (self.cluster.broadcast(topic, raw, registering) if node is None
             else self.cluster.send(node, topic, raw, registering))
        d.addErrback(lambda f: self._outage(f"sending {topic}", f))
        return None

    def _forward(self, node, topic, header, payload, timeout, goneError):
        """
        Ask C{node} and wait for its C{iot.ans}.

        @return: a Deferred firing with the answer's header (and payload
            as C{"payload"}), failing with the remote error, RequestTimeout
            after C{timeout}, C{goneError} if the node is gone, Unavailable.
        """
        self._nextRid += 1
        rid = self._nextRid
        header["id"] = rid

        def cancel(d):
            entry = self._waiting.pop(rid, None)
            if entry is not None and entry[2] is not None and entry[2].active():
                entry[2].cancel()
        d = Deferred(cancel)
        timer = None
        if timeout is not None:
            timer = self.reactor.callLater(timeout, self._settle, rid, errors.RequestTimeout(
                f"device {header.get('dev')!r} did not answer within {timeout:g}s"))
        self._waiting[rid] = (d, node, timer)

        def sent(receivers):
            if not receivers:
                self._settle(rid, goneError(f"node {node} holding it is gone"))

        def failed(f):
            f = unavailable(f)
            self._settle(rid, f.value)
        self.cluster.send(node, topic, encode(header, payload)).addCallbacks(sent, failed)
        return d

    def _settle(self, rid, outcome):
        entry = self._waiting.pop(rid, None)
        if entry is None:
            return
        d, _, timer = entry
        if timer is not None and timer.active():
            timer.cancel()
        if isinstance(outcome, Exception):
            d.errback(outcome)
        else:
            d.callback(outcome)

    def _onAnswer(self, origin, raw):
        h, payload = decode(raw)
        if h.get("ok"):
            self._settle(h["id"], payload if "mid" not in h else h)
        else:
            self._settle(h["id"], errorOf(h))

    def _answer(self, origin, rid, d):
        """
        Send the outcome of C{d} (a Payload, a dict header, or an
        IoTError) back to C{origin}.
        """
        def ok(result):
            if isinstance(result, Payload):
                return self._tell(origin, "iot.ans", {"id": rid, "ok": True}, result)
            return self._tell(origin, "iot.ans", dict(result, id=rid, ok=True))

        def bad(f):
            e = f.value
            if not isinstance(e, errors.IoTError):
                log.failure("iot: answering a request of node {node}", f, node=origin)
                e = errors.IoTError("internal error")
            self._tell(origin, "iot.ans", {"id": rid, "ok": False, "code": e.code,
                                           "message": e.message,
                                           "refused": isinstance(e, errors.Refused)})
        d.addCallbacks(ok, bad)

    def _onRequest(self, origin, raw):
        self._forLocalDevice(origin, raw, lambda fleet, dev, payload, h: Concentrator.request(
            self, fleet, dev, payload, h["timeout"]))

    def _onMessage(self, origin, raw):
        self._forLocalDevice(origin, raw, lambda fleet, dev, payload, h: Concentrator.send(
            self, fleet, dev, payload, queue=False).addCallback(lambda r: {"mid": r[0]}))

    def _forLocalDevice(self, origin, raw, act):
        """
        Carry out what node C{origin} forwarded for a device of this node
        (C{act(fleet, deviceId, payload, header)}) and answer it there.
        """
        h, payload = decode(raw)
        self.stats["forwardedIn"] += 1
        k = (h["fleet"], h["dev"])
        if k not in self._devices:
            d = fail(errors.DeviceOffline(f"device {k[1]!r} is not connected"))
        else:
            d = act(k[0], k[1], payload, h)
        self._answer(origin, h["id"], d)

    def _onPump(self, origin, raw):
        h, _ = decode(raw)
        box = self._outboxes.get((h["fleet"], h["dev"]))
        if box is not None:
            box.pump()

    def _onCentralRequest(self, origin, raw):
        h, payload = decode(raw)
        self.stats["forwardedIn"] += 1
        link = self._localCentral(h["fleet"])
        if link is None:
            d = fail(errors.NoCentral("the central disconnected"))
        else:
            d = link.deviceRequest(h["fleet"], h["dev"], payload)
        self._answer(origin, h["id"], d)

    def _onCentralMessage(self, origin, raw):
        h, payload = decode(raw)
        link = self._localCentral(h["fleet"])
        if link is not None:
            link.message(h["fleet"], h["dev"], payload)

    def _onCentralTelemetry(self, origin, raw):
        h, payload = decode(raw)
        link = self._localCentral(h["fleet"])
        if link is not None:
            link.telemetry(h["fleet"], h["dev"], payload)
