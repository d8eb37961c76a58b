# -*- test-case-name: tests.test_peergroups -*-
"""
Builds the peer-groups face from C{[peergroups]}: the SQLite store (the
cluster's Redis store when the broker is one node of a cluster), the
core service, the WebSocket site on each C{peergroups.listen} endpoint and
the length-prefixed JSON stream on each C{peergroups.tcp_listen} endpoint.
"""

import base64
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.config import ConfigError
from broker.core.limits import PER_ADDRESS, PER_HUB, PER_USER, AdmissionLimits
from broker.files import writePrivate
from broker.peergroups.adminview import PeerGroupsView
from broker.plugins import streamListeners
from broker.peergroups.cluster import PeerGroupsCluster
from broker.peergroups.core import PeerGroups
from broker.peergroups.metrics import PeerGroupsCollector
from broker.peergroups.protocol import PeerStreamFactory, PeerWebSocketFactory, makeSite
from broker.peergroups.redisstore import RedisPeerGroupStore
from broker.peergroups.store import SQLitePeerGroupStore

ISSUER_KEY_FILE = "peergroups-issuer.key"
EXPORT_KEY_FILE = "peergroups-export.key"


def _secretFile(path, make):
    """
    Read the secret at C{path}, or write C{make()} there (mode 0600).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data.strip():
            return data
    except FileNotFoundError:
        pass
    data = make()
    writePrivate(path, data)
    return data


def brokerKeys(stateDir):
    """
    The broker's own secrets for this face, generated at first start: the
    Ed25519 key that signs password joiners' certificates and the HMAC key
    that seals database exports.
    """
    pem = _secretFile(os.path.join(stateDir, ISSUER_KEY_FILE), lambda: (
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())))
    issuer = serialization.load_pem_private_key(pem, None)
    if not isinstance(issuer, Ed25519PrivateKey):
        raise ValueError(f"{ISSUER_KEY_FILE} is not an Ed25519 key")
    export = _secretFile(os.path.join(stateDir, EXPORT_KEY_FILE),
                         lambda: base64.b64encode(os.urandom(32)) + b"\n")
    return issuer, base64.b64decode(export.strip())


def makePeerGroups(reactor, core, cfg, stateDir, clock=None, cluster=None):
    """
    The store and the core service from the C{[peergroups]} table (neither
    started).  With a C{cluster} (L{broker.cluster.node.Cluster}) the store
    is the cluster's Redis and the service is linked to the other nodes
    (L{broker.peergroups.cluster}); C{peergroups.store} is then unused.
    """
    if cfg["keepalive_timeout"] <= cfg["keepalive_interval"]:
        raise ConfigError("peergroups.keepalive_timeout",
                          "must be longer than peergroups.keepalive_interval")
    path = cfg["store"]
    if path != ":memory:" and not os.path.isabs(path):
        path = os.path.join(stateDir, path)
    try:
        issuer, exportKey = brokerKeys(stateDir)
    except (OSError, ValueError) as e:
        raise ConfigError("broker.state_dir", f"cannot keep the peer-groups keys there: {e}")
    if cluster is not None:
        store = RedisPeerGroupStore(cluster)
    else:
        store = SQLitePeerGroupStore(reactor, path)
    pg = PeerGroups(
        reactor, store, core=core, clock=clock, issuerKey=issuer, exportKey=exportKey,
        maxRecordSize=cfg["max_record_size"], maxDataSize=cfg["max_data_size"],
        keepaliveInterval=cfg["keepalive_interval"],
        keepaliveTimeout=cfg["keepalive_timeout"], sweepInterval=cfg["sweep_interval"],
        maxOutputBuffer=cfg["max_output_buffer"],
        passwordFailuresPerMinute=cfg["password_failures_per_minute"],
        applications=cfg["applications"], creators=cfg["creators"],
        maxGroupsPerCreator=cfg["max_groups_per_creator"],
        maxRecordsPerGroup=cfg["max_records_per_group"],
        maxMessageSize=cfg["max_message_size"], maxImportSize=cfg["max_import_size"],
        maxCursorsPerSession=cfg["max_cursors_per_session"],
        cursorTimeout=cfg["cursor_timeout"])
    pg.admission = AdmissionLimits({PER_HUB: cfg["max_connections_per_application"],
                                    PER_USER: cfg["max_connections_per_identity"],
                                    PER_ADDRESS: cfg["max_connections_per_address"]})
    pg.inboundRate = (cfg["max_inbound_messages_per_second"],
                      cfg["max_inbound_bytes_per_second"], cfg["inbound_burst"])
    if cluster is not None:
        PeerGroupsCluster(pg, cluster)
    return store, pg


def build(context):
    cfg = context.settings["peergroups"]
    if not cfg["enabled"]:
        return
    store, pg = makePeerGroups(context.reactor, context.core, cfg, context.stateDir,
                               cluster=context.cluster)
    context.addService(store)
    context.addService(pg)
    context.registry.register(PeerGroupsCollector(pg))
    context.addAdminView(PeerGroupsView(pg))
    context.onDrain(pg.drain)
    ws = PeerWebSocketFactory(pg, cfg["max_message_size"], reactor=context.reactor)
    site = makeSite(ws, headerTimeout=cfg["header_timeout"], idleTimeout=cfg["idle_timeout"],
                    stats=context.listeners.get("peergroups.listen"))
    context.listen("peergroups.listen", cfg["listen"], site, cfg["max_connections"])
    context.listen("peergroups.tcp_listen", cfg["tcp_listen"],
                   PeerStreamFactory(pg, cfg["max_message_size"]), cfg["tcp_max_connections"])


def listeners(settings):
    """
    The listeners L{build} opens (L{broker.plugins.IBrokerFace.listeners}).
    """
    cfg = settings["peergroups"]
    if not cfg["enabled"]:
        return []
    return (streamListeners("peergroups.listen", cfg["listen"])
            + streamListeners("peergroups.tcp_listen", cfg["tcp_listen"]))
