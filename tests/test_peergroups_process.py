# -*- test-case-name: tests.test_peergroups_process -*-
"""
The peer-groups face in a real C{twistd broker} killed with SIGKILL while a
peer pipelines record writes: every record the broker acknowledged is there
after the restart, and so are the group and its memberships.
"""

from twisted.internet import defer, reactor
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from broker.peergroups import constants as C
from broker.peergroups.client import Identity, connectStream
from tests.test_tap import TwistdTestsMixin

RECORD_TYPE = "11111111-2222-3333-4444-555555555555"
LISTENERS = ["peergroups.listen[0]", "peergroups.tcp_listen[0]", "admin.listen[0]"]


def writeConfig(testCase):
    directory = FilePath(testCase.mktemp())
    directory.makedirs()
    path = directory.child("broker.toml")
    path.setContent(
        f'[broker]\nstate_dir = "{directory.child("state").path}"\n'
        '[admin]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
        '[webpubsub]\nenabled = false\n'
        '[peergroups]\nenabled = true\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
        'tcp_listen = ["tcp:0:interface=127.0.0.1"]\n'.encode())
    return directory, path


class SigkillTests(TwistdTestsMixin, TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def start(self):
        proc = self.spawn(["-n", "--pidfile=", "broker", "--config", self.config.path],
                          self.directory, LISTENERS)
        ports = yield proc.listening
        return proc, ports

    @defer.inlineCallbacks
    def peer(self, ports, identity):
        client = yield connectStream(
            reactor, f"tcp:127.0.0.1:{ports['peergroups.tcp_listen[0]']}")
        self.addCleanup(client.disconnect)
        yield client.startup("default")
        yield client.registerIdentity(identity)
        return client

    @defer.inlineCallbacks
    def online(self, client, handle):
        reg = yield client.registerEvent(handle, [C.EVENT_STATUS_CHANGED])
        yield client.connect(handle)
        yield client.nextEvent(reg, C.EVENT_STATUS_CHANGED)

    @defer.inlineCallbacks
    def test_acknowledgedRecordsSurvive(self):
        """
        200 pipelined addRecord requests; SIGKILL once 50 are acknowledged:
        after a restart the administrator reopens the group (no invitation)
        and finds every acknowledged record, and the invited member reopens
        it too.
        """
        self.directory, self.config = writeConfig(self)
        proc, ports = yield self.start()
        alice = Identity.generate("alice", "Alice")
        bob = Identity.generate("bob", "Bob")
        admin = yield self.peer(ports, alice)
        handle = yield admin.create(friendlyName="Durable")
        gpn = admin.groupPeerName(handle)
        yield self.online(admin, handle)
        member = yield self.peer(ports, bob)
        bobHandle = yield member.join((yield admin.createInvitation(handle,
                                                                    bob.identityInfo())))
        yield self.online(member, bobHandle)

        acknowledged = []
        enough = defer.Deferred()

        def acked(recordId):
            acknowledged.append(recordId)
            if len(acknowledged) == 50 and not enough.called:
                enough.callback(None)
        for i in range(200):
            d = admin.addRecord(handle, RECORD_TYPE, b"record %d" % i)
            d.addCallbacks(acked, lambda f: None)
        yield enough
        proc.transport.signalProcess("KILL")
        yield proc.ended
        yield admin.closed
        kept = list(acknowledged)
        self.assertGreaterEqual(len(kept), 50)

        proc, ports = yield self.start()
        admin = yield self.peer(ports, alice)
        handle = yield admin.open(gpn)
        yield self.online(admin, handle)
        stored = {r["id"] for r in (yield admin.enumRecords(handle))}
        self.assertEqual(set(kept) - stored, set())
        member = yield self.peer(ports, bob)
        bobHandle = yield member.open(gpn)
        yield self.online(member, bobHandle)
        seen = {r["id"] for r in (yield member.enumRecords(bobHandle))}
        self.assertEqual(seen, stored)
