# -*- test-case-name: tests.test_ecdn_keyring -*-
"""
The SDP key ring and its tokens.

An SDP offer or answer carries the viewer's private ICE candidates; Meet
passes it through Google's tracker only as a token this service made, with
a key Google never sees.  The two calls of a pair come from different
viewers, possibly through different instances, so every instance reads the
same key file.

Token: C{v1.<kid>.<base64url(issued ‖ nonce ‖ ciphertext ‖ tag)>}, where
C{issued} is 8 bytes of big-endian Unix seconds and the nonce is 12 random
bytes (fresh for every call).  AES-256-GCM authenticates the header
C{v1.<kid>}, the issue time and a context string as associated data, so no
bit of a token can change without decryption failing.
"""

import base64
import binascii
import os
import re
import secrets
import struct
from datetime import datetime, timezone

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.ecdn.linefile import entries

VERSION = "v1"
CONTEXT = b"meet-ecdn-sdp"
NONCE_SIZE = 12
KEY_SIZE = 32
_KID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEADER = struct.Struct(">Q")


class KeyFileError(ValueError):
    """
    The key file is unusable; C{str(error)} names the file and line.
    """


class TokenError(ValueError):
    """
    A token cannot be decrypted; C{str(error)} is the documented error
    string for the caller (never the plaintext, never another key id).
    """


class _Key:
    __slots__ = ("kid", "aead", "status", "until")

    def __init__(self, kid, secret, status, until):
        self.kid = kid
        self.aead = AESGCM(secret)
        self.status = status
        self.until = until


def _b64decode(text):
    padded = text + "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(padded.encode("ascii"))


def parseKeyFile(text, source="<keys>"):
    """
    One key a line: C{KID KEY STATUS [UNTIL]}.  KEY is 32 bytes in base64url
    (C{python -m broker.ecdn.keyring new} makes one); STATUS is C{active}
    (encrypts; exactly one), C{decrypt} (still decrypts; until the optional
    ISO 8601 time UNTIL, the grace period) or C{retired} (refused).

    @raise KeyFileError: naming C{source:line}.
    """
    keys = {}
    active = None
    for _, where, parts in entries(text, source):
        if len(parts) not in (3, 4):
            raise KeyFileError(f"{where}: expected KID KEY STATUS [UNTIL]")
        kid, encoded, status = parts[:3]
        if not _KID.match(kid):
            raise KeyFileError(f"{where}: a key id is 1-64 letters, digits, '_' or '-'")
        if kid in keys:
            raise KeyFileError(f"{where}: key id {kid} appears twice")
        try:
            secret = _b64decode(encoded)
        except (binascii.Error, ValueError):
            raise KeyFileError(f"{where}: the key is not base64url")
        if len(secret) != KEY_SIZE:
            raise KeyFileError(f"{where}: the key must be {KEY_SIZE} bytes, got {len(secret)}")
        if status not in ("active", "decrypt", "retired"):
            raise KeyFileError(f"{where}: status must be active, decrypt or retired")
        until = None
        if len(parts) == 4:
            if status != "decrypt":
                raise KeyFileError(f"{where}: only a decrypt key takes an UNTIL time")
            try:
                until = datetime.fromisoformat(parts[3].replace("Z", "+00:00"))
            except ValueError:
                raise KeyFileError(f"{where}: UNTIL must be an ISO 8601 time")
            if until.tzinfo is None:
                until = until.replace(tzinfo=timezone.utc)
            until = until.timestamp()
        if status == "active":
            if active is not None:
                raise KeyFileError(f"{where}: a second active key ({active} is active)")
            active = kid
        keys[kid] = _Key(kid, secret, status, until)
    if active is None:
        raise KeyFileError(f"{source}: no active key")
    return KeyRing(keys, active)


def loadKeyFile(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"{path}: cannot read the key file: {e}")
    return parseKeyFile(text, path)


def newKeyLine(kid):
    """
    A key file line holding a new random key.
    """
    return f"{kid} {base64.urlsafe_b64encode(secrets.token_bytes(KEY_SIZE)).decode().rstrip('=')} active"


class KeyRing:
    """
    The keys of one key file: one encrypts, the others may still decrypt.
    """

    def __init__(self, keys, active):
        self._keys = keys
        self.active = active

    def encrypt(self, plaintext, now):
        key = self._keys[self.active]
        header = f"{VERSION}.{key.kid}"
        issued = _HEADER.pack(int(now))
        nonce = os.urandom(NONCE_SIZE)
        sealed = key.aead.encrypt(nonce, plaintext, CONTEXT + b"|" + header.encode() + issued)
        body = base64.urlsafe_b64encode(issued + nonce + sealed).decode("ascii").rstrip("=")
        return f"{header}.{body}"

    def decrypt(self, token, now, maxAge=0):
        """
        @raise TokenError: for a malformed, unknown-key, retired, expired or
            tampered token.
        """
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != VERSION:
            raise TokenError("malformed token")
        version, kid, body = parts
        key = self._keys.get(kid)
        if key is None:
            raise TokenError("token key unknown")
        if key.status == "retired" or (key.until is not None and now > key.until):
            raise TokenError("token key retired")
        try:
            raw = _b64decode(body)
        except (binascii.Error, ValueError):
            raise TokenError("malformed token")
        if len(raw) < _HEADER.size + NONCE_SIZE + 16:
            raise TokenError("malformed token")
        issued = raw[:_HEADER.size]
        nonce = raw[_HEADER.size:_HEADER.size + NONCE_SIZE]
        header = f"{version}.{kid}"
        try:
            plaintext = key.aead.decrypt(nonce, raw[_HEADER.size + NONCE_SIZE:],
                                         CONTEXT + b"|" + header.encode() + issued)
        except InvalidTag:
            raise TokenError("token authentication failed")
        if maxAge and now - _HEADER.unpack(issued)[0] > maxAge:
            raise TokenError("token expired")
        return plaintext


def main(argv=None):
    """
    C{python -m broker.ecdn.keyring new KID}: print a key line for the key
    file (docs/ecdn.md, "Rotating keys"); C{--help} says so (exit 0), a
    wrong command line exits 2 with the usage.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m broker.ecdn.keyring",
        description="Make eCDN SDP keys: print a line to add to ecdn.key_file.")
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="print a new ACTIVE key line: KID KEY active")
    new.add_argument("kid", metavar="KID", help="the key id: 1 to 64 letters, digits, - or _")
    args = parser.parse_args(argv)
    if not _KID.match(args.kid):
        parser.error(f"bad KID {args.kid!r}: 1 to 64 letters, digits, - or _")
    print(newKeyLine(args.kid))


if __name__ == "__main__":
    main()
