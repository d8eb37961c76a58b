# -*- test-case-name: tests.test_webpubsub -*-
"""
The Web PubSub client WebSocket face: C{/client/hubs/{hub}}.

A thin adapter: the protocol authenticates the handshake, admits itself to
the core as an L{IConnection}, turns frames into L{Session} calls and writes
the core's deliveries.  Two kinds of client share it:

  - plain WebSocket clients (no subprotocol, or a custom one), whose frames
    become C{message} events for the upstream (C{sendEvent} mode) or are
    published to a group (C{sendToGroup} mode);
  - PubSub clients (C{json.webpubsub.azure.v1}, C{protobuf.webpubsub.azure.v1}
    and their reliable variants, L{subprotocols}), which join, leave and
    publish themselves and get acks, in JSON or protobuf frames.

Output is bounded: the protocol registers as a push producer on its
transport, and once the transport has paused it, whatever is written beyond
C{maxOutputBuffer} bytes marks the connection a slow consumer, which is then
closed with L{CloseCode.SLOW_CONSUMER} and counted.
"""

import re

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from broker.auth.tokens import TokenError, verifyClientToken
from broker.config import HUB_NAME
from broker.core.errors import BadRequest, BrokerError, CloseCode, Duplicate
from broker.core.session import NoUpstream, checkName
from broker.core.limits import PER_ADDRESS, PER_HUB, PER_USER, peerHost
from broker.core.directwrite import DirectOutput
from broker.core.output import BoundedOutput
from broker.net.wscompact import CompactProtocol
from broker.logs import peerAddress, refuseHandshake
from broker.core.interfaces import IConnection
from broker.core.message import BINARY, TEXT, Delivery, Message
from broker.webpubsub import frames, history, invoke, streams, subprotocols
from broker.webpubsub.inbound import FACE, InboundFlow
from broker.webpubsub.reliable import RecentAckIds
from broker.webpubsub.upstream import ConnectDenied

log = Logger()

_OPEN = WebSocketServerProtocol.STATE_OPEN

CLIENT_PATH = re.compile(r"^/client/hubs/([^/]+)/?$")

PLAIN = "plain"
JSON = "json"


@implementer(IConnection)
class ClientProtocol(InboundFlow, DirectOutput, BoundedOutput, CompactProtocol,
                     WebSocketServerProtocol):
    """
    One client connection.
    """

    session = None
    kind = PLAIN
    # The wire format of a PubSub client (subprotocols.Codec); None for a
    # plain one.
    codec = None
    userId = None
    connectionId = None
    # A plain json client's ackIds (RecentAckIds), created on the first:
    # idle connections should cost little.  A reliable client's are its
    # link's.
    recentAcks = None
    # Admission slots (a Ticket).
    _ticket = None
    # {group: [pending recoveries, held deliveries]} while an asynchronous
    # joinGroup recovery runs (cluster mode, _recoverLater).
    holding = None
    # Pending invokeEvent calls (invoke.py), made on the first.
    _invocations = None
    # Open group streams (streams.py) of a connection without a reliable
    # link (a link holds its own), made on the first.
    streams = None
    # The inbound rate limiter (InboundLimiter), made on the first frame: a
    # full bucket is no limiter at all.
    _inbound = _LAZY = object()
    # Instance attributes that compact() drops while they hold these (their
    # class values), as it does autobahn's (broker.net.wscompact).
    _warned = False
    _plainGroup = None
    _connectionState = None
    reliable = False
    link = None
    _resuming = None
    admission = None
    compactDefaults = {"_warned": False, "_plainGroup": None, "_connectionState": None,
                       "reliable": False, "link": None, "_resuming": None, "admission": None,
                       "userId": None}

    # -- connection life ----------------------------------------------------

    def connectionMade(self):
        self.factory.connections.add(self)
        super().connectionMade()

    def goingAway(self):
        """
        The broker is stopping: an open client is closed with 1001 (as a
        session of its hub); one still in its opening handshake is cut.
        """
        if self.state == self.STATE_OPEN:
            self._closeSocket(CloseCode.GOING_AWAY, "broker shutting down")
        elif self.state != self.STATE_CLOSING and self.transport is not None:
            self.transport.loseConnection()

    # -- handshake --------------------------------------------------------

    def failHandshake(self, reason, code=400, responseHeaders=None):
        """
        A refused handshake: counted on /metrics and logged at most once a
        minute per source address (a bot guessing tokens must not fill
        the disk), rather than autobahn's line per handshake.
        """
        refuseHandshake(self, "webpubsub", self.factory.core.refusals, reason, code,
                        responseHeaders, why=getattr(self, "_refusedWhy", None))

    def onConnect(self, request):
        factory = self.factory
        m = CLIENT_PATH.match(request.path)
        if m is None or not HUB_NAME.match(m.group(1)):
            factory.rejected(None)
            raise ConnectionDeny(404, "no such client endpoint; use /client/hubs/{hub}")
        hubName = m.group(1)
        settings = factory.hubSettings(hubName)
        token = _first(request.params.get("access_token"))
        if token is None:
            auth = request.headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                token = auth[7:].strip()
        if not token:
            token = None
        if token is None and settings.allowAnonymous:
            claims = None
        else:
            try:
                claims = verifyClientToken(token, settings.accessKeys, hubName,
                                           factory.audiences)
            except TokenError as e:
                factory.rejected(hubName)
                # Logged (once a minute per address) by failHandshake.
                self._refusedWhy = f"Unauthorized: {e}"
                raise ConnectionDeny(401, "Unauthorized")
        offered = request.protocols
        protocol = subprotocols.choose(offered)
        if protocol is not None:
            self._useSubprotocol(protocol)
        elif offered:
            # A custom subprotocol: a plain client; accept its first choice.
            protocol = offered[0]
        if claims is None:
            userId, roles, groups = None, settings.anonymousRoles, ()
        else:
            userId, roles, groups = claims.userId, claims.roles, claims.groups
        try:
            if userId is not None:
                checkName("userId", userId)
            for g in groups:
                checkName("group", g)
        except BadRequest as e:
            factory.rejected(hubName)
            raise ConnectionDeny(400, f"token: {e.message}")
        if self.kind == PLAIN and settings.plainMode == "sendToGroup":
            group = _first(request.params.get("group")) or settings.plainGroup
            if not group:
                factory.rejected(hubName)
                raise ConnectionDeny(400, "sendToGroup mode needs a group query parameter")
            self._plainGroup = group
        self._admit(hubName, [(PER_HUB, hubName), (PER_ADDRESS, peerHost(self.transport))])
        self.admission = (userId, roles, groups)
        self.settings = settings
        self.hub = factory.core.hub(hubName)
        if (getattr(self.hub.upstream, "connect", None) is None
                or request.params.get("awps_connection_id")):
            # Else the connect handler may name another user: counted
            # once it has answered.
            self._admit(hubName, [(PER_USER, userId)])
        resumed = _first(request.params.get("awps_connection_id"))
        if resumed is not None:
            # A reliable client coming back: same connection, no connect event.
            link = None
            reconnectionToken = _first(request.params.get("awps_reconnection_token"))
            if self.reliable:
                link = factory.links.find(hubName, resumed, reconnectionToken)
                takeOver = getattr(factory.links, "takeOver", None)
                if link is None and takeOver is not None:
                    # Cluster mode: the link may live on another node.
                    d = takeOver(hubName, resumed, reconnectionToken, userId)
                    return d.addCallback(self._tookOver, resumed, userId, protocol)
            if link is None or link.userId != userId:
                factory.rejected(hubName)
                raise ConnectionDeny(404, "no recoverable connection with that id and token")
            self._checkResumedCodec(link)
            self._resuming = link
            self.connectionId = resumed
            return protocol
        self.connectionId = self.hub.newConnectionId()
        connect = getattr(self.hub.upstream, "connect", None)
        if connect is not None:
            # The blocking connect event: the handshake waits for it.
            claimsSeen = {}
            if userId is not None:
                claimsSeen["sub"] = [userId]
            if roles:
                claimsSeen["role"] = list(roles)
            d = connect(self.connectionId, request, claimsSeen, offered)
            return d.addCallbacks(self._connectAnswered, self._connectDenied,
                                  callbackArgs=(protocol, offered))
        return protocol

    def _tookOver(self, link, resumed, userId, protocol):
        if link is None or link.userId != userId:
            self.factory.rejected(self.hub.name)
            raise ConnectionDeny(404, "no recoverable connection with that id and token")
        self._checkResumedCodec(link)
        self._resuming = link
        self.connectionId = resumed
        return protocol

    def _useSubprotocol(self, name):
        codec, self.reliable = subprotocols.SUBPROTOCOLS[name]
        self.codec = codec
        self.kind = codec.name

    def _checkResumedCodec(self, link):
        """
        A reliable connection resumes in the wire format it was opened
        with: the messages it keeps for the client are encoded in it.
        """
        if link.codec is not self.codec:
            self.factory.rejected(self.hub.name)
            raise ConnectionDeny(400, f"the connection was opened with a {link.codec.label} "
                                      f"subprotocol; resume it with the same one")

    def _admit(self, hubName, claims):
        """
        Take this connection's slots under the face's admission limits, or
        refuse the handshake with 429: a hub, user or address that has as
        many connections as it may hold.  The slots are given back when
        the TCP connection goes (L{connectionLost}).
        """
        factory = self.factory
        ticket, refused = factory.admission.admit(claims, self._ticket)
        if ticket is not None:
            self._ticket = ticket
            return
        core = factory.core
        core.limits.refused(FACE, core.hubLabel(hubName), refused)
        factory.rejected(hubName)
        key = dict(claims)[refused]
        core.quietLog.info(
            (FACE, "admission", refused),
            "webpubsub: refused a connection to hub {hub} from {peer}: {kind} limit of "
            "{limit} connections reached", hub=hubName, peer=peerAddress(self.transport),
            kind=refused, limit=factory.admission.limit(refused, key))
        raise ConnectionDeny(429, f"Too Many Requests: {refused.replace('_', ' ')} "
                                  f"connection limit reached")

    def _connectAnswered(self, answer, protocol, offered):
        """
        Apply the connect handler's answer: it may set the userId and add
        groups and roles, and pick one of the offered subprotocols.
        """
        if answer is None:
            self._admit(self.hub.name, [(PER_USER, self.admission[0])])
            return protocol
        userId, roles, groups = self.admission
        try:
            if answer.get("userId") is not None:
                userId = checkName("userId", answer["userId"])
            groups = tuple(groups) + tuple(checkName("group", g)
                                           for g in answer.get("groups") or ())
            roles = tuple(roles) + tuple(str(r) for r in answer.get("roles") or ())
        except (BadRequest, TypeError, AttributeError) as e:
            self.factory.rejected(self.hub.name)
            raise ConnectionDeny(500, f"connect event handler answer: {e}")
        chosen = answer.get("subprotocol")
        if chosen:
            if chosen not in offered:
                self.factory.rejected(self.hub.name)
                raise ConnectionDeny(500, "connect event handler chose a subprotocol "
                                          "the client did not offer")
            protocol = chosen
            if chosen in subprotocols.SUBPROTOCOLS:
                self._useSubprotocol(chosen)
            else:
                self.kind, self.codec, self.reliable = PLAIN, None, False
        self._admit(self.hub.name, [(PER_USER, userId)])
        self.admission = (userId, roles, groups)
        self._connectionState = answer.get("state")
        return protocol

    def _connectDenied(self, failure):
        self.factory.rejected(self.hub.name)
        if failure.check(ConnectDenied):
            raise ConnectionDeny(failure.value.status, failure.value.reason)
        if failure.check(ConnectionDeny):
            return failure
        log.failure("connect event for hub {hub} failed", failure, hub=self.hub.name)
        raise ConnectionDeny(500, "connect event handler failed")

    def onOpen(self):
        userId, roles, groups = self.admission
        link = self._resuming
        if link is not None:
            if link.closed or link.session is None:
                self._sendClose(CloseCode.POLICY_VIOLATION, "the connection was not recovered")
                return
            self.session = link.session
        else:
            connection = self
            if self.reliable:
                link = connection = self.factory.links.new(self.hub.name, self.connectionId,
                                                           userId)
                link.codec = self.codec
            try:
                self.session = self.hub.admit(connection, userId, roles, groups,
                                              connectionState=self._connectionState)
            except BrokerError as e:
                self.factory.rejected(self.hub.name)
                if link is not None:
                    self.factory.links.forget(link)
                self._sendClose(CloseCode.POLICY_VIOLATION, e.message)
                return
            if link is not None:
                link.session = self.session
        self.link = link
        self.userId = userId
        self.admission = None
        # Chosen once: deliver() runs for every receiver of every message.
        self._encoder = self.factory.preparer(self.codec)
        self._forgetHandshake()
        self.registerAsProducer(self.transport)
        if self.link is not None:
            self._sendFrame(self.codec.connected(self.connectionId, userId, self.link.token))
            self.link.attach(self)
        elif self.codec is not None:
            self._sendFrame(self.codec.connected(self.connectionId, userId))

    def _forgetHandshake(self):
        """
        Drop what autobahn keeps of the opening handshake (raw request,
        headers, query with the access token, response): about 2 KiB per
        connection that nothing reads after the open, and a secret that
        should not linger in memory; and every attribute that holds its
        default (L{CompactProtocol.compact}).
        """
        self.compact()

    # -- IConnection ------------------------------------------------------

    def describe(self):
        """
        What the admin console shows of this connection beyond the core's
        view: the client's address and its subprotocol.
        """
        return describeSocket(self, reliable=self.reliable)

    # Whether this connection's deliveries may skip the checks that hold
    # from one delivery to the next (see deliver): set by a delivery that
    # passed them all and was written directly, cleared by what makes them
    # fail for longer (a held group, a slow consumer, autobahn's queue).
    _lane = False

    def deliver(self, delivery):
        if self._lane and self.session is not None and self.state == _OPEN and not self._paused:
            # Straight to the direct write, whose turn and Twisted's-buffer
            # rules keep the order: it halves the Python of a delivery
            # (bench/wps_deliver.py).  While paused, the full path counts
            # the bound.
            try:
                prepared = delivery._encoded[self.kind]
            except KeyError:
                prepared = delivery.encode(self.kind, self._encoder)
            self.writeDirect(prepared.payloadHybi)
            return
        if self.session is None or self.state != self.STATE_OPEN:
            return
        if self.holding and delivery.group in self.holding:
            self.holding[delivery.group][1].append(delivery)
            return
        try:
            # Delivery.encode, written out: once per receiver of a fan-out.
            prepared = delivery._encoded[self.kind]
        except KeyError:
            prepared = delivery.encode(self.kind, self._encoder)
        if self._perMessageCompress is None and not self.send_queue:
            # The hot path: the prepared frame straight to the socket
            # (directwrite).  autobahn's sendData formats a debug log line
            # on every call, which costs a third of the broker's CPU in a
            # fan-out.
            frame = prepared.payloadHybi
            # The bound counts only once the peer stopped reading.
            if (self._paused or self.slow) and self.overLimit(len(frame),
                                                              self.factory.maxOutputBuffer):
                return
            self.writeDirect(frame)
            if self._outBatch is not None and not self.holding:
                self._lane = True
        else:
            # Counted against the bound in sendData, as autobahn writes it.
            self.sendPreparedMessage(prepared)

    def close(self, code, reason):
        if self.link is not None:
            # Closing for good closes the reliable connection, not just
            # this socket; the link calls linkClosed back.
            self.link.close(code, reason)
            return
        self._closeSocket(code, reason)

    def linkClosed(self, code, reason):
        """
        The reliable connection this socket carries was closed for good.
        """
        self.session = None
        self.link = None
        self._closeSocket(code, reason)

    def _closeSocket(self, code, reason):
        if self.state != self.STATE_OPEN:
            return
        if self.codec is not None:
            self._sendFrame(self.codec.disconnected(reason))
        self._sendClose(code, reason)

    def _sendFrame(self, frame):
        """
        Send a PubSub client a frame of its wire format (text or binary).
        """
        self.sendMessage(frame, isBinary=self.codec.binary)

    def _sendClose(self, code, reason):
        """
        Send a close frame with any RFC 6455 code (autobahn's public
        C{sendClose} only takes 1000 and 3000-4999); the reason is cut to the
        123 bytes a close frame can carry.  If the peer never answers,
        autobahn's closeHandshakeTimeout drops the TCP connection.
        """
        if self.state == self.STATE_OPEN:
            raw = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
            self.sendCloseFrame(code, raw, isReply=False)

    def sendData(self, data, sync=False, chopsize=None):
        """
        Every other frame autobahn writes (acks, pongs, system messages,
        reliable links' frames) counts against the output bound too, so a
        client that floods requests and never reads its answers is dropped
        like one that never reads deliveries.  The close frame of a slow
        consumer still goes out (it is small and tells a peer that resumes
        reading why it was dropped).  Deliveries kept this turn go first.
        """
        if sync or chopsize:
            # autobahn keeps these in its own queue: no lane past them.
            self._lane = False
        self.flushOutput()
        if self.slow:
            if self.state == self.STATE_OPEN:
                super().sendData(data, sync, chopsize)
        elif not self.overLimit(len(data), self.factory.maxOutputBuffer):
            super().sendData(data, sync, chopsize)

    def memoryReleaser(self):
        return self.factory.core.memory

    def writeBatch(self):
        return self.factory.core.writeBatch

    def slowConsumer(self):
        hub = self.hub
        log.warn("closing slow consumer {cid} on hub {hub}: more than {n} bytes queued",
                 cid=self.connectionId, hub=hub.name, n=self.factory.maxOutputBuffer)
        if self.link is not None:
            # The reliable connection ends as when its own bound is crossed.
            self.link.slowConsumer()
            return
        hub.stats.slowConsumerDrops += 1
        self._lane = False
        self.discardOutput()
        session, self.session = self.session, None
        if session is not None:
            hub.remove(session, "slow consumer")
        # The peer is not reading, so the close frame may never get out:
        # autobahn's closeHandshakeTimeout drops the TCP connection.
        self._sendClose(CloseCode.SLOW_CONSUMER, "slow consumer: output buffer exceeded")

    # -- incoming frames --------------------------------------------------

    def onMessage(self, payload, isBinary):
        if self.session is None:
            return
        limiter = self._inbound
        if limiter is self._LAZY:
            limiter = self._inbound = self.factory.inboundLimiter()
        if limiter is not None:
            verdict = limiter.check(len(payload))
            if verdict:
                self._overRate(verdict, payload, isBinary)
                return
        if self.codec is not None:
            self._requestFrame(payload, isBinary)
        else:
            self._plainFrame(payload, isBinary)

    def _plainFrame(self, payload, isBinary):
        message = Message(BINARY if isBinary else TEXT, payload)
        session = self.session
        if self._plainGroup is not None:
            try:
                session.sendToGroup(self._plainGroup, message)
            except BrokerError as e:
                self._refuse(CloseCode.POLICY_VIOLATION, f"{e.name}: {e.message}")
                return
            self._throttle()
            return
        d = self._sendEvent(session, "message", message)
        d.addCallbacks(self._upstreamReply, self._upstreamFailed)

    def _upstreamReply(self, reply):
        if reply is not None and self.session is not None:
            self.sendMessage(reply.data, isBinary=reply.isBinary)

    def _upstreamFailed(self, failure):
        if failure.check(NoUpstream):
            self._refuse(CloseCode.POLICY_VIOLATION, "no upstream event handler for sendEvent mode")
        else:
            self._refuse(CloseCode.INTERNAL_ERROR, "upstream event handler failed")

    def _requestFrame(self, payload, isBinary):
        codec = self.codec
        if isBinary != codec.binary:
            self._refuse(CloseCode.UNSUPPORTED_DATA, codec.wrongFrame)
            return
        try:
            request = codec.parseRequest(payload)
        except invoke.InvalidInvocation as e:
            self._badRequest(e, None)
            self._invocationsOf().invalid(e)
            return
        except streams.InvalidStreamFrame as e:
            self._warnOnce(f"bad request: {e.message}")
            self._streamsOf().invalid(self, e)
            return
        except frames.InvalidRequest as e:
            self._badRequest(e, e.ackId)
            return
        except ValueError as e:
            self._refuse(CloseCode.INVALID_PAYLOAD, f"invalid {codec.label} frame: {e}"[:120])
            return
        kind = request.type
        if kind == "ping":
            self._sendFrame(codec.pong)
            return
        if kind == "sequenceAck":
            if self.link is not None:
                self.link.ack(request.sequenceId)
            return
        if kind in invoke.KINDS:
            self._invocationsOf().received(request)
            return
        if kind in streams.KINDS:
            self._streamsOf().received(self, request)
            return
        ackId = request.ackId
        if ackId is not None and ackId in (self._ackOwner().recentAcks or ()):
            self._ack(ackId, Duplicate(f"ackId {ackId} was already used"))
            return
        session = self.session
        try:
            if kind == "joinGroup":
                session.joinGroup(request.group)
                if request.history is not None and getattr(self.hub.history, "remote", False):
                    self._remember(ackId)
                    self._recoverLater(request.group, request.history, ackId)
                    return
                if request.history is not None:
                    # Recovery (history.py): position, then the missed messages.
                    frame, missed = history.recover(self.hub, request.group, request.history,
                                                    self.connectionId)
                    self.sendMessage(frames._s(frame))
                    for delivery in missed:
                        (self.link or self).deliver(delivery)
            elif kind == "leaveGroup":
                session.leaveGroup(request.group)
            elif kind == "sendToGroup":
                d = session.sendToGroup(request.group, request.message, request.noEcho)
                self._remember(ackId)
                if ackId is not None or not d.called or isinstance(d.result, Failure):
                    d.addCallbacks(lambda _: self._ack(ackId),
                                   lambda f: self._ackFailure(ackId, f))
                # else: published already (the memory engine) and nothing to
                # acknowledge: no callbacks to build and run per message.
                self._throttle()
                return
            else:
                d = self._sendEvent(session, request.event, request.message)
                self._remember(ackId)
                d.addCallbacks(lambda reply: self._eventReply(ackId, reply),
                               lambda f: self._eventFailed(ackId, f))
                return
        except BadRequest as e:
            self._badRequest(e, ackId)
            return
        except BrokerError as e:
            self._ack(ackId, e)
            return
        self._remember(ackId)
        self._ack(ackId)

    def _streamsOf(self):
        owner = self.link if self.link is not None else self
        if owner.streams is None:
            owner.streams = streams.OpenStreams(owner, self.factory.reactor,
                                                isLink=owner is not self)
        return owner.streams

    def _invocationsOf(self):
        if self._invocations is None:
            self._invocations = invoke.Invocations(self)
        return self._invocations

    def _recoverLater(self, group, position, ackId):
        """
        joinGroup recovery from a history in Redis (cluster mode): the
        connection is already a member, so live messages of C{group} are
        held until the missed ones are out; those the recovery also
        returned (same epoch, offset not past the position it reported)
        are dropped, so each is sent once and in order.
        """
        target = self.link or self
        self._lane = False
        if target.holding is None:
            target.holding = {}
        hold = target.holding.setdefault(group, [0, []])
        hold[0] += 1

        def answered(result):
            frame, missed, current = result
            hold[0] -= 1
            if hold[0] == 0 and target.holding.get(group) is hold:
                del target.holding[group]
            held, hold[1] = hold[1], []
            if self.state == self.STATE_OPEN:
                self.sendMessage(frames._s(frame))
            for delivery in missed:
                target.deliver(delivery)
            for delivery in held:
                h = delivery.history
                if (h is not None and current is not None and h[0] == current[0]
                        and h[1] <= current[1]):
                    continue
                target.deliver(delivery)
            self._ack(ackId)
        history.recoverAsync(self.hub, group, position, self.connectionId).addCallback(
            answered).addErrback(
            lambda f: log.failure("joinGroup recovery for {cid} failed", f,
                                  cid=self.connectionId))

    def _eventReply(self, ackId, reply):
        if reply is not None and self.session is not None:
            self._sendFrame(self.codec.messageFrame(Delivery(reply)))
        self._ack(ackId)

    def _eventFailed(self, ackId, failure):
        if failure.check(NoUpstream):
            # No handler for this event: accepted and dropped, as Azure does.
            self._ack(ackId)
        else:
            self._ackFailure(ackId, failure)

    def _ackFailure(self, ackId, failure):
        if failure.check(BrokerError):
            self._ack(ackId, failure.value)
        else:
            log.failure("request from {cid} failed", failure, cid=self.connectionId)
            self._ack(ackId, BrokerError("internal error"))

    def _ack(self, ackId, error=None):
        if ackId is not None and self.state == self.STATE_OPEN:
            self._sendFrame(self.codec.ack(ackId, error))

    def _ackOwner(self):
        """
        Whose ackIds these are: the reliable connection's, which outlive
        this socket (a client resends after it recovers), else this
        socket's.
        """
        return self.link if self.link is not None else self

    def _remember(self, ackId):
        """
        Record an accepted request's ackId so a retry is answered Duplicate
        instead of being brokered twice.  Refused requests are not recorded:
        the client may retry them once it has the permission.
        """
        if ackId is None:
            return
        owner = self._ackOwner()
        if owner.recentAcks is None:
            owner.recentAcks = RecentAckIds()
        owner.recentAcks.add(ackId)

    def _badRequest(self, error, ackId):
        self._warnOnce(f"bad request: {error.message}")
        if ackId is not None:
            self._ack(ackId, error)

    def _warnOnce(self, what):
        if not self._warned:
            self._warned = True
            log.info("client {cid} on hub {hub}: {what}", cid=self.connectionId,
                     hub=self.hub.name, what=what)

    def _refuse(self, code, reason):
        self._warnOnce(reason)
        if self.session is not None:
            self.close(code, reason)

    # -- teardown ---------------------------------------------------------

    def connectionLost(self, reason):
        self.factory.connections.discard(self)
        super().connectionLost(reason)
        if self._inbound is not None and self._inbound is not self._LAZY:
            self._inbound.stop()
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            ticket.release()

    def onClose(self, wasClean, code, reason):
        if self._invocations is not None:
            self._invocations.cancelAll()
        link, self.link = self.link, None
        if link is not None:
            # Only a normal close by the client ends a reliable connection;
            # a dropped socket leaves it waiting for recovery.
            self.session = None
            link.detach(self, normal=wasClean and code == CloseCode.NORMAL)
            return
        if self.streams is not None:
            self.streams.closeAll("ConnectionClosed", "the sender's connection closed")
        session, self.session = self.session, None
        if session is not None:
            session.hub.remove(session, reason or "")


def _first(values):
    return values[0] if values else None


def describeSocket(protocol, reliable=False):
    """
    A WebSocket's address and subprotocol (the admin console's connection
    details).  Bytes are not counted per connection: autobahn's counters
    are shared by a factory's connections (L{broker.net.wscompact}).
    """
    info = {"subprotocol": getattr(protocol, "websocket_protocol_in_use", None) or "",
            "reliable": reliable, "attached": True}
    transport = getattr(protocol, "transport", None)
    peer = transport.getPeer() if transport is not None else None
    if peer is not None:
        info["address"] = peerAddress(peer)
    return info
