"""
Test harness for the peer-groups face: a real broker (store, core service,
WebSocket site and length-prefixed TCP listener) on ephemeral loopback
ports, and real clients (L{broker.peergroups.client}) with real keys.
"""

import time

from twisted.internet import defer, ssl
from twisted.internet.endpoints import (TCP4ClientEndpoint, TCP4ServerEndpoint,
                                        serverFromString, wrapClientTLS)

from broker import config
from broker.core.router import Core
from broker.peergroups.client import Identity, connectStream, connectWebSocket
from broker.peergroups.face import makePeerGroups
from broker.peergroups.protocol import PeerStreamFactory, PeerWebSocketFactory, makeSite


class PeerBroker:
    """
    @param clock: a L{twisted.internet.task.Clock} for the core's time and
        timers (set to the wall clock first), or C{None} for the reactor.
    @param stateDir: where the store and keys go (a fresh temporary
        directory by default; pass the same one to a second broker to test
        restarts).
    @param cluster: a started L{broker.cluster.node.Cluster}: this broker
        is then one node of it, on its Redis store.
    """

    def __init__(self, testCase, reactor, toml="", clock=None, stateDir=None, tls=False,
                 cluster=None):
        self.testCase = testCase
        self.reactor = reactor
        self.clock = clock
        if clock is not None and clock.seconds() < 1e9:
            clock.advance(time.time())
        self.settings = config.parse("[peergroups]\nenabled = true\n" + toml)
        self.cfg = self.settings["peergroups"]
        self.stateDir = stateDir or testCase.mktemp()
        self.tls = tls
        self.cluster = cluster
        self.clients = []
        self.running = False

    @defer.inlineCallbacks
    def start(self):
        self.core = Core(self.reactor)
        self.store, self.pg = makePeerGroups(self.reactor, self.core, self.cfg, self.stateDir,
                                             clock=self.clock, cluster=self.cluster)
        self.core.startService()
        self.store.start()
        self.pg.startService()
        yield self.pg.whenLoaded()
        ws = PeerWebSocketFactory(self.pg, self.cfg["max_message_size"], reactor=self.reactor)
        self.wsPort = yield TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(
            makeSite(ws))
        stream = PeerStreamFactory(self.pg, self.cfg["max_message_size"])
        if self.tls:
            from tests.certs import makeCertificate

            keyPath, certPath, self.certPEM = makeCertificate(self.testCase.mktemp())
            endpoint = serverFromString(
                self.reactor,
                f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}")
        else:
            endpoint = TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        self.tcpPort = yield endpoint.listen(stream)
        self.running = True
        self.testCase.addCleanup(self.stop)
        return self

    @defer.inlineCallbacks
    def stop(self):
        if not self.running:
            return
        self.running = False
        for c in self.clients:
            c.disconnect()
        yield defer.DeferredList([c.closed for c in self.clients])
        yield self.wsPort.stopListening()
        yield self.tcpPort.stopListening()
        yield self.pg.stopService()
        yield self.store.close()
        self.core.stopService()

    @property
    def wsURL(self):
        return f"ws://127.0.0.1:{self.wsPort.getHost().port}/peergroups/v1"

    def tcpEndpoint(self):
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.tcpPort.getHost().port)
        if self.tls:
            trust = ssl.Certificate.loadPEM(self.certPEM)
            endpoint = wrapClientTLS(ssl.optionsForClientTLS("localhost", trustRoot=trust),
                                     endpoint)
        return endpoint

    @defer.inlineCallbacks
    def connect(self, transport="ws"):
        if transport == "ws":
            client = yield connectWebSocket(self.reactor, self.wsURL)
        else:
            client = yield connectStream(self.reactor, self.tcpEndpoint())
        self.clients.append(client)
        return client

    @defer.inlineCallbacks
    def peer(self, transport="ws", application="default", identity=None, name="peer"):
        """
        A started client with a registered identity (a new one unless
        given).
        """
        client = yield self.connect(transport)
        yield client.startup(application)
        yield client.registerIdentity(identity or Identity.generate(name, name))
        return client
