# -*- test-case-name: tests.test_mqtt_websocket -*-
"""
MQTT over WebSocket (MQTT 5.0 section 6): binary frames, subprotocol
C{mqtt}, carrying the same byte stream as TCP, so a packet may span frames
and a frame may hold several packets: every binary frame is fed to an
L{broker.mqtt.protocol.MqttProtocol} as if it came from a socket.

Paths: C{/mqtt} serves the listener's hub; C{/clients/mqtt/hubs/{hub}} (the
path of Azure Web PubSub's MQTT endpoint) chooses the hub, and its
C{access_token} query parameter is handed to the authenticator as the
password when CONNECT carries none.
"""

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.web.resource import NoResource, Resource

from broker.config import HUB_NAME
from broker.core.directwrite import DirectOutput
from broker.mqtt.protocol import MqttProtocol
from broker.net.wsframe import serverFrame
from broker.net.http import BoundedSite, Routes
from broker.net.wscompact import CompactFactory, CompactProtocol

SUBPROTOCOLS = ("mqtt", "mqttv3.1")


class _Transport:
    """
    What the MQTT protocol writes to: binary WebSocket messages.  Producer
    calls go to the socket's transport, so the protocol's L{BoundedOutput}
    sees the peer stop reading as on TCP.
    """

    def __init__(self, ws):
        self.ws = ws
        self.transport = ws.transport

    def write(self, data):
        ws = self.ws
        if ws.state == WebSocketServerProtocol.STATE_OPEN:
            if ws._perMessageCompress is None and not ws.send_queue:
                # Straight to the socket (directwrite), past autobahn's logging.
                ws.writeDirect(serverFrame(data, True))
            else:
                ws.sendMessage(data, isBinary=True)

    def writeSequence(self, seq):
        self.write(b"".join(seq))

    def loseConnection(self):
        if self.ws.state == WebSocketServerProtocol.STATE_OPEN:
            self.ws.sendClose(1000)
        elif self.transport is not None:
            self.transport.loseConnection()

    def abortConnection(self):
        if self.transport is not None:
            self.transport.abortConnection()

    def pauseProducing(self):
        self.transport.pauseProducing()

    def resumeProducing(self):
        self.transport.resumeProducing()

    def registerProducer(self, producer, streaming):
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self):
        self.transport.unregisterProducer()

    def getPeer(self):
        return self.transport.getPeer()

    def getHost(self):
        return self.transport.getHost()


class MqttWebSocketProtocol(DirectOutput, CompactProtocol, WebSocketServerProtocol):
    mqtt = None
    # The hub and access token, between the handshake and the open.
    _mqttArgs = None
    compactDefaults = {"_mqttArgs": None}

    def writeBatch(self):
        return self.factory.mqtt.server.core.writeBatch

    def sendData(self, data, sync=False, chopsize=None):
        # Every other frame (pongs, close) after what was kept this turn.
        self.flushOutput()
        super().sendData(data, sync, chopsize)

    def onConnect(self, request):
        path = request.path.rstrip("/")
        f = self.factory
        if path == "/mqtt":
            hub = f.mqtt.hub
        elif path.startswith("/clients/mqtt/hubs/"):
            hub = path[len("/clients/mqtt/hubs/"):]
            if not HUB_NAME.match(hub):
                raise ConnectionDeny(400, "bad hub name")
        else:
            raise ConnectionDeny(404, "use /mqtt or /clients/mqtt/hubs/{hub}")
        chosen = next((p for p in request.protocols if p in SUBPROTOCOLS), None)
        if chosen is None:
            # MQTT-6.0.0-3/4.
            raise ConnectionDeny(400, "the mqtt subprotocol is required")
        token = (request.params.get("access_token") or [None])[0]
        self._mqttArgs = (hub, token)
        return chosen

    def onOpen(self):
        hub, token = self._mqttArgs
        self._mqttArgs = None
        # An idle WebSocket keeps little of its own (broker.net.wscompact).
        self.compact()
        self.mqtt = MqttProtocol(self.factory.mqtt, hub, token)
        self.mqtt.makeConnection(_Transport(self))

    def onMessage(self, payload, isBinary):
        mqtt = self.mqtt
        if mqtt is None:
            return
        if not isBinary:
            # MQTT-6.0.0-1: a text frame closes the connection.
            mqtt._bad(0x81, "text WebSocket frame")
            return
        mqtt.dataReceived(payload)

    def connectionLost(self, reason):
        mqtt, self.mqtt = self.mqtt, None
        super().connectionLost(reason)
        if mqtt is not None:
            mqtt.connectionLost(reason)


class MqttWebSocketFactory(CompactFactory, WebSocketServerFactory):
    protocol = MqttWebSocketProtocol

    def __init__(self, mqttFactory, reactor):
        super().__init__(reactor=reactor)
        self.mqtt = mqttFactory
        self.reactor = reactor
        size = mqttFactory.maxPacketSize + 16
        self.setProtocolOptions(maxFramePayloadSize=size, maxMessagePayloadSize=size,
                                autoPingInterval=0, openHandshakeTimeout=10,
                                closeHandshakeTimeout=1)


class _Hubs(Resource):
    def __init__(self, ws):
        super().__init__()
        self._ws = ws

    def getChild(self, name, request):
        if not name:
            return NoResource("use /clients/mqtt/hubs/{hub}")
        return self._ws


def makeSite(mqttFactory, reactor, headerTimeout=10.0, idleTimeout=60.0, stats=None):
    """The WebSocket listener's site: C{/mqtt} and C{/clients/mqtt/hubs/{hub}}."""
    ws = WebSocketResource(MqttWebSocketFactory(mqttFactory, reactor))
    root = Resource()
    root.putChild(b"mqtt", ws)
    clients = Resource()
    root.putChild(b"clients", clients)
    mqtt = Resource()
    clients.putChild(b"mqtt", mqtt)
    mqtt.putChild(b"hubs", _Hubs(ws))
    routes = Routes([(b"/mqtt", {b"GET": 0}), (b"/clients/mqtt/hubs", {b"GET": 0})])
    return BoundedSite(root, reactor=reactor, bodyLimit=routes, headerTimeout=headerTimeout,
                       idleTimeout=idleTimeout, stats=stats, name="mqtt.websocket")
