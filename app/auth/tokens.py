"""Access tokens: issue (our JWTs) and verify (ours and trusted issuers'), with a hot-path cache.

Our tokens are JWT access tokens (RFC 9068 shape, ``typ: at+jwt``) signed ES256 with the
current key of app/auth/keys.py: ``iss`` = the server root (``settings.base_url``), ``aud`` =
the FHIR base, ``sub`` = ``client_id``, ``scope``, ``iat``, ``exp``, ``jti``, plus ``patient``
(a Patient id) and ``organization`` (``Organization/ID``) when the client has them.

Tokens of an external issuer listed in ``settings.trusted_issuers`` are verified against that
issuer's JWK Set (app/auth/jwks.py) with its audience; their claims are mapped onto
:class:`TokenClaims` (scope from ``scope`` or ``scp``; client from ``client_id``, ``azp`` or
``sub``; ``patient``; ``organization`` or ``fhirOrganization``).

Verification checks, in order: shape and size, issuer known, ``alg`` the one expected for that
issuer (never ``none``, never HMAC), ``kid`` known, signature, ``iss``, ``aud``, ``exp``/``nbf``
(``CLOCK_LEEWAY`` seconds of skew). A verified token is cached by its exact text until it
expires, so the request path pays a dict lookup per request, not a signature check.

Revocation: every verification of one of our tokens, cache hits included, also checks that
the token's client is still in ``oauth_client`` (:class:`RegisteredClients`). The answer is
cached per client for ``CLIENT_CHECK_INTERVAL`` seconds, so the request path almost always
pays a dict lookup, and ``carecoord clients remove`` takes effect in every process within
those seconds without any signalling between processes. Tokens of trusted external issuers
are not ours and their clients are not registered here: they are not checked.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import Key

from app.auth.jwks import JwksCache, JwksUnavailable
from app.auth.keys import SIGNING_ALG, SigningKeys
from app.settings import Settings

EXTERNAL_ALGS = frozenset({"RS256", "RS384", "ES256", "ES384"})
CLOCK_LEEWAY = 15
MAX_TOKEN_LENGTH = 8192
CACHE_SIZE = 10_000
CLIENT_CHECK_INTERVAL = 5.0
"""Seconds a process trusts its last answer to "is this client still registered?": the longest a
removed client's tokens keep working (issue 15)."""
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_REFERENCE = re.compile(r"(?:.*/)?(?P<type>Patient|Organization)/(?P<id>[A-Za-z0-9\-.]{1,64})")


@dataclass(frozen=True)
class TokenClaims:
    """What a verified access token grants; the request path's view of the caller."""

    client_id: str
    scope: str  # space-separated granted scopes
    issuer: str
    subject: str
    expires_at: int  # epoch seconds
    patient: str | None = None  # Patient id (not "Patient/id")
    organization: str | None = None  # "Organization/ID"
    token_id: str | None = None  # jti
    issued_at: int | None = None  # iat, when the token has one
    fhir_user: str | None = None
    """``Practitioner/ID``, ``Patient/ID`` or ``RelatedPerson/ID``: the person a user token
    (SMART App Launch, claim ``fhirUser``) acts for; None for a machine client."""
    external: bool = False
    """Issued by a trusted external issuer (CARECOORD_TRUSTED_ISSUERS), not by this server: its
    client id is the issuer's, not one registered here."""


class InvalidToken(Exception):
    """The token is not acceptable; ``str(exc)`` is a short reason without token content."""


@dataclass(frozen=True)
class TrustedIssuer:
    issuer: str
    jwks_url: str
    audience: str


def trusted_issuers(settings: Settings) -> list[TrustedIssuer]:
    return [
        TrustedIssuer(
            issuer=entry["issuer"],
            jwks_url=entry["jwks_url"],
            audience=entry.get("audience") or settings.fhir_base,
        )
        for entry in settings.trusted_issuers
    ]


def _b64_json(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a compact JWS, NOT verified (to choose the issuer and key)."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidToken("token too large")
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("malformed token")
    try:
        header = _b64_json(parts[0])
        claims = _b64_json(parts[1])
    except (ValueError, binascii.Error) as exc:
        raise InvalidToken("malformed token") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise InvalidToken("malformed token")
    return header, claims


def _audience_matches(aud: object, expected: str) -> bool:
    if isinstance(aud, str):
        return aud == expected
    return isinstance(aud, list) and expected in aud


def _int_claim(claims: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    value = claims.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"missing or invalid {name}")
    return int(value)


_PERSON = re.compile(r"(?:.*/)?(?P<ref>(?:Practitioner|Patient|RelatedPerson)/[A-Za-z0-9\-.]{1,64})")


def _person(value: object) -> str | None:
    """``Type/id`` of a ``fhirUser`` claim (SMART App Launch: a relative or absolute reference to a
    Practitioner, Patient or RelatedPerson); None when absent, InvalidToken when malformed."""
    if value is None:
        return None
    match = _PERSON.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidToken("invalid fhirUser claim")
    return match["ref"]


def _reference_id(value: object, resource_type: str) -> str:
    """A Patient/Organization id from a bare id, ``Type/id`` or an absolute reference."""
    if not isinstance(value, str):
        raise InvalidToken(f"invalid {resource_type.lower()} claim")
    match = _REFERENCE.fullmatch(value)
    if match is not None and match["type"] == resource_type:
        return match["id"]
    if _FHIR_ID.fullmatch(value):
        return value
    raise InvalidToken(f"invalid {resource_type.lower()} claim")


def _external_scope(claims: Mapping[str, Any]) -> str:
    scope = claims.get("scope", claims.get("scp"))
    if isinstance(scope, str):
        return " ".join(scope.split())
    if isinstance(scope, list) and all(isinstance(item, str) for item in scope):
        return " ".join(scope)
    if scope is None:
        return ""
    raise InvalidToken("invalid scope claim")


class RegisteredClients:
    """Whether a client id is (still) in ``oauth_client``, each answer cached for ``interval``
    seconds; concurrent misses for one client share one query."""

    def __init__(
        self, pool: asyncpg.Pool, *, interval: float = CLIENT_CHECK_INTERVAL, max_size: int = CACHE_SIZE
    ) -> None:
        self._pool = pool
        self._interval = interval
        self._max_size = max_size
        self._answers: dict[str, tuple[bool, float]] = {}  # client_id -> (registered, valid until)
        self._pending: dict[str, asyncio.Future[bool]] = {}

    def cached(self, client_id: str) -> bool | None:
        """The cached answer, or None when there is none younger than the interval."""
        answer = self._answers.get(client_id)
        if answer is None or time.monotonic() >= answer[1]:
            return None
        return answer[0]

    async def is_registered(self, client_id: str) -> bool:
        answer = self.cached(client_id)
        if answer is not None:
            return answer
        pending = self._pending.get(client_id)
        if pending is None:
            pending = asyncio.ensure_future(self._load(client_id))
            self._pending[client_id] = pending

            def done(future: asyncio.Future[bool], client_id: str = client_id) -> None:
                if self._pending.get(client_id) is future:
                    del self._pending[client_id]
                if not future.cancelled():
                    future.exception()  # retrieved: raised to every waiter, never logged as lost

            pending.add_done_callback(done)
        # Shielded: a cancelled request must not cancel the query the others wait for.
        return await asyncio.shield(pending)

    async def _load(self, client_id: str) -> bool:
        valid_until = time.monotonic() + self._interval  # from before the query: never too long
        found = await self._pool.fetchval("SELECT true FROM oauth_client WHERE client_id = $1", client_id)
        if len(self._answers) >= self._max_size:
            now = time.monotonic()
            for stale in [key for key, (_, until) in self._answers.items() if until <= now]:
                del self._answers[stale]
            if len(self._answers) >= self._max_size:
                self._answers.clear()
        registered = found is not None
        self._answers[client_id] = (registered, valid_until)
        return registered


class TokenService:
    """Issues our access tokens and verifies ours and trusted issuers'. Built once per process."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        ttl: int,
        keys: SigningKeys,
        jwks: JwksCache,
        clients: RegisteredClients,
        trusted: Sequence[TrustedIssuer] = (),
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.ttl = ttl
        self.keys = keys
        self.jwks = jwks
        self.clients = clients
        self._trusted = {entry.issuer: entry for entry in trusted if entry.issuer != issuer}
        self._cache: dict[str, TokenClaims] = {}
        self._cache_size = cache_size

    async def issue(
        self,
        *,
        client_id: str,
        scope: str,
        patient: str | None = None,
        organization: str | None = None,
        fhir_user: str | None = None,
    ) -> tuple[str, int]:
        """Sign an access token for ``client_id``; returns (jwt, expires_in seconds).

        No checks: the caller (the token endpoint, or a test) has decided what to grant. The
        token verifies only while ``client_id`` is a registered client.
        """
        signing = await self.keys.signing_key()
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": client_id,
            "client_id": client_id,
            "scope": scope,
            "iat": now,
            "exp": now + self.ttl,
            "jti": secrets.token_urlsafe(16),
        }
        if patient is not None:
            claims["patient"] = patient
        if organization is not None:
            claims["organization"] = organization
        if fhir_user is not None:
            claims["fhirUser"] = fhir_user
        header = {"alg": SIGNING_ALG, "kid": signing.kid, "typ": "at+jwt"}
        token = jwt.encode(header, claims, signing.key, algorithms=[SIGNING_ALG])
        return token, self.ttl

    async def verify(self, token: str) -> TokenClaims:
        """The claims of a valid token; raises :class:`InvalidToken` otherwise (also when the
        token is ours and its client has been removed)."""
        claims = self._cache.get(token)
        if claims is not None:
            if time.time() >= claims.expires_at + CLOCK_LEEWAY:
                del self._cache[token]
                raise InvalidToken("token expired")
        else:
            claims = await self._verify(token)
            if len(self._cache) >= self._cache_size:
                self._evict()
            self._cache[token] = claims
        if claims.issuer == self.issuer:
            registered = self.clients.cached(claims.client_id)
            if registered is None:
                registered = await self.clients.is_registered(claims.client_id)
            if not registered:
                raise InvalidToken("the token's client is not registered")
        return claims

    def _evict(self) -> None:
        now = time.time()
        expired = [token for token, claims in self._cache.items() if now >= claims.expires_at + CLOCK_LEEWAY]
        for token in expired:
            del self._cache[token]
        # Still full: drop the oldest tenth (insertion order), a cache miss only costs a verify.
        if len(self._cache) >= self._cache_size:
            for token in list(self._cache)[: max(1, self._cache_size // 10)]:
                del self._cache[token]

    async def _verify(self, token: str) -> TokenClaims:
        header, unverified = peek(token)
        alg = header.get("alg")
        kid = header.get("kid")
        issuer = unverified.get("iss")
        key: Key | None
        if issuer == self.issuer:
            if alg != SIGNING_ALG:
                raise InvalidToken("unexpected signing algorithm")
            if not isinstance(kid, str):
                raise InvalidToken("unknown signing key")
            key = await self.keys.verification_key(kid)
            audience = self.audience
        elif isinstance(issuer, str) and issuer in self._trusted:
            trusted = self._trusted[issuer]
            if alg not in EXTERNAL_ALGS:
                raise InvalidToken("unexpected signing algorithm")
            if not isinstance(kid, str):
                raise InvalidToken("unknown signing key")
            try:
                key = await self.jwks.key(trusted.jwks_url, kid, alg)
            except JwksUnavailable as exc:
                raise InvalidToken("issuer keys unavailable") from exc
            audience = trusted.audience
        else:
            raise InvalidToken("untrusted issuer")
        if key is None:
            raise InvalidToken("unknown signing key")
        try:
            claims = jwt.decode(token, key, algorithms=[alg]).claims
        except JoseError as exc:
            raise InvalidToken("invalid signature") from exc
        if claims.get("iss") != issuer:  # pragma: no cover - same bytes as peeked
            raise InvalidToken("wrong issuer")
        if not _audience_matches(claims.get("aud"), audience):
            raise InvalidToken("wrong audience")
        now = time.time()
        expires_at = _int_claim(claims, "exp", required=True)
        assert expires_at is not None
        if now >= expires_at + CLOCK_LEEWAY:
            raise InvalidToken("token expired")
        not_before = _int_claim(claims, "nbf", required=False)
        if not_before is not None and now + CLOCK_LEEWAY < not_before:
            raise InvalidToken("token not yet valid")
        issued_at = _int_claim(claims, "iat", required=False)
        if issuer == self.issuer:
            return self._our_claims(claims, expires_at, issued_at)
        return self._external_claims(claims, issuer, expires_at, issued_at)

    def _our_claims(self, claims: Mapping[str, Any], expires_at: int, issued_at: int | None) -> TokenClaims:
        client_id, scope, subject = claims.get("client_id"), claims.get("scope"), claims.get("sub")
        if not isinstance(client_id, str) or not isinstance(scope, str) or not isinstance(subject, str):
            raise InvalidToken("token lacks client_id, scope or sub")
        patient, organization, jti = claims.get("patient"), claims.get("organization"), claims.get("jti")
        fhir_user = claims.get("fhirUser")
        return TokenClaims(
            client_id=client_id,
            scope=scope,
            issuer=self.issuer,
            subject=subject,
            expires_at=expires_at,
            patient=patient if isinstance(patient, str) else None,
            organization=organization if isinstance(organization, str) else None,
            token_id=jti if isinstance(jti, str) else None,
            issued_at=issued_at,
            fhir_user=fhir_user if isinstance(fhir_user, str) else None,
        )

    @staticmethod
    def _external_claims(
        claims: Mapping[str, Any], issuer: str, expires_at: int, issued_at: int | None
    ) -> TokenClaims:
        client_id = next(
            (claims[name] for name in ("client_id", "azp", "sub") if isinstance(claims.get(name), str)), None
        )
        if client_id is None:
            raise InvalidToken("token names no client")
        subject = claims.get("sub")
        patient = claims.get("patient")
        organization = claims.get("organization", claims.get("fhirOrganization"))
        jti = claims.get("jti")
        scope = _external_scope(claims)
        fhir_user = _person(claims.get("fhirUser"))
        if fhir_user is None and any(s.startswith("user/") for s in scope.split()):
            # user/ permissions are limited by the person they act for (app/fhir/access.py): one
            # that names nobody would act as no-one in particular, i.e. see every patient.
            raise InvalidToken("a token with user/ scopes must name its person (fhirUser)")
        return TokenClaims(
            client_id=client_id,
            scope=scope,
            issuer=issuer,
            subject=subject if isinstance(subject, str) else client_id,
            expires_at=expires_at,
            patient=_reference_id(patient, "Patient") if patient is not None else None,
            organization=(
                "Organization/" + _reference_id(organization, "Organization")
                if organization is not None
                else None
            ),
            token_id=jti if isinstance(jti, str) else None,
            issued_at=issued_at,
            fhir_user=fhir_user,
            external=True,
        )


async def build_token_service(
    settings: Settings, pool: asyncpg.Pool, http_client: httpx.AsyncClient
) -> TokenService:
    """The process's TokenService: signing keys loaded (created or rotated if due) from the database."""
    keys = SigningKeys(pool, max_age=settings.signing_key_max_age, token_ttl=settings.token_ttl)
    await keys.maintain()
    return TokenService(
        issuer=settings.base_url,
        audience=settings.fhir_base,
        ttl=settings.token_ttl,
        keys=keys,
        jwks=JwksCache(http_client),
        clients=RegisteredClients(pool),
        trusted=trusted_issuers(settings),
    )
