# -*- test-case-name: tests.test_limits -*-
"""
What one tenant, user or address may take: the shared mechanism behind
every face's admission limits (connections per hub, per user, per source
address), inbound rate limits (a token bucket per connection) and the
counters C{/metrics} shows for them.

Faces only map a refusal to their protocol's code; the counting lives
here.  In cluster mode every count is per node: a node knows only the
connections it holds.
"""

from twisted.logger import Logger

log = Logger()

# Admission kinds, also the C{reason} label of the refusal counter.
PER_HUB = "per_hub"
PER_USER = "per_user"
PER_ADDRESS = "per_address"

# What a rate limiter tells the face to do with one inbound frame.
ALLOW, DROP, CLOSE = 0, 1, 2


class Ticket:
    """
    The slots one connection holds; L{release} gives them back (once).
    """

    __slots__ = ("_limits", "_held")

    def __init__(self, limits):
        self._limits = limits
        self._held = []

    def release(self):
        held, self._held = self._held, []
        for kind, key in held:
            self._limits.release(kind, key)


class AdmissionLimits:
    """
    Open connections counted per C{(kind, key)}: e.g. C{(PER_HUB, "chat")}
    or C{(PER_ADDRESS, "203.0.113.7")}.  A count that falls to zero is
    forgotten, so the maps hold only what is open now.

    @param limits: C{{kind: n}}; 0 (or a missing kind) is no limit.
    @param overrides: C{{kind: {key: n}}}, e.g. one hub's own limit.
    """

    def __init__(self, limits, overrides=None):
        self._counts = {}        # (kind, key) -> open connections
        self.configure(limits, overrides)

    def configure(self, limits, overrides=None):
        """
        Replace the limits (a configuration reload), keeping the counts of
        what is open: the new limits apply to the next admissions, and a
        count already over a lowered limit only stops new ones.
        """
        self._limits = {k: n for k, n in limits.items() if n}
        self._overrides = {k: dict(v) for k, v in (overrides or {}).items()}

    def limit(self, kind, key):
        """
        The limit on C{(kind, key)}, 0 for none.
        """
        o = self._overrides.get(kind)
        if o is not None and key in o:
            return o[key]
        return self._limits.get(kind, 0)

    def count(self, kind, key):
        return self._counts.get((kind, key), 0)

    def __len__(self):
        return len(self._counts)

    def acquire(self, kind, key):
        """
        Take one slot of C{(kind, key)}.

        @return: whether it was free.
        """
        k = (kind, key)
        n = self._counts.get(k, 0)
        limit = self.limit(kind, key)
        if limit and n >= limit:
            return False
        self._counts[k] = n + 1
        return True

    def release(self, kind, key):
        k = (kind, key)
        n = self._counts.get(k, 0)
        if n <= 1:
            self._counts.pop(k, None)
        else:
            self._counts[k] = n - 1

    def admit(self, claims, ticket=None):
        """
        Take a slot for each C{(kind, key)} of C{claims} (a key of C{None}
        is skipped: an anonymous client has no user), all or none.

        @param ticket: a L{Ticket} to add the slots to (a connection
            admitted in two steps), or C{None} for a new one.
        @return: C{(ticket, None)}, or C{(None, kind)} naming the first
            limit that was full (the slots taken by this call are given
            back; those already on C{ticket} are kept).
        """
        if ticket is None:
            ticket = Ticket(self)
        taken = []
        for kind, key in claims:
            if key is None:
                continue
            if not self.acquire(kind, key):
                for k in taken:
                    self.release(*k)
                return None, kind
            taken.append((kind, key))
        ticket._held.extend(taken)
        return ticket, None


class InboundLimiter:
    """
    One connection's inbound rate: a token bucket of messages and one of
    bytes, each refilled at its rate up to C{burst} seconds' worth.

    L{check} is on every frame's path: a few arithmetic operations and one
    call of the clock.  A frame over either bucket is not taken from them;
    it is to be dropped, and once a connection has had more frames dropped
    in a row of excess than its message burst (the bucket never filled
    again in between), to be closed: it keeps exceeding.

    @param clock: C{callable() -> float} (the reactor's C{seconds}).
    @param messagesPerSecond: 0 for no limit on messages.
    @param bytesPerSecond: 0 for no limit on bytes.
    @param burst: seconds of either rate a quiet connection may save up.
    @param minBytes: the least byte capacity (a face's largest frame, so
        a frame it accepts can always pass).
    """

    __slots__ = ("_clock", "_mRate", "_bRate", "_mCap", "_bCap", "_m", "_b", "_last",
                 "dropped", "_closeAfter", "_resumeCall")

    def __init__(self, clock, messagesPerSecond, bytesPerSecond, burst=2.0, minBytes=0):
        self._clock = clock
        self._mRate = float(messagesPerSecond)
        self._bRate = float(bytesPerSecond)
        # A rate that is off is an infinite bucket: no test on the path.
        inf = float("inf")
        self._mCap = max(self._mRate * burst, 1.0) if messagesPerSecond else inf
        self._bCap = max(self._bRate * burst, float(minBytes), 1.0) if bytesPerSecond else inf
        self._m = self._mCap
        self._b = self._bCap
        self._last = clock()
        self.dropped = 0
        self._closeAfter = max(int(self._mCap), 16) if messagesPerSecond else 1024
        self._resumeCall = None

    @classmethod
    def build(cls, clock, messagesPerSecond, bytesPerSecond, burst, minBytes=0):
        """
        A limiter, or C{None} when both rates are 0 (no limit, no cost).
        """
        if not messagesPerSecond and not bytesPerSecond:
            return None
        return cls(clock, messagesPerSecond, bytesPerSecond, burst, minBytes)

    def check(self, size):
        """
        Account for one inbound frame of C{size} bytes.

        @return: L{ALLOW}, L{DROP} or L{CLOSE}.
        """
        now = self._clock()
        elapsed = now - self._last
        self._last = now
        m = self._m + elapsed * self._mRate
        b = self._b + elapsed * self._bRate
        if m >= self._mCap and b >= self._bCap:
            # Both full: the connection was quiet; its excess is forgiven.
            m, b = self._mCap, self._bCap
            self.dropped = 0
        elif m > self._mCap:
            m = self._mCap
        elif b > self._bCap:
            b = self._bCap
        if m < 1.0 or b < size:
            self._m, self._b = m, b
            self.dropped += 1
            return CLOSE if self.dropped > self._closeAfter else DROP
        self._m, self._b = m - 1.0, b - size
        return ALLOW

    def holdReading(self, reactor, size, pause, resume):
        """
        What every face does with a frame over the rate, besides dropping
        it: stop reading the connection (C{pause()}) until a frame of
        C{size} bytes would pass, then C{resume()}, so TCP holds the peer
        back at no cost to the broker.  One hold at a time; L{stop} cancels
        it when the connection goes.
        """
        if self._resumeCall is None:
            pause()
            self._resumeCall = reactor.callLater(max(self.wait(size), 0.001),
                                                 self._resumed, resume)

    def _resumed(self, resume):
        self._resumeCall = None
        resume()

    def stop(self):
        call, self._resumeCall = self._resumeCall, None
        if call is not None and call.active():
            call.cancel()

    def wait(self, size=0):
        """
        Seconds until a frame of C{size} bytes would pass (how long a face
        may stop reading).
        """
        w = 0.0
        if self._m < 1.0:
            w = (1.0 - self._m) / self._mRate
        if self._b < size:
            w = max(w, (min(size, self._bCap) - self._b) / self._bRate)
        return w


class LimitCounters:
    """
    What the limits refused, for C{/metrics}: C{{(face, hub, reason or
    action): count}} in three maps.  A hub label is only ever a hub that
    exists (or C{""}), so an attacker cannot grow the label set.
    """

    def __init__(self):
        self.admissionRefused = {}
        self.rateLimited = {}
        self.groupRefused = {}

    @staticmethod
    def _add(counts, key):
        counts[key] = counts.get(key, 0) + 1

    def refused(self, face, hub, reason):
        self._add(self.admissionRefused, (face, hub, reason))

    def limited(self, face, hub, action):
        self._add(self.rateLimited, (face, hub, action))

    def groupLimit(self, face, hub, reason):
        self._add(self.groupRefused, (face, hub, reason))


class QuietLog:
    """
    Logs a refusal at most once per C{interval} seconds per C{topic},
    saying how many were not logged since: a flood of refusals costs one
    line a minute, never one per frame or connection.
    """

    def __init__(self, clock, interval=60.0):
        self._clock = clock
        self._interval = interval
        self._topics = {}        # topic -> [last logged, suppressed since]

    def info(self, topic, fmt, **kw):
        now = self._clock()
        entry = self._topics.get(topic)
        if entry is not None and now - entry[0] < self._interval:
            entry[1] += 1
            return
        suppressed = entry[1] if entry is not None else 0
        self._topics[topic] = [now, 0]
        if suppressed:
            fmt += " ({suppressed} more not logged in the last {interval:g}s)"
        log.info(fmt, suppressed=suppressed, interval=self._interval, **kw)


def peerHost(transport):
    """
    The source address of a connection (its IP, an IPv6 one as is), or
    C{"?"} for a transport without one (a UNIX socket: every client then
    shares one per-address count).
    """
    try:
        peer = transport.getPeer()
    except Exception:
        return "?"
    return getattr(peer, "host", None) or "?"
