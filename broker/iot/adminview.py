# -*- test-case-name: tests.test_admin_api -*-
"""
The IoT face as the admin console sees it (L{broker.admin.interfaces.IFaceView}):
fleets, devices online, queue depths and last values, and the purge of a
device's queue, through the concentrator's own operations (the same the
centrals' HTTP API uses: C{devices}, C{deviceStatus}, C{feedback.purge}).
"""

import json

from twisted.internet.defer import fail
from zope.interface import implementer

from broker.admin.api import APIError, page
from broker.admin.interfaces import IFaceView
from broker.iot import errors
from broker.iot.jsonpayload import toJSON

# Payloads shown in a listing are cut to this many characters of JSON.
PREVIEW = 200


def _apiError(failure):
    failure.trap(errors.IoTError)
    e = failure.value
    status = 404 if isinstance(e, errors.UnknownDevice) else 400
    raise APIError(status, e.code, str(e))


@implementer(IFaceView)
class IoTView:
    name = "iot"

    def __init__(self, concentrator, factory, udp=None):
        self.c = concentrator
        self.factory = factory
        self.udp = udp

    def summary(self):
        devices, centrals = self.c.onlineCount()
        out = {"fleets": len(self.c.registry.fleets()), "devicesOnline": devices,
               "centralsOnline": centrals, "authOk": self.factory.counters.authOk,
               "authFailures": sum(self.factory.counters.authFailures.values())}
        out.update(self.c.stats)
        if self.udp is not None:
            out["udp"] = dict(self.udp.counts)
        return out

    def counters(self):
        s = self.c.stats
        out = {"iot.telemetry": s["telemetryAccepted"],
               "iot.messagesQueued": s["messagesQueued"] + s["messagesDirect"],
               "iot.messagesAcked": s["messagesAcked"]}
        if self.udp is not None:
            out["iot.udpDatagrams"] = sum(self.udp.counts.values())
        return out

    def _lastValue(self, fleet, deviceId):
        cached = self.c.lastValues.cached(fleet, deviceId)
        if cached is None:
            return None
        payload, received, via = cached
        text = _preview(toJSON(payload))
        return {"payload": text, "received": received, "via": via}

    def fleets(self):
        out = []
        for fleet in self.c.registry.fleets():
            ids = self.c.registry.fleetDevices(fleet)
            online = sum(1 for i in ids if self.c.isOnline(fleet, i))
            out.append({"name": fleet, "devices": len(ids), "devicesOnline": online})
        return {"fleets": out}

    def read(self, path, args):
        if path in ([], ["fleets"]):
            return self.fleets()
        if len(path) == 2 and path[0] == "fleets":
            fleet = path[1]
            if fleet not in self.c.registry.fleets():
                raise APIError(404, "NotFound", f"fleet {fleet!r} not found")

            def listed(devices):
                result = page(devices, args, lambda d, needle: needle in d["id"].lower(),
                              lambda d: dict(d, lastValue=self._lastValue(fleet, d["id"])))
                result["fleet"] = fleet
                return result
            return self.c.devices(fleet).addCallbacks(listed, _apiError)
        if len(path) == 4 and path[0] == "fleets" and path[2] == "devices":
            fleet, deviceId = path[1], path[3]

            def status(info):
                info["lastValue"] = self._lastValue(fleet, deviceId)
                return info
            return self.c.deviceStatus(fleet, deviceId).addCallbacks(status, _apiError)
        raise APIError(404, "NotFound", f"no /api/iot/{'/'.join(path)}")

    def act(self, method, path, args):
        if (method == "DELETE" and len(path) == 5 and path[0] == "fleets"
                and path[2] == "devices" and path[4] == "queue"):
            fleet, deviceId = path[1], path[3]
            d = self.c.feedback.purge(fleet, deviceId)
            return d.addCallbacks(lambda ids: {"id": deviceId, "purged": ids}, _apiError)
        return fail(APIError(404, "NotFound", f"no {method} /api/iot/{'/'.join(path)}"))


def _preview(obj):
    text = json.dumps(obj, separators=(",", ":"))
    return text if len(text) <= PREVIEW else text[:PREVIEW] + "…"
