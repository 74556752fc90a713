"""Verified users: a short-lived JWT from the app's backend asserts who the signed-in user is.

A device can claim any user id; only the app's backend knows who signed in. It signs a token (``sub``: the
user id; ``iss``, ``aud`` and ``exp`` as configured for the app) with a shared HS256 secret or its private
key (RS256, ES256, EdDSA: the server holds only the public key), and the app hands it to the SDK. What a
valid token buys, and what a claimed id does not (core/session_lifecycle.py, ingest.py): the user's
subject (``user:<id>``), so journeys, caps and decline memory follow the user across devices; a claimed id
stays with its device and the associate sees it marked unverified. Braze's SDK authentication and
Intercom's identity verification work the same way.

PyJWT checks the signature and the claims' presence; times are checked here against the core's clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import jwt

__all__ = ["ASYMMETRIC", "InvalidUserToken", "UserTokenKey", "verify_user_token"]

# Algorithms a backend may sign with. "none" is never accepted, and a key only accepts its own kind:
# an HS256 secret never verifies an RS256 token and a public key never verifies an HS256 one.
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA")
# Longest token text accepted (a JWT with a few claims is a few hundred bytes).
MAX_TOKEN_LENGTH = 8192


class InvalidUserToken(ValueError):
    """The token does not verify; the message says why, without quoting it."""


@dataclass(frozen=True, slots=True)
class UserTokenKey:
    """How one app's backend signs user tokens (the auth file's ``apps.<id>.user_tokens``)."""

    issuer: str
    audience: str
    # The HS256 secret, or a PEM public key (RS*/PS*/ES*/EdDSA).
    key: str = field(repr=False)
    algorithms: tuple[str, ...] = ("HS256",)
    # Tokens whose exp lies further ahead than this are refused: they are meant to be short-lived.
    max_lifetime: float = 86400.0
    # Clock difference tolerated between the backend and this server.
    leeway: float = 30.0


def verify_user_token(keys: Mapping[str, UserTokenKey], app_id: str, token: str, now: float) -> str:
    """The user id ``token`` asserts for ``app_id``; raises InvalidUserToken."""
    key = keys.get(app_id)
    if key is None:
        raise InvalidUserToken(f"app {app_id!r} has no user token key configured")
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidUserToken("token too long")
    try:
        claims = jwt.decode(
            token,
            key.key,
            algorithms=list(key.algorithms),
            audience=key.audience,
            issuer=key.issuer,
            # Times are checked below against the core's clock (tests drive it by hand).
            options={
                "require": ["exp", "iss", "aud", "sub"],
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except jwt.InvalidAudienceError:
        raise InvalidUserToken("wrong audience") from None
    except jwt.InvalidIssuerError:
        raise InvalidUserToken("wrong issuer") from None
    except jwt.InvalidSignatureError:
        raise InvalidUserToken("bad signature") from None
    except jwt.MissingRequiredClaimError as exc:
        raise InvalidUserToken(f"missing claim {exc.claim!r}") from None
    except jwt.InvalidAlgorithmError:
        raise InvalidUserToken(f"algorithm not allowed; expected one of {list(key.algorithms)}") from None
    except jwt.PyJWTError as exc:
        raise InvalidUserToken(f"malformed token ({type(exc).__name__})") from None
    exp, subject = claims.get("exp"), claims.get("sub")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise InvalidUserToken("exp must be a number")
    if exp <= now - key.leeway:
        raise InvalidUserToken("expired")
    if exp > now + key.max_lifetime + key.leeway:
        raise InvalidUserToken(f"exp more than {key.max_lifetime:g}s ahead: not a short-lived token")
    nbf = claims.get("nbf")
    if isinstance(nbf, int | float) and nbf > now + key.leeway:
        raise InvalidUserToken("not valid yet (nbf)")
    if not isinstance(subject, str) or not subject or len(subject) > 1024:
        raise InvalidUserToken("sub must be the user id")
    return subject
