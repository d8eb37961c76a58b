# -*- test-case-name: tests.test_ecdn_keyring -*-
"""
Tests for L{broker.ecdn.keyring}: key files, tokens, rotation, expiry.
"""

import base64
import os
import sys

from twisted.internet import defer, utils
from twisted.trial.unittest import TestCase

from broker.ecdn.keyring import KeyFileError, TokenError, newKeyLine, parseKeyFile

SDP = ("v=0\r\no=- 46117 2 IN IP4 10.1.2.3\r\ns=-\r\n"
       "a=candidate:1 1 udp 2122260223 192.168.1.20 50000 typ host\r\n"
       "a=note:ünïcödé\r\n") * 80
NOW = 1_800_000_000


def keyLine(kid, status="active", until=None):
    line = newKeyLine(kid).rsplit(" ", 1)[0] + " " + status
    return line + (" " + until if until else "")


class KeyFileTests(TestCase):
    def assertBad(self, text, line, problem):
        e = self.assertRaises(KeyFileError, parseKeyFile, text, "k")
        self.assertIn(f"k:{line}" if line else "k:", str(e))
        self.assertIn(problem, str(e))

    def test_errorsNameTheLine(self):
        good = keyLine("a")
        self.assertBad(f"{good}\nb notbase64!! decrypt\n", 2, "base64")
        self.assertBad(f"{good}\nb QUJD decrypt\n", 2, "32 bytes")
        self.assertBad(f"{good}\n{keyLine('a', 'decrypt')}\n", 2, "twice")
        self.assertBad(f"{good}\n{keyLine('b')}\n", 2, "second active")
        self.assertBad(f"{keyLine('b', 'decrypt')}\n", 0, "no active key")
        self.assertBad(f"{good}\n{keyLine('b', 'sleeping')}\n", 2, "status")
        self.assertBad(f"{good}\n{keyLine('b', 'decrypt', 'tomorrow')}\n", 2, "ISO 8601")
        self.assertBad(f"{good}\nb c\n", 2, "KID KEY STATUS")

    def test_keyNeverInErrors(self):
        line = keyLine("a")
        secret = line.split()[1]
        e = self.assertRaises(KeyFileError, parseKeyFile, f"{line}\n{line}\n", "k")
        self.assertNotIn(secret, str(e))


class TokenTests(TestCase):
    def setUp(self):
        self.line = keyLine("k1")
        self.ring = parseKeyFile(self.line + "\n")

    def test_roundTrip(self):
        """
        Decryption gives back the exact bytes (CRLF and UTF-8 included); two
        encryptions differ; the token shows no address.
        """
        data = SDP.encode("utf-8")
        self.assertGreater(len(data), 9000)
        a, b = self.ring.encrypt(data, NOW), self.ring.encrypt(data, NOW)
        self.assertNotEqual(a, b)
        self.assertTrue(a.startswith("v1.k1."))
        self.assertEqual(self.ring.decrypt(a, NOW), data)
        for secret in ("10.1.2.3", "192.168.1.20"):
            self.assertNotIn(secret, a)

    def test_everyBitTampered(self):
        """
        Flipping any bit of the body, or changing the header, fails.
        """
        token = self.ring.encrypt(b"v=0\r\n", NOW)
        header, body = token.rsplit(".", 1)
        raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        for i in range(len(raw) * 8):
            bad = bytearray(raw)
            bad[i // 8] ^= 1 << (i % 8)
            forged = header + "." + base64.urlsafe_b64encode(bytes(bad)).decode().rstrip("=")
            self.assertRaises(TokenError, self.ring.decrypt, forged, NOW)
        self.assertRaises(TokenError, self.ring.decrypt, "v2" + token[2:], NOW)

    def test_malformed(self):
        token = self.ring.encrypt(b"v=0\r\n" * 20, NOW)
        for bad, problem in [(token[:20], "malformed"), (token[:-10], "authentication"),
                             ("v1.k1.@@@", "malformed"), ("garbage", "malformed"),
                             ("v1.k9." + token.split(".")[2], "unknown")]:
            e = self.assertRaises(TokenError, self.ring.decrypt, bad, NOW)
            self.assertIn(problem, str(e))

    def test_wrongKey(self):
        other = parseKeyFile(keyLine("k1") + "\n")
        token = other.encrypt(b"v=0\r\n", NOW)
        e = self.assertRaises(TokenError, self.ring.decrypt, token, NOW)
        self.assertIn("authentication", str(e))

    def test_rotation(self):
        """
        After rotation new tokens use the new key; tokens of the previous
        key decrypt until its grace period ends, then fail like a retired
        key's.
        """
        oldToken = self.ring.encrypt(b"offer", NOW)
        # NOW is 2027-01-15T08:00:00Z; the grace period ends four hours later.
        oldLine = "k1 " + self.line.split()[1] + " decrypt 2027-01-15T12:00:00Z"
        rotated = parseKeyFile(keyLine("k2") + "\n" + oldLine + "\n")
        self.assertTrue(rotated.encrypt(b"x", NOW).startswith("v1.k2."))
        self.assertEqual(rotated.decrypt(oldToken, NOW), b"offer")
        after = NOW + 5 * 3600
        e = self.assertRaises(TokenError, rotated.decrypt, oldToken, after)
        self.assertIn("retired", str(e))
        retired = parseKeyFile(keyLine("k2") + "\n" + oldLine.rsplit(" ", 2)[0] + " retired\n")
        self.assertRaises(TokenError, retired.decrypt, oldToken, NOW)

    def test_expiry(self):
        token = self.ring.encrypt(b"offer", NOW)
        self.assertEqual(self.ring.decrypt(token, NOW + 59, maxAge=60), b"offer")
        e = self.assertRaises(TokenError, self.ring.decrypt, token, NOW + 61, maxAge=60)
        self.assertIn("expired", str(e))


class CommandLineTests(TestCase):
    """
    C{python -m broker.ecdn.keyring}, run as an operator runs it.
    """

    def keyring(self, *args):
        return utils.getProcessOutputAndValue(
            sys.executable, ["-m", "broker.ecdn.keyring", *args], env=os.environ)

    @defer.inlineCallbacks
    def test_help(self):
        out, err, code = yield self.keyring("--help")
        self.assertEqual(code, 0, err)
        self.assertIn(b"new", out)

    @defer.inlineCallbacks
    def test_new(self):
        """
        C{new KID} prints a line the key file reader takes.
        """
        out, err, code = yield self.keyring("new", "k2026-11")
        self.assertEqual(code, 0, err)
        ring = parseKeyFile(out.decode("ascii"))
        self.assertIsNotNone(ring)
        self.assertTrue(out.startswith(b"k2026-11 "))

    @defer.inlineCallbacks
    def test_badUsage(self):
        for args in ((), ("new",), ("new", "bad kid!"), ("old", "k1")):
            out, err, code = yield self.keyring(*args)
            self.assertEqual(code, 2, (args, err))
            self.assertEqual(out, b"")
            self.assertIn(b"usage:", err)
