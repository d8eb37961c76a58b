"""
Tests for L{broker.files}, and the modes of everything a whole broker
writes into a fresh state_dir.
"""

import os
import stat

from twisted.internet import defer, reactor
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from broker import config, files, tap
from tests.iotharness import waitUntil

LOOPBACK = "tcp:0:interface=127.0.0.1"


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


class _Umask:
    """
    Run under the permissive umask 022, so a mode of 0600/0700 is the
    code's doing, not the environment's.
    """

    def setUp(self):
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)


class HelperTests(_Umask, SynchronousTestCase):
    def test_privateDirectory(self):
        base = self.mktemp()
        os.mkdir(base, 0o755)
        path = os.path.join(base, "a", "b", "c")
        files.privateDirectory(path)
        for p in (os.path.join(base, "a"), os.path.join(base, "a", "b"), path):
            self.assertEqual(mode(p), 0o700, p)
        # An existing directory keeps its mode (it may be the operator's).
        self.assertEqual(mode(base), 0o755)
        files.privateDirectory(path)

    def test_writePrivate(self):
        path = os.path.join(self.mktemp(), "keys", "k")
        files.writePrivate(path, "secret\n")
        self.assertEqual((mode(path), mode(os.path.dirname(path))), (0o600, 0o700))
        self.assertEqual(FilePath(path).getContent(), b"secret\n")
        os.chmod(path, 0o644)
        files.writePrivate(path, b"other")
        self.assertEqual((mode(path), FilePath(path).getContent()), (0o600, b"other"))
        self.assertRaises(FileExistsError, files.writePrivate, path, b"x", exclusive=True)
        self.assertEqual(FilePath(path).getContent(), b"other")

    def test_privateDatabaseNarrowsCompanions(self):
        """
        A store left 0644 by an earlier version, with its companions, is
        narrowed before SQLite opens it.
        """
        base = self.mktemp()
        os.mkdir(base)
        path = os.path.join(base, "s.sqlite")
        for p in (path, path + "-wal", path + "-shm"):
            FilePath(p).setContent(b"")
            os.chmod(p, 0o644)
        files.privateDatabase(path)
        for p in (path, path + "-wal", path + "-shm"):
            self.assertEqual(mode(p), 0o600, p)

    def test_openPrivateKeepsAnExistingMode(self):
        path = os.path.join(self.mktemp(), "events.jsonl")
        os.close(files.openPrivate(path, os.O_WRONLY | os.O_APPEND, narrow=False))
        self.assertEqual(mode(path), 0o600)
        os.chmod(path, 0o640)
        os.close(files.openPrivate(path, os.O_WRONLY | os.O_APPEND, narrow=False))
        self.assertEqual(mode(path), 0o640)


class WholeBrokerTests(_Umask, TestCase):
    """
    A broker with every face on a fresh state_dir: whatever it writes there
    is 0600 in directories 0700, the SQLite stores' WAL companions too.
    """

    @defer.inlineCallbacks
    def test_stateDirModes(self):
        directory = FilePath(self.mktemp())
        directory.makedirs()
        state = directory.child("state")
        path = directory.child("broker.toml")
        path.setContent(f'''
[broker]
state_dir = "{state.path}"
[admin]
listen = ["{LOOPBACK}"]
[webpubsub]
listen = ["{LOOPBACK}"]
[webpubsub.hubs.chat]
event_log = "{state.child("chat.jsonl").path}"
[iot]
enabled = true
listen = ["{LOOPBACK}"]
[iot.udp]
interface = "127.0.0.1"
port = 0
[iot.http]
listen = ["{LOOPBACK}"]
[ecdn]
enabled = true
listen = ["{LOOPBACK}"]
[peergroups]
enabled = true
listen = ["{LOOPBACK}"]
tcp_listen = ["{LOOPBACK}"]
'''.encode("utf-8"))
        top = tap.buildService(config.load(path.path), reactor)
        top.privilegedStartService()
        top.startService()
        stopped = []

        def stop():
            if not stopped:
                stopped.append(True)
                return top.stopService()
        self.addCleanup(stop)
        # Open stores have their -wal and -shm beside them.
        for name in ("iot.sqlite", "peergroups.sqlite"):
            yield waitUntil(reactor, lambda: state.child(name + "-wal").exists())
            self.assertTrue(state.child(name + "-shm").exists(), name)
        seen = self.assertPrivate(state)
        for name in ("webpubsub-access-key", "iot.sqlite", "iot.sqlite-wal", "iot.sqlite-shm",
                     "peergroups.sqlite", "peergroups.sqlite-wal", "peergroups.sqlite-shm",
                     "chat.jsonl"):
            self.assertIn(name, seen)
        self.assertGreaterEqual(len(seen), 12, seen)
        yield stop()
        self.assertPrivate(state)

    def assertPrivate(self, state):
        self.assertEqual(mode(state.path), 0o700)
        seen = []
        for root, dirs, names in os.walk(state.path):
            for d in dirs:
                self.assertEqual(oct(mode(os.path.join(root, d))), oct(0o700), d)
            for n in names:
                p = os.path.join(root, n)
                seen.append(os.path.relpath(p, state.path))
                self.assertEqual(oct(mode(p)), oct(0o600), seen[-1])
        return seen
