# -*- test-case-name: tests.test_webpubsub,tests.test_limits -*-
"""
What a Web PubSub client may make the broker do on its behalf, bounded by
not reading it: the transport is paused while the core's fan-out backlog
is high (publishers), while too many of its user events wait for the event
handler, or while it is over its inbound rate; it resumes once no reason
is left, so TCP holds the client back at no cost to the broker.
"""

from collections import deque

from twisted.internet import defer

from broker.core.errors import CloseCode, Throttled
from broker.core.limits import CLOSE

FACE = "webpubsub"
# A dropped frame is parsed for its ackId (to answer TooManyRequests) only
# up to this size: the point of dropping is not to spend CPU on it.
ACK_PEEK = 4096

# Why a client's reading is held (InboundFlow._readingHeld).
_FANOUT = 1
_EVENTS = 2
_RATE = 4


class InboundFlow:
    """
    Mixed into L{broker.webpubsub.protocol.ClientProtocol}, which provides
    C{transport}, C{factory}, C{hub}, C{codec}, C{connectionId}, C{_ack}
    and C{_refuse}.
    """

    # Why reading from the client is paused (bits: _FANOUT, _EVENTS, _RATE);
    # the transport is resumed only when no reason is left.
    _readingHeld = 0
    _eventsInFlight = 0
    _eventsWaiting = None
    # The inbound rate limiter (InboundLimiter), if any.
    _inbound = None
    _rateClosing = False

    def _holdReading(self, why):
        if not self._readingHeld:
            self.transport.pauseProducing()
        self._readingHeld |= why

    def _releaseReading(self, why):
        if not self._readingHeld & why:
            return
        self._readingHeld &= ~why
        if not self._readingHeld and self.transport is not None \
                and self.state != self.STATE_CLOSED:
            self.transport.resumeProducing()

    def _throttle(self):
        """
        Stop reading this publisher while the core's fan-out backlog is over
        its high-water mark, so a fast publisher cannot queue deliveries
        without bound; reading resumes once the backlog has drained.
        """
        if self._readingHeld & _FANOUT:
            return
        drained = self.hub.backpressure()
        if drained is None:
            return
        self._holdReading(_FANOUT)
        drained.addCallback(lambda _: self._releaseReading(_FANOUT))

    def _sendEvent(self, session, event, message):
        """
        Send a user event to the upstream handler, at most the factory's
        C{maxEventsInFlight} of this client's at once: past it, the event
        waits here and the client is not read until one is answered, so a
        client cannot open upstream requests without bound (what waits is
        at most the frames of the read that crossed the limit).
        """
        if self._eventsInFlight < self.factory.maxEventsInFlight:
            return self._startEvent(session, event, message)
        self._holdReading(_EVENTS)
        if self._eventsWaiting is None:
            self._eventsWaiting = deque()
        entry = [session, event, message, None]

        def unqueue(_):  # a cancelled invocation leaves the queue
            if entry in self._eventsWaiting:
                self._eventsWaiting.remove(entry)
        d = entry[3] = defer.Deferred(unqueue)
        self._eventsWaiting.append(entry)
        return d

    def _startEvent(self, session, event, message):
        self._eventsInFlight += 1
        d = defer.maybeDeferred(session.sendEvent, event, message)
        d.addBoth(self._eventDone)
        return d

    def _eventDone(self, result):
        self._eventsInFlight -= 1
        waiting = self._eventsWaiting
        if waiting:
            session, event, message, d = waiting.popleft()
            self._startEvent(session, event, message).chainDeferred(d)
        if not waiting:
            self._releaseReading(_EVENTS)
        return result

    # -- inbound rate -----------------------------------------------------

    def _overRate(self, verdict, payload, isBinary):
        """
        A frame over the connection's inbound rate: dropped (a PubSub
        request with an ackId is answered C{TooManyRequests}) and reading
        paused until the bucket has room again, so TCP holds the client
        back at no cost to the broker; a client that keeps exceeding
        (L{InboundLimiter}) is closed with 1008.
        """
        core, hub = self.factory.core, self.hub
        if self._rateClosing:
            return
        if verdict == CLOSE:
            self._rateClosing = True
            core.limits.limited(FACE, hub.name, "closed")
            core.quietLog.info((FACE, "rate", "closed"),
                               "webpubsub: closing {cid} on hub {hub}: it keeps sending over "
                               "its inbound rate limit", cid=self.connectionId, hub=hub.name)
            self._refuse(CloseCode.POLICY_VIOLATION, "inbound rate limit exceeded")
            return
        core.limits.limited(FACE, hub.name, "dropped")
        codec = self.codec
        if codec is not None and isBinary == codec.binary and len(payload) <= ACK_PEEK:
            ackId = codec.peekAckId(payload)
            if ackId is not None:
                self._ack(ackId, Throttled("over the connection's inbound rate limit; "
                                           "the request was dropped"))
        if self.transport is not None:
            self._inbound.holdReading(self.factory.reactor, len(payload),
                                      lambda: self._holdReading(_RATE),
                                      lambda: self._releaseReading(_RATE))
