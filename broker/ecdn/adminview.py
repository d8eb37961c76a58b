# -*- test-case-name: tests.test_admin_api -*-
"""
The eCDN face as the admin console sees it
(L{broker.admin.interfaces.IFaceView}): answers by endpoint and result
class (allowed, blocked, unmatched, redirect, ok, error), the rules and
keys in force.
"""

from twisted.internet.defer import fail
from zope.interface import implementer

from broker.admin.api import APIError
from broker.admin.interfaces import IFaceView


@implementer(IFaceView)
class EcdnView:
    name = "ecdn"

    def __init__(self, resource):
        self.resource = resource

    def _results(self):
        byResult = {}
        for (_, result), n in self.resource.metrics.counts.items():
            byResult[result] = byResult.get(result, 0) + n
        return byResult

    def summary(self):
        counts = self.resource.metrics.counts
        state = self.resource.state
        return {"requests": sum(counts.values()), "results": self._results(),
                "byEndpoint": {f"{e} {r}": n for (e, r), n in sorted(counts.items())},
                "policy": state.policy.kind, "rules": len(state.policy.rules)}

    def counters(self):
        return {f"ecdn.{result}": n for result, n in self._results().items()}

    def read(self, path, args):
        if path == []:
            return self.summary()
        raise APIError(404, "NotFound", f"no /api/ecdn/{'/'.join(path)}")

    def act(self, method, path, args):
        return fail(APIError(405, "MethodNotAllowed", "the eCDN face has no admin action"))
