"""
The broker's built-in faces, registered as L{broker.plugins.IBrokerFace}
plugins the way an operator's package registers its own (docs/plugins.md).

Each object names its package (C{broker.<name>}: C{settings.SECTION},
C{face.build}, C{face.listeners}), imported only when the broker needs it,
so C{twistd --help} does not load the faces.
"""

from broker.plugins import PackageFace

webpubsub = PackageFace("webpubsub", 10, "Azure Web PubSub compatible WebSocket face and REST API")
ecdn = PackageFace("ecdn", 20, "eCDN on-premises API")
iot = PackageFace("iot", 30, "IoT concentrator: devices and centrals over TCP/TLS, UDP telemetry, HTTP API")
peergroups = PackageFace("peergroups", 40, "Peer groups: signed identities, records, direct connections")
