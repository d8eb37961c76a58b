# -*- test-case-name: tests.test_workers -*-
"""
The supervisor of C{cluster.workers} > 1: it opens every listener once
(L{Holder}: the socket opened, never accepted on) and runs the
L{broker.workers.pool.WorkerPool}, whose workers adopt those sockets.
"""

import os

from twisted.application import service
from twisted.internet import protocol
from twisted.internet.endpoints import serverFromString

from broker.listening import ListenerService
from broker.workers.pool import WorkerPool
from broker.workers.shared import Unshareable, checkSettings, sharedListeners, workerAdminKey


class _Shared(protocol.Factory):
    """
    The factory of a supervisor's socket: it never accepts, the workers do.
    """

    noisy = False

    def logPrefix(self):
        # Twisted logs "<prefix> starting on <port>".
        return "Shared with the workers:"

    def buildProtocol(self, addr):
        return None


class _UnreadDatagrams(protocol.DatagramProtocol):
    """
    The protocol of the supervisor's UDP socket, which it never reads.
    """

    noisy = False


class Holder:
    """
    What an endpoint listens with in the supervisor: it opens the socket
    with the real reactor, stops reading it at once (the supervisor never
    accepts or reads) and keeps it in L{port} for the workers.

    @param worker: for a per-worker listener (C{admin.worker_listen}), the
        worker's index: its TCP port is the configured one plus the index
        (0 stays 0: an ephemeral port each) and its UNIX path gets
        C{-w<index>}.
    """

    def __init__(self, reactor, worker=None):
        self._reactor = reactor
        self._worker = worker
        self.port = None

    def _hold(self, port):
        port.stopReading()
        self.port = port
        return port

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if self._worker and port:
            port += self._worker
        return self._hold(self._reactor.listenTCP(port, _Shared(), backlog, interface))

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        # TLS runs in the workers, over the socket they adopt.
        return self.listenTCP(port, factory, backlog, interface)

    def listenUNIX(self, address, factory, backlog=50, mode=0o666, wantPID=0):
        if self._worker is not None:
            address = f"{os.fsdecode(address)}-w{self._worker}"
        return self._hold(self._reactor.listenUNIX(address, _Shared(), backlog, mode, wantPID))

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        return self._hold(self._reactor.listenUDP(port, _UnreadDatagrams(), interface,
                                                  maxPacketSize))

    def adoptStreamPort(self, fileDescriptor, addressFamily, factory):
        # systemd: and other already-open sockets: hand them on as they are.
        return self._hold(self._reactor.adoptStreamPort(fileDescriptor, addressFamily, _Shared()))

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise Unshareable(f"this kind of endpoint cannot be shared by workers "
                           f"(it needs reactor.{name})")

    def spec(self, key, childFD):
        """
        How the worker finds the socket: its key, its descriptor there and
        its address family.
        """
        return {"key": key, "fd": childFD, "family": int(self.port.socket.family)}


def makeSupervisor(settings, reactor, foreground=True, **options):
    """
    The service twistd runs for C{cluster.workers} > 1.

    @raise ConfigError: see L{checkSettings}.
    """
    checkSettings(settings)
    return Supervisor(settings, reactor, foreground, **options)


class Supervisor(service.MultiService):
    """
    The shared listeners (one L{broker.listening.ListenerService} each, named by
    key: they log C{<key> listening on <address>} and, when one cannot be
    opened, one critical line and exit 1, as in a single broker), then the
    L{WorkerPool}.

    @ivar pool: the L{WorkerPool}.
    """

    def __init__(self, settings, reactor, foreground=True, **options):
        super().__init__()
        count = settings["cluster"]["workers"]
        self.pool = WorkerPool(reactor, settings, count, **options)
        for listener in sharedListeners(settings):
            holder = Holder(reactor)
            ListenerService(listener.key, listener.description, listener.endpoint(holder),
                            _Shared(), reactor, foreground).setServiceParent(self)
            self.pool.shared.append((listener.key, holder))
        for index in range(count):
            for j, description in enumerate(settings["admin"]["worker_listen"]):
                holder = Holder(reactor, worker=index)
                key = workerAdminKey(j, index)
                ListenerService(key, description, serverFromString(holder, description),
                                _Shared(), reactor, foreground).setServiceParent(self)
                self.pool.own[index].append((key, holder))
        self.pool.setServiceParent(self)
