# -*- test-case-name: tests.test_webpubsub_browser -*-
"""
Microsoft's client SDK in a real browser (headless Chromium): the page
loads C{@azure/web-pubsub-client}, bundled for the browser by esbuild from
tests/js, and uses it as a web application does: the reliable protocol by
default over the browser's own WebSocket (from another origin than the
broker's), a group joined and sent to, server messages, and a socket cut
under it that it recovers without losing or repeating a message.
"""

import json
import os
import tempfile

from twisted.internet import defer, reactor, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.server import Site
from twisted.web.static import File

from broker.core.message import TEXT, Message, Target
from tests.nodejs import JS_DIR, requireNode
from tests.tools import Page, PageReports, startChromium
from tests.wsharness import BrokerHarness

TOML = """
[webpubsub]
recovery_window = 10.0
"""

PAGE = """<!doctype html>
<html><body><script src="/wps.js"></script><script>
let seq = 0;
const report = (e) => fetch("/event", {method: "POST",
                                       body: JSON.stringify({seq: seq++, ...e})});
const client = new AzureWPS.WebPubSubClient(%(url)s);
client.on("connected", (e) => report({event: "connected", connectionId: e.connectionId,
                                      userId: e.userId}));
client.on("disconnected", (e) => report({event: "disconnected"}));
client.on("group-message", (e) => report({event: "group", group: e.message.group,
                                          data: e.message.data}));
client.on("server-message", (e) => report({event: "server", data: e.message.data}));
(async () => {
  await client.start();
  await client.joinGroup("g");
  await client.sendToGroup("g", "from the browser", "text");
  report({event: "ready"});
})().catch((e) => report({event: "error", message: String(e)}));
</script></body></html>
"""


@defer.inlineCallbacks
def bundle(testCase):
    """
    esbuild's browser bundle of tests/js/wps_browser_entry.js, in a
    temporary directory; its path.
    """
    requireNode("esbuild", "@azure/web-pubsub-client")
    directory = tempfile.mkdtemp(prefix="broker-wps-bundle-")
    testCase.addCleanup(lambda: [os.remove(os.path.join(directory, f))
                                 for f in os.listdir(directory)] and os.rmdir(directory))
    out = os.path.join(directory, "wps.js")
    # Its own executable: the native binary once its install step has run,
    # else a node script that finds it.
    esbuild = os.path.join(JS_DIR, "node_modules", "esbuild", "bin", "esbuild")
    stdout, stderr, code = yield getProcessOutputAndValue(
        esbuild, ["wps_browser_entry.js", "--bundle", "--format=iife",
               "--global-name=AzureWPS", "--platform=browser", f"--outfile={out}",
               "--log-level=warning"],
        env={"PATH": os.environ.get("PATH", "")}, path=JS_DIR, reactor=reactor)
    testCase.assertEqual(code, 0, stderr.decode()[-2000:])
    return out


class BrowserClientTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def until(self, predicate, what, timeout=30):
        for _ in range(int(timeout / 0.05)):
            if predicate():
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail(f"timed out waiting for {what}; the page said "
                  f"{self.page.events()}; the browser: {self.browser.tail()}")

    @defer.inlineCallbacks
    def test_reliableClientInTheBrowser(self):
        script = yield bundle(self)
        broker = yield BrokerHarness(self, reactor, TOML).start()
        hub = broker.core.hub("chat")
        url = f"{broker.url}/client/hubs/chat?access_token=" + broker.token(
            userId="browser", roles=("webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"))

        root = Page(PAGE % {"url": json.dumps(url)})
        self.page = PageReports()
        root.putChild(b"event", self.page)
        root.putChild(b"wps.js", File(script, defaultType="text/javascript"))
        root.putChild(b"", root)
        site = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(site.stopListening)
        # Another origin than the broker's: localhost, not 127.0.0.1.
        self.browser = startChromium(self, reactor,
                                     f"http://localhost:{site.getHost().port}/")

        yield self.until(lambda: self.page.events("ready") or self.page.events("error"),
                         "the client to start")
        self.assertEqual(self.page.events("error"), [])
        (session,) = hub.sessions()
        cid = session.connectionId
        self.assertEqual([(e["connectionId"], e["userId"])
                          for e in self.page.events("connected")], [(cid, "browser")])
        hub.send(Target(Target.GROUP, "g"), Message(TEXT, b"m2"))
        hub.send(Target(Target.USER, "browser"), Message(TEXT, b"s1"))
        yield self.until(lambda: len(self.page.events("server")) == 1, "m2 and s1")

        # The socket cut under the page: what is published meanwhile is
        # kept, and delivered once it has recovered.
        session.connection.protocol.transport.abortConnection()
        for i in (3, 4):
            hub.send(Target(Target.GROUP, "g"), Message(TEXT, f"m{i}".encode()))
        yield self.until(lambda: len(self.page.events("group")) == 4, "m3 and m4")
        yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual([e["data"] for e in self.page.events("group")],
                         ["from the browser", "m2", "m3", "m4"])
        (after,) = hub.sessions()
        self.assertEqual(after.connectionId, cid)
        self.assertEqual(len(self.page.events("connected")), 1)
