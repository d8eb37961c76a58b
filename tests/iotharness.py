"""
An IoT concentrator on real sockets for tests: TCP (and TLS) on
127.0.0.1:0, UDP on 127.0.0.1:0, the SQLite store in a temporary
directory (or, given a L{broker.cluster.node.Cluster}, the cluster
concentrator with its Redis store and tokens), and clients that
authenticate.
"""

from twisted.internet import defer, ssl
from twisted.internet.endpoints import (TCP4ClientEndpoint, connectProtocol, serverFromString,
                                        wrapClientTLS)

from broker.core.router import Core
from broker.iot.auth import Entry, Registry, keyBytes
from broker.iot.client import IoTClient
from broker.iot.concentrator import Concentrator
from broker.iot.protocol import IoTFactory
from broker.iot.store import SQLiteMessageStore
from broker.iot.udp import TelemetryListener

SECRETS = {
    ("acme", "d1"): "secret-acme-d1",
    ("acme", "d2"): "secret-acme-d2",
    ("other", "x1"): "secret-other-x1",
    ("acme", None): "secret-acme-central",
    ("other", None): "secret-other-central",
}


def fleets():
    def dev(fleet, did, groups=()):
        return Entry(fleet, did, keyBytes(SECRETS[(fleet, did)]), groups)
    return {
        "acme": {"central": Entry("acme", None, keyBytes(SECRETS[("acme", None)])),
                 "devices": {"d1": dev("acme", "d1", ["alerts"]), "d2": dev("acme", "d2")},
                 "groups": ["alerts"]},
        "other": {"central": Entry("other", None, keyBytes(SECRETS[("other", None)])),
                  "devices": {"x1": dev("other", "x1")}, "groups": []},
    }


class IoTHarness:
    def __init__(self, testCase, reactor, tls=False, core=None, cluster=None, **options):
        self.testCase = testCase
        self.cluster = cluster
        self.reactor = reactor
        self.tls = tls
        self.core = core
        self.options = options
        self.clients = []

    @defer.inlineCallbacks
    def start(self):
        tc, reactor, opts = self.testCase, self.reactor, dict(self.options)
        if self.core is None:
            self.core = Core(reactor)
            self.core.startService()
            tc.addCleanup(self.core.stopService)
        self.registry = Registry(fleets())
        factoryOptions = {k: opts.pop(k) for k in list(opts)
                          if k in ("authTimeout", "pingInterval", "pingTimeout", "maxFrame",
                                   "maxOutputBuffer", "maxInFlight", "admission",
                                   "inboundRate")}
        udpRate = opts.pop("udpRate", 0)
        if self.cluster is not None:
            from broker.iot.clustered import ClusterConcentrator
            from broker.iot.clustertokens import ClusterTokenBook
            from broker.iot.redisstore import RedisMessageStore
            self.store = RedisMessageStore(self.cluster)
            tokens = ClusterTokenBook(self.cluster, opts.get("tokenTTL", 300.0))
            self.concentrator = ClusterConcentrator(reactor, self.core, self.registry,
                                                    self.store, self.cluster, tokens=tokens,
                                                    **opts)
            tc.addCleanup(self.concentrator.stop)
        else:
            self.store = SQLiteMessageStore.open(reactor, tc.mktemp() + "/iot.sqlite")
            self.store.runner.start()
            tc.addCleanup(self.store.runner.close)
            self.concentrator = Concentrator(reactor, self.core, self.registry, self.store,
                                             **opts)
            tc.addCleanup(self.concentrator.stop)
        self.factory = IoTFactory(reactor, self.concentrator, **factoryOptions)
        if self.tls:
            from tests.certs import makeCertificate
            keyPath, certPath, self.certPEM = makeCertificate(tc.mktemp())
            endpoint = serverFromString(
                reactor, f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}")
        else:
            endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        self.port = yield endpoint.listen(self.factory)
        self.udp = TelemetryListener(self.concentrator, 2048, ratePerSource=udpRate, burst=1.0)
        self.udpPort = reactor.listenUDP(0, self.udp, interface="127.0.0.1")
        tc.addCleanup(self.stop)
        return self

    @defer.inlineCallbacks
    def stop(self):
        for c in self.clients:
            if c.transport is not None and c.transport.connected:
                c.transport.abortConnection()
        yield defer.DeferredList([c.closed for c in self.clients])
        yield self.port.stopListening()
        yield self.udpPort.stopListening()

    @property
    def udpAddress(self):
        return ("127.0.0.1", self.udpPort.getHost().port)

    @defer.inlineCallbacks
    def open(self, protocol):
        """
        Connect C{protocol} (any Protocol) to the TCP endpoint.
        """
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port.getHost().port)
        if self.tls:
            trust = ssl.Certificate.loadPEM(self.certPEM)
            endpoint = wrapClientTLS(ssl.optionsForClientTLS("localhost", trustRoot=trust),
                                     endpoint)
        p = yield connectProtocol(endpoint, protocol)
        if isinstance(p, IoTClient):
            self.clients.append(p)
        return p

    @defer.inlineCallbacks
    def device(self, deviceId="d1", fleet="acme", secret=None, authenticate=True):
        c = IoTClient("device", fleet, deviceId,
                      secret if secret is not None else SECRETS[(fleet, deviceId)])
        yield self.open(c)
        if authenticate:
            yield c.authenticated
        return c

    @defer.inlineCallbacks
    def central(self, fleet="acme", secret=None, authenticate=True):
        c = IoTClient("central", fleet, None,
                      secret if secret is not None else SECRETS[(fleet, None)])
        yield self.open(c)
        if authenticate:
            yield c.authenticated
        return c


def waitUntil(reactor, predicate, timeout=5.0, interval=0.01):
    """
    Poll C{predicate} on the reactor until it is true (for effects that
    happen on the store's thread or the other end of a socket).
    """
    from twisted.internet.task import deferLater
    d = defer.Deferred()
    deadline = reactor.seconds() + timeout

    def check():
        if predicate():
            d.callback(None)
        elif reactor.seconds() > deadline:
            d.errback(AssertionError("condition not reached in time"))
        else:
            deferLater(reactor, interval, check)
    check()
    return d
