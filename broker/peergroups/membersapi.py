# -*- test-case-name: tests.test_peergroups -*-
"""
The members part of a peer's session: invitations (plain and password),
credentials issued and re-issued by an administrator, the member list and
the group's properties.
"""

from broker.peergroups import constants as C
from broker.peergroups import credentials as cred
from broker.peergroups.errors import PeerError
from broker.peergroups.model import Member
from broker.peergroups.params import Reply, param

MUTABLE_PROPERTIES = {"friendlyName", "comment", "flags", "passwordVerifier"}
IMMUTABLE_PROPERTIES = {"cloud", "classifier", "groupPeerName", "creatorPeerName",
                        "memberDataLifetime", "presenceLifetime", "authenticationSchemes",
                        "groupPasswordRole"}


class MembersAPI:
    """
    Mixed into L{broker.peergroups.session.PeerSession}, whose helpers
    (C{_ready}, C{_synced}, C{_persistThen}, C{_memberChange}) it uses.
    """

    # -- invitations and credentials -------------------------------------------

    def _authorizeIssue(self, node, params):
        """
        Check a GMC the caller signed for someone else: the caller may issue
        (not a plain member), the role is not above its own, the chain is
        not too long nor circular, and the GMC does not outlive the
        caller's.

        @return: the new chain.
        """
        role = node.role
        if role not in (C.ROLE_ADMIN, C.ROLE_INVITING_MEMBER):
            raise PeerError("PEER_E_NOT_AUTHORIZED", "members cannot invite or issue credentials")
        try:
            cert = cred.Certificate.fromJSON(param(params, "certificate", dict))
        except (ValueError, KeyError, TypeError) as e:
            raise PeerError("E_INVALIDARG", f"malformed certificate: {e}")
        group = node.group
        if cert.kind != "GMC" or cert.group != group.gpn or not cert.signedBy(node.publicKey):
            raise PeerError("E_INVALIDARG", "the certificate must be a GMC of this group "
                            "signed with the caller's identity key")
        if not cert.roles or not all(cred.canIssue(role, r) for r in cert.roles):
            raise PeerError("PEER_E_NOT_AUTHORIZED", "cannot issue a role above one's own")
        chain = list(node.chain) + [cert]
        if len(chain) - 1 > C.MAX_CHAIN_LENGTH:
            raise PeerError("PEER_E_CHAIN_TOO_LONG", f"at most {C.MAX_CHAIN_LENGTH} links")
        if any(c.subject == cert.subject for c in node.chain):
            raise PeerError("PEER_E_CIRCULAR_CHAIN_DETECTED", "the subject is already an issuer")
        mine = node.chain[-1]
        if cert.notAfter > mine.notAfter:
            raise PeerError("PEER_E_INVALID_TIME_PERIOD",
                            "the expiration is beyond the issuer's remaining lifetime")
        if cert.notBefore < mine.notBefore or cert.notAfter <= max(cert.notBefore, self.pg.now()):
            raise PeerError("PEER_E_INVALID_TIME_PERIOD", "empty or past validity period")
        if cert.subjectName.split(".", 1)[0] != cred.authority(cert.subject):
            raise PeerError("E_INVALIDARG", "subjectName does not match the subject key")
        cred.validateChain(chain, group.gpn, group.grcKey)
        return chain

    def api_createInvitation(self, params):
        handle, node = self._ready(params)
        chain = self._authorizeIssue(node, params)
        group = node.group
        invitation = cred.encodeInvitation(self.app.name, group.gpn, chain,
                                           group.properties.get("friendlyName", ""))
        return self._persistThen(self.pg.publishMembership(node), {"invitation": invitation})

    def api_createPasswordInvitation(self, params):
        handle, node = self._ready(params)
        group = node.group
        if group.verifier is None:
            raise PeerError("PEER_E_NOT_AUTHORIZED", "not a password group")
        if node.role not in (C.ROLE_ADMIN, C.ROLE_INVITING_MEMBER):
            raise PeerError("PEER_E_NOT_AUTHORIZED", "members cannot invite")
        invitation = cred.encodeInvitation(
            self.app.name, group.gpn, None, group.properties.get("friendlyName", ""),
            password={"salt": group.verifier["salt"],
                      "iterations": group.verifier["iterations"]})
        return {"invitation": invitation}

    def api_issueCredentials(self, params):
        handle, node = self._ready(params)
        chain = self._authorizeIssue(node, params)
        flags = param(params, "flags", int, required=False, default=0)
        cert = chain[-1]
        group = node.group
        subject = group.members.get(cert.subjectName)
        if subject is not None:
            if subject.publicKey != cert.subject:
                raise PeerError("PEER_E_INVALID_CREDENTIAL_INFO", "subject key mismatch")
            current = subject.pending or subject.chain
            if current and cert.notBefore <= current[-1].notBefore:
                raise PeerError("PEER_E_INVALID_TIME_PERIOD",
                                "ValidityStart must be later than the current credentials'")
        changes = self.pg.publishMembership(node)
        after = None
        if flags & C.STORE_CREDENTIALS:
            if subject is None:
                subject = Member(cert.subjectName, cert.subject, cert.friendlyName,
                                 local=False)
                group.members[cert.subjectName] = subject
            subject.pending = chain
            subject.published = True
            changes.append(self._memberChange(group, subject))
            peer = subject.peerName
            after = lambda: self.pg.memberChanged(group, peer, C.MEMBER_JOINED)  # noqa: E731
        invitation = cred.encodeInvitation(self.app.name, group.gpn, chain,
                                           group.properties.get("friendlyName", ""))
        return self._persistThen(changes, Reply({"invitation": invitation}, after=after))

    # -- members and properties ------------------------------------------------

    def api_enumMembers(self, params):
        handle, node = self._synced(params)
        member = node.member
        flags = param(params, "flags", int, required=False, default=0)
        wanted = params.get("identity")
        group = node.group
        others = sorted((m for m in group.members.values()
                         if m.published and m.peerName != node.peerName
                         and (m.chain or m.pending)),
                        key=lambda m: m.peerName)
        out = []
        for m in [member] + others:
            peer = self.pg.present(group, m.peerName)
            if flags & C.MEMBER_PRESENT and peer is None:
                continue
            if wanted is not None and m.peerName != wanted:
                continue
            chain = peer.chain if peer is not None else (m.chain or m.pending)
            entry = {"identity": m.peerName, "flags": C.MEMBER_PRESENT if peer else 0,
                     "friendlyName": m.friendlyName, "attributes": "",
                     "nodeId": str(peer.nodeId) if peer else "0", "addresses": [],
                     "credentialInfo": chain[-1].info() if chain else None}
            if peer is not None and not (group.flags & C.DISABLE_PRESENCE):
                entry["addresses"] = [peer.address]
            out.append(entry)
        return {"members": out}

    def _propertiesView(self, group):
        out = dict(group.properties)
        out["hasPassword"] = group.verifier is not None
        return out

    def api_getProperties(self, params):
        handle, node = self._ready(params)
        return {"properties": self._propertiesView(node.group)}

    def api_setProperties(self, params):
        handle, node = self._ready(params)
        group = node.group
        if node.peerName != group.creator:
            raise PeerError("PEER_E_NOT_AUTHORIZED", "only the creator sets properties")
        props = param(params, "properties", dict)
        bad = "PEER_E_INVALID_GROUP_PROPERTIES"
        for name, value in props.items():
            if name in IMMUTABLE_PROPERTIES:
                if value != group.properties.get(name):
                    raise PeerError(bad, f"{name} cannot be changed")
            elif name not in MUTABLE_PROPERTIES and name != "hasPassword":
                raise PeerError(bad, f"unknown property {name!r}")
        merged = dict(group.properties)
        merged.update({k: v for k, v in props.items() if k in MUTABLE_PROPERTIES
                       and k != "passwordVerifier"})
        checked = self._checkedProperties(merged)
        verifier = group.verifier
        if props.get("passwordVerifier") is not None:
            if verifier is None:
                raise PeerError(bad, "not a password group")
            verifier = cred.checkVerifier(props["passwordVerifier"])
        for name in ("friendlyName", "comment", "flags"):
            group.properties[name] = checked[name]
        group.verifier = verifier
        return self._persistThen(
            [("group", self.app.name, group.gpn, group.toStore())],
            Reply({}, after=lambda: self.pg.broadcast(group, C.EVENT_PROPERTY_CHANGED, {})))
