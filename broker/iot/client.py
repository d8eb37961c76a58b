# -*- test-case-name: tests.test_iot_protocol -*-
"""
A client of the IoT TCP protocol, for a device or a central: the
simulator, the tests and the benchmark use it, and it is a reference for
device firmware (it checks the server's proof, as a device must).
"""

import os

from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.protocol import Protocol

from broker.iot import auth, frames
from broker.iot.errors import Refused
from broker.iot.frames import FrameReader, Payload


# What a central receives from its devices (docs/iot-protocol.md).
FORWARDED = (frames.MESSAGE, frames.TELEMETRY, frames.DEVICE_CONNECTED,
             frames.DEVICE_DISCONNECTED, frames.MESSAGE_STATUS)


class AuthFailed(Exception):
    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class IoTClient(Protocol):
    """
    @ivar authenticated: a Deferred firing with the WELCOME JSON once the
        server proved it knows the key; failing with L{AuthFailed}.
    @ivar inbox: every frame received after authentication that this
        client does not handle itself (PING is answered, TOKENS are kept
        in L{tokens}, RESPONSE/ERROR to our requests fire their Deferreds).
    @ivar presence: a central's DEVICE_CONNECTED and DEVICE_DISCONNECTED
        frames, each ACKed on receipt when it carries a durable id (they
        are not put in the inbox).
    @ivar onRequest: if set, C{onRequest(frame)} returns the Payload to
        answer a REQUEST with (instead of putting it in the inbox).
    @ivar autoAck: acknowledge MESSAGE frames as they arrive (and, for a
        central, the TELEMETRY and DEVICE_CONNECTED/DISCONNECTED frames of
        its central queue: those with a nonzero requestId).
    @ivar udpKey: the session's UDP key, derived after WELCOME (never sent).
    @ivar udpVersion: the datagram version announced in HELLO (2; 1 plays
        a device of protocol version 1, without MACs).
    """

    def __init__(self, role, fleet, peerId, secret, maxFrame=frames.DEFAULT_MAX_FRAME,
                 udpVersion=auth.UDP_VERSION):
        self.role = role
        self.fleet = fleet
        self.peerId = peerId or ""
        self.key = auth.keyBytes(secret) if isinstance(secret, str) else secret
        self.authenticated = Deferred()
        self.inbox = DeferredQueue()
        self.presence = DeferredQueue()
        self.tokens = []
        self.tokenTTL = None
        self.tokensArrived = None
        self.onRequest = None
        self.autoAck = False
        self.answerPings = True
        self.closed = Deferred()
        self._reader = FrameReader(maxFrame)
        self._pending = {}
        self._nextId = 0
        self._nonce = os.urandom(32)
        self.open = False
        self.udpVersion = udpVersion
        self.udpKey = None

    def connectionMade(self):
        hello = {"role": self.role, "fleet": self.fleet, "nonce": self._nonce.hex()}
        if self.role == auth.DEVICE:
            hello["id"] = self.peerId
            if self.udpVersion >= auth.UDP_VERSION:
                hello["udp"] = self.udpVersion
        self.write(frames.HELLO, 0, Payload.json(hello))

    def write(self, kind, requestId=0, payload=frames.EMPTY, address=""):
        self.transport.write(frames.encode(kind, requestId, payload, address))

    def request(self, payload, address=""):
        self._nextId += 1
        d = self._pending[self._nextId] = Deferred()
        self.write(frames.REQUEST, self._nextId, payload, address)
        return d

    def datagram(self, payload, token=None):
        """
        A telemetry datagram carrying C{payload}, spending C{token} (by
        default the next token held): version 2 with its MAC, or version
        1 for a session that announced it.
        """
        if token is None:
            token = self.tokens.pop(0)
        key = None if self.udpKey is None else auth.tokenKey(self.udpKey, token)
        return frames.encodeDatagram(token, payload, key)

    def nextId(self):
        self._nextId += 1
        return self._nextId

    def waitTokens(self, n=1):
        """
        A Deferred firing once at least C{n} tokens are held.
        """
        if len(self.tokens) >= n:
            d = Deferred()
            d.callback(self.tokens)
            return d
        self._tokensWanted = n
        self.tokensArrived = Deferred()
        return self.tokensArrived

    def dataReceived(self, data):
        try:
            received = self._reader.feed(data)
        except frames.FrameError as e:
            self._fail(AuthFailed(e.code, e.message))
            self.transport.loseConnection()
            return
        for frame in received:
            if isinstance(frame, frames.FrameError):
                self.inbox.put(frame)
            else:
                self._frame(frame)

    def _fail(self, e):
        if not self.authenticated.called:
            self.authenticated.errback(e)

    def _frame(self, frame):
        kind = frame.kind
        if not self.open:
            if kind == frames.CHALLENGE:
                p = auth.proof(self.key, "client", self.role, self.fleet, self.peerId,
                               self._nonce, frame.payload.data)
                self._serverNonce = frame.payload.data
                self.write(frames.PROOF, 0, Payload(frames.BINARY, p))
            elif kind == frames.WELCOME:
                welcome = frame.payload.value()
                expected = auth.proof(self.key, "server", self.role, self.fleet, self.peerId,
                                      self._nonce, self._serverNonce)
                if bytes.fromhex(welcome.get("proof", "")) != expected:
                    self._fail(AuthFailed("BAD_SERVER_PROOF", "the server does not know our key"))
                    self.transport.loseConnection()
                    return
                self.open = True
                if self.role == auth.DEVICE and welcome.get("udp") == auth.UDP_VERSION:
                    self.udpKey = auth.udpKey(self.key, self.role, self.fleet, self.peerId,
                                              self._nonce, self._serverNonce)
                self.authenticated.callback(welcome)
            elif kind == frames.ERROR:
                info = frame.payload.value()
                self._fail(AuthFailed(info["code"], info["message"]))
            else:
                self.inbox.put(frame)
            return
        if kind == frames.PING:
            if self.answerPings:
                self.write(frames.PONG, frame.requestId, frame.payload)
        elif kind == frames.TOKENS:
            self.tokenTTL, tokens = frames.decodeTokens(frame.payload)
            self.tokens.extend(tokens)
            if self.tokensArrived is not None and len(self.tokens) >= self._tokensWanted:
                d, self.tokensArrived = self.tokensArrived, None
                d.callback(self.tokens)
        elif kind in (frames.RESPONSE, frames.ERROR) and frame.requestId in self._pending:
            d = self._pending.pop(frame.requestId)
            if kind == frames.RESPONSE:
                d.callback(frame.payload)
            else:
                info = frame.payload.value()
                d.errback(Refused(info.get("message", ""), info.get("code")))
        elif kind in (frames.DEVICE_CONNECTED, frames.DEVICE_DISCONNECTED):
            if frame.requestId:
                self.write(frames.ACK, frame.requestId)
            self.presence.put(frame)
        elif kind == frames.REQUEST and self.onRequest is not None:
            try:
                answer = self.onRequest(frame)
            except Refused as e:
                self.write(frames.ERROR, frame.requestId,
                           Payload.json({"code": e.code, "message": e.message}))
            else:
                self.write(frames.RESPONSE, frame.requestId, answer)
        else:
            if self.autoAck and (kind == frames.MESSAGE or (
                    kind in FORWARDED and frame.requestId)):
                # A device ACKs every MESSAGE; a central what the server
                # forwards from its central queue (nonzero requestId).
                self.write(frames.ACK, frame.requestId)
            self.inbox.put(frame)

    def nextFrame(self):
        return self.inbox.get()

    def connectionLost(self, reason):
        self._fail(AuthFailed("CLOSED", "connection closed before authentication"))
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(reason)
        self.closed.callback(None)


def pinnedTLS(certificatePEM, hostname="localhost"):
    """
    TLS client options trusting one certificate only: the broker's
    (C{certificatePEM}, bytes, e.g. the development certificate it
    generated in its state directory), checked for C{hostname} as usual.
    """
    return ssl.optionsForClientTLS(hostname,
                                   trustRoot=ssl.Certificate.loadPEM(certificatePEM))
