# -*- test-case-name: tests.test_admin_api -*-
"""
The peer-groups face as the admin console sees it
(L{broker.admin.interfaces.IFaceView}): applications, their groups and
who is online, read from the L{broker.peergroups.core.PeerGroups} model
in memory (read-only: membership is the peers' business, signed by them).
"""

from twisted.internet.defer import fail
from zope.interface import implementer

from broker.admin.api import APIError, page
from broker.admin.interfaces import IFaceView


def _online(group):
    return len(group.online) + len(group.remote)


@implementer(IFaceView)
class PeerGroupsView:
    name = "peergroups"

    def __init__(self, peergroups):
        self.pg = peergroups

    def summary(self):
        apps = self.pg.apps
        groups = sum(len(a.groups) for a in apps.values())
        online = sum(_online(g) for a in apps.values() for g in a.groups.values())
        c = self.pg.counters
        return {"applications": len(apps), "groups": groups, "membersOnline": online,
                "sessions": len(self.pg.sessions), "loaded": self.pg.loaded,
                "requests": sum(c.answers.values()), "dataMessages": c.dataMessages,
                "dataBytes": c.dataBytes, "passwordFailures": c.passwordFailures}

    def counters(self):
        c = self.pg.counters
        return {"peergroups.requests": sum(c.answers.values()),
                "peergroups.dataMessages": c.dataMessages}

    def _app(self, name):
        app = self.pg.apps.get(name)
        if app is None:
            raise APIError(404, "NotFound", f"application {name!r} not found")
        return app

    def read(self, path, args):
        if path in ([], ["applications"]):
            return {"applications": [
                {"name": name, "groups": len(app.groups),
                 "membersOnline": sum(_online(g) for g in app.groups.values())}
                for name, app in sorted(self.pg.apps.items())]}
        if len(path) == 2 and path[0] == "applications":
            app = self._app(path[1])
            result = page(list(app.groups.values()), args,
                          lambda g, needle: needle in g.gpn.lower(),
                          lambda g: {"name": g.gpn, "members": len(g.members),
                                     "online": _online(g), "records": len(g.records)})
            result["application"] = app.name
            return result
        if len(path) == 4 and path[0] == "applications" and path[2] == "groups":
            app = self._app(path[1])
            group = app.groups.get(path[3])
            if group is None:
                raise APIError(404, "NotFound", f"group {path[3]!r} not found")
            members = sorted(group.members.values(), key=lambda m: (not self.pg.present(
                group, m.peerName), m.peerName))
            result = page(members, args,
                          lambda m, needle: needle in m.peerName.lower()
                          or needle in (m.friendlyName or "").lower(),
                          lambda m: self._member(group, m))
            result.update(application=app.name, group=group.gpn)
            return result
        raise APIError(404, "NotFound", f"no /api/peergroups/{'/'.join(path)}")

    def _member(self, group, member):
        node = group.online.get(member.peerName)
        present = node is not None or member.peerName in group.remote
        return {"peerName": member.peerName, "friendlyName": member.friendlyName,
                "online": present, "address": getattr(node, "address", "") or ""}

    def act(self, method, path, args):
        return fail(APIError(405, "MethodNotAllowed", "the peer groups are read-only here"))
