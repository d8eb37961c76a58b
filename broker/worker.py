# -*- test-case-name: tests.test_workers -*-
"""
C{python -m broker.worker w<i>}: one worker process of a broker run with
C{cluster.workers} > 1.  Only its supervisor (C{twistd broker}, see
L{broker.workers.supervisor}) starts it: the configuration and the listening sockets
come from there.
"""

import sys

if __name__ == "__main__":
    from broker.workers.worker import workerMain
    sys.exit(workerMain(sys.argv[1:]))
