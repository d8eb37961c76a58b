# -*- test-case-name: tests.test_webpubsub -*-
"""
The factory of the Web PubSub client face's connections
(L{broker.webpubsub.protocol.ClientProtocol}): what they share (the core,
hub settings, the reliable links, limits) and the encoders of the frames a
fan-out prepares once for every connection of a wire format.
"""

from autobahn.twisted.websocket import WebSocketServerFactory

from broker.core.drain import LiveConnections
from broker.core.limits import AdmissionLimits, InboundLimiter
from broker.net.wscompact import CompactFactory
from broker.net.wsframe import PreparedFrame
from broker.webpubsub import frames, subprotocols
from broker.webpubsub.hubsettings import FaceSettings
from broker.webpubsub.protocol import ClientProtocol
from broker.webpubsub.reliable import ReliableLinks


class ClientFactory(CompactFactory, WebSocketServerFactory):
    """
    Builds L{ClientProtocol}s and holds what they share: the core, hub
    settings, limits and the prepared-frame encoders.
    """

    protocol = ClientProtocol

    def __init__(self, core, hubSettings, defaultSettings, audiences=(),
                 maxFrameSize=1024 * 1024, maxOutputBuffer=4 * 1024 * 1024,
                 autoPingInterval=30.0, autoPingTimeout=30.0, reactor=None,
                 recoveryWindow=30.0, cluster=None, maxEventsInFlight=16, admission=None,
                 inboundRate=(0, 0, 2.0)):
        super().__init__(reactor=reactor)
        self.core = core
        self.maxEventsInFlight = maxEventsInFlight
        self.connections = LiveConnections()
        # Connections per hub, user and address (none by default here;
        # makeFactory passes the configured ones).
        self.admission = admission if admission is not None else AdmissionLimits({})
        self.inboundRate = inboundRate
        if cluster is None:
            self.links = ReliableLinks(self.reactor, recoveryWindow, maxOutputBuffer)
        else:
            from broker.webpubsub.handover import ClusterLinks
            self.links = ClusterLinks(self.reactor, recoveryWindow, maxOutputBuffer, core,
                                      cluster)
        self.settings = FaceSettings(hubSettings, defaultSettings, audiences)
        self.maxOutputBuffer = maxOutputBuffer
        self.setProtocolOptions(
            maxFramePayloadSize=maxFrameSize,
            maxMessagePayloadSize=maxFrameSize,
            autoPingInterval=autoPingInterval or 0,
            autoPingTimeout=autoPingTimeout or 0,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
            failByDrop=False,
        )

    def hubSettings(self, hubName):
        return self.settings.hub(hubName)

    @property
    def audiences(self):
        return self.settings.audiences

    def drain(self):
        """
        Tell every client the broker is stopping; a Deferred firing once
        they have all gone (see L{broker.faces.FaceContext.onDrain}).
        """
        for protocol in self.connections:
            protocol.goingAway()
        return self.connections.whenEmpty()

    def inboundLimiter(self):
        """
        A new connection's L{InboundLimiter}, or C{None} without limits.
        """
        messages, octets, burst = self.inboundRate
        return InboundLimiter.build(self.reactor.seconds, messages, octets, burst,
                                    minBytes=self.maxMessagePayloadSize)

    def rejected(self, hubName):
        """
        Count a refused handshake against its hub, if the hub exists:
        unauthenticated clients must not be able to create hubs.
        """
        self.core.countRejected(hubName)

    def prepareMessage(self, payload, isBinary=False, doNotCompress=False):
        # autobahn's PreparedMessage costs more than the rest of the encoding.
        return PreparedFrame(payload, isBinary, doNotCompress)

    def prepareJSON(self, delivery):
        return self.prepareMessage(frames.messageFrame(delivery), False)

    def preparer(self, codec):
        """
        The encoder of deliveries to C{codec}'s clients (see L{deliver}):
        its message frame, prepared; one object per codec, which every
        connection of the codec shares.
        """
        try:
            return self._preparers[codec]
        except KeyError:
            pass
        except AttributeError:
            self._preparers = {}
        preparer = self._preparers[codec] = self._newPreparer(codec)
        return preparer

    def _newPreparer(self, codec):
        if codec is None:
            return self.preparePlain
        if codec is subprotocols.JSON:
            return self.prepareJSON
        messageFrame, binary = codec.messageFrame, codec.binary
        return lambda delivery: self.prepareMessage(messageFrame(delivery), binary)

    def preparePlain(self, delivery):
        msg = delivery.message
        return self.prepareMessage(msg.data, msg.isBinary)
