# -*- test-case-name: tests.test_peergroups -*-
"""
A request's parameters checked by type (each failure an C{E_INVALIDARG}
naming the parameter), and a handler's L{Reply}: what every part of the
session API (L{broker.peergroups.session}) shares.
"""

from broker.peergroups import constants as C
from broker.peergroups import credentials as cred
from broker.peergroups.errors import PeerError

STORE_DOWN = ("the cluster store (Redis) is unreachable: nothing was changed; "
              "retry once it is back")
# A write cut off in flight: Redis may have executed it (and will then
# raise it as an event on every node once it is back), so a retry could
# make it twice.
STORE_LOST = ("the cluster store (Redis) went away while the change was being written: "
              "it may or may not have been stored; once Redis is back, read before "
              "retrying (a stored change is then raised as an event)")


class Reply:
    """
    A handler's answer: C{result}, a success HRESULT other than S_OK, and
    C{after}, run once the answer is written (events the caller must see
    after the answer, as the Windows API raises them after the call).
    """

    def __init__(self, result=None, hr="S_OK", after=None):
        self.result = result if result is not None else {}
        self.hr = hr
        self.after = after


def param(params, name, kind, required=True, default=None):
    value = params.get(name, None)
    if value is None:
        if required:
            raise PeerError("E_INVALIDARG", f"{name} is required")
        return default
    if kind is int:
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise PeerError("E_INVALIDARG", f"{name} must be an integer")
    elif not isinstance(value, kind):
        raise PeerError("E_INVALIDARG", f"{name} has the wrong type")
    return value


def guidParam(params, name, required=True):
    value = params.get(name)
    if value is None and not required:
        return None
    g = C.normGUID(value)
    if g is None:
        raise PeerError("E_INVALIDARG", f"{name} must be a GUID")
    return g


def bytesParam(params, name, limit=None):
    value = params.get(name)
    if value is None:
        return b""
    try:
        data = cred.unb64(value, name)
    except ValueError as e:
        raise PeerError("E_INVALIDARG", str(e))
    return data


def connectionIdParam(params):
    value = params.get("connectionId")
    try:
        cid = int(value)
    except (TypeError, ValueError):
        raise PeerError("E_INVALIDARG", "connectionId must be a 64-bit integer (string)")
    return cid
