# -*- test-case-name: tests.test_webpubsub_validation -*-
"""
Abuse protection for event handlers, as Azure Web PubSub does it.

Azure validates an event handler when it is configured: it resolves the
URL template with C{{event}} set to C{validate} (and C{{hub}} to the hub)
and sends that URL an C{OPTIONS} request; a handler that does not answer
with C{WebHook-Allowed-Origin: *} (or the service's host) is refused.
Events then go to their own URLs without further checks, so a handler that
answers C{OPTIONS} only on its C{/validate} path works.

The request carries what the official middlewares look for:
C{WebHook-Request-Origin} (the abuse-protection request itself) and
C{ce-awpsversion} (C{@azure/web-pubsub-express} ignores an C{OPTIONS}
without it, answering 404); the middleware matches the path against its
C{path} option, which the validate URL, under the same template as the
events, shares.

Here the handlers of the configured hubs are validated when they are
loaded (L{HandlerValidation.load}, at start-up and on L{reload}); one that
fails is logged once, named on the admin C{/healthz} (a health note), sent
no events, and asked again with exponential backoff until it agrees.
"""

from twisted.internet import defer
from twisted.logger import Logger

log = Logger()

VALIDATE = "validate"
PENDING, VALID, FAILED = "pending", "valid", "failed"


class _Target:
    """
    One validate URL, shared by the handlers and hubs that resolve to it.
    """

    def __init__(self, url, hubName):
        self.url = url
        self.hubName = hubName
        self.state = PENDING
        self.why = None
        self.attempts = 0
        self.retry = None
        self.inFlight = None
        self.waiting = []
        self.complained = False


def allowedOrigin(values, origin):
    """
    Whether C{WebHook-Allowed-Origin} header values (bytes) allow C{origin}.
    """
    return any(v.strip() in (b"*", origin.encode("utf-8"))
               for value in values for v in value.split(b","))


class HandlerValidation:
    """
    The validation state of every event handler of the broker.

    @param http: a L{broker.webpubsub.handlerhttp.HandlerHTTP}.
    @param origin: our host name, sent as C{WebHook-Request-Origin}.
    @param health: the core's L{broker.core.health.HealthNotes}, or C{None}.
    @param backoff: the first retry's delay, doubled up to C{maxBackoff}.
    """

    def __init__(self, reactor, http, origin, health=None, timeout=10.0, backoff=1.0,
                 maxBackoff=300.0):
        self.reactor = reactor
        self.http = http
        self.origin = origin
        self.health = health
        self.timeout = timeout
        self.backoff = backoff
        self.maxBackoff = maxBackoff
        self._targets = {}
        self._loaded = {}

    @staticmethod
    def validateURL(hubName, handler):
        return handler.url(hubName, VALIDATE)

    # -- loading ---------------------------------------------------------

    def load(self, hubs):
        """
        Validate the handlers of C{hubs} (hub name to a list of
        L{broker.webpubsub.upstream.EventHandler}).

        @return: a Deferred firing once each has had its first answer.
        """
        self._loaded = {name: list(handlers) for name, handlers in hubs.items()}
        results = []
        for hubName, handlers in sorted(self._loaded.items()):
            for handler in handlers:
                results.append(self._target(hubName, handler)[1])
        return defer.DeferredList(results)

    def reload(self, hubs=None):
        """
        Forget every answer and validate again (C{hubs} as for L{load};
        default: the hubs last loaded), as a configuration reload should.
        """
        self.stop()
        return self.load(self._loaded if hubs is None else hubs)

    def stop(self):
        """
        Cancel the retries and the requests under way (the broker stops).
        """
        targets, self._targets = self._targets, {}
        for target in targets.values():
            if target.retry is not None and target.retry.active():
                target.retry.cancel()
            if self.health is not None:
                self.health.clear(("webpubsub", "handler", target.url))
            if target.inFlight is not None:
                target.inFlight.cancel()
            self._answerWaiting(target, False)

    # -- checking --------------------------------------------------------

    def check(self, hubName, handler):
        """
        A Deferred firing with whether C{handler} may be sent events:
        at once when its validation has answered, else once it does.
        """
        return self._target(hubName, handler)[1]

    def state(self, hubName, handler):
        """
        C{"pending"}, C{"valid"} or C{"failed"}, and why (or C{None}).
        """
        target = self._targets.get(self.validateURL(hubName, handler))
        return (target.state, target.why) if target is not None else (PENDING, None)

    def _target(self, hubName, handler):
        url = self.validateURL(hubName, handler)
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = _Target(url, hubName)
            self._attempt(target)
        if target.state == PENDING:
            d = defer.Deferred()
            target.waiting.append(d)
            return target, d
        return target, defer.succeed(target.state == VALID)

    # -- asking ----------------------------------------------------------

    def _attempt(self, target):
        target.retry = None
        target.attempts += 1
        d = target.inFlight = self.http.request(
            "OPTIONS", target.url, headers={"WebHook-Request-Origin": self.origin,
                                            "ce-awpsversion": "1.0"},
            timeout=self.timeout)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(target,),
                       errbackArgs=(target,))
        d.addErrback(lambda f: log.failure("validating {url}", f, url=target.url))

    def _answered(self, response, target):
        target.inFlight = None
        if self._targets.get(target.url) is not target:
            return  # stopped or reloaded meanwhile
        allowed = response.headers.getRawHeaders(b"webhook-allowed-origin") or []
        if not 200 <= response.code < 300:
            self._refused(target, f"it answered {response.code} to the OPTIONS request")
        elif not allowed:
            self._refused(target, "its answer has no WebHook-Allowed-Origin header")
        elif not allowedOrigin(allowed, self.origin):
            self._refused(target, f"its WebHook-Allowed-Origin does not allow {self.origin}")
        else:
            self._valid(target)

    def _failed(self, failure, target):
        target.inFlight = None
        if failure.check(defer.CancelledError) and self._targets.get(target.url) is not target:
            return  # stopped
        self._refused(target, f"it could not be reached: {failure.getErrorMessage()}")

    def _valid(self, target):
        if target.state == FAILED or target.complained:
            log.info("webpubsub: event handler {url} of hub {hub} is validated; "
                     "events are sent to it", url=target.url, hub=target.hubName)
        target.state, target.why, target.attempts = VALID, None, 0
        if self.health is not None:
            self.health.clear(("webpubsub", "handler", target.url))
        self._answerWaiting(target, True)

    def _refused(self, target, why):
        if self._targets.get(target.url) is not target:
            return  # stopped or reloaded meanwhile
        target.state, target.why = FAILED, why
        delay = min(self.backoff * 2 ** (target.attempts - 1), self.maxBackoff)
        if not target.complained:
            target.complained = True
            log.warn("webpubsub: event handler {url} of hub {hub} failed validation: {why}; "
                     "no events are sent to it; asking again with backoff",
                     url=target.url, hub=target.hubName, why=why)
        if self.health is not None:
            self.health.note(("webpubsub", "handler", target.url),
                             f"webpubsub: event handler {target.url} of hub {target.hubName} "
                             f"failed validation: {why}")
        self._answerWaiting(target, False)
        target.retry = self.reactor.callLater(delay, self._attempt, target)

    @staticmethod
    def _answerWaiting(target, ok):
        waiting, target.waiting = target.waiting, []
        for d in waiting:
            d.callback(ok)
