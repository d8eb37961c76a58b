"""
Node.js scripts in tests/js (Microsoft's JavaScript SDKs and middleware,
installed there by scripts/test with npm ci) run as child processes that
speak JSON lines on stdout.
"""

import json
import os
import shutil

from twisted.internet import defer, protocol, reactor

from tests.tools import killAtCleanup, requireTool

JS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js")
NODE = shutil.which("node")


def requireNode(*packages):
    """
    Skip (or, with BROKER_TEST_REQUIRE_TOOLS=1, fail) without node or one
    of the npm C{packages} in tests/js.
    """
    requireTool(NODE is not None, "node is not installed (scripts/test installs nodejs)")
    for package in packages:
        requireTool(os.path.isdir(os.path.join(JS_DIR, "node_modules", *package.split("/"))),
                    f"{package} is not in tests/js (scripts/test runs npm ci)")


class JSONLines(protocol.ProcessProtocol):
    """
    A node script's stdout as JSON objects: each goes to L{lineReceived}
    (kept in C{lines} by default); C{ended} fires with the reason's value.
    """

    def __init__(self):
        self.lines = []
        self.ended = defer.Deferred()
        self._buffer = b""
        self.stderr = b""

    def outReceived(self, data):
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self.lineReceived(json.loads(line))

    def lineReceived(self, obj):
        self.lines.append(obj)

    def errReceived(self, data):
        self.stderr += data

    def processEnded(self, reason):
        self.ended.callback(reason.value)

    def events(self, kind):
        return [e for e in self.lines if e["event"] == kind]


def spawnNode(testCase, processProtocol, script, *args, env=None):
    """
    Run C{tests/js/script} under node with C{processProtocol}; it is killed,
    and waited for, when the test ends.

    @param env: variables for the script beyond C{PATH}.
    """
    process = reactor.spawnProcess(
        processProtocol, NODE, [NODE, os.path.join(JS_DIR, script), *args],
        env={"PATH": os.environ.get("PATH", ""), **(env or {})}, path=JS_DIR)
    killAtCleanup(testCase, process, processProtocol.ended)
    return process
