# -*- test-case-name: tests.test_drain -*-
"""
What a graceful stop needs from a face: the connections it has open, so
that it can tell each one it is closing and learn when the last has gone.
"""

from twisted.internet import defer


class LiveConnections:
    """
    The open connections of one face (protocols add themselves when their
    transport connects and discard themselves when it is lost).

    A set rather than a count, so a drain can reach connections that never
    became sessions (a handshake in progress, a device not yet
    authenticated).
    """

    def __init__(self):
        self._live = set()
        self._waiting = []

    def add(self, connection):
        self._live.add(connection)

    def discard(self, connection):
        self._live.discard(connection)
        if not self._live and self._waiting:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def __len__(self):
        return len(self._live)

    def __iter__(self):
        # A copy: closing a connection may discard it at once.
        return iter(list(self._live))

    def whenEmpty(self):
        """
        A Deferred firing once no connection is left (at once if none is).
        """
        if not self._live:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append(d)
        return d
