# -*- test-case-name: tests.test_directwrite -*-
"""
Writing deliveries straight to the socket.

Twisted's C{transport.write} buffers: the bytes go out on a later reactor
turn, after two C{epoll_ctl} calls register and unregister the socket for
writing.  Under load that is a gift (a subscriber's frames from many
publishes leave in one C{send()}), but at low load it is most of the cost of
a delivery and all of its latency.

So a connection writes its first frame of a reactor turn straight to the
socket when nothing of its own is waiting in Twisted's buffer.  Frames
written later in the same turn are kept and sent together at the end of the
turn (one C{send()} per connection, however many publishes the turn read),
and whatever the socket does not take goes to Twisted's buffer, whose
producer pause still starts the slow-consumer count of
L{broker.core.output.BoundedOutput}.  Bytes never overtake each other: once
anything is waiting, in our list or in Twisted's buffer, everything after it
waits too.

Only plain TCP transports (possibly under protocol wrappers) are written
directly; TLS and in-memory transports keep C{transport.write}.
"""

from twisted.internet.tcp import Connection
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol

log = Logger()

#: A connection's frames kept within one turn are sent early past this size.
FLUSH_AT = 64 * 1024


class WriteBatch:
    """
    The turns of the reactor, as the direct write path sees them: C{turn}
    counts them, and the connections with frames kept during this one are
    flushed when it ends, by a single C{callLater(0)} (which runs before the
    reactor next polls).  A connection that only sent directly is not
    listed: the turn number it noted tells it, next time, whether a new
    turn has begun.
    """

    def __init__(self, reactor):
        self._reactor = reactor
        self._conns = []
        self._call = None
        self.turn = 0

    def add(self, conn):
        """
        C{conn} has frames kept: flush them when this turn ends.
        """
        self._conns.append(conn)
        self.endOfTurn()

    def endOfTurn(self):
        """
        Make sure this turn ends with a flush (and a new turn number).
        """
        if self._call is None:
            self._call = self._reactor.callLater(0, self.flush)

    def flush(self):
        self._call = None
        self.turn += 1
        conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.flushOutput()
            except Exception:
                log.failure("flushing output of {conn!r} failed", conn=conn)

    def stop(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.flush()


def socketTransport(transport):
    """
    The TCP transport under C{transport} (walking down through protocol
    wrappers, which forward every attribute: only the class tells them
    apart), or C{None} when there is none to write to directly: TLS, a
    test's in-memory transport.
    """
    for _ in range(4):
        if transport is None or isinstance(transport, TLSMemoryBIOProtocol):
            return None
        if isinstance(transport, Connection):
            if transport.TLS or getattr(transport, "socket", None) is None:
                return None
            return transport
        if not isinstance(transport, ProtocolWrapper):
            return None
        transport = transport.transport
    return None


def sendNow(transport, sock, data):
    """
    Send C{data} on C{sock} at once if nothing waits ahead of it in Twisted's
    buffer, and give what the socket does not take (or everything, when
    something waits) to C{transport.write}.  After C{loseConnection} or a
    half-close the socket takes what it still can, or refuses it and
    Twisted's write drops it, as it would have.
    """
    if sock is not None and sock.connected and not sock._tempDataLen and not sock.dataBuffer:
        try:
            sent = sock.socket.send(data)
        except OSError:
            # EAGAIN, or a dead socket that Twisted's next write notices.
            sent = 0
        if sent == len(data):
            return
        if sent:
            data = data[sent:]
    transport.write(data)


_UNSET = object()


def noDelay(transport):
    """
    Turn Nagle's algorithm off on C{transport}'s socket, as the WebSocket
    faces' autobahn does: with it, the frames a turn kept for its end would
    wait behind the unacknowledged first one, up to the peer's delayed ACK
    (40 ms).  Transports without a socket option (in-memory ones) are left
    alone.
    """
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except (OSError, NotImplementedError, AttributeError):
            pass


class DirectOutput:
    """
    Mixin for a protocol that writes many small frames: C{writeDirect}
    instead of C{transport.write}.

    Subclasses give L{writeBatch}, and turn Nagle's algorithm off
    (L{noDelay}) on a TCP transport.  Any write that does not go through
    C{writeDirect} (a close frame, an answer written by a library) must call
    L{flushOutput} first, so that it does not overtake kept frames.

    @ivar _outTurn: the L{WriteBatch.turn} of the connection's last direct
        write: a frame in the same turn is kept.
    @ivar _outKept: the frames kept for the end of the turn, or C{None}.
    """

    _outTurn = -1
    _outBatch = None
    _outKept = None
    _outKeptBytes = 0
    _outSocket = _UNSET

    def writeBatch(self):
        """
        The core's L{WriteBatch}, or C{None} to write through the transport.
        """
        return None

    def writeDirect(self, data):
        """
        Write C{data}: at once if it is this connection's first frame of the
        reactor turn, else kept for the turn's end (on every delivery of
        every fan-out: nothing is allocated for the first frame, as a list
        per receiver alive until the end of the turn made the garbage
        collector run once per message).
        """
        batch = self._outBatch
        if batch is None:
            if self._outSocket is _UNSET:
                sock = self._outSocket = socketTransport(self.transport)
                batch = self._outBatch = self.writeBatch() if sock is not None else None
            if batch is None:
                self._outSocket = None
                self.transport.write(data)
                return
        turn = batch.turn
        if self._outTurn != turn:
            self._outTurn = turn
            if batch._call is None:     # batch.endOfTurn(), written out
                batch._call = batch._reactor.callLater(0, batch.flush)
            # sendNow, written out: this is every fan-out's per-receiver call.
            sock = self._outSocket
            if sock.connected and not sock._tempDataLen and not sock.dataBuffer:
                try:
                    sent = sock.socket.send(data)
                except OSError:
                    sent = 0
                if sent == len(data):
                    return
                if sent:
                    data = data[sent:]
            self.transport.write(data)
            return
        kept = self._outKept
        if kept is None:
            self._outKept = [data]
            self._outKeptBytes = len(data)
            batch.add(self)
            return
        kept.append(data)
        self._outKeptBytes += len(data)
        if self._outKeptBytes > FLUSH_AT:
            self.flushOutput()

    def flushOutput(self):
        """
        Send the frames kept this turn (called by the batch at the end of the
        turn, and before any other write).
        """
        kept = self._outKept
        if kept is None:
            return
        self._outKept = None
        transport = self.transport
        if transport is None:
            return
        data = kept[0] if len(kept) == 1 else b"".join(kept)
        sendNow(transport, self._outSocket, data)

    def discardOutput(self):
        """
        Forget the frames kept (the connection is being dropped).
        """
        self._outKept = None
