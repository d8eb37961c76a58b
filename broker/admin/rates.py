# -*- test-case-name: tests.test_admin_api -*-
"""
The console's charts: the main counters sampled every few seconds into a
ring buffer covering the last ten minutes, so a browser that opens the
console sees the recent past at once, and the hot path pays nothing (the
sampler reads the same plain integers C{/metrics} reads).
"""

from collections import deque

from twisted.application import service
from twisted.internet.task import LoopingCall


class RateSampler(service.Service):
    """
    Every C{interval} seconds, records C{(time, {name: value})} of
    C{sources}; C{series()} turns consecutive samples into per-second
    rates (counters) or values (gauges).

    @param sources: callables returning C{{name: number}}; names listed in
        C{gauges} are levels (connections), the others counters.
    """

    name = "admin.rates"

    def __init__(self, reactor, sources, interval=2.0, window=600.0, gauges=()):
        self._reactor = reactor
        self.sources = list(sources)
        self.interval = interval
        self.gauges = frozenset(gauges)
        self.samples = deque(maxlen=int(window / interval) + 1)
        self._loop = None

    def startService(self):
        super().startService()
        self._loop = LoopingCall(self.sample)
        self._loop.clock = self._reactor
        self._loop.start(self.interval, now=True)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def sample(self):
        values = {}
        for source in self.sources:
            values.update(source())
        self.samples.append((self._reactor.seconds(), values))

    def series(self):
        """
        @return: C{{"interval", "t": [times], "series": {name: [values]}}}:
            for a counter, its rate per second between a sample and the
            one before (so one point fewer than samples); for a gauge, its
            value at each sample (from the second sample on, aligned).
        """
        samples = list(self.samples)
        times = [t for t, _ in samples[1:]]
        names = sorted({n for _, v in samples for n in v})
        out = {}
        for name in names:
            points = []
            for (t0, v0), (t1, v1) in zip(samples, samples[1:]):
                now = v1.get(name)
                if name in self.gauges or now is None:
                    points.append(now)
                    continue
                before = v0.get(name, 0)
                dt = (t1 - t0) or self.interval
                # A counter that went down was reset (a face reloaded): no rate.
                points.append(round((now - before) / dt, 3) if now >= before else None)
            out[name] = points
        return {"interval": self.interval, "t": times, "series": out}
