# -*- test-case-name: tests.test_webpubsub_upstream -*-
"""
Web PubSub event handlers: client events sent upstream as CloudEvents over
HTTP, as Azure Web PubSub sends them, so an application written for Azure
(its C{WebPubSubEventHandler} middleware included) works unchanged.

  - C{connect} is blocking: the handshake waits for the handler, whose JSON
    answer may set the userId, groups, roles and subprotocol, and whose 401
    or 403 refuses the client with that status.
  - C{message} and custom user events: the handler's answer body, if any,
    goes back to the client.
  - C{connected} and C{disconnected} are notifications: retried with
    backoff, failures logged once and counted, never blocking the client.

Every request carries the C{ce-*} headers, with C{ce-signature} an
HMAC-SHA256 of the connection id under each access key, so the handler can
check it came from us.  Abuse protection (L{broker.webpubsub.validation}):
each handler is validated as Azure does, on its C{{event}=validate} URL,
and a handler that has not agreed is never sent events.  Requests go
through L{broker.webpubsub.handlerhttp}, which copes with handlers that
answer in HTTP/1.0 or close their connections.
"""

import hashlib
import hmac
import json
import secrets
from collections import deque
from datetime import datetime, timezone
from urllib.parse import quote

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from broker.core import jsonstrict
from broker.core.errors import BrokerError
from broker.core.session import NoUpstream
from broker.core.interfaces import IHubObserver, IUpstream
from broker.core.message import BINARY, JSON, PROTOBUF, TEXT, Message
from broker.webpubsub.handlerhttp import HandlerHTTP, HandlerTimeout
from broker.webpubsub.validation import HandlerValidation

log = Logger()

SYSTEM_EVENTS = ("connect", "connected", "disconnected")
# Group presence events (a preview in Azure): CloudEvents of type
# azure.webpubsub.gp.joined / .left, body {"group": ...}, to handlers that
# list them in group_presence_events.
PRESENCE = "gp"
PRESENCE_EVENTS = ("joined", "left")
# Notifications (connected, disconnected, presence) in flight to one hub's
# handlers at once, and waiting beyond those; more are dropped and counted.
# A client that joins and leaves groups as fast as it may, or a burst of
# connections, cannot open sockets to the handler or queue requests
# without bound.
MAX_NOTIFYING = 64
MAX_WAITING = 10000
CONTENT_TYPES = {TEXT: b"text/plain; charset=utf-8", JSON: b"application/json",
                 BINARY: b"application/octet-stream", PROTOBUF: b"application/x-protobuf"}


class UpstreamTimeout(BrokerError):
    """
    The event handler did not answer within C{event_timeout}.
    """

    name = "Timeout"


class ConnectDenied(Exception):
    """
    The C{connect} handler refused the client; C{status} is the HTTP status
    for the handshake (401, 403, or 500 for any other failure).
    """

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class EventHandler:
    """
    One configured handler: a URL template and the events it takes.

    @param userEvents: C{"*"}, or comma-separated event names (Azure's
        syntax); empty takes none.
    @param systemEvents: names among C{connect}, C{connected},
        C{disconnected}.
    @param presenceEvents: names among L{PRESENCE_EVENTS}.
    """

    def __init__(self, urlTemplate, userEvents="*", systemEvents=(), presenceEvents=()):
        self.urlTemplate = urlTemplate
        names = [e.strip() for e in userEvents.split(",") if e.strip()]
        self.allUserEvents = "*" in names
        self.userEvents = frozenset(names)
        self.systemEvents = frozenset(systemEvents)
        self.presenceEvents = frozenset(presenceEvents)

    def takes(self, event, system):
        """
        Whether this handler takes C{event}: a system event (C{system}
        true), a group presence event (C{system} is L{PRESENCE}) or a user
        event.
        """
        if system == PRESENCE:
            return event in self.presenceEvents
        if system:
            return event in self.systemEvents
        return self.allUserEvents or event in self.userEvents

    def url(self, hub, event):
        return (self.urlTemplate.replace("{hub}", quote(hub, safe=""))
                .replace("{event}", quote(event, safe="")))


def signature(connectionId, keys):
    """
    C{ce-signature}: C{sha256=<hex>} for each access key, comma-joined, so
    a handler knowing any one of the keys can check it.
    """
    return ",".join(
        "sha256=" + hmac.new(key.encode("utf-8"), connectionId.encode("utf-8"),
                             hashlib.sha256).hexdigest()
        for key in keys)


@implementer(IUpstream, IHubObserver)
class CloudEventsUpstream:
    """
    The event handlers of one hub.

    @param origin: our host name, sent as C{WebHook-Request-Origin}.
    @param http: a L{HandlerHTTP}, shared by the hubs.
    @param validation: the broker's L{HandlerValidation}; by default one of
        this upstream's own.
    """

    def __init__(self, reactor, hubName, handlers, accessKeys, origin, http,
                 timeout=10.0, retries=2, backoff=0.5, validation=None):
        self.reactor = reactor
        self.hubName = hubName
        self.handlers = list(handlers)
        self.accessKeys = list(accessKeys)
        self.origin = origin
        self.http = http
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        if validation is None:
            validation = HandlerValidation(reactor, http, origin, timeout=timeout)
        self.validation = validation
        self._pending = set()
        self._waiting = deque()
        self._idle = []
        self._droppedLoggedAt = None
        self.stats = {"sent": 0, "failed": 0, "notificationsDropped": 0, "unvalidated": 0,
                      "notificationsOverflowed": 0}

    def handlerFor(self, event, system):
        for handler in self.handlers:
            if handler.takes(event, system):
                return handler
        return None

    # -- sending -------------------------------------------------------------

    def _headers(self, event, system, connectionId, userId, state, contentType):
        kind = PRESENCE if system == PRESENCE else "sys" if system else "user"
        headers = {
            "ce-specversion": "1.0",
            "ce-type": f"azure.webpubsub.{kind}.{event}",
            "ce-source": f"/hubs/{self.hubName}/client/{connectionId}",
            "ce-id": secrets.token_hex(8),
            "ce-time": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            "ce-awpsversion": "1.0",
            "ce-hub": self.hubName,
            "ce-connectionId": connectionId,
            "ce-eventName": event,
            "ce-signature": signature(connectionId, self.accessKeys),
            "WebHook-Request-Origin": self.origin,
            "Content-Type": contentType,
        }
        if userId is not None:
            headers["ce-userId"] = userId
        if state:
            headers["ce-connectionState"] = state
        return headers

    @defer.inlineCallbacks
    def _post(self, handler, event, system, connectionId, userId, state, body, contentType):
        """
        One validated POST; a Deferred firing with (response, body bytes),
        or failing when the handler is unvalidated or unreachable.
        """
        url = handler.url(self.hubName, event)
        ok = yield self.validation.check(self.hubName, handler)
        if not ok:
            self.stats["unvalidated"] += 1
            raise BrokerError(f"event handler for {event} is not validated")
        headers = self._headers(event, system, connectionId, userId, state, contentType)
        try:
            response = yield self.http.request("POST", url, body=body, headers=headers,
                                               timeout=self.timeout)
        except HandlerTimeout as e:
            raise UpstreamTimeout(f"event handler for {event} did not answer: {e}")
        self.stats["sent"] += 1
        return response, response.body

    # -- connect (blocking) --------------------------------------------------

    @defer.inlineCallbacks
    def connect(self, connectionId, request, claims, subprotocols):
        """
        The blocking C{connect} event.

        @param request: autobahn's C{ConnectionRequest} (headers, query).
        @param claims: the token's claims, a dict.
        @return: a Deferred firing with the handler's answer (a dict with
            any of C{userId}, C{groups}, C{roles}, C{subprotocol}, and
            C{state}, the C{ce-connectionState} header), or C{None} when no
            handler takes C{connect}; failing with L{ConnectDenied}.
        """
        handler = self.handlerFor("connect", True)
        if handler is None:
            return None
        query = {k: list(v) for k, v in request.params.items()
                 if k not in ("access_token",)}
        headers = {k: [v] for k, v in request.headers.items()
                   if k.lower() not in ("authorization", "cookie")}
        body = json.dumps({"claims": claims, "query": query, "headers": headers,
                           "subprotocols": list(subprotocols),
                           "clientCertificates": []}).encode("utf-8")
        userId = claims.get("sub") if claims else None
        if isinstance(userId, list):  # claims as the handler sees them: lists
            userId = userId[0] if userId else None
        try:
            response, content = yield self._post(handler, "connect", True, connectionId,
                                                 userId, None, body, "application/json")
        except Exception as e:
            self.stats["failed"] += 1
            log.warn("connect handler for hub {hub} failed: {why}", hub=self.hubName, why=e)
            raise ConnectDenied(500, "connect event handler failed")
        if response.code in (401, 403):
            raise ConnectDenied(response.code, "refused by the connect event handler")
        if not 200 <= response.code < 300:
            self.stats["failed"] += 1
            raise ConnectDenied(500, f"connect event handler answered {response.code}")
        answer = {}
        if content.strip():
            try:
                answer = jsonstrict.loads(content)
                if not isinstance(answer, dict):
                    raise jsonstrict.JSONError("not an object")
            except jsonstrict.JSONError as e:
                self.stats["failed"] += 1
                log.warn("connect handler for hub {hub} answered invalid JSON: {why}",
                         hub=self.hubName, why=e)
                raise ConnectDenied(500, "connect event handler answered invalid JSON")
        state = response.headers.getRawHeaders(b"ce-connectionstate")
        if state:
            answer["state"] = state[0].decode("latin-1")
        return answer

    # -- user events ---------------------------------------------------------

    @defer.inlineCallbacks
    def userEvent(self, session, event, message):
        handler = self.handlerFor(event, False)
        if handler is None:
            raise NoUpstream(f"no event handler for {event!r} on hub {self.hubName!r}")
        state = getattr(session, "connectionState", None)
        try:
            response, content = yield self._post(
                handler, event, False, session.connectionId, session.userId, state,
                message.data, CONTENT_TYPES[message.dataType].decode())
        except UpstreamTimeout as e:
            self.stats["failed"] += 1
            log.warn("{event} handler for hub {hub}: {why}", event=event, hub=self.hubName,
                     why=e.message)
            raise
        except BrokerError:
            raise
        except defer.CancelledError:
            raise  # the client cancelled its invocation
        except Exception as e:
            self.stats["failed"] += 1
            log.warn("{event} handler for hub {hub} failed: {why}", event=event,
                     hub=self.hubName, why=e)
            raise BrokerError("event handler unreachable")
        if not 200 <= response.code < 300:
            self.stats["failed"] += 1
            raise BrokerError(f"event handler answered {response.code}")
        newState = response.headers.getRawHeaders(b"ce-connectionstate")
        if newState:
            session.connectionState = newState[0].decode("latin-1")
        if not content:
            return None
        contentType = (response.headers.getRawHeaders(b"content-type") or [b""])[0].lower()
        if contentType.startswith(b"application/json"):
            # Embedded as it is in the clients' frames: strict JSON only.
            try:
                jsonstrict.loads(content)
            except jsonstrict.JSONError as e:
                self.stats["failed"] += 1
                log.warn("{event} handler for hub {hub} answered invalid JSON: {why}",
                         event=event, hub=self.hubName, why=e)
                raise BrokerError("event handler answered invalid JSON")
            return Message(JSON, content)
        if contentType.startswith(b"text/"):
            return Message(TEXT, content)
        return Message(BINARY, content)

    # -- notifications -------------------------------------------------------

    def clientEvent(self, hub, session, event, message):
        pass  # answered through userEvent, as the hub's upstream

    def connectionAdded(self, hub, session):
        if getattr(session.connection, "moving", False):
            return  # a reliable connection moving between nodes (handover.py)
        self._notify("connected", session, b"{}")

    def connectionRemoved(self, hub, session, reason):
        if getattr(session.connection, "moving", False):
            return
        body = json.dumps({"reason": reason} if reason else {}).encode("utf-8")
        self._notify("disconnected", session, body)

    def membershipChanged(self, hub, session, group, joined):
        if getattr(session.connection, "moving", False):
            return
        self._notify("joined" if joined else "left", session,
                     json.dumps({"group": group}).encode("utf-8"), PRESENCE)

    def _notify(self, event, session, body, system=True):
        """
        Send a notification to the handler that takes C{event}: at once
        while fewer than L{MAX_NOTIFYING} are in flight, else after those
        ahead of it; dropped (counted, logged at most once a minute) when
        L{MAX_WAITING} already wait.
        """
        handler = self.handlerFor(event, system)
        if handler is None:
            return
        args = (handler, event, system, session.connectionId, session.userId,
                getattr(session, "connectionState", None), body, 0)
        if len(self._pending) < MAX_NOTIFYING:
            self._start(args)
        elif len(self._waiting) < MAX_WAITING:
            self._waiting.append(args)
        else:
            self.stats["notificationsOverflowed"] += 1
            self.stats["notificationsDropped"] += 1
            now = self.reactor.seconds()
            if self._droppedLoggedAt is None or now - self._droppedLoggedAt >= 60:
                self._droppedLoggedAt = now
                log.warn("hub {hub}: {n} notifications already wait for the event "
                         "handlers; dropping more ({event} for {cid}; "
                         "{dropped} dropped so far)", hub=self.hubName, n=MAX_WAITING,
                         event=event, cid=session.connectionId,
                         dropped=self.stats["notificationsOverflowed"])

    def _start(self, args):
        d = self._notifyAttempt(*args)
        if d.called:
            return
        self._pending.add(d)
        d.addBoth(self._finished, d)

    def _finished(self, result, d):
        self._pending.discard(d)
        while self._waiting and len(self._pending) < MAX_NOTIFYING:
            self._start(self._waiting.popleft())
        if not self._pending and not self._waiting:
            idle, self._idle = self._idle, []
            for waiter in idle:
                waiter.callback(None)
        return result

    def whenIdle(self):
        """
        A Deferred firing once the notifications under way and those
        waiting have finished.
        """
        if not self._pending and not self._waiting:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle.append(d)
        return d

    @defer.inlineCallbacks
    def _notifyAttempt(self, handler, event, system, connectionId, userId, state, body,
                       attempt):
        try:
            response, _ = yield self._post(handler, event, system, connectionId, userId,
                                           state, body, "application/json")
            if 200 <= response.code < 300:
                return
            why, retry = f"answered {response.code}", response.code >= 500
        except BrokerError as e:
            why, retry = e.message, False
        except Exception as e:
            why, retry = str(e) or type(e).__name__, True
        if retry and attempt < self.retries:
            yield task.deferLater(self.reactor, self.backoff * 2 ** attempt, lambda: None)
            yield self._notifyAttempt(handler, event, system, connectionId, userId, state,
                                      body, attempt + 1)
            return
        self.stats["failed"] += 1
        self.stats["notificationsDropped"] += 1
        log.warn("{event} notification for {cid} on hub {hub} dropped: {why}", event=event,
                 cid=connectionId, hub=self.hubName, why=why)


def makeHTTPClient(reactor):
    """
    The client for event handlers: a L{HandlerHTTP}, which is also what
    closes its connections (C{closeCachedConnections}) at shutdown.
    """
    client = HandlerHTTP(reactor)
    return client, client



class UpstreamCollector:
    """
    Prometheus collector of the hubs' event handler traffic:
    C{broker_webpubsub_event_handler_requests_total{hub,outcome}} (C{sent}
    answered requests, C{failed} failures after their retries,
    C{unvalidated} events not sent to a handler that failed validation) and
    C{broker_webpubsub_event_handler_notifications_dropped_total{hub,reason}}
    (C{failed} after their retries, C{overflow} over the waiting bound),
    with the gauge C{broker_webpubsub_event_handler_notifications_waiting{hub}}.
    Hubs are those with handlers (the configuration's), so labels are
    bounded.

    @param upstreams: a callable returning C{{hub name: CloudEventsUpstream}}.
    """

    def __init__(self, upstreams):
        self.upstreams = upstreams

    def collect(self):
        requests = CounterMetricFamily(
            "broker_webpubsub_event_handler_requests",
            "Requests to Web PubSub event handlers, by outcome.", labels=["hub", "outcome"])
        dropped = CounterMetricFamily(
            "broker_webpubsub_event_handler_notifications_dropped",
            "Notifications (connected, disconnected, group presence) not delivered.",
            labels=["hub", "reason"])
        waiting = GaugeMetricFamily(
            "broker_webpubsub_event_handler_notifications_waiting",
            "Notifications waiting for a slot to their event handler.", labels=["hub"])
        for name, upstream in sorted(self.upstreams().items()):
            stats = upstream.stats
            for outcome in ("sent", "failed", "unvalidated"):
                requests.add_metric([name, outcome], stats[outcome])
            overflow = stats["notificationsOverflowed"]
            dropped.add_metric([name, "failed"], stats["notificationsDropped"] - overflow)
            dropped.add_metric([name, "overflow"], overflow)
            waiting.add_metric([name], len(upstream._waiting))
        yield requests
        yield dropped
        yield waiting
