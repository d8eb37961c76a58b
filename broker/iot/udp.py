# -*- test-case-name: tests.test_iot_udp -*-
"""
UDP telemetry: single-use tokens and the listener that redeems them.

A device cannot authenticate a datagram by itself cheaply, so it spends a
token instead: 16 random bytes (128 bits) the server issued to that device
over its authenticated TCP session (a TOKENS frame).  A token names one
device, is valid once and for C{ttl} seconds; guessing one is hopeless, and
one seen on the wire is spent by the datagram that carried it.  Replayed,
unknown, expired and malformed datagrams are dropped and counted; the
handler does dictionary work only, so it never blocks.
"""

import os
import time
from collections import OrderedDict, deque

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from broker.core.limits import ALLOW, InboundLimiter
from broker.iot.frames import TOKEN_SIZE, FrameError, decodeDatagram
from broker.iot.interfaces import ITokenBook

log = Logger()

ACCEPTED = "accepted"
REPLAYED = "replayed"
UNKNOWN = "unknown"
EXPIRED = "expired"
MALFORMED = "malformed"
RATE_LIMITED = "rate_limited"
OUTCOMES = (ACCEPTED, REPLAYED, UNKNOWN, EXPIRED, MALFORMED, RATE_LIMITED)
# Source addresses whose datagram rate is tracked at once (least recently
# heard forgotten first): a flood from spoofed addresses cannot grow it.
MAX_SOURCES = 65536


@implementer(ITokenBook)
class TokenBook:
    """
    The tokens issued and not yet spent, and a bounded memory of the
    recently spent ones (so a replay is counted as such; beyond
    C{spentMemory} a replay is counted as unknown, and dropped all the
    same).

    @param clock: monotonic seconds (tokens never outlive the process).
    """

    def __init__(self, ttl=300.0, clock=time.monotonic, spentMemory=100000):
        self.ttl = ttl
        self._clock = clock
        self._live = {}                  # token -> (fleet, deviceId, expires)
        self._order = deque()            # (expires, token), issue order
        self._byDevice = {}              # (fleet, deviceId) -> set of live tokens
        self._spent = OrderedDict()
        self._spentMemory = spentMemory

    def deviceTokens(self, fleet, deviceId):
        """
        The device's live tokens (a new list).
        """
        return list(self._byDevice.get((fleet, deviceId), ()))

    def liveTokens(self):
        """
        C{[(token, fleet, deviceId, seconds left)]} for every live token.
        """
        now = self._clock()
        return [(t, f, d, expires - now) for t, (f, d, expires) in list(self._live.items())
                if expires > now]

    def issue(self, fleet, deviceId, n):
        expires = self._clock() + self.ttl
        tokens = [os.urandom(TOKEN_SIZE) for _ in range(n)]
        owner = (fleet, deviceId, expires)
        for t in tokens:
            self._live[t] = owner
            self._order.append((expires, t))
        mine = self._byDevice.get((fleet, deviceId))
        if mine is None:
            mine = self._byDevice[(fleet, deviceId)] = set()
        mine.update(tokens)
        return tokens

    def outstanding(self, fleet, deviceId):
        mine = self._byDevice.get((fleet, deviceId))
        return len(mine) if mine else 0

    def _forget(self, fleet, deviceId, token):
        k = (fleet, deviceId)
        mine = self._byDevice.get(k)
        if mine is not None:
            mine.discard(token)
            if not mine:
                del self._byDevice[k]

    def redeem(self, token):
        """
        Spend C{token}.

        @return: C{(outcome, fleet, deviceId)}; fleet and device are None
            unless the outcome is L{ACCEPTED}.
        """
        owner = self._live.pop(token, None)
        if owner is None:
            if token in self._spent:
                return REPLAYED, None, None
            return UNKNOWN, None, None
        fleet, deviceId, expires = owner
        self._forget(fleet, deviceId, token)
        spent = self._spent
        spent[token] = None
        if len(spent) > self._spentMemory:
            spent.popitem(last=False)
        if expires <= self._clock():
            return EXPIRED, None, None
        return ACCEPTED, fleet, deviceId

    def spend(self, token, then, *args):
        """
        See L{ITokenBook.spend}: L{redeem}, answered at once.
        """
        then(*self.redeem(token), *args)

    def isLive(self, token):
        return token in self._live

    def revoke(self, fleet, deviceId):
        """
        Forget every live token of a device: its key was revoked, or a new
        session of it gets a fresh batch (so reconnecting never piles up
        tokens).
        """
        for t in self._byDevice.pop((fleet, deviceId), ()):
            self._live.pop(t, None)

    def purge(self):
        """
        Drop expired tokens (a late datagram then counts as unknown);
        return how many.
        """
        now = self._clock()
        order = self._order
        n = 0
        while order and order[0][0] <= now:
            _, t = order.popleft()
            owner = self._live.pop(t, None)
            if owner is not None:
                n += 1
                self._forget(owner[0], owner[1], t)
        return n

    def __len__(self):
        return len(self._live)


class TelemetryListener(DatagramProtocol):
    """
    Redeems each datagram's token and hands accepted telemetry to the
    concentrator.  Counts every outcome in C{counts}.
    """

    noisy = False

    def __init__(self, concentrator, maxDatagram=65507, ratePerSource=0.0, burst=2.0,
                 maxSources=MAX_SOURCES):
        self.concentrator = concentrator
        self.maxDatagram = maxDatagram
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self._loggedMalformed = False
        # Datagrams per second per source address, checked before anything
        # else; 0: no limit.
        self.ratePerSource = ratePerSource
        self.burst = burst
        self.maxSources = maxSources
        self._sources = OrderedDict()    # host -> InboundLimiter

    def _limited(self, host):
        """
        Whether a datagram from C{host} is over its source's rate (then
        dropped and counted; a datagram has no one to answer).
        """
        sources = self._sources
        limiter = sources.get(host)
        if limiter is None:
            clock = self.concentrator.reactor.seconds
            limiter = sources[host] = InboundLimiter(clock, self.ratePerSource, 0, self.burst)
            if len(sources) > self.maxSources:
                sources.popitem(last=False)
        else:
            sources.move_to_end(host)
        if limiter.check(0) == ALLOW:
            return False
        self.counts[RATE_LIMITED] += 1
        core = self.concentrator.core
        core.limits.limited("iot", "", "dropped")
        core.quietLog.info(("iot", "udp rate"), "iot.udp: dropping datagrams from {host}: "
                           "over {rate:g} a second", host=host, rate=self.ratePerSource)
        return True

    def datagramReceived(self, data, addr):
        counts = self.counts
        if self.ratePerSource and self._limited(addr[0]):
            return
        try:
            if len(data) > self.maxDatagram:
                raise FrameError("FRAME_TOO_LARGE", "datagram too large")
            token, payload = decodeDatagram(data)
        except FrameError as e:
            counts[MALFORMED] += 1
            if not self._loggedMalformed:
                # Once: a flood of garbage must not flood the log.
                self._loggedMalformed = True
                log.info("iot.udp: dropping malformed datagram from {addr}: {why} "
                         "(further ones are only counted)", addr=addr, why=e.message)
            return
        # In cluster mode the answer comes a little later (one Redis round
        # trip for the datagrams of a reactor turn).
        self.concentrator.tokens.spend(token, self._spent, payload)

    def _spent(self, outcome, fleet, deviceId, payload):
        self.counts[outcome] += 1
        if outcome == ACCEPTED:
            self.concentrator.telemetry(fleet, deviceId, payload, "udp")
