"""
What the browser peer tests share: a page origin that serves test pages
(each a module script importing the broker's own C{/peergroups/peergroup.js}),
mailboxes through which pages and the test pass invitations and names, and
the pages' reports.
"""

import json

from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

# Every page starts with this: its config, mailboxes (put/get), its
# report, and failure(), which turns a rejected call into [name, hr,
# message] (or "no error" when it did not fail).
PRELUDE = """
const config = %(config)s;
const page = %(page)s;
const toJSON = (obj) => JSON.stringify(obj, (k, v) => (typeof v === "bigint" ? String(v) : v));
const report = (obj) => fetch("/report/" + page, {method: "POST", body: toJSON(obj)});
const put = (name, value) => fetch("/box/" + name, {method: "POST", body: value});
const get = async (name) => (await fetch("/box/" + name)).text();
async function failure(promise) {
  try { await promise; return "no error"; } catch (e) { return [e.name, e.hr, e.message]; }
}
const text = (bytes) => new TextDecoder().decode(bytes);
"""

TEMPLATE = """<!doctype html>
<html><body><script type="module">
%(prelude)s
try {
  const lib = await import(config.library);
  const {Identity, PeerGroupClient, EVENT, ROLE} = lib;
%(body)s
} catch (e) {
  await report({error: String(e && (e.stack || e)), name: e && e.name});
}
</script></body></html>
"""


class Pages(Resource):
    """
    The pages' origin: C{GET /<page>.html} serves a page, C{POST /box/N}
    and C{GET /box/N} (answered once N has a value) pass values, C{POST
    /report/<page>} takes a page's result.
    """

    isLeaf = True

    def __init__(self, config, bodies):
        super().__init__()
        self.config = config
        self.bodies = bodies
        self.values = {}
        self.waiters = {}
        self.port = None

    def url(self, page, query=""):
        return f"http://localhost:{self.port}/{page}.html{query}"

    def put(self, name, value):
        self.values[name] = value
        for d in self.waiters.pop(name, []):
            d.callback(value)

    def get(self, name):
        if name in self.values:
            return defer.succeed(self.values[name])
        d = defer.Deferred()
        self.waiters.setdefault(name, []).append(d)
        return d

    def report(self, page):
        """
        @return: a Deferred firing with the page's report (a dict).
        """
        return self.get("report:" + page).addCallback(json.loads)

    def render_GET(self, request):
        path = request.path.decode()
        if path.startswith("/box/"):
            def answer(value):
                request.write(value.encode("utf-8"))
                request.finish()
            self.get(path[len("/box/"):]).addCallback(answer)
            return NOT_DONE_YET
        page = path.strip("/").removesuffix(".html")
        if page not in self.bodies:
            request.setResponseCode(404)
            return b"no such page"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        prelude = PRELUDE % {"config": json.dumps(self.config), "page": json.dumps(page)}
        return (TEMPLATE % {"prelude": prelude, "body": self.bodies[page]}).encode()

    def render_POST(self, request):
        path = request.path.decode()
        body = request.content.read().decode("utf-8")
        if path.startswith("/report/"):
            self.put("report:" + path[len("/report/"):], body)
        elif path.startswith("/box/"):
            self.put(path[len("/box/"):], body)
        else:
            request.setResponseCode(404)
        return b"ok"


def pageOrValue(testCase, d, pages, *names):
    """
    C{d}'s result, or a test failure if one of the pages C{names} reports
    first (it failed before giving what the test waits for).
    """
    out = defer.Deferred()

    def value(v):
        if not out.called:
            out.callback(v)

    def reported(report, name):
        if not out.called:
            out.errback(testCase.failureException(f"page {name} ended first: {report}"))

    d.addCallback(value)
    for name in names:
        pages.report(name).addCallback(reported, name)
    return out
