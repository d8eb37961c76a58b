# -*- test-case-name: tests.test_peergroups -*-
"""
A small Twisted client for the C{peergroup.v1} protocol, over WebSocket or
length-prefixed TCP/TLS.

The peer's keys never leave it: this library signs the identity challenge,
the group root and creator certificates, invitations and credentials
locally and sends the broker only public keys and signatures.  Calls
return Deferreds firing with the result dict, or failing with
L{PeerError} named as in the Windows API.  Events are queued per
registration: L{PeerGroupClient.getEventData} drains them as
C{PeerGroupGetEventData} does, L{PeerGroupClient.nextEvent} waits for one.

    client = yield connectWebSocket(reactor, "ws://127.0.0.1:8084/peergroups/v1")
    yield client.startup("chat")
    yield client.registerIdentity(Identity.generate("alice"))
    h = yield client.create(friendlyName="Team")
    yield client.connect(h)
"""

import json
import time
from urllib.parse import urlparse

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.protocols.basic import Int32StringReceiver

from broker.files import writePrivate
from broker.peergroups import constants as C
from broker.peergroups import credentials as cred
from broker.peergroups.credentials import Certificate, Identity
from broker.peergroups.errors import HRESULTS, PeerError

__all__ = ["PeerGroupClient", "connectWebSocket", "connectStream", "Identity", "PeerError"]


def nowFiletime():
    ft = C.filetimeFromUnix(time.time())
    return ft - ft % 10000


class PeerGroupClient:
    """
    One session with the broker.

    @ivar hello: the broker's greeting (challenge, highest version, time).
    @ivar identity: the registered L{Identity}.
    """

    def __init__(self, sendObject, abort, clock=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
        self._pacer = None
        self._sendObject = sendObject
        self._abort = abort
        self._nextId = 1
        self._pending = {}
        self._queues = {}
        self._waiters = {}
        self._pings = {}
        self.hello = None
        # The connection's transport (for flow control: pauseProducing).
        self.transport = None
        self.helloReceived = defer.Deferred()
        self.closed = defer.Deferred()
        self.identity = None
        self.application = None
        self.issuerKey = None
        self._handles = {}
        self.groupKeys = {}
        self.allEvents = []

    # -- wire -----------------------------------------------------------------

    def received(self, obj):
        if not isinstance(obj, dict):
            return
        if "hello" in obj:
            self.hello = obj["hello"]
            if not self.helloReceived.called:
                self.helloReceived.callback(self.hello)
        elif "event" in obj:
            self._event(obj["event"])
        elif "ping" in obj:
            self._sendObject({"pong": obj["ping"]})
        elif "pong" in obj:
            d = self._pings.pop(obj["pong"], None)
            if d is not None:
                d.callback(None)
        elif "id" in obj:
            d = self._pending.pop(obj["id"], None)
            if d is None:
                return
            if "error" in obj:
                d.errback(PeerError.fromJSON(obj["error"]))
            else:
                d.callback((obj.get("hr", 0), obj.get("result", {})))

    def lost(self, reason):
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(PeerError("PEER_E_CONNECTION_FAILED", f"connection lost: {reason}"))
        for waiters in self._waiters.values():
            for d, _ in waiters:
                d.errback(PeerError("PEER_E_CONNECTION_FAILED", f"connection lost: {reason}"))
        self._waiters = {}
        if not self.closed.called:
            self.closed.callback(reason)

    def disconnect(self):
        """
        Drop the connection (as a crash would: the broker sees it vanish).
        """
        self._abort()
        return self.closed

    def callHR(self, method, **params):
        """
        @return: a Deferred firing with C{(hr, result)}.
        """
        rid = self._nextId
        self._nextId += 1
        d = self._pending[rid] = defer.Deferred()
        self._sendObject({"id": rid, "method": method, "params": params})
        return d

    def call(self, method, **params):
        return self.callHR(method, **params).addCallback(lambda r: r[1])

    def sync(self):
        """
        A round trip: once it fires, everything the broker wrote to this
        session before it (events included) has been received.
        """
        token = self._nextId
        self._nextId += 1
        d = self._pings[token] = defer.Deferred()
        self._sendObject({"ping": token})
        return d

    # -- events -----------------------------------------------------------

    def _event(self, event):
        self.allEvents.append(event)
        handle = self._handles.get(event.get("handle"))
        challenge = event.get("passwordChallenge")
        if handle is not None and challenge:
            handle["challenge"] = challenge
        reg = event.get("registration")
        for i, (d, match) in enumerate(self._waiters.get(reg, [])):
            if match(event):
                del self._waiters[reg][i]
                d.callback(event)
                return
        self._queues.setdefault(reg, []).append(event)

    def getEventData(self, registration):
        """
        C{PeerGroupGetEventData}: the oldest queued event of the
        registration as C{(S_OK, event)}, or C{(PEER_S_NO_EVENT_DATA, None)}.
        """
        queue = self._queues.get(registration)
        if queue:
            return HRESULTS["S_OK"], queue.pop(0)
        return HRESULTS["PEER_S_NO_EVENT_DATA"], None

    def queued(self, registration):
        return list(self._queues.get(registration, ()))

    def nextEvent(self, registration, eventType=None, **fields):
        """
        The next event of C{registration} of C{eventType} whose payload
        contains C{fields} (nested dicts matched one level down), queued or
        to come.
        """
        def match(event):
            if eventType is not None and event["eventType"] != eventType:
                return False
            for k, v in fields.items():
                found = event.get(k, _MISSING)
                if found is _MISSING:
                    found = next((sub[k] for sub in event.values()
                                  if isinstance(sub, dict) and k in sub), _MISSING)
                if found != v:
                    return False
            return True

        queue = self._queues.get(registration, [])
        for i, event in enumerate(queue):
            if match(event):
                del queue[i]
                return defer.succeed(event)
        d = defer.Deferred()
        self._waiters.setdefault(registration, []).append((d, match))
        return d

    # -- start-up and identity ---------------------------------------------------

    @defer.inlineCallbacks
    def startup(self, application="default", version=C.HIGHEST_VERSION):
        yield self.helloReceived
        result = yield self.call("startup", application=application, version=version)
        self.application = application
        if result.get("issuerKey"):
            self.issuerKey = cred.unb64(result["issuerKey"])
        return result

    @defer.inlineCallbacks
    def registerIdentity(self, identity):
        """
        Prove to the broker that this peer holds C{identity}'s key by
        signing its one-time challenge.
        """
        challenge = cred.unb64(self.hello["challenge"])
        signature = identity.sign(cred.authMessage(challenge, self.application,
                                                   identity.publicKey))
        result = yield self.call("registerIdentity", identityInfo=identity.identityInfo(),
                                 signature=cred.b64(signature))
        self.hello["challenge"] = result.get("challenge", self.hello["challenge"])
        self.identity = identity
        return result["peerName"]

    # -- groups ---------------------------------------------------------------

    @defer.inlineCallbacks
    def create(self, friendlyName="", classifier="group", password=None,
               passwordRole=C.ROLE_MEMBER, **properties):
        """
        C{PeerGroupCreate}: a new group key (kept here, in L{groupKeys}), its
        root certificate and the creator's infinite administrator GMC.

        @return: the (offline) group handle.
        """
        groupKey = Ed25519PrivateKey.generate()
        groupPub = groupKey.public_key().public_bytes(serialization.Encoding.Raw,
                                                      serialization.PublicFormat.Raw)
        gpn = cred.peerName(groupPub, classifier)
        notBefore = nowFiletime() - 3600 * C.TICKS
        notAfter = notBefore + C.INFINITE_TICKS
        grc = Certificate.make(groupKey, "GRC", gpn, groupPub, gpn, [C.ROLE_ADMIN],
                               notBefore, notAfter, friendlyName=friendlyName)
        me = self.identity
        gmc = Certificate.make(groupKey, "GMC", gpn, me.publicKey, me.peerName, [C.ROLE_ADMIN],
                               notBefore, notAfter, friendlyName=me.friendlyName)
        props = dict(properties, friendlyName=friendlyName, classifier=classifier)
        params = {"chain": cred.chainToJSON([grc, gmc])}
        if password is not None:
            props["authenticationSchemes"] = props.get(
                "authenticationSchemes", C.GMC_AUTHENTICATION | C.PASSWORD_AUTHENTICATION)
            props["passwordVerifier"] = cred.makeVerifier(password)
            props["groupPasswordRole"] = passwordRole
            issuerRole = C.ROLE_ADMIN if passwordRole == C.ROLE_ADMIN else C.ROLE_INVITING_MEMBER
            issuer = Certificate.make(me, "GMC", gpn, self.issuerKey,
                                      cred.peerName(self.issuerKey, "broker"), [issuerRole],
                                      notBefore, notAfter, friendlyName="broker")
            params["issuer"] = cred.chainToJSON([grc, gmc, issuer])
        result = yield self.call("create", properties=props, **params)
        self.groupKeys[result["groupPeerName"]] = groupKey
        self._handles[result["handle"]] = {"gpn": result["groupPeerName"]}
        return result["handle"]

    @defer.inlineCallbacks
    def join(self, invitation):
        result = yield self.call("join", invitation=invitation)
        self._handles[result["handle"]] = {"gpn": result["groupPeerName"]}
        return result["handle"]

    @defer.inlineCallbacks
    def passwordJoin(self, invitation, password):
        """
        C{PeerGroupPasswordJoin}: the password stays here; C{connect} sends
        only a proof bound to the broker's challenge.

        @return: C{(hr, handle)}; C{hr} is C{PEER_S_ALREADY_A_MEMBER} for a
            second join.
        """
        hr, result = yield self.callHR("passwordJoin", invitation=invitation)
        info = {"gpn": result["groupPeerName"]}
        if "passwordChallenge" in result:
            info.update(password=password, salt=cred.unb64(result["salt"]),
                        iterations=result["iterations"], challenge=result["passwordChallenge"])
        self._handles[result["handle"]] = info
        return hr, result["handle"]

    @defer.inlineCallbacks
    def open(self, groupPeerName):
        result = yield self.call("open", groupPeerName=groupPeerName)
        self._handles[result["handle"]] = {"gpn": groupPeerName}
        return result["handle"]

    def connect(self, handle):
        """
        C{PeerGroupConnect}: asynchronous, as in Windows: success or
        failure arrives as C{STATUS_CHANGED} or C{CONNECTION_FAILED}.

        @return: a Deferred firing with C{(hr, result)}.
        """
        info = self._handles.get(handle, {})
        params = {}
        if "password" in info and self.identity is not None:
            message = cred.passwordAuthMessage(cred.unb64(info["challenge"]), info["gpn"],
                                               self.identity.peerName)
            params["passwordProof"] = cred.b64(cred.passwordProof(
                info["password"], info["salt"], info["iterations"], message))
        return self.callHR("connect", handle=handle, **params)

    def close(self, handle):
        return self.call("close", handle=handle)

    def delete(self, groupPeerName):
        return self.call("delete", groupPeerName=groupPeerName)

    def groupPeerName(self, handle):
        return self._handles[handle]["gpn"]

    @defer.inlineCallbacks
    def enumGroups(self):
        """
        C{PeerEnumGroups}: the groups the registered identity may open, as
        C{{groupPeerName, friendlyName, classifier, creatorPeerName, roles,
        validityEnd, pendingRoles, status}}.
        """
        groups = yield self._paged("enumGroups", "groups")
        return groups

    # -- invitations and credentials ----------------------------------------

    @defer.inlineCallbacks
    def _signFor(self, handle, identityInfo, roles, expiration, validityStart):
        creds = yield self.call("getCredentials", handle=handle)
        chain = cred.chainFromJSON(creds["chain"])
        mine = chain[-1]
        info, current = _subject(identityInfo)
        notBefore = validityStart if validityStart is not None else max(
            mine.notBefore, nowFiletime() - 60 * C.TICKS, current + 10000)
        notAfter = expiration if expiration is not None else mine.notAfter
        classifiers = ["participant"] if list(roles) == [C.ROLE_MEMBER] else []
        cert = Certificate.make(self.identity, "GMC", chain[0].group, info["publicKey"],
                                info["peerName"], list(roles), notBefore, notAfter,
                                friendlyName=info["friendlyName"], classifiers=classifiers)
        return cert

    @defer.inlineCallbacks
    def createInvitation(self, handle, identityInfo, expiration=None, roles=(C.ROLE_MEMBER,),
                         validityStart=None):
        """
        C{PeerGroupCreateInvitation}: a GMC for the invitee's key signed
        here; C{expiration=None} is this member's remaining lifetime.
        """
        cert = yield self._signFor(handle, identityInfo, roles, expiration, validityStart)
        result = yield self.call("createInvitation", handle=handle, certificate=cert.toJSON())
        return result["invitation"]

    @defer.inlineCallbacks
    def issueCredentials(self, handle, identityInfo, roles=(C.ROLE_MEMBER,), expiration=None,
                         validityStart=None, flags=0):
        """
        C{PeerGroupIssueCredentials}: C{identityInfo} is an identity info,
        or a member entry of L{enumMembers} (or its C{credentialInfo}), as
        Windows takes a member's C{PEER_CREDENTIAL_INFO}.  The new
        credentials start after the member's current ones by default.
        """
        cert = yield self._signFor(handle, identityInfo, roles, expiration, validityStart)
        result = yield self.call("issueCredentials", handle=handle, certificate=cert.toJSON(),
                                 flags=flags)
        return result["invitation"]

    @defer.inlineCallbacks
    def createPasswordInvitation(self, handle):
        result = yield self.call("createPasswordInvitation", handle=handle)
        return result["invitation"]

    # -- members, properties, status ------------------------------------------

    @defer.inlineCallbacks
    def enumMembers(self, handle, flags=0, identity=None):
        params = {"handle": handle, "flags": flags}
        if identity is not None:
            params["identity"] = identity
        result = yield self.call("enumMembers", **params)
        return result["members"]

    @defer.inlineCallbacks
    def getProperties(self, handle):
        result = yield self.call("getProperties", handle=handle)
        return result["properties"]

    def setProperties(self, handle, **properties):
        return self.call("setProperties", handle=handle, properties=properties)

    @defer.inlineCallbacks
    def setPassword(self, handle, password):
        yield self.call("setProperties", handle=handle,
                        properties={"passwordVerifier": cred.makeVerifier(password)})

    @defer.inlineCallbacks
    def getStatus(self, handle):
        result = yield self.call("getStatus", handle=handle)
        return result["status"]

    # -- records ---------------------------------------------------------------

    @defer.inlineCallbacks
    def addRecord(self, handle, recordType, data=b"", expiration=None, attributes="",
                  lifetime=3600, **extra):
        if expiration is None:
            expiration = nowFiletime() + lifetime * C.TICKS
        record = dict(extra, type=recordType, data=cred.b64(data), expiration=expiration,
                      attributes=attributes)
        result = yield self.call("addRecord", handle=handle, record=record)
        return result["id"]

    @defer.inlineCallbacks
    def updateRecord(self, handle, record):
        result = yield self.call("updateRecord", handle=handle, record=record)
        return result["record"]

    def deleteRecord(self, handle, recordId):
        return self.call("deleteRecord", handle=handle, id=recordId)

    @defer.inlineCallbacks
    def getRecord(self, handle, recordId):
        result = yield self.call("getRecord", handle=handle, id=recordId)
        return result["record"]

    @defer.inlineCallbacks
    def _paged(self, method, key, **params):
        """
        Every page of a paged listing, following its cursor.
        """
        result = yield self.call(method, **params)
        items = list(result[key])
        while result.get("cursor"):
            more = {"handle": params["handle"]} if "handle" in params else {}
            result = yield self.call(method, cursor=result["cursor"], **more)
            items.extend(result[key])
        return items

    def enumRecords(self, handle, recordType=None):
        params = {"handle": handle}
        if recordType is not None:
            params["type"] = recordType
        return self._paged("enumRecords", "records", **params)

    def searchRecords(self, handle, criteria):
        return self._paged("searchRecords", "records", handle=handle, criteria=criteria)

    def endEnumeration(self, cursor):
        return self.call("endEnumeration", cursor=cursor)

    @property
    def limits(self):
        """
        The broker's C{hello.limits} (an older broker's defaults if absent).
        """
        return (self.hello or {}).get("limits") or {"maxMessageSize": 4 * 1024 * 1024}

    @defer.inlineCallbacks
    def exportDatabase(self, handle, path=None):
        """
        C{PeerGroupExportDatabase}: the sealed database (its parts joined),
        written to C{path} (overwritten) when given.
        """
        result = yield self.call("exportDatabase", handle=handle)
        parts = [result["database"]]
        while result.get("cursor"):
            result = yield self.call("exportDatabase", handle=handle, cursor=result["cursor"])
            parts.append(result["database"])
        database = "".join(parts)
        if path is not None:
            writePrivate(path, database)
        return database

    @defer.inlineCallbacks
    def importDatabase(self, handle, database=None, path=None):
        """
        C{PeerGroupImportDatabase}: in one message when it fits, else
        uploaded in parts paced under the session's inbound byte rate; the
        broker applies it at the last part.
        """
        if path is not None:
            with open(path, encoding="utf-8") as f:
                database = f.read()
        size = self.limits.get("maxMessageSize") or 4 * 1024 * 1024
        chunk = max(size - IMPORT_ENVELOPE, 1024)
        if len(database.encode("utf-8")) <= chunk:
            result = yield self.call("importDatabase", handle=handle, database=database)
            return result
        if self._pacer is None:
            self._pacer = _Pacer(self._clock, self.limits)
        cursor = None
        parts = _split(database, chunk)
        for i, part in enumerate(parts):
            params = {"handle": handle, "database": part, "more": i < len(parts) - 1}
            if cursor is not None:
                params["cursor"] = cursor
            yield self._pacer.wait(len(part.encode("utf-8")) + IMPORT_ENVELOPE)
            result = yield self.call("importDatabase", **params)
            cursor = result.get("cursor")
        return result

    # -- direct connections and data ----------------------------------------

    @defer.inlineCallbacks
    def openDirectConnection(self, handle, identity):
        result = yield self.call("openDirectConnection", handle=handle, identity=identity)
        return result["connectionId"]

    def closeDirectConnection(self, handle, connectionId):
        return self.call("closeDirectConnection", handle=handle, connectionId=connectionId)

    def sendData(self, handle, connectionId, dataType, data):
        return self.call("sendData", handle=handle, connectionId=connectionId, type=dataType,
                         data=cred.b64(data))

    @defer.inlineCallbacks
    def enumConnections(self, handle, flags=C.CONNECTION_DIRECT | C.CONNECTION_NEIGHBOR):
        result = yield self.call("enumConnections", handle=handle, flags=flags)
        return result["connections"]

    # -- events -------------------------------------------------------------

    @defer.inlineCallbacks
    def registerEvent(self, handle, registrations):
        """
        C{PeerGroupRegisterEvent}: C{registrations} is a list of event
        types or C{(eventType, typeGUID)} pairs.

        @return: the registration id.
        """
        entries = []
        for r in registrations:
            if isinstance(r, tuple):
                entries.append({"eventType": r[0], "type": r[1]})
            else:
                entries.append({"eventType": r})
        result = yield self.call("registerEvent", handle=handle, registrations=entries)
        return result["registration"]

    def unregisterEvent(self, registration):
        return self.call("unregisterEvent", registration=registration)


_MISSING = object()
# Room left in an import part's message for the rest of the request.
IMPORT_ENVELOPE = 1024


def _split(text, size):
    """
    C{text} in pieces of at most C{size} UTF-8 bytes (whole characters).
    """
    parts, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        while len(text[start:end].encode("utf-8")) > size:
            end -= max((end - start) // 8, 1)
        parts.append(text[start:end])
        start = end
    return parts


def _subject(who):
    """
    The subject of credentials to issue: an identity info string, a member
    entry of C{enumMembers} or its C{credentialInfo}.

    @return: C{(info, validityStart of its current credentials or 0)}.
    """
    if isinstance(who, dict):
        info = who.get("credentialInfo") or who
        try:
            publicKey = cred.unb64(info["publicKey"], "publicKey")
            peerName = info["peerName"]
        except (KeyError, TypeError, ValueError):
            raise PeerError("PEER_E_INVALID_CREDENTIAL_INFO",
                            "a member entry needs credentialInfo with publicKey and peerName")
        if not isinstance(peerName, str) or \
                peerName.split(".", 1)[0] != cred.authority(publicKey):
            raise PeerError("PEER_E_INVALID_CREDENTIAL_INFO",
                            "the peer name does not match the public key")
        return ({"publicKey": publicKey, "peerName": peerName,
                 "friendlyName": info.get("friendlyName", "")},
                info.get("validityStart") or 0)
    return cred.parseIdentityInfo(who), 0


class _Pacer:
    """
    A token bucket mirroring the broker's inbound byte rate for this
    session (C{hello.limits}), at 85% of it so that a large upload's parts
    are never dropped for going too fast.
    """

    def __init__(self, clock, limits):
        self._clock = clock
        rate = limits.get("inboundBytesPerSecond") or 0
        self._rate = rate * 0.85
        self._capacity = max(rate * (limits.get("inboundBurst") or 2.0),
                             limits.get("maxMessageSize") or 0) * 0.85
        self._tokens = self._capacity
        self._last = clock.seconds()

    def wait(self, size):
        """
        A Deferred firing once C{size} bytes may be sent (taken from the
        bucket).
        """
        if not self._rate:
            return defer.succeed(None)
        now = self._clock.seconds()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
        self._last = now
        self._tokens -= size
        if self._tokens >= 0:
            return defer.succeed(None)
        from twisted.internet.task import deferLater
        return deferLater(self._clock, -self._tokens / self._rate, lambda: None)


def _decode(payload):
    return json.loads(payload.decode("utf-8"))


def _encode(obj):
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


class _WSClientProtocol(WebSocketClientProtocol):
    def onOpen(self):
        self.client = PeerGroupClient(lambda o: self.sendMessage(_encode(o), False),
                                      self.transport.abortConnection)
        self.client.transport = self.transport
        self.factory.ready.callback(self.client)

    def onMessage(self, payload, isBinary):
        self.client.received(_decode(payload))

    def onClose(self, wasClean, code, reason):
        client = getattr(self, "client", None)
        if client is not None:
            client.lost(f"closed {code} {reason}")
        elif not self.factory.ready.called:
            self.factory.ready.errback(PeerError("PEER_E_CONNECTION_REFUSED",
                                                 f"handshake refused: {code} {reason}"))


def connectWebSocket(reactor, url, tlsOptions=None, protocols=(C.PROTOCOL,)):
    """
    Connect to C{url} (C{ws://host:port/peergroups/v1} or C{wss://...}).

    @param tlsOptions: client TLS options for C{wss} (e.g.
        C{optionsForClientTLS(host, trustRoot)}).
    @return: a Deferred firing with a L{PeerGroupClient} once the broker's
        hello has arrived.
    """
    parsed = urlparse(url)
    factory = WebSocketClientFactory(url, protocols=list(protocols), reactor=reactor)
    factory.protocol = _WSClientProtocol
    factory.setProtocolOptions(autoPingInterval=0, failByDrop=False)
    factory.ready = defer.Deferred()
    port = parsed.port or (443 if parsed.scheme == "wss" else 80)
    endpoint = TCP4ClientEndpoint(reactor, parsed.hostname, port)
    if parsed.scheme == "wss":
        endpoint = wrapClientTLS(tlsOptions, endpoint)
    d = endpoint.connect(factory)
    d.addCallback(lambda _: factory.ready)
    d.addCallback(lambda client: client.helloReceived.addCallback(lambda _: client))
    return d


class _StreamClientProtocol(Int32StringReceiver):
    MAX_LENGTH = 64 * 1024 * 1024

    def connectionMade(self):
        self.client = PeerGroupClient(lambda o: self.sendString(_encode(o)),
                                      self.transport.abortConnection)
        self.client.transport = self.transport

    def stringReceived(self, payload):
        self.client.received(_decode(payload))

    def connectionLost(self, reason):
        self.client.lost(reason.getErrorMessage())


def connectStream(reactor, endpoint):
    """
    Connect over length-prefixed JSON to C{endpoint} (an
    C{IStreamClientEndpoint} or a client endpoint string such as
    C{"tcp:127.0.0.1:7100"}).

    @return: a Deferred firing with a L{PeerGroupClient} once the broker's
        hello has arrived.
    """
    if isinstance(endpoint, str):
        endpoint = clientFromString(reactor, endpoint)
    d = endpoint.connect(Factory.forProtocol(_StreamClientProtocol))
    d.addCallback(lambda proto: proto.client.helloReceived.addCallback(lambda _: proto.client))
    return d
