# -*- test-case-name: tests.test_iot_apikeys -*-
"""
API keys of the IoT HTTP API: who may drive which fleet.

A key looks like C{iotk_<id>_<secret>}: C{id} is 8 random hex digits that
name the key (safe to log), C{secret} 32 random bytes in URL-safe base64.
The broker keeps only C{fleet:id:sha256hex}, the SHA-256 of the whole key,
so a leaked configuration or key file does not leak a usable key.  A plain
SHA-256 is enough (no slow password hash) because the key has 256 bits of
entropy: there is nothing to guess.  The id is looked up, then the digest
is compared with L{hmac.compare_digest}, so the time a check takes says
nothing about how close a guess was.

Each key belongs to exactly one fleet: the HTTP API answers a key only
about its own fleet's devices.

Operators make keys with::

    python -m broker.iot.apikeys new FLEET

which prints the key once (give it to the central) and the line to add to
C{iot.api_keys} or to the C{iot.api_key_file}.
"""

import hashlib
import hmac
import os
import re
import secrets
import sys

from broker.config import HUB_NAME
from broker.files import writePrivate

PREFIX = "iotk_"
_KEY = re.compile(r"^iotk_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
_LINE = re.compile(r"^([A-Za-z0-9_.-]+):([0-9a-f]{8}):([0-9a-f]{64})$")
DEVELOPMENT_KEY_FILE = "iot-api-key"


class APIKeyError(ValueError):
    """
    A key line that does not parse; the message names the problem.
    """


def newKey():
    """
    @return: C{(key, keyId)}, a fresh key and its id.
    """
    keyId = secrets.token_hex(4)
    return f"{PREFIX}{keyId}_{secrets.token_urlsafe(32)}", keyId


def digest(key):
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def hashLine(fleet, key):
    """
    @return: the C{fleet:id:sha256hex} line that admits C{key} for C{fleet}.
    """
    m = _KEY.match(key)
    if m is None:
        raise APIKeyError("not an IoT API key (iotk_<id>_<secret>)")
    return f"{fleet}:{m.group(1)}:{digest(key)}"


def parseLine(line):
    """
    @return: C{(fleet, keyId, sha256hex)} of a C{fleet:id:sha256hex} line.
    @raise APIKeyError: if the line is not of that form.
    """
    m = _LINE.match(line.strip())
    if m is None or not HUB_NAME.match(m.group(1)):
        raise APIKeyError("expected FLEET:ID:SHA256 (make one with "
                          "`python -m broker.iot.apikeys new FLEET`)")
    return m.group(1), m.group(2), m.group(3)


def readKeyFile(path):
    """
    The hash lines of a key file: one C{fleet:id:sha256hex} a line; blank
    lines and C{#} comments are ignored.

    @raise APIKeyError: naming the file and line of a bad entry.
    @raise OSError: if it cannot be read.
    """
    lines = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                lines.append(parseLine(line))
            except APIKeyError as e:
                raise APIKeyError(f"{path} line {n}: {e}")
    return lines


class APIKeys:
    """
    The accepted keys, by id.  L{replace} swaps the whole set at once (on
    SIGHUP), so a check never sees half of an old and half of a new set.

    A central sends the same key with every call: the keys that passed
    are remembered (at most C{cacheSize}, oldest out first), so a repeated
    one costs a dictionary look-up, not a hash.  Only valid keys are
    remembered, so wrong guesses cannot fill it; L{replace} forgets them
    all, so a key removed by a reload is refused at once.
    """

    def __init__(self, entries=(), cacheSize=1024):
        self._byId = {}
        self._verified = {}
        self.cacheSize = cacheSize
        self.replace(entries)

    def replace(self, entries):
        """
        @param entries: C{(fleet, keyId, sha256hex)} tuples.
        @raise APIKeyError: if an id appears twice (the second key could
            never be used, which is surely a mistake).
        """
        byId = {}
        for fleet, keyId, hexdigest in entries:
            if keyId in byId:
                raise APIKeyError(f"key id {keyId} appears twice")
            byId[keyId] = (fleet, bytes.fromhex(hexdigest))
        self._byId = byId
        self._verified = {}

    def __len__(self):
        return len(self._byId)

    def fleetOf(self, key):
        """
        @return: C{(fleet, keyId)} for a valid key, else C{None}.
        """
        if not isinstance(key, str):
            return None
        found = self._verified.get(key)
        if found is not None:
            return found
        m = _KEY.match(key)
        if m is None:
            return None
        entry = self._byId.get(m.group(1))
        # Hash anyway when the id is unknown: one code path, one cost.
        candidate = hashlib.sha256(key.encode("utf-8")).digest()
        if entry is None:
            hmac.compare_digest(candidate, bytes(32))
            return None
        if not hmac.compare_digest(candidate, entry[1]):
            return None
        found = entry[0], m.group(1)
        verified = self._verified
        if len(verified) >= self.cacheSize:
            # Dictionaries keep insertion order: the oldest goes.
            del verified[next(iter(verified))]
        verified[key] = found
        return found


def developmentKey(stateDir, fleet):
    """
    Read or create the development API key for C{fleet} (used when no key
    is configured), mode 0600, never logged.

    @return: C{(key, path)}.
    """
    path = os.path.join(stateDir, DEVELOPMENT_KEY_FILE)
    try:
        with open(path, encoding="ascii") as f:
            key = f.read().strip()
        if _KEY.match(key):
            return key, path
    except FileNotFoundError:
        pass
    key, _ = newKey()
    writePrivate(path, key + "\n")
    return key, path


USAGE = """\
usage: python -m broker.iot.apikeys new FLEET
       python -m broker.iot.apikeys hash FLEET KEY

new   make a key for FLEET: prints the key (give it to the central; it is
      shown only once) and the line to add to iot.api_keys or api_key_file.
hash  print the line for an existing key.
"""


def main(argv=None, out=sys.stdout, err=sys.stderr):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "new":
        fleet = argv[1]
        if not HUB_NAME.match(fleet):
            err.write(f"not a valid fleet (hub) name: {fleet!r}\n")
            return 2
        key, _ = newKey()
        out.write(f"key:  {key}\n")
        out.write(f"line: {hashLine(fleet, key)}\n")
        return 0
    if len(argv) == 3 and argv[0] == "hash":
        try:
            out.write(hashLine(argv[1], argv[2]) + "\n")
        except APIKeyError as e:
            err.write(f"{e}\n")
            return 2
        return 0
    err.write(USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main())
