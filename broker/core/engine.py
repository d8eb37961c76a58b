# -*- test-case-name: tests.test_engine -*-
"""
The in-memory engine: the zero-configuration default for a single node.

Every publish and server command still goes through it, so the core's code
path is the same as with a cluster engine; here the path is a direct call
back into the local core, and the directory is the local hubs themselves.
"""

from twisted.internet.defer import fail, succeed
from zope.interface import implementer

from broker.core.interfaces import IDirectory, IEngine


def _done():
    return succeed(None)


@implementer(IDirectory)
class LocalDirectory:
    """
    The directory of a node that is the whole cluster: the hubs' own maps
    answer every query; only user-level group memberships (which outlive
    the user's connections) are kept here.
    """

    def __init__(self):
        self._core = None
        self._userGroups = {}    # (hubName, userId) -> set(group)

    def _hub(self, hubName):
        return self._core.hubs.get(hubName) if self._core is not None else None

    # Mirror writes: the hubs already hold the truth.
    def added(self, hubName, connectionId, userId, roles):
        return _done()

    def removed(self, hubName, connectionId, userId):
        return _done()

    def joined(self, hubName, connectionId, group):
        return _done()

    def left(self, hubName, connectionId, group):
        return _done()

    def setRoles(self, hubName, connectionId, roles):
        return _done()

    def connection(self, hubName, connectionId):
        hub = self._hub(hubName)
        s = hub.localSession(connectionId) if hub is not None else None
        if s is None:
            return succeed(None)
        return succeed({"userId": s.userId, "roles": s.permissions.roles(), "node": None})

    def userExists(self, hubName, userId):
        hub = self._hub(hubName)
        return succeed(hub is not None and hub.userExists(userId))

    def groupExists(self, hubName, group):
        hub = self._hub(hubName)
        return succeed(hub is not None and hub.groupExists(group))

    def groupMembers(self, hubName, group):
        hub = self._hub(hubName)
        if hub is None:
            return succeed([])
        return succeed([(s.connectionId, s.userId) for s in hub.groupConnections(group)])

    def userGroups(self, hubName, userId):
        return succeed(set(self._userGroups.get((hubName, userId), ())))

    def setUserGroup(self, hubName, userId, group, member):
        key = (hubName, userId)
        if member:
            self._userGroups.setdefault(key, set()).add(group)
        elif group is None:
            self._userGroups.pop(key, None)
        else:
            groups = self._userGroups.get(key)
            if groups is not None:
                groups.discard(group)
                if not groups:
                    del self._userGroups[key]
        return _done()


@implementer(IEngine)
class MemoryEngine:
    def __init__(self):
        self._core = None
        self.directory = LocalDirectory()

    def attach(self, core):
        self._core = core
        self.directory._core = core

    def publish(self, hubName, target, delivery):
        if self._core is None:
            return fail(RuntimeError("engine not attached to a core"))
        self._core.deliverLocal(hubName, target, delivery)
        return _done()

    def command(self, hubName, command, node=None):
        if self._core is None:
            return fail(RuntimeError("engine not attached to a core"))
        self._core.applyCommand(hubName, command)
        return _done()

    def healthy(self):
        return self._core is not None

    def stats(self):
        return {}
