# -*- test-case-name: tests.test_tokens -*-
"""
Web PubSub client access tokens: HS256 JWTs signed with a hub's access key.

The claims are Azure's: C{aud} is the client URL (C{{endpoint}/client/hubs/
{hub}}), C{exp} the expiry, C{sub} the userId, C{role} the roles and
C{webpubsub.group} the groups to join at connect.  Any of the hub's keys may
have signed the token, so keys can be rotated without dropping clients.
"""

from urllib.parse import urlsplit

import jwt

# Clock skew tolerated on exp / nbf / iat, in seconds.
LEEWAY = 5


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


def audienceMatches(aud, hub, origins=()):
    """
    Whether C{aud} names the client endpoint of C{hub}.

    The path must be C{/client/hubs/<hub>} (hub names compare without case, as
    in Azure).  When C{origins} is not empty the scheme and host must be one
    of them (C{ws}/C{wss} are treated as C{http}/C{https}).
    """
    if not isinstance(aud, str):
        return False
    parts = urlsplit(aud)
    path = parts.path.rstrip("/")
    if path.lower() != f"/client/hubs/{hub}".lower():
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


def verifyClientToken(token, keys, hub, origins=(), now=None):
    """
    Verify a client access token for C{hub}.

    @param keys: the access keys (str) that may have signed it.
    @param origins: accepted audience origins; empty accepts any.
    @param now: the current POSIX time, for tests; the wall clock if None.
    @return: L{ClientClaims}.
    @raise TokenError: why the token is refused.
    """
    if not token:
        raise TokenError("no access token")
    if not keys:
        raise TokenError(f"hub {hub!r} has no access key configured")
    options = {"require": ["exp"], "verify_aud": False}
    claims = None
    for key in keys:
        try:
            if now is None:
                claims = jwt.decode(token, key, algorithms=["HS256"], options=options,
                                    leeway=LEEWAY)
            else:
                claims = _decodeAt(token, key, options, now)
            break
        except jwt.InvalidSignatureError:
            continue
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired")
        except jwt.ImmatureSignatureError:
            raise TokenError("token not yet valid")
        except jwt.MissingRequiredClaimError as e:
            raise TokenError(f"token lacks the {e.claim!r} claim")
        except jwt.InvalidTokenError as e:
            raise TokenError(f"malformed token: {e}")
    if claims is None:
        raise TokenError("token not signed by any access key of this hub")
    aud = claims.get("aud")
    auds = aud if isinstance(aud, list) else [aud]
    if not any(audienceMatches(a, hub, origins) for a in auds):
        raise TokenError(f"token audience {aud!r} is not this hub's client endpoint")
    sub = claims.get("sub")
    if sub is not None and (not isinstance(sub, str) or not sub):
        raise TokenError("claim 'sub' must be a non-empty string")
    return ClientClaims(sub, _strings(claims, "role"), _strings(claims, "webpubsub.group"))


def _decodeAt(token, key, options, now):
    """
    Decode with the time claims checked against C{now} rather than the wall
    clock (PyJWT has no clock parameter).
    """
    claims = jwt.decode(token, key, algorithms=["HS256"],
                        options=dict(options, verify_exp=False, verify_nbf=False,
                                     verify_iat=False))
    if "exp" not in claims:
        raise jwt.MissingRequiredClaimError("exp")
    try:
        exp = float(claims["exp"])
        nbf = float(claims.get("nbf", now))
    except (TypeError, ValueError):
        raise jwt.InvalidTokenError("exp/nbf must be numbers")
    if exp <= now - LEEWAY:
        raise jwt.ExpiredSignatureError()
    if nbf > now + LEEWAY:
        raise jwt.ImmatureSignatureError()
    return claims


def makeClientToken(key, audience, userId=None, roles=(), groups=(), lifetime=3600,
                    now=None):
    """
    Sign a client access token, as the Azure SDKs do; used by tests, the
    benchmarks and (later) the REST C{:generateToken} API.
    """
    import time

    now = time.time() if now is None else now
    claims = {"aud": audience, "iat": int(now), "exp": int(now + lifetime)}
    if userId is not None:
        claims["sub"] = userId
    if roles:
        claims["role"] = list(roles)
    if groups:
        claims["webpubsub.group"] = list(groups)
    return jwt.encode(claims, key, algorithm="HS256")
