"""The server's access-token signing keys: created once, rotated, published (RFC 7517 JWK Set).

Keys live in ``auth_signing_key`` so that every process signs and verifies with the same set.
Two kinds, each with one signing key at a time (the newest unretired one of its kind): ES256
(P-256) signs access tokens; RS256 (RSA 2048) signs OpenID Connect id_tokens, the algorithm
OpenID Connect Discovery §3 and SMART App Launch require id_token signers to support (relying
parties such as Inferno check it). The kind is the JWK's ``kty``. Rotation without downtime, per
kind:

* a key older than ``signing_key_max_age`` gets a successor; the predecessor is marked
  ``retired_at`` and stops signing, but stays in the set (and in ``/auth/jwks``) until every
  token it can have signed has expired: ``retired_at + token_ttl`` plus the interval at which
  other processes notice the rotation plus clock leeway. Then it is deleted.
* maintenance (create / rotate / prune) runs under a transaction-level advisory lock, so
  processes starting or rotating together create exactly one key.
* each process re-reads the table every ``KEY_REFRESH_INTERVAL`` seconds before signing, and at
  once (rate-limited) when it meets a token whose ``kid`` it does not know: a key another
  process created is accepted as soon as that process uses it.

Private keys are stored as JWK JSON in the database, like the cursor HMAC secret in
``server_key``: whoever reads the database can mint tokens, so protect it accordingly.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from joserfc.jwk import ECKey, RSAKey

SIGNING_ALG = "ES256"
"""Access tokens' algorithm."""
ID_TOKEN_ALG = "RS256"  # noqa: S105  (an algorithm name, not a secret)
"""id_tokens' algorithm."""
SIGNING_CURVE = "P-256"
KEY_TYPES = {SIGNING_ALG: "EC", ID_TOKEN_ALG: "RSA"}
"""The JWK ``kty`` of each algorithm's keys."""
AnyKey = ECKey | RSAKey
KEY_REFRESH_INTERVAL = 60.0
"""Seconds between a process's re-reads of the key table before signing."""
UNKNOWN_KID_RELOAD_INTERVAL = 1.0
"""Least seconds between re-reads caused by tokens with an unknown ``kid`` (bounds the database
work a stream of forged kids can cause)."""
CLOCK_LEEWAY = 30
_LOCK = "carecoord:auth_signing_key"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    key: AnyKey
    created: datetime
    retired_at: datetime | None

    @property
    def alg(self) -> str:
        return SIGNING_ALG if isinstance(self.key, ECKey) else ID_TOKEN_ALG


def retention(token_ttl: int) -> timedelta:
    """How long a retired key stays published: its last tokens' lifetime, plus slack for processes
    that have not noticed the rotation yet and for clock skew."""
    return timedelta(seconds=token_ttl + KEY_REFRESH_INTERVAL + CLOCK_LEEWAY)


def _new_key(alg: str) -> AnyKey:
    if alg == ID_TOKEN_ALG:
        return RSAKey.generate_key(2048, parameters={"alg": alg, "use": "sig"}, private=True, auto_kid=True)
    return ECKey.generate_key(
        SIGNING_CURVE, parameters={"alg": alg, "use": "sig"}, private=True, auto_kid=True
    )


def _import_key(data: dict[str, Any]) -> AnyKey:
    return RSAKey.import_key(data) if data.get("kty") == "RSA" else ECKey.import_key(data)


async def maintain_signing_keys(
    conn: asyncpg.Connection, *, max_age: int, token_ttl: int, force: bool = False
) -> str | None:
    """Create the first key, rotate an old one (or any, with ``force``), drop expired retired keys.

    Returns the kid of a key created now, else None. Serialised across processes by an
    advisory lock held until the transaction ends.
    """
    created_kid: str | None = None
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", _LOCK)
        now: datetime = await conn.fetchval("SELECT now()")
        for alg, kty in KEY_TYPES.items():
            newest = await conn.fetchrow(
                "SELECT kid, created FROM auth_signing_key WHERE retired_at IS NULL"
                " AND CAST(private_jwk AS jsonb) ->> 'kty' = $1 ORDER BY created DESC, kid LIMIT 1",
                kty,
            )
            if force or newest is None or newest["created"] <= now - timedelta(seconds=max_age):
                key = _new_key(alg)
                kid = str(key.kid)
                if alg == SIGNING_ALG:
                    created_kid = kid
                await conn.execute(
                    "INSERT INTO auth_signing_key (kid, private_jwk, created) VALUES ($1, $2, $3)",
                    kid,
                    json.dumps(key.as_dict(private=True)),
                    now,
                )
                # The predecessor stops signing now; it is still published for its tokens' lifetime.
                await conn.execute(
                    "UPDATE auth_signing_key SET retired_at = $1 WHERE retired_at IS NULL AND kid <> $2"
                    " AND CAST(private_jwk AS jsonb) ->> 'kty' = $3",
                    now,
                    kid,
                    kty,
                )
        await conn.execute("DELETE FROM auth_signing_key WHERE retired_at < $1", now - retention(token_ttl))
    return created_kid


async def load_signing_keys(conn: asyncpg.Connection | asyncpg.Pool, *, token_ttl: int) -> list[SigningKey]:
    """The published keys, newest first (retired keys past their retention left out)."""
    rows = await conn.fetch(
        "SELECT kid, private_jwk, created, retired_at FROM auth_signing_key"
        " WHERE retired_at IS NULL OR retired_at >= now() - $1::interval"
        " ORDER BY created DESC, kid",
        retention(token_ttl),
    )
    return [
        SigningKey(
            kid=row["kid"],
            key=_import_key(json.loads(row["private_jwk"])),
            created=row["created"],
            retired_at=row["retired_at"],
        )
        for row in rows
    ]


class SigningKeys:
    """This process's view of ``auth_signing_key``: the key that signs and the keys that verify."""

    def __init__(self, pool: asyncpg.Pool, *, max_age: int, token_ttl: int) -> None:
        self._pool = pool
        self._max_age = max_age
        self._token_ttl = token_ttl
        self._keys: dict[str, SigningKey] = {}
        self._current: dict[str, SigningKey] = {}
        self._maintained_at = float("-inf")
        self._reloaded_at = float("-inf")
        self._lock = asyncio.Lock()

    async def maintain(self, *, force: bool = False) -> str | None:
        """Run :func:`maintain_signing_keys` and reload; returns the kid of a key created now."""
        async with self._lock:
            return await self._maintain(force=force)

    async def _maintain(self, *, force: bool) -> str | None:
        async with self._pool.acquire() as conn:
            created = await maintain_signing_keys(
                conn, max_age=self._max_age, token_ttl=self._token_ttl, force=force
            )
        await self._reload()
        self._maintained_at = time.monotonic()
        return created

    def _stale(self) -> bool:
        missing = len(self._current) < len(KEY_TYPES)
        return missing or time.monotonic() - self._maintained_at > KEY_REFRESH_INTERVAL

    async def _reload(self) -> None:
        keys = await load_signing_keys(self._pool, token_ttl=self._token_ttl)
        self._keys = {key.kid: key for key in keys}
        self._current = {}
        for key in keys:  # newest first
            if key.retired_at is None:
                self._current.setdefault(key.alg, key)
        self._reloaded_at = time.monotonic()

    async def signing_key(self, alg: str = SIGNING_ALG) -> SigningKey:
        """The key to sign with now with ``alg`` (rotating first when the last look at the table
        is stale)."""
        if self._stale():
            async with self._lock:
                if self._stale():  # not done meanwhile by a concurrent request
                    await self._maintain(force=False)
        current = self._current.get(alg)
        if current is None:  # pragma: no cover - maintain() always leaves one of each kind
            raise RuntimeError("no signing key")
        return current

    async def verification_key(self, kid: str, alg: str = SIGNING_ALG) -> AnyKey | None:
        """The public side of key ``kid``, re-reading the table (at most once a second) when unknown."""
        known = self._keys.get(kid)
        if known is None and time.monotonic() - self._reloaded_at >= UNKNOWN_KID_RELOAD_INTERVAL:
            async with self._lock:
                if (
                    kid not in self._keys
                    and time.monotonic() - self._reloaded_at >= UNKNOWN_KID_RELOAD_INTERVAL
                ):
                    await self._reload()
            known = self._keys.get(kid)
        # A key verifies only its own algorithm's tokens: an id_token is never an access token.
        return known.key if known is not None and known.alg == alg else None

    async def public_jwks(self, *, max_staleness: float = 5.0) -> dict[str, Any]:
        """The JWK Set to publish: every key still valid for verification, public parts only."""
        if time.monotonic() - self._reloaded_at > max_staleness:
            async with self._lock:
                if time.monotonic() - self._reloaded_at > max_staleness:
                    await self._reload()
        return {"keys": [public_jwk(key.key) for key in self._keys.values()]}


def public_jwk(key: AnyKey) -> dict[str, Any]:
    public = dict(key.as_dict(private=False))
    public.setdefault("alg", SIGNING_ALG if isinstance(key, ECKey) else ID_TOKEN_ALG)
    public.setdefault("use", "sig")
    return public
