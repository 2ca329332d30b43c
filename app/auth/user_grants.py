"""Token endpoint grants for people (SMART App Launch 2.x app-launch.html §Obtain access token,
§Refresh access token; RFC 6749 §4.1.3, §6; RFC 7636 §4.6; RFC 7009; OpenID Connect Core §3.1.3).

* ``authorization_code``: the code (from app/auth/authorize.py) is redeemed once, by the client
  it was issued to, with the same ``redirect_uri`` and a ``code_verifier`` whose S256 hash is the
  challenge. A second use of a code revokes the refresh tokens issued with it (RFC 6749 §4.1.2).
  The answer: ``access_token`` (with ``fhirUser``, and ``patient`` in a patient context),
  ``expires_in``, ``scope``, ``patient``, ``refresh_token`` for ``offline_access`` or
  ``online_access``, ``id_token`` for ``openid`` (with ``fhirUser`` when asked).
* ``refresh_token``: rotation. Each use returns a new refresh token and retires the old one; a
  retired token presented again means it leaked, and the whole family (every token descended
  from that sign-in) is revoked (OAuth 2.0 Security BCP §4.14.2). A disabled or removed user
  gets nothing.
* revocation (RFC 7009): a refresh token revokes its family. Access tokens are short-lived JWTs
  (CARECOORD_TOKEN_TTL) that this server does not track: revoking one is answered
  ``unsupported_token_type`` (RFC 7009 §2.2.1), and the refresh token is what an app revokes.

Codes and refresh tokens are random 256-bit strings stored as SHA-256 hashes.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
from joserfc import jwt

from app.auth.audit import AuditTrail
from app.auth.auth_events import auth_event
from app.auth.authorize import code_hash, pkce_challenge, record_auth_event
from app.auth.clients import Client
from app.auth.keys import ID_TOKEN_ALG
from app.auth.tokens import TokenService
from app.auth.users import User, get_user
from app.settings import Settings

logger = logging.getLogger("carecoord.auth")

_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
"""RFC 7636 §4.1: code_verifier = 43*128unreserved."""


class GrantError(Exception):
    """An RFC 6749 §5.2 error of these grants (server.py turns it into its OAuthError)."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


@dataclass(frozen=True)
class Grant:
    """What a code or refresh token stands for."""

    client_id: str
    scope: str
    user: User
    patient: str | None
    family: str
    nonce: str | None = None


class UserGrants:
    def __init__(
        self, *, settings: Settings, pool: asyncpg.Pool, tokens: TokenService, audit: AuditTrail | None
    ) -> None:
        self.pool = pool
        self.tokens = tokens
        self.audit = audit
        self.issuer = settings.base_url
        self.fhir_base = settings.fhir_base
        self.refresh_ttl = timedelta(seconds=settings.refresh_token_ttl)
        self.online_refresh_ttl = timedelta(seconds=settings.online_refresh_token_ttl)

    # --- authorization_code ------------------------------------------------------------------

    async def authorization_code(
        self, form: Mapping[str, str], client: Client, address: str | None
    ) -> dict[str, Any]:
        code = form.get("code")
        redirect_uri = form.get("redirect_uri")
        verifier = form.get("code_verifier")
        if not code or not redirect_uri:
            raise GrantError("invalid_request", "code and redirect_uri are required")
        if not verifier:
            raise GrantError("invalid_request", "code_verifier is required (PKCE)")
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "UPDATE auth_code SET used_at = now() WHERE code_hash = $1 AND used_at IS NULL"
                " RETURNING client_id, redirect_uri, code_challenge, scope, user_id, patient, nonce, family,"
                " expires_at > now() AS fresh",
                code_hash(code),
            )
            if row is None:
                family = await conn.fetchval(
                    "SELECT family FROM auth_code WHERE code_hash = $1", code_hash(code)
                )
                if family is not None:
                    # RFC 6749 §4.1.2: a code used twice; what it gave the first time is revoked.
                    await self._revoke_family(conn, family)
                    logger.warning("authorization code reused: its refresh tokens are revoked")
                raise GrantError("invalid_grant", "the code is invalid, expired or already used")
            # Spent rows go as codes are redeemed (a day later: reuse is still recognised meanwhile).
            await conn.execute("DELETE FROM auth_code WHERE expires_at < now() - interval '1 day'")
            await conn.execute("DELETE FROM auth_refresh_token WHERE expires_at < now() - interval '1 day'")
        if not row["fresh"]:
            raise GrantError("invalid_grant", "the code is invalid, expired or already used")
        if row["client_id"] != client.client_id:
            raise GrantError("invalid_grant", "the code was issued to another client")
        if row["redirect_uri"] != redirect_uri:
            raise GrantError("invalid_grant", "redirect_uri is not the one of the authorization request")
        if not _VERIFIER.fullmatch(verifier) or not hmac.compare_digest(
            pkce_challenge(verifier), row["code_challenge"]
        ):
            raise GrantError("invalid_grant", "code_verifier does not match the code_challenge")
        user = await get_user(self.pool, row["user_id"])
        if user is None or user.disabled:
            raise GrantError("invalid_grant", "the user may no longer sign in")
        grant = Grant(client.client_id, row["scope"], user, row["patient"], row["family"], row["nonce"])
        body = await self._tokens(grant, client, id_token=True)
        await self._audit("token-issue", grant, address)
        return body

    # --- refresh_token -----------------------------------------------------------------------

    async def refresh(self, form: Mapping[str, str], client: Client, address: str | None) -> dict[str, Any]:
        presented = form.get("refresh_token")
        if not presented:
            raise GrantError("invalid_request", "refresh_token is required")
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT family, client_id, scope, user_id, patient, expires_at > now() AS fresh,"
                " rotated_at IS NOT NULL AS rotated, revoked_at IS NOT NULL AS revoked"
                " FROM auth_refresh_token WHERE token_hash = $1 FOR UPDATE",
                code_hash(presented),
            )
            if row is None or row["client_id"] != client.client_id:
                raise GrantError("invalid_grant", "the refresh token is invalid")
            if row["rotated"] and not row["revoked"]:
                # An old token of the family came back: someone else holds a copy (Security BCP).
                await self._revoke_family(conn, row["family"])
                logger.warning("refresh token reused: family revoked (client %s)", client.client_id)
                reused = True
            else:
                reused = False
                if row["revoked"] or not row["fresh"]:
                    raise GrantError("invalid_grant", "the refresh token is expired or revoked")
                await conn.execute(
                    "UPDATE auth_refresh_token SET rotated_at = now() WHERE token_hash = $1",
                    code_hash(presented),
                )
        user = await get_user(self.pool, row["user_id"])
        if reused:
            if user is not None:
                await self._audit(
                    "token-revoke", Grant(client.client_id, row["scope"], user, None, ""), address
                )
            raise GrantError("invalid_grant", "the refresh token was already used; its sign-in is revoked")
        if user is None or user.disabled:
            raise GrantError("invalid_grant", "the user may no longer sign in")
        scope = row["scope"]
        requested = form.get("scope")
        if requested:
            # RFC 6749 §6: the same or fewer scopes.
            held = set(scope.split())
            if not set(requested.split()) <= held:
                raise GrantError("invalid_scope", "a refresh may only ask for scopes already granted")
            scope = " ".join(s for s in requested.split() if s in held)
        grant = Grant(client.client_id, scope, user, row["patient"], row["family"])
        body = await self._tokens(grant, client, id_token=False, keep_scope=row["scope"])
        await self._audit("token-refresh", grant, address)
        return body

    # --- revocation ---------------------------------------------------------------------------

    async def revoke(self, form: Mapping[str, str], client: Client, address: str | None) -> None:
        token = form.get("token")
        if not token:
            raise GrantError("invalid_request", "token is required")
        row = await self.pool.fetchrow(
            "SELECT family, client_id, user_id, scope FROM auth_refresh_token WHERE token_hash = $1",
            code_hash(token),
        )
        if row is None:
            if token.count(".") == 2:
                raise GrantError(
                    "unsupported_token_type",
                    "access tokens are short-lived and not revocable here; revoke the refresh token",
                )
            return  # RFC 7009 §2.2: an unknown token is not an error
        if row["client_id"] != client.client_id:
            return  # §2.1: another client's token is left alone, and the caller is not told
        async with self.pool.acquire() as conn:
            await self._revoke_family(conn, row["family"])
        user = await get_user(self.pool, row["user_id"])
        if user is not None:
            await self._audit("token-revoke", Grant(client.client_id, row["scope"], user, None, ""), address)

    # --- helpers ------------------------------------------------------------------------------

    async def _revoke_family(self, conn: asyncpg.Connection, family: str) -> None:
        await conn.execute(
            "UPDATE auth_refresh_token SET revoked_at = now() WHERE family = $1 AND revoked_at IS NULL",
            family,
        )

    async def _tokens(
        self, grant: Grant, client: Client, *, id_token: bool, keep_scope: str | None = None
    ) -> dict[str, Any]:
        scopes = grant.scope.split()
        access_token, expires_in = await self.tokens.issue(
            client_id=client.client_id,
            scope=grant.scope,
            patient=grant.patient,
            organization=client.organization,
            fhir_user=grant.user.fhir_user,
        )
        body: dict[str, Any] = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": expires_in,
            "scope": grant.scope,
        }
        if grant.patient is not None:
            body["patient"] = grant.patient
        held = (keep_scope or grant.scope).split()
        if "offline_access" in held or "online_access" in held:
            ttl = self.refresh_ttl if "offline_access" in held else self.online_refresh_ttl
            refresh_token = secrets.token_urlsafe(32)
            await self.pool.execute(
                "INSERT INTO auth_refresh_token (token_hash, family, client_id, scope, user_id, patient,"
                " expires_at) VALUES ($1, $2, $3, $4, $5, $6, now() + $7::interval)",
                code_hash(refresh_token),
                grant.family,
                client.client_id,
                keep_scope or grant.scope,
                grant.user.user_id,
                grant.patient,
                ttl,
            )
            body["refresh_token"] = refresh_token
        if id_token and "openid" in scopes:
            body["id_token"] = await self.id_token(grant, client, with_fhir_user="fhirUser" in scopes)
        return body

    async def id_token(self, grant: Grant, client: Client, *, with_fhir_user: bool) -> str:
        """OpenID Connect Core §2 ID Token, signed RS256 (the algorithm OpenID Connect Discovery
        §3 requires; its key is published in /auth/jwks beside the access-token keys); SMART's
        ``fhirUser`` claim is the absolute URL of the user's resource."""
        signing = await self.tokens.keys.signing_key(ID_TOKEN_ALG)
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": grant.user.user_id,
            "aud": client.client_id,
            "iat": now,
            "exp": now + self.tokens.ttl,
            "auth_time": now,
        }
        if grant.nonce:
            claims["nonce"] = grant.nonce
        if with_fhir_user:
            claims["fhirUser"] = f"{self.fhir_base}/{grant.user.fhir_user}"
        header = {"alg": ID_TOKEN_ALG, "kid": signing.kid, "typ": "JWT"}
        return jwt.encode(header, claims, signing.key, algorithms=[ID_TOKEN_ALG])

    async def _audit(self, action: str, grant: Grant, address: str | None) -> None:
        if self.audit is None:
            return
        event = auth_event(
            action,
            outcome="0",
            fhir_user=grant.user.fhir_user,
            client_id=grant.client_id,
            address=address,
            reason=None,
            fhir_base=self.fhir_base,
        )
        await record_auth_event(self.pool, self.audit, event)
