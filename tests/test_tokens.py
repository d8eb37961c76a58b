# -*- test-case-name: tests.test_tokens -*-
"""
Client access tokens.
"""

import jwt
from twisted.trial import unittest

from broker.auth.tokens import (CLIENT_PATH, MQTT_PATH, TokenCache, TokenError,
                                audienceMatches, decodeToken, makeClientToken,
                                verifyClientToken)
from tests.wsharness import rawToken

KEY = "k" * 32
AUD = "http://broker.example:8080/client/hubs/chat"
NOW = 1_800_000_000


class TokenTests(unittest.TestCase):
    def verify(self, token, keys=(KEY,), origins=(), now=NOW):
        return verifyClientToken(token, keys, "chat", origins, now=now)

    def test_claims(self):
        tok = makeClientToken(KEY, AUD, "alice", ["webpubsub.sendToGroup"], ["g"], now=NOW)
        c = self.verify(tok)
        self.assertEqual((c.userId, c.roles, c.groups),
                         ("alice", ("webpubsub.sendToGroup",), ("g",)))

    def test_stringClaims(self):
        tok = jwt.encode({"aud": AUD, "exp": NOW + 60, "role": "r", "webpubsub.group": "g"},
                         KEY, algorithm="HS256")
        c = self.verify(tok)
        self.assertEqual((c.userId, c.roles, c.groups), (None, ("r",), ("g",)))

    def test_mqttAudience(self):
        """
        A clientType=MQTT token names /clients/mqtt/hubs/<hub>: refused where
        only the Web PubSub endpoint is accepted (the default), accepted
        where the MQTT face asks for its path.
        """
        tok = makeClientToken(KEY, "https://b.example/clients/mqtt/hubs/Chat", "m", now=NOW)
        self.assertRaises(TokenError, self.verify, tok)
        c = verifyClientToken(tok, (KEY,), "chat", now=NOW, paths=(MQTT_PATH, CLIENT_PATH))
        self.assertEqual(c.userId, "m")
        self.assertTrue(audienceMatches("wss://b/clients/mqtt/hubs/chat/", "chat",
                                        ("https://b",), (MQTT_PATH,)))
        self.assertFalse(audienceMatches("wss://b/client/hubs/chat", "chat", (), (MQTT_PATH,)))

    def test_keyRotation(self):
        tok = makeClientToken("old-key-0123456789abcdef0123456789", AUD, now=NOW)
        self.verify(tok, keys=(KEY, "old-key-0123456789abcdef0123456789"))
        self.assertRaises(TokenError, self.verify, tok)

    def test_refusals(self):
        cases = {
            "none": None,
            "garbage": "abc.def",
            "expired": makeClientToken(KEY, AUD, lifetime=-10, now=NOW),
            "future": jwt.encode({"aud": AUD, "exp": NOW + 900, "nbf": NOW + 600}, KEY,
                                 algorithm="HS256"),
            "noexp": jwt.encode({"aud": AUD}, KEY, algorithm="HS256"),
            "alg-none": jwt.encode({"aud": AUD, "exp": NOW + 60}, None, algorithm="none"),
            "otherhub": makeClientToken(KEY, "http://x/client/hubs/other", now=NOW),
            "badsub": jwt.encode({"aud": AUD, "exp": NOW + 60, "sub": 5}, KEY,
                                 algorithm="HS256"),
            "badrole": jwt.encode({"aud": AUD, "exp": NOW + 60, "role": [1]}, KEY,
                                  algorithm="HS256"),
        }
        for name, tok in cases.items():
            self.assertRaises(TokenError, self.verify, tok)
        self.assertRaises(TokenError, verifyClientToken, makeClientToken(KEY, AUD), (), "chat")

    def test_timeClaimTypes(self):
        """
        exp, nbf and iat must be finite numbers: PyJWT alone takes a string
        exp as a valid expiry and a boolean nbf or iat as 1 or 0.
        """
        for name in ("exp", "nbf", "iat"):
            for value in ("9999999999", True, False, None, [1], {"a": 1}):
                claims = {"aud": AUD, "exp": NOW + 60, name: value}
                tok = jwt.encode(claims, KEY, algorithm="HS256")
                e = self.assertRaises(TokenError, self.verify, tok)
                self.assertEqual(str(e), f"claim {name!r} must be a number", claims)
        for raw in (b'{"exp":NaN}', b'{"exp":Infinity}', b'{"exp":-Infinity}', b'{"exp":1e400}',
                    b'{"exp":%d,"exp":1}' % (NOW + 60), b'{"exp":%d,"nbf":NaN}' % (NOW + 60)):
            e = self.assertRaises(TokenError, decodeToken, rawToken(raw, KEY), [KEY], NOW)
            self.assertIn("malformed token claims", str(e))
        claims = decodeToken(jwt.encode({"exp": NOW + 0.5, "nbf": NOW - 0.5, "iat": NOW},
                                        KEY, algorithm="HS256"), [KEY], NOW)
        self.assertEqual(claims["exp"], NOW + 0.5)
        e = self.assertRaises(TokenError, decodeToken, jwt.encode(
            {"exp": NOW + 900, "iat": NOW + 400}, KEY, algorithm="HS256"), [KEY], NOW)
        self.assertEqual(str(e), "token issued in the future")

    def test_leeway(self):
        tok = makeClientToken(KEY, AUD, lifetime=60, now=NOW)
        self.verify(tok, now=NOW + 62)
        self.assertRaises(TokenError, self.verify, tok, now=NOW + 70)

    def test_wallClock(self):
        verifyClientToken(makeClientToken(KEY, AUD), [KEY], "chat")

    def test_audience(self):
        self.assertTrue(audienceMatches(AUD, "chat"))
        self.assertTrue(audienceMatches(AUD + "/", "CHAT"))
        self.assertFalse(audienceMatches(AUD, "chat2"))
        self.assertFalse(audienceMatches(5, "chat"))
        self.assertTrue(audienceMatches(AUD, "chat", ["http://broker.example:8080"]))
        self.assertTrue(audienceMatches("wss://b.example/client/hubs/chat", "chat",
                                        ["https://b.example"]))
        self.assertFalse(audienceMatches(AUD, "chat", ["http://elsewhere:8080"]))


class TokenCacheTests(unittest.TestCase):
    """
    L{TokenCache}: verified tokens remembered, still checked on every use.
    """

    def token(self, lifetime=60, **extra):
        claims = {"aud": AUD, "exp": NOW + lifetime}
        claims.update(extra)
        return jwt.encode(claims, KEY, algorithm="HS256")

    def test_hitSkipsVerification(self):
        cache = TokenCache()
        tok = self.token()
        calls = []
        real = jwt.decode
        self.patch(jwt, "decode", lambda *a, **kw: calls.append(a) or real(*a, **kw))
        first = decodeToken(tok, [KEY], NOW, cache)
        again = decodeToken(tok, [KEY], NOW + 10, cache)
        self.assertIs(again, first)
        self.assertEqual((len(calls), cache.hits, cache.misses), (1, 1, 1))

    def test_expiresWithItsToken(self):
        """
        exp is checked on every use: an expired entry is refused and
        dropped; nbf too (a token not yet valid is never stored).
        """
        cache = TokenCache()
        tok = self.token(lifetime=60)
        decodeToken(tok, [KEY], NOW, cache)
        e = self.assertRaises(TokenError, decodeToken, tok, [KEY], NOW + 120, cache)
        self.assertEqual(str(e), "token expired")
        self.assertEqual(len(cache), 0)
        early = self.token(nbf=NOW + 600)
        self.assertRaises(TokenError, decodeToken, early, [KEY], NOW, cache)
        self.assertEqual(len(cache), 0)

    def test_onlyWhileItsKeyIsConfigured(self):
        """
        An entry counts only while the key that signed it is one of the
        keys asked for: a key removed (a reload) refuses its tokens.
        """
        cache = TokenCache()
        tok = self.token()
        decodeToken(tok, [KEY, "other-key-0123456789abcdef0123"], NOW, cache)
        e = self.assertRaises(TokenError, decodeToken, tok,
                              ["other-key-0123456789abcdef0123"], NOW, cache)
        self.assertEqual(str(e), "token not signed by any access key of this hub")
        self.assertIsNotNone(decodeToken(tok, [KEY], NOW, cache))
        cache.clear()
        self.assertEqual(len(cache), 0)

    def test_bounded(self):
        """
        At most C{size} tokens, the least recently used out first; none
        longer than C{maxLength}; refused tokens never stored.
        """
        cache = TokenCache(size=3, maxLength=400)
        toks = [self.token(sub=f"u{i}") for i in range(5)]
        for tok in toks[:3]:
            decodeToken(tok, [KEY], NOW, cache)
        decodeToken(toks[0], [KEY], NOW, cache)
        for tok in toks[3:]:
            decodeToken(tok, [KEY], NOW, cache)
        self.assertEqual(len(cache), 3)
        self.assertIsNotNone(cache.get(toks[0], [KEY]))
        self.assertIsNone(cache.get(toks[1], [KEY]))
        long = self.token(sub="x" * 400)
        decodeToken(long, [KEY], NOW, cache)
        self.assertIsNone(cache.get(long, [KEY]))
        forged = jwt.encode({"aud": AUD, "exp": NOW + 60}, "not-the-key-not-the-key-not",
                            algorithm="HS256")
        cache.clear()
        for _ in range(3):
            self.assertRaises(TokenError, decodeToken, forged, [KEY], NOW, cache)
        self.assertEqual(len(cache), 0)
