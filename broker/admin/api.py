# -*- test-case-name: tests.test_admin_api -*-
"""
The admin JSON API under C{/api} (docs/admin.md): what the console reads
and does, every request with the admin token.

Reads come from the core's local queries (L{broker.core.hub.Hub}) and the
faces' views (L{broker.admin.interfaces.IFaceView}); actions go through the
same trusted hub verbs the Web PubSub REST API uses (C{Hub.close},
C{Hub.removeConnectionFromGroup}, C{Hub.send}) and the faces' own
operations (the IoT queue purge), so nothing is done twice.

Listings are paged without sorting: in the hub's own order (the order
connections were admitted), C{offset} and C{limit} (at most 500) over the
matches of an optional C{search} substring.  Without a search a page costs
O(offset + limit); with one, one pass over the hub (O(n), a substring test
per entry) which also yields the total.
"""

import os
from itertools import islice

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from broker.core import jsonstrict
from broker.core.errors import BrokerError, CloseCode, NotFound
from broker.core.message import Message, Target
from broker.net.http import jsonBody

log = Logger()

MAX_LIMIT = 500
DEFAULT_LIMIT = 50
# Bytes of a test message's text (the body of POST .../groups/{g}/messages).
MAX_BODY = 64 * 1024


class APIError(Exception):
    """
    Leave a handler with this HTTP status and C{{"error": {code, message}}}.
    """

    def __init__(self, status, code, message):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _int(args, name, default, maximum=None):
    text = args.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise APIError(400, "BadRequest", f"{name} must be an integer")
    if value < 0:
        raise APIError(400, "BadRequest", f"{name} must not be negative")
    return min(value, maximum) if maximum is not None else value


def page(items, args, matches, describe):
    """
    One page of C{items} (an iterable in a stable order) as
    C{{"total", "offset", "limit", "items"}}.

    @param matches: C{matches(item, needle)}: whether C{item} contains the
        (lower-cased) C{search} text.
    @param items: with a C{len}, or C{None} total when searching.
    """
    offset = _int(args, "offset", 0)
    limit = _int(args, "limit", DEFAULT_LIMIT, MAX_LIMIT)
    needle = (args.get("search") or "").lower()
    if not needle:
        total = len(items)
        chosen = list(islice(iter(items), offset, offset + limit))
    else:
        chosen = []
        total = 0
        end = offset + limit
        for item in items:
            if matches(item, needle):
                if offset <= total < end:
                    chosen.append(item)
                total += 1
    return {"total": total, "offset": offset, "limit": limit,
            "items": [describe(i) for i in chosen]}


class AdminAPI(Resource):
    """
    @param core: the L{broker.core.router.Core}.
    @param views: C{{name: IFaceView}}.
    @param guard: the L{broker.admin.auth.Guard}.
    @param rates: the L{broker.admin.rates.RateSampler}.
    @param node: C{callable()} returning the node's description (id,
        pid, start time) and C{cluster} the cluster node or C{None}.
    """

    isLeaf = True

    def __init__(self, core, views, guard, rates, cluster=None, started=None):
        super().__init__()
        self.core = core
        self.views = views
        self.guard = guard
        self.rates = rates
        self.cluster = cluster
        self.started = started if started is not None else core.reactor.seconds()

    # -- the HTTP side ----------------------------------------------------

    def render(self, request):
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-type", b"application/json")
        if not self.guard.allows(request):
            return jsonBody({"error": {"code": "Unauthorized",
                                       "message": "the admin token is required "
                                                  "(Authorization: Bearer <token>)"}})
        method = request.method.decode("ascii", "replace")
        try:
            segments = [s.decode("utf-8") for s in request.postpath if s]
        except UnicodeDecodeError:
            return self._error(request, APIError(400, "BadRequest", "the path is not UTF-8"))
        args = {}
        for k, v in request.args.items():
            try:
                args[k.decode("utf-8")] = v[0].decode("utf-8")
            except UnicodeDecodeError:
                return self._error(request, APIError(400, "BadRequest", "a query is not UTF-8"))
        d = maybeDeferred(self._dispatch, request, method, segments, args)
        d.addCallbacks(lambda result: self._answer(request, result),
                       lambda f: self._failed(request, f))
        d.addErrback(lambda f: log.failure("admin api: answering", f))
        return server.NOT_DONE_YET

    def _answer(self, request, result):
        if request._disconnected:
            return
        status = 200
        if isinstance(result, tuple):
            status, result = result
        request.setResponseCode(status)
        request.write(jsonstrict.dumps(result).encode("utf-8") if result is not None else b"")
        request.finish()

    def _failed(self, request, failure):
        if failure.check(APIError):
            error = failure.value
        elif failure.check(NotFound):
            error = APIError(404, "NotFound", failure.value.message)
        elif failure.check(BrokerError):
            e = failure.value
            error = APIError(400, e.name, e.message)
        else:
            log.failure("admin api: {method} {path}", failure,
                        method=request.method.decode("ascii", "replace"),
                        path=request.path.decode("ascii", "replace"))
            error = APIError(500, "InternalServerError", "the broker failed; see its log")
        if request._disconnected:
            return
        request.setResponseCode(error.status)
        request.write(self._errorBody(error))
        request.finish()

    @staticmethod
    def _errorBody(error):
        return jsonBody({"error": {"code": error.code, "message": error.message}})

    def _error(self, request, error):
        request.setResponseCode(error.status)
        return self._errorBody(error)

    def _dispatch(self, request, method, path, args):
        if not path:
            raise APIError(404, "NotFound", "see docs/admin.md for the admin API")
        head, rest = path[0], path[1:]
        if head in self.views:
            view = self.views[head]
            if method in ("GET", "HEAD"):
                return view.read(rest, args)
            if method in ("POST", "DELETE"):
                return view.act(method, rest, args)
            raise APIError(405, "MethodNotAllowed", "use GET, POST or DELETE")
        if head == "hubs":
            return self._hubs(request, method, rest, args)
        if method not in ("GET", "HEAD"):
            raise APIError(405, "MethodNotAllowed", f"/api/{head} is read-only")
        if head == "overview" and not rest:
            return self.overview()
        if head == "rates" and not rest:
            return self.rates.series()
        if head == "cluster" and not rest:
            return self.clusterInfo()
        raise APIError(404, "NotFound", f"no /api/{'/'.join(path)}")

    # -- overview ---------------------------------------------------------

    def node(self):
        now = self.core.reactor.seconds()
        return {"id": self.cluster.nodeId if self.cluster is not None else None,
                "pid": os.getpid(), "started": self.started,
                "uptime": round(now - self.started, 3), "time": now}

    def health(self):
        core = self.core
        notes = list(core.health.notes()) if getattr(core, "health", None) else []
        healthy = bool(core.running and core.engine.healthy() and not core.draining)
        return {"ok": healthy, "draining": core.draining,
                "engineHealthy": bool(core.engine.healthy()), "notes": notes}

    def overview(self):
        stats = self.core.stats()
        hubs = stats.pop("hubs")
        stats["hubCount"] = len(hubs)
        faces = {}
        for name, view in self.views.items():
            faces[name] = view.summary()
        faces["hubs"] = _faceTotals(self.core, hubs)
        return {"node": self.node(), "health": self.health(), "core": stats, "faces": faces,
                "clustered": self.cluster is not None}

    def clusterInfo(self):
        info = {"node": self.node(), "engine": self.core.engine.stats(),
                "clustered": self.cluster is not None, "nodes": []}
        if self.cluster is None:
            info["nodes"] = [{"id": None, "self": True, "alive": True}]
            return info

        def listed(ids):
            me = self.cluster.nodeId
            info["nodes"] = [{"id": i, "self": i == me, "alive": True} for i in sorted(ids)]
            return info

        def unreachable(f):
            info["nodes"] = [{"id": self.cluster.nodeId, "self": True, "alive": True}]
            info["error"] = f"cannot list the nodes: {f.getErrorMessage()}"
            return info
        return self.cluster.liveNodes().addCallbacks(listed, unreachable)

    # -- hubs ---------------------------------------------------------------

    def _hub(self, name):
        hub = self.core.existingHub(name)
        if hub is None:
            raise APIError(404, "NotFound", f"hub {name!r} not found")
        return hub

    def _hubs(self, request, method, path, args):
        read = method in ("GET", "HEAD")
        if not path:
            if not read:
                raise APIError(405, "MethodNotAllowed", "/api/hubs is read-only")
            return {"hubs": [self._hubSummary(h) for _, h in sorted(self.core.hubs.items())]}
        hub = self._hub(path[0])
        rest = path[1:]
        n = len(rest)
        if read:
            if n == 0:
                return self._hubSummary(hub)
            if rest == ["connections"]:
                return page(hub.iterSessions(), args, _sessionMatches, _sessionRow)
            if n == 2 and rest[0] == "connections":
                return describeSession(hub.session(rest[1]), self.core.reactor.seconds())
            if rest == ["groups"]:
                return page(_Sized(hub.iterGroups(), hub.groupCount), args, _nameMatches,
                            lambda g: {"name": g[0], "connections": g[1]})
            if n == 2 and rest[0] == "groups":
                members = hub.groupConnections(rest[1])
                if not members:
                    raise APIError(404, "NotFound", f"group {rest[1]!r} has no connection here")
                result = page(members, args, _sessionMatches, _sessionRow)
                result["name"] = rest[1]
                return result
            if rest == ["users"]:
                return page(_Sized(hub.iterUsers(), hub.userCount), args, _nameMatches,
                            lambda u: {"userId": u[0], "connections": u[1]})
            if n == 2 and rest[0] == "users":
                sessions = hub.userSessions(rest[1])
                if not sessions:
                    raise APIError(404, "NotFound", f"user {rest[1]!r} has no connection here")
                return {"userId": rest[1], "connections": [_sessionRow(s) for s in sessions]}
            raise APIError(404, "NotFound", f"no /api/hubs/{'/'.join(path)}")
        # Actions.
        if method == "POST" and n == 3 and rest[0] == "connections" and rest[2] == "close":
            return self.closeConnection(hub, rest[1], args)
        if method == "DELETE" and n == 4 and rest[0] == "connections" and rest[2] == "groups":
            return hub.removeConnectionFromGroup(rest[1], rest[3]).addCallback(
                lambda _: (200, {"removed": True, "connectionId": rest[1], "group": rest[3]}))
        if method == "POST" and n == 3 and rest[0] == "groups" and rest[2] == "messages":
            return self.sendToGroup(hub, rest[1], request)
        raise APIError(405 if n else 404, "MethodNotAllowed" if n else "NotFound",
                       f"no {method} /api/hubs/{'/'.join(path)}")

    def _hubSummary(self, hub):
        s = hub.stats
        out = {k: getattr(s, k) for k in type(s).__slots__}
        out.update(name=hub.name, face=hub.face, connections=hub.connectionCount,
                   groups=hub.groupCount, users=hub.userCount)
        return out

    def closeConnection(self, hub, connectionId, args):
        reason = (args.get("reason") or "closed by an administrator")[:120]
        # The connection must exist somewhere: the console should hear
        # "not found" rather than a silent success for a stale row.
        d = hub.findConnection(connectionId)

        def found(exists):
            if not exists:
                raise APIError(404, "NotFound", f"connection {connectionId!r} not found")
            log.info("admin: closing connection {cid} of hub {hub}", cid=connectionId,
                     hub=hub.name)
            return hub.close(Target(Target.CONNECTION, connectionId),
                             CloseCode.POLICY_VIOLATION, reason)
        return d.addCallback(found).addCallback(
            lambda _: (200, {"closed": True, "connectionId": connectionId}))

    def sendToGroup(self, hub, group, request):
        """
        A test message: the body's text (UTF-8), sent to C{group} as a
        server message (C{Hub.send}, as the REST API's sendToGroup does).
        """
        body = request.content.read() if request.content is not None else b""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, "BadRequest", "the message must be UTF-8 text")
        if not text:
            text = "test message from the admin console"
        log.info("admin: test message to group {group} of hub {hub}", group=group, hub=hub.name)
        return hub.send(Target(Target.GROUP, group), Message.text(text)).addCallback(
            lambda _: (200, {"sent": True, "group": group, "bytes": len(body)}))


class _Sized:
    """
    An iterable with a known length (a hub's groups or users, streamed).
    """

    def __init__(self, iterable, size):
        self._iterable = iterable
        self._size = size

    def __iter__(self):
        return iter(self._iterable)

    def __len__(self):
        return self._size


def _sessionMatches(session, needle):
    if needle in session.connectionId.lower():
        return True
    uid = session.userId
    return uid is not None and needle in uid.lower()


def _nameMatches(pair, needle):
    return needle in pair[0].lower()


def _sessionRow(session):
    return {"connectionId": session.connectionId, "userId": session.userId,
            "groups": len(session.groups), "connectedAt": session.connectedAt}


def describeSession(session, now):
    """
    A connection's details: the core's (user, groups, roles) and what its
    face knows (C{describe()} on the connection: address, subprotocol,
    traffic).
    """
    info = {"connectionId": session.connectionId, "userId": session.userId,
            "hub": session.hub.name, "face": session.hub.face,
            "groups": sorted(session.groups), "roles": sorted(session.permissions.roles()),
            "connectedAt": session.connectedAt,
            "connectedFor": round(now - session.connectedAt, 3)
            if session.connectedAt is not None else None,
            "messagesIn": session.messagesIn}
    describe = getattr(session.connection, "describe", None)
    if describe is not None:
        try:
            info.update(describe())
        except Exception:
            log.failure("admin api: describing connection {cid}", cid=session.connectionId)
    return info


def _faceTotals(core, hubs):
    """
    Hub totals per face label (C{webpubsub}, C{peergroups}, C{iot}, ...).
    """
    faces = {}
    for name, h in hubs.items():
        hub = core.existingHub(name)
        face = hub.face if hub is not None else "core"
        t = faces.setdefault(face, {"hubs": 0, "connections": 0, "users": 0, "groups": 0,
                                    "messagesIn": 0, "messagesOut": 0})
        t["hubs"] += 1
        for k in ("connections", "users", "groups", "messagesIn", "messagesOut"):
            t[k] += h[k]
    return faces
