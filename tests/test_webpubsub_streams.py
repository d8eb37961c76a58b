# -*- test-case-name: tests.test_webpubsub_streams -*-
"""
Group streams (L{broker.webpubsub.streams}): the frames over real sockets
(start, fragments, acknowledgements, the end, refusals, the idle timeout,
the sender going away), and Microsoft's C{@azure/web-pubsub-client}
(C{openGroupStream} / C{onGroupStream}, unchanged) streaming through the
broker, with its socket cut mid-stream on the reliable protocol.
"""

import base64

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from broker.webpubsub import streams
from tests.nodejs import JSONLines, requireNode, spawnNode
from tests.test_webpubsub_cluster import frames as nextFrames
from tests.wsharness import BrokerHarness

SEND = "webpubsub.sendToGroup"
JOIN = "webpubsub.joinLeaveGroup"
TOML = """
[webpubsub]
recovery_window = 10.0
"""


def later(seconds=0.05):
    return task.deferLater(reactor, seconds, lambda: None)


class StreamFrameTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield BrokerHarness(self, reactor, TOML).start()
        self.receiver = yield self.broker.connectJSON(userId="r", groups=["g"])
        self.sender = yield self.broker.connectJSON(userId="s", roles=(f"{SEND}.g",))

    def start(self, streamId="s1", group="g", **stream):
        self.sender.send({"type": "sendToGroup", "group": group,
                          "stream": {"streamId": streamId, **stream}})

    def data(self, seq, data, streamId="s1", dataType="text"):
        self.sender.send({"type": "streamData", "streamId": streamId,
                          "streamSequenceId": seq, "dataType": dataType, "data": data})

    @defer.inlineCallbacks
    def test_wholeStream(self):
        """
        Started (acknowledged with 1), two fragments and a keep-alive
        (each fragment acknowledged with the next it expects), ended: the
        group gets each fragment with its stream field, then the empty end
        marker; the sender gets streamClosed without an error.
        """
        self.start()
        self.assertEqual((yield self.sender.nextJSON()),
                         {"type": "streamAck", "streamId": "s1", "expectedSequenceId": 1})
        self.data(1, "hello ")
        self.sender.send({"type": "streamData", "streamId": "s1"})
        self.data(2, {"n": 2}, dataType="json")
        self.sender.send({"type": "streamEnd", "streamId": "s1"})
        self.assertEqual((yield nextFrames(self.sender, 3)), [
            {"type": "streamAck", "streamId": "s1", "expectedSequenceId": 2},
            {"type": "streamAck", "streamId": "s1", "expectedSequenceId": 3},
            {"type": "streamClosed", "streamId": "s1"}])
        frames = yield nextFrames(self.receiver, 3)
        self.assertEqual([(f["from"], f["group"], f["fromUserId"], f["dataType"], f["data"],
                           f["stream"]) for f in frames], [
            ("group", "g", "s", "text", "hello ", {"streamId": "s1", "streamSequenceId": 1}),
            ("group", "g", "s", "json", {"n": 2}, {"streamId": "s1", "streamSequenceId": 2}),
            ("group", "g", "s", "text", "",
             {"streamId": "s1", "streamSequenceId": 3, "endOfStream": True})])
        self.assertEqual(len(self.broker.core.hub("chat").session(
            self.sender.connectionId).connection.streams), 0)

    @defer.inlineCallbacks
    def test_resentAndOutOfOrder(self):
        """
        A fragment received again (a client resends what was not
        acknowledged after it recovers) is acknowledged, not published
        again; one that skips ahead is refused with streamNack.
        """
        self.start(noEcho=True)
        yield self.sender.nextJSON()
        self.data(1, "a")
        self.data(1, "a")
        self.data(3, "c")
        self.data(2, "b")
        answers = yield nextFrames(self.sender, 4)
        self.assertEqual([a["type"] for a in answers],
                         ["streamAck", "streamAck", "streamNack", "streamAck"])
        self.assertEqual([a["expectedSequenceId"] for a in answers], [2, 2, 2, 3])
        self.assertEqual(answers[2]["name"], "OutOfOrder")
        got = [f["data"] for f in (yield nextFrames(self.receiver, 2))]
        self.assertEqual(got, ["a", "b"])

    @defer.inlineCallbacks
    def test_aborted(self):
        """
        C{streamEnd} with an error: the group's end marker carries it as
        C{Aborted} with the sender's message and code.
        """
        self.start()
        yield self.sender.nextJSON()
        self.data(1, base64.b64encode(b"\x00\xff").decode(), dataType="binary")
        self.sender.send({"type": "streamEnd", "streamId": "s1",
                          "error": {"message": "broken", "userErrorCode": "E1"}})
        yield self.sender.nextJSON()
        self.assertEqual((yield self.sender.nextJSON()),
                         {"type": "streamClosed", "streamId": "s1"})
        first = yield self.receiver.nextJSON()
        self.assertEqual((first["dataType"], base64.b64decode(first["data"])),
                         ("binary", b"\x00\xff"))
        end = yield self.receiver.nextJSON()
        self.assertEqual(end["stream"], {
            "streamId": "s1", "streamSequenceId": 2, "endOfStream": True,
            "error": {"name": "Aborted", "message": "broken", "userErrorCode": "E1"}})

    @defer.inlineCallbacks
    def test_refusals(self):
        """
        No permission for the group, an unknown stream, a duplicate
        streamId, a start carrying data, a bad streamId (with an ackId):
        each gets a clear answer and nothing reaches the group.
        """
        self.start(group="elsewhere")
        closed = yield self.sender.nextJSON()
        self.assertEqual((closed["type"], closed["error"]["name"]), ("streamClosed", "Forbidden"))
        self.data(1, "x", streamId="nope")
        closed = yield self.sender.nextJSON()
        self.assertEqual((closed["streamId"], closed["error"]["name"]), ("nope", "NotFound"))
        self.start()
        yield self.sender.nextJSON()
        self.start()
        closed = yield self.sender.nextJSON()
        self.assertEqual(closed["error"]["name"], "BadRequest")
        self.sender.send({"type": "sendToGroup", "group": "g", "dataType": "text",
                          "data": "x", "stream": {"streamId": "s2"}})
        closed = yield self.sender.nextJSON()
        self.assertEqual((closed["streamId"], closed["error"]["name"]), ("s2", "BadRequest"))
        self.sender.send({"type": "sendToGroup", "group": "g", "ackId": 7,
                          "stream": {"streamId": "x" * (streams.MAX_STREAM_ID + 1)}})
        ack = yield self.sender.nextJSON()
        self.assertEqual((ack["type"], ack["ackId"], ack["success"]), ("ack", 7, False))
        # The first stream still works.
        self.data(1, "still")
        self.assertEqual((yield self.sender.nextJSON())["expectedSequenceId"], 2)
        self.assertEqual((yield self.receiver.nextJSON())["data"], "still")

    @defer.inlineCallbacks
    def test_openStreamsBounded(self):
        for i in range(streams.MAX_OPEN_STREAMS):
            self.start(streamId=f"s{i}")
        acks = yield nextFrames(self.sender, streams.MAX_OPEN_STREAMS)
        self.assertEqual({a["type"] for a in acks}, {"streamAck"})
        self.start(streamId="one-too-many")
        closed = yield self.sender.nextJSON()
        self.assertEqual((closed["streamId"], closed["error"]["name"]),
                         ("one-too-many", "LimitExceeded"))

    @defer.inlineCallbacks
    def test_churnLeavesNothing(self):
        """
        A client opening and ending streams without pause (500 of them,
        a fragment each): every one is closed, and neither a stream nor
        an idle timer is left behind.
        """
        calls = len(reactor.getDelayedCalls())
        for i in range(500):
            self.start(streamId=f"c{i}")
            self.data(1, "x", streamId=f"c{i}")
            self.sender.send({"type": "streamEnd", "streamId": f"c{i}"})
        answers = yield nextFrames(self.sender, 1500)
        self.assertEqual([a["type"] for a in answers[-3:]],
                         ["streamAck", "streamAck", "streamClosed"])
        self.assertEqual(len(self.broker.core.hub("chat").session(
            self.sender.connectionId).connection.streams), 0)
        self.assertLessEqual(len(reactor.getDelayedCalls()), calls + 2)
        yield nextFrames(self.receiver, 1000)

    @defer.inlineCallbacks
    def test_idleTimeout(self):
        """
        Nothing within the stream's idle timeout (2 s here): it is closed,
        for the sender (IdleTimeout) and the group (its end); a keep-alive
        put it off.
        """
        self.start(idleTimeoutMs=2000)
        yield self.sender.nextJSON()
        self.data(1, "only")
        yield self.sender.nextJSON()
        yield later(1.2)
        self.sender.send({"type": "streamData", "streamId": "s1"})     # a keep-alive
        yield later(1.2)
        self.assertIn("s1", self.broker.core.hub("chat").session(
            self.sender.connectionId).connection.streams.streams)
        closed = yield self.sender.nextJSON()
        self.assertEqual(closed["error"]["name"], "IdleTimeout")
        yield self.receiver.nextJSON()
        end = yield self.receiver.nextJSON()
        self.assertEqual((end["stream"]["endOfStream"], end["stream"]["error"]["name"]),
                         (True, "IdleTimeout"))

    @defer.inlineCallbacks
    def test_senderGone(self):
        """
        The sender's (plain JSON) connection ends: its open stream ends for
        the group with ConnectionClosed.
        """
        self.start()
        yield self.sender.nextJSON()
        self.data(1, "half")
        yield self.sender.nextJSON()
        self.sender.transport.abortConnection()
        yield self.receiver.nextJSON()
        end = yield self.receiver.nextJSON()
        self.assertEqual((end["stream"]["streamSequenceId"], end["stream"]["error"]["name"]),
                         (2, "ConnectionClosed"))


class BusTests(TestCase):
    def test_busKeepsTheStream(self):
        """
        In cluster mode a fragment crosses the bus (and the Redis history)
        with its stream.
        """
        import broker.webpubsub.redishistory  # noqa: F401 (registers the kind)
        from broker.cluster.engine import decodeDelivery, encodeDelivery
        from broker.core.message import FROM_GROUP, TEXT, Delivery, Target
        error = {"name": "Aborted", "message": "m", "userErrorCode": "E"}
        sent = Delivery(streams.StreamMessage(TEXT, b"x", ("s", 3, True, error)),
                        FROM_GROUP, "g", "u", "c")
        _, _, got = decodeDelivery(encodeDelivery("chat", Target(Target.GROUP, "g"), sent))
        self.assertIsInstance(got.message, streams.StreamMessage)
        self.assertEqual((got.message.stream, got.message.dataType, got.message.data),
                         (("s", 3, True, error), TEXT, b"x"))


class OfficialClientStreamTests(TestCase):
    """
    C{@azure/web-pubsub-client}'s own group streams through the broker:
    the receiver gets each stream whole and in order, the aborted one with
    its error; with the sender's socket cut twice mid-stream (the reliable
    protocol), nothing is lost or repeated.
    """

    timeout = 90

    @defer.inlineCallbacks
    def streamThrough(self, fragments, pause, cut=0):
        requireNode("@azure/web-pubsub-client")
        broker = yield BrokerHarness(self, reactor, TOML).start()
        hub = broker.core.hub("chat")
        sender = f"{broker.url}/client/hubs/chat?access_token=" + broker.token(
            userId="sender", roles=(SEND,))
        receiver = f"{broker.url}/client/hubs/chat?access_token=" + broker.token(
            userId="receiver", roles=(JOIN,))
        node = JSONLines()
        spawnNode(self, node, "stream_client.js", sender, receiver, str(fragments), str(pause))
        for _ in range(400):
            if node.events("ready") or node.ended.called:
                break
            yield later()
        self.assertTrue(node.events("ready"), (node.lines, node.stderr.decode()[-2000:]))
        (senderSession,) = [s for s in hub.sessions() if s.userId == "sender"]
        cuts = 0
        for _ in range(cut):
            yield later(pause * fragments / 1000 / (cut + 1))
            protocol = senderSession.connection.protocol
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abortConnection()
                cuts += 1
        self.assertEqual(cuts, cut)
        for _ in range(600):
            if node.events("done") or node.events("failed") or node.ended.called:
                break
            yield later()
        self.assertEqual(node.events("failed"), [], node.stderr.decode()[-2000:])
        got = {e["streamId"]: e for e in node.events("stream")}
        whole = got["whole"]
        self.assertIsNone(whole["error"])
        self.assertEqual([p[:2] for p in whole["parts"]],
                         [["text", f"f{i}"] for i in range(fragments)]
                         + [["json", {"n": 1}], ["binary", base64.b64encode(
                             b"\x00\x01\xff").decode()]])
        self.assertEqual([p[2] for p in whole["parts"]], list(range(1, fragments + 3)))
        broken = got["broken"]
        self.assertEqual([p[:2] for p in broken["parts"]], [["text", "partial"]])
        self.assertEqual((broken["error"]["name"], broken["error"]["message"]),
                         ("Aborted", "went wrong"))
        self.assertEqual(len(senderSession.connection.streams), 0)

    def test_streams(self):
        return self.streamThrough(fragments=5, pause=0)

    def test_streamsThroughCutSockets(self):
        return self.streamThrough(fragments=40, pause=50, cut=2)
