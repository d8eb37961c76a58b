"""
Tests for L{broker.iot.apikeys}: key format, hashed storage, per-fleet
lookup, and the operator's command line.
"""

import hashlib
import io

from twisted.trial.unittest import TestCase

from broker.iot import apikeys


class APIKeysTests(TestCase):
    def test_newKeys(self):
        keys = {apikeys.newKey()[0] for _ in range(50)}
        self.assertEqual(len(keys), 50)
        for k in keys:
            self.assertRegex(k, r"^iotk_[0-9a-f]{8}_[A-Za-z0-9_-]{43}$")

    def test_onlyTheHashIsKept(self):
        key, keyId = apikeys.newKey()
        line = apikeys.hashLine("plant1", key)
        self.assertEqual(line.split(":")[:2], ["plant1", keyId])
        # The secret is everything after "iotk_<id>_"; it may itself hold "_".
        secret = key[len(apikeys.PREFIX) + len(keyId) + 1:]
        self.assertEqual(len(secret), 43)
        self.assertNotIn(secret, line)
        self.assertEqual(apikeys.parseLine(line), ("plant1", keyId, apikeys.digest(key)))

    def test_lookup(self):
        a, aId = apikeys.newKey()
        b, bId = apikeys.newKey()
        keys = apikeys.APIKeys([apikeys.parseLine(apikeys.hashLine("fa", a)),
                                apikeys.parseLine(apikeys.hashLine("fb", b))])
        self.assertEqual(keys.fleetOf(a), ("fa", aId))
        self.assertEqual(keys.fleetOf(b), ("fb", bId))
        # Right id, wrong secret; unknown id; not a key at all.
        forged = a[:14] + b[14:]
        for bad in [forged, apikeys.newKey()[0], "", "iotk_", None, 42, a + "\n"]:
            self.assertIsNone(keys.fleetOf(bad), repr(bad))

    def test_replace(self):
        a, _ = apikeys.newKey()
        keys = apikeys.APIKeys([apikeys.parseLine(apikeys.hashLine("fa", a))])
        keys.replace([])
        self.assertIsNone(keys.fleetOf(a))
        entry = apikeys.parseLine(apikeys.hashLine("fa", a))
        self.assertRaises(apikeys.APIKeyError, keys.replace, [entry, entry])
        self.assertEqual(len(keys), 0)

    def test_verifiedKeysRemembered(self):
        """
        A key that passed is not hashed again; wrong keys always are and
        are never remembered; at most cacheSize keys are remembered; a
        replace forgets them, so a removed key is refused at once.
        """
        hashed = []
        real = hashlib.sha256

        class Counting:
            @staticmethod
            def sha256(data):
                hashed.append(data)
                return real(data)
        self.patch(apikeys, "hashlib", Counting)
        made = [apikeys.newKey() for _ in range(3)]
        keys = apikeys.APIKeys([apikeys.parseLine(apikeys.hashLine("fa", k)) for k, _ in made],
                               cacheSize=2)
        a, aId = made[0]
        hashed.clear()
        for _ in range(3):
            self.assertEqual(keys.fleetOf(a), ("fa", aId))
        self.assertEqual(len(hashed), 1)
        forged = a[:-1] + ("A" if a[-1] != "A" else "B")
        for _ in range(3):
            self.assertIsNone(keys.fleetOf(forged))
        self.assertEqual(len(hashed), 4)
        for k, kId in made:
            self.assertEqual(keys.fleetOf(k), ("fa", kId))
        self.assertEqual(len(keys._verified), 2)
        keys.replace([apikeys.parseLine(apikeys.hashLine("fa", made[1][0]))])
        self.assertIsNone(keys.fleetOf(made[2][0]))
        self.assertEqual(keys.fleetOf(made[1][0]), ("fa", made[1][1]))

    def test_badLines(self):
        for line in ["", "fa:1234abcd", "fa:1234abcd:" + "0" * 63, "9fleet:1234abcd:" + "0" * 64,
                     "fa:XYZ4abcd:" + "0" * 64]:
            self.assertRaises(apikeys.APIKeyError, apikeys.parseLine, line)
        self.assertRaises(apikeys.APIKeyError, apikeys.hashLine, "fa", "not-a-key")


class CommandLineTests(TestCase):
    def run_(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        return apikeys.main(list(argv), out, err), out.getvalue(), err.getvalue()

    def test_new(self):
        code, out, _ = self.run_("new", "plant1")
        self.assertEqual(code, 0)
        lines = dict(line.split(None, 1) for line in out.strip().splitlines())
        key, line = lines["key:"], lines["line:"]
        keys = apikeys.APIKeys([apikeys.parseLine(line)])
        self.assertEqual(keys.fleetOf(key)[0], "plant1")

    def test_hash(self):
        key, _ = apikeys.newKey()
        code, out, _ = self.run_("hash", "plant1", key)
        self.assertEqual((code, out.strip()), (0, apikeys.hashLine("plant1", key)))
        code, _, err = self.run_("hash", "plant1", "nope")
        self.assertEqual(code, 2)
        self.assertIn("not an IoT API key", err)

    def test_usage(self):
        for argv in [(), ("new",), ("new", "bad fleet"), ("delete", "x")]:
            code, out, err = self.run_(*argv)
            self.assertEqual((code, out), (2, ""))
            self.assertTrue(err)
