# -*- test-case-name: tests.test_version -*-
"""
Tests for L{broker.version}: the broker's version where an operator looks
for it, from a real C{twistd} process.
"""

import platform
import re

import treq
import twisted
from twisted.internet import defer, reactor
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

import broker
from broker import version
from tests.test_tap import TwistdTestsMixin, writeConfig


class VersionTests(TestCase):
    def test_oneSource(self):
        """
        setup.py reads C{broker.__version__}: both say the same.
        """
        setup = FilePath(broker.__file__).parent().sibling("setup.py").getContent()
        self.assertIn(b"version=version()", setup)
        self.assertEqual(version.brokerVersion(), broker.__version__)

    def test_versions(self):
        v = version.versions()
        self.assertEqual(v["broker"], broker.__version__)
        self.assertEqual(v["twisted"], twisted.__version__)
        self.assertEqual(v["python"], platform.python_version())


class TwistdVersionTests(TwistdTestsMixin, TestCase):
    @defer.inlineCallbacks
    def test_versionOption(self):
        """
        C{twistd broker --version} prints the broker's version, then
        Twisted's and Python's, and exits 0.
        """
        directory = FilePath(self.mktemp())
        directory.makedirs()
        proc = self.spawn(["broker", "--version"], directory)
        yield proc.ended
        self.assertEqual(proc.exitCode(), 0, proc.text())
        lines = proc.output[1].decode("utf-8").splitlines()
        self.assertEqual(lines[0], f"broker {broker.__version__}")
        self.assertEqual(lines[1], f"Twisted {twisted.__version__}")
        self.assertTrue(lines[2].startswith(f"Python {platform.python_version()} "), lines)

    @defer.inlineCallbacks
    def test_versionEverywhere(self):
        """
        A running broker says its version in its start-up log line, in
        C{/healthz} (a header; lines with C{?verbose}, the plain answer
        unchanged) and as C{broker_build_info} on C{/metrics}.
        """
        directory, path = writeConfig(self)
        proc = self.spawn(["-n", "--pidfile=", "broker", "--config", path.path],
                          directory, ["admin.listen[0]"])
        ports = yield proc.listening
        v = version.versions()
        self.assertTrue(any(line.endswith(
            f"broker {v['broker']} starting (Twisted {v['twisted']}, Python {v['python']}, "
            f"{v['platform']})") for line in proc.lines()), proc.text())
        base = f"http://127.0.0.1:{ports['admin.listen[0]']}"

        response = yield treq.get(base + "/healthz", reactor=reactor, persistent=False)
        self.assertEqual((yield treq.content(response)), b"ok\n")
        self.assertEqual(response.headers.getRawHeaders("x-broker-version"), [v["broker"]])

        response = yield treq.get(base + "/healthz?verbose", reactor=reactor,
                                  persistent=False)
        body = (yield treq.content(response)).decode("utf-8")
        self.assertEqual(body.splitlines(), [
            "ok", f"broker: {v['broker']}", f"python: {v['python']}",
            f"twisted: {v['twisted']}", f"platform: {v['platform']}"])

        response = yield treq.get(base + "/metrics", reactor=reactor, persistent=False)
        metrics = (yield treq.content(response)).decode("utf-8")
        m = re.search(r"^broker_build_info\{(.*)\} 1\.0$", metrics, re.M)
        self.assertIsNotNone(m, metrics)
        self.assertEqual(dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))), {
            "version": v["broker"], "python": v["python"], "twisted": v["twisted"],
            "platform": v["platform"]})
