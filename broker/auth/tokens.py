# -*- test-case-name: tests.test_tokens -*-
"""
Web PubSub client access tokens: HS256 JWTs signed with a hub's access key.

The claims are Azure's: C{aud} is the client URL (C{{endpoint}/client/hubs/
{hub}}), C{exp} the expiry, C{sub} the userId, C{role} the roles and
C{webpubsub.group} the groups to join at connect.  Any of the hub's keys may
have signed the token, so keys can be rotated without dropping clients.
"""

import math
import time
from collections import OrderedDict
from urllib.parse import urlsplit

import jwt
from jwt.utils import base64url_decode

from broker.core import jsonstrict

# Clock skew tolerated on exp, in seconds.
LEEWAY = 5
# ... and on nbf / iat: a token made by a backend whose clock runs ahead
# (the SDKs stamp iat = now) must not be refused for a few seconds of skew.
FUTURE_SKEW = 300


class TokenError(Exception):
    """
    The token is missing, malformed, expired, for another audience or signed
    with an unknown key; the message says which (it is logged, never sent).
    """


class ClientClaims:
    """
    What a valid token grants: the userId, roles and initial groups.
    """

    def __init__(self, userId=None, roles=(), groups=()):
        self.userId = userId
        self.roles = tuple(roles)
        self.groups = tuple(groups)

    def __repr__(self):
        return f"<ClientClaims user={self.userId!r} roles={self.roles} groups={self.groups}>"


def _strings(claims, name):
    value = claims.get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TokenError(f"claim {name!r} must be a string or a list of strings")


# The client endpoints' paths, by Azure's clientType: Web PubSub clients and
# MQTT clients (``clientType=MQTT`` tokens are for the second).
CLIENT_PATH = "/client/hubs/"
MQTT_PATH = "/clients/mqtt/hubs/"


def audienceMatches(aud, hub, origins=(), paths=(CLIENT_PATH,)):
    """
    Whether C{aud} names the client endpoint of C{hub}.

    The path must be one of C{paths} followed by the hub (C{/client/hubs/
    <hub>} by default; hub names compare without case, as in Azure).  When
    C{origins} is not empty the scheme and host must be one of them
    (C{ws}/C{wss} are treated as C{http}/C{https}).
    """
    if not isinstance(aud, str):
        return False
    parts = urlsplit(aud)
    path = parts.path.rstrip("/").lower()
    if not any(path == f"{p}{hub}".lower() for p in paths):
        return False
    if not origins:
        return True
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    origin = f"{scheme}://{parts.netloc}".lower()
    return any(origin == _normaliseOrigin(o) for o in origins)


def _normaliseOrigin(o):
    parts = urlsplit(o)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}".lower()


def verifyClientToken(token, keys, hub, origins=(), now=None, paths=(CLIENT_PATH,)):
    """
    Verify a client access token for C{hub}.

    @param keys: the access keys (str) that may have signed it.
    @param origins: accepted audience origins; empty accepts any.
    @param paths: the endpoint paths its audience may name (L{CLIENT_PATH},
        L{MQTT_PATH}).
    @param now: the current POSIX time, for tests; the wall clock if None.
    @return: L{ClientClaims}.
    @raise TokenError: why the token is refused.
    """
    if not token:
        raise TokenError("no access token")
    if not keys:
        raise TokenError(f"hub {hub!r} has no access key configured")
    claims = decodeToken(token, keys, now)
    aud = claims.get("aud")
    auds = aud if isinstance(aud, list) else [aud]
    if not any(audienceMatches(a, hub, origins, paths) for a in auds):
        raise TokenError(f"token audience {aud!r} is not this hub's client endpoint")
    sub = claims.get("sub")
    if sub is not None and (not isinstance(sub, str) or not sub):
        raise TokenError("claim 'sub' must be a non-empty string")
    return ClientClaims(sub, _strings(claims, "role"), _strings(claims, "webpubsub.group"))


def decodeToken(token, keys, now=None, cache=None):
    """
    The claims of an HS256 JWT signed with one of C{keys}, with its time
    claims checked: what every face taking JWTs (client endpoint, REST API)
    shares.

    PyJWT checks the signature only.  The claims are then parsed again
    with L{jsonstrict} (PyJWT's C{json.loads} accepts NaN and duplicate
    keys), and C{exp} (required), C{nbf} and C{iat} must be finite numbers,
    not booleans, strings or null: PyJWT reads C{"exp": "9999999999"} as a
    valid expiry and C{"nbf": true} as 1.

    @param now: the current POSIX time; the wall clock if None.
    @param cache: a L{TokenCache} of tokens verified before, or None.
    @raise TokenError: why the token is refused.
    """
    now = time.time() if now is None else now
    if cache is not None:
        claims = cache.get(token, keys)
        if claims is not None:
            try:
                _checkTimes(claims, now)
            except TokenError:
                cache.discard(token)
                raise
            return claims
    claims, key = _verify(token, keys)
    _checkTimes(claims, now)
    if cache is not None:
        cache.put(token, key, claims)
    return claims


def _verify(token, keys):
    """
    The signature and the claims' shape of C{token}.

    @return: C{(claims, key)}: the claims and the key that signed them.
    """
    options = {"verify_aud": False, "verify_exp": False, "verify_nbf": False,
               "verify_iat": False}
    verified = None
    for key in keys:
        try:
            jwt.decode(token, key, algorithms=["HS256"], options=options)
            verified = key
            break
        except jwt.InvalidSignatureError:
            continue
        except jwt.InvalidTokenError as e:
            raise TokenError(f"malformed token: {e}")
    if verified is None:
        raise TokenError("token not signed by any access key of this hub")
    try:
        claims = jsonstrict.loads(base64url_decode(token.split(".")[1].encode("ascii")))
    except (ValueError, IndexError) as e:
        raise TokenError(f"malformed token claims: {e}")
    if not isinstance(claims, dict):
        raise TokenError("malformed token claims: not an object")
    if "exp" not in claims:
        raise TokenError("token lacks the 'exp' claim")
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name, 0)
        if type(value) not in (int, float) or not math.isfinite(value):
            raise TokenError(f"claim {name!r} must be a number")
    return claims, verified


def _checkTimes(claims, now):
    """
    The time claims of C{claims} (checked for type already) against C{now}:
    on every use, so that a cached token expires with its C{exp}.
    """
    if claims["exp"] <= now - LEEWAY:
        raise TokenError("token expired")
    if claims.get("nbf", now) > now + FUTURE_SKEW:
        raise TokenError("token not yet valid")
    if claims.get("iat", now) > now + FUTURE_SKEW:
        raise TokenError("token issued in the future")


class TokenCache:
    """
    Tokens whose signature and claims were verified, so that a backend
    calling with the same token again (the REST API: one token per URL,
    valid a minute or more) costs a dictionary look-up, not an HMAC and
    three JSON parses.

    Bounded: the C{size} tokens used last are kept (least recently used
    out first), none longer than C{maxLength} characters (a longer one is
    verified on every use), so the cache holds at most C{size *
    maxLength} characters of tokens.  Only tokens that verified are ever stored, so a stream of
    forged tokens cannot fill it.  An entry remembers the key that signed
    it and counts only while that key is still one of the keys asked for:
    a key removed by a reload refuses its tokens at once, and L{clear}
    (called on a reload) drops every entry.  The time claims are checked
    on every use, so an entry expires with its token; an expired one is
    dropped.  Callers must treat the claims returned as read-only: they
    are shared by every use of the token.

    @ivar extra: per-token state a caller may keep beside the claims
        (e.g. the request URL the audience last matched); dropped with
        the entry.
    """

    def __init__(self, size=1024, maxLength=4096):
        self.size = size
        self.maxLength = maxLength
        self._entries = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self):
        return len(self._entries)

    def get(self, token, keys):
        """
        @return: the cached claims of C{token} if one of C{keys} signed it,
            else C{None}.
        """
        entry = self._entries.get(token)
        if entry is None or entry[0] not in keys:
            self.misses += 1
            return None
        self._entries.move_to_end(token)
        self.hits += 1
        return entry[1]

    def put(self, token, key, claims):
        if len(token) > self.maxLength:
            return
        entries = self._entries
        entries[token] = [key, claims, None]
        entries.move_to_end(token)
        while len(entries) > self.size:
            entries.popitem(last=False)

    def extra(self, token):
        """
        The caller's per-token state (C{None} until L{setExtra}).
        """
        entry = self._entries.get(token)
        return None if entry is None else entry[2]

    def setExtra(self, token, value):
        entry = self._entries.get(token)
        if entry is not None:
            entry[2] = value

    def discard(self, token):
        self._entries.pop(token, None)

    def clear(self):
        self._entries.clear()


def makeClientToken(key, audience, userId=None, roles=(), groups=(), lifetime=3600,
                    now=None):
    """
    Sign a client access token, as the Azure SDKs do; used by tests, the
    benchmarks and (later) the REST C{:generateToken} API.
    """
    now = time.time() if now is None else now
    claims = {"aud": audience, "iat": int(now), "exp": int(now + lifetime)}
    if userId is not None:
        claims["sub"] = userId
    if roles:
        claims["role"] = list(roles)
    if groups:
        claims["webpubsub.group"] = list(groups)
    return jwt.encode(claims, key, algorithm="HS256")
