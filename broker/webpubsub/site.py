# -*- test-case-name: tests.test_webpubsub -*-
"""
The Web PubSub HTTP site: one port for the client WebSocket endpoint
(C{/client/hubs/{hub}}) and, as the Azure SDKs expect, the REST API beside it.
"""

import json

from autobahn.twisted.resource import WebSocketResource
from twisted.web.resource import NoResource, Resource

from broker.core.limits import PER_ADDRESS, PER_HUB, PER_USER, AdmissionLimits
from broker.net.http import METHOD_NOT_ALLOWED, BoundedSite, Routes
from broker.webpubsub import redishistory
from broker.webpubsub.history import installHistory
from broker.webpubsub.hubsettings import FaceSettings, HubSettings
from broker.webpubsub.factory import ClientFactory
from broker.webpubsub.rest import RestAPI


class _Hubs(Resource):
    """
    C{/client/hubs/}: every child is the same WebSocket resource; the
    protocol reads the hub name from the request path.
    """

    def __init__(self, wsResource):
        super().__init__()
        self._ws = wsResource

    def getChild(self, name, request):
        if not name:
            return NoResource("use /client/hubs/{hub}")
        return self._ws


def makeFactory(core, cfg, defaultKeys, reactor, cluster=None):
    """
    Build the L{ClientFactory} from the C{[webpubsub]} configuration table.

    @param defaultKeys: the access keys for hubs with none of their own.
    @param cluster: the L{broker.cluster.node.Cluster} in cluster mode:
        group history and reliable connections are then shared through
        Redis (L{broker.webpubsub.redishistory}, L{broker.webpubsub.handover}).
    """
    settings = faceSettings(cfg, defaultKeys)
    groupLimits = installGroupLimits(core, cfg)
    if cluster is None:
        installHistory(core, cfg["hubs"], core.reactor.seconds)
    else:
        redishistory.install(core, cfg["hubs"], cluster)
    factory = ClientFactory(
        core, settings.hubs, settings.default, audiences=settings.audiences,
        maxFrameSize=cfg["max_frame_size"], maxOutputBuffer=cfg["max_output_buffer"],
        autoPingInterval=cfg["auto_ping_interval"], autoPingTimeout=cfg["auto_ping_timeout"],
        reactor=reactor, recoveryWindow=cfg["recovery_window"], cluster=cluster,
        maxEventsInFlight=cfg["max_events_in_flight"],
        admission=admissionLimits(cfg),
        inboundRate=inboundRate(cfg),
    )
    factory.groupLimits = groupLimits
    return factory


def faceSettings(cfg, defaultKeys):
    """
    The L{FaceSettings} of the C{[webpubsub]} table: each configured hub's
    own, resolved against the face-wide ones, and the default for any other.
    """
    hubs = {}
    for name, h in cfg["hubs"].items():
        hubs[name] = HubSettings(
            accessKeys=h["access_keys"] or defaultKeys,
            allowAnonymous=h["allow_anonymous"],
            plainMode=h["plain_mode"],
            plainGroup=h["plain_group"],
            anonymousRoles=h["anonymous_roles"],
        )
    return FaceSettings(hubs, HubSettings(accessKeys=defaultKeys), cfg["audiences"])


def inboundRate(cfg):
    """
    C{(messages, bytes, burst)}: one connection's inbound rate limits.
    """
    return (cfg["max_inbound_messages_per_second"], cfg["max_inbound_bytes_per_second"],
            cfg["inbound_burst"])


def admissionLimits(cfg):
    """
    The face's L{AdmissionLimits}: C{[webpubsub]}'s, with the hubs' own
    C{max_connections_per_hub}.
    """
    return AdmissionLimits(*admissionArguments(cfg))


def admissionArguments(cfg):
    """
    C{(limits, overrides)} for L{AdmissionLimits} (or its C{configure}).
    """
    perHub = {name: h["max_connections_per_hub"] for name, h in cfg["hubs"].items()
              if h["max_connections_per_hub"] is not None}
    return ({PER_HUB: cfg["max_connections_per_hub"],
             PER_USER: cfg["max_connections_per_user"],
             PER_ADDRESS: cfg["max_connections_per_address"]},
            {PER_HUB: perHub})


class GroupLimits:
    """
    Gives every hub (Web PubSub clients also subscribe to the IoT fleets'
    hubs) the face's group limits, a hub's own C{max_groups_per_hub} first:
    each hub as it is created (C{core.onNewHub}), and every existing one
    again on L{update} (a reload), for the joins that follow.
    """

    def __init__(self, core, cfg):
        self.core = core
        self.cfg = cfg

    def __call__(self, hub):
        cfg = self.cfg
        own = cfg["hubs"].get(hub.name)
        if hub.face == "core":
            # Unless another face serves it (a peer-groups application).
            hub.face = "webpubsub"
        hub.maxGroupsPerConnection = cfg["max_groups_per_connection"]
        hub.maxGroups = cfg["max_groups_per_hub"]
        if own is not None and own["max_groups_per_hub"] is not None:
            hub.maxGroups = own["max_groups_per_hub"]
        hub.maxGroupNameLength = cfg["max_group_name_length"]

    def update(self, cfg):
        self.cfg = cfg
        for hub in list(self.core.hubs.values()):
            self(hub)


def installGroupLimits(core, cfg):
    """
    Install L{GroupLimits} for C{cfg} on every hub, existing and future.
    """
    limits = GroupLimits(core, cfg)
    core.onNewHub(limits)
    return limits


def refusal(request, status, reason, message):
    """
    A refused body or method in the REST API's error shape (the SDKs read
    C{x-ms-error-code}); the WebSocket path answers the same.
    """
    code = "MethodNotAllowed" if reason == METHOD_NOT_ALLOWED else "PayloadTooLarge"
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"x-ms-error-code", code.encode("ascii"))
    return json.dumps({"code": code, "message": message}).encode("utf-8")


def makeSite(factory, headerTimeout=10.0, idleTimeout=60.0, stats=None):
    """
    The Web PubSub site: the client WebSocket endpoint (no request body)
    and the REST API, whose POSTs may carry one message (at most
    C{max_frame_size} bytes).

    @param stats: the listener's L{broker.net.listeners.ListenerStats}.
    """
    root = Resource()
    client = Resource()
    root.putChild(b"client", client)
    client.putChild(b"hubs", _Hubs(WebSocketResource(factory)))
    rest = RestAPI(factory.core, factory.hubSettings, lambda: factory.audiences,
                   maxBodySize=factory.maxMessagePayloadSize)
    root.putChild(b"api", rest)
    routes = Routes([
        (b"/client/hubs", {b"GET": 0}),
        (b"/api", {b"POST": factory.maxMessagePayloadSize, b"PUT": 0, b"DELETE": 0,
                   b"GET": 0, b"HEAD": 0}),
    ])
    # The REST API's plain requests take the lean path (broker.net.fasthttp);
    # WebSocket upgrades and the rest, twisted.web.
    site = BoundedSite(root, reactor=factory.reactor, bodyLimit=routes, refusal=refusal,
                       headerTimeout=headerTimeout, idleTimeout=idleTimeout, stats=stats,
                       name="webpubsub.listen", fast=[((b"api",), rest)])
    site.restAPI = rest
    return site
