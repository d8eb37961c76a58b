# -*- test-case-name: tests.test_logs -*-
"""
What the broker's log lines share: one way to write a peer's address, one
rate-limited place where refused connections are logged and counted, and
the JSON log format (C{[broker] log_format = "json"}).

Peer addresses are written C{host:port}, an IPv6 host in brackets
(C{[::1]:5000}), a UNIX socket by its path: L{peerAddress}, whatever a
face has at hand (an address, a transport, an HTTP request).

A refused connection (a WebSocket handshake refused with 401 under a
token-guessing bot, say) is counted on C{/metrics} as
C{broker_handshakes_refused_total{face, reason}} and logged at most once a
minute per source address (L{RefusalLog}), saying how many were not
logged; the map of addresses is bounded, so a flood from many addresses
costs memory up to the bound only.

The JSON format is one object per line and event: C{time} (ISO 8601,
UTC), C{level}, C{namespace}, C{text} (the event formatted as the text
log would), C{traceback} for a failure, then the event's own fields whose
values are JSON (C{key}, C{address}, C{hub}...).  twistd takes it as the
application's L{ILogObserver} (see L{observeApplication}), writing where
its own text observer would: stdout under C{-n}, else C{--logfile} (or
C{twistd.log}), rotated on C{SIGUSR1}.
"""

import json
import math
import os
import signal
import sys
import time
from collections import OrderedDict
from datetime import datetime, timezone

from prometheus_client.core import CounterMetricFamily
from twisted.logger import FileLogObserver, ILogObserver, Logger, formatEvent
from twisted.python import logfile

log = Logger()


# -- addresses --------------------------------------------------------------


def peerAddress(address):
    """
    C{host:port} (C{[v6host]:port}) for an IP address, the path for a
    UNIX socket, C{"?"} when there is none.

    @param address: an L{IAddress}, or a transport or HTTP request (its
        peer's address is used).
    """
    if address is None:
        return "?"
    for getter in ("getClientAddress", "getPeer"):
        get = getattr(address, getter, None)
        if get is not None:
            try:
                address = get()
            except Exception:
                return "?"
            break
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if name:
        return os.fsdecode(name)
    return "?" if address is None else str(address)


# -- refused connections ----------------------------------------------------


class RefusalLog:
    """
    Counts refused connections per C{(face, reason)} and logs each source
    address at most once per C{interval}.

    @ivar counts: C{{(face, reason): n}}, read by L{RefusalCollector}.
    """

    def __init__(self, clock, interval=60.0, maxAddresses=10_000):
        self._clock = clock
        self._interval = interval
        self._max = maxAddresses
        # host -> [last logged, suppressed since]; oldest first.
        self._addresses = OrderedDict()
        self.counts = {}

    def refused(self, face, reason, peer, fmt, **kw):
        """
        Count one refusal and log it unless its source address was logged
        less than C{interval} ago.

        @param reason: a label from a small fixed set (an HTTP status, a
            protocol's error code), never text a client chose.
        @param peer: the connection's transport or address: logged as
            L{peerAddress}, limited by its host.
        @param fmt: the log format; C{{peer}}, C{{face}}, C{{reason}} and
            C{kw} are available in it.
        """
        key = (face, reason)
        self.counts[key] = self.counts.get(key, 0) + 1
        address = peerAddress(peer)
        host = address.rpartition(":")[0] or address
        now = self._clock()
        entry = self._addresses.get(host)
        if entry is not None and now - entry[0] < self._interval:
            entry[1] += 1
            return
        suppressed = entry[1] if entry is not None else 0
        self._addresses[host] = [now, 0]
        self._addresses.move_to_end(host)
        while len(self._addresses) > self._max:
            self._addresses.popitem(last=False)
        if suppressed:
            fmt += " ({suppressed} more from this address not logged in the last {interval:g}s)"
        log.info(fmt, face=face, reason=reason, peer=address, suppressed=suppressed,
                 interval=self._interval, **kw)


class RefusalCollector:
    """
    C{broker_handshakes_refused_total{face, reason}} from a L{RefusalLog}.
    """

    def __init__(self, refusals):
        self._refusals = refusals

    def collect(self):
        c = CounterMetricFamily("broker_handshakes_refused",
                                "Connections refused at their handshake (WebSocket, "
                                "session hello), by face and reason.",
                                labels=["face", "reason"])
        for (face, reason), n in sorted(self._refusals.counts.items()):
            c.add_metric([face, reason], n)
        yield c


# -- JSON log format --------------------------------------------------------


def _jsonable(value, depth=0):
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if depth > 4:
        return False
    if isinstance(value, (list, tuple)):
        return all(_jsonable(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v, depth + 1) for k, v in value.items())
    return False


# Fields of the legacy log system that repeat what the object already says.
_SKIPPED = {"message", "format", "isError", "time", "why", "failure"}


def eventAsJSON(event):
    """
    One log event as a JSON line (see the module docstring).
    """
    level = event.get("log_level")
    when = event.get("log_time")
    out = {
        "time": (datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds")
                 .replace("+00:00", "Z") if when is not None else None),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace"),
        "text": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            out["traceback"] = failure.getTraceback()
        except Exception:
            out["traceback"] = repr(failure)
    for key, value in event.items():
        if (key.startswith("log_") or key in out or key in _SKIPPED
                or not _jsonable(value)):
            continue
        out[key] = value
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False) + "\n"


def jsonFileLogObserver(outFile):
    """
    An L{ILogObserver} writing L{eventAsJSON} lines to C{outFile}.
    """
    return FileLogObserver(outFile, eventAsJSON)


def twistdLogFile(twistdOptions):
    """
    Where twistd's own observer would write, by its options (C{--logfile},
    C{-n}), as C{twisted.scripts._twistd_unix.UnixAppLogger} decides:
    stdout in the foreground without a file, else the file (C{twistd.log}
    by default), rotated on C{SIGUSR1}.
    """
    path = twistdOptions.get("logfile") if twistdOptions is not None else None
    nodaemon = twistdOptions is None or bool(twistdOptions.get("nodaemon"))
    if path == "-" or (nodaemon and not path):
        return sys.stdout
    f = logfile.LogFile.fromFullPath(path or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):
        def rotate(signum, frame):
            from twisted.internet import reactor
            reactor.callFromThread(f.rotate)
        signal.signal(signal.SIGUSR1, rotate)
    return f


def observeApplication(svc, observerFactory):
    """
    Have twistd log through C{observerFactory()} when it runs C{svc}.

    twistd asks the application it makes for a plugin's service for an
    L{ILogObserver} component before it falls back to its own text
    observer; the service is handed that application as its parent.  So
    the component is set there, unless one is already (C{--logger}, which
    twistd prefers anyway, leaves the application alone).
    """
    original = svc.setServiceParent

    def setServiceParent(parent):
        getComponent = getattr(parent, "getComponent", None)
        if getComponent is not None and getComponent(ILogObserver, None) is None:
            parent.setComponent(ILogObserver, observerFactory())
        return original(parent)
    svc.setServiceParent = setServiceParent
    return svc


# For a protocol built without a core (a unit test's): still rate-limited.
_unattached = RefusalLog(time.monotonic)


def refuseHandshake(protocol, face, refusals, reason, code=400, responseHeaders=None,
                    why=None):
    """
    What autobahn's C{WebSocketServerProtocol.failHandshake} does (the HTTP
    error answer, then the connection dropped), counted and logged through
    C{refusals} (a L{RefusalLog}) rather than logged once per handshake.

    @param why: what the log says, when it says more than the C{reason}
        the client is sent.
    """
    if refusals is None:
        refusals = _unattached
    refusals.refused(face, str(code), protocol.transport,
                     "{face}: refused a WebSocket handshake from {peer}: {code} {why}",
                     code=code, why=why or reason)
    protocol.wasNotCleanReason = reason
    protocol.sendHttpErrorResponse(code, reason, responseHeaders)
    protocol.dropConnection(abort=False)
