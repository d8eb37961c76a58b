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
        # Allocated on first grant: most connections hold no per-group
        # permission, and idle connections should cost little memory.
        self._all = None
        self._groups = None

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
            if self._all is None:
                self._all = set()
            self._all.add(permission)
        else:
            if self._groups is None:
                self._groups = {}
            self._groups.setdefault(permission, set()).add(group)

    def revoke(self, permission, group=None):
        """
        Revoke C{permission} for C{group}, or entirely when C{group} is
        C{None}.
        """
        self._check(permission)
        if self._all is not None and group is None:
            self._all.discard(permission)
        if self._groups is not None and permission in self._groups:
            if group is None:
                del self._groups[permission]
            else:
                self._groups[permission].discard(group)

    def has(self, permission, group=None):
        """
        Whether the permission holds for C{group} (or for every group, when
        C{group} is C{None}).
        """
        self._check(permission)
        if self._all is not None and permission in self._all:
            return True
        if group is None or self._groups is None:
            return False
        return group in self._groups.get(permission, ())

    def roles(self):
        """
        The role strings equivalent to this set, sorted.
        """
        out = [_PREFIX + p for p in sorted(self._all or ())]
        for p in PERMISSIONS:
            out.extend(f"{_PREFIX}{p}.{g}" for g in sorted((self._groups or {}).get(p, ())))
        return out

    @staticmethod
    def _check(permission):
        if permission not in PERMISSIONS:
            raise ValueError(f"unknown permission {permission!r}")
