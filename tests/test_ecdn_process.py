# -*- test-case-name: tests.test_ecdn_process -*-
"""
Two real broker processes sharing one eCDN key ring: a token made by one
decrypts on the other, and a key rotation takes effect on C{SIGHUP}.
"""

import os

import treq
from twisted.internet import defer, reactor, task
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from broker.ecdn.keyring import newKeyLine
from tests.test_tap import TwistdTestsMixin

SDP = "v=0\r\nc=IN IP4 10.20.30.40\r\na=candidate:1 1 udp 1 10.20.30.40 5000 typ host\r\n"

CONFIG = """\
[broker]
state_dir = "{state}"
[admin]
listen = ["tcp:0:interface=127.0.0.1"]
[webpubsub]
enabled = false
[ecdn]
enabled = true
listen = ["tcp:0:interface=127.0.0.1"]
key_file = "{keys}"
rules_file = "{rules}"
"""


class TwoInstancesTests(TwistdTestsMixin, TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.directory = FilePath(self.mktemp())
        self.directory.makedirs()
        self.keys = self.directory.child("keys.txt")
        self.first = newKeyLine("k1")
        self.keys.setContent((self.first + "\n").encode())
        os.chmod(self.keys.path, 0o600)
        self.rules = self.directory.child("rules.txt")
        self.rules.setContent(b"10.0.0.0/8 allow corp\n")
        self.procs, self.ports = [], []
        for name in ("a", "b"):
            config = self.directory.child(f"{name}.toml")
            config.setContent(CONFIG.format(state=self.directory.child(name).path,
                                            keys=self.keys.path,
                                            rules=self.rules.path).encode())
            proc = self.spawn(["-n", "--pidfile=", "broker", "--config", config.path],
                              self.directory, ["ecdn.listen[0]", "admin.listen[0]"])
            ports = yield proc.listening
            self.procs.append(proc)
            self.ports.append(ports["ecdn.listen[0]"])

    @defer.inlineCallbacks
    def call(self, instance, endpoint, body):
        response = yield treq.post(f"http://127.0.0.1:{self.ports[instance]}/v1/{endpoint}",
                                   json=body, reactor=reactor, persistent=False,
                                   headers={"Origin": "https://meet.google.com"})
        self.assertEqual(response.code, 200)
        return (yield response.json())

    @defer.inlineCallbacks
    def hangup(self, instance, expect):
        """
        SIGHUP one instance and wait until it logs C{expect}.
        """
        proc = self.procs[instance]
        before = len(proc.lines())
        proc.transport.signalProcess("HUP")
        for _ in range(100):
            if any(expect in line for line in proc.lines()[before:]):
                return proc.lines()[before:]
            yield deferLater(0.05)
        self.fail(f"no {expect!r} after SIGHUP:\n{proc.text()}")

    @defer.inlineCallbacks
    def test_sharedKeyRingAndRotation(self):
        # Offer encrypted by A, decrypted by B, and the other way round.
        offer = yield self.call(0, "encrypt-sdp", {"data": SDP})
        back = yield self.call(1, "decrypt-sdp", {"data": offer["result"]})
        self.assertEqual(back, {"result": SDP, "error": None})
        answer = yield self.call(1, "encrypt-sdp", {"data": SDP + "a=answer\r\n"})
        back = yield self.call(0, "decrypt-sdp", {"data": answer["result"]})
        self.assertEqual(back["result"], SDP + "a=answer\r\n")

        # Rotate: k2 encrypts, k1 still decrypts.  Only A has reloaded.
        kid, secret, _ = self.first.split()
        self.keys.setContent(f"{newKeyLine('k2')}\n{kid} {secret} decrypt\n".encode())
        yield self.hangup(0, "ecdn: rules and keys reloaded")
        rotated = yield self.call(0, "encrypt-sdp", {"data": SDP})
        self.assertTrue(rotated["result"].startswith("v1.k2."))
        refused = yield self.call(1, "decrypt-sdp", {"data": rotated["result"]})
        self.assertEqual(refused, {"result": None, "error": "token key unknown"})
        yield self.hangup(1, "ecdn: rules and keys reloaded")
        accepted = yield self.call(1, "decrypt-sdp", {"data": rotated["result"]})
        self.assertEqual(accepted["result"], SDP)
        old = yield self.call(1, "decrypt-sdp", {"data": offer["result"]})
        self.assertEqual(old["result"], SDP)

    @defer.inlineCallbacks
    def test_badReloadKeepsServing(self):
        """
        A broken rules file on SIGHUP is refused in one line naming its
        line; the instance keeps its rules and keeps serving.
        """
        self.rules.setContent(b"10.0.0.0/8 allow corp\n10.0.0.0/99 allow x\n")
        lines = yield self.hangup(0, "ecdn reload refused")
        refused = [line for line in lines if "ecdn reload refused" in line]
        self.assertEqual(len(refused), 1)
        self.assertIn("rules.txt:2", refused[0])
        self.assertNotIn("Traceback", "\n".join(lines))
        body = yield self.call(0, "get-peering-group",
                               {"availableIPs": [{"format": "ipv4", "address": "10.1.1.1"}]})
        self.assertEqual(body, {"allowed": True, "result": "corp", "error": None})


def deferLater(seconds):
    return task.deferLater(reactor, seconds, lambda: None)
