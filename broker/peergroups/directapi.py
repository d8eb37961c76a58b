# -*- test-case-name: tests.test_peergroups -*-
"""
The direct connections and events of a peer's session: open, close and
send data over a connection relayed by the broker, and event
registrations.
"""

from broker.peergroups import constants as C
from broker.peergroups import credentials as cred
from broker.peergroups.errors import PeerError
from broker.peergroups.model import Direct
from broker.peergroups.params import Reply, connectionIdParam, guidParam, param

MAX_REGISTRATIONS = 1024

class DirectAPI:
    """
    Mixed into L{broker.peergroups.session.PeerSession}, whose helpers
    (C{_ready}, C{_handle}, C{_node}) it uses.
    """

    # -- direct connections -------------------------------------------------------

    def api_openDirectConnection(self, params):
        handle, node = self._ready(params)
        peer = param(params, "identity", str)
        if peer == node.peerName:
            raise PeerError("PEER_E_CONNECT_SELF", "a direct connection to oneself")
        group = node.group
        cid = self.pg.newConnectionId()
        target = self.pg.present(group, peer)

        def establish():
            if not node.online:
                return
            if target is not None and target.remote:
                # On another node: that node checks and answers (pg.direct).
                self.pg.link.openRemote(node, target, cid)
                return
            reason = "PEER_E_CONNECTION_FAILED" if target is None else target.refusesDirect()
            if reason is not None:
                self.pg.emit(node, C.EVENT_DIRECT_CONNECTION, {"connectionChangeData": {
                    "status": C.PEER_CONNECTION_FAILED, "connectionId": str(cid),
                    "nodeId": "0", "identity": peer, "nextConnectionId": "0",
                    "hrConnectionFailedReason": PeerError(reason).hr}})
                return
            direct = Direct(cid, node, target)
            self.pg.directs[cid] = direct
            node.directs[cid] = direct
            target.directs[cid] = direct
            for a, b in ((node, target), (target, node)):
                self.pg.emit(a, C.EVENT_DIRECT_CONNECTION, {"connectionChangeData": {
                    "status": C.PEER_CONNECTED, "connectionId": str(cid),
                    "nodeId": str(b.nodeId), "identity": b.peerName}})
        return Reply({"connectionId": str(cid)}, after=establish)

    def _direct(self, node, params):
        direct = node.directs.get(connectionIdParam(params))
        if direct is None:
            raise PeerError("PEER_E_CONNECTION_NOT_FOUND", "no such connection")
        return direct

    def _opening(self, node, params):
        """
        The id of a connection C{node} opened towards a peer on another
        node that has not answered yet (usable already, as on one node),
        else C{None}.
        """
        cid = connectionIdParam(params)
        link = self.pg.link
        if cid not in node.directs and link is not None and link.opening(node, cid):
            return cid
        return None

    def api_closeDirectConnection(self, params):
        handle, node = self._ready(params)
        opening = self._opening(node, params)
        if opening is not None:
            return Reply({}, after=lambda: self.pg.link.closePending(node, opening))
        direct = self._direct(node, params)
        return Reply({}, after=lambda: self.pg.closeDirect(direct))

    def api_sendData(self, params):
        handle, node = self._ready(params)
        opening = self._opening(node, params)
        direct = self._direct(node, params) if opening is None else None
        dtype = guidParam(params, "type")
        if dtype == C.RESERVED_DATA_TYPE:
            raise PeerError("E_INVALIDARG", "reserved data type")
        data = param(params, "data", str, required=False, default="")
        try:
            size = len(cred.unb64(data, "data"))
        except ValueError as e:
            raise PeerError("E_INVALIDARG", str(e))
        if size > self.pg.maxDataSize:
            raise PeerError("E_INVALIDARG", f"at most {self.pg.maxDataSize} bytes per send")
        self.pg.counters.dataMessages += 1
        self.pg.counters.dataBytes += size
        if opening is not None:
            self.pg.link.sendPending(node, opening, dtype, data)
            return {}
        other = direct.other(node)
        if other.remote:
            self.pg.link.sendData(other, direct, dtype, data)
            return {}
        self.pg.emit(other, C.EVENT_INCOMING_DATA, {"incomingData": {
            "connectionId": str(direct.id), "type": dtype, "data": data}}, dtype)
        return {}

    def api_enumConnections(self, params):
        handle, node = self._ready(params)
        flags = param(params, "flags", int, required=False,
                       default=C.CONNECTION_DIRECT | C.CONNECTION_NEIGHBOR)
        out = []
        if flags & C.CONNECTION_DIRECT:
            for cid, direct in sorted(node.directs.items()):
                other = direct.other(node)
                out.append({"flags": C.CONNECTION_DIRECT, "connectionId": str(cid),
                            "nodeId": str(other.nodeId), "peerId": other.peerName,
                            "address": other.address})
        return {"connections": out}

    # -- events -------------------------------------------------------------------

    def api_registerEvent(self, params):
        handle = self._handle(params)
        entries = param(params, "registrations", list)
        if not entries or len(entries) > 32:
            raise PeerError("E_INVALIDARG", "1 to 32 registrations")
        if len(self.registrations) >= MAX_REGISTRATIONS:
            raise PeerError("E_OUTOFMEMORY", f"at most {MAX_REGISTRATIONS} registrations")
        parsed = []
        for e in entries:
            if not isinstance(e, dict) or e.get("eventType") not in C.EVENT_TYPES:
                raise PeerError("E_INVALIDARG", f"unknown event type in {e!r}")
            parsed.append((e["eventType"], guidParam(e, "type", required=False)))
        regId = self._nextRegistration
        self._nextRegistration += 1
        handle.registrations[regId] = parsed
        self.registrations[regId] = handle
        return {"registration": regId}

    def api_unregisterEvent(self, params):
        regId = params.get("registration")
        handle = self.registrations.pop(regId, None) if isinstance(regId, int) else None
        if handle is None:
            raise PeerError("E_INVALIDARG", "no such registration")
        handle.registrations.pop(regId, None)
        return {}
