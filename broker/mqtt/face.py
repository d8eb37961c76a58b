# -*- test-case-name: tests.test_mqtt_process -*-
"""
Builds the MQTT face from C{[mqtt]}: the authenticator, the store, the
L{MqttServer}, and its TCP, TLS and WebSocket listeners.
"""

import os

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application import service
from twisted.logger import Logger

from broker.config import ConfigError
from broker.core.limits import PER_ADDRESS, PER_HUB, PER_USER, AdmissionLimits
from broker.files import privateDatabase
from broker.iot import tlscert
from broker.mqtt.clustered import ClusteredMqtt
from broker.mqtt.noauth import AllowAll
from broker.mqtt.protocol import MqttFactory
from broker.mqtt.redisstore import RedisStore
from broker.mqtt.server import MqttServer
from broker.mqtt.store import NullStore, SQLiteStore
from broker.mqtt.websocket import makeSite

log = Logger()

STORE_FILE = "mqtt.sqlite"
CERT_FILE = "mqtt-tls-cert.pem"
KEY_FILE = "mqtt-tls-key.pem"


class MqttCollector:
    """The face's counters and gauges for the admin /metrics."""

    def __init__(self, server):
        self.server = server

    def collect(self):
        c = CounterMetricFamily("broker_mqtt_events", "MQTT face events by kind.",
                                labels=["event"])
        for k, v in sorted(self.server.counters.items()):
            c.add_metric([k], v)
        yield c
        sessions = self.server.sessions.values()
        online = sum(1 for s in sessions if s.online)
        g = GaugeMetricFamily("broker_mqtt_sessions", "MQTT sessions.", labels=["state"])
        g.add_metric(["online"], online)
        g.add_metric(["offline"], len(self.server.sessions) - online)
        yield g
        q = GaugeMetricFamily("broker_mqtt_queued_messages",
                              "QoS 1/2 messages queued or in flight for sessions.")
        q.add_metric([], sum(len(s.queue) + len(s.inflight) for s in sessions))
        yield q


class Restorer(service.Service):
    """
    Opens the store and brings the persistent sessions back before any
    listener accepts (services start in order).
    """

    def __init__(self, server):
        self.server = server

    def startService(self):
        self.server.restore()
        super().startService()

    def stopService(self):
        super().stopService()
        self.server.stop()


def buildAuth(context, cfg):
    """
    The L{broker.mqtt.interfaces.IMqttAuth}: C{broker.mqtt.auth.build(context,
    cfg)} when that module is installed, else allow-all (which refuses to
    start if a password or ACL file is configured).
    """
    try:
        from broker.mqtt import auth as authModule
    except ImportError:
        authModule = None
    if authModule is not None and hasattr(authModule, "build"):
        return authModule.build(context, cfg)
    if cfg["password_file"] or cfg["acl_file"]:
        raise ConfigError("mqtt.password_file", "this broker has no MQTT authentication module")
    return AllowAll()


def buildStore(context, cfg):
    """
    The session store: in cluster mode Redis (L{RedisStore}); it also
    says which node holds each session, so a cluster has one even without
    C{persistence}, which then keeps sessions, queues and retained
    messages out of it (a session taken over on another node starts
    empty); else SQLite, or none.
    """
    if context.cluster is not None:
        return RedisStore(context.reactor, context.cluster, durable=cfg["persistence"])
    if not cfg["persistence"]:
        return NullStore()
    path = cfg["store_path"] or os.path.join(context.stateDir, STORE_FILE)
    key = "mqtt.store_path" if cfg["store_path"] else "broker.state_dir"
    try:
        privateDatabase(path)
    except OSError as e:
        raise ConfigError(key, f"cannot keep the MQTT store {path}: {e}")
    store = SQLiteStore(context.reactor, path)
    context.addService(store.runner)
    return store


def tlsOptions(context, cfg):
    tls = cfg["tls"]
    key = "mqtt.tls.certificate" if tls["certificate"] else "broker.state_dir"
    try:
        if tls["certificate"]:
            certPath, keyPath = tls["certificate"], tls["private_key"] or tls["certificate"]
        else:
            certPath = os.path.join(context.stateDir, CERT_FILE)
            keyPath = os.path.join(context.stateDir, KEY_FILE)
            if tlscert.writeDevelopmentCertificate(certPath, keyPath):
                log.warn("mqtt.tls.certificate is empty: generated a self-signed development "
                         "certificate in {path}", path=certPath)
        return tlscert.serverOptions(certPath, keyPath)
    except Exception as e:
        raise ConfigError(key, f"cannot use the MQTT TLS certificate: {e}")


def build(context):
    cfg = context.settings["mqtt"]
    if not cfg["enabled"]:
        return None
    reactor = context.reactor
    auth = buildAuth(context, cfg)
    store = buildStore(context, cfg)
    server = MqttServer(reactor, context.core, auth, store, defaultHub=cfg["hub"],
                        maxQueued=cfg["max_queued_messages"],
                        otherFacesQos=cfg["qos_from_other_faces"],
                        serverTopic=cfg["server_topic"],
                        maxSessionExpiry=cfg["max_session_expiry"],
                        maxSubscriptions=cfg["max_subscriptions"],
                        maxPersistentSessions=cfg["max_persistent_sessions"],
                        maxRetained=cfg["max_retained_messages"],
                        maxRetainedBytes=cfg["max_retained_bytes"])
    if context.cluster is not None:
        ClusteredMqtt(reactor, server, context.cluster, store, context.core.engine)
    context.addService(Restorer(server))
    factory = MqttFactory(
        reactor, server, hub=cfg["hub"], maxPacketSize=cfg["max_packet_size"],
        maxOutputBuffer=cfg["max_output_buffer"], connectTimeout=cfg["connect_timeout"],
        maxKeepAlive=cfg["max_keep_alive"], receiveMaximum=cfg["receive_maximum"],
        topicAliasMaximum=cfg["topic_alias_maximum"],
        maxClientIdLength=cfg["max_client_id_length"], authTimeout=cfg["auth_timeout"],
        outboundTopicAliases=cfg["outbound_topic_aliases"],
        admission=AdmissionLimits({PER_HUB: cfg["max_connections_per_hub"],
                                   PER_USER: cfg["max_connections_per_user"],
                                   PER_ADDRESS: cfg["max_connections_per_address"]}),
        inboundRate=(cfg["max_inbound_messages_per_second"],
                     cfg["max_inbound_bytes_per_second"], cfg["inbound_burst"]))
    context.listen("mqtt.listen", cfg["listen"], factory, cfg["max_connections"])
    if cfg["tls"]["listen"]:
        from twisted.protocols.tls import TLSMemoryBIOFactory
        context.listen("mqtt.tls.listen", cfg["tls"]["listen"],
                       TLSMemoryBIOFactory(tlsOptions(context, cfg), False, factory),
                       cfg["max_connections"])
    ws = cfg["websocket"]
    if ws["listen"]:
        site = makeSite(factory, reactor, headerTimeout=ws["header_timeout"],
                        idleTimeout=ws["idle_timeout"],
                        stats=context.listeners.get("mqtt.websocket.listen"))
        context.listen("mqtt.websocket.listen", ws["listen"], site, ws["max_connections"])
    context.registry.register(MqttCollector(server))
    context.onDrain(factory.drain)
    if getattr(auth, "reloadable", False):
        context.onReload(auth.reload)
    return server


def listeners(settings):
    """
    The stream listeners L{build} opens, for the supervisor of worker
    processes (C{broker.plugins.IBrokerFace.listeners} once the faces are
    plugins; C{broker.plugins} is imported only then).
    """
    from broker.plugins import streamListeners
    cfg = settings["mqtt"]
    if not cfg["enabled"]:
        return []
    return (streamListeners("mqtt.listen", cfg["listen"])
            + streamListeners("mqtt.tls.listen", cfg["tls"]["listen"])
            + streamListeners("mqtt.websocket.listen", cfg["websocket"]["listen"]))
