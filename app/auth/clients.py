"""Registered OAuth clients (``oauth_client``): registration, lookup, secrets.

Two kinds (RFC 6749 §2.3, SMART Backend Services):

* secret clients authenticate with ``client_secret_basic`` or ``client_secret_post``; the
  server generates the secret (256 bits), shows it once and stores only a salted scrypt hash;
* asymmetric clients authenticate with ``private_key_jwt``; they register a public JWK Set,
  either inline (stored here) or as a ``jwks_url`` fetched when needed.

App clients (SMART App Launch, issue 11) register exact ``redirect_uris`` and sign people in at
/auth/authorize; a *public* app client (a mobile or browser app, which cannot keep a secret) has
no secret and must use PKCE S256 (RFC 7636, RFC 8252 §8.1); a confidential one authenticates
with its secret as above.

A client may carry an organisation (``Organization/ID``: its tokens get ``organization``) or a
patient (its tokens get ``patient`` and only ``patient/`` scopes). A client registered with
``introspection`` may introspect tokens issued to other clients (RFC 7662 §4; a resource server);
any other client learns about its own tokens only.

Removing a client revokes its access tokens: app/auth/tokens.py checks, on every verification,
that the token's client is still registered (the answer cached for a few seconds per process).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import re
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from app.auth.scopes import looks_like_resource_scope, parse_resource_scope, parse_scope, restriction_problem

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_ORGANIZATION = re.compile(r"Organization/[A-Za-z0-9\-.]{1,64}")
_COLUMNS = (
    "client_id, name, secret_hash, scopes, organization, patient, jwks, jwks_url, introspection, created,"
    " redirect_uris, public"
)
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_PRIVATE_SCHEME = re.compile(r"[a-z][a-z0-9+\-]*(\.[a-z0-9+\-]+)+")
MAX_REDIRECT_URIS = 10


class ClientRegistrationError(ValueError):
    """The registration request is not acceptable (the message says why)."""


@dataclass(frozen=True)
class Client:
    client_id: str
    name: str
    scopes: str
    organization: str | None
    patient: str | None
    secret_hash: str | None
    jwks: str | None
    jwks_url: str | None
    created: datetime | None = None
    introspection: bool = False
    """May introspect tokens issued to other clients (RFC 7662 §4)."""
    redirect_uris: tuple[str, ...] = ()
    """Exact redirect URIs of an app client (RFC 6749 §3.1.2; none: no authorization code flow)."""
    public: bool = False
    """A public app client: no secret, PKCE S256 (RFC 7636)."""

    @property
    def auth_method(self) -> str:
        if self.public:
            return "none"
        return "client_secret" if self.secret_hash else "private_key_jwt"

    def summary(self) -> dict[str, Any]:
        """What may be shown about a client (no secret hash, no keys)."""
        return {
            "client_id": self.client_id,
            "name": self.name,
            "scope": self.scopes,
            "organization": self.organization,
            "patient": self.patient,
            "auth": self.auth_method,
            "jwks_url": self.jwks_url,
            "introspection": self.introspection,
            "redirect_uris": list(self.redirect_uris),
            "public": self.public,
            "created": self.created.isoformat() if self.created else None,
        }


def hash_secret(secret: str) -> str:
    """``scrypt$n$r$p$salt$hash`` (base64url), a fresh 16-byte salt each time."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    return "$".join(("scrypt", str(_SCRYPT_N), str(_SCRYPT_R), str(_SCRYPT_P), _b64(salt), _b64(digest)))


def verify_secret(secret: str, stored: str) -> bool:
    """Constant-time comparison of ``secret`` against a :func:`hash_secret` value."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(digest)
        actual = hashlib.scrypt(
            secret.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


@functools.cache
def _dummy_hash() -> str:
    """Checked against when the client is unknown, so that timing does not tell which ids exist."""
    return hash_secret(secrets.token_urlsafe(16))


async def check_secret(client: Client | None, secret: str) -> bool:
    """Whether ``secret`` is ``client``'s; scrypt runs in a thread (it takes tens of ms on purpose)."""
    stored = client.secret_hash if client is not None and client.secret_hash else _dummy_hash()
    matches = await asyncio.to_thread(verify_secret, secret, stored)
    return matches and client is not None and client.secret_hash is not None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def parse_client_jwks(value: str | Mapping[str, Any]) -> KeySet:
    """A client's public JWK Set: RSA or EC keys, each with a ``kid``, no private parts."""
    try:
        data = json.loads(value) if isinstance(value, str) else dict(value)
    except ValueError as exc:
        raise ClientRegistrationError("the JWKS is not JSON") from exc
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ClientRegistrationError('the JWKS needs a non-empty "keys" list')
    for jwk in keys:
        if not isinstance(jwk, dict) or jwk.get("kty") not in ("RSA", "EC"):
            raise ClientRegistrationError("JWKS keys must be RSA or EC keys")
        if not isinstance(jwk.get("kid"), str) or not jwk["kid"]:
            raise ClientRegistrationError('every JWKS key needs a "kid"')
        if "d" in jwk:
            raise ClientRegistrationError(
                "the JWKS holds private key material: register the public keys only"
            )
    try:
        return KeySet.import_key_set({"keys": keys})
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise ClientRegistrationError("the JWKS keys cannot be read") from exc


def redirect_uri_problem(uri: str) -> str | None:
    """Why ``uri`` cannot be registered as a redirect URI, or None.

    RFC 6749 §3.1.2: absolute, no fragment. RFC 8252 (native apps) and the OAuth 2.0 security
    BCP: ``https``; ``http`` only to a loopback address; or a private-use scheme in reverse
    domain form (``org.example.app:/callback``). No wildcards: redirect URIs match exactly.
    """
    if len(uri) > 2000 or any(ch.isspace() for ch in uri):
        return "too long or contains spaces"
    if "#" in uri:
        return "a redirect URI may not have a fragment"
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "https":
        return None if parts.netloc else "needs a host"
    if scheme == "http":
        host = parts.netloc.rsplit("@", 1)[-1]
        host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if host in _LOOPBACK_HOSTS:
            return None
        return "http is allowed for loopback addresses only (127.0.0.1, [::1], localhost); use https"
    if _PRIVATE_SCHEME.fullmatch(scheme):
        return None
    return "must be https, http on loopback, or a private-use scheme such as org.example.app:/callback"


def _validate(
    *,
    name: str,
    scope: str,
    organization: str | None,
    patient: str | None,
    jwks: str | Mapping[str, Any] | None,
    jwks_url: str | None,
    redirect_uris: Sequence[str] = (),
    public: bool = False,
) -> None:
    if not name.strip():
        raise ClientRegistrationError("a client needs a name")
    scopes = scope.split()
    if not scopes:
        raise ClientRegistrationError("a client needs at least one scope")
    for item in scopes:
        if looks_like_resource_scope(item) and parse_resource_scope(item) is None:
            raise ClientRegistrationError(f"not a SMART resource scope: {item}")
        parsed = parse_resource_scope(item)
        if parsed is not None and parsed.query is not None:
            permission = parse_scope(item)
            if permission is None:
                raise ClientRegistrationError(
                    f"malformed scope restriction (v2 scopes only, ?param=value&...): {item}"
                )
            problem = restriction_problem(parsed.resource_type, permission.restriction)
            if problem is not None:
                raise ClientRegistrationError(f"scope restriction not allowed in {item}: {problem}")
        if patient is None and item.startswith("patient/") and not redirect_uris:
            # An app client gets its patient context at launch (launch/patient, a patient user).
            raise ClientRegistrationError(
                "patient/ scopes need a patient context (--patient, or an app client with --redirect-uri)"
            )
        if patient is not None and looks_like_resource_scope(item) and not item.startswith("patient/"):
            raise ClientRegistrationError("a client registered for a patient gets patient/ scopes only")
    if organization is not None and not _ORGANIZATION.fullmatch(organization):
        raise ClientRegistrationError("organization must look like Organization/ID")
    if patient is not None and not _FHIR_ID.fullmatch(patient):
        raise ClientRegistrationError("patient must be a Patient id")
    if jwks is not None and jwks_url is not None:
        raise ClientRegistrationError("give a JWKS or a JWKS URL, not both")
    if jwks_url is not None and not jwks_url.startswith(("https://", "http://")):
        raise ClientRegistrationError("the JWKS URL must be an http(s) URL")
    if public and not redirect_uris:
        raise ClientRegistrationError("a public client signs people in: give at least one --redirect-uri")
    if public and any(value is not None for value in (jwks, jwks_url, patient, organization)):
        raise ClientRegistrationError(
            "a public client has no credentials and no fixed patient or organization"
        )
    if len(redirect_uris) > MAX_REDIRECT_URIS:
        raise ClientRegistrationError(f"at most {MAX_REDIRECT_URIS} redirect URIs")
    for uri in redirect_uris:
        problem = redirect_uri_problem(uri)
        if problem is not None:
            raise ClientRegistrationError(f"redirect URI {uri[:200]!r}: {problem}")


async def register_client(
    db: asyncpg.Pool | asyncpg.Connection,
    *,
    name: str,
    scope: str,
    organization: str | None = None,
    patient: str | None = None,
    jwks: str | Mapping[str, Any] | None = None,
    jwks_url: str | None = None,
    introspection: bool = False,
    redirect_uris: Sequence[str] = (),
    public: bool = False,
) -> tuple[str, str | None]:
    """Register a client; returns ``(client_id, client_secret)``, the secret None for JWKS and
    public clients.

    ``patient`` may be given as ``ID`` or ``Patient/ID``; ``introspection`` lets the client
    introspect other clients' tokens. Raises :class:`ClientRegistrationError`.
    """
    if patient is not None and patient.startswith("Patient/"):
        patient = patient.removeprefix("Patient/")
    _validate(
        name=name,
        scope=scope,
        organization=organization,
        patient=patient,
        jwks=jwks,
        jwks_url=jwks_url,
        redirect_uris=redirect_uris,
        public=public,
    )
    if public and introspection:
        raise ClientRegistrationError("a public client cannot introspect tokens")
    jwks_text: str | None = None
    if jwks is not None:
        jwks_text = json.dumps(parse_client_jwks(jwks).as_dict(private=False))
    secret: str | None = None
    secret_hash: str | None = None
    if jwks is None and jwks_url is None and not public:
        # Never a leading '-': a secret pasted into a command line must not read as an option.
        secret = "s" + secrets.token_urlsafe(32)
        secret_hash = await asyncio.to_thread(hash_secret, secret)
    client_id = str(uuid.uuid4())
    await db.execute(
        "INSERT INTO oauth_client"
        " (client_id, name, secret_hash, scopes, organization, patient, jwks, jwks_url, introspection,"
        " redirect_uris, public) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        client_id,
        name.strip(),
        secret_hash,
        " ".join(scope.split()),
        organization,
        patient,
        jwks_text,
        jwks_url,
        introspection,
        list(dict.fromkeys(redirect_uris)),
        public,
    )
    return client_id, secret


def _client(row: Mapping[str, Any]) -> Client:
    return Client(
        client_id=row["client_id"],
        name=row["name"],
        scopes=row["scopes"],
        organization=row["organization"],
        patient=row["patient"],
        secret_hash=row["secret_hash"],
        jwks=row["jwks"],
        jwks_url=row["jwks_url"],
        created=row["created"],
        introspection=bool(row["introspection"]),
        redirect_uris=tuple(row["redirect_uris"] or ()),
        public=bool(row["public"]),
    )


async def get_client(db: asyncpg.Pool | asyncpg.Connection, client_id: str) -> Client | None:
    row = await db.fetchrow(f"SELECT {_COLUMNS} FROM oauth_client WHERE client_id = $1", client_id)  # noqa: S608
    return _client(row) if row is not None else None


async def list_clients(db: asyncpg.Pool | asyncpg.Connection) -> list[Client]:
    rows = await db.fetch(f"SELECT {_COLUMNS} FROM oauth_client ORDER BY created, client_id")  # noqa: S608
    return [_client(row) for row in rows]


async def remove_client(db: asyncpg.Pool | asyncpg.Connection, client_id: str) -> bool:
    """Delete a client. Its access tokens stop verifying within
    tokens.CLIENT_CHECK_INTERVAL seconds in every process (the registration check of
    TokenService.verify), long before they expire."""
    status: str = await db.execute("DELETE FROM oauth_client WHERE client_id = $1", client_id)
    if not status.endswith(" 1"):
        return False
    # Its subscriptions' websocket bindings (app/subscriptions/websocket.py) look again at once
    # and end, rather than at their next periodic check.
    await db.execute(
        "SELECT pg_notify('subscription_events', fhir_id) FROM subscription"
        " WHERE owner_client = $1 AND channel_type = 'websocket'",
        client_id,
    )
    return True
