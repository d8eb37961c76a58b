# -*- test-case-name: tests.test_iot_auth -*-
"""
Who may connect, and the challenge-response that proves it.

A session opens with HELLO (role, fleet, id and a fresh client nonce Nc);
the server answers CHALLENGE carrying a fresh server nonce Ns; the peer
answers PROOF = HMAC-SHA256(K, transcript("client")); the server checks it
in constant time and answers WELCOME carrying HMAC-SHA256(K,
transcript("server")), so the peer knows the server holds K too (mutual).
The transcript binds the protocol version, the role, the fleet, the id and
both nonces::

    "iot/1 " label NUL role NUL fleet NUL id NUL Nc Ns

Why a recorded session cannot be replayed: a proof is only valid for the Ns
the server chose for that session (32 random bytes, never reused), so a
proof captured from one session fails in any other; the server also
remembers the client nonces it accepted within C{replayWindow} and refuses
a HELLO that reuses one (REPLAY), so even a replayed HELLO is caught before
any proof is computed; a server proof cannot be turned into a client proof
because the labels differ.  The key itself never crosses the wire.

Both sides then derive the session's UDP key from the same inputs (never
sent): L{udpKey}, HKDF-SHA256 (RFC 5869) of K salted with both nonces.
Each token's datagram is authenticated with a key of its own,
L{tokenKey}, derived from the UDP key and the token: that is what the
cluster keeps in Redis beside the token (docs/iot-protocol.md).
"""

import hashlib
import hmac
import os
import secrets
import time
from collections import OrderedDict

try:
    import tomllib
except ImportError:  # pragma: no cover - Python < 3.11
    import tomli as tomllib

from zope.interface import implementer

from broker.config import HUB_NAME
from broker.files import writePrivate
from broker.iot.interfaces import IDeviceRegistry

NONCE_SIZE = 32
MIN_CLIENT_NONCE = 16
DEVICE = "device"
CENTRAL = "central"


class Entry:
    """
    A registered peer: its key (bytes) and, for devices, the groups it may
    publish to.
    """

    __slots__ = ("fleet", "peerId", "key", "groups")

    def __init__(self, fleet, peerId, key, groups=()):
        self.fleet = fleet
        self.peerId = peerId
        self.key = key
        self.groups = frozenset(groups)


def keyBytes(secret):
    """
    The HMAC key of a secret: its UTF-8 bytes, so an operator can paste
    the secret into a device as it is.
    """
    return secret.encode("utf-8")


def newSecret():
    return secrets.token_urlsafe(32)


def transcript(label, role, fleet, peerId, clientNonce, serverNonce):
    return b"\0".join([b"iot/1 " + label.encode(), role.encode(), fleet.encode(),
                       peerId.encode("utf-8"), clientNonce + serverNonce])


def proof(key, label, role, fleet, peerId, clientNonce, serverNonce):
    return hmac.new(key, transcript(label, role, fleet, peerId, clientNonce, serverNonce),
                    hashlib.sha256).digest()


# The UDP datagram version a session may speak: 2 carries a MAC (a HELLO
# announcing "udp": 2); 1, token only, is refused unless configured.
UDP_VERSION = 2
UDP_KEY_SIZE = 32


def hkdf(ikm, salt, info, length=32):
    """
    HKDF-SHA256 (RFC 5869): a few HMACs, so that firmware needs nothing
    beyond HMAC-SHA256 to derive the same key.
    """
    prk = hmac.digest(salt, ikm, "sha256")
    out, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.digest(prk, block + info + bytes((i,)), "sha256")
        out += block
    return out[:length]


def udpKey(key, role, fleet, peerId, clientNonce, serverNonce):
    """
    The session's UDP key: HKDF-SHA256 with IKM the peer's key K, salt
    Nc || Ns and info C{"iot/2 udp" NUL role NUL fleet NUL id}.  A label
    of its own, so it is never equal to a proof (which travels in the
    clear).
    """
    info = b"\0".join([b"iot/2 udp", role.encode(), fleet.encode(), peerId.encode("utf-8")])
    return hkdf(key, clientNonce + serverNonce, info, UDP_KEY_SIZE)


def tokenKey(sessionUdpKey, token):
    """
    The key of one token's datagram: HMAC-SHA256(udpKey, "iot/2 token"
    || token).  Knowing it authenticates that one datagram and nothing
    else, which is why the cluster may store it in Redis with the token.
    """
    return hmac.digest(sessionUdpKey, b"iot/2 token" + token, "sha256")


def checkProof(key, candidate, role, fleet, peerId, clientNonce, serverNonce):
    expected = proof(key, "client", role, fleet, peerId, clientNonce, serverNonce)
    return hmac.compare_digest(expected, candidate)


class NonceBook:
    """
    The client nonces accepted in the last C{window} seconds, bounded to
    C{maxSize} (the oldest forgotten first): a HELLO reusing one is a
    replay.
    """

    def __init__(self, window=600.0, maxSize=100000, clock=time.monotonic):
        self.window = window
        self.maxSize = maxSize
        self._clock = clock
        self._seen = OrderedDict()

    def use(self, key):
        """
        Record C{key}; return False if it was already used in the window.
        """
        now = self._clock()
        seen = self._seen
        while seen:
            oldest, at = next(iter(seen.items()))
            if now - at < self.window and len(seen) < self.maxSize:
                break
            seen.popitem(last=False)
        if key in seen:
            return False
        seen[key] = now
        return True


def loadRegistryFile(path):
    """
    Parse a registry file (docs/iot.md)::

        [fleets.NAME]
        central_key = "..."            # optional
        device_groups = ["alerts"]     # groups of devices issued at run time
        [fleets.NAME.devices.ID]
        key = "..."
        groups = ["alerts"]

    @return: C{{fleet: {"central": Entry or None, "devices": {id: Entry},
        "groups": [...]}}}.
    @raise ValueError: naming what is wrong.
    """
    with open(path, "rb") as f:
        data = tomllib.load(f)
    fleets = {}
    for fleet, table in (data.get("fleets") or {}).items():
        if not HUB_NAME.match(fleet):
            raise ValueError(f"{path}: fleet name {fleet!r} is not a valid hub name")
        if not isinstance(table, dict):
            raise ValueError(f"{path}: fleets.{fleet} must be a table")
        central = table.get("central_key")
        if central is not None and (not isinstance(central, str) or not central):
            raise ValueError(f"{path}: fleets.{fleet}.central_key must be a non-empty string")
        groups = table.get("device_groups", [])
        devices = {}
        for did, d in (table.get("devices") or {}).items():
            key = d.get("key") if isinstance(d, dict) else None
            if not isinstance(key, str) or not key:
                raise ValueError(f"{path}: fleets.{fleet}.devices.{did}.key must be a "
                                 "non-empty string")
            g = d.get("groups", [])
            if not isinstance(g, list) or not all(isinstance(x, str) and x for x in g):
                raise ValueError(f"{path}: fleets.{fleet}.devices.{did}.groups must be a "
                                 "list of names")
            devices[did] = Entry(fleet, did, keyBytes(key), g)
        fleets[fleet] = {
            "central": Entry(fleet, None, keyBytes(central)) if central else None,
            "devices": devices, "groups": list(groups)}
    return fleets


def writeDevelopmentRegistry(path):
    """
    Create a registry with fleet C{demo}, its central and device
    C{sensor1}, mode 0600, if C{path} does not exist.
    """
    if os.path.exists(path):
        return False
    text = (
        "# Generated development registry: keys for the demo fleet.  Never use in production.\n"
        "[fleets.demo]\n"
        f'central_key = "{newSecret()}"\n'
        'device_groups = ["alerts"]\n'
        "[fleets.demo.devices.sensor1]\n"
        f'key = "{newSecret()}"\n'
        'groups = ["alerts"]\n')
    writePrivate(path, text, exclusive=True)
    return True


@implementer(IDeviceRegistry)
class Registry:
    """
    The registry file's entries, overlaid by the keys issued and revoked at
    run time (kept in the store, so they survive a restart).
    """

    def __init__(self, fileFleets=None):
        self._file = fileFleets or {}
        self._issued = {}     # (fleet, id) -> Entry or None (revoked)

    def replaceFile(self, fileFleets):
        self._file = fileFleets

    def loadIssued(self, rows):
        for fleet, did, secret in rows:
            self._setIssued(fleet, did, secret)

    def _setIssued(self, fleet, did, secret):
        if secret is None:
            self._issued[(fleet, did)] = None
        else:
            self._issued[(fleet, did)] = Entry(fleet, did, keyBytes(secret),
                                               self.defaultGroups(fleet, did))

    def defaultGroups(self, fleet, did):
        f = self._file.get(fleet)
        if f is None:
            return ()
        d = f["devices"].get(did)
        return d.groups if d is not None else f["groups"]

    def issued(self, fleet, did, secret):
        self._setIssued(fleet, did, secret)

    def device(self, fleet, deviceId):
        k = (fleet, deviceId)
        if k in self._issued:
            return self._issued[k]
        f = self._file.get(fleet)
        return f["devices"].get(deviceId) if f is not None else None

    def central(self, fleet):
        f = self._file.get(fleet)
        return f["central"] if f is not None else None

    def fleets(self):
        """
        @return: the names of the fleets of the registry file.
        """
        return sorted(self._file)

    def fleetDevices(self, fleet):
        ids = set()
        f = self._file.get(fleet)
        if f is not None:
            ids.update(f["devices"])
        for (fl, did), e in self._issued.items():
            if fl == fleet:
                if e is None:
                    ids.discard(did)
                else:
                    ids.add(did)
        return sorted(ids)
