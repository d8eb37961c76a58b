# -*- test-case-name: tests.test_peergroups_browser -*-
"""
A browser is a peer: headless Chromium loads a page that imports the
broker's own C{/peergroups/peergroup.js}, makes an Ed25519 identity with
WebCrypto, joins with an invitation a Python administrator made for it,
publishes a record and exchanges direct data with the administrator.
"""

import json
import os

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from broker.peergroups import constants as C
from broker.peergroups import credentials as cred
from tests.test_peergroups import DATA, T1, Base
from tests.tools import startChromium

PAGE = """<!doctype html>
<html><body><script type="module">
const config = %(config)s;
const report = (obj) => fetch("/report", {method: "POST", body: JSON.stringify(obj)});
try {
  const {Identity, PeerGroupClient, EVENT} = await import(config.library);
  const me = await Identity.generate("browser", "Chromium");
  const pg = await PeerGroupClient.connect(config.ws);
  await pg.startup("default");
  const peerName = await pg.registerIdentity(me);
  const answer = await fetch("/invitation", {method: "POST", body: await me.identityInfo()});
  const h = await pg.join(await answer.text());
  const reg = await pg.registerEvent(h, [EVENT.STATUS_CHANGED, EVENT.DIRECT_CONNECTION,
                                         EVENT.INCOMING_DATA]);
  await pg.connect(h);
  const status = await pg.nextEvent(reg, EVENT.STATUS_CHANGED);
  const recordId = await pg.addRecord(h, config.recordType,
                                      new TextEncoder().encode("from chromium"), {
    attributes: '<attributes><attribute name="origin">browser</attribute></attributes>'});
  const cid = await pg.openDirectConnection(h, config.admin);
  const opened = await pg.nextEvent(reg, EVENT.DIRECT_CONNECTION);
  await pg.sendData(h, cid, config.dataType, new TextEncoder().encode("hello from chromium"));
  const incoming = await pg.nextEvent(reg, EVENT.INCOMING_DATA);
  await report({peerName, computed: me.peerName, status: status.status, recordId,
                opened: opened.connectionChangeData.status, cid,
                reply: new TextDecoder().decode(
                  Uint8Array.from(atob(incoming.incomingData.data), (c) => c.charCodeAt(0)))});
  await pg.disconnect();
} catch (e) {
  await report({error: String(e && (e.stack || e))});
}
</script></body></html>
"""


class _Page(Resource):
    """
    The page's own origin: serves it, turns its identity info into an
    invitation (from the administrator), and takes its report.
    """

    isLeaf = True

    def __init__(self, config, invite):
        super().__init__()
        self.config = config
        self.invite = invite
        self.report = defer.Deferred()

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return (PAGE % {"config": json.dumps(self.config)}).encode()

    def render_POST(self, request):
        body = request.content.read().decode("utf-8")
        if request.path == b"/report":
            if not self.report.called:
                self.report.callback(json.loads(body))
            return b"thanks"
        d = self.invite(body)

        def answer(invitation):
            request.write(invitation.encode("utf-8"))
            request.finish()

        def failed(f):
            request.setResponseCode(500)
            request.finish()
            self.report.called or self.report.errback(f)
        d.addCallbacks(answer, failed)
        return NOT_DONE_YET


class BrowserPeerTests(Base, TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_browserJoinsAndTalks(self):
        admin = yield self.group()
        port = self.broker.wsPort.getHost().port
        config = {"library": f"http://127.0.0.1:{port}/peergroups/peergroup.js",
                  "ws": self.broker.wsURL, "admin": admin.name, "recordType": T1,
                  "dataType": DATA}
        page = _Page(config, lambda info: admin.client.createInvitation(admin.handle, info))
        pagePort = reactor.listenTCP(0, Site(page), interface="127.0.0.1")
        self.addCleanup(pagePort.stopListening)

        browser = startChromium(self, reactor, f"http://localhost:{pagePort.getHost().port}/")

        # The browser's record reaches the administrator, then its data;
        # the administrator answers on the same direct connection.
        changed = yield admin.next(C.EVENT_RECORD_CHANGED)
        record = yield admin.client.getRecord(admin.handle,
                                              changed["recordChangeData"]["recordId"])
        self.assertEqual(cred.unb64(record["data"]), b"from chromium")
        incoming = yield admin.next(C.EVENT_INCOMING_DATA)
        self.assertEqual(cred.unb64(incoming["incomingData"]["data"]), b"hello from chromium")
        yield admin.client.sendData(admin.handle, incoming["incomingData"]["connectionId"],
                                    DATA, b"hello from python")

        report = yield page.report
        self.assertNotIn("error", report, browser.tail())
        self.assertEqual(report["peerName"], report["computed"])
        self.assertEqual(report["status"], C.STATUS_LISTENING | C.STATUS_HAS_CONNECTIONS)
        self.assertEqual(report["recordId"], changed["recordChangeData"]["recordId"])
        self.assertEqual(record["creatorId"], report["peerName"])
        self.assertEqual(report["opened"], C.PEER_CONNECTED)
        self.assertEqual(report["cid"], incoming["incomingData"]["connectionId"])
        self.assertEqual(report["reply"], "hello from python")
        found = yield admin.client.searchRecords(
            admin.handle, '<peersearch><clause attrib="origin">browser</clause></peersearch>')
        self.assertEqual([r["id"] for r in found], [report["recordId"]])


class _Reports(Resource):
    """
    Takes what the demo page posts (C{?report=}): one Deferred per post.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.posts = defer.DeferredQueue()

    def render_POST(self, request):
        self.posts.put(json.loads(request.content.read().decode("utf-8")))
        return b"ok"


class BrowserDemoTests(Base, TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_demoPageReopensAfterRestart(self):
        """
        The broker's C{/peergroups/demo.html} runs the demo in Chromium;
        Chromium started again on the same profile runs it with the same
        identities, reopening the group without an invitation.
        """
        reports = _Reports()
        reportPort = reactor.listenTCP(0, Site(reports), interface="127.0.0.1")
        self.addCleanup(reportPort.stopListening)
        from broker.peergroups.demo import browserDemoURL
        port = self.broker.wsPort.getHost().port
        page = browserDemoURL(self.broker.wsURL)
        self.assertEqual(page, f"http://127.0.0.1:{port}/peergroups/demo.html")
        url = f"{page}?report=http://127.0.0.1:{reportPort.getHost().port}/"
        profile = os.path.abspath(self.mktemp())
        os.makedirs(profile)
        browser = startChromium(self, reactor, url, profile=profile)
        first = yield reports.posts.get()
        self.assertEqual(first[-1], "done", browser.tail())
        self.assertIn("(new)", first[0])
        self.assertTrue(any(line.startswith("Alice created group") for line in first), first)
        self.assertIn("Mallory (never invited) is refused: PEER_E_NOT_FOUND", first)
        browser.transport.signalProcess("TERM")
        yield browser.ended

        again = startChromium(self, reactor, url, profile=profile)
        second = yield reports.posts.get()
        self.assertEqual(second[-1], "done", again.tail())
        self.assertEqual(second[0], first[0].replace("(new)", "(kept by this browser)"))
        self.assertIn("Bob reopened the group with the membership this browser kept", second)
        self.assertTrue(any("found 2 note(s)" in line for line in second), second)
