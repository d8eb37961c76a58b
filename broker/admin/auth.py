# -*- test-case-name: tests.test_admin_api -*-
"""
The admin credential: one bearer token for the console, its API and every
admin endpoint that changes something.

A configured C{admin.token}, or else a random one generated once into
C{{state_dir}/admin.token} (mode 0600, never a default password): an
operator reads it from that file, the broker logs only the path.  The
console sends it as C{Authorization: Bearer <token>}; no cookie is ever
set, so a page of another origin cannot ride on a logged-in browser
(no CSRF to defend against).
"""

import hmac
import os
import secrets

from twisted.logger import Logger

from broker.core.limits import peerHost
from broker.files import writePrivate

log = Logger()

TOKEN_FILE = "admin.token"


def loadToken(configured, stateDir):
    """
    The admin token: C{configured} when set, else the generated one in
    C{stateDir} (created on first use, exclusively, so workers sharing a
    state directory agree on one).

    @return: C{(token, path)}: C{path} is the file read or written, or
        C{None} for a configured token.
    @raise OSError: the state directory cannot keep it.
    """
    if configured:
        return configured, None
    path = os.path.join(stateDir, TOKEN_FILE)
    if not os.path.exists(path):
        # Written whole under another name, then linked into place: a
        # worker starting beside this one reads either no file or the
        # whole token, never an empty one; the first link wins.
        scratch = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
        writePrivate(scratch, secrets.token_urlsafe(32) + "\n", exclusive=True)
        try:
            os.link(scratch, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(scratch)
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise OSError(f"{path} is empty; remove it to have a new token generated")
    return token, path


class Guard:
    """
    Checks a request's bearer token in constant time; refusals are 401
    with C{WWW-Authenticate: Bearer}, counted in C{refused} (by reason,
    on C{/metrics} as C{broker_admin_refused_total}) and logged through
    the core's L{broker.core.limits.QuietLog} (one line a minute), so a
    guessing bot neither learns from timing nor fills the disk.
    """

    def __init__(self, token, quietLog):
        self._token = token.encode("utf-8")
        self._quietLog = quietLog
        self.refused = {"missing": 0, "wrong": 0}

    def allows(self, request):
        """
        @return: C{True} when C{request} carries the token; else C{False},
            after answering 401 on it (headers and code; the caller writes
            the body).
        """
        header = request.getHeader(b"authorization")
        given = None
        if header:
            scheme, _, value = header.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                given = value.strip()
        if given is not None and hmac.compare_digest(given, self._token):
            return True
        reason = "missing" if given is None else "wrong"
        self.refused[reason] += 1
        self._quietLog.info(("admin", "unauthorized"),
                            "admin: refused a request without the admin token ({reason}, from "
                            "{peer}, {path})", reason=reason,
                            peer=peerHost(request.transport),
                            path=request.path.decode("ascii", "replace")[:100])
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", b'Bearer realm="broker admin"')
        request.setHeader(b"cache-control", b"no-store")
        return False
