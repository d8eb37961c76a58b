"""
Outside tools some tests drive (chromium, node with npm packages): skipped
where they are missing, unless C{BROKER_TEST_REQUIRE_TOOLS} is set, as
scripts/test sets it after installing them, so CI never passes by skipping.
"""

import json
import os
import shutil
import tempfile

from twisted.internet import defer, error, protocol
from twisted.trial.unittest import FailTest, SkipTest
from twisted.web.resource import Resource


def requireTool(present, why):
    """
    Go on if C{present}; otherwise skip, or fail under scripts/test.
    """
    if present:
        return
    if os.environ.get("BROKER_TEST_REQUIRE_TOOLS"):
        raise FailTest(f"{why} (BROKER_TEST_REQUIRE_TOOLS is set)")
    raise SkipTest(why)


def killAtCleanup(testCase, transport, ended):
    """
    When the test ends, SIGKILL the process behind C{transport} (if it is
    still running) and wait for C{ended}, so no child outlives its test.
    """
    def kill():
        if not ended.called:
            try:
                transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass
        return ended
    testCase.addCleanup(kill)


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class _Browser(protocol.ProcessProtocol):
    def __init__(self):
        self.ended = defer.Deferred()
        self.output = b""

    def childDataReceived(self, fd, data):
        self.output = (self.output + data)[-20000:]

    def processEnded(self, reason):
        self.ended.callback(None)

    def tail(self):
        return self.output.decode("utf-8", "replace")[-2000:]


def startChromium(testCase, reactor, url, profile=None, extraArgs=()):
    """
    Headless Chromium on C{url} with a throwaway profile, killed when the
    test ends (skipped, or failed under scripts/test, without chromium).

    @param profile: a C{--user-data-dir} the caller keeps (and removes), so
        a second Chromium started on it finds the first one's IndexedDB.
    @param extraArgs: more switches (C{--remote-debugging-port=0} for
        L{tests.devtools}).
    @return: its process protocol: C{output} is what it printed,
        C{transport} the process (C{signalProcess("TERM")} ends it cleanly).
    """
    requireTool(os.path.exists(CHROMIUM),
                "no chromium here (scripts/test installs Debian's chromium)")
    if profile is None:
        profile = tempfile.mkdtemp(prefix="broker-chromium-")
        testCase.addCleanup(shutil.rmtree, profile, True)
    browser = _Browser()
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", *extraArgs, url]
    transport = reactor.spawnProcess(browser, CHROMIUM, args, env=dict(os.environ))
    killAtCleanup(testCase, transport, browser.ended)
    return browser


class PageReports(Resource):
    """
    C{POST} here: the reports of a page under test, each a JSON object the
    page numbered with C{seq} (its fetches may arrive out of order).
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.received = []

    def render_POST(self, request):
        self.received.append(json.loads(request.content.read()))
        return b"ok"

    def events(self, kind=None):
        """The reports in the page's order, those of C{event} C{kind}."""
        ordered = sorted(self.received, key=lambda e: e["seq"])
        return [e for e in ordered if kind is None or e["event"] == kind]


class Page(Resource):
    """
    A page under test: C{html} on C{GET}, its children (scripts, the
    reports) beside it.
    """

    def __init__(self, html):
        super().__init__()
        self.html = html.encode("utf-8")

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return self.html
