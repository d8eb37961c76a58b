# -*- test-case-name: tests.test_accesslog -*-
"""
Tests for L{broker.net.accesslog}: the batched access log and its line
formatter.
"""

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import TestCase
from twisted.web.http import combinedLogFormatter
from twisted.web.test.requesthelper import DummyRequest

from broker.net.accesslog import AccessLog, combinedLine


class AccessLogTests(TestCase):
    def setUp(self):
        self.clock = Clock()
        self.events = []
        self.log = AccessLog(self.clock, Logger(observer=self.events.append), interval=1.0,
                             maxLines=3)

    def lines(self):
        return [e["access_log"].split("\n") for e in self.events]

    def test_oneEventPerInterval(self):
        """
        Lines written within the interval go out as one info event, when
        the interval has passed; nothing is emitted before.
        """
        self.log.write("a")
        self.clock.advance(0.5)
        self.log.write("b")
        self.assertEqual(self.events, [])
        self.clock.advance(0.5)
        self.assertEqual(self.lines(), [["a", "b"]])
        self.assertEqual(self.events[0]["log_level"], LogLevel.info)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(5)
        self.assertEqual(len(self.events), 1)

    def test_asTwistedWrites(self):
        """
        Site.log writes each line with its newline: one line each.
        """
        self.log.write("a\n")
        self.log.write("b\n")
        self.clock.advance(1)
        self.assertEqual(self.lines(), [["a", "b"]])

    def test_boundedLines(self):
        """
        At most maxLines are held: the one that fills the batch flushes it
        at once, and the timer goes with it.
        """
        for line in "abcd":
            self.log.write(line)
        self.assertEqual(self.lines(), [["a", "b", "c"]])
        self.clock.advance(1)
        self.assertEqual(self.lines(), [["a", "b", "c"], ["d"]])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flush(self):
        """
        close (the site stopping) emits what is held and cancels the timer.
        """
        self.log.write("a")
        self.log.close()
        self.log.flush()
        self.assertEqual(self.lines(), [["a"]])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CombinedLineTests(TestCase):
    def request(self, **attrs):
        r = DummyRequest([b""])
        r.client = IPv4Address("TCP", "10.0.0.1", 4711)
        r.method = b"POST"
        r.uri = b"/api/hubs/chat/:send?api-version=2024-12-01"
        r.clientproto = b"HTTP/1.1"
        r.code = 202
        r.sentLength = 0
        for k, v in attrs.items():
            setattr(r, k, v)
        return r

    def test_sameAsTwisted(self):
        """
        The line is Twisted's own, byte for byte, for plain and for odd
        fields (quotes, backslashes, control and non-ASCII bytes), with and
        without referrer and agent, for an address that is not IP.
        """
        stamp = "[06/Dec/2026:22:00:00 +0000]"
        cases = [self.request(), self.request(sentLength=123, code=200)]
        odd = self.request(uri=b'/a"b\\c\x01\xff\n', method=b"G\"ET")
        odd.requestHeaders.setRawHeaders(b"referer", [b'http://x/"q"\\'])
        odd.requestHeaders.setRawHeaders(b"user-agent", [b"agent/1.0 \xc3\xbc"])
        cases.append(odd)
        unix = self.request()
        unix.client = UNIXAddress(b"/tmp/s")
        cases.append(unix)
        plain = self.request()
        plain.requestHeaders.setRawHeaders(b"user-agent", [b"python-requests/2.32"])
        cases.append(plain)
        for r in cases:
            self.assertEqual(combinedLine(stamp, r), combinedLogFormatter(stamp, r))
