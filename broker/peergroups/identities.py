# -*- test-case-name: tests.test_peergroups_paging -*-
"""
The Python client's identities, kept where the peer runs, as Windows keeps
them client-side: C{PeerIdentityCreate}, C{PeerEnumIdentities},
C{PeerIdentityGetXML}, C{PeerIdentityDelete} over a directory of one file
per identity (mode 0600: it holds the private key).

L{broker.peergroups.credentials.Identity} itself is not persisted (its
C{toPEM} keeps only the key, not the classifier and friendly name): an
application that must find its identities again after a restart keeps them
here.
"""

import json
import os
import re

from broker.files import writePrivate
from broker.peergroups.credentials import Identity

# A peer name: 40 hex digits, a dot, a classifier (no path separator).
_NAME = re.compile(r"^[0-9a-f]{40}\.[^/\\\0]{1,149}$")


class IdentityStore:
    """
    @param path: the directory (made, mode 0700, if missing).
    """

    def __init__(self, path):
        self.path = path
        os.makedirs(path, mode=0o700, exist_ok=True)

    def _file(self, peerName):
        if not isinstance(peerName, str) or not _NAME.match(peerName) or \
                peerName.startswith("."):
            raise KeyError(peerName)
        return os.path.join(self.path, peerName + ".json")

    def create(self, friendlyName="", classifier="peer"):
        """
        C{PeerIdentityCreate}: a new identity, stored.
        """
        identity = Identity.generate(classifier, friendlyName)
        self.save(identity)
        return identity

    def save(self, identity):
        writePrivate(self._file(identity.peerName), json.dumps({
            "classifier": identity.classifier, "friendlyName": identity.friendlyName,
            "privateKey": identity.toPEM().decode("ascii")}))

    def get(self, peerName):
        """
        The stored identity C{peerName}; C{KeyError} if there is none.
        """
        try:
            with open(self._file(peerName), encoding="utf-8") as f:
                row = json.load(f)
        except FileNotFoundError:
            raise KeyError(peerName)
        return Identity.fromPEM(row["privateKey"].encode("ascii"), row["classifier"],
                                row["friendlyName"])

    def enumIdentities(self):
        """
        C{PeerEnumIdentities}: C{[{"peerName", "friendlyName"}]}.
        """
        out = []
        for name in sorted(os.listdir(self.path)):
            if name.endswith(".json"):
                try:
                    identity = self.get(name[:-5])
                except (KeyError, ValueError):
                    continue
                out.append({"peerName": identity.peerName,
                            "friendlyName": identity.friendlyName})
        return out

    def getXML(self, peerName):
        """
        C{PeerIdentityGetXML}: the identity info to send an inviter.
        """
        return self.get(peerName).identityInfo()

    def delete(self, peerName):
        """
        C{PeerIdentityDelete}.
        """
        try:
            os.unlink(self._file(peerName))
        except FileNotFoundError:
            raise KeyError(peerName)
