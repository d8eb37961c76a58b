# -*- test-case-name: tests.test_ecdn_browser -*-
"""
A real browser (headless Chromium, Debian's C{chromium}) calls the eCDN API
from a page of another origin, as Meet's JavaScript does: the CORS
preflight and the cross-origin POST must both succeed.
"""

import json
from urllib.parse import parse_qs

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.test_ecdn import EcdnServer
from tests.tools import startChromium

PAGE = """<!doctype html>
<html><body><script>
const api = %(api)s;
fetch(api + "/v1/get-peering-group", {
  method: "POST", credentials: "include",
  headers: {"Content-Type": "application/json"},
  body: JSON.stringify({availableIPs: [{format: "ipv4", address: "10.0.0.5"}]}),
}).then(r => r.json())
  .then(j => fetch("/report?result=" + encodeURIComponent(JSON.stringify(j))))
  .catch(e => fetch("/report?error=" + encodeURIComponent(String(e))));
</script></body></html>
"""


class _Page(Resource):
    """
    The other origin: serves the page and receives its report.
    """

    isLeaf = True

    def __init__(self, api):
        super().__init__()
        self.api = api
        self.report = defer.Deferred()

    def render_GET(self, request):
        if request.path == b"/report":
            query = parse_qs(request.uri.split(b"?", 1)[1].decode())
            if not self.report.called:
                self.report.callback({k: v[0] for k, v in query.items()})
            return b"thanks"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return (PAGE % {"api": json.dumps(self.api)}).encode()


class BrowserTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_crossOriginPost(self):
        pagePort = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        pageOrigin = f"http://127.0.0.1:{pagePort.getHost().port}"
        yield pagePort.stopListening()
        ecdn = EcdnServer(self, allowed_origins=[pageOrigin])
        # Another origin: another host name and port than the page's.
        api = ecdn.base.replace("127.0.0.1", "localhost")
        seen = []
        preflight = ecdn.resource._preflight

        def recordPreflight(request):
            seen.append((request.method, request.path,
                         request.getHeader(b"access-control-request-headers")))
            return preflight(request)
        ecdn.resource._preflight = recordPreflight

        page = _Page(api)
        pagePort = reactor.listenTCP(int(pageOrigin.rsplit(":", 1)[1]), Site(page),
                                     interface="127.0.0.1")
        self.addCleanup(pagePort.stopListening)

        browser = startChromium(self, reactor, pageOrigin + "/")

        report = yield page.report
        self.assertNotIn("error", report, browser.tail())
        self.assertEqual(json.loads(report["result"]),
                         {"allowed": True, "result": "floor1", "error": None})
        # The browser asked first, for the JSON content type.
        self.assertEqual(len(seen), 1, seen)
        method, path, headers = seen[0]
        self.assertEqual((method, path), (b"OPTIONS", b"/v1/get-peering-group"))
        self.assertIn(b"content-type", headers.lower())
