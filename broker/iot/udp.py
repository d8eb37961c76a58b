# -*- test-case-name: tests.test_iot_udp -*-
"""
UDP telemetry: single-use tokens and the listener that redeems them.

A device cannot authenticate a datagram by itself cheaply, so it spends a
token instead: 16 random bytes (128 bits) the server issued to that device
over its authenticated TCP session (a TOKENS frame).  A token names one
device, is valid once and for C{ttl} seconds; guessing one is hopeless, and
one seen on the wire is spent by the datagram that carried it.  Replayed,
unknown, expired and malformed datagrams are dropped and counted; the
handler does dictionary work and one HMAC only, so it never blocks.

A token alone does not say the payload is the device's: anyone on the
path could swap it.  So each token is issued with a key of its own
(L{broker.iot.auth.tokenKey}, derived from the session's UDP key) and a
version 2 datagram carries a MAC made with it.  The MAC is checked before
the token is spent: a datagram whose MAC does not verify is dropped and
counted C{bad_mac}, and its token stays live, so a forger on the path
cannot burn a device's tokens.
"""

import os
import time
from collections import OrderedDict, deque

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from broker.core.limits import ALLOW, InboundLimiter
from broker.iot.auth import tokenKey
from broker.iot.frames import TOKEN_SIZE, FrameError, decodeDatagram
from broker.iot.interfaces import ITokenBook

log = Logger()

ACCEPTED = "accepted"
REPLAYED = "replayed"
UNKNOWN = "unknown"
EXPIRED = "expired"
MALFORMED = "malformed"
RATE_LIMITED = "rate_limited"
BAD_MAC = "bad_mac"
OUTCOMES = (ACCEPTED, REPLAYED, UNKNOWN, EXPIRED, MALFORMED, RATE_LIMITED, BAD_MAC)
# What a device bound to no UDP key (a legacy session, or none) is issued
# when version 1 datagrams are not accepted: nothing.
NO_KEY = None
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

    Each token is issued with the key of its datagram, derived from the
    UDP key its device's session bound (L{bindKey}).

    @param clock: monotonic seconds (tokens never outlive the process).
    @param legacy: issue keyless tokens (version 1 datagrams, no MAC) to
        devices whose session bound no UDP key; otherwise they get none.
    """

    def __init__(self, ttl=300.0, clock=time.monotonic, spentMemory=100000, legacy=False):
        self.ttl = ttl
        self.legacy = legacy
        self._clock = clock
        self._keys = {}                  # (fleet, deviceId) -> the session's UDP key
        self._live = {}                  # token -> (fleet, deviceId, expires, tokenKey)
        self._order = deque()            # (expires, token), issue order
        self._byDevice = {}              # (fleet, deviceId) -> set of live tokens
        self._spent = OrderedDict()
        self._spentMemory = spentMemory

    def deviceTokens(self, fleet, deviceId):
        """
        The device's live tokens (a new list).
        """
        return list(self._byDevice.get((fleet, deviceId), ()))

    def bindKey(self, fleet, deviceId, key):
        """
        The device's session authenticated with UDP key C{key} (None: a
        legacy session): the tokens issued to it from now on carry keys
        derived from it.
        """
        self._keys[(fleet, deviceId)] = key

    def unbindKey(self, fleet, deviceId, key):
        """
        The session that bound C{key} ended (a newer one may have bound
        another key since: that one is kept).
        """
        k = (fleet, deviceId)
        if k in self._keys and self._keys[k] == key:
            del self._keys[k]

    def boundKey(self, fleet, deviceId):
        """
        The UDP key of the device's current session, or None.
        """
        return self._keys.get((fleet, deviceId))

    def liveTokens(self):
        """
        C{[(token, fleet, deviceId, seconds left, tokenKey)]} for every
        live token.
        """
        now = self._clock()
        return [(t, f, d, expires - now, key)
                for t, (f, d, expires, key) in list(self._live.items()) if expires > now]

    def tokenKey(self, token):
        """
        C{(True, key)} for a live token issued here (key None for a legacy
        token), C{(False, None)} otherwise.
        """
        owner = self._live.get(token)
        return (False, None) if owner is None else (True, owner[3])

    def issue(self, fleet, deviceId, n):
        """
        @return: C{n} new tokens; none for a device with no UDP key bound
            unless L{legacy}.
        """
        key = self.boundKey(fleet, deviceId)
        if key is None and not self.legacy:
            return []
        return [t for t, _ in self.issueWithKeys(fleet, deviceId, n, key)]

    def issueWithKeys(self, fleet, deviceId, n, key):
        """
        @return: C{[(token, tokenKey)]}, C{n} new tokens of the device
            with the keys of their datagrams (None with no C{key}).
        """
        expires = self._clock() + self.ttl
        tokens = [os.urandom(TOKEN_SIZE) for _ in range(n)]
        issued = [(t, None if key is None else tokenKey(key, t)) for t in tokens]
        for t, k in issued:
            self._live[t] = (fleet, deviceId, expires, k)
            self._order.append((expires, t))
        mine = self._byDevice.get((fleet, deviceId))
        if mine is None:
            mine = self._byDevice[(fleet, deviceId)] = set()
        mine.update(tokens)
        return issued

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

    def redeem(self, token, verify=None):
        """
        Spend C{token}, if C{verify(tokenKey)} says the datagram carrying
        it is authentic (L{BAD_MAC} otherwise, the token still live).

        @return: C{(outcome, fleet, deviceId)}; fleet and device are None
            unless the outcome is L{ACCEPTED}.
        """
        owner = self._live.get(token)
        if owner is None:
            if token in self._spent:
                return REPLAYED, None, None
            return UNKNOWN, None, None
        if verify is not None and not verify(owner[3]):
            return BAD_MAC, None, None
        del self._live[token]
        fleet, deviceId, expires, _ = owner
        self._forget(fleet, deviceId, token)
        spent = self._spent
        spent[token] = None
        if len(spent) > self._spentMemory:
            spent.popitem(last=False)
        if expires <= self._clock():
            return EXPIRED, None, None
        return ACCEPTED, fleet, deviceId

    def spend(self, token, verify, then, *args):
        """
        See L{ITokenBook.spend}: L{redeem}, answered at once.
        """
        then(*self.redeem(token, verify), *args)

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
            datagram = decodeDatagram(data, self.concentrator.tokens.legacy)
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
        self.concentrator.tokens.spend(datagram.token, datagram.verify, self._spent,
                                       datagram.payload, addr)

    def _spent(self, outcome, fleet, deviceId, payload, addr):
        self.counts[outcome] += 1
        if outcome == ACCEPTED:
            self.concentrator.telemetry(fleet, deviceId, payload, "udp")
        elif outcome == BAD_MAC:
            self.concentrator.core.quietLog.info(
                ("iot", "udp bad mac"), "iot.udp: dropping a datagram from {addr} whose MAC "
                "does not verify (altered on the way, or forged with a live token); its "
                "token stays valid", addr=addr)
