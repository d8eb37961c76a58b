# -*- test-case-name: tests.test_peergroups -*-
"""
The state of the peer-groups face: per application, its groups (with their
record databases and memberships) and the nodes online on this broker.

Durable state (L{Group}, L{Member}, records) round-trips through the store;
runtime state (L{Node}, L{Handle}, L{Direct}) lives only while peers are
connected.
"""

import collections

from broker.peergroups import constants as C
from broker.peergroups.credentials import (Certificate, b64, chainFromJSON, chainToJSON,
                                           unb64)


class Member:
    """
    One identity's membership of one group: its credentials (the chain in
    effect and a newer one stored for its next connect), whether its
    membership was published (C{MEMBER_CHANGED/JOINED}), whether it has
    joined locally (it may open the group) and synchronised once, and the
    group database sequence number it last saw.
    """

    def __init__(self, peerName, publicKey, friendlyName="", chain=None, pending=None,
                 published=False, local=True, synced=False, lastSeq=0):
        self.peerName = peerName
        self.publicKey = publicKey
        self.friendlyName = friendlyName
        self.chain = chain
        self.pending = pending
        self.published = published
        self.local = local
        self.synced = synced
        self.lastSeq = lastSeq

    @property
    def leaf(self):
        return self.chain[-1] if self.chain else None

    def toStore(self):
        return {"publicKey": b64(self.publicKey), "friendlyName": self.friendlyName,
                "chain": chainToJSON(self.chain) if self.chain else None,
                "pending": chainToJSON(self.pending) if self.pending else None,
                "published": self.published, "local": self.local, "synced": self.synced,
                "lastSeq": self.lastSeq}

    @classmethod
    def fromStore(cls, row):
        return cls(row["peer"], unb64(row["publicKey"]), row.get("friendlyName", ""),
                   chainFromJSON(row["chain"]) if row.get("chain") else None,
                   chainFromJSON(row["pending"]) if row.get("pending") else None,
                   row["published"], row["local"], row["synced"], row["lastSeq"])


class Group:
    """
    One peer group of one application.

    @ivar grc: the group root certificate; C{grcKey} its public key.
    @ivar properties: C{PEER_GROUP_PROPERTIES} as a JSON-ready dict (no
        password material).
    @ivar verifier: the SCRAM verifier of a password group, else C{None}.
    @ivar issuer: the chain ending in the broker's password issuer GMC.
    @ivar seq: the database change counter.
    @ivar records: id -> L{Record}, tombstones included.
    """

    def __init__(self, app, gpn, grc, properties, verifier=None, issuer=None, seq=0):
        self.app = app
        self.gpn = gpn
        self.grc = grc
        self.grcKey = grc.subject
        self.properties = properties
        self.verifier = verifier
        self.issuer = issuer
        self.seq = seq
        self.records = {}
        self.members = {}
        self.serials = set()
        self.online = {}          # runtime: peerName -> online Node
        self.remote = {}          # runtime, cluster: peerName -> RemotePeer
        self.passwordFailures = collections.deque()   # runtime: times of wrong proofs

    @property
    def creator(self):
        return self.properties["creatorPeerName"]

    @property
    def flags(self):
        return self.properties.get("flags", 0)

    def toStore(self):
        return {"grc": self.grc.toJSON(), "properties": self.properties,
                "verifier": self.verifier,
                "issuer": chainToJSON(self.issuer) if self.issuer else None,
                "seq": self.seq}

    @classmethod
    def fromStore(cls, row):
        return cls(row["app"], row["gpn"], Certificate.fromJSON(row["grc"]),
                   row["properties"], row["verifier"],
                   chainFromJSON(row["issuer"]) if row["issuer"] else None, row["seq"])

    def liveRecords(self, now, recordType=None):
        return [r for r in self.records.values()
                if not r.deleted and r.expiration > now
                and (recordType is None or r.type == recordType)]


class Node:
    """
    One identity's presence in one group on this broker, shared by every
    handle (every session and application) of that identity: one
    membership, one view of the records, one online state, one set of
    direct connections.
    """

    remote = False

    def __init__(self, app, group, peerName, publicKey):
        self.app = app
        self.group = group
        self.peerName = peerName
        self.publicKey = publicKey
        self.handles = []
        self.online = False
        self.chain = None
        self.nodeId = 0
        self.directs = {}
        self.address = ""
        self.passwordChallenge = None

    @property
    def member(self):
        return self.group.members.get(self.peerName)

    @property
    def role(self):
        return self.chain[-1].role if self.chain else None

    @property
    def status(self):
        return (C.STATUS_LISTENING | C.STATUS_HAS_CONNECTIONS) if self.online else 0

    def refusesDirect(self):
        """
        Why a direct connection to this node would be refused (an HRESULT
        name), or C{None}: it must be online with a handle registered for
        direct-connection events.
        """
        if not self.online:
            return "PEER_E_CONNECTION_FAILED"
        if not any(t == C.EVENT_DIRECT_CONNECTION
                   for h in self.handles for entries in h.registrations.values()
                   for t, _ in entries):
            return "PEER_E_CONNECTION_REFUSED"
        return None


class RemotePeer:
    """
    A member online in a group through another node of the cluster: what
    this node shows of it (enumMembers, presence, direct connections) and
    where to relay direct data for it.  It has no handles here, so events
    emitted to it go nowhere.

    @ivar clusterNode: the id of the broker node it is connected to.
    @ivar nodeId: its peer node id in the group (as on that node).
    """

    remote = True
    online = True

    def __init__(self, group, peerName, clusterNode, nodeId, address, chain):
        self.group = group
        self.peerName = peerName
        self.clusterNode = clusterNode
        self.nodeId = nodeId
        self.address = address
        self.chain = chain
        self.handles = []
        self.directs = {}


class Handle:
    """
    A group handle of one session (C{PeerGroupOpen}/C{Create}/C{Join}):
    closing it invalidates it; closing a node's last handle takes the node
    offline.

    @ivar registrations: registration id -> C{[(eventType, typeFilter)]}.
    """

    def __init__(self, id, session, node):
        self.id = id
        self.session = session
        self.node = node
        self.registrations = {}


class Direct:
    """
    A direct connection between two online nodes, relayed by the broker.
    """

    def __init__(self, id, initiator, target):
        self.id = id
        self.initiator = initiator
        self.target = target

    def other(self, node):
        return self.target if node is self.initiator else self.initiator


class Application:
    """
    One application (a hub of the routing core): its own groups and nodes,
    isolated from every other application on the same port and store.
    """

    def __init__(self, name, hub):
        self.name = name
        self.hub = hub
        self.groups = {}
        self.nodes = {}

    def node(self, group, peerName, publicKey):
        key = (group.gpn, peerName)
        n = self.nodes.get(key)
        if n is None or n.group is not group:
            n = self.nodes[key] = Node(self, group, peerName, publicKey)
        return n

    @staticmethod
    def onlineNodes(group):
        return list(group.online.values())
