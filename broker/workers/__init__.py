# -*- test-case-name: tests.test_workers -*-
"""
Several worker processes on one machine, sharing every listening socket
(C{cluster.workers} > 1).

One Python process uses one core.  With C{cluster.workers = N} the twistd
process becomes a I{supervisor}: it opens every configured listener once
(every face's stream endpoints, the UDP telemetry socket, the admin
listener), never accepts on them itself, and runs N worker processes
(C{python -m broker.worker}) that inherit those sockets and adopt them.
Each worker is a whole broker node (its own core, faces and cluster node,
named C{<node_id or host>-w<i>-<pid>}); the workers behave as one broker
through Redis, exactly as nodes on different machines do.

Sockets are inherited rather than opened by each worker with
C{SO_REUSEPORT} because:

  - a listener has one accept queue, which every worker takes from: a
    worker that dies or restarts loses none of the connections waiting in
    it (with C{SO_REUSEPORT} the kernel hashes each connection to one
    worker's own queue, and closing that socket resets what waits there),
    and a worker busy with a long fan-out simply accepts less;
  - C{tcp:0} is one port shared by all, with nothing to coordinate;
  - twistd opens the sockets before it sheds privileges (C{--uid}), so
    ports below 1024 keep working, and the supervisor reports a port it
    cannot open by its key and exits 1 before any worker starts, as a single
    broker does;
  - it works alike for every endpoint kind: TCP, TLS (the TLS layer runs in
    the workers, over the adopted socket), UNIX sockets, and UDP, where each
    datagram is read by one worker.

The price: the kernel does not balance accepts, so the spread of connections
over workers is whatever their wake-ups make of it (even enough under load,
uneven for a trickle of connections).

A worker's node id carries its process id, so a restarted worker is a new
node: the dead one's connections are reaped cluster-wide by the usual
dead-node path (C{cluster.dead_after}), never mistaken for the new one's.

The code, by role:

  - L{broker.workers.shared}: what both sides agree on (the settings
    check, the shared listeners, their keys);
  - L{broker.workers.supervisor}: L{Supervisor} and L{Holder} (sockets
    opened, never accepted on);
  - L{broker.workers.pool}: L{WorkerPool} (spawn, restart, signals, log
    relay) and L{WorkerProcess};
  - L{broker.workers.worker}: the worker side (L{Adopter},
    L{InheritedPorts}, L{buildWorker}, L{workerMain}).

The names below are re-exported for those who import them from here.
"""

from broker.net.datagram import DatagramEndpoint
from broker.workers.pool import WorkerPool, WorkerProcess, WorkerTraceback
from broker.workers.shared import (
    SharedListener, Unshareable, checkSettings, sharedListeners, workerAdminKey)
from broker.workers.supervisor import Holder, Supervisor, makeSupervisor
from broker.workers.worker import (
    Adopter, InheritedPorts, SupervisorWatch, WorkerCollector, _withTracebacks, buildWorker,
    workerMain)

__all__ = ["DatagramEndpoint", "WorkerPool", "WorkerProcess", "WorkerTraceback",
           "SharedListener", "Unshareable", "checkSettings", "sharedListeners",
           "workerAdminKey", "Holder", "Supervisor", "makeSupervisor", "Adopter",
           "InheritedPorts", "SupervisorWatch", "WorkerCollector", "_withTracebacks",
           "buildWorker", "workerMain"]
