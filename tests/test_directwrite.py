# -*- test-case-name: tests.test_directwrite -*-
"""
Deliveries written straight to the socket (L{broker.core.directwrite}):
over real loopback sockets, bytes keep their order whether they went out at
once, were kept for the end of the turn or waited in Twisted's buffer for a
peer that stopped reading; TLS and in-memory transports keep the buffered
path.
"""

import json
import socket

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.tcp import Connection
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.test.proto_helpers import StringTransport
from twisted.trial import unittest

from broker.core.directwrite import (FLUSH_AT, DirectOutput, WriteBatch, noDelay,
                                     socketTransport)
from broker.core.message import FROM_GROUP, Delivery, Message, Target
from tests.iotharness import IoTHarness
from tests.wsharness import BrokerHarness


class Writer(DirectOutput, Protocol):
    """
    The server side: frames by L{writeDirect}, anything else by L{other},
    which flushes first as the faces' protocols do.
    """

    def __init__(self, batch):
        self.batch = batch

    def writeBatch(self):
        return self.batch

    def other(self, data):
        self.flushOutput()
        self.transport.write(data)

    def connectionMade(self):
        self.factory.made.callback(self)


class Reader(Protocol):
    def __init__(self):
        self.received = bytearray()
        self.waiting = None

    def dataReceived(self, data):
        self.received += data
        if self.waiting is not None and len(self.received) >= self.waiting[0]:
            d, self.waiting = self.waiting[1], None
            d.callback(bytes(self.received))

    def until(self, size):
        if len(self.received) >= size:
            return defer.succeed(bytes(self.received))
        d = defer.Deferred()
        self.waiting = (size, d)
        return d.addTimeout(10, reactor)


def _turn():
    return deferLater(reactor, 0, lambda: None)


def pending(transport):
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class DirectWriteTests(unittest.TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        self.batch = WriteBatch(reactor)
        factory = Factory.forProtocol(lambda: Writer(self.batch))
        factory.made = defer.Deferred()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.reader = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Reader())
        self.writer = yield factory.made
        self.sock = self.writer.transport
        self.addCleanup(self.reader.transport.loseConnection)

    def test_socketFound(self):
        """
        The TCP transport itself, also under a protocol wrapper (which
        forwards every attribute, so must not be mistaken for it).
        """
        self.assertIs(socketTransport(self.writer.transport), self.sock)
        self.assertIsNone(socketTransport(StringTransport()))
        wrapper = ProtocolWrapper(WrappingFactory(Factory()), Protocol())
        wrapper.makeConnection(self.sock)
        self.assertIs(socketTransport(wrapper), self.sock)

    def test_noDelay(self):
        """
        Nagle's algorithm goes off on a TCP transport (frames kept for the
        end of a turn would wait for the first one's ACK), and an in-memory
        transport is left alone.
        """
        sock = self.sock.getHandle()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        noDelay(self.writer.transport)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
        noDelay(StringTransport())

    @defer.inlineCallbacks
    def test_firstFrameGoesAtOnce(self):
        """
        The first frame of a turn is in the kernel before C{writeDirect}
        returns: nothing waits in Twisted's buffer and the socket is not
        registered for writing.
        """
        self.writer.writeDirect(b"one")
        self.assertEqual(pending(self.sock), 0)
        self.assertNotIn(self.sock, reactor.getWriters())
        got = yield self.reader.until(3)
        self.assertEqual(got, b"one")

    @defer.inlineCallbacks
    def test_laterFramesKeptForTheTurn(self):
        """
        Frames after the first in one turn are kept and leave together at
        its end; another write flushes them first, so nothing overtakes.
        """
        self.writer.writeDirect(b"1")
        self.writer.writeDirect(b"2")
        self.writer.writeDirect(b"3")
        self.assertEqual(self.writer._outKept, [b"2", b"3"])
        self.writer.other(b"A")
        self.assertEqual(self.writer._outKept, None)
        self.writer.writeDirect(b"4")
        self.writer.writeDirect(b"5")
        got = yield self.reader.until(6)
        self.assertEqual(got, b"123A45")
        self.assertEqual(self.writer._outKept, None)

    @defer.inlineCallbacks
    def test_keptPastFlushSize(self):
        """
        What one turn keeps for a connection is sent early past L{FLUSH_AT}.
        """
        frame = b"k" * 1024
        self.writer.writeDirect(b"<")
        for _ in range(FLUSH_AT // len(frame) + 2):
            self.writer.writeDirect(frame)
        self.assertLess(sum(map(len, self.writer._outKept)), FLUSH_AT)
        total = 1 + (FLUSH_AT // len(frame) + 2) * len(frame)
        got = yield self.reader.until(total)
        self.assertEqual(got, b"<" + frame * (FLUSH_AT // len(frame) + 2))

    @defer.inlineCallbacks
    def test_orderKeptWhenThePeerStopsReading(self):
        """
        Once the kernel takes no more, the rest waits in Twisted's buffer
        (whose producer pause starts the slow-consumer count) and every
        later frame waits behind it; when the peer reads again, the bytes
        arrive complete and in order.
        """
        self.reader.transport.pauseProducing()
        frames = []
        n = 0
        pad = b"." * 1016
        # Loopback sockets take several MiB before they block.
        while pending(self.sock) == 0 and n < 100_000:
            for _ in range(64):
                n += 1
                frame = b"%08d" % n + pad
                frames.append(frame)
                self.writer.writeDirect(frame)
            yield _turn()
        self.assertGreater(pending(self.sock), 0, "the socket never blocked")
        for _ in range(100):
            n += 1
            frame = b"%08d" % n
            frames.append(frame)
            self.writer.writeDirect(frame)
        self.writer.other(b"END.....")
        frames.append(b"END.....")
        self.reader.transport.resumeProducing()
        expected = b"".join(frames)
        got = yield self.reader.until(len(expected))
        self.assertEqual(got, expected)

    @defer.inlineCallbacks
    def test_closedPeer(self):
        """
        Writing to a connection whose peer has gone neither raises nor
        loses the order of what the transport reports.
        """
        self.reader.transport.abortConnection()
        yield deferLater(reactor, 0.05, lambda: None)
        for i in range(10):
            self.writer.writeDirect(b"x" * 100)
        yield _turn()
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(self.sock.connected)


class FacesTests(unittest.TestCase):
    """
    The Web PubSub face writes deliveries directly over TCP, and keeps the
    buffered path over TLS; the raw TCP faces turn Nagle's algorithm off.
    """

    @defer.inlineCallbacks
    def test_iotNoDelay(self):
        h = yield IoTHarness(self, reactor).start()
        yield h.device("d1")
        server = h.concentrator._device("acme", "d1").transport
        self.assertEqual(server.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                         1)

    @defer.inlineCallbacks
    def _server(self, tls):
        broker = yield BrokerHarness(self, reactor, tls=tls).start()
        client = yield broker.connectJSON(groups=["g"])
        conn = broker.core.hub("chat").localSession(client.connectionId).connection
        return broker, client, conn

    @defer.inlineCallbacks
    def test_webPubSubOverTCP(self):
        broker, client, conn = yield self._server(False)
        publisher = yield broker.connectJSON(roles=["webpubsub.sendToGroup"])
        for i in range(200):
            publisher.send({"type": "sendToGroup", "group": "g", "dataType": "text",
                            "data": str(i), "noEcho": True})
        got = []
        for _ in range(200):
            frame = yield client.nextJSON()
            got.append(frame["data"])
        self.assertEqual(got, [str(i) for i in range(200)])
        # The socket's own transport, under the listener's connection cap.
        self.assertIsInstance(conn._outSocket, Connection)

    @defer.inlineCallbacks
    def test_webPubSubLaneKeepsOrder(self):
        """
        A Web PubSub connection's deliveries take its lane (the socket, after
        only the checks that change between deliveries) while nothing of its
        own waits.  Once the socket blocks they wait in Twisted's buffer
        behind what is there, as do autobahn's own frames, and the peer
        reads every one in order when it reads again.
        """
        broker, client, conn = yield self._server(False)
        hub = broker.core.hub("chat")
        target = Target(Target.GROUP, "g")
        sent = []

        def publish(data):
            sent.append(data)
            hub.publish(target, Delivery(Message("text", data.encode()), FROM_GROUP, "g",
                                         "u", None))

        publish("first")
        yield client.nextJSON()
        sent.clear()
        self.assertTrue(conn._lane)
        client.transport.pauseProducing()
        pad = "." * 16384
        n = 0
        # One delivery a turn, each the connection's first: the lane's case.
        while pending(conn._outSocket) == 0 and n < 2000:
            n += 1
            publish(f"{n:06d}{pad}")
            yield _turn()
        self.assertGreater(pending(conn._outSocket), 0, "the socket never blocked")
        for _ in range(20):
            n += 1
            publish(f"{n:06d}")
            yield _turn()
        conn.sendMessage(json.dumps({"type": "message", "from": "server", "dataType": "text",
                                     "data": "marker"}).encode())
        sent.append("marker")
        for _ in range(20):
            n += 1
            publish(f"{n:06d}")
            yield _turn()
        self.assertFalse(conn.slow)
        client.transport.resumeProducing()
        got = []
        for _ in range(len(sent)):
            frame = yield client.nextJSON()
            got.append(frame["data"])
        self.assertEqual(got, sent)

    @defer.inlineCallbacks
    def test_webPubSubLaneBehindTwistedsBuffer(self):
        """
        A frame autobahn wrote waits in Twisted's buffer until the reactor
        next polls; a delivery of a new turn before that goes behind it,
        not down the lane, though the socket has room.
        """
        broker, client, conn = yield self._server(False)
        hub = broker.core.hub("chat")
        target = Target(Target.GROUP, "g")

        def publish(data):
            hub.publish(target, Delivery(Message("text", data.encode()), FROM_GROUP, "g",
                                         "u", None))

        publish("first")
        yield client.nextJSON()
        self.assertTrue(conn._lane)
        conn.sendMessage(json.dumps({"type": "message", "from": "server", "dataType": "text",
                                     "data": "marker"}).encode())
        self.assertGreater(pending(conn._outSocket), 0)
        conn._outBatch.flush()      # the turn ends; the reactor has not polled
        publish("after")
        got = []
        for _ in range(2):
            frame = yield client.nextJSON()
            got.append(frame["data"])
        self.assertEqual(got, ["marker", "after"])

    @defer.inlineCallbacks
    def test_webPubSubOverTLS(self):
        broker, client, conn = yield self._server(True)
        publisher = yield broker.connectJSON(roles=["webpubsub.sendToGroup"])
        publisher.send({"type": "sendToGroup", "group": "g", "dataType": "text",
                        "data": "over tls", "noEcho": True})
        frame = yield client.nextJSON()
        self.assertEqual(frame["data"], "over tls")
        self.assertIsNone(conn._outSocket)
