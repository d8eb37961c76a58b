"""
Test harness for the Web PubSub face: a real broker site on an ephemeral
loopback port and real autobahn WebSocket clients.
"""

import json

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet import ssl
from twisted.internet.endpoints import (TCP4ClientEndpoint, TCP4ServerEndpoint,
                                        serverFromString, wrapClientTLS)

from broker import config
from broker.auth.tokens import makeClientToken
from broker.core.router import Core
from broker.webpubsub.site import makeFactory, makeSite

KEY = "test-access-key-0123456789abcdef"


class Client(WebSocketClientProtocol):
    """
    Collects every frame; C{next()} waits for the next one.
    """

    def __init__(self):
        super().__init__()
        self.frames = []
        self._waiting = []
        self.opened = defer.Deferred()
        self.closed = defer.Deferred()
        self.closeCode = None

    def onConnect(self, response):
        self.response = response

    def onOpen(self):
        self.opened.callback(self)

    def onMessage(self, payload, isBinary):
        frame = (payload, isBinary)
        if self._waiting:
            self._waiting.pop(0).callback(frame)
        else:
            self.frames.append(frame)

    def onClose(self, wasClean, code, reason):
        self.closeCode = code
        self.closeReason = reason
        if not self.opened.called:
            self.opened.errback(ConnectionRefusedByServer(self.wasNotCleanReason or reason))
        for d in self._waiting:
            d.errback(ConnectionRefusedByServer(f"closed {code} {reason}"))
        self._waiting = []
        self.closed.callback((code, reason))

    def next(self):
        if self.frames:
            return defer.succeed(self.frames.pop(0))
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    @defer.inlineCallbacks
    def nextJSON(self):
        payload, isBinary = yield self.next()
        assert not isBinary, "expected a text frame"
        return json.loads(payload)

    def publish(self, group, ackId):
        """
        Send "m<ackId>" to C{group} with C{ackId}: the next frame (its ack).
        """
        self.send({"type": "sendToGroup", "group": group, "ackId": ackId,
                   "dataType": "text", "data": f"m{ackId}"})
        return self.nextJSON()

    def send(self, obj):
        self.sendMessage(json.dumps(obj).encode("utf-8"))


def rawToken(payload, key=KEY):
    """
    An HS256 JWT over the claims text C{payload} (bytes) exactly as given:
    what PyJWT's encoder would never write (NaN, duplicate claims).
    """
    import base64
    import hashlib
    import hmac

    def b64(b):
        return base64.urlsafe_b64encode(b).rstrip(b"=")

    signing = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(payload)
    signature = hmac.new(key.encode("utf-8"), signing, hashlib.sha256).digest()
    return (signing + b"." + b64(signature)).decode("ascii")


class ConnectionRefusedByServer(Exception):
    pass


class BrokerHarness:
    """
    Starts a core and the Web PubSub site on 127.0.0.1:0, configured by the
    TOML text C{toml} (defaults for everything it leaves out), over TLS with
    a throwaway certificate when C{tls} is true.
    """

    def __init__(self, testCase, reactor, toml="", tls=False):
        self.testCase = testCase
        self.tls = tls
        self.reactor = reactor
        self.settings = config.parse(toml)
        self.core = Core(reactor, fanoutChunk=self.settings["webpubsub"]["fanout_chunk"])
        self.clients = []

    @defer.inlineCallbacks
    def start(self):
        wps = self.settings["webpubsub"]
        self.factory = makeFactory(self.core, wps, [KEY], self.reactor)
        self.site = makeSite(self.factory)
        self.core.startService()
        if self.tls:
            from tests.certs import makeCertificate

            keyPath, certPath, self.certPEM = makeCertificate(self.testCase.mktemp())
            endpoint = serverFromString(
                self.reactor, f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}")
        else:
            endpoint = TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        self.port = yield endpoint.listen(self.site)
        self.testCase.addCleanup(self.stop)
        return self

    @defer.inlineCallbacks
    def stop(self):
        for c in self.clients:
            if c.transport is not None and c.state != c.STATE_CLOSED:
                c.transport.abortConnection()
        yield defer.DeferredList([c.closed for c in self.clients])
        yield self.port.stopListening()
        self.core.stopService()

    @property
    def url(self):
        scheme = "wss" if self.tls else "ws"
        return f"{scheme}://127.0.0.1:{self.port.getHost().port}"

    def token(self, hub="chat", **kw):
        return makeClientToken(KEY, f"http://127.0.0.1:{self.port.getHost().port}/client/hubs/{hub}", **kw)

    @defer.inlineCallbacks
    def connect(self, hub="chat", protocols=("json.webpubsub.azure.v1",), token=True,
                query="", headers=None, **tokenClaims):
        path = f"/client/hubs/{hub}"
        params = []
        if token is True:
            params.append("access_token=" + self.token(hub, **tokenClaims))
        elif token:
            params.append("access_token=" + token)
        if query:
            params.append(query)
        if params:
            path += "?" + "&".join(params)
        factory = WebSocketClientFactory(self.url + path, protocols=list(protocols) or None,
                                         headers=headers, reactor=self.reactor)
        factory.protocol = Client
        factory.setProtocolOptions(autoPingInterval=0, failByDrop=False)
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port.getHost().port)
        if self.tls:
            trust = ssl.Certificate.loadPEM(self.certPEM)
            endpoint = wrapClientTLS(ssl.optionsForClientTLS("localhost", trustRoot=trust),
                                     endpoint)
        proto = yield endpoint.connect(factory)
        self.clients.append(proto)
        yield proto.opened
        return proto

    @defer.inlineCallbacks
    def refused(self, **kw):
        """
        Connect as L{connect} would, expecting the handshake to be refused:
        the refusal's text (its status and reason).
        """
        try:
            yield self.connect(**kw)
        except ConnectionRefusedByServer as e:
            return str(e)
        self.testCase.fail("handshake accepted")

    @defer.inlineCallbacks
    def connectJSON(self, hub="chat", **kw):
        """
        Connect with the JSON subprotocol and consume the connected message.
        """
        c = yield self.connect(hub, **kw)
        hello = yield c.nextJSON()
        c.connectionId = hello["connectionId"]
        c.hello = hello
        return c
