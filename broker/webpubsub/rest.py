# -*- test-case-name: tests.test_webpubsub_rest -*-
"""
The Web PubSub REST data-plane API: C{/api/...} on the client port, as the
Azure service SDKs call it.

Every operation is a thin translation of one HTTP request into L{Hub}
server verbs; nothing here touches the hub's maps.  Requests are
authenticated the way the SDKs sign them: a Bearer JWT (HS256, one of the
hub's access keys) whose C{aud} is the very URL requested, valid for a
minute.  The audience is compared by path and query (decoded, in any
order), and by origin when C{webpubsub.audiences} is set, so a token signed
for one operation cannot be replayed against another.

Errors use the service's JSON shape, C{{"code": ..., "message": ...}},
with the status code the SDK maps to its exceptions (400, 401, 404, 405,
413, 415).

Beyond Azure: C{GET .../groups/{group}/users} lists the users in a group,
and neither listing is capped at 200 members (pages of up to 200, as the
SDK expects, followed through C{nextLink}).

The C{api-version} is not a fixed list: any well-formed version from the
oldest this implements on is served as the newest it knows, so an SDK that
moves its default version keeps working (L{checkApiVersion}).
"""

import heapq
import json
import re
import time
from datetime import date
from base64 import urlsafe_b64decode, urlsafe_b64encode
from operator import itemgetter
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from prometheus_client.core import CounterMetricFamily
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from broker.auth.tokens import (CLIENT_PATH, MQTT_PATH, TokenCache, TokenError, decodeToken,
                                makeClientToken)
from broker.config import HUB_NAME
from broker.core import jsonstrict
from broker.core.errors import BadRequest, BrokerError, CloseCode, NotFound, Unavailable
from broker.core.session import checkName
from broker.core.message import BINARY, JSON, TEXT, Message, Target
from broker.logs import peerAddress
from broker.webpubsub.odata import compileFilter

log = Logger()

# The api-versions of the Azure REST API this was written against (the SDK
# sends the newest it knows; older SDKs send older ones, with the same
# operations).  Any later well-formed version is served as the newest.
API_VERSIONS = ("2021-08-01-preview", "2021-10-01", "2022-11-01", "2023-07-01",
                "2024-01-01", "2024-01-01-preview", "2024-09-01-preview", "2024-12-01")
_API_VERSION = re.compile(r"(\d{4})-(\d{2})-(\d{2})(-preview)?", re.ASCII)
OLDEST_API_DATE = date(2021, 8, 1)
# Versions checkApiVersion accepted already (a few: one per SDK release).
_ACCEPTED_VERSIONS = set()

# The most groups one :addToGroups / :removeFromGroups request may name.
MAX_BULK_GROUPS = 1000

# Page size of the group listings, and its upper bound (the SDK's maximum).
PAGE_SIZE = 200
MAX_PAGE_SIZE = 200
MAX_TOKEN_MINUTES = 60 * 24 * 365
# :generateToken's clientType (case-insensitive, as in Azure) -> the client
# endpoint the token's audience names.  Azure's SocketIO type belongs to
# Web PubSub for Socket.IO, which the broker does not serve.
CLIENT_TYPES = {"default": CLIENT_PATH, "mqtt": MQTT_PATH}

_CONTENT_TYPES = {"application/json": JSON, "text/plain": TEXT,
                  "application/octet-stream": BINARY}


class RestError(Exception):
    """
    A refused request: its status, the service's error code and a message.
    """

    def __init__(self, status, code, message, quiet=False):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        # A normal answer (HEAD exists: no), not worth a log line.
        self.quiet = quiet


class RestAPI(Resource):
    """
    C{/api}: the REST API of every hub.

    @param hubSettings: C{callable(hubName)} returning the hub's settings
        (its C{accessKeys}), as L{broker.webpubsub.factory.ClientFactory}
        resolves them.
    @param audiences: accepted token audience origins; empty accepts any.
        Or a C{callable()} returning them: the face's current ones, which a
        configuration reload replaces.
    @param maxBodySize: the largest message body accepted, in bytes.
    @param clock: C{callable() -> float}, the POSIX time (for tests).
    """

    isLeaf = True
    # (routes, {length: [(shape, handlers)]}): the routes by path length,
    # built from self.routes on first use.
    _routesByLength = None

    def __init__(self, core, hubSettings, audiences=(), maxBodySize=1024 * 1024,
                 clock=time.time):
        super().__init__()
        self.core = core
        # Send filters travel as text and are compiled on every node.
        core.setFilterCompiler(compileFilter)
        self.hubSettings = hubSettings
        self.audiences = audiences
        self.maxBodySize = maxBodySize
        self.clock = clock
        # Verified tokens: a backend signs one per URL and reuses it.
        self.tokens = TokenCache()
        # (operation, status) -> requests, for /metrics (RestCollector).
        self.requestCounts = {}
        # path shape -> {method: handler}; "{x}" segments are parameters.
        self.routes = [
            (("hubs", "{hub}", ":send"), {"POST": self.sendToAll}),
            (("hubs", "{hub}", ":closeConnections"), {"POST": self.closeAll}),
            (("hubs", "{hub}", ":generateToken"), {"POST": self.generateToken}),
            (("hubs", "{hub}", ":addToGroups"), {"POST": self.addConnectionsToGroups}),
            (("hubs", "{hub}", ":removeFromGroups"), {"POST": self.removeConnectionsFromGroups}),
            (("hubs", "{hub}", "connections", "{connection}"),
             {"DELETE": self.closeConnection, "HEAD": self.connectionExists}),
            (("hubs", "{hub}", "connections", "{connection}", ":send"),
             {"POST": self.sendToConnection}),
            (("hubs", "{hub}", "connections", "{connection}", "groups"),
             {"DELETE": self.removeConnectionFromAllGroups}),
            (("hubs", "{hub}", "groups", "{group}"), {"HEAD": self.groupExists}),
            (("hubs", "{hub}", "groups", "{group}", ":send"), {"POST": self.sendToGroup}),
            (("hubs", "{hub}", "groups", "{group}", ":closeConnections"),
             {"POST": self.closeGroup}),
            (("hubs", "{hub}", "groups", "{group}", "connections"),
             {"GET": self.listConnections}),
            (("hubs", "{hub}", "groups", "{group}", "users"), {"GET": self.listUsers}),
            (("hubs", "{hub}", "groups", "{group}", "connections", "{connection}"),
             {"PUT": self.addConnectionToGroup, "DELETE": self.removeConnectionFromGroup}),
            (("hubs", "{hub}", "permissions", "{permission}", "connections", "{connection}"),
             {"PUT": self.grantPermission, "DELETE": self.revokePermission,
              "HEAD": self.checkPermission}),
            (("hubs", "{hub}", "users", "{user}"), {"HEAD": self.userExists}),
            (("hubs", "{hub}", "users", "{user}", ":send"), {"POST": self.sendToUser}),
            (("hubs", "{hub}", "users", "{user}", ":closeConnections"),
             {"POST": self.closeUser}),
            (("hubs", "{hub}", "users", "{user}", "groups"),
             {"DELETE": self.removeUserFromAllGroups}),
            (("hubs", "{hub}", "users", "{user}", "groups", "{group}"),
             {"PUT": self.addUserToGroup, "DELETE": self.removeUserFromGroup}),
        ]

    # -- dispatch ---------------------------------------------------------

    def render(self, request):
        request.restOperation = "unknown"
        try:
            body = self._dispatch(request)
        except Exception as e:
            body = self._failed(request, e)
        if isinstance(body, Deferred):
            outcome = []
            body.addBoth(outcome.append)
            if not outcome:
                return self._later(request, body, outcome)
            # Already fired (the memory engine): answered now, as bytes.
            body = outcome[0]
            if isinstance(body, Failure):
                body = self._failed(request, body.value, body)
        self._count(request)
        return body

    def _later(self, request, d, outcome):
        """
        Answer C{request} when C{d} (whose result goes to C{outcome}) fires:
        an operation on another node's connection waits for the directory.
        """
        finished = []
        request.notifyFinish().addBoth(finished.append)

        def answer(_):
            result = outcome[0]
            if finished:
                return
            if isinstance(result, Failure):
                result = self._failed(request, result.value, result)
            self._count(request)
            if result:
                request.write(result)
            request.finish()
        d.addCallback(answer).addErrback(log.failure, "REST answer failed")
        return NOT_DONE_YET

    def _count(self, request):
        key = (request.restOperation, request.code)
        self.requestCounts[key] = self.requestCounts.get(key, 0) + 1

    def _failed(self, request, e, failure=None):
        """
        The error answer for an exception a handler raised or a Deferred
        failed with.
        """
        if isinstance(e, RestError):
            return self._error(request, e)
        if isinstance(e, BadRequest):
            return self._error(request, RestError(400, "BadRequest", e.message))
        if isinstance(e, NotFound):
            return self._error(request, RestError(404, "NotFound", e.message))
        if isinstance(e, Unavailable):
            return self._error(request, RestError(503, "ServiceUnavailable", e.message))
        if isinstance(e, BrokerError):
            return self._error(request, RestError(400, e.name, e.message))
        log.failure("REST {method} {uri} failed", failure, method=request.method,
                    uri=request.uri)
        return self._error(request, RestError(500, "InternalServerError",
                                              "internal error; see the broker log"))

    def _dispatch(self, request):
        method = request.method.decode("ascii", "replace")
        try:
            segments = [s.decode("utf-8") for s in request.postpath]
        except UnicodeDecodeError:
            raise RestError(400, "BadRequest", "the path is not valid UTF-8")
        if segments and segments[-1] == "" and len(segments) > 1:
            segments.pop()
        if segments == ["health"]:
            request.restOperation = "health"
            if method not in ("GET", "HEAD"):
                raise RestError(405, "MethodNotAllowed", "use GET or HEAD")
            if not self.core.engine.healthy():
                raise RestError(503, "ServiceUnavailable", "the engine is not healthy")
            request.setResponseCode(200)
            return b""
        handlers, params = self._match(segments)
        handler = handlers.get(method)
        if handler is not None:
            request.restOperation = handler.__name__
        if handler is None:
            request.setHeader(b"allow", ", ".join(sorted(handlers)).encode("ascii"))
            raise RestError(405, "MethodNotAllowed",
                            f"{method} is not allowed here; use {', '.join(sorted(handlers))}")
        hubName = params["hub"]
        if not HUB_NAME.match(hubName):
            raise RestError(400, "BadRequest", f"invalid hub name {hubName!r}")
        self._checkApiVersion(request)
        self._authenticate(request, hubName)
        args = _Args(request)
        return handler(request, self.core.hub(hubName), params, args)

    def _match(self, segments):
        byLength = self._routesByLength
        if byLength is None or byLength[0] is not self.routes:
            table = {}
            for shape, handlers in self.routes:
                table.setdefault(len(shape), []).append((shape, handlers))
            byLength = self._routesByLength = (self.routes, table)
        for shape, handlers in byLength[1].get(len(segments), ()):
            params = {}
            for want, got in zip(shape, segments):
                if want.startswith("{"):
                    if not got:
                        break
                    params[want[1:-1]] = got
                elif want != got:
                    break
            else:
                return handlers, params
        raise RestError(404, "NotFound", "no such REST operation: /api/" + "/".join(segments))

    def _checkApiVersion(self, request):
        versions = request.args.get(b"api-version")
        if not versions:
            raise RestError(400, "MissingApiVersion", "the api-version query parameter is required")
        checkApiVersion(versions[0].decode("ascii", "replace"))

    # -- authentication ---------------------------------------------------

    @property
    def audiences(self):
        """
        The accepted audience origins, normalized (L{_origin}).
        """
        raw = self._audiences() if callable(self._audiences) else self._audiences
        if raw is not self._audiencesRaw:
            self._audiencesRaw = raw
            self._audiencesNormal = tuple(_origin(a) for a in raw)
        return self._audiencesNormal

    @audiences.setter
    def audiences(self, value):
        self._audiences = value if callable(value) else tuple(value)
        self._audiencesRaw = self._audiencesNormal = None

    def _authenticate(self, request, hubName):
        auth = (request.getHeader(b"authorization") or "")
        if isinstance(auth, bytes):
            auth = auth.decode("latin-1")
        if auth[:7].lower() != "bearer " or not auth[7:].strip():
            self._unauthorized(request, "no Bearer token")
        token = auth[7:].strip()
        keys = self.hubSettings(hubName).accessKeys
        if not keys:
            self._unauthorized(request, f"hub {hubName!r} has no access key")
        try:
            claims = decodeToken(token, keys, self.clock(), self.tokens)
        except TokenError as e:
            self._unauthorized(request, str(e))
        # The audience depends on the token, the URL and the configured
        # origins only: the URL it last matched is kept with the token.
        audiences = self.audiences
        matched = self.tokens.extra(token)
        if matched is not None and matched[0] == request.uri and matched[1] is audiences:
            return
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if not any(self._audienceMatches(a, request) for a in auds):
            self._unauthorized(request, f"token audience {aud!r} is not this request's URL")
        self.tokens.setExtra(token, (request.uri, audiences))

    def reloaded(self):
        """
        The configuration was read again (C{SIGHUP}): tokens verified with
        the old keys and audiences are verified again on their next use.
        """
        self.tokens.clear()
        return True

    def _audienceMatches(self, aud, request):
        if not isinstance(aud, str):
            return False
        parts = urlsplit(aud)
        if self.audiences and _origin(aud) not in self.audiences:
            return False
        if unquote(parts.path).rstrip("/").lower() != \
                unquote(request.path.decode("latin-1")).rstrip("/").lower():
            return False
        want = sorted(parse_qsl(parts.query, keep_blank_values=True))
        got = sorted((k.decode("utf-8", "replace"), v.decode("utf-8", "replace"))
                     for k, vs in request.args.items() for v in vs)
        return want == got

    def _unauthorized(self, request, why):
        log.info("REST request {method} {path} from {peer} refused: {why}",
                 method=request.method.decode("ascii", "replace"),
                 path=request.path.decode("latin-1"), peer=_peer(request), why=why)
        request.setHeader(b"www-authenticate", b'Bearer realm="webpubsub"')
        raise RestError(401, "Unauthorized", "invalid or missing access token")

    # -- responses --------------------------------------------------------

    def _error(self, request, error):
        if not error.quiet and error.status not in (401, 500):
            # 401s and 500s are logged where they are raised.
            log.info("REST {method} {path} from {peer}: {status} {code}: {message}",
                     method=request.method.decode("ascii", "replace"),
                     path=request.path.decode("latin-1"), peer=_peer(request),
                     status=error.status, code=error.code, message=error.message)
        request.setResponseCode(error.status)
        request.setHeader(b"x-ms-error-code", error.code.encode("ascii"))
        if request.method == b"HEAD":
            return b""
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"code": error.code, "message": error.message}).encode("utf-8")

    @staticmethod
    def _status(request, code):
        request.setResponseCode(code)
        return b""

    @staticmethod
    def _json(request, value):
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(value).encode("utf-8")

    # -- sends ------------------------------------------------------------

    def _body(self, request):
        length = request.getHeader(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.maxBodySize:
            raise RestError(413, "PayloadTooLarge",
                            f"the body is larger than {self.maxBodySize} bytes")
        body = request.content.read(self.maxBodySize + 1)
        if len(body) > self.maxBodySize:
            raise RestError(413, "PayloadTooLarge",
                            f"the body is larger than {self.maxBodySize} bytes")
        return body

    def _message(self, request):
        body = self._body(request)
        ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
        ctype = ctype.split(";")[0].strip().lower()
        dataType = _CONTENT_TYPES.get(ctype)
        if dataType is None:
            raise RestError(415, "UnsupportedMediaType",
                            "Content-Type must be one of " + ", ".join(_CONTENT_TYPES))
        if dataType == BINARY:
            return Message(BINARY, body)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise RestError(400, "BadRequest", "the body is not valid UTF-8")
        if dataType == JSON:
            try:
                jsonstrict.loads(text)
            except jsonstrict.JSONError as e:
                raise RestError(400, "BadRequest", f"the body is not valid JSON: {e}")
            return Message(JSON, text.strip().encode("utf-8"))
        return Message(TEXT, body)

    def _send(self, request, hub, kind, name, args):
        message = self._message(request)
        if not self.core.engine.healthy():
            # Refused whole rather than delivered to this node's receivers
            # only: the caller can retry.
            raise RestError(503, "ServiceUnavailable",
                            "the cluster (Redis) is unreachable; the message was not sent")
        excluded = args.list("excluded")
        ttl = args.one("messageTtlSeconds")
        if ttl is not None and (not ttl.isdigit() or int(ttl) > 300):
            raise RestError(400, "BadRequest", "messageTtlSeconds must be 0 to 300")
        text = args.one("filter")
        if text is not None:
            # Refused here if malformed; applied on every node that holds
            # receivers (the filter travels as text).
            self.core.sessionFilter(text)
        return hub.send(Target(kind, name, excluded, text), message).addCallback(
            lambda _: self._status(request, 202))

    def sendToAll(self, request, hub, params, args):
        return self._send(request, hub, Target.HUB, None, args)

    def sendToGroup(self, request, hub, params, args):
        group = checkName("group", params["group"])
        return self._send(request, hub, Target.GROUP, group, args)

    def sendToUser(self, request, hub, params, args):
        user = checkName("userId", params["user"])
        return self._send(request, hub, Target.USER, user, args)

    def sendToConnection(self, request, hub, params, args):
        return self._send(request, hub, Target.CONNECTION, params["connection"], args)

    # -- closing ----------------------------------------------------------

    def _close(self, request, hub, kind, name, args):
        target = Target(kind, name, args.list("excluded"))
        reason = args.one("reason") or "closed by the server"
        # Idempotent, as in Azure: closing what has gone is fine.
        return hub.close(target, CloseCode.POLICY_VIOLATION, reason).addCallback(
            lambda _: self._status(request, 204))

    def closeAll(self, request, hub, params, args):
        return self._close(request, hub, Target.HUB, None, args)

    def closeGroup(self, request, hub, params, args):
        return self._close(request, hub, Target.GROUP, checkName("group", params["group"]), args)

    def closeUser(self, request, hub, params, args):
        return self._close(request, hub, Target.USER, checkName("userId", params["user"]), args)

    def closeConnection(self, request, hub, params, args):
        return self._close(request, hub, Target.CONNECTION, params["connection"], args)

    # -- existence --------------------------------------------------------

    def _exists(self, request, found, what):
        def answer(found):
            if not found:
                raise RestError(404, "NotFound", f"{what} not found", quiet=True)
            return self._status(request, 200)
        return found.addCallback(answer)

    def connectionExists(self, request, hub, params, args):
        cid = params["connection"]
        return self._exists(request, hub.findConnection(cid), f"connection {cid!r}")

    def groupExists(self, request, hub, params, args):
        group = params["group"]
        return self._exists(request, hub.findGroup(group), f"group {group!r}")

    def userExists(self, request, hub, params, args):
        user = params["user"]
        return self._exists(request, hub.findUser(user), f"user {user!r}")

    # -- groups -----------------------------------------------------------

    def _done(self, request, code, d):
        return d.addCallback(lambda _: self._status(request, code))

    def addConnectionToGroup(self, request, hub, params, args):
        return self._done(request, 200, hub.addConnectionToGroup(params["connection"],
                                                                 params["group"]))

    def removeConnectionFromGroup(self, request, hub, params, args):
        return self._done(request, 204, hub.removeConnectionFromGroup(params["connection"],
                                                                      params["group"]))

    def removeConnectionFromAllGroups(self, request, hub, params, args):
        return self._done(request, 204, hub.removeConnectionFromAllGroups(params["connection"]))

    def _groupsRequest(self, request, hub, joining):
        """
        The C{(groups, filter)} of an C{:addToGroups} / C{:removeFromGroups}
        body: C{{"groups": [names], "filter": "OData"}}; a missing or null
        filter selects every connection.
        """
        ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise RestError(415, "UnsupportedMediaType", "Content-Type must be application/json")
        try:
            body = jsonstrict.loads(self._body(request).decode("utf-8"))
        except UnicodeDecodeError:
            raise RestError(400, "BadRequest", "the body is not valid UTF-8")
        except jsonstrict.JSONError as e:
            raise RestError(400, "BadRequest", f"the body is not valid JSON: {e}")
        if not isinstance(body, dict):
            raise RestError(400, "BadRequest", "the body must be a JSON object")
        groups, text = body.get("groups"), body.get("filter")
        if not isinstance(groups, list) or not groups \
                or not all(isinstance(g, str) for g in groups):
            raise RestError(400, "BadRequest", "groups must be a non-empty list of group names")
        if len(groups) > MAX_BULK_GROUPS:
            raise RestError(400, "BadRequest", f"more than {MAX_BULK_GROUPS} groups")
        if text is not None and not isinstance(text, str):
            raise RestError(400, "BadRequest", "filter must be a string")
        limit = hub.maxGroupsPerConnection
        if joining and limit and len(set(groups)) > limit:
            # No connection could ever hold them all.
            raise RestError(400, "LimitExceeded",
                            f"more groups than a connection may join ({limit})")
        return groups, text

    def addConnectionsToGroups(self, request, hub, params, args):
        groups, text = self._groupsRequest(request, hub, True)
        return self._done(request, 200, hub.addConnectionsToGroups(groups, text))

    def removeConnectionsFromGroups(self, request, hub, params, args):
        groups, text = self._groupsRequest(request, hub, False)
        return self._done(request, 200, hub.removeConnectionsFromGroups(groups, text))

    def addUserToGroup(self, request, hub, params, args):
        return self._done(request, 200, hub.addUserToGroup(params["user"], params["group"]))

    def removeUserFromGroup(self, request, hub, params, args):
        return self._done(request, 204, hub.removeUserFromGroup(
            checkName("userId", params["user"]), params["group"]))

    def removeUserFromAllGroups(self, request, hub, params, args):
        return self._done(request, 204, hub.removeUserFromAllGroups(
            checkName("userId", params["user"])))

    # -- permissions ------------------------------------------------------

    def grantPermission(self, request, hub, params, args):
        return self._done(request, 200, hub.grantPermission(
            params["connection"], params["permission"], args.one("targetName")))

    def revokePermission(self, request, hub, params, args):
        return self._done(request, 204, hub.revokePermission(
            params["connection"], params["permission"], args.one("targetName")))

    def checkPermission(self, request, hub, params, args):
        return self._exists(request, hub.hasPermission(
            params["connection"], params["permission"], args.one("targetName")), "permission")

    # -- listings ---------------------------------------------------------

    def _page(self, request, args, items):
        """
        One page of C{items} (C{(key, value)} pairs, unique keys) after the
        continuation token, with the C{nextLink} to the following page.
        """
        size = args.integer("maxpagesize", PAGE_SIZE, 1, MAX_PAGE_SIZE)
        top = args.integer("top", None, 1, 2 ** 31 - 1)
        after, sent = "", 0
        token = args.one("continuationToken")
        if token:
            try:
                after, sent = jsonstrict.loads(urlsafe_b64decode(token.encode("ascii") + b"=="))
                if not isinstance(after, str) or not isinstance(sent, int):
                    raise ValueError
            except (ValueError, TypeError):
                raise RestError(400, "BadRequest", "invalid continuationToken")
        if top is not None:
            size = min(size, top - sent)
        # O(members) per page, not a sort of the whole group.
        rest = [item for item in items if item[0] > after]
        page = heapq.nsmallest(max(size, 0), rest, key=itemgetter(0))
        body = {"value": [v for _, v in page]}
        sent += len(page)
        if page and len(rest) > len(page) and (top is None or sent < top):
            token = urlsafe_b64encode(json.dumps([page[-1][0], sent]).encode("utf-8"))
            query = {"continuationToken": token.rstrip(b"=").decode("ascii"),
                     "maxpagesize": str(size)}
            if top is not None:
                query["top"] = str(top)
            body["nextLink"] = (quote(request.path.decode("latin-1")) + "?"
                                + urlencode(query))
        return self._json(request, body)

    def listConnections(self, request, hub, params, args):
        group = checkName("group", params["group"])
        return hub.listGroupConnections(group).addCallback(lambda members: self._page(
            request, args, [(cid, {"connectionId": cid, "userId": uid})
                            for cid, uid in members]))

    def listUsers(self, request, hub, params, args):
        group = checkName("group", params["group"])
        return hub.listGroupUsers(group).addCallback(lambda users: self._page(
            request, args, [(u, {"userId": u, "connectionCount": n})
                            for u, n in users.items()]))

    # -- tokens -----------------------------------------------------------

    def generateToken(self, request, hub, params, args):
        clientType = (args.one("clientType") or "Default")
        path = CLIENT_TYPES.get(clientType.lower())
        if path is None:
            raise RestError(400, "BadRequest",
                            f"clientType {clientType!r} is not supported; use Default or MQTT")
        userId = args.one("userId")
        if userId is not None:
            checkName("userId", userId)
        groups = args.list("group")
        for g in groups:
            checkName("group", g)
        minutes = args.integer("minutesToExpire", 60, 1, MAX_TOKEN_MINUTES)
        scheme = "https" if request.isSecure() else "http"
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        if not host:
            raise RestError(400, "BadRequest", "a Host header is required")
        audience = f"{scheme}://{host}{path}{hub.name}"
        key = self.hubSettings(hub.name).accessKeys[0]
        token = makeClientToken(key, audience, userId=userId, roles=args.list("role"),
                                groups=groups, lifetime=minutes * 60, now=self.clock())
        return self._json(request, {"token": token})


def checkApiVersion(version):
    """
    Accept C{YYYY-MM-DD} or C{YYYY-MM-DD-preview}, a real date no older
    than L{OLDEST_API_DATE}: every such version is served with the
    operations of the newest this knows (L{API_VERSIONS}), so a new SDK
    whose default version the broker has never heard of still works.

    @raise RestError: 400 C{UnsupportedApiVersion}, malformed or too old.
    """
    if version in _ACCEPTED_VERSIONS:
        return
    m = _API_VERSION.fullmatch(version)
    try:
        day = date(*map(int, m.group(1, 2, 3))) if m else None
    except ValueError:
        day = None
    if day is None:
        raise RestError(400, "UnsupportedApiVersion",
                        f"api-version {version[:40]!r} is not a date of the form "
                        "YYYY-MM-DD or YYYY-MM-DD-preview")
    if day < OLDEST_API_DATE:
        raise RestError(400, "UnsupportedApiVersion",
                        f"api-version {version!r} is older than the oldest supported, "
                        f"{API_VERSIONS[0]}")
    if len(_ACCEPTED_VERSIONS) < 256:
        _ACCEPTED_VERSIONS.add(version)


class RestCollector:
    """
    Prometheus collector: C{broker_webpubsub_rest_requests_total{operation,
    code}}.  Labels are bounded: operations are this module's handler
    names (or C{unknown}), never hub or group names.
    """

    def __init__(self, rest):
        self.rest = rest

    def collect(self):
        c = CounterMetricFamily("broker_webpubsub_rest_requests",
                                "Web PubSub REST API requests by operation and status.",
                                labels=["operation", "code"])
        for (operation, code), n in sorted(self.rest.requestCounts.items()):
            c.add_metric([operation, str(code)], n)
        yield c


class _Args:
    """
    The query parameters of a request, decoded.
    """

    def __init__(self, request):
        self._args = request.args

    def list(self, name):
        try:
            return [v.decode("utf-8") for v in self._args.get(name.encode("ascii"), ())]
        except UnicodeDecodeError:
            raise RestError(400, "BadRequest", f"{name} is not valid UTF-8")

    def one(self, name):
        values = self.list(name)
        return values[0] if values else None

    def integer(self, name, default, minimum, maximum):
        value = self.one(name)
        if value is None:
            return default
        try:
            n = int(value)
        except ValueError:
            n = None
        if n is None or not minimum <= n <= maximum:
            raise RestError(400, "BadRequest",
                            f"{name} must be an integer from {minimum} to {maximum}")
        return n


def _origin(url):
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}".lower()


def _peer(request):
    return peerAddress(request)
