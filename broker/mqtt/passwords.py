# -*- test-case-name: tests.test_mqtt_auth -*-
"""
The MQTT face's password file: Mosquitto's format, so an operator writes it
with C{mosquitto_passwd} (Debian's C{mosquitto} package) and can move a file
between the two brokers unchanged.

One line per user, C{user:hash}; blank lines and lines starting with C{#}
are skipped.  Two hashes are read, as Mosquitto 2 writes them:

  - C{$7$<iterations>$<salt>$<digest>}: PBKDF2-HMAC-SHA512, 64-byte digest
    (C{mosquitto_passwd}'s default, C{-H sha512-pbkdf2});
  - C{$6$<salt>$<digest>}: one SHA-512 of password then salt (Mosquitto 1.6
    and earlier, C{-H sha512}): fast, so checked in the reactor thread.

Salt and digest are standard base64.  A plain-text password is refused
(C{mosquitto_passwd -U} hashes such a file).

PBKDF2 costs CPU on purpose, so L{PasswordChecker} runs it in the
reactor's thread pool, at most C{maxConcurrent} at once with at most
C{maxQueued} waiting (past that a CONNECT is refused as busy rather than
queued without bound), and remembers a successful check for
C{cacheSeconds}: a fleet reconnecting after an outage costs one hash per
device, not one per attempt.  The cache keys on an HMAC of the password
under a key made at start, so it never holds a password.
"""

import base64
import binascii
import hashlib
import hmac
import os
import secrets

from twisted.internet import defer, threads
from twisted.logger import Logger

from broker.files import readOperatorFile

log = Logger()

PBKDF2 = "7"
SHA512 = "6"
# mosquitto_passwd 2.0's iteration count; what hashPassword writes by default.
DEFAULT_ITERATIONS = 101
# A file naming more than this is refused: one check would hold a thread
# for seconds.
MAX_ITERATIONS = 10_000_000


class PasswordFileError(ValueError):
    """The file cannot be read or a line is not C{user:$6$...} / C{user:$7$...}."""


class PasswordHash:
    """
    One user's stored hash.

    @ivar scheme: L{PBKDF2} or L{SHA512}.
    """

    __slots__ = ("scheme", "iterations", "salt", "digest")

    def __init__(self, scheme, salt, digest, iterations=0):
        self.scheme = scheme
        self.salt = salt
        self.digest = digest
        self.iterations = iterations

    @property
    def slow(self):
        """Whether checking costs enough to belong in a thread."""
        return self.scheme == PBKDF2

    def check(self, password):
        """
        Whether C{password} (bytes) is this hash's password; compares in
        constant time.
        """
        if self.scheme == PBKDF2:
            candidate = hashlib.pbkdf2_hmac("sha512", password, self.salt, self.iterations,
                                            len(self.digest))
        else:
            candidate = hashlib.sha512(password + self.salt).digest()
        return hmac.compare_digest(candidate, self.digest)


def _b64(text, what):
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise PasswordFileError(f"{what} is not base64")


def parseHash(text):
    """
    A L{PasswordHash} from Mosquitto's C{$7$...} or C{$6$...} text.

    @raise PasswordFileError: not one of them.
    """
    parts = text.split("$")
    if len(parts) == 5 and parts[0] == "" and parts[1] == PBKDF2:
        if not parts[2].isdigit() or not 1 <= int(parts[2]) <= MAX_ITERATIONS:
            raise PasswordFileError(f"iterations must be 1..{MAX_ITERATIONS}")
        digest = _b64(parts[4], "digest")
        if len(digest) != 64:
            raise PasswordFileError("a $7$ digest is 64 bytes")
        return PasswordHash(PBKDF2, _b64(parts[3], "salt"), digest, int(parts[2]))
    if len(parts) == 4 and parts[0] == "" and parts[1] == SHA512:
        digest = _b64(parts[3], "digest")
        if len(digest) != 64:
            raise PasswordFileError("a $6$ digest is 64 bytes")
        return PasswordHash(SHA512, _b64(parts[2], "salt"), digest)
    raise PasswordFileError("not a $7$ (PBKDF2-SHA512) or $6$ (SHA-512) hash; "
                            "write it with mosquitto_passwd")


def hashPassword(password, iterations=DEFAULT_ITERATIONS, salt=None):
    """
    The C{$7$} text of C{password} (str or bytes), as C{mosquitto_passwd}
    writes it (12 random salt bytes).
    """
    if isinstance(password, str):
        password = password.encode("utf-8")
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password, salt, iterations, 64)
    return "$7${}${}${}".format(iterations, base64.b64encode(salt).decode("ascii"),
                                base64.b64encode(digest).decode("ascii"))


def parsePasswordFile(data, source="password file"):
    """
    C{{user: PasswordHash}} from the bytes of a password file.

    @raise PasswordFileError: naming the line.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PasswordFileError(f"{source}: not UTF-8")
    table = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, stored = line.partition(":")
        if not colon or not user:
            raise PasswordFileError(f"{source} line {number}: expected user:hash")
        if user in table:
            raise PasswordFileError(f"{source} line {number}: user {user!r} given twice")
        try:
            table[user] = parseHash(stored)
        except PasswordFileError as e:
            raise PasswordFileError(f"{source} line {number} (user {user!r}): {e}")
    return table


def readPasswordFile(path):
    """
    L{parsePasswordFile} of the file at C{path}.

    @raise PasswordFileError: unreadable or malformed.
    """
    return parsePasswordFile(readOperatorFile(path, PasswordFileError, "password file"),
                             os.fspath(path))


class PasswordCheckBusy(Exception):
    """Too many password checks are waiting; the CONNECT is refused, not queued."""


class PasswordChecker:
    """
    Checks user names and passwords against a table swapped whole on reload.

    @ivar table: C{{user: PasswordHash}}.
    @ivar stats: counters (C{checks}, C{cacheHits}, C{hashed}, C{busy}).
    """

    def __init__(self, reactor, table=None, threadpool=None, maxConcurrent=2,
                 maxQueued=256, cacheSeconds=60.0, cacheSize=10_000):
        self._reactor = reactor
        self._threadpool = threadpool
        self.table = table or {}
        self._semaphore = defer.DeferredSemaphore(maxConcurrent)
        self._maxQueued = maxQueued
        self._cacheSeconds = cacheSeconds
        self._cacheSize = cacheSize
        self._cache = {}
        self._cacheKey = secrets.token_bytes(32)
        # Unknown users are hashed too, against this, so a refusal takes as
        # long for a user who does not exist as for a wrong password.
        self._decoy = PasswordHash(PBKDF2, secrets.token_bytes(12), secrets.token_bytes(64),
                                   DEFAULT_ITERATIONS)
        self.stats = {"checks": 0, "cacheHits": 0, "hashed": 0, "busy": 0}

    def replace(self, table):
        """Use C{table} from now on (a reload); cached results of the old one go."""
        self.table = table
        self._cache.clear()

    def check(self, username, password):
        """
        @param username: str.
        @param password: bytes.
        @return: a Deferred firing True or False, or failing with
            L{PasswordCheckBusy}.
        """
        self.stats["checks"] += 1
        stored = self.table.get(username)
        key = (username, hmac.new(self._cacheKey, password, hashlib.sha256).digest())
        cached = self._cache.get(key)
        now = self._reactor.seconds()
        if cached is not None:
            entry, until = cached
            if entry is stored and now < until:
                self.stats["cacheHits"] += 1
                return defer.succeed(True)
            del self._cache[key]
        target = stored if stored is not None else self._decoy
        if not target.slow:
            return defer.succeed(self._remember(key, stored, target.check(password)))
        if self._semaphore.tokens == 0 and len(self._semaphore.waiting) >= self._maxQueued:
            self.stats["busy"] += 1
            return defer.fail(PasswordCheckBusy())
        pool = self._threadpool or self._reactor.getThreadPool()

        def run():
            self.stats["hashed"] += 1
            return threads.deferToThreadPool(self._reactor, pool, target.check, password)

        d = self._semaphore.run(run)
        d.addCallback(lambda ok: self._remember(key, stored, ok))
        return d

    def _remember(self, key, stored, ok):
        ok = ok and stored is not None
        if ok and self._cacheSeconds > 0:
            if len(self._cache) >= self._cacheSize:
                # Oldest first (dicts keep insertion order).
                del self._cache[next(iter(self._cache))]
            self._cache[key] = (stored, self._reactor.seconds() + self._cacheSeconds)
        return ok
