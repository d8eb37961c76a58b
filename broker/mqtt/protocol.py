# -*- test-case-name: tests.test_mqtt_protocol -*-
"""
The MQTT protocol adapter: one client's network connection (TCP, TLS, or
a WebSocket through L{broker.mqtt.websocket}), MQTT 3.1.1 or 5.0.

Thin on purpose: it decodes packets (L{broker.mqtt.codec}), enforces the
connection's bounds (packet size, inbound rate, output buffer, keep alive)
and hands everything else to the L{broker.mqtt.server.MqttServer} and the
session (L{broker.mqtt.session.MqttSession}).
"""

import secrets

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from broker.core.drain import LiveConnections
from broker.core.limits import PER_ADDRESS, PER_HUB, PER_USER, InboundLimiter, peerHost
from broker.core.directwrite import DirectOutput, noDelay
from broker.core.output import BoundedOutput
from broker.mqtt import codec
from broker.mqtt.interfaces import MqttAuthError
from broker.mqtt.topics import TopicError, checkTopicName

log = Logger()

FACE = "mqtt"
MAX_TOPIC_LENGTH = 1024      # the core's longest group name

AWAIT_CONNECT, AUTHENTICATING, CONNECTED, CLOSED = range(4)


def _checkResponseTopic(properties):
    """A response topic is a topic name: no wildcards (MQTT-3.3.2-14)."""
    topic = properties.get("response_topic")
    if topic is not None and ("+" in topic or "#" in topic):
        raise codec.ProtocolError("wildcard in the response topic")


class MqttFactory(Factory):
    """
    Everything the connections of the face share: the server, the
    limits, the counters (on C{server.counters}) and the open connections
    (for the drain).
    """

    def __init__(self, reactor, server, hub="mqtt", maxPacketSize=1024 * 1024,
                 maxOutputBuffer=4 * 1024 * 1024, connectTimeout=10.0, maxKeepAlive=0,
                 receiveMaximum=64, topicAliasMaximum=16, maxClientIdLength=256,
                 admission=None, inboundRate=None, authTimeout=10.0,
                 outboundTopicAliases=True):
        self.reactor = reactor
        self.server = server
        self.hub = hub
        self.maxPacketSize = maxPacketSize
        self.maxOutputBuffer = maxOutputBuffer
        self.connectTimeout = connectTimeout
        self.maxKeepAlive = maxKeepAlive
        self.receiveMaximum = receiveMaximum
        self.topicAliasMaximum = topicAliasMaximum
        self.maxClientIdLength = maxClientIdLength
        self.admission = admission
        self.inboundRate = inboundRate
        self.authTimeout = authTimeout
        self.outboundTopicAliases = outboundTopicAliases
        self.live = LiveConnections()

    def buildProtocol(self, addr):
        p = MqttProtocol(self, self.hub)
        p.factory = self
        return p

    def drain(self):
        """SIGTERM: every client told 0x8B (5.0) and closed."""
        for p in self.live:
            p.disconnect(codec.SERVER_SHUTTING_DOWN, "server shutting down")
        return self.live.whenEmpty()


class MqttProtocol(DirectOutput, BoundedOutput, Protocol):
    """
    @ivar hub: the hub this connection's listener (or WebSocket path) chose.
    @ivar token: an access token from the WebSocket URL (C{access_token}),
        given to the authenticator as the password when CONNECT has none.
    """

    state = AWAIT_CONNECT
    session = None
    version = codec.V311
    _graceful = False

    def __init__(self, factory, hub, token=None):
        self.factory = factory
        self.hub = hub
        self.token = token
        self._reader = codec.PacketReader(factory.maxPacketSize)
        self._held = []
        self._aliases = {}
        self._acks = []
        self._ticket = None
        self._timer = None
        self._authCall = None
        self._rate = None
        self._lastSeen = 0.0
        self._keepAlive = 0
        self.clientMaxPacket = 1 << 28
        self._inboundPending = 0
        self._backlog = None
        # 5.0 topic aliases towards the client: topic -> alias, the first
        # topic_alias_maximum topics it is sent (MQTT-3.3.2-11: never more).
        self._outAliasMax = 0
        self._outAliases = {}
        self._counters = factory.server.counters

    # -- connection life ------------------------------------------------------

    def connectionMade(self):
        f = self.factory
        f.live.add(self)
        noDelay(self.transport)
        self.registerAsProducer(self.transport)
        if f.admission is not None:
            ticket, refused = f.admission.admit([(PER_ADDRESS, peerHost(self.transport))])
            if ticket is None:
                self._refusedAdmission("", refused)
                return
            self._ticket = ticket
        if f.inboundRate is not None:
            self._rate = InboundLimiter.build(f.reactor.seconds, *f.inboundRate,
                                              minBytes=f.maxPacketSize)
        self._lastSeen = f.reactor.seconds()
        self._timer = f.reactor.callLater(f.connectTimeout, self._connectTimedOut)

    def _connectTimedOut(self):
        self._timer = None
        if self.state == AWAIT_CONNECT:
            self._counters["connect_timeouts"] += 1
            self.abort()

    def connectionLost(self, reason):
        self.state = CLOSED
        f = self.factory
        for name in ("_timer", "_authCall"):
            call = getattr(self, name)
            setattr(self, name, None)
            if call is not None and call.active():
                call.cancel()
        if self._rate is not None:
            self._rate.stop()
        if self._ticket is not None:
            self._ticket.release()
            self._ticket = None
        session, self.session = self.session, None
        if session is not None:
            f.server.detach(session, self, self._graceful)
        f.live.discard(self)
        super().connectionLost(reason)

    def memoryReleaser(self):
        return self.factory.server.core.memory

    def abort(self):
        self.state = CLOSED
        self.transport.abortConnection()

    def disconnect(self, reasonCode, reason=""):
        """
        The broker ends the connection: a 5.0 client is told why
        (DISCONNECT with C{reasonCode}) where a DISCONNECT is allowed.
        """
        if self.state == CLOSED:
            return
        if self.state == CONNECTED and self.version == codec.V5:
            data = codec.encodeDisconnect(reasonCode)
            if reason:
                # The reason string only if the client's maximum packet
                # size allows it (MQTT-3.14.2-3).
                withReason = codec.encodeDisconnect(reasonCode, {"reason_string": reason})
                if len(withReason) <= self.clientMaxPacket:
                    data = withReason
            self.writeDirect(data)
        self.state = CLOSED
        self.flushOutput()
        self.transport.loseConnection()

    def takenOver(self):
        """Another connection took this client's session (MQTT-3.1.4-3)."""
        self._counters["takeovers"] += 1
        self.session = None
        self.disconnect(codec.SESSION_TAKEN_OVER, "session taken over")

    def protocolError(self, message, code=codec.PROTOCOL_ERROR):
        self._bad(code, message)

    def _bad(self, code, message):
        """A malformed packet or a protocol error: counted, logged quietly, closed."""
        name = "malformed" if code == codec.MALFORMED_PACKET else (
            "too_large" if code == codec.PACKET_TOO_LARGE else "protocol_errors")
        self._counters[name] += 1
        self.factory.server.quietLog.info(
            (FACE, name), "mqtt: closing {peer}: {message}", peer=peerHost(self.transport),
            message=message)
        self.disconnect(code, message)

    def _refusedAdmission(self, hub, reason):
        core = self.factory.server.core
        core.limits.refused(FACE, core.hubLabel(hub), reason)
        core.quietLog.info((FACE, "admission", reason),
                           "mqtt: connection refused ({reason})", reason=reason)
        self.abort()

    # -- writing ------------------------------------------------------------

    def write(self, data):
        if self.state == CLOSED or self.overLimit(len(data), self.factory.maxOutputBuffer):
            return
        self.writeDirect(data)

    def writeBatch(self):
        return self.factory.server.core.writeBatch

    def sendTemplate(self, template, packetId, dup=False):
        """
        Write a PUBLISH; C{False} if it is larger than the client's
        maximum packet size (not sent, MQTT-3.1.2-24).
        """
        if self._outAliasMax and template.topic:
            alias = self._outAliases.get(template.topic)
            if alias is not None:
                template = template.aliased(alias, False)
            elif len(self._outAliases) < self._outAliasMax:
                alias = self._outAliases[template.topic] = len(self._outAliases) + 1
                template = template.aliased(alias, True)
        if template.size > self.clientMaxPacket:
            self._counters["too_large_for_client"] += 1
            return False
        self.write(template.bytes(packetId, dup))
        return True

    def slowConsumer(self):
        server = self.factory.server
        self._counters["slow_consumers"] += 1
        core = self.session.core if self.session is not None else None
        if core is not None:
            # Counted on the hub the session is in, as Web PubSub counts it.
            core.hub.stats.slowConsumerDrops += 1
        server.quietLog.info((FACE, "slow consumer"),
                             "mqtt: dropping {peer}: more than {n} bytes waited for it",
                             peer=peerHost(self.transport), n=self.factory.maxOutputBuffer)
        self.abort()

    # -- reading ------------------------------------------------------------

    def dataReceived(self, data):
        if self.state == CLOSED:
            return
        if data[0] == 0x40 and self.state == CONNECTED and self._backlog is None \
                and not self._reader._buffer and self._pubacksOnly(data):
            return
        try:
            packets = self._reader.feed(data)
        except codec.PacketTooLarge as e:
            return self._bad(codec.PACKET_TOO_LARGE, f"packet of {e.args[0]} bytes")
        except codec.MalformedPacket as e:
            return self._bad(codec.MALFORMED_PACKET, str(e))
        self._lastSeen = self.factory.reactor.seconds()
        if self._backlog is not None:
            # Held over the inbound rate: what was read meanwhile waits
            # (at most one socket read: reading is paused).
            self._backlog.extend(packets)
            return
        self._run(packets)

    def _pubacksOnly(self, data):
        """
        The common read of a QoS 1 subscriber, whole PUBACKs of a packet
        identifier each (C{40 02 hi lo}) and nothing else: each goes to the
        session at once, without the packet reader (what C{_puback} does
        for one).  C{False}, having done nothing, for anything else.
        """
        n = len(data)
        if n & 3:
            return False
        for i in range(0, n, 4):
            if data[i] != 0x40 or data[i + 1] != 2:
                return False
        self._lastSeen = self.factory.reactor.seconds()
        acked = self.session.acked
        for i in range(0, n, 4):
            acked(codec.PUBACK, (data[i + 2] << 8) | data[i + 3])
            if self.state == CLOSED:
                break
        return True

    def _run(self, packets):
        """
        Handle C{packets} in order; a PUBLISH over the inbound rate stops
        the run: reading is paused and the rest kept until the bucket has
        room (MQTT has no way to drop a QoS 1/2 message, so the client is
        slowed down, never refused).
        """
        rate = self._rate
        for i, packet in enumerate(packets):
            if self.state == CLOSED:
                return
            if self.state == AUTHENTICATING:
                self._held.append(packet)
                continue
            if rate is not None and packet[0] == codec.PUBLISH and self.state == CONNECTED:
                size = len(packet[2])
                if rate.check(size):
                    rate.dropped = 0
                    core = self.factory.server.core
                    core.limits.limited(FACE, self.session.hubName, "held")
                    self._backlog = list(packets[i:])
                    rate.holdReading(self.factory.reactor, size, self.transport.pauseProducing,
                                     self._unhold)
                    return
            self._packet(packet)

    def _unhold(self):
        backlog, self._backlog = self._backlog, None
        if self.state == CLOSED:
            return
        self.transport.resumeProducing()
        self._run(backlog)

    def _packet(self, packet):
        type, flags, body = packet
        try:
            if self.state == AWAIT_CONNECT:
                if type != codec.CONNECT:
                    raise codec.ProtocolError("the first packet must be CONNECT")  # 3.1.0-1
                return self._connect(flags, body)
            handler = self._handlers.get(type)
            if handler is None:
                raise codec.ProtocolError(f"unexpected packet type {type}")
            handler(self, flags, body)
        except (codec.MalformedPacket, codec.ProtocolError) as e:
            self._bad(e.reasonCode, str(e))
        except Exception:
            log.failure("mqtt: handling a packet of type {type}", type=type)
            self._counters["internal_errors"] += 1
            self.disconnect(codec.IMPLEMENTATION_SPECIFIC_ERROR)

    # -- CONNECT --------------------------------------------------------------

    def _connect(self, flags, body):
        f = self.factory
        try:
            c = codec.decodeConnect(flags, body)
        except codec.UnsupportedVersion:
            self._counters["bad_version"] += 1
            # MQTT-3.1.2-2: CONNACK return code 1 (the 3.1.1 format every
            # version reads), then close.
            self.writeDirect(b"\x20\x02\x00\x01")
            self.state = CLOSED
            self.flushOutput()
            self.transport.loseConnection()
            return
        self.version = c.version
        self._connectPacket = c
        v5 = c.version == codec.V5
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        clientId = c.clientId
        self._assigned = False
        if not clientId:
            if not v5 and not c.cleanStart:
                return self._refuse(codec.CLIENT_IDENTIFIER_NOT_VALID)     # MQTT-3.1.3-8
            clientId = "auto-" + secrets.token_hex(12)
            self._assigned = True
        if len(clientId) > f.maxClientIdLength:
            return self._refuse(codec.CLIENT_IDENTIFIER_NOT_VALID)
        props = c.properties
        if props.get("receive_maximum") == 0 or props.get("maximum_packet_size") == 0:
            raise codec.ProtocolError("receive maximum or maximum packet size 0")
        if "authentication_method" in props:
            return self._refuse(codec.BAD_AUTHENTICATION_METHOD)
        self.clientMaxPacket = props.get("maximum_packet_size", 1 << 28)
        if f.outboundTopicAliases:
            self._outAliasMax = props.get("topic_alias_maximum", 0)
        if c.will is not None:
            _checkResponseTopic(c.will.properties)
            try:
                checkTopicName(c.will.topic, MAX_TOPIC_LENGTH)
            except TopicError:
                return self._refuse(codec.TOPIC_NAME_INVALID if v5 else
                                    codec.UNSPECIFIED_ERROR)
        self.clientId = clientId
        self.state = AUTHENTICATING
        self.transport.pauseProducing()
        password = c.password
        if password is None and self.token is not None:
            password = self.token.encode("utf-8")
        server = f.server
        d = defer.maybeDeferred(server.auth.authenticate, clientId, c.username, password,
                                self.hub)
        self._authCall = f.reactor.callLater(f.authTimeout, d.cancel)
        d.addCallbacks(self._authenticated, self._authFailed)
        d.addErrback(self._internal)

    def _refuse(self, reasonCode, properties=None):
        """CONNACK with a failure code, then close (MQTT-3.2.2-7)."""
        self._counters["connect_refused"] += 1
        self.writeDirect(codec.encodeConnack(self.version, False, reasonCode, properties))
        self.state = CLOSED
        self.flushOutput()
        self.transport.loseConnection()

    def _stopAuthTimer(self):
        call, self._authCall = self._authCall, None
        if call is not None and call.active():
            call.cancel()

    def _authFailed(self, failure):
        self._stopAuthTimer()
        if self.state == CLOSED:
            return
        if failure.check(MqttAuthError):
            self._counters["auth_failures"] += 1
            code = failure.value.reasonCode
            if self.version != codec.V5:
                code = {4: codec.BAD_USER_NAME_OR_PASSWORD,
                        5: codec.NOT_AUTHORIZED}.get(failure.value.returnCode311,
                                                     codec.NOT_AUTHORIZED)
            return self._refuse(code)
        if failure.check(defer.CancelledError):
            self._counters["auth_timeouts"] += 1
            return self._refuse(codec.SERVER_UNAVAILABLE if self.version == codec.V5
                                else codec.SERVER_UNAVAILABLE)
        log.failure("mqtt: authenticating {client}", failure, client=self.clientId)
        self._refuse(codec.UNSPECIFIED_ERROR if self.version == codec.V5
                     else codec.SERVER_UNAVAILABLE)

    def _internal(self, failure):
        log.failure("mqtt: completing a CONNECT", failure)
        self._counters["internal_errors"] += 1
        if self.state != CLOSED:
            self.abort()

    def _authenticated(self, identity):
        self._stopAuthTimer()
        if self.state == CLOSED:
            return
        f = self.factory
        server = f.server
        c = self._connectPacket
        v5 = c.version == codec.V5
        hub = identity.hub or self.hub
        if f.admission is not None:
            claims = [(PER_HUB, hub)]
            if identity.userId is not None:
                claims.append((PER_USER, (hub, identity.userId)))
            ticket, refused = f.admission.admit(claims, self._ticket)
            if ticket is None:
                core = server.core
                core.limits.refused(FACE, core.hubLabel(hub), refused)
                return self._refuse(codec.QUOTA_EXCEEDED if v5 else codec.SERVER_UNAVAILABLE)
        if server.clustered is not None and (hub, self.clientId) not in server.sessions:
            # Cluster mode: the session may be held by another node, which
            # lets it go first (L{broker.mqtt.clustered}); packets that
            # come meanwhile wait, as during authentication.
            d = server.clustered.prepare(hub, self.clientId, c.cleanStart)
            d.addCallbacks(lambda _: self._attach(identity, hub), self._prepareFailed)
            d.addErrback(self._internal)
            return
        self._attach(identity, hub)

    def _prepareFailed(self, failure):
        """The cluster could not say who holds the session: refused, 0x88 / 3."""
        self._counters["cluster_unavailable"] += 1
        self.factory.server.quietLog.info(
            (FACE, "cluster connect"), "mqtt: a CONNECT refused: the cluster could not "
            "hand the session over: {why}", why=failure.getErrorMessage())
        if self.state != CLOSED:
            self._refuse(codec.SERVER_UNAVAILABLE)

    def _attach(self, identity, hub):
        if self.state == CLOSED:
            return
        f = self.factory
        server = f.server
        c = self._connectPacket
        v5 = c.version == codec.V5
        held = server.sessions.get((hub, self.clientId))
        if held is not None and held.userId is not None and held.userId != identity.userId:
            # Another user's client id: neither its connection nor its
            # session may be taken (a take-over would let any user cut any
            # other off).
            self._counters["client_id_of_other_user"] += 1
            return self._refuse(codec.CLIENT_IDENTIFIER_NOT_VALID)
        if not server.mayPersist(c, hub, self.clientId):
            self._counters["persistent_sessions_refused"] += 1
            server.quietLog.info((FACE, "persistent sessions"),
                                 "mqtt: a persistent session refused: {n} exist",
                                 n=server.maxPersistentSessions)
            return self._refuse(codec.QUOTA_EXCEEDED if v5 else codec.SERVER_UNAVAILABLE)
        session, present = server.connect(self, c, identity, hub, self.clientId)
        self.session = session
        keepAlive = c.keepAlive
        props = {}
        if v5:
            if f.maxKeepAlive and (keepAlive == 0 or keepAlive > f.maxKeepAlive):
                keepAlive = f.maxKeepAlive
                props["server_keep_alive"] = keepAlive
            props["receive_maximum"] = f.receiveMaximum
            props["maximum_packet_size"] = f.maxPacketSize
            props["topic_alias_maximum"] = f.topicAliasMaximum
            if self._assigned:
                props["assigned_client_identifier"] = self.clientId
            asked = c.properties.get("session_expiry_interval", 0)
            if asked != session.expiryInterval:
                props["session_expiry_interval"] = session.expiryInterval
        connack = self._fitConnack(c.version, present and not c.cleanStart, props)
        if connack is None:
            # Not even the CONNACK fits the client's maximum packet size
            # (MQTT-3.1.2-24): closed unanswered, as a failed CONNECT.
            self._counters["too_large_for_client"] += 1
            session.will = None
            self._graceful = True
            self.abort()
            return
        self._keepAlive = keepAlive
        self.state = CONNECTED
        self._counters["connections"] += 1
        self.writeDirect(connack)
        if keepAlive:
            self._timer = f.reactor.callLater(keepAlive * 1.5, self._keepAliveCheck)
        self.transport.resumeProducing()
        session.resend()
        held, self._held = self._held, []
        for packet in held:
            if self.state != CONNECTED:
                break
            self._packet(packet)

    # What a CONNACK may leave out for a client with a tiny maximum packet
    # size: the broker's own bounds, which it enforces anyway (0x93, 0x95;
    # a client not told the topic alias maximum sends no alias).
    _OPTIONAL_CONNACK = ("topic_alias_maximum", "receive_maximum", "maximum_packet_size")

    def _fitConnack(self, version, sessionPresent, props):
        """
        The CONNACK, within the client's maximum packet size
        (MQTT-3.1.2-24): without the optional properties if need be;
        C{None} if it cannot fit.
        """
        props = dict(props)
        data = codec.encodeConnack(version, sessionPresent, codec.SUCCESS, props)
        for name in self._OPTIONAL_CONNACK:
            if len(data) <= self.clientMaxPacket:
                return data
            props.pop(name, None)
            data = codec.encodeConnack(version, sessionPresent, codec.SUCCESS, props)
        return data if len(data) <= self.clientMaxPacket else None

    def _keepAliveCheck(self):
        """MQTT-3.1.2-22: nothing for 1.5 times the keep alive: closed."""
        self._timer = None
        if self.state != CONNECTED:
            return
        limit = self._keepAlive * 1.5
        idle = self.factory.reactor.seconds() - self._lastSeen
        if idle >= limit:
            self._counters["keepalive_timeouts"] += 1
            self.disconnect(codec.KEEP_ALIVE_TIMEOUT, "keep alive timeout")
            return
        self._timer = self.factory.reactor.callLater(limit - idle, self._keepAliveCheck)

    # -- PUBLISH --------------------------------------------------------------

    def _publish(self, flags, body):
        p = codec.decodePublish(flags, body, self.version)
        server = self.factory.server
        session = self.session
        v5 = self.version == codec.V5
        topic = p.topic
        if v5:
            _checkResponseTopic(p.properties)
            alias = p.properties.pop("topic_alias", None)
            if alias is not None:
                if alias == 0 or alias > self.factory.topicAliasMaximum:
                    return self._bad(codec.TOPIC_ALIAS_INVALID, "topic alias out of range")
                if topic:
                    self._aliases[alias] = topic
                else:
                    topic = self._aliases.get(alias)
                    if topic is None:
                        raise codec.ProtocolError("unknown topic alias")
        try:
            checkTopicName(topic, MAX_TOPIC_LENGTH)
        except TopicError as e:
            return self._bad(codec.TOPIC_NAME_INVALID, f"topic name: {e}")
        qos = p.qos
        pid = p.packetId
        if qos == 2 and pid in session.incoming:
            # A DUP of a QoS 2 message not yet released: not routed again
            # (MQTT-4.3.3-...), acknowledged again.
            return self._ack(codec.encodeAck(codec.PUBREC, pid, self.version), None)
        if qos and self._inboundPending + len(session.incoming) >= self.factory.receiveMaximum:
            return self._bad(codec.RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded")
        refused = None
        if not server.auth.mayPublish(session.identity, topic):
            server.counters["acl_refused_publish"] += 1
            refused = codec.NOT_AUTHORIZED
        elif p.properties.get("payload_format_indicator") == 1:
            try:
                p.payload.decode("utf-8")
            except UnicodeDecodeError:
                refused = codec.PAYLOAD_FORMAT_INVALID
        if refused is not None:
            if qos == 0:
                return
            if v5:
                kind = codec.PUBACK if qos == 1 else codec.PUBREC
                return self._ack(codec.encodeAck(kind, pid, self.version, refused), None)
            # 3.1.1 cannot say no: acknowledged, not routed (MQTT-3.3.5-2).
        else:
            server.counters["published"] += 1
            message = server.makeMessage(p.payload, qos, p.retain, p.properties)
            server.publish(session, topic, message)
            backpressure = server.core.hub(session.hubName).backpressure()
            if backpressure is not None:
                self.transport.pauseProducing()
                backpressure.addCallback(lambda _: self._rateResume())
        if qos == 1:
            self._ack(codec.encodeAck(codec.PUBACK, pid, self.version),
                      server.store.whenFlushed())
        elif qos == 2:
            session.incoming.add(pid)
            self._ack(codec.encodeAck(codec.PUBREC, pid, self.version),
                      server.store.whenFlushed())

    def _ack(self, data, flushed):
        """
        Send an acknowledgement once C{flushed} fires (what the message
        queued is stored), keeping acknowledgements in the order of their
        PUBLISHes (MQTT-4.6.0-2, -3).
        """
        if flushed is None and not self._acks:
            return self.write(data)
        entry = [data, flushed is None]
        self._acks.append(entry)
        self._inboundPending += 1
        if flushed is not None:
            def ready(_):
                entry[1] = True
                self._sendAcks()
            flushed.addCallback(ready)
        else:
            self._sendAcks()

    def _sendAcks(self):
        acks = self._acks
        while acks and acks[0][1]:
            data = acks.pop(0)[0]
            self._inboundPending -= 1
            self.write(data)

    def _rateResume(self):
        if self.state != CLOSED and self._backlog is None:
            self.transport.resumeProducing()

    def _pubrel(self, flags, body):
        ack = codec.decodeAck(codec.PUBREL, flags, body, self.version)
        session = self.session
        if ack.packetId in session.incoming:
            session.incoming.discard(ack.packetId)
            code = codec.SUCCESS
        else:
            code = codec.PACKET_IDENTIFIER_NOT_FOUND
        self._ack(codec.encodeAck(codec.PUBCOMP, ack.packetId, self.version, code), None)

    def _acked(self, flags, body, type):
        ack = codec.decodeAck(type, flags, body, self.version)
        self.session.acked(type, ack.packetId, ack.reasonCode)

    def _puback(self, flags, body):
        # The common PUBACK, one per QoS 1 delivery: a packet identifier
        # and nothing else (5.0 may add a success reason code), read here
        # without building an Ack.
        n = len(body)
        if not flags and (n == 2 or n == 3 and not body[2] and self.version == codec.V5):
            self.session.acked(codec.PUBACK, (body[0] << 8) | body[1])
        else:
            self._acked(flags, body, codec.PUBACK)

    # -- the rest -------------------------------------------------------------

    def _subscribe(self, flags, body):
        s = codec.decodeSubscribe(flags, body, self.version)
        server = self.factory.server
        codes, sendRetained = server.subscribe(self.session, s)
        self.write(codec.encodeSuback(s.packetId, codes, self.version))
        sendRetained()

    def _unsubscribe(self, flags, body):
        u = codec.decodeUnsubscribe(flags, body, self.version)
        codes = self.factory.server.unsubscribe(self.session, u.filters)
        self.write(codec.encodeUnsuback(u.packetId, codes, self.version))

    def _ping(self, flags, body):
        if flags or body:
            raise codec.MalformedPacket("PINGREQ with flags or a body")
        self.write(codec.PINGRESP_BYTES)

    def _disconnect(self, flags, body):
        d = codec.decodeDisconnect(flags, body, self.version)
        session = self.session
        expiry = d.properties.get("session_expiry_interval")
        if expiry is not None:
            if session.expiryInterval == 0 and expiry:
                # MQTT-3.14.2-2.
                raise codec.ProtocolError("session expiry set at DISCONNECT after 0")
            server = self.factory.server
            session.expiryInterval = min(expiry, server.maxSessionExpiry)
            if not session.expiryInterval and session.persistent:
                server.store.deleteSession(session)
                session.persistent = False
        self._graceful = d.reasonCode != codec.DISCONNECT_WITH_WILL
        self.state = CLOSED
        self.flushOutput()
        self.transport.loseConnection()

    def _auth(self, flags, body):
        # No authentication method is ever accepted at CONNECT, so AUTH is
        # a protocol error (MQTT-3.15.0-..).
        raise codec.ProtocolError("AUTH without an authentication method")

    _handlers = {
        codec.PUBLISH: _publish,
        codec.PUBACK: _puback,
        codec.PUBREC: lambda self, f, b: self._acked(f, b, codec.PUBREC),
        codec.PUBREL: _pubrel,
        codec.PUBCOMP: lambda self, f, b: self._acked(f, b, codec.PUBCOMP),
        codec.SUBSCRIBE: _subscribe,
        codec.UNSUBSCRIBE: _unsubscribe,
        codec.PINGREQ: _ping,
        codec.DISCONNECT: _disconnect,
        codec.AUTH: _auth,
    }
