"""JWK Sets fetched over HTTP (trusted issuers' keys, clients' ``jwks_url``), cached per URL.

A set is kept for the response's ``Cache-Control: max-age`` (clamped to
[``MIN_TTL``, ``MAX_TTL``]; ``DEFAULT_TTL`` without one). A ``kid`` missing from the cached set
triggers a refetch, at most once per ``REFETCH_INTERVAL`` per URL, so key rotation at the
issuer is picked up at once while a stream of forged kids cannot make us hammer it. When a
refetch fails the previous set keeps serving (the keys did not become wrong because the
issuer is briefly down). Fetches happen outside any database transaction.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field

import httpx
from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet

logger = logging.getLogger("carecoord.auth")

DEFAULT_TTL = 300.0
MIN_TTL = 10.0
MAX_TTL = 86400.0
REFETCH_INTERVAL = 10.0
MAX_JWKS_BYTES = 256 * 1024
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)", re.IGNORECASE)

KEY_TYPES = {"RS256": "RSA", "RS384": "RSA", "ES256": "EC", "ES384": "EC"}
EC_CURVES = {"ES256": "P-256", "ES384": "P-384"}


class JwksUnavailable(Exception):
    """The JWK Set could not be fetched or parsed (str(exc) names no key material)."""


@dataclass
class _Entry:
    keys: KeySet | None = None
    fetched_at: float = float("-inf")
    expires_at: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def select_key(keys: KeySet | list[Key], kid: str, alg: str) -> Key | None:
    """The key with this ``kid`` usable for ``alg`` (RFC 7517 §4: kty, use, alg must fit)."""
    for key in keys:
        if key.kid != kid or key.key_type != KEY_TYPES.get(alg):
            continue
        if key.get("use") not in (None, "sig") or key.get("alg") not in (None, alg):
            continue
        if alg in EC_CURVES and key.get("crv") != EC_CURVES[alg]:
            continue
        return key
    return None


def cache_ttl(cache_control: str | None) -> float:
    if not cache_control:
        return DEFAULT_TTL
    match = _MAX_AGE.search(cache_control)
    if match is None:
        return MIN_TTL if "no-" in cache_control.lower() else DEFAULT_TTL
    return min(MAX_TTL, max(MIN_TTL, float(match.group(1))))


class JwksCache:
    """Remote JWK Sets by URL, shared by the whole process (built in the lifespan)."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http
        self._entries: dict[str, _Entry] = {}

    async def key(self, url: str, kid: str, alg: str) -> Key | None:
        """The key ``kid`` for ``alg`` from the set at ``url``; None when the set lacks it.

        Raises :class:`JwksUnavailable` when there is no set to look in.
        """
        entry = self._entries.setdefault(url, _Entry())
        now = time.monotonic()
        if entry.keys is None or now >= entry.expires_at:
            await self._refresh(url, entry, stale_ok=entry.keys is not None)
        if entry.keys is None:  # a concurrent first fetch failed
            raise JwksUnavailable("JWKS not available")
        found = select_key(entry.keys, kid, alg)
        if found is None and time.monotonic() - entry.fetched_at >= REFETCH_INTERVAL:
            await self._refresh(url, entry, stale_ok=True)
            found = select_key(entry.keys, kid, alg)
        return found

    async def _refresh(self, url: str, entry: _Entry, *, stale_ok: bool) -> None:
        started = time.monotonic()
        async with entry.lock:
            if entry.fetched_at >= started:  # another request fetched it while we waited
                return
            try:
                keys, ttl = await self._fetch(url)
            except JwksUnavailable as exc:
                # Try again after REFETCH_INTERVAL, not on every request.
                entry.fetched_at = time.monotonic()
                if not stale_ok or entry.keys is None:
                    raise
                logger.warning("JWKS refetch failed, keeping the cached set: %s", exc)
                return
            entry.keys = keys
            entry.fetched_at = time.monotonic()
            entry.expires_at = entry.fetched_at + ttl

    async def _fetch(self, url: str) -> tuple[KeySet, float]:
        try:
            response = await self._http.get(
                url, headers={"accept": "application/jwk-set+json, application/json"}
            )
        except httpx.HTTPError as exc:
            raise JwksUnavailable(f"JWKS fetch failed ({type(exc).__name__})") from exc
        if response.status_code != 200:
            raise JwksUnavailable(f"JWKS fetch answered {response.status_code}")
        if len(response.content) > MAX_JWKS_BYTES:
            raise JwksUnavailable("JWKS too large")
        try:
            keys = KeySet.import_key_set(response.json())
        except (ValueError, TypeError, KeyError, JoseError) as exc:
            raise JwksUnavailable("JWKS is not a usable JWK Set") from exc
        return keys, cache_ttl(response.headers.get("cache-control"))
