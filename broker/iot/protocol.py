# -*- test-case-name: tests.test_iot_protocol -*-
"""
The TCP (and TLS) sessions of devices and centrals: a thin adapter between
the frames of L{broker.iot.frames} and the L{broker.iot.concentrator}.

A session must authenticate (L{broker.iot.auth}) within C{authTimeout};
after that a device may talk to its central and to the groups its registry
entry allows, and a central to the devices of its own fleet, and nothing
else.  A session that sends nothing for C{pingInterval} is pinged; one
silent for C{pingInterval + pingTimeout} is dead and closed.  Output is
bounded: a peer that does not read while more than C{maxOutputBuffer}
bytes wait for it is closed as a slow consumer.
"""

import os

from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from broker.core.drain import LiveConnections
from broker.core.limits import CLOSE, PER_ADDRESS, PER_HUB, AdmissionLimits, InboundLimiter, \
    peerHost
from broker.core.directwrite import DirectOutput, noDelay
from broker.core.output import BoundedOutput
from broker.logs import peerAddress
from broker.iot import auth, errors, frames
from broker.iot.deadlines import Deadlines
from broker.iot.frames import FrameError, FrameReader, Payload
from broker.iot.interfaces import ICentralLink, IPeerSession

log = Logger()

GROUP_PREFIX = "group/"
# Ids the server chooses for its own requests to a peer.
SERVER_REQUEST_BASE = 1 << 63

FACE = "iot"
AUTH_FAILURES = ("BAD_HELLO", "UNKNOWN_DEVICE", "UNKNOWN_CENTRAL", "BAD_PROOF", "REPLAY",
                 "AUTH_TIMEOUT", "AUTH_REQUIRED")


class Counters:
    """
    Plain counters shared by every session of a factory (admin /metrics).
    """

    def __init__(self):
        self.authOk = 0
        self.authFailures = dict.fromkeys(AUTH_FAILURES, 0)
        self.badFrames = 0
        self.deadSessions = 0
        self.slowConsumers = 0
        self.framesIn = 0
        self.framesOut = 0


@implementer(IPeerSession, ICentralLink)
class IoTSession(DirectOutput, BoundedOutput, Protocol):
    """
    One TCP session, a device or a central once authenticated.
    """

    HELLO, PROOF, OPEN, CLOSED = range(4)

    def __init__(self, factory):
        self.factory = factory
        self.state = self.HELLO
        self.role = None
        self.fleet = None
        self.peerId = None
        self.entry = None
        self.udpKey = None
        self.authenticatedOnce = False
        # The CLOSE code the server ended the session with (a device's
        # DEVICE_DISCONNECTED reason, broker.iot.forward).
        self.closeCode = None
        self._gone = False
        self._abortTimer = None
        self._inFlight = 0
        self._reader = FrameReader(factory.maxFrame)
        # our request id -> (Deferred, its Deadlines entry or None)
        self._pending = {}
        self._nextId = SERVER_REQUEST_BASE
        self._timer = None
        self._lastSeen = 0.0
        self._pinged = False
        # Admission slots: the source address's until authenticated, then
        # the fleet's.
        self._slot = None
        self._rate = None

    # -- connection life --------------------------------------------------

    def connectionMade(self):
        f = self.factory
        f.connections.add(self)
        noDelay(self.transport)
        reactor = f.reactor
        self._lastSeen = reactor.seconds()
        self._timer = reactor.callLater(f.authTimeout, self._authExpired)
        self.registerAsProducer(self.transport)
        self._rate = f.inboundLimiter()
        host = peerHost(self.transport)
        if not f.admission.acquire(PER_ADDRESS, host):
            self._overLimit(PER_ADDRESS, host, "", "unauthenticated sessions from this address")
            return
        self._slot = (PER_ADDRESS, host)

    def _overLimit(self, kind, key, fleet, what):
        f = self.factory
        f.concentrator.core.limits.refused(FACE, fleet, kind)
        limit = f.admission.limit(kind, key)
        f.concentrator.core.quietLog.info(
            (FACE, "admission", kind), "iot: refusing {who}: more than {limit} {what}",
            who=self.describe(), limit=limit, what=what)
        self._error(0, "LIMIT", f"more than {limit} {what}")
        self.state = self.CLOSED
        self._drop()

    def _releaseSlot(self):
        slot, self._slot = self._slot, None
        if slot is not None:
            self.factory.admission.release(*slot)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        f = self.factory
        f.connections.discard(self)
        if not f.connections:
            # Nothing is left that may wait for a peer's answer.
            f.deadlines.stop()
        self._releaseSlot()
        self.state = self.CLOSED
        if self._rate is not None:
            self._rate.stop()
        for timer in (self._timer, self._abortTimer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._abortTimer = None
        self._offline()

    def _offline(self):
        """
        Leave the concentrator (once): as soon as the session is closing,
        not when its transport finally goes, so that nothing more is routed
        to it.
        """
        c = self.factory.concentrator
        if self.authenticatedOnce and not self._gone:
            self._gone = True
            if self.role == auth.DEVICE:
                c.tokens.unbindKey(self.fleet, self.peerId, self.udpKey)
                c.deviceOffline(self)
                gone = errors.DeviceOffline(f"device {self.peerId!r} disconnected")
            else:
                c.centralOffline(self)
                gone = errors.NoCentral("the central disconnected")
            pending, self._pending = self._pending, {}
            deadlines = self.factory.deadlines
            for d, deadline in pending.values():
                if deadline is not None:
                    deadlines.cancel(deadline)
                d.errback(gone)

    def _authExpired(self):
        self._timer = None
        if self.state in (self.HELLO, self.PROOF):
            self._refuse("AUTH_TIMEOUT",
                         f"not authenticated within {self.factory.authTimeout:g}s")

    def _keepalive(self):
        self._timer = None
        if self.state != self.OPEN:
            return
        f = self.factory
        idle = f.reactor.seconds() - self._lastSeen
        if idle >= f.pingInterval + f.pingTimeout:
            f.counters.deadSessions += 1
            log.info("iot: closing dead session {who}: silent for {idle:.0f}s",
                     who=self.describe(), idle=idle)
            self.close("DEAD", "no frame within the keepalive timeout")
            return
        if idle >= f.pingInterval:
            if not self._pinged:
                self._pinged = True
                self._write(frames.PING, 0)
            wait = f.pingInterval + f.pingTimeout - idle
        else:
            wait = f.pingInterval - idle
        self._timer = f.reactor.callLater(max(wait, 0.01), self._keepalive)

    def describe(self):
        if self.role == auth.DEVICE:
            return f"device {self.fleet}/{self.peerId}"
        if self.role == auth.CENTRAL:
            return f"central of {self.fleet}"
        return f"unauthenticated {peerAddress(self.transport)}"

    # -- writing ----------------------------------------------------------

    def _write(self, kind, requestId, payload=frames.EMPTY, address=""):
        if self.state == self.CLOSED:
            return
        data = frames.encode(kind, requestId, payload, address)
        if self.overLimit(len(data), self.factory.maxOutputBuffer):
            return
        self.factory.counters.framesOut += 1
        self.writeDirect(data)

    def memoryReleaser(self):
        return self.factory.concentrator.core.memory

    def writeBatch(self):
        return self.factory.concentrator.core.writeBatch

    def slowConsumer(self):
        self.factory.counters.slowConsumers += 1
        log.warn("iot: closing slow consumer {who}: more than {n} bytes waiting",
                 who=self.describe(), n=self.factory.maxOutputBuffer)
        self.state = self.CLOSED
        self._offline()
        self.transport.abortConnection()

    def _error(self, requestId, code, message):
        self._write(frames.ERROR, requestId,
                    Payload.json({"code": code, "message": message}))

    def _refuse(self, code, message):
        """
        A fatal error: say why, count it, close.
        """
        if code in self.factory.counters.authFailures:
            self.factory.counters.authFailures[code] += 1
        log.info("iot: refusing {who}: {code} {message}", who=self.describe(), code=code,
                 message=message)
        self._error(0, code, message)
        self.state = self.CLOSED
        self._drop()

    def _drop(self):
        self._offline()
        # A transport with a producer registered (TLS) waits for it to go
        # before it closes.
        try:
            self.transport.unregisterProducer()
        except Exception:
            pass
        self.flushOutput()
        self.transport.loseConnection()
        # A peer that reads nothing (or is gone without a FIN) would keep
        # the connection, and what waits for it, until TCP gives up.
        if self._abortTimer is None:
            self._abortTimer = self.factory.reactor.callLater(
                self.factory.closeGrace, self.transport.abortConnection)

    def close(self, code, reason):
        if self.state == self.CLOSED:
            return
        if self.closeCode is None:
            self.closeCode = code
        self._write(frames.CLOSE, 0, Payload.json({"code": code, "reason": reason}))
        self.state = self.CLOSED
        self._drop()

    # -- what the concentrator calls --------------------------------------

    def request(self, payload, timeout=None, address=""):
        """
        Send a REQUEST; a Deferred firing with the peer's RESPONSE payload,
        failing with Refused (ERROR frame), RequestTimeout, or the peer
        going away.
        """
        if self.state != self.OPEN:
            if self.role == auth.DEVICE:
                return fail(errors.DeviceOffline(f"device {self.peerId!r} disconnected"))
            return fail(errors.NoCentral("the central disconnected"))
        self._nextId += 1
        rid = self._nextId

        def cancel(d):
            entry = self._pending.pop(rid, None)
            if entry is not None and entry[1] is not None:
                self.factory.deadlines.cancel(entry[1])
        d = Deferred(cancel)
        # Pending before the write (a slow consumer's close fails it), the
        # deadline after: the frame leaves first.
        pending = self._pending
        pending[rid] = (d, None)
        self._write(frames.REQUEST, rid, payload, address)
        if timeout is not None and rid in pending:
            pending[rid] = (d, self.factory.deadlines.add(timeout, self._expired, rid, timeout))
        return d

    def _expired(self, rid, timeout):
        entry = self._pending.pop(rid, None)
        if entry is not None:
            entry[0].errback(errors.RequestTimeout(
                f"{self.describe()} did not answer within {timeout:g}s"))

    def sendMessage(self, messageId, payload, address=""):
        self._write(frames.MESSAGE, messageId, payload, address)

    def forwardEvent(self, kind, messageId, deviceId, payload):
        """
        A device's event to this central session: a MESSAGE, TELEMETRY,
        DEVICE_CONNECTED or DEVICE_DISCONNECTED frame from C{deviceId},
        C{messageId} its durable id (the central ACKs it) or 0 (sent
        straight, no ACK expected).
        """
        self._write(kind, messageId, payload, deviceId)

    def sendTokens(self, ttl, tokens):
        self._write(frames.TOKENS, 0, frames.encodeTokens(ttl, tokens))

    # -- reading ----------------------------------------------------------

    def dataReceived(self, data):
        if self.state == self.CLOSED:
            return
        f = self.factory
        self._lastSeen = f.reactor.seconds()
        self._pinged = False
        try:
            received = self._reader.feed(data)
        except FrameError as e:
            f.counters.badFrames += 1
            if self.state in (self.HELLO, self.PROOF):
                self._refuse(e.code, e.message)
            else:
                log.info("iot: bad frame from {who}: {message}", who=self.describe(),
                         message=e.message)
                self._error(0, e.code, e.message)
                self.close(e.code, e.message)
            return
        limiter = self._rate
        for frame in received:
            if self.state == self.CLOSED:
                return
            f.counters.framesIn += 1
            if limiter is not None:
                verdict = limiter.check(_size(frame))
                if verdict:
                    if verdict != CLOSE and getattr(frame, "kind", None) == frames.ACK:
                        # An ACK over the rate is honoured (dropping it would
                        # stall the peer's queue until its next session) and
                        # is no strike towards CLOSE; reading is held back
                        # all the same.
                        limiter.dropped -= 1
                        self._holdBack(frame)
                    else:
                        self._overRate(verdict, frame)
                        continue
            if isinstance(frame, FrameError):
                f.counters.badFrames += 1
                if self.state in (self.HELLO, self.PROOF):
                    self._refuse(frame.code, frame.message)
                else:
                    self._error(frame.requestId, frame.code, frame.message)
                continue
            try:
                self._dispatch(frame)
            except errors.IoTError as e:
                self._error(frame.requestId, e.code, e.message)
            except FrameError as e:
                self._error(frame.requestId, e.code, e.message)
            except Exception:
                log.failure("iot: handling {frame} from {who}", frame=frame,
                            who=self.describe())
                self._error(frame.requestId, "INTERNAL", "internal error")

    def _overRate(self, verdict, frame):
        """
        A frame over the session's inbound rate: dropped, answered with a
        LIMIT error when it has a requestId, and reading paused until the
        bucket has room (TCP holds the peer back); a peer that keeps
        exceeding is closed with LIMIT.
        """
        f = self.factory
        core = f.concentrator.core
        fleet = self.fleet if self.state == self.OPEN else ""
        if verdict == CLOSE:
            core.limits.limited(FACE, fleet, "closed")
            core.quietLog.info((FACE, "rate", "closed"),
                               "iot: closing {who}: it keeps sending over its inbound rate "
                               "limit", who=self.describe())
            self._error(0, "LIMIT", "inbound rate limit exceeded")
            self.close("LIMIT", "inbound rate limit exceeded")
            return
        core.limits.limited(FACE, fleet, "dropped")
        if frame.requestId:
            self._error(frame.requestId, "LIMIT",
                        "over the session's inbound rate limit; the frame was dropped")
        self._holdBack(frame)

    def _holdBack(self, frame):
        """
        Stop reading the socket until the session's bucket has room.
        """
        self._rate.holdReading(self.factory.reactor, _size(frame),
                               self.transport.pauseProducing, self._rateResume)

    def _rateResume(self):
        if self.state != self.CLOSED:
            self.transport.resumeProducing()

    def _dispatch(self, frame):
        kind = frame.kind
        if self.state == self.HELLO:
            if kind != frames.HELLO:
                return self._refuse("AUTH_REQUIRED", "the first frame must be HELLO")
            return self._hello(frame)
        if self.state == self.PROOF:
            if kind != frames.PROOF:
                return self._refuse("AUTH_REQUIRED", "PROOF expected after CHALLENGE")
            return self._proof(frame)
        handler = (self._deviceHandlers if self.role == auth.DEVICE
                   else self._centralHandlers).get(kind)
        if handler is None:
            raise errors.BadRequest(
                f"a {self.role} may not send {frames.KINDS[kind].upper()} frames")
        handler(self, frame)

    # -- authentication ---------------------------------------------------

    def _hello(self, frame):
        try:
            hello = frame.payload.value() if frame.payload.type == frames.JSON else None
            role, fleet = hello["role"], hello["fleet"]
            clientNonce = bytes.fromhex(hello["nonce"])
            peerId = hello.get("id", "") if role == auth.DEVICE else ""
            # The UDP datagram version the peer speaks: 2 (MAC) or, absent,
            # a device of protocol version 1 (docs/iot-protocol.md).
            udp = hello.get("udp", 1)
            if udp not in (1, 2) or isinstance(udp, bool):
                raise ValueError(udp)
            if (role not in (auth.DEVICE, auth.CENTRAL) or not isinstance(fleet, str)
                    or not isinstance(peerId, str) or len(clientNonce) < auth.MIN_CLIENT_NONCE
                    or (role == auth.DEVICE and not peerId)):
                raise ValueError(role)
        except (TypeError, KeyError, ValueError, AttributeError):
            return self._refuse("BAD_HELLO", 'HELLO must be JSON {"role": "device"|"central", '
                                '"fleet": ..., "id": ... (devices), "nonce": hex, >= 16 bytes}')
        registry = self.factory.concentrator.registry
        if role == auth.DEVICE:
            entry = registry.device(fleet, peerId)
            if entry is None:
                return self._refuse("UNKNOWN_DEVICE", f"fleet {fleet!r} has no device {peerId!r}")
        else:
            entry = registry.central(fleet)
            if entry is None:
                return self._refuse("UNKNOWN_CENTRAL", f"fleet {fleet!r} has no central key")
        if not self.factory.nonces.use((role, fleet, peerId, clientNonce)):
            return self._refuse("REPLAY", "this HELLO nonce was already used")
        self.role, self.fleet, self.peerId, self.entry = role, fleet, peerId, entry
        self._clientNonce = clientNonce
        self._udpVersion = udp
        self._serverNonce = os.urandom(auth.NONCE_SIZE)
        self.state = self.PROOF
        self._write(frames.CHALLENGE, frame.requestId,
                    Payload(frames.BINARY, self._serverNonce))

    def _proof(self, frame):
        # Look the key up again: it may have been revoked since HELLO.
        registry = self.factory.concentrator.registry
        entry = (registry.device(self.fleet, self.peerId) if self.role == auth.DEVICE
                 else registry.central(self.fleet))
        if entry is None or entry.key != self.entry.key or not auth.checkProof(
                entry.key, frame.payload.data, self.role, self.fleet, self.peerId,
                self._clientNonce, self._serverNonce):
            return self._refuse("BAD_PROOF", "the proof does not match the key")
        serverProof = auth.proof(entry.key, "server", self.role, self.fleet, self.peerId,
                                 self._clientNonce, self._serverNonce)
        # Authenticated: no longer one of its address's pending sessions,
        # now one of its fleet's.
        self._releaseSlot()
        if not self.factory.admission.acquire(PER_HUB, self.fleet):
            return self._overLimit(PER_HUB, self.fleet, self.fleet,
                                   f"sessions of fleet {self.fleet!r}")
        self._slot = (PER_HUB, self.fleet)
        self.state = self.OPEN
        self.authenticatedOnce = True
        self.factory.counters.authOk += 1
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        f = self.factory
        welcome = {"proof": serverProof.hex(), "pingInterval": f.pingInterval,
                   "maxFrame": f.maxFrame}
        if self.role == auth.DEVICE:
            welcome["udp"] = self._bindUdpKey(entry)
        self._write(frames.WELCOME, frame.requestId, Payload.json(welcome))
        if f.pingInterval > 0:
            self._timer = f.reactor.callLater(f.pingInterval, self._keepalive)
        if self.role == auth.DEVICE:
            f.concentrator.deviceOnline(self)
        else:
            f.concentrator.centralOnline(self)

    def _bindUdpKey(self, entry):
        """
        Derive the session's UDP key (never sent: the device derives it
        too) and bind it in the token book, so the tokens issued to this
        session carry keys derived from it.

        @return: the datagram version the session's tokens take: 2, 1 (a
            legacy device, accepted by configuration) or 0 (a legacy
            device: no tokens).
        """
        tokens = self.factory.concentrator.tokens
        if self._udpVersion >= auth.UDP_VERSION:
            self.udpKey = auth.udpKey(entry.key, self.role, self.fleet, self.peerId,
                                      self._clientNonce, self._serverNonce)
        else:
            self.udpKey = None
            self.factory.concentrator.core.quietLog.info(
                (FACE, "legacy udp"), "iot: {who} speaks UDP datagram version 1 (no MAC): "
                "{what}", who=self.describe(),
                what="its datagrams are accepted (iot.udp.accept_version_1)" if tokens.legacy
                else "it gets no UDP tokens")
        tokens.bindKey(self.fleet, self.peerId, self.udpKey)
        return 2 if self.udpKey is not None else (1 if tokens.legacy else 0)

    # -- both roles -------------------------------------------------------

    def _ping(self, frame):
        self._write(frames.PONG, frame.requestId, frame.payload)

    def _pong(self, frame):
        pass

    def _response(self, frame):
        entry = self._pending.pop(frame.requestId, None)
        if entry is None:
            raise errors.BadRequest(f"no request {frame.requestId} is waiting for an answer")
        d, deadline = entry
        if frame.kind == frames.RESPONSE:
            # The answer first (it is the held request's HTTP response),
            # the deadline after.
            d.callback(frame.payload)
            if deadline is not None:
                self.factory.deadlines.cancel(deadline)
        else:
            if deadline is not None:
                self.factory.deadlines.cancel(deadline)
            try:
                info = frame.payload.value()
                code, message = str(info["code"]), str(info.get("message", ""))
            except Exception:
                code, message = "REFUSED", "the peer refused the request"
            d.errback(errors.Refused(message, code))

    def _errorFrame(self, frame):
        if frame.requestId in self._pending:
            return self._response(frame)
        log.info("iot: {who} reported {payload!r}", who=self.describe(),
                 payload=frame.payload.data[:200])

    def _peerClose(self, frame):
        self.state = self.CLOSED
        self._drop()

    def _answer(self, d, requestId):
        """
        Send the outcome of C{d} back as a RESPONSE or ERROR for
        C{requestId}.
        """
        def ok(payload):
            self._write(frames.RESPONSE, requestId, payload)

        def bad(f):
            e = f.value
            if isinstance(e, errors.IoTError):
                self._error(requestId, e.code, e.message)
            else:
                log.failure("iot: request {rid} of {who}", f, rid=requestId,
                            who=self.describe())
                self._error(requestId, "INTERNAL", "internal error")
        d.addCallbacks(ok, bad)

    # -- device frames ----------------------------------------------------

    def _deviceRequest(self, frame):
        if frame.address:
            raise errors.Forbidden("a device's requests go to its central (empty address)")
        c = self.factory.concentrator
        self._inbound(lambda: c.centralRequest(self.fleet, self.peerId, frame.payload),
                      frame.requestId)

    def _inbound(self, start, requestId):
        """
        Start a request of the peer (C{start()} returns a Deferred) and
        answer it once that fires, counting it among
        the peer's requests in flight (at most C{maxInFlight}, else BUSY:
        a peer cannot pile up unbounded work in the broker).
        """
        if self._inFlight >= self.factory.maxInFlight:
            raise errors.Busy(f"more than {self.factory.maxInFlight} requests in flight")
        self._inFlight += 1
        d = start()

        def done(result):
            self._inFlight -= 1
            return result
        self._answer(d.addBoth(done), requestId)

    def _deviceMessage(self, frame):
        c = self.factory.concentrator
        if not frame.address:
            # Acknowledged once the central has it or it is stored for it.
            return self._stored(lambda: c.centralMessage(self.fleet, self.peerId,
                                                         frame.payload), frame.requestId)
        elif frame.address.startswith(GROUP_PREFIX):
            c.groupMessage(self.fleet, self.peerId, frame.address[len(GROUP_PREFIX):],
                           frame.payload)
        else:
            raise errors.Forbidden(
                f"a device may address its central or group/NAME, not {frame.address!r}")
        self._write(frames.ACK, frame.requestId)

    def _deviceAck(self, frame):
        self.factory.concentrator.acked(self, frame.requestId)

    def _deviceTokens(self, frame):
        self.factory.concentrator.refillTokens(self.fleet, self.peerId, force=True)

    def _deviceTelemetry(self, frame):
        self.factory.concentrator.telemetry(self.fleet, self.peerId, frame.payload, "tcp")

    # -- central frames ---------------------------------------------------

    def _centralRequest(self, frame):
        c = self.factory.concentrator
        self._inbound(lambda: c.request(self.fleet, frame.address, frame.payload),
                      frame.requestId)

    def _centralMessage(self, frame):
        c = self.factory.concentrator

        def sent(result):
            messageId, queued = result
            return Payload.json({"messageId": messageId, "queued": queued})
        self._stored(lambda: c.send(self.fleet, frame.address, frame.payload).addCallback(sent),
                     frame.requestId)

    def _centralAck(self, frame):
        self.factory.concentrator.acked(self, frame.requestId)

    def _stored(self, start, rid):
        """
        Start storing a peer's MESSAGE (C{start()} returns a Deferred of
        the ACK's payload, or None) and answer ACK or ERROR once done,
        counting it among the peer's requests in flight.
        """
        def sent(payload):
            self._write(frames.ACK, rid, payload if payload is not None else frames.EMPTY)

        def bad(f):
            e = f.value
            if isinstance(e, errors.IoTError):
                self._error(rid, e.code, e.message)
            else:
                log.failure("iot: message {rid} of {who}", f, rid=rid, who=self.describe())
                self._error(rid, "INTERNAL", "internal error")
        if self._inFlight >= self.factory.maxInFlight:
            raise errors.Busy(f"more than {self.factory.maxInFlight} requests in flight")
        self._inFlight += 1

        def done(result):
            self._inFlight -= 1
            return result
        start().addBoth(done).addCallbacks(sent, bad)

    # ICentralLink, for a central session:

    def deviceRequest(self, fleet, deviceId, payload):
        return self.request(payload, None, deviceId)

    def message(self, fleet, deviceId, payload):
        self._write(frames.MESSAGE, 0, payload, deviceId)

    def telemetry(self, fleet, deviceId, payload):
        self._write(frames.TELEMETRY, 0, payload, deviceId)

    _deviceHandlers = {
        frames.REQUEST: _deviceRequest, frames.RESPONSE: _response,
        frames.MESSAGE: _deviceMessage, frames.ACK: _deviceAck, frames.ERROR: _errorFrame,
        frames.PING: _ping, frames.PONG: _pong, frames.TOKENS: _deviceTokens,
        frames.TELEMETRY: _deviceTelemetry, frames.CLOSE: _peerClose,
    }
    _centralHandlers = {
        frames.REQUEST: _centralRequest, frames.RESPONSE: _response,
        frames.MESSAGE: _centralMessage, frames.ACK: _centralAck, frames.ERROR: _errorFrame,
        frames.PING: _ping, frames.PONG: _pong, frames.CLOSE: _peerClose,
    }


def _size(frame):
    """
    About the bytes a frame (or a bad frame's L{FrameError}) took.
    """
    payload = getattr(frame, "payload", None)
    if payload is None:
        return 16
    return 16 + len(frame.address) + len(payload.data)


class IoTFactory(Factory):
    """
    Builds L{IoTSession}s for one concentrator; one factory serves every
    TCP and TLS endpoint.
    """

    noisy = False

    def __init__(self, reactor, concentrator, authTimeout=10.0, pingInterval=30.0,
                 pingTimeout=30.0, maxFrame=frames.DEFAULT_MAX_FRAME,
                 maxOutputBuffer=1024 * 1024, maxInFlight=256, closeGrace=10.0,
                 nonces=None, admission=None, inboundRate=(0, 0, 2.0)):
        self.reactor = reactor
        # Unauthenticated sessions per address (PER_ADDRESS), sessions per
        # fleet (PER_HUB); none by default here (the face passes its own).
        self.admission = admission if admission is not None else AdmissionLimits({})
        self.inboundRate = inboundRate
        self.concentrator = concentrator
        self.authTimeout = authTimeout
        self.pingInterval = pingInterval
        self.pingTimeout = pingTimeout
        self.maxFrame = maxFrame
        self.maxOutputBuffer = maxOutputBuffer
        self.maxInFlight = maxInFlight
        self.closeGrace = closeGrace
        self.counters = Counters()
        self.connections = LiveConnections()
        # The timeouts of the requests the sessions send their peers.
        self.deadlines = Deadlines(reactor)
        self.nonces = nonces if nonces is not None else auth.NonceBook(
            clock=reactor.seconds)

    def inboundLimiter(self):
        messages, octets, burst = self.inboundRate
        return InboundLimiter.build(self.reactor.seconds, messages, octets, burst,
                                    minBytes=self.maxFrame)

    def buildProtocol(self, addr):
        return IoTSession(self)

    def drain(self):
        """
        The broker is stopping: every session, authenticated or not, gets
        a CLOSE frame with code C{SHUTDOWN} and is closed; a Deferred fires
        once they have all gone.
        """
        for session in self.connections:
            session.close("SHUTDOWN", "broker shutting down")
        return self.connections.whenEmpty()
