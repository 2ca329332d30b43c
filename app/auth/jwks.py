"""JWK Sets fetched over HTTP (trusted issuers' keys, clients' ``jwks_url``), cached per URL.

A set is kept for the response's ``Cache-Control: max-age`` (clamped to
[``MIN_TTL``, ``MAX_TTL``]; ``DEFAULT_TTL`` without one). A ``kid`` missing from the cached set
triggers a refetch, at most once per ``REFETCH_INTERVAL`` per URL, so key rotation at the
issuer is picked up at once while a stream of forged kids cannot make us hammer it. When a
refetch fails the previous set keeps serving (the keys did not become wrong because the
issuer is briefly down). Fetches happen outside any database transaction.

A client's ``jwks_url`` is fetched on an *unauthenticated* token request, so a fetch must cost
little whatever the URL answers (security review finding 10): the body is streamed and
abandoned past ``MAX_JWKS_BYTES`` (never held whole, never decompressed: we ask for
``identity``), the whole fetch has one time limit (``FETCH_TIMEOUT``), and a failed fetch,
like a successful one, is not repeated for a URL within ``REFETCH_INTERVAL``, also when no
set was ever fetched. The URL itself passes the outbound address policy (app/outbound.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass, field

import httpx
from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet

from app.outbound import OutboundRefused

logger = logging.getLogger("carecoord.auth")

DEFAULT_TTL = 300.0
MIN_TTL = 10.0
MAX_TTL = 86400.0
REFETCH_INTERVAL = 10.0
MAX_JWKS_BYTES = 256 * 1024
FETCH_TIMEOUT = 10.0
"""Seconds for a whole fetch (connect, headers and body): a server trickling bytes is cut off."""
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)", re.IGNORECASE)

KEY_TYPES = {"RS256": "RSA", "RS384": "RSA", "ES256": "EC", "ES384": "EC"}
EC_CURVES = {"ES256": "P-256", "ES384": "P-384"}


class JwksUnavailable(Exception):
    """The JWK Set could not be fetched or parsed (str(exc) names no key material)."""


@dataclass
class _Entry:
    keys: KeySet | None = None
    attempted_at: float = float("-inf")
    """When the last fetch ended, successful or not: the next is at least REFETCH_INTERVAL later."""
    expires_at: float = float("-inf")
    error: str = "JWKS not available"
    """Why the last fetch failed (no key material, no URL), for requests that find no set."""
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

    def __init__(self, http: httpx.AsyncClient, *, fetch_timeout: float = FETCH_TIMEOUT) -> None:
        self._http = http
        self._fetch_timeout = fetch_timeout
        self._entries: dict[str, _Entry] = {}

    async def key(self, url: str, kid: str, alg: str) -> Key | None:
        """The key ``kid`` for ``alg`` from the set at ``url``; None when the set lacks it.

        Raises :class:`JwksUnavailable` when there is no set to look in.
        """
        entry = self._entries.setdefault(url, _Entry())
        if entry.keys is None or time.monotonic() >= entry.expires_at:
            await self._refresh(url, entry)
        if entry.keys is None:  # this fetch, a concurrent one or a recent one failed
            raise JwksUnavailable(entry.error)
        found = select_key(entry.keys, kid, alg)
        if found is None:
            # An unknown kid may mean the issuer rotated its keys (rate-limited in _refresh).
            await self._refresh(url, entry)
            found = select_key(entry.keys, kid, alg)
        return found

    async def _refresh(self, url: str, entry: _Entry) -> None:
        """Fetch the set unless one was fetched (or failed) since we started waiting, or
        within REFETCH_INTERVAL: a stream of token requests naming a URL that is down, huge
        or slow costs one fetch per interval, not one per request. A failure keeps the
        previous set, if any."""
        started = time.monotonic()
        async with entry.lock:
            if entry.attempted_at >= started:  # another request fetched it while we waited
                return
            if time.monotonic() - entry.attempted_at < REFETCH_INTERVAL:
                return
            try:
                keys, ttl = await self._fetch(url)
            except JwksUnavailable as exc:
                entry.attempted_at = time.monotonic()
                entry.error = str(exc)
                if entry.keys is not None:
                    logger.warning("JWKS refetch failed, keeping the cached set: %s", exc)
                return
            entry.keys = keys
            entry.attempted_at = time.monotonic()
            entry.expires_at = entry.attempted_at + ttl

    async def _fetch(self, url: str) -> tuple[KeySet, float]:
        try:
            async with asyncio.timeout(self._fetch_timeout):
                body, cache_control = await self._download(url)
        except OutboundRefused as exc:
            raise JwksUnavailable("JWKS address is not allowed by the outbound address policy") from exc
        except TimeoutError as exc:
            raise JwksUnavailable(f"JWKS fetch took longer than {self._fetch_timeout:g}s") from exc
        except httpx.HTTPError as exc:
            raise JwksUnavailable(f"JWKS fetch failed ({type(exc).__name__})") from exc
        try:
            keys = KeySet.import_key_set(json.loads(body))
        except (ValueError, TypeError, KeyError, JoseError) as exc:
            raise JwksUnavailable("JWKS is not a usable JWK Set") from exc
        return keys, cache_ttl(cache_control)

    async def _download(self, url: str) -> tuple[bytes, str | None]:
        """The body (at most MAX_JWKS_BYTES) and Cache-Control of a 200 answer."""
        headers = {
            "accept": "application/jwk-set+json, application/json",
            # Raw bytes are what we count: a compressed body could inflate far past the limit.
            "accept-encoding": "identity",
        }
        async with self._http.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                raise JwksUnavailable(f"JWKS fetch answered {response.status_code}")
            if response.headers.get("content-encoding", "identity").strip().lower() != "identity":
                raise JwksUnavailable("JWKS answer is compressed although identity was asked for")
            declared = response.headers.get("content-length", "")
            if declared.isascii() and declared.isdigit() and int(declared) > MAX_JWKS_BYTES:
                raise JwksUnavailable("JWKS too large")
            body = bytearray()
            # Leaving the block early closes the connection: the rest is never read.
            async for chunk in response.aiter_raw():
                if len(body) + len(chunk) > MAX_JWKS_BYTES:
                    raise JwksUnavailable("JWKS too large")
                body += chunk
            return bytes(body), response.headers.get("cache-control")
