# -*- test-case-name: tests.test_core -*-
"""
Roles and permissions, decided in the core so that every face enforces the
same rules.

A role string is the Web PubSub one: C{webpubsub.joinLeaveGroup},
C{webpubsub.sendToGroup}, or either with C{.<group>} for one group.  Roles
turn into a L{Permissions} set at admission; the server side may grant and
revoke later.
"""

JOIN_LEAVE_GROUP = "joinLeaveGroup"
SEND_TO_GROUP = "sendToGroup"
PERMISSIONS = (JOIN_LEAVE_GROUP, SEND_TO_GROUP)
_PREFIX = "webpubsub."


class Permissions:
    """
    What one connection may do: for each permission, either every group or
    a set of named groups.
    """

    __slots__ = ("_all", "_groups")

    def __init__(self):
        self._all = set()
        self._groups = {p: set() for p in PERMISSIONS}

    @classmethod
    def fromRoles(cls, roles):
        """
        Parse role strings; unknown roles are ignored (an upstream may use
        roles of its own).
        """
        perms = cls()
        for role in roles or ():
            if not isinstance(role, str) or not role.startswith(_PREFIX):
                continue
            rest = role[len(_PREFIX):]
            name, dot, group = rest.partition(".")
            if name not in PERMISSIONS:
                continue
            perms.grant(name, group if dot else None)
        return perms

    def grant(self, permission, group=None):
        self._check(permission)
        if group is None:
            self._all.add(permission)
        else:
            self._groups[permission].add(group)

    def revoke(self, permission, group=None):
        """
        Revoke C{permission} for C{group}, or entirely when C{group} is
        C{None}.
        """
        self._check(permission)
        if group is None:
            self._all.discard(permission)
            self._groups[permission].clear()
        else:
            self._groups[permission].discard(group)

    def has(self, permission, group=None):
        """
        Whether the permission holds for C{group} (or for every group, when
        C{group} is C{None}).
        """
        self._check(permission)
        if permission in self._all:
            return True
        return group is not None and group in self._groups[permission]

    def roles(self):
        """
        The role strings equivalent to this set, sorted.
        """
        out = [_PREFIX + p for p in sorted(self._all)]
        for p in PERMISSIONS:
            out.extend(f"{_PREFIX}{p}.{g}" for g in sorted(self._groups[p]))
        return out

    @staticmethod
    def _check(permission):
        if permission not in PERMISSIONS:
            raise ValueError(f"unknown permission {permission!r}")
