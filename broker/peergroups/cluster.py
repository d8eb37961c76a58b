# -*- test-case-name: tests.test_peergroups_cluster -*-
"""
The peer-groups face on several broker nodes that behave as one broker.

Every node holds the whole model in memory (loaded from the Redis store)
and raises events to its own sessions only.  So that two peers of one
group on two nodes see each other as on one node:

  - each change a node stores is broadcast (C{pg.change}) once Redis took
    it; the others apply it to their model, then raise the events that
    rode with it;
  - group-wide events (records changed, properties, credentials) are
    broadcast (C{pg.event}) after their change; each node raises them to
    its registrations once;
  - presence (who is online, through which node, at which address) is the
    hash C{pg:presence} plus C{pg.presence} messages, from which each node
    raises C{MEMBER_CHANGED} CONNECTED/UPDATED/DISCONNECTED itself; the
    node that reaps a dead node marks its members offline for everyone;
  - a direct connection to a peer on another node is relayed with
    C{cluster.send(node, "pg.direct", ...)}, in order, and closed if that
    node is gone;
  - after Redis comes back (or this node was given up for dead) the node
    re-registers its online members and merges the store into its model,
    and asks the others to (C{pg.resync}), so what a lost message missed
    converges.

Messages are JSON.  Rare races are documented in docs/peergroups.md
("Cluster mode").
"""

import json

from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from twisted.logger import Logger

from broker.core import jsonstrict
from broker.peergroups import constants as C
from broker.peergroups import records as rec
from broker.peergroups.credentials import chainFromJSON, chainToJSON
from broker.peergroups.errors import PeerError
from broker.peergroups.model import Direct, Group, Member, RemotePeer
from broker.peergroups.redisstore import changeFromJSON, changeToJSON, hashField, hashPairs

log = Logger()


def _dumps(obj):
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


class PeerGroupsCluster:
    """
    Links one L{broker.peergroups.core.PeerGroups} to the cluster.

    @param pg: the face's core service (its C{store} a
        L{broker.peergroups.redisstore.RedisPeerGroupStore}).
    @param cluster: the L{broker.cluster.node.Cluster}.
    @param retryDelay: seconds between attempts to load the store while
        Redis cannot be reached.
    """

    def __init__(self, pg, cluster, retryDelay=1.0):
        self.pg = pg
        self.cluster = cluster
        self.redis = cluster.redis
        self.nodeId = cluster.nodeId
        self.retryDelay = retryDelay
        self.presenceKey = cluster.key("pg", "presence")
        self.pendingOpens = {}
        # Opens closed by their initiator before the far node answered.
        self.closedOpens = set()
        self._retry = None
        self._down = False
        self._merging = None
        self._keysShared = False
        self._resyncing = None
        self._mergeWaiters = []
        pg.link = self
        cluster.onMessage("pg.change", self._received(self._changes))
        cluster.onMessage("pg.event", self._received(self._event))
        cluster.onMessage("pg.presence", self._received(self._presence))
        cluster.onMessage("pg.direct", self._received(self._direct))
        cluster.onMessage("pg.resync", self._received(lambda origin, obj: self.merge()))
        cluster.onNodeDead(self.nodeDead)
        cluster.onResync(self.resync)
        self.redis.onDisconnected(self._disconnected)

    def _received(self, handler):
        def receive(origin, payload):
            if not self.pg.loaded:
                # Loading (or waiting for Redis): the load and the merge
                # that follows it bring what this message said.
                return
            try:
                obj = jsonstrict.loads(payload)
            except ValueError:
                log.warn("peer groups: malformed cluster message from {node} dropped",
                         node=origin)
                return
            try:
                handler(origin, obj)
            except Exception:
                log.failure("peer groups: a cluster message from {node} failed", node=origin)
        return receive

    def _publish(self, topic, obj):
        d = self.cluster.broadcast(topic, _dumps(obj))
        d.addErrback(self._lost, topic)
        return d

    def _lost(self, failure, what):
        # Redis is down: the merge after it comes back makes up for it.
        # (At shutdown the Redis client stops with the face: not news.)
        if not self._down and self.pg.running:
            log.warn("peer groups: cannot tell the cluster ({what}): {why}", what=what,
                     why=failure.getErrorMessage())

    def _disconnected(self, *args):
        if not self._down:
            self._down = True
            log.warn("peer groups: the cluster store (Redis) is unreachable; changes are "
                     "refused (E_UNEXPECTED) until it is back")

    # -- loading ----------------------------------------------------------

    @defer.inlineCallbacks
    def load(self):
        """
        The store's contents plus the presence rows of the cluster.
        """
        if not self._keysShared:
            yield self._shareKeys()
        data = yield self.pg.store.load()
        flat = yield self.redis.execute("HGETALL", self.presenceKey)
        data["presence"] = [(jsonstrict.loads(k), jsonstrict.loads(v)) for k, v in hashPairs(flat)]
        return data

    @defer.inlineCallbacks
    def _shareKeys(self):
        """
        One issuer key and one export key for the whole cluster (password
        joiners' certificates and sealed exports must verify on every
        node): the first node to start stores its own; the others use
        those.  Whoever can write to Redis controls this face's store
        anyway, so the keys are no safer elsewhere.
        """
        pg = self.pg
        if pg.issuerKey is not None:
            key = self.cluster.key("pg", "issuer-key")
            mine = pg.issuerKey.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())
            yield self.redis.execute("SET", key, mine, "NX")
            shared = yield self.redis.execute("GET", key)
            if shared != mine:
                pg.issuerKey = serialization.load_pem_private_key(shared, None)
        key = self.cluster.key("pg", "export-key")
        yield self.redis.execute("SET", key, pg.exportKey, "NX")
        pg.exportKey = yield self.redis.execute("GET", key)
        self._keysShared = True

    def loadFailed(self, failure):
        if not self._down:
            self._down = True
            log.warn("peer groups: cannot load the cluster store ({why}); retrying every "
                     "{delay}s", why=failure.getErrorMessage(), delay=self.retryDelay)
        if self._retry is None or not self._retry.active():
            self._retry = self.pg.reactor.callLater(self.retryDelay, self.pg.retryLoad)

    def stop(self):
        for call in (self._retry, self._resyncing):
            if call is not None and call.active():
                call.cancel()

    def loadedPresence(self, rows):
        for (app, gpn, peer), p in rows:
            if p["node"] == self.nodeId:
                # Ours from before a reload (its sessions were closed while
                # Redis was away): gone, for the other nodes too.
                self.redis.execute("HDEL", self.presenceKey, hashField(app, gpn, peer)).addErrback(
                    self._lost, "presence")
                self._publish("pg.presence", {"op": "off", "app": app, "gpn": gpn, "peer": peer,
                                              "node": self.nodeId})
                continue
            group = self._group(app, gpn)
            if group is not None:
                group.remote[peer] = self._remotePeer(group, peer, p)
        # What changed between the load's reads and now: merged once the
        # model is up (messages are handled from then on).
        self.pg.reactor.callLater(0, self.merge)

    def reset(self):
        self.pendingOpens.clear()
        self.closedOpens.clear()

    def _remotePeer(self, group, peer, p):
        return RemotePeer(group, peer, p["node"], int(p["nodeId"]), p["address"],
                          chainFromJSON(p["chain"]) if p.get("chain") else None)

    def _group(self, app, gpn):
        a = self.pg.apps.get(app)
        return a.groups.get(gpn) if a is not None else None

    # -- changes ----------------------------------------------------------

    def replicate(self, changes, events=()):
        """
        Tell the other nodes of C{changes} (stored), then of C{events}
        (C{("event", app, gpn, eventType, payload)}) to raise once they hold
        them.
        """
        if not changes and not events:
            return
        self._publish("pg.change", {"c": [changeToJSON(c) for c in changes],
                                    "e": [list(e[1:]) for e in events]})

    def _changes(self, origin, obj):
        for raw in obj.get("c", ()):
            self.applyChange(changeFromJSON(raw))
        for app, gpn, eventType, payload, *typeFilter in obj.get("e", ()):
            group = self._group(app, gpn)
            if group is not None:
                self.pg.broadcast(group, eventType, payload, typeFilter[0] if typeFilter else None,
                                  forward=False)

    def applyChange(self, change):
        """
        Make one change another node stored in this node's model.
        """
        kind, appName, gpn = change[0], change[1], change[2]
        app = self.pg.application(appName)
        group = app.groups.get(gpn)
        if kind == "group":
            g = change[3]
            if group is None:
                app.groups[gpn] = Group.fromStore({"app": appName, "gpn": gpn, **g})
            else:
                group.properties = g["properties"]
                group.verifier = g["verifier"]
                group.issuer = chainFromJSON(g["issuer"]) if g["issuer"] else None
                group.seq = max(group.seq, g["seq"])
            return
        if group is None:
            log.warn("peer groups: a change to unknown group {gpn} of {app}; merging the "
                     "store", gpn=gpn, app=appName)
            self.merge()
            return
        if kind == "seq":
            group.seq = max(group.seq, change[3])
        elif kind == "member":
            if self._merging is not None:
                self._merging.add(("m", appName, gpn, change[3]))
            group.members[change[3]] = Member.fromStore({"peer": change[3], **change[4]})
        elif kind == "dropMember":
            group.members.pop(change[3], None)
        elif kind == "record":
            r = change[3]
            old = group.records.get(r.id)
            if old is None or rec.beats(r, old):
                group.records[r.id] = r
            group.seq = max(group.seq, r.seq)
        elif kind == "dropRecords":
            for i in change[3]:
                group.records.pop(i, None)
        elif kind == "serial":
            group.serials.add(change[3])

    def forwardEvent(self, group, eventType, payload, filterType=None):
        self._publish("pg.event", {"app": group.app, "gpn": group.gpn, "t": eventType,
                                   "p": payload, "f": filterType})

    def _event(self, origin, obj):
        group = self._group(obj["app"], obj["gpn"])
        if group is not None:
            self.pg.broadcast(group, obj["t"], obj["p"], obj.get("f"), forward=False)

    # -- presence -----------------------------------------------------------

    def _presenceRow(self, node):
        return {"node": self.nodeId, "nodeId": str(node.nodeId), "address": node.address,
                "chain": chainToJSON(node.chain) if node.chain else None}

    def online(self, node, after=None):
        """
        C{node} is online here (or moved to another address): register it
        in the cluster's presence and tell the other nodes (once C{after}
        fired, if given, and if it is still online then).
        """
        if after is not None:
            after.addCallback(lambda _: self.online(node) if node.online else None)
            return
        row = self._presenceRow(node)
        self.redis.execute("HSET", self.presenceKey,
                           hashField(node.app.name, node.group.gpn, node.peerName),
                           json.dumps(row)).addErrback(self._lost, "presence")
        self._publish("pg.presence", {"op": "on", "app": node.app.name, "gpn": node.group.gpn,
                                      "peer": node.peerName, **row})

    def offline(self, node):
        self.redis.execute("HDEL", self.presenceKey,
                           hashField(node.app.name, node.group.gpn, node.peerName)).addErrback(
            self._lost, "presence")
        self._publish("pg.presence", {"op": "off", "app": node.app.name,
                                      "gpn": node.group.gpn, "peer": node.peerName,
                                      "node": self.nodeId})

    def _presence(self, origin, obj):
        if self._merging is not None:
            self._merging.add(("p", obj["app"], obj["gpn"], obj["peer"]))
        if obj["op"] == "on":
            self.remoteOnline(obj["app"], obj["gpn"], obj["peer"], obj)
        else:
            self.remoteOffline(obj["app"], obj["gpn"], obj["peer"], obj["node"])

    def remoteOnline(self, app, gpn, peer, p):
        group = self._group(app, gpn)
        if group is None:
            return
        rp = group.remote.get(peer)
        if rp is None:
            group.remote[peer] = self._remotePeer(group, peer, p)
            if peer not in group.online:
                self.pg.memberChanged(group, peer, C.MEMBER_CONNECTED, forward=False)
            return
        moved = (rp.address, rp.clusterNode) != (p["address"], p["node"])
        rp.clusterNode, rp.nodeId, rp.address = p["node"], int(p["nodeId"]), p["address"]
        rp.chain = chainFromJSON(p["chain"]) if p.get("chain") else None
        if moved and peer not in group.online:
            self.pg.memberChanged(group, peer, C.MEMBER_UPDATED, forward=False)

    def remoteOffline(self, app, gpn, peer, clusterNode):
        group = self._group(app, gpn)
        rp = group.remote.get(peer) if group is not None else None
        if rp is None or rp.clusterNode != clusterNode:
            return
        del group.remote[peer]
        for direct in list(rp.directs.values()):
            self.pg.closeDirect(direct, notify=False)
        if peer not in group.online:
            self.pg.memberChanged(group, peer, C.MEMBER_DISCONNECTED, forward=False)

    @defer.inlineCallbacks
    def nodeDead(self, deadNode):
        """
        C{deadNode} stopped heartbeating (this node reaps it, once for the
        cluster): its members go offline here and on every other node.
        """
        flat = yield self.redis.execute("HGETALL", self.presenceKey)
        gone = []
        for k, v in hashPairs(flat):
            if jsonstrict.loads(v)["node"] == deadNode:
                gone.append(k)
        if gone:
            yield self.redis.execute("HDEL", self.presenceKey, *gone)
        for k in gone:
            app, gpn, peer = jsonstrict.loads(k)
            self.remoteOffline(app, gpn, peer, deadNode)
            yield self._publish("pg.presence", {"op": "off", "app": app, "gpn": gpn,
                                                "peer": peer, "node": deadNode})
        # Direct connections still opening towards it fail.
        for cid, (node, target) in list(self.pendingOpens.items()):
            if target.clusterNode == deadNode:
                self._openFailed(cid, "PEER_E_CONNECTION_FAILED")
        log.info("peer groups: node {node} is dead; {n} of its members now offline",
                 node=deadNode, n=len(gone))

    # -- resync -------------------------------------------------------------

    def resync(self):
        """
        Redis is back, or this node had been given up for dead: register
        the members online here again and merge what may have been missed.

        The cluster runs this hook before the Redis client reports itself
        connected (and refuses ordinary commands until then), so the work
        starts once it does.
        """
        self._down = False
        if self._resyncing is None or not self._resyncing.active():
            self._resyncing = self.pg.reactor.callLater(0, self._resyncWhenConnected)

    def _resyncWhenConnected(self):
        self._resyncing = None
        if not self.pg.running:
            return
        if not self.redis.connected:
            self._resyncing = self.pg.reactor.callLater(0.02, self._resyncWhenConnected)
            return
        if not self.pg.loaded:
            # Reloading (after a change cut off in flight, say): the load
            # brings this node up to Redis; the others merge too, for a
            # change Redis took without anyone being told.
            self._publish("pg.resync", {})
            self.pg.retryLoad()
            return
        n = 0
        for app in list(self.pg.apps.values()):
            for group in list(app.groups.values()):
                for node in list(group.online.values()):
                    self.online(node)
                    n += 1
        log.info("peer groups: the cluster store is reachable; {n} members online here "
                 "registered again, merging the store", n=n)
        self._publish("pg.resync", {})
        return self.merge()

    def merge(self):
        """
        Bring the model up to the store (and the cluster's presence):
        records another node changed while a message was lost raise their
        events here, members come and go.  Entries changed by messages
        while the store was being read are left as those messages made
        them.
        """
        if not self.pg.running:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._mergeWaiters.append(waiter)
        if self._merging is not None:
            return waiter
        self._merging = set()
        d = self.load()
        d.addCallback(self._merge)
        d.addErrback(lambda f: log.warn("peer groups: cannot merge the cluster store: {why}",
                                        why=f.getErrorMessage()))

        def done(_):
            self._merging = None
            waiters, self._mergeWaiters = self._mergeWaiters, []
            for w in waiters:
                w.callback(None)
        d.addBoth(done)
        return waiter

    def _merge(self, data):
        touched = self._merging
        for row in data["groups"]:
            self.applyChange(("group", row["app"], row["gpn"],
                              {k: row[k] for k in ("grc", "properties", "verifier", "issuer",
                                                   "seq")}))
        stored = set()
        for row in data["members"]:
            key = (row["app"], row["gpn"], row["peer"])
            stored.add(key)
            group = self._group(row["app"], row["gpn"])
            if group is None or ("m",) + key in touched or row["peer"] in group.online:
                continue
            old = group.members.get(row["peer"])
            group.members[row["peer"]] = Member.fromStore(row)
            if not (old is not None and old.published) and row["published"]:
                self.pg.memberChanged(group, row["peer"], C.MEMBER_JOINED, forward=False)
        for app, gpn, r in data["records"]:
            group = self._group(app, gpn)
            if group is None:
                continue
            old = group.records.get(r.id)
            if old is not None and not rec.beats(r, old):
                continue
            group.records[r.id] = r
            group.seq = max(group.seq, r.seq)
            if r.expiration <= self.pg.now():
                continue
            if r.deleted:
                if old is not None and not old.deleted:
                    self.pg.recordChanged(group, C.RECORD_DELETED, r, forward=False)
            else:
                kind = C.RECORD_UPDATED if old is not None and not old.deleted else \
                    C.RECORD_ADDED
                self.pg.recordChanged(group, kind, r, forward=False)
        for app, gpn, serial in data["serials"]:
            group = self._group(app, gpn)
            if group is not None:
                group.serials.add(serial)
        present = {}
        for (app, gpn, peer), p in data["presence"]:
            if p["node"] != self.nodeId:
                present[(app, gpn, peer)] = p
        for app in list(self.pg.apps.values()):
            for group in list(app.groups.values()):
                for peer, rp in list(group.remote.items()):
                    key = (app.name, group.gpn, peer)
                    if key not in present and ("p",) + key not in touched:
                        self.remoteOffline(app.name, group.gpn, peer, rp.clusterNode)
        for key, p in present.items():
            if ("p",) + key not in touched:
                self.remoteOnline(*key, p)

    # -- direct connections -------------------------------------------------

    def _sendDirect(self, clusterNode, obj):
        return self.cluster.send(clusterNode, "pg.direct", _dumps(obj))

    def openRemote(self, node, target, cid):
        """
        Open a direct connection from C{node} (here) to C{target} (a
        L{RemotePeer}): its node checks the target and answers.
        """
        self.pendingOpens[cid] = (node, target)
        d = self._sendDirect(target.clusterNode, {
            "op": "open", "cid": str(cid), "app": node.app.name, "gpn": node.group.gpn,
            "from": node.peerName, "to": target.peerName, "nodeId": str(node.nodeId),
            "address": node.address, "chain": chainToJSON(node.chain) if node.chain else None})

        def sent(receivers):
            if not receivers:
                self._openFailed(cid, "PEER_E_CONNECTION_FAILED")
        d.addCallbacks(sent, lambda f: self._openFailed(cid, "PEER_E_CONNECTION_FAILED"))

    def opening(self, node, cid):
        """
        Whether C{cid} is a connection C{node} (here) opened towards
        another node that has not answered yet.  On one node a connection
        exists as soon as the open is answered; here it may be used then
        too (L{sendPending}, L{closePending}).
        """
        pending = self.pendingOpens.get(cid)
        return pending is not None and pending[0] is node and cid not in self.closedOpens

    def sendPending(self, node, cid, dtype, data):
        """
        Data on an L{opening} connection: relayed behind the open (the far
        node handles its channel in order, so the target gets it after its
        CONNECTED; if it refused, the data is dropped with the open).
        """
        target = self.pendingOpens[cid][1]
        d = self._sendDirect(target.clusterNode, {"op": "data", "cid": str(cid),
                                                  "type": dtype, "data": data})

        def failed(f):
            # Lost data: the connection must not go on without it.
            log.info("peer groups: direct connection {cid} closed: {why}", cid=cid,
                     why=f.getErrorMessage())
            if self.opening(node, cid):
                self.closePending(node, cid)
        d.addErrback(failed)

    def closePending(self, node, cid):
        """
        Close an L{opening} connection: the far node closes its end after
        opening it; this end reports CONNECTED then DISCONNECTED once the
        answer is in, as on one node.
        """
        target = self.pendingOpens[cid][1]
        self.closedOpens.add(cid)
        self._sendDirect(target.clusterNode, {"op": "close", "cid": str(cid)}).addErrback(
            lambda f: None)

    def _openFailed(self, cid, reason):
        self.closedOpens.discard(cid)
        pending = self.pendingOpens.pop(cid, None)
        if pending is None:
            return
        node, target = pending
        self.pg.emit(node, C.EVENT_DIRECT_CONNECTION, {"connectionChangeData": {
            "status": C.PEER_CONNECTION_FAILED, "connectionId": str(cid),
            "nodeId": "0", "identity": target.peerName, "nextConnectionId": "0",
            "hrConnectionFailedReason": PeerError(reason).hr}})

    def sendData(self, other, direct, dtype, data):
        d = self._sendDirect(other.clusterNode, {"op": "data", "cid": str(direct.id),
                                                 "type": dtype, "data": data})

        def sent(receivers):
            if not receivers:
                self.pg.closeDirect(direct, notify=False)

        def failed(f):
            log.info("peer groups: direct connection {cid} closed: {why}", cid=direct.id,
                     why=f.getErrorMessage())
            self.pg.closeDirect(direct, notify=False)
        d.addCallbacks(sent, failed)

    def closeRemote(self, end, direct):
        self._sendDirect(end.clusterNode, {"op": "close", "cid": str(direct.id)}).addErrback(
            lambda f: None)

    def _direct(self, origin, obj):
        op = obj["op"]
        cid = int(obj["cid"])
        if op == "open":
            self._remoteOpen(origin, cid, obj)
        elif op == "opened":
            pending = self.pendingOpens.pop(cid, None)
            if pending is None:
                return
            node, target = pending
            target.nodeId = int(obj["nodeId"])
            if cid in self.closedOpens:
                # Closed before the answer: the far end closed already.
                self.closedOpens.discard(cid)
                for status in (C.PEER_CONNECTED, C.PEER_DISCONNECTED):
                    self.pg.emit(node, C.EVENT_DIRECT_CONNECTION, {"connectionChangeData": {
                        "status": status, "connectionId": str(cid),
                        "nodeId": str(target.nodeId), "identity": target.peerName}})
                return
            if not node.online:
                self._sendDirect(origin, {"op": "close", "cid": str(cid)}).addErrback(
                    lambda f: None)
                return
            direct = Direct(cid, node, target)
            self.pg.directs[cid] = direct
            node.directs[cid] = direct
            target.directs[cid] = direct
            self.pg.emit(node, C.EVENT_DIRECT_CONNECTION, {"connectionChangeData": {
                "status": C.PEER_CONNECTED, "connectionId": str(cid),
                "nodeId": str(target.nodeId), "identity": target.peerName}})
        elif op == "failed":
            self._openFailed(cid, obj["reason"])
        elif op == "data":
            direct = self.pg.directs.get(cid)
            if direct is None:
                return
            local = direct.target if direct.initiator.remote else direct.initiator
            self.pg.emit(local, C.EVENT_INCOMING_DATA, {"incomingData": {
                "connectionId": str(cid), "type": obj["type"], "data": obj["data"]}},
                obj["type"])
        elif op == "close":
            direct = self.pg.directs.get(cid)
            if direct is not None:
                self.pg.closeDirect(direct, notify=False)

    def _remoteOpen(self, origin, cid, obj):
        group = self._group(obj["app"], obj["gpn"])
        target = group.online.get(obj["to"]) if group is not None else None
        reason = "PEER_E_CONNECTION_FAILED" if target is None else target.refusesDirect()
        if reason is not None:
            self._sendDirect(origin, {"op": "failed", "cid": str(cid), "reason": reason})
            return
        peer = group.remote.get(obj["from"])
        if peer is None or peer.clusterNode != origin:
            peer = self._remotePeer(group, obj["from"], dict(obj, node=origin))
        direct = Direct(cid, peer, target)
        self.pg.directs[cid] = direct
        peer.directs[cid] = direct
        target.directs[cid] = direct
        # The answer first: data the target sends at once follows it.
        self._sendDirect(origin, {"op": "opened", "cid": str(cid),
                                  "nodeId": str(target.nodeId)})
        self.pg.emit(target, C.EVENT_DIRECT_CONNECTION, {"connectionChangeData": {
            "status": C.PEER_CONNECTED, "connectionId": str(cid),
            "nodeId": str(peer.nodeId), "identity": peer.peerName}})
