# -*- test-case-name: tests.test_webpubsub_protobuf -*-
"""
The protobuf subprotocols (L{broker.webpubsub.protobuf}): the wire bytes
against Microsoft's published field numbers, then protobuf clients over
real sockets: groups, acks and errors, fan-out across JSON, protobuf and
plain clients, events to an event handler, and the reliable variant's
sequence ids and recovery.

No official protobuf client runs here (the .NET SDK needs dotnet), so the
test client encodes its frames with the broker's generated module; the
golden-byte tests pin that module's wire format to the published field
numbers independently of it.
"""

import json
from base64 import b64encode

from google.protobuf import any_pb2, descriptor_pb2
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from broker.core.errors import Forbidden
from broker.core.message import BINARY, JSON, PROTOBUF, TEXT, Delivery, Message, Target
from broker.webpubsub import protobuf, subprotocols
from broker.webpubsub.face import attachEventHandlers
from broker.webpubsub.frames import InvalidRequest
from broker.webpubsub.proto import webpubsub_pb2 as pb
from tests.tools import requireTool
from tests.test_webpubsub_upstream import Upstream
from tests.wsharness import KEY, BrokerHarness

PB = protobuf.PROTOBUF_V1
PB_RELIABLE = protobuf.PROTOBUF_RELIABLE_V1
JOIN, SEND = "webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"
Up, Down = pb.UpstreamMessage, pb.DownstreamMessage


def later(seconds=0.05):
    return task.deferLater(reactor, seconds, lambda: None)


def h(text):
    return bytes.fromhex(text.replace(" ", ""))


def anyOf(typeUrl, value):
    return any_pb2.Any(type_url=typeUrl, value=value)


class WireTests(TestCase):
    """
    Frames against bytes written out by hand from the published field
    numbers and types (tag = field << 3 | wire type; 2 is length-delimited,
    0 a varint).
    """

    def test_requests(self):
        # join_group_message = 6 {group = 1: "g", ack_id = 2: 1}
        r = protobuf.parseRequest(h("32 05 0a0167 1001"))
        self.assertEqual((r.type, r.group, r.ackId), ("joinGroup", "g", 1))
        # leave_group_message = 7 {group: "g"}, no ack_id
        r = protobuf.parseRequest(h("3a 03 0a0167"))
        self.assertEqual((r.type, r.group, r.ackId), ("leaveGroup", "g", None))
        # send_to_group_message = 1 {group: "g", ack_id: 2,
        #   data = 3 {text_data = 1: "hi"}, no_echo = 4: true}
        r = protobuf.parseRequest(h("0a 0d 0a0167 1002 1a04 0a026869 2001"))
        self.assertEqual((r.type, r.group, r.ackId, r.noEcho, r.message),
                         ("sendToGroup", "g", 2, True, Message(TEXT, b"hi")))
        # event_message = 5 {event = 1: "e", data = 2 {binary_data = 2: 01 02},
        #   ack_id = 3: 3}
        r = protobuf.parseRequest(h("2a 0b 0a0165 1204 12020102 1803"))
        self.assertEqual((r.type, r.event, r.ackId, r.message),
                         ("event", "e", 3, Message(BINARY, b"\x01\x02")))
        # data {json_data = 4: "[1]"}
        r = protobuf.parseRequest(h("2a 0a 0a0165 1205 2203 5b315d"))
        self.assertEqual(r.message, Message(JSON, b"[1]"))
        # data {protobuf_data = 3: Any {type_url = 1: "t", value = 2: 08 01}}
        r = protobuf.parseRequest(h("2a 0c 0a0165 1207 1a05 0a0174 1200"))
        self.assertEqual(r.message, Message(PROTOBUF, h("0a0174")))
        # sequence_ack_message = 8 {sequence_id = 1: 5}
        r = protobuf.parseRequest(h("42 02 0805"))
        self.assertEqual((r.type, r.sequenceId), ("sequenceAck", 5))
        # ping_message = 9 {}
        self.assertEqual(protobuf.parseRequest(h("4a 00")).type, "ping")

    def test_serverFrames(self):
        # ack_message = 1 {ack_id = 1: 5, success = 2: true}
        self.assertEqual(protobuf.ack(5), h("0a 04 0805 1001"))
        # {ack_id: 5, error = 3 {name = 1: "Forbidden", message = 2: "no"}}
        self.assertEqual(protobuf.ack(5, Forbidden("no")),
                         h("0a 13 0805 1a0f 0a09") + b"Forbidden" + h("1202") + b"no")
        # data_message = 2 {from = 1: "group", group = 2: "g",
        #   data = 3 {text_data: "x"}, sequence_id = 4: 7}
        d = Delivery(Message(TEXT, b"x"), "group", "g")
        self.assertEqual(protobuf.messageFrame(d, sequenceId=7),
                         h("12 11 0a05") + b"group" + h("120167 1a03 0a0178 2007"))
        # from "server", data {json_data = 4: "{}"}, no group, no sequence
        d = Delivery(Message(JSON, b"{}"))
        self.assertEqual(protobuf.messageFrame(d),
                         h("12 0e 0a06") + b"server" + h("1a04 22027b7d"))
        # system_message = 3 {connected_message = 1 {connection_id = 1: "c",
        #   user_id = 2: "u", reconnection_token = 3: "t"}}
        self.assertEqual(protobuf.connected("c", "u", "t"),
                         h("1a 0b 0a09 0a0163 120175 1a0174"))
        # system_message {disconnected_message = 2 {reason = 2: "r"}}
        self.assertEqual(protobuf.disconnected("r"), h("1a 05 1203 120172"))
        # pong_message = 4 {}
        self.assertEqual(protobuf.PONG, h("22 00"))

    def test_protobufPayloadRoundTrip(self):
        """
        A protobuf_data payload goes back out as the same Any.
        """
        any_ = anyOf("type.googleapis.com/x.Y", b"\x08\x01")
        up = Up(send_to_group_message=Up.SendToGroupMessage(
            group="g", data=pb.MessageData(protobuf_data=any_)))
        message = protobuf.parseRequest(up.SerializeToString()).message
        self.assertEqual(message.dataType, PROTOBUF)
        self.assertTrue(message.isBinary)
        self.assertEqual(message.jsonField(),
                         b'"' + b64encode(any_.SerializeToString()) + b'"')
        down = Down.FromString(protobuf.messageFrame(Delivery(message, "group", "g")))
        self.assertEqual(down.data_message.data.protobuf_data, any_)

    def test_undecodable(self):
        """
        What is not an UpstreamMessage raises ValueError (the connection is
        closed, as for invalid JSON).
        """
        for payload in (b"\xff\xff\xff", h("32 05 0a01"), h("32 03 0a01ff")):
            self.assertRaises(ValueError, protobuf.parseRequest, payload)
        self.assertIsNone(protobuf.peekAckId(b"\xff\xff"))

    def test_invalidRequests(self):
        """
        A message that decodes but is no valid request raises
        InvalidRequest, with its ackId when it has one.
        """
        cases = [
            (Up(), None),
            (Up(join_group_message=Up.JoinGroupMessage(ack_id=4)), 4),
            (Up(send_to_group_message=Up.SendToGroupMessage(group="g", ack_id=5)), 5),
            (Up(send_to_group_message=Up.SendToGroupMessage(
                group="g", ack_id=6, data=pb.MessageData())), 6),
            (Up(event_message=Up.EventMessage(
                event="e", ack_id=7, data=pb.MessageData(json_data="{nope"))), 7),
            (Up(event_message=Up.EventMessage(
                event="", ack_id=8, data=pb.MessageData(text_data="x"))), 8),
        ]
        for up, ackId in cases:
            e = self.assertRaises(InvalidRequest, protobuf.parseRequest, up.SerializeToString())
            self.assertEqual(e.ackId, ackId, up)
        # A group stream request (upstream field 13) is not supported.
        e = self.assertRaises(InvalidRequest, protobuf.parseRequest, h("6a 03 0a0173"))
        self.assertIn("no supported request", e.message)

    def test_peekAckId(self):
        self.assertEqual(protobuf.peekAckId(h("32 05 0a0167 1009")), 9)
        self.assertIsNone(protobuf.peekAckId(h("4a 00")))

    def test_generatedModuleMatchesProto(self):
        """
        The committed webpubsub_pb2.py describes webpubsub.proto as it is
        (scripts/gen_proto.sh regenerates it).
        """
        try:
            from grpc_tools import protoc
        except ImportError:
            protoc = None
        requireTool(protoc is not None, "grpcio-tools is not installed")
        import os

        import broker
        root = os.path.dirname(os.path.dirname(broker.__file__))
        out = self.mktemp()
        status = protoc.main(["protoc", f"-I{root}", f"-I{protoc._get_resource_file_name('grpc_tools', '_proto')}",
                              f"--descriptor_set_out={out}",
                              os.path.join(root, "broker/webpubsub/proto/webpubsub.proto")])
        self.assertEqual(status, 0)
        with open(out, "rb") as f:
            fresh = descriptor_pb2.FileDescriptorSet.FromString(f.read()).file[0]
        committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
        # protoc writes the derived json_name into a descriptor set, not
        # into generated Python.
        _clearJSONNames(fresh.message_type)
        self.assertEqual(committed, fresh)


def _clearJSONNames(messages):
    for m in messages:
        for f in m.field:
            f.ClearField("json_name")
        _clearJSONNames(m.nested_type)


class _Base(TestCase):
    toml = ""

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield BrokerHarness(self, reactor, self.toml).start()

    def hub(self):
        return self.broker.core.hub("chat")

    @defer.inlineCallbacks
    def connectPB(self, protocols=(PB,), **kw):
        """
        A protobuf client, its connected message consumed.
        """
        c = yield self.broker.connect(protocols=protocols, **kw)
        hello = yield nextPB(c)
        self.assertEqual(hello.system_message.WhichOneof("message"), "connected_message")
        c.hello = hello.system_message.connected_message
        c.connectionId = c.hello.connection_id
        return c


@defer.inlineCallbacks
def nextPB(client):
    payload, isBinary = yield client.next()
    assert isBinary, f"expected a binary frame, got {payload!r}"
    return Down.FromString(payload)


def sendPB(client, **request):
    client.sendMessage(Up(**request).SerializeToString(), isBinary=True)


def join(group, ackId=None):
    return {"join_group_message": Up.JoinGroupMessage(group=group, ack_id=ackId)}


def toGroup(group, ackId=None, noEcho=False, **data):
    return {"send_to_group_message": Up.SendToGroupMessage(
        group=group, ack_id=ackId, no_echo=noEcho, data=pb.MessageData(**data))}


class ProtobufClientTests(_Base):
    @defer.inlineCallbacks
    def test_connected(self):
        c = yield self.connectPB(userId="alice")
        self.assertEqual(c.response.protocol, PB)
        self.assertEqual(c.hello.user_id, "alice")
        self.assertEqual(c.hello.reconnection_token, "")
        self.assertTrue(self.hub().connectionExists(c.connectionId))

    @defer.inlineCallbacks
    def test_groupsAndCrossFormatFanout(self):
        """
        Protobuf and JSON clients in one group get each other's messages in
        their own format; a plain client gets the payload itself.
        """
        p = yield self.connectPB(userId="p", roles=[JOIN, SEND])
        j = yield self.broker.connectJSON(userId="j", roles=[JOIN, SEND])
        sendPB(p, **join("g", 1))
        ack = (yield nextPB(p)).ack_message
        self.assertEqual((ack.ack_id, ack.success, ack.HasField("error")), (1, True, False))
        j.send({"type": "joinGroup", "group": "g", "ackId": 1})
        self.assertTrue((yield j.nextJSON())["success"])
        plain = yield self.broker.connect(protocols=())
        yield later()
        plainId = [s.connectionId for s in self.hub().sessions()
                   if s.connectionId not in (p.connectionId, j.connectionId)][0]
        # The plain client is put in the group from the server side.
        self.hub().addConnectionToGroup(plainId, "g")

        # protobuf -> everyone
        sendPB(p, **toGroup("g", 2, text_data="hello"))
        frames = [(yield nextPB(p)), (yield nextPB(p))]
        kinds = sorted(f.WhichOneof("message") for f in frames)
        self.assertEqual(kinds, ["ack_message", "data_message"])
        data = [f for f in frames if f.HasField("data_message")][0].data_message
        self.assertEqual((getattr(data, "from"), data.group, data.data.text_data,
                          data.sequence_id), ("group", "g", "hello", 0))
        self.assertEqual((yield j.nextJSON()), {"type": "message", "from": "group", "group": "g",
                                                "fromUserId": "p", "dataType": "text",
                                                "data": "hello"})
        self.assertEqual((yield plain.next()), (b"hello", False))

        # JSON -> protobuf, each data type
        for dataType, data, field, expected in (
                ("json", {"n": 1}, "json_data", '{"n":1}'),
                ("binary", "AQI=", "binary_data", b"\x01\x02"),
                ("text", "t", "text_data", "t")):
            j.send({"type": "sendToGroup", "group": "g", "dataType": dataType, "data": data,
                    "noEcho": True})
            got = (yield nextPB(p)).data_message
            self.assertEqual((got.group, got.data.WhichOneof("data"),
                              getattr(got.data, field)), ("g", field, expected))
            yield plain.next()

        # a protobuf payload: base64 with dataType protobuf to JSON, bytes
        # to plain clients
        any_ = anyOf("type.googleapis.com/x.Y", b"\x08\x01")
        sendPB(p, **toGroup("g", 3, noEcho=True, protobuf_data=any_))
        self.assertTrue((yield nextPB(p)).ack_message.success)
        frame = yield j.nextJSON()
        self.assertEqual((frame["dataType"], frame["data"]),
                         ("protobuf", b64encode(any_.SerializeToString()).decode()))
        self.assertEqual((yield plain.next()), (any_.SerializeToString(), True))

    @defer.inlineCallbacks
    def test_fanoutEncodesOncePerFormat(self):
        calls = []
        encode = subprotocols.PROTOBUF.messageFrame

        def counting(delivery, sequenceId=None):
            calls.append(delivery)
            return encode(delivery, sequenceId)
        self.patch(subprotocols.PROTOBUF, "messageFrame", counting)
        clients = []
        for i in range(3):
            c = yield self.connectPB()
            self.hub().addConnectionToGroup(c.connectionId, "g")
            clients.append(c)
        self.hub().send(Target(Target.GROUP, "g"), Message(TEXT, b"x"))
        for c in clients:
            self.assertEqual((yield nextPB(c)).data_message.data.text_data, "x")
        self.assertEqual(len(calls), 1)

    @defer.inlineCallbacks
    def test_errorAcks(self):
        """
        Refused requests are acked with the error, as in JSON: Forbidden
        without the role, Duplicate for a reused ackId, BadRequest for an
        invalid request; a ping is answered with a pong.
        """
        c = yield self.connectPB(roles=[f"{JOIN}.mine"])
        sendPB(c, **join("other", 1))
        ack = (yield nextPB(c)).ack_message
        self.assertEqual((ack.ack_id, ack.success, ack.error.name), (1, False, "Forbidden"))
        sendPB(c, **join("mine", 2))
        self.assertTrue((yield nextPB(c)).ack_message.success)
        sendPB(c, **join("mine", 2))
        self.assertEqual((yield nextPB(c)).ack_message.error.name, "Duplicate")
        sendPB(c, **toGroup("mine", 3, text_data="x"))
        self.assertEqual((yield nextPB(c)).ack_message.error.name, "Forbidden")
        sendPB(c, join_group_message=Up.JoinGroupMessage(group="", ack_id=4))
        ack = (yield nextPB(c)).ack_message
        self.assertEqual((ack.ack_id, ack.error.name), (4, "BadRequest"))
        sendPB(c, ping_message=Up.PingMessage())
        self.assertEqual((yield nextPB(c)).WhichOneof("message"), "pong_message")

    @defer.inlineCallbacks
    def test_undecodableFrameCloses(self):
        """
        A binary frame that is not an UpstreamMessage closes the connection
        with 1007, after a disconnected message, as invalid JSON does.
        """
        c = yield self.connectPB()
        c.sendMessage(b"\xff\xff\xff", isBinary=True)
        bye = (yield nextPB(c)).system_message.disconnected_message
        self.assertIn("invalid protobuf frame", bye.reason)
        code, _ = yield c.closed
        self.assertEqual(code, 1007)
        yield later()
        self.assertEqual(self.hub().connectionCount, 0)

    @defer.inlineCallbacks
    def test_textFrameCloses(self):
        c = yield self.connectPB()
        c.sendMessage(b'{"type":"ping"}')
        bye = (yield nextPB(c)).system_message.disconnected_message
        self.assertIn("text frames are not allowed", bye.reason)
        code, _ = yield c.closed
        self.assertEqual(code, 1003)

    @defer.inlineCallbacks
    def test_jsonPreferredWhenBothOffered(self):
        c = yield self.broker.connect(protocols=(PB, "json.webpubsub.azure.v1"))
        self.assertEqual(c.response.protocol, "json.webpubsub.azure.v1")
        self.assertEqual((yield c.nextJSON())["event"], "connected")


class ProtobufEventTests(TestCase):
    """
    Events from a protobuf client to a real event handler, and its answer.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.upstream = Upstream()
        port = reactor.listenTCP(0, Site(self.upstream), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        toml = (f"[webpubsub.hubs.chat]\naccess_keys = [\"{KEY}\"]\n"
                "[[webpubsub.hubs.chat.event_handlers]]\n"
                f'url_template = "http://127.0.0.1:{port.getHost().port}/e/{{event}}"\n'
                'user_events = "*"\nsystem_events = []\n')
        self.broker = BrokerHarness(self, reactor, toml)
        pool = attachEventHandlers(reactor, self.broker.core, self.broker.settings["webpubsub"],
                                   [KEY])
        self.addCleanup(pool.closeCachedConnections)
        yield self.broker.start()

    @defer.inlineCallbacks
    def connectPB(self):
        c = yield self.broker.connect(protocols=(PB,), userId="bob")
        yield nextPB(c)
        return c

    @defer.inlineCallbacks
    def test_eventAndAnswer(self):
        self.upstream.answers["calc"] = (200, {b"content-type": b"application/json"},
                                         b'{"sum":3}')
        c = yield self.connectPB()
        sendPB(c, event_message=Up.EventMessage(
            event="calc", ack_id=1, data=pb.MessageData(json_data='{"a":1,"b":2}')))
        frames = [(yield nextPB(c)), (yield nextPB(c))]
        reply = [f for f in frames if f.HasField("data_message")][0].data_message
        ack = [f for f in frames if f.HasField("ack_message")][0].ack_message
        self.assertEqual((ack.ack_id, ack.success), (1, True))
        self.assertEqual((getattr(reply, "from"), reply.HasField("group"),
                          json.loads(reply.data.json_data)), ("server", False, {"sum": 3}))
        path, headers, body = self.upstream.requests[-1]
        self.assertEqual((path, headers["content-type"], headers["ce-userid"]),
                         ("/e/calc", "application/json", "bob"))
        self.assertEqual(json.loads(body), {"a": 1, "b": 2})

    @defer.inlineCallbacks
    def test_protobufAndBinaryEvents(self):
        """
        A protobuf payload goes up as application/x-protobuf (the Any's
        bytes), a binary one as application/octet-stream.
        """
        c = yield self.connectPB()
        any_ = anyOf("type.googleapis.com/x.Y", b"\x08\x01")
        sendPB(c, event_message=Up.EventMessage(
            event="pb", ack_id=1, data=pb.MessageData(protobuf_data=any_)))
        self.assertTrue((yield nextPB(c)).ack_message.success)
        _, headers, body = self.upstream.requests[-1]
        self.assertEqual((headers["content-type"], body),
                         ("application/x-protobuf", any_.SerializeToString()))
        sendPB(c, event_message=Up.EventMessage(
            event="bin", ack_id=2, data=pb.MessageData(binary_data=b"\x00\x01")))
        self.assertTrue((yield nextPB(c)).ack_message.success)
        _, headers, body = self.upstream.requests[-1]
        self.assertEqual((headers["content-type"], body),
                         ("application/octet-stream", b"\x00\x01"))

    @defer.inlineCallbacks
    def test_handlerErrorIsAcked(self):
        self.upstream.answers["boom"] = (400, {}, b"no")
        c = yield self.connectPB()
        sendPB(c, event_message=Up.EventMessage(
            event="boom", ack_id=5, data=pb.MessageData(text_data="x")))
        ack = (yield nextPB(c)).ack_message
        self.assertEqual((ack.ack_id, ack.success), (5, False))
        self.assertTrue(ack.error.name)


class ReliableProtobufTests(_Base):
    toml = "[webpubsub]\nrecovery_window = 5.0\n"

    def toUser(self, userId, text):
        self.hub().send(Target(Target.USER, userId), Message(TEXT, text.encode()))

    @defer.inlineCallbacks
    def test_sequenceAckAndRecovery(self):
        """
        Messages carry sequence ids; after a dropped socket the client
        resumes the same connection and gets every unacknowledged message
        again, in order, including those sent while it was away.
        """
        c = yield self.connectPB(protocols=(PB_RELIABLE,), userId="alice")
        self.assertEqual(c.response.protocol, PB_RELIABLE)
        cid, token = c.connectionId, c.hello.reconnection_token
        self.assertGreater(len(token), 30)
        self.toUser("alice", "one")
        self.toUser("alice", "two")
        first = [(yield nextPB(c)).data_message, (yield nextPB(c)).data_message]
        self.assertEqual([(m.sequence_id, m.data.text_data) for m in first],
                         [(1, "one"), (2, "two")])
        sendPB(c, sequence_ack_message=Up.SequenceAckMessage(sequence_id=1))
        yield later()
        link = self.broker.factory.links.get("chat", cid)
        self.assertEqual(link.unacknowledged, 1)
        c.transport.abortConnection()
        yield c.closed
        yield later()
        self.assertTrue(self.hub().connectionExists(cid))
        self.toUser("alice", "three")
        query = f"awps_connection_id={cid}&awps_reconnection_token={token}"

        # Resuming needs the same wire format.
        why = yield self.broker.refused(protocols=("json.reliable.webpubsub.azure.v1",),
                                        userId="alice", query=query)
        self.assertIn("400", why)

        back = yield self.connectPB(protocols=(PB_RELIABLE,), userId="alice", query=query)
        self.assertEqual((back.connectionId, back.hello.user_id), (cid, "alice"))
        resent = [(yield nextPB(back)).data_message, (yield nextPB(back)).data_message]
        self.assertEqual([(m.sequence_id, m.data.text_data) for m in resent],
                         [(2, "two"), (3, "three")])
        self.toUser("alice", "four")
        self.assertEqual((yield nextPB(back)).data_message.sequence_id, 4)
        self.assertEqual(len(self.hub().sessions()), 1)

    @defer.inlineCallbacks
    def test_groupMessagesNumbered(self):
        c = yield self.connectPB(protocols=(PB_RELIABLE,), roles=[JOIN, SEND])
        sendPB(c, **join("g", 1))
        self.assertTrue((yield nextPB(c)).ack_message.success)
        sendPB(c, **toGroup("g", 2, binary_data=b"\x07"))
        frames = [(yield nextPB(c)), (yield nextPB(c))]
        data = [f for f in frames if f.HasField("data_message")][0].data_message
        self.assertEqual((data.sequence_id, data.group, data.data.binary_data),
                         (1, "g", b"\x07"))

    @defer.inlineCallbacks
    def test_plainProtobufCannotResume(self):
        c = yield self.connectPB(protocols=(PB_RELIABLE,), userId="alice")
        cid, token = c.connectionId, c.hello.reconnection_token
        c.transport.abortConnection()
        yield c.closed
        why = yield self.broker.refused(
            protocols=(PB,), userId="alice",
            query=f"awps_connection_id={cid}&awps_reconnection_token={token}")
        self.assertIn("404", why)

    @defer.inlineCallbacks
    def test_serverCloseSendsDisconnected(self):
        c = yield self.connectPB(protocols=(PB_RELIABLE,))
        self.hub().close(Target(Target.CONNECTION, c.connectionId), 1000, "bye now")
        bye = (yield nextPB(c)).system_message.disconnected_message
        self.assertEqual(bye.reason, "bye now")
        yield c.closed

