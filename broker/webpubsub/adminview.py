# -*- test-case-name: tests.test_admin_api -*-
"""
The Web PubSub face as the admin console sees it
(L{broker.admin.interfaces.IFaceView}): its hubs' totals and its REST API's
requests.  Its hubs, connections, groups and users are the core's, served
by the admin API itself under C{/api/hubs}.
"""

from twisted.internet.defer import fail
from zope.interface import implementer

from broker.admin.api import APIError
from broker.admin.interfaces import IFaceView

FACE = "webpubsub"


@implementer(IFaceView)
class WebPubSubView:
    name = FACE

    def __init__(self, core, rest):
        self.core = core
        self.rest = rest

    def summary(self):
        out = {"hubs": 0, "connections": 0, "users": 0, "groups": 0}
        for hub in self.core.hubs.values():
            if hub.face == FACE:
                out["hubs"] += 1
                out["connections"] += hub.connectionCount
                out["users"] += hub.userCount
                out["groups"] += hub.groupCount
        counts = self.rest.requestCounts
        out["restRequests"] = sum(counts.values())
        out["restErrors"] = sum(n for (_, code), n in counts.items() if code >= 400)
        return out

    def counters(self):
        return {"webpubsub.restRequests": sum(self.rest.requestCounts.values())}

    def read(self, path, args):
        if path == []:
            return self.summary()
        raise APIError(404, "NotFound", "Web PubSub hubs are under /api/hubs")

    def act(self, method, path, args):
        return fail(APIError(404, "NotFound", "Web PubSub hubs are under /api/hubs"))
