# -*- test-case-name: tests.test_iot_api -*-
"""
A latency histogram kept as plain integers, turned into a Prometheus
family only at scrape time (the hot path pays one loop over a dozen
buckets, no lock, no library call).
"""

from prometheus_client.core import HistogramMetricFamily

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
           30.0, 60.0)


class LatencyHistogram:
    def __init__(self, buckets=BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, seconds):
        self.total += seconds
        for i, b in enumerate(self.buckets):
            if seconds <= b:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def family(self, name, doc):
        cumulative, acc = [], 0
        for b, n in zip(self.buckets, self.counts):
            acc += n
            cumulative.append((repr(b), acc))
        cumulative.append(("+Inf", acc + self.counts[-1]))
        return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=self.total)
