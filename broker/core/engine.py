# -*- test-case-name: tests.test_engine -*-
"""
The in-memory engine: the zero-configuration default for a single node.

Every publish still goes through it, so the core's code path is the same as
with a cluster engine; here the path is a direct call back into the local
core.
"""

from twisted.internet.defer import fail, succeed
from zope.interface import implementer

from broker.core.interfaces import IEngine


@implementer(IEngine)
class MemoryEngine:
    def __init__(self):
        self._deliverLocal = None

    def attach(self, deliverLocal):
        self._deliverLocal = deliverLocal

    def publish(self, hubName, target, delivery):
        if self._deliverLocal is None:
            return fail(RuntimeError("engine not attached to a core"))
        self._deliverLocal(hubName, target, delivery)
        return succeed(None)

    def healthy(self):
        return self._deliverLocal is not None
