"""
Strict JSON (L{broker.core.jsonstrict}) on the peer-groups wires, over
real sockets: WebSocket text frames and length-prefixed TCP messages.
"""

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from tests.pgharness import PeerBroker

NOT_JSON = [
    (b"NaN", "NaN is not JSON"),
    (b'{"id":1,"method":"startup","params":{"application":Infinity}}',
     "Infinity is not JSON"),
    (b'{"id":2,"method":"ping","params":{},"x":-Infinity}', "-Infinity is not JSON"),
    (b'{"id":3,"method":"startup","params":{"n":1e400}}', "number out of range"),
    (b'{"id":4,"id":5,"method":"startup","params":{}}', "duplicate key 'id'"),
    (b"[" * 65 + b"]" * 65, "nesting deeper than 64 levels"),
    (b"[" * 100000 + b"]" * 100000, "nesting deeper than 64 levels"),
    (b'{"id":6,"method":"\\ud800","params":{}}', "lone surrogate"),
    (b"\xef\xbb\xbf{}", "byte order mark"),
    (b'{"id":7,"method":"\xff","params":{}}', "invalid UTF-8"),
]


class StrictWireTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield PeerBroker(self, reactor).start()

    @defer.inlineCallbacks
    def check(self, transport):
        """
        Each message that is not strict JSON is answered with E_INVALIDARG
        (id null: it could not be read) naming why; the session goes on.
        """
        client = yield self.broker.connect(transport)
        answers = []
        original = client.received
        client.received = lambda obj: (answers.append(obj), original(obj))
        # The protocol under the client, to send raw bytes.
        proto = client._sendObject.__closure__[0].cell_contents
        # Over WebSocket, a text frame that is not UTF-8 never reaches the
        # session: the WebSocket layer closes it with 1007.
        cases = NOT_JSON if transport == "tcp" else NOT_JSON[:-1]
        for data, _ in cases:
            if transport == "ws":
                proto.sendMessage(data, False)
            else:
                proto.sendString(data)
        yield client.sync()
        errors = [a for a in answers if "error" in a]
        self.assertEqual([(e["id"], e["error"]["name"]) for e in errors],
                         [(None, "E_INVALIDARG")] * len(cases))
        for e, (_, why) in zip(errors, cases):
            self.assertIn(why, e["error"]["message"])
        yield client.startup("default")

    def test_webSocket(self):
        return self.check("ws")

    def test_stream(self):
        return self.check("tcp")
