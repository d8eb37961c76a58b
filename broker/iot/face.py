# -*- test-case-name: tests.test_iot_face -*-
"""
Builds the IoT face from C{[iot]}: the registry, the store, the
concentrator, the device/central TCP endpoints and the UDP telemetry
listener.  In cluster mode (C{context.cluster}) the store, tokens and
presence are in Redis (L{broker.iot.clustered}).
"""

import os
import socket
import sqlite3

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from broker.config import ConfigError
from broker.core.limits import PER_ADDRESS, PER_HUB, AdmissionLimits
from broker.files import privateDatabase
from broker.net.datagram import DatagramEndpoint
from broker.plugins import ListenerSpec, streamListeners
from broker.iot import api, apikeys, tlscert
from broker.iot.adminview import IoTView
from broker.iot.webhook import Webhooks
from broker.iot.auth import Registry, loadRegistryFile, writeDevelopmentRegistry
from broker.iot.clustered import ClusterConcentrator
from broker.iot.clustertokens import ClusterTokenBook
from broker.iot.concentrator import Concentrator
from broker.iot.errors import Unavailable
from broker.iot.protocol import IoTFactory
from broker.iot.redisstore import RedisMessageStore
from broker.iot.store import SQLiteMessageStore
from broker.iot.udp import TelemetryListener

log = Logger()

REGISTRY_FILE = "iot-registry.toml"
STORE_FILE = "iot.sqlite"
# Cluster mode: seconds between sweeps (ClusterConcentrator.sweep).
SWEEP_INTERVAL = 5.0


class UDPListenerService(service.Service):
    """
    The UDP telemetry listener, logged as C{iot.udp listening on ADDR} like
    the stream listeners.
    """

    name = "iot.udp"

    def __init__(self, reactor, protocol, interface, port, maxPacket, receiveBuffer=0):
        self._reactor = reactor
        self.receiveBuffer = receiveBuffer
        self.protocol = protocol
        self.interface = interface
        self.portNumber = port
        self.maxPacket = maxPacket
        self.port = None

    def startService(self):
        try:
            self.port = self._reactor.listenUDP(self.portNumber, self.protocol,
                                                interface=self.interface,
                                                maxPacketSize=self.maxPacket + 1)
        except CannotListenError as e:
            log.critical("iot.udp cannot listen on {interface}:{port}: {e}",
                         interface=self.interface, port=self.portNumber, e=e.socketError)
            raise
        if self.receiveBuffer:
            sock = self.port.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receiveBuffer)
            got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            if got < self.receiveBuffer:
                log.warn("iot.udp: receive buffer is {got} bytes, not {want} (raise "
                         "net.core.rmem_max)", got=got, want=self.receiveBuffer)
        host = self.port.getHost()
        log.info("iot.udp listening on {host}:{port}", host=host.host, port=host.port)
        super().startService()

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


class IssuedKeysLoader(service.Service):
    """
    Loads the keys issued at run time into the registry when the store
    opens, before any listener accepts a session (start-up may wait).
    """

    def __init__(self, store, registry):
        self.store = store
        self.registry = registry

    def startService(self):
        runner = self.store.runner
        runner.start()
        if runner.path != ":memory:":
            connection = sqlite3.connect(runner.path)
            try:
                self.registry.loadIssued(
                    connection.execute("SELECT fleet, device, secret FROM iot_keys").fetchall())
            finally:
                connection.close()
        super().startService()


class IoTCollector:
    """
    The face's counters for the admin /metrics, read at scrape time.
    """

    def __init__(self, concentrator, factory, udp):
        self.c = concentrator
        self.f = factory
        self.udp = udp

    def collect(self):
        c = CounterMetricFamily("broker_iot_auth_failures", "Refused IoT sessions by reason.",
                                labels=["reason"])
        for k, v in self.f.counters.authFailures.items():
            c.add_metric([k], v)
        yield c
        yield CounterMetricFamily("broker_iot_auth_ok", "Authenticated IoT sessions.",
                                  value=self.f.counters.authOk)
        yield CounterMetricFamily("broker_iot_bad_frames", "Malformed TCP frames.",
                                  value=self.f.counters.badFrames)
        yield CounterMetricFamily("broker_iot_dead_sessions", "Sessions closed by keepalive.",
                                  value=self.f.counters.deadSessions)
        yield CounterMetricFamily("broker_iot_slow_consumers",
                                  "Sessions dropped because more than max_output_buffer "
                                  "bytes waited for them.",
                                  value=self.f.counters.slowConsumers)
        if self.udp is not None:
            u = CounterMetricFamily("broker_iot_udp_datagrams",
                                    "UDP telemetry datagrams by outcome.", labels=["outcome"])
            for k, v in self.udp.counts.items():
                u.add_metric([k], v)
            yield u
        s = CounterMetricFamily("broker_iot_events", "Concentrator events.", labels=["event"])
        for k, v in self.c.stats.items():
            s.add_metric([k], v)
        yield s
        devices, centrals = self.c.onlineCount()
        g = GaugeMetricFamily("broker_iot_sessions", "Authenticated sessions.", labels=["role"])
        g.add_metric(["device"], devices)
        g.add_metric(["central"], centrals)
        yield g


def registryPath(context, cfg):
    """
    The registry file: the configured one, or a development registry
    generated in the state directory (its keys never in the repository).
    """
    path = cfg["registry_file"]
    if path:
        return path
    path = os.path.join(context.stateDir, REGISTRY_FILE)
    try:
        if writeDevelopmentRegistry(path):
            log.warn("iot.registry_file is empty: generated a development registry in {path}",
                     path=path)
    except OSError as e:
        raise ConfigError("broker.state_dir", f"cannot keep the IoT registry there: {e}")
    return path


def buildConcentrator(context, cfg):
    """
    The registry, store and concentrator, their services started with the
    broker.
    """
    path = registryPath(context, cfg)
    key = "iot.registry_file" if cfg["registry_file"] else "broker.state_dir"
    try:
        fleets = loadRegistryFile(path)
        registry = Registry(fleets)
    except (OSError, ValueError) as e:
        raise ConfigError(key, f"cannot load the IoT registry {path}: {e}")
    # Each fleet is a hub: its series on /metrics from the start.
    context.core.declareHubs(fleets)
    options = dict(requestTimeout=cfg["request_timeout"], queueTTL=cfg["queue_ttl"],
                   maxQueueDepth=cfg["max_queue_depth"], tokenTTL=cfg["token_ttl"],
                   tokenBatch=cfg["token_batch"],
                   maxCentralQueueDepth=cfg["max_central_queue_depth"],
                   forwardTelemetry=cfg["forward_telemetry"],
                   maxOutcomes=cfg["max_outcomes"],
                   lastValueOnJoin=cfg["last_value_on_join"])
    if context.cluster is not None:
        concentrator = buildClusterConcentrator(context, registry, options)
        store = concentrator.store
    else:
        storePath = cfg["store_path"] or os.path.join(context.stateDir, STORE_FILE)
        key = "iot.store_path" if cfg["store_path"] else "broker.state_dir"
        try:
            # Checked here to report a ConfigError (the store holds the
            # device keys issued at run time).
            privateDatabase(storePath)
        except OSError as e:
            raise ConfigError(key, f"cannot keep the IoT store {storePath}: {e}")
        store = SQLiteMessageStore.open(context.reactor, storePath)
        context.addService(store.runner)
        context.addService(IssuedKeysLoader(store, registry))
        concentrator = Concentrator(context.reactor, context.core, registry, store, **options)
        context.addService(ConcentratorStopper(concentrator))
    # The central queues are drained once the store is open (the service
    # above starts after it).
    concentrator.forwarder.paused = True

    def housekeeping():
        concentrator.tokens.purge()
        # Each expired message is reported to its central (broker.iot.feedback).
        return store.purgeExpired().addCallback(concentrator.feedback.expired).addErrback(
            lambda f: log.failure("iot: purging expired messages", f)
            if not f.check(Unavailable) else None)
    timer = TimerService(60, housekeeping)
    timer.clock = context.reactor
    context.addService(timer)

    def reload():
        fleets = loadRegistryFile(path)
        registry.replaceFile(fleets)
        context.core.declareHubs(fleets)
        concentrator.registryChanged()
        log.info("iot: registry {path} reloaded", path=path)
    context.onReload(reload)
    return concentrator


def buildClusterConcentrator(context, registry, options):
    """
    Cluster mode: the queues, issued keys, UDP tokens and presence in
    Redis, shared by every node (L{broker.iot.clustered}); C{iot.store_path}
    is not used.
    """
    cluster = context.cluster
    tokens = ClusterTokenBook(cluster, options["tokenTTL"])
    concentrator = ClusterConcentrator(context.reactor, context.core, registry,
                                       RedisMessageStore(cluster), cluster, tokens=tokens,
                                       **options)
    # Heals what a lost node-to-node message could leave undone (a queued
    # message whose holder was not told, a missed central announcement).
    sweep = TimerService(SWEEP_INTERVAL, concentrator.sweep)
    sweep.clock = context.reactor
    context.addService(sweep)
    context.addService(ConcentratorStopper(concentrator))
    return concentrator


class ConcentratorStopper(service.Service):
    """
    Starts draining the central queues once the store is open, and stops
    the concentrator (its timers: central outboxes' retries and, in
    cluster mode, the requests waiting for other nodes) with the broker.
    """

    def __init__(self, concentrator):
        self.concentrator = concentrator

    def startService(self):
        super().startService()
        self.concentrator.forwarder.resume()

    def stopService(self):
        super().stopService()
        # The pending last values are written before the store closes.
        return self.concentrator.stop()


class WebhookService(service.Service):
    """
    Closes the webhooks' connection pool when the broker stops.
    """

    name = "iot.webhook"

    def __init__(self, webhooks):
        self.webhooks = webhooks

    def stopService(self):
        super().stopService()
        return self.webhooks.close()


def buildHTTP(context, cfg, concentrator):
    """
    The central's HTTP(S) API on C{iot.http.listen} and the fleets'
    webhooks (used while a fleet has no central TCP session).
    """
    webhooks = Webhooks(context.reactor, cfg["webhook"], registry=context.registry)
    webhooks.install(concentrator)
    context.addService(WebhookService(webhooks))
    http = cfg["http"]
    if not http["enabled"]:
        return
    entries, devPath = api.loadKeys(http, context.stateDir)
    if devPath is not None:
        log.warn("iot.http.api_keys is empty: the development API key of fleet demo is in "
                 "{path}", path=devPath)
    try:
        keys = apikeys.APIKeys(entries)
    except apikeys.APIKeyError as e:
        raise ConfigError("iot.http.api_keys", str(e))
    site = api.makeSite(context.reactor, concentrator, keys, http, context.registry,
                        stats=context.listeners.get("iot.http.listen"))
    context.onDrain(site.api.drain)
    context.listen("iot.http.listen", http["listen"], site, http["max_connections"])

    def reload():
        keys.replace(api.loadKeys(http, context.stateDir)[0])
        log.info("iot.http: {n} API keys loaded", n=len(keys))
    context.onReload(reload)


def buildTLS(context, cfg, factory):
    """
    C{iot.tls.listen}: the same sessions over TLS, with the configured
    certificate or a generated development one (L{broker.iot.tlscert}).
    """
    key = "iot.tls.certificate" if cfg["tls"]["certificate"] else "broker.state_dir"
    try:
        certPath, keyPath, generated = tlscert.certificatePaths(cfg, context.stateDir)
        options = tlscert.serverOptions(certPath, keyPath)
    except (OSError, ValueError) as e:
        raise ConfigError(key, f"cannot use the IoT TLS certificate: {e}")
    except Exception as e:
        raise ConfigError(key, f"cannot use the IoT TLS certificate {certPath}: {e}")
    if generated:
        log.warn("iot.tls.certificate is empty: generated a self-signed development "
                 "certificate in {path} (clients pin it; never use it in production)",
                 path=certPath)
    context.listen("iot.tls.listen", cfg["tls"]["listen"], tlscert.wrap(factory, options),
                   cfg["max_connections"])


def build(context):
    cfg = context.settings["iot"]
    if not cfg["enabled"]:
        return
    reactor = context.reactor
    concentrator = buildConcentrator(context, cfg)
    concentrator.tokens.legacy = cfg["udp"]["accept_version_1"]
    factory = IoTFactory(reactor, concentrator, authTimeout=cfg["auth_timeout"],
                         pingInterval=cfg["ping_interval"], pingTimeout=cfg["ping_timeout"],
                         maxFrame=cfg["max_frame_size"],
                         maxOutputBuffer=cfg["max_output_buffer"],
                         admission=AdmissionLimits({
                             PER_ADDRESS: cfg["max_connections_per_address"],
                             PER_HUB: cfg["max_connections_per_fleet"]}),
                         inboundRate=(cfg["max_inbound_messages_per_second"],
                                      cfg["max_inbound_bytes_per_second"],
                                      cfg["inbound_burst"]))
    context.listen("iot.listen", cfg["listen"], factory, cfg["max_connections"])
    if cfg["tls"]["listen"]:
        buildTLS(context, cfg, factory)
    udp = None
    if cfg["udp"]["enabled"]:
        udp = TelemetryListener(concentrator, cfg["udp"]["max_datagram"],
                                ratePerSource=cfg["udp"]["max_datagrams_per_second"],
                                burst=cfg["inbound_burst"])
        context.addService(UDPListenerService(context.listeningReactor("iot.udp"), udp,
                                              cfg["udp"]["interface"],
                                              cfg["udp"]["port"], cfg["udp"]["max_datagram"],
                                              cfg["udp"]["receive_buffer"]))
    context.registry.register(IoTCollector(concentrator, factory, udp))
    context.addAdminView(IoTView(concentrator, factory, udp))
    buildHTTP(context, cfg, concentrator)
    # After the API's: held requests are answered 503 before their devices'
    # sessions close (which would fail them as DEVICE_OFFLINE).
    context.onDrain(factory.drain)
    return concentrator


def listeners(settings):
    """
    The listeners L{build} opens (L{broker.plugins.IBrokerFace.listeners}),
    the UDP telemetry socket among them.
    """
    cfg = settings["iot"]
    if not cfg["enabled"]:
        return []
    out = streamListeners("iot.listen", cfg["listen"])
    out += streamListeners("iot.tls.listen", cfg["tls"]["listen"])
    udp = cfg["udp"]
    if udp["enabled"]:
        out.append(ListenerSpec(
            "iot.udp", f"udp:{udp['port']}:interface={udp['interface']}",
            lambda reactor: DatagramEndpoint(reactor, udp["port"], udp["interface"],
                                             udp["max_datagram"] + 1)))
    if cfg["http"]["enabled"]:
        out += streamListeners("iot.http.listen", cfg["http"]["listen"])
    return out
