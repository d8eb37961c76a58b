# -*- test-case-name: tests.test_http_bounds -*-
"""
The HTTP access log, batched.

twisted.web writes one access-log line per request to C{log.logfile},
which turns each line into a log event: formatted, time-stamped and
written by every observer.  At thousands of requests a second that was an
eighth of the broker's CPU on the REST API.  L{AccessLog} keeps the same
lines (Twisted's combined log format, each with its own time stamp) and
emits them as one log event per second, or per L{MAX_LINES} lines,
whichever comes first: the first line follows the event's prefix, the
others are the event's continuation lines.  Nothing is held longer than a
second, and never more than L{MAX_LINES} lines.
"""

from twisted.internet import address
from twisted.logger import Logger
from twisted.web.http import _escape

# The most lines one event carries (and so the most held at once).
MAX_LINES = 256
# Seconds a line may wait for the others of its event.
INTERVAL = 1.0

# Bytes that _escape leaves as they are: printable ASCII but " and \.
_PLAIN = bytes(b for b in range(0x20, 0x7f) if b not in b'"\\')
_ADDRESSES = (address.IPv4Address, address.IPv6Address)


def _text(value):
    """
    Twisted's C{_escape(value)}, at the cost of one C{translate} when
    there is nothing to escape.
    """
    if isinstance(value, str):
        value = value.encode("ascii")
    if not value.translate(None, _PLAIN):
        return value.decode("ascii")
    return _escape(value)


def combinedLine(timestamp, request):
    """
    The combined log format line of C{request}, as Twisted's
    C{combinedLogFormatter} writes it (an L{IAccessLogFormatter}).
    """
    addr = request.getClientAddress()
    ip = _text(addr.host) if isinstance(addr, _ADDRESSES) else "-"
    referrer = request.getHeader(b"referer")
    agent = request.getHeader(b"user-agent")
    return (f'"{ip}" - - {timestamp} "{_text(request.method)} {_text(request.uri)} '
            f'{_text(request.clientproto)}" {request.code:d} {request.sentLength or "-"} '
            f'"{_text(referrer) if referrer else "-"}" "{_text(agent) if agent else "-"}"')


class AccessLog:
    """
    Access-log lines gathered into one event per L{INTERVAL} seconds: the
    log file of a L{broker.net.http.BoundedSite} that would write to
    Twisted's C{log.logfile}.

    @param reactor: an L{IReactorTime}, for the flush timer.
    @param logger: the L{Logger} the events are emitted on.
    """

    def __init__(self, reactor, logger=None, interval=INTERVAL, maxLines=MAX_LINES):
        self.reactor = reactor
        self.log = logger if logger is not None else Logger(namespace="broker.http.access")
        self.interval = interval
        self.maxLines = maxLines
        self._lines = []
        self._call = None

    def write(self, text):
        """
        Add the lines of C{text} (what Twisted's C{Site.log} writes to its
        log file: one line and its newline).
        """
        lines = self._lines
        for line in text.rstrip("\n").split("\n"):
            lines.append(line)
            if len(lines) >= self.maxLines:
                self.flush()
                lines = self._lines
        if lines and self._call is None:
            self._call = self.reactor.callLater(self.interval, self.flush)

    def close(self):
        """
        The site stopped: emit what is held (a later write starts again).
        """
        self.flush()

    def flush(self):
        """
        Emit the lines held now, as one event.
        """
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        lines, self._lines = self._lines, []
        if lines:
            self.log.info("{access_log}", access_log="\n".join(lines))
