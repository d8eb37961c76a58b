# -*- test-case-name: tests.test_tap -*-
"""
The service that listens on one configured endpoint: used by a single
broker's service tree (L{broker.service}) and by the supervisor of worker
processes (L{broker.workers.supervisor}) alike, so both report a listener
that cannot open by its key, and exit the same way.
"""

import os

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import CancelledError
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from broker.logs import peerAddress

# The namespace of the former broker/tap.py, which operators filter logs by.
log = Logger(namespace="broker.tap")


class ListenerService(StreamServerEndpointService):
    """
    Listens on one configured endpoint, and is named after its configuration
    key (C{webpubsub.listen[0]}) so that logs and failures say which one.

    A broker running without one of its configured listeners is worse than
    one that does not run: clients and health checks would find half a
    service.  So a failure to listen is logged as one line naming the key
    and the process exits with status 1.  Left to itself, twistd would print
    a traceback for an endpoint that fails while starting, and merely log
    one that fails later (an endpoint that listens asynchronously) and run on.

    @ivar foreground: how a failure while starting leaves.  In the
        foreground (C{twistd -n}) by L{SystemExit}: the logged line is all
        the operator sees.  A daemonizing twistd must get an exception
        instead: it reports that to its waiting parent process, which
        would otherwise wait for ever.
    """

    # How the process leaves after a late failure; a test replaces it.
    _exit = staticmethod(os._exit)

    def __init__(self, key, description, endpoint, factory, reactor, foreground=True):
        super().__init__(endpoint, factory)
        self.key = key
        self.description = description
        self.setName(key)
        self.foreground = foreground
        self._reactor = reactor
        self._starting = False
        self.failure = None

    def privilegedStartService(self):
        service.Service.privilegedStartService(self)
        self._starting = True
        self._waitingForPort = self.endpoint.listen(self.factory)
        self._waitingForPort.addCallbacks(self._listening, self._cannotListen)
        self._starting = False
        if self.failure is not None:
            # twistd is still starting: leaving here stops it before the
            # reactor runs.
            if self.foreground:
                raise SystemExit(1)
            raise ListenError(self.failure)

    def _listening(self, port):
        log.info("{key} listening on {address}", key=self.key, address=_address(port.getHost()))
        return port

    def _cannotListen(self, failure):
        if failure.check(CancelledError):
            # stopService() before the endpoint was listening.
            return None
        reason = " ".join(str(failure.value).split())
        self.failure = f"{self.key}: cannot listen on {self.description!r}: {reason}"
        log.critical("{problem}", problem=self.failure)
        if not self._starting:
            self._abort()
        return None

    def _abort(self):
        """
        Stop the running broker after a late listening failure, then exit
        with status 1: twistd offers no exit status of its own to set.
        """
        self._reactor.addSystemEventTrigger("after", "shutdown", self._exit, 1)
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass


class ListenError(Exception):
    """
    A configured listener could not be opened; C{str(error)} names its key.
    """


# The broker's one address format (broker/logs.py).
_address = peerAddress
