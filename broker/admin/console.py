# -*- test-case-name: tests.test_admin_api -*-
"""
The admin console's static files (C{broker/admin/static/}: one page, one
script, one style sheet; no build step, no CDN), served at the admin
listener's C{/} and C{/static/<name>} with a strict Content Security
Policy: scripts, styles and fetches from this origin only, no inline
script, no framing.

The files are read once, at start: package data (setup.py), so a plain
C{pip install .} serves them.
"""

import importlib.resources

from twisted.web.resource import Resource

FILES = {
    "index.html": b"text/html; charset=utf-8",
    "console.js": b"text/javascript; charset=utf-8",
    "console.css": b"text/css; charset=utf-8",
    "favicon.svg": b"image/svg+xml",
}

CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def loadFiles():
    root = importlib.resources.files("broker.admin") / "static"
    return {name: (root / name).read_bytes() for name in FILES}


def _headers(request, contentType):
    request.setHeader(b"content-type", contentType)
    request.setHeader(b"content-security-policy", CSP)
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"x-frame-options", b"DENY")
    request.setHeader(b"cache-control", b"no-cache")


class StaticFile(Resource):
    isLeaf = True

    def __init__(self, body, contentType):
        super().__init__()
        self.body = body
        self.contentType = contentType

    def render_GET(self, request):
        _headers(request, self.contentType)
        return self.body

    def render_HEAD(self, request):
        _headers(request, self.contentType)
        request.setHeader(b"content-length", b"%d" % len(self.body))
        return b""


class StaticFiles(Resource):
    """
    C{/static/<name>}: the console's assets (unknown names 404).
    """

    def __init__(self, files):
        super().__init__()
        for name, body in files.items():
            self.putChild(name.encode("ascii"), StaticFile(body, FILES[name]))


class AdminRoot(Resource):
    """
    The admin site's root: C{/} is the console's page; the probes, the API
    and the assets are its children.
    """

    def __init__(self, files):
        super().__init__()
        self.index = StaticFile(files["index.html"], FILES["index.html"])
        self.putChild(b"static", StaticFiles(files))

    def getChild(self, path, request):
        if path == b"" and not request.postpath:
            return self.index
        return super().getChild(path, request)
