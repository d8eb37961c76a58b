# -*- test-case-name: tests.test_webpubsub_cluster -*-
"""
Reliable connections in cluster mode: a client whose socket dropped may be
sent by the load balancer to another node than the one holding its
L{ReliableLink}; that node finds the link's owner and takes the link over,
under the same connectionId, so the client loses nothing and sees nothing
twice.

Each link has an owner key C{<prefix>:wps:link:<hub>:<connectionId>} (the
owning node's id; written when the link is made or taken over, deleted —
only if still ours — when it ends) and is listed in its node's set
C{<prefix>:wps:links:<node>}, so the links of a dead node are forgotten
when the cluster reaps it, and re-registered when this node resyncs.

The hand-over, node B taking over from node A (node-to-node messages,
JSON):

  1. B -> A C{wps.take} (hub, connectionId, token, userId, request id).
  2. A checks the token and the user, closes the old socket if it still
     has one, and answers C{wps.state}: the reconnection token, the last
     sequenceId, every unacknowledged frame (as sent, with its
     sequenceId), the ackIds its client has used (the last C{ACK_WINDOW},
     so a request the client sends again after recovering is answered
     C{Duplicate} here too), the connection's groups, roles (with later
     grants) and connection state.  From then on A no longer numbers the
     link's messages: it forwards each delivery to B (C{wps.fwd}, after
     the state on the same ordered channel).  A's session stays in A's hub until B
     has admitted the link, so nothing published meanwhile is missed.
  3. B admits the link in its hub with that state (no C{connected} event:
     the connection never ended), numbers on from A's last sequenceId,
     replays the unacknowledged frames to the client and sends
     C{wps.release}.
  4. A removes its session (no C{disconnected} event) and answers
     C{wps.released}, after its last forward.

Between 3 and 4 a message routed to both nodes (a cluster-wide engine
delivers a group message to every node with members) reaches B directly
and through A's forward: B drops the second copy (L{Overlap}, matched by
content and origin, and by history position when the group has one) until
shortly after C{wps.released}.

What is not handed over: a link whose node died (SIGKILL, or stopped
heartbeating).  Its unacknowledged messages lived only in that node's
memory (keeping each in Redis would cost a Redis write per message per
reliable receiver, see docs/webpubsub.md "Cluster mode"), so a client
coming back after its node died is refused (404) and, as the SDKs do,
starts a new connection.
"""

import json
import secrets
from base64 import b64decode, b64encode

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from broker.core import jsonstrict
from broker.core.errors import CloseCode
from broker.webpubsub.redishistory import decodeDelivery, encodeDelivery
from broker.webpubsub.reliable import ReliableLinks
from broker.webpubsub.subprotocols import CODECS

log = Logger()

TAKE = "wps.take"
STATE = "wps.state"
FORWARD = "wps.fwd"
RELEASE = "wps.release"
RELEASED = "wps.released"

# Delete the owner key only while it still names this node.
_FORGET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""


class Overlap:
    """
    Duplicate detection on the node taking a link over, while its messages
    may come both directly and forwarded by the node giving it up: a copy
    seen on one path cancels one copy seen on the other.
    """

    def __init__(self):
        self._seen = ({}, {})   # forwarded, direct: fingerprint -> count

    @staticmethod
    def fingerprint(d):
        return (d.source, d.group, d.fromUserId, d.fromConnectionId, d.history,
                d.message.dataType, d.message.data)

    def __call__(self, delivery, direct):
        """
        @return: true if C{delivery} is a copy of one already delivered.
        """
        key = self.fingerprint(delivery)
        other = self._seen[not direct]
        n = other.get(key)
        if n:
            if n == 1:
                del other[key]
            else:
                other[key] = n - 1
            return True
        mine = self._seen[direct]
        mine[key] = mine.get(key, 0) + 1
        return False


class ClusterLinks(ReliableLinks):
    """
    L{ReliableLinks} whose links can be found and taken over from any node.

    @param handoverTimeout: seconds a taking node waits for the owner's
        state, and an owner waits for the release, before giving up.
    @param overlapGrace: seconds duplicates are still looked for after the
        owner said it released the link (deliveries in flight).
    """

    def __init__(self, reactor, window, maxBuffered, core, cluster, handoverTimeout=5.0,
                 overlapGrace=2.0):
        super().__init__(reactor, window, maxBuffered)
        self.core = core
        self.cluster = cluster
        self.redis = cluster.redis
        self.handoverTimeout = handoverTimeout
        self.overlapGrace = overlapGrace
        self._pending = {}    # request id -> (Deferred, timeout call)
        self._giving = {}     # (hub, cid) -> release timeout call
        self._overlaps = {}   # (hub, cid) -> the call that ends its Overlap
        self._taking = {}     # (hub, cid) -> Deferreds of reconnections waiting
        self._warned = False
        self.takenOver = 0
        self.givenUp = 0
        cluster.onMessage(TAKE, self._take)
        cluster.onMessage(STATE, self._state)
        cluster.onMessage(FORWARD, self._forwarded)
        cluster.onMessage(RELEASE, self._release)
        cluster.onMessage(RELEASED, self._released)
        cluster.onNodeDead(self._reapNode)
        cluster.onResync(self._resync)

    # -- the owner registry ------------------------------------------------

    def _ownerKey(self, hubName, cid):
        return self.cluster.key("wps", "link", hubName, cid)

    def _nodeSet(self, node):
        return self.cluster.key("wps", "links", node)

    def _failed(self, failure, what):
        if not self._warned:
            self._warned = True
            log.warn("webpubsub reliable links: {what} failed: {why}", what=what,
                     why=failure.getErrorMessage())

    def _register(self, link):
        member = f"{link.hubName}\n{link.connectionId}"
        d = self.redis.execute("SET", self._ownerKey(link.hubName, link.connectionId),
                               self.cluster.nodeId)
        d.addCallback(lambda _: self.redis.execute("SADD", self._nodeSet(self.cluster.nodeId),
                                                   member))
        d.addCallbacks(lambda _: setattr(self, "_warned", False),
                       lambda f: self._failed(f, "registering a link"))
        return d

    def new(self, hubName, connectionId, userId, **state):
        link = super().new(hubName, connectionId, userId, **state)
        self._register(link)
        return link

    def forget(self, link):
        key = (link.hubName, link.connectionId)
        if self.get(*key) is not link:
            return
        super().forget(link)
        self._cancel(self._overlaps.pop(key, None))
        self.redis.eval(_FORGET, [self._ownerKey(link.hubName, link.connectionId),
                                  self._nodeSet(self.cluster.nodeId)],
                        [self.cluster.nodeId, f"{link.hubName}\n{link.connectionId}"]
                        ).addErrback(self._failed, "forgetting a link")

    def _resync(self):
        return defer.DeferredList([self._register(link) for link in self
                                   if not link.closed and link.forward is None])

    @defer.inlineCallbacks
    def _reapNode(self, node):
        members = yield self.redis.execute("SMEMBERS", self._nodeSet(node))
        for member in members:
            hubName, _, cid = member.decode("utf-8").partition("\n")
            yield self.redis.eval(_FORGET, [self._ownerKey(hubName, cid), self._nodeSet(node)],
                                  [node, member])
        yield self.redis.execute("DEL", self._nodeSet(node))

    # -- taking a link over (the node the client came back to) --------------

    def takeOver(self, hubName, cid, token, userId):
        """
        Take the link C{cid} over from the node that holds it.  A second
        reconnection while one is taking it over waits for that one (a
        client retrying), and gets the link if its token is the link's.

        @return: a L{Deferred} firing with the admitted L{ReliableLink}, or
            C{None} when there is no such link (or it cannot be reached).
        """
        key = (hubName, cid)
        waiting = self._taking.get(key)
        if waiting is not None:
            d = defer.Deferred()
            waiting.append(d)
            return d.addCallback(
                lambda link: link if link is not None and link.checkToken(token) else None)
        self._taking[key] = []

        def done(result):
            for d in self._taking.pop(key, ()):
                d.callback(None if isinstance(result, Failure) else result)
            return result
        return self._takeOver(hubName, cid, token, userId).addBoth(done)

    @defer.inlineCallbacks
    def _takeOver(self, hubName, cid, token, userId):
        try:
            owner = yield self.redis.execute("GET", self._ownerKey(hubName, cid))
        except Exception as e:
            log.info("cannot look up reliable connection {cid}: {why}", cid=cid, why=str(e))
            return None
        if owner is None:
            return None
        owner = owner.decode("utf-8")
        if owner == self.cluster.nodeId or self.get(hubName, cid) is not None:
            return None
        request = secrets.token_hex(8)
        answer = defer.Deferred()
        timeout = self.reactor.callLater(self.handoverTimeout, self._timedOut, request)
        self._pending[request] = (answer, timeout)
        try:
            reached = yield self.cluster.send(owner, TAKE, json.dumps({
                "req": request, "hub": hubName, "cid": cid, "token": token or "",
                "user": userId}).encode("utf-8"))
        except Exception as e:
            reached = 0
            log.info("cannot ask node {node} for connection {cid}: {why}", node=owner, cid=cid,
                     why=str(e))
        if not reached:
            self._settle(request, None)
        state = yield answer
        if state is None or not state.get("ok"):
            return None
        return self._adopt(owner, hubName, cid, userId, state)

    def _settle(self, request, state):
        pending = self._pending.pop(request, None)
        if pending is None:
            return
        answer, timeout = pending
        if timeout.active():
            timeout.cancel()
        answer.callback(state)

    def _timedOut(self, request):
        log.warn("reliable connection hand-over {req}: no answer from its node", req=request)
        pending = self._pending.pop(request, None)
        if pending is not None:
            pending[0].callback(None)

    def _state(self, origin, payload):
        try:
            state = jsonstrict.loads(payload)
            request = state["req"]
        except (ValueError, KeyError, TypeError):
            log.warn("malformed {topic} from {node} dropped", topic=STATE, node=origin)
            return
        if request not in self._pending:
            # Too late: we gave up waiting; let the owner end the link.
            self._send(origin, RELEASE, {"hub": state.get("hub"), "cid": state.get("cid"),
                                         "ok": False})
            return
        self._settle(request, state)

    def _adopt(self, owner, hubName, cid, userId, state):
        # Frames of a binary wire format (protobuf) travel as base64.
        codec = CODECS.get(state.get("format", "json"), CODECS["json"])
        unpack = b64decode if codec.binary else str.encode
        unacked = [(int(seq), unpack(frame)) for seq, frame in state["unacked"]]
        # An older node sends no ackIds; anything but an integer is dropped.
        ackIds = [a for a in state.get("acks") or ()
                  if isinstance(a, int) and not isinstance(a, bool)]
        link = self.new(hubName, cid, userId, token=state["token"],
                        sequence=int(state["seq"]), unacked=unacked, ackIds=ackIds)
        link.codec = codec
        link.moving = True
        link.overlap = Overlap()
        hub = self.core.hub(hubName)
        try:
            link.session = hub.admit(link, userId, state["roles"], state["groups"],
                                     connectionState=state.get("state"))
        except Exception as e:
            log.warn("could not admit connection {cid} taken over from {node}: {why}",
                     cid=cid, node=owner, why=str(e))
            link.moving = False
            self.forget(link)
            self._send(owner, RELEASE, {"hub": hubName, "cid": cid, "ok": False})
            return None
        link.moving = False
        link.waitForClient()
        self.takenOver += 1
        self._send(owner, RELEASE, {"hub": hubName, "cid": cid, "ok": True})
        # Stop looking for duplicates if the owner's last word never comes.
        self._overlapFor(link, self.handoverTimeout + self.overlapGrace)
        return link

    def _forwarded(self, origin, payload):
        hubName, _, rest = payload.partition(b"\n")
        cid, _, raw = rest.partition(b"\n")
        link = self.get(hubName.decode("utf-8"), cid.decode("utf-8"))
        if link is None or link.closed:
            return
        try:
            delivery, _ = decodeDelivery(raw)
        except (ValueError, KeyError, TypeError):
            log.warn("malformed {topic} from {node} dropped", topic=FORWARD, node=origin)
            return
        if link.overlap is not None and link.overlap(delivery, False):
            return
        if link.holding and delivery.group in link.holding:
            link.holding[delivery.group][1].append(delivery)
            return
        link.append(delivery)

    def _released(self, origin, payload):
        try:
            msg = jsonstrict.loads(payload)
            link = self.get(msg["hub"], msg["cid"])
        except (ValueError, KeyError, TypeError):
            return
        if link is not None and link.overlap is not None:
            self._overlapFor(link, self.overlapGrace)

    def _overlapFor(self, link, seconds):
        key = (link.hubName, link.connectionId)
        self._cancel(self._overlaps.get(key))
        self._overlaps[key] = self.reactor.callLater(seconds, self._endOverlap, link)

    def _endOverlap(self, link):
        self._overlaps.pop((link.hubName, link.connectionId), None)
        link.overlap = None

    @staticmethod
    def _cancel(call):
        if call is not None and call.active():
            call.cancel()

    def stop(self):
        """
        Cancel the pending timers (hand-overs in flight fail; shutdown).
        """
        for request in list(self._pending):
            self._settle(request, None)
        for calls in (self._giving, self._overlaps):
            for call in calls.values():
                self._cancel(call)
            calls.clear()

    # -- giving a link up (the node that held it) ----------------------------

    def _send(self, node, topic, obj):
        d = self.cluster.send(node, topic, json.dumps(obj).encode("utf-8"))
        d.addErrback(self._failed, f"sending {topic} to {node}")
        return d

    def _take(self, origin, payload):
        try:
            msg = jsonstrict.loads(payload)
            request, hubName, cid = msg["req"], msg["hub"], msg["cid"]
        except (ValueError, KeyError, TypeError):
            log.warn("malformed {topic} from {node} dropped", topic=TAKE, node=origin)
            return
        link = self.find(hubName, cid, msg.get("token"))
        session = link.session if link is not None else None
        if (session is None or link.userId != msg.get("user") or link.forward is not None):
            self._send(origin, STATE, {"req": request, "ok": False})
            return
        protocol, link.protocol = link.protocol, None
        if link._expiry is not None and link._expiry.active():
            link._expiry.cancel()
        link._expiry = None
        if protocol is not None:
            # A half-open socket the client has left: it resumes elsewhere.
            protocol.linkClosed(CloseCode.GOING_AWAY, "resumed on another node")
        state = session.connectionState
        try:
            json.dumps(state)
        except (TypeError, ValueError):
            state = str(state)
        self._send(origin, STATE, {
            "req": request, "ok": True, "hub": hubName, "cid": cid, "token": link.token,
            "seq": link._sequence, "format": link.codec.name,
            "unacked": [[seq, b64encode(frame).decode("ascii") if link.codec.binary
                         else frame.decode("utf-8")] for seq, frame in link._unacked.items()],
            "acks": list(link.recentAcks or ()),
            "groups": sorted(session.groups), "roles": session.permissions.roles(),
            "state": state})
        header = f"{hubName}\n{cid}\n".encode("utf-8")
        cluster = self.cluster

        def forward(delivery):
            cluster.send(origin, FORWARD, header + encodeDelivery(delivery)).addErrback(
                self._failed, f"forwarding to {origin}")
        link.forward = forward
        link.moving = True
        link._unacked.clear()
        link._bufferedBytes = 0
        self._giving[(hubName, cid)] = self.reactor.callLater(
            self.handoverTimeout, self._giveUp, link, origin, False)

    def _release(self, origin, payload):
        try:
            msg = jsonstrict.loads(payload)
            key = (msg["hub"], msg["cid"])
        except (ValueError, KeyError, TypeError):
            return
        timeout = self._giving.pop(key, None)
        if timeout is None:
            return
        if timeout.active():
            timeout.cancel()
        link = self.get(*key)
        if link is not None and link.forward is not None:
            self._giveUp(link, origin, bool(msg.get("ok")))

    def _giveUp(self, link, node, moved):
        """
        End the link here: silently if it moved to C{node}, else (the other
        node never admitted it) as an ordinary disconnection.
        """
        self._giving.pop((link.hubName, link.connectionId), None)
        link.forward = None
        link.moving = moved
        link.closed = True
        link._end(f"moved to node {node}" if moved else "hand-over to another node failed")
        if moved:
            self.givenUp += 1
            self._send(node, RELEASED, {"hub": link.hubName, "cid": link.connectionId})
