"""Sign-in through a trusted upstream OpenID Connect provider (issue 11, optional part): the
person signs in there instead of on carecoord's password form.

OpenID Connect Core 1.0 §3.1 (authorization code flow) with PKCE S256 (RFC 7636) and a
``nonce``: carecoord is the provider's confidential client (``CARECOORD_OIDC_CLIENT_ID`` /
``_SECRET``, ``client_secret_basic``), its redirect URI ``{base}/auth/authorize/upstream/callback``.
The provider's endpoints come from its discovery document (OpenID Connect Discovery 1.0 §4; its
``issuer`` must be ``CARECOORD_OIDC_ISSUER`` exactly). The id_token is checked as §3.1.3.7 asks:
signature with a key of the provider's JWK Set (RS256/RS384/ES256/ES384, never ``none`` or
HMAC), ``iss``, ``aud`` containing our client id (``azp`` when several), ``exp``, ``nonce``.

The claim ``CARECOORD_OIDC_USER_CLAIM`` (default ``fhirUser``) names the person's FHIR resource;
the person becomes (or is again) the app_user ``oidc:{sub}`` without a password. A disabled
user stays disabled. Requests to the provider go through the outbound client (its address
policy applies: allow the provider's host in CARECOORD_OUTBOUND_ALLOWLIST if it is private).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import asyncpg
import httpx
from joserfc import jwt
from joserfc.errors import JoseError

from app.auth.jwks import JwksCache, JwksUnavailable
from app.auth.tokens import peek
from app.auth.users import FHIR_USER, User
from app.settings import Settings

logger = logging.getLogger("carecoord.auth")

ID_TOKEN_ALGS = ("RS256", "RS384", "ES256", "ES384")
CLOCK_LEEWAY = 60
METADATA_TTL = 3600.0
CALLBACK_PATH = "/auth/authorize/upstream/callback"


class UpstreamError(Exception):
    """The upstream sign-in failed; ``str(exc)`` is safe to show (no token content)."""


@dataclass(frozen=True)
class UpstreamRequest:
    """What carecoord keeps (in the flow row) between sending the person to the provider and
    the provider sending them back."""

    state: str
    nonce: str
    verifier: str

    def dumps(self) -> str:
        return json.dumps({"state": self.state, "nonce": self.nonce, "verifier": self.verifier})

    @classmethod
    def loads(cls, text: str) -> UpstreamRequest:
        data = json.loads(text)
        return cls(state=data["state"], nonce=data["nonce"], verifier=data["verifier"])


class UpstreamProvider:
    def __init__(self, settings: Settings, http: httpx.AsyncClient, jwks: JwksCache) -> None:
        assert settings.oidc_issuer and settings.oidc_client_id
        self.issuer = settings.oidc_issuer.rstrip("/")
        self.client_id = settings.oidc_client_id
        self.client_secret = settings.oidc_client_secret or ""
        self.claim = settings.oidc_user_claim
        self.scope = settings.oidc_scope
        self.display_name = settings.oidc_display_name
        self.redirect_uri = settings.base_url + CALLBACK_PATH
        self._http = http
        self._jwks = jwks
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0

    @classmethod
    def from_settings(
        cls, settings: Settings, http: httpx.AsyncClient, jwks: JwksCache
    ) -> UpstreamProvider | None:
        if not settings.oidc_issuer or not settings.oidc_client_id:
            return None
        return cls(settings, http, jwks)

    async def metadata(self) -> dict[str, Any]:
        if self._metadata is None or time.monotonic() - self._metadata_at > METADATA_TTL:
            try:
                response = await self._http.get(f"{self.issuer}/.well-known/openid-configuration", timeout=10)
                data = response.json() if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError) as exc:
                raise UpstreamError("the sign-in provider cannot be reached") from exc
            if not isinstance(data, dict) or data.get("issuer", "").rstrip("/") != self.issuer:
                raise UpstreamError("the sign-in provider's discovery document is not usable")
            for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(data.get(name), str):
                    raise UpstreamError("the sign-in provider's discovery document is not usable")
            self._metadata, self._metadata_at = data, time.monotonic()
        return self._metadata

    async def origin(self) -> str | None:
        """The CSP source of the provider's authorization endpoint (the login form posts to us,
        and we redirect there: form-action applies to that redirect)."""
        try:
            endpoint: str = (await self.metadata())["authorization_endpoint"]
        except UpstreamError:
            return None
        scheme, _, rest = endpoint.partition("://")
        return f"{scheme}://{rest.split('/', 1)[0]}"

    async def authorization_url(self, flow_id: str) -> tuple[str, UpstreamRequest]:
        metadata = await self.metadata()
        request = UpstreamRequest(
            state=f"{flow_id}.{secrets.token_urlsafe(24)}",
            nonce=secrets.token_urlsafe(24),
            verifier=secrets.token_urlsafe(48),
        )
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(request.verifier.encode()).digest()).rstrip(b"=").decode()
        )
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.client_id,
                "redirect_uri": self.redirect_uri,
                "scope": self.scope,
                "state": request.state,
                "nonce": request.nonce,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        endpoint = metadata["authorization_endpoint"]
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}", request

    async def finish(self, code: str, request: UpstreamRequest) -> tuple[str, str]:
        """Redeem the provider's code; (subject, fhir_user) from its verified id_token."""
        metadata = await self.metadata()
        try:
            response = await self._http.post(
                metadata["token_endpoint"],
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": self.redirect_uri,
                    "code_verifier": request.verifier,
                },
                auth=(self.client_id, self.client_secret),
                timeout=10,
            )
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise UpstreamError("the sign-in provider did not answer") from exc
        if (
            response.status_code != 200
            or not isinstance(body, dict)
            or not isinstance(body.get("id_token"), str)
        ):
            raise UpstreamError("the sign-in provider refused the sign-in")
        claims = await self._verify(body["id_token"], metadata["jwks_uri"], request.nonce)
        subject = claims.get("sub")
        value = claims.get(self.claim)
        if not isinstance(subject, str) or not subject or not isinstance(value, str):
            raise UpstreamError("the sign-in provider did not say who you are in the records")
        match = FHIR_USER.search(value)
        if match is None or not value.endswith(match.group(0)):
            raise UpstreamError("the sign-in provider named no Practitioner, Patient or RelatedPerson")
        return subject, match.group(0)

    async def _verify(self, token: str, jwks_uri: str, nonce: str) -> dict[str, Any]:
        try:
            header, _ = peek(token)
        except Exception as exc:
            raise UpstreamError("the sign-in provider's id_token is malformed") from exc
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ID_TOKEN_ALGS or not isinstance(kid, str):
            raise UpstreamError("the sign-in provider's id_token is not signed acceptably")
        try:
            key = await self._jwks.key(jwks_uri, kid, alg)
        except JwksUnavailable as exc:
            raise UpstreamError("the sign-in provider's keys cannot be fetched") from exc
        if key is None:
            raise UpstreamError("the sign-in provider's id_token is signed with an unknown key")
        try:
            claims: dict[str, Any] = dict(jwt.decode(token, key, algorithms=[alg]).claims)
        except JoseError as exc:
            raise UpstreamError("the sign-in provider's id_token signature is invalid") from exc
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        now = time.time()
        exp = claims.get("exp")
        if claims.get("iss", "").rstrip("/") != self.issuer:
            raise UpstreamError("the id_token is from another issuer")
        if self.client_id not in audiences or (len(audiences) > 1 and claims.get("azp") != self.client_id):
            raise UpstreamError("the id_token is for another client")
        if not isinstance(exp, int | float) or isinstance(exp, bool) or exp + CLOCK_LEEWAY < now:
            raise UpstreamError("the id_token has expired")
        if not isinstance(claims.get("nonce"), str) or not secrets.compare_digest(claims["nonce"], nonce):
            raise UpstreamError("the id_token does not belong to this sign-in")
        return claims


async def upstream_user(db: asyncpg.Pool | asyncpg.Connection, subject: str, fhir_user: str) -> User:
    """The app_user ``oidc:{sub}`` (created at first sign-in; its FHIR resource follows the
    provider's claim); no password, so it can sign in through the provider only."""
    from app.auth.users import _user

    username = f"oidc:{subject[:200]}"
    row = await db.fetchrow(
        "INSERT INTO app_user (user_id, username, fhir_user) VALUES ($1, $2, $3)"
        " ON CONFLICT (username) DO UPDATE SET fhir_user = EXCLUDED.fhir_user"
        " RETURNING user_id, username, fhir_user, password_hash, disabled, created",
        str(uuid.uuid4()),
        username,
        fhir_user,
    )
    assert row is not None
    return _user(row)
