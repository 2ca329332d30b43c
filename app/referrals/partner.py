"""The partner's FHIR server, seen from carecoord: authentication, requests, failure classes.

standards.md §1.1 (SDOHCC Direct, FHIR Workflow option G): the referral source POSTs the
referral to the target's FHIR server, then reads and updates the Task there. This module is
that HTTP conversation, for app/referrals/worker.py:

* :meth:`PartnerClient.transaction` (R4 http.html#transaction), :meth:`~PartnerClient.read`
  (http.html#read) and :meth:`~PartnerClient.update` (http.html#update, ``If-Match`` per
  http.html#concurrency), in ``application/fhir+json``;
* partner authentication from app/referrals/credentials.py: none, OAuth 2.0
  ``client_credentials`` with ``client_secret_basic`` (RFC 6749 §4.4, §2.3.1), or SMART Backend
  Services ``private_key_jwt`` (RFC 7523 §2.2, ES384/RS384, ``kid``, ``exp`` at most five
  minutes ahead, a fresh ``jti``); access tokens are cached per (Endpoint, address) until
  shortly before they expire, and a 401 from the partner gets one retry with a new token.
  Credentials are bound to the address they were set for: once the Endpoint's address differs,
  nothing is sent (:class:`AddressUnconfirmed`) until an operator confirms the new one;
* every failure is a :class:`DeliveryError` that says whether retrying can help: a timeout, a
  transport failure, 408, 429 and 5xx can (with the partner's ``Retry-After``, RFC 9110 §10.2.3);
  any other answer cannot, and keeps the partner's OperationOutcome for the referral's record.

Exceptions::

    DeliveryError          .retryable .status .retry_after .outcome .message

Nothing here logs a URL, a body, a token or a secret: Endpoint ids, methods and statuses only.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote_plus, urlencode

import asyncpg
import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

from app.fhir import jsonio
from app.outbound import OutboundRefused
from app.referrals.credentials import CredentialsError, PartnerCredentials, load_credentials
from app.referrals.directory import Partner, find_partner
from app.settings import Settings

logger = logging.getLogger("carecoord.referrals.partner")

SCOPE = "system/*.cruds"
"""The scope requested from every partner; a partner grants the part of it it allows (SMART v2)."""

FHIR_JSON = "application/fhir+json"
FORM = "application/x-www-form-urlencoded"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 240
"""Seconds a client assertion is valid: SMART caps ``exp`` at five minutes; the rest is clock skew."""
DEFAULT_TOKEN_LIFETIME = 300.0
"""Assumed when a token response has no ``expires_in`` (RFC 6749 §5.1 only recommends it)."""
TOKEN_REFRESH_MARGIN = 30.0
"""A cached token is replaced this long (at most a fifth of its lifetime) before it expires."""
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024
"""Largest part of a partner's error answer read (for its OperationOutcome)."""
"""Largest partner answer read; a partner must not be able to exhaust carecoord's memory."""

_OAUTH_ERROR_CODE = re.compile(r"[a-z_]{1,64}")


class DeliveryError(Exception):
    """A partner request that did not succeed.

    ``retryable``: the same request may succeed later (timeout, transport failure, 408, 429,
    5xx, or the same from the partner's token endpoint); ``status``: the HTTP status, if an
    answer came; ``retry_after``: the partner's Retry-After in seconds; ``outcome``: the
    partner's OperationOutcome, if it sent one (it may hold PHI: store it, never log it);
    ``message``: short and free of PHI.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
        outcome: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.outcome = outcome


class AddressUnconfirmed(DeliveryError):
    """The partner's Endpoint address is not the one its credentials were confirmed for: the
    job waits (paused) for ``carecoord partners confirm``; its token goes nowhere else."""

    def __init__(self, endpoint_id: str) -> None:
        super().__init__(
            f"the address of Endpoint/{endpoint_id} changed since its credentials were set;"
            f" confirm it with: carecoord partners confirm --endpoint Endpoint/{endpoint_id}",
            retryable=False,
        )


def is_retryable_status(status: int) -> bool:
    """408, 429 and 5xx say "not now" (RFC 9110 §15.5.9, RFC 6585 §4, RFC 9110 §15.6)."""
    return status in (408, 429) or status >= 500


def parse_retry_after(value: str | None) -> float | None:
    """RFC 9110 §10.2.3: delay-seconds or an HTTP-date; seconds from now, None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _json_object(body: bytes) -> dict[str, Any] | None:
    if not body.strip():
        return None
    try:
        value = jsonio.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _status_error(what: str, status: int, headers: httpx.Headers, body: bytes) -> DeliveryError:
    """The DeliveryError of a non-2xx answer from the partner's FHIR server or token endpoint."""
    document = _json_object(body)
    outcome = (
        document if document is not None and document.get("resourceType") == "OperationOutcome" else None
    )
    message = f"{what} answered {status}"
    if what == "token endpoint" and document is not None:
        code = document.get("error")
        # The OAuth error code is a fixed vocabulary (RFC 6749 §5.2); its description is not logged.
        if isinstance(code, str) and _OAUTH_ERROR_CODE.fullmatch(code):
            message += f" ({code})"
    return DeliveryError(
        message,
        retryable=is_retryable_status(status),
        status=status,
        retry_after=parse_retry_after(headers.get("retry-after")),
        outcome=outcome,
    )


@dataclass
class _CachedToken:
    value: str
    refresh_at: float
    """time.monotonic() after which the token is replaced."""


class PartnerClient:
    """Requests to partners' FHIR servers over the process's shared ``httpx.AsyncClient``.

    One per process (tokens are cached in it); ``pool`` is for reading partner credentials.
    """

    def __init__(self, http: httpx.AsyncClient, pool: asyncpg.Pool, settings: Settings) -> None:
        self._http = http
        self._pool = pool
        self._settings = settings
        self._timeout = settings.delivery_timeout
        self._tokens: dict[tuple[str, str], _CachedToken] = {}
        self._token_locks: dict[tuple[str, str], asyncio.Lock] = {}

    # --- directory -----------------------------------------------------------------------------

    async def resolve(self, conn: asyncpg.Connection, organization_id: str) -> Partner | None:
        """The partner behind a local Organization: its first active Endpoint with connectionType
        ``hl7-fhir-rest`` (app/referrals/directory.py); None when it has none (light mode)."""
        return await find_partner(conn, organization_id.removeprefix("Organization/"))

    # --- FHIR interactions -------------------------------------------------------------------------

    async def transaction(self, partner: Partner, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a transaction Bundle to the partner's base (R4 http.html#transaction); the
        transaction-response Bundle."""
        response = await self._fhir(partner, "POST", partner.base_url, bundle)
        if response.get("resourceType") != "Bundle":
            raise DeliveryError("partner answered the transaction without a Bundle", retryable=False)
        return response

    async def read(
        self, partner: Partner, url_or_path: str, *, max_bytes: int = MAX_RESPONSE_BYTES
    ) -> dict[str, Any]:
        """GET a resource or search (R4 http.html#read, #search): a path relative to the partner's
        base (``Task/1``, ``Task?_id=1&_include=Task:focus``) or an absolute URL under it; an
        answer over ``max_bytes`` is a final failure."""
        return await self._fhir(partner, "GET", self._url(partner, url_or_path), max_bytes=max_bytes)

    async def update(
        self, partner: Partner, path: str, resource: dict[str, Any], if_match: str | None = None
    ) -> dict[str, Any]:
        """PUT a resource (R4 http.html#update); with ``if_match`` (``W/"3"``) a version-aware
        update (http.html#concurrency: a stale version is a non-retryable 412)."""
        headers = {"prefer": "return=representation"}
        if if_match is not None:
            headers["if-match"] = if_match
        return await self._fhir(partner, "PUT", self._url(partner, path), resource, headers)

    def forget_token(self, endpoint_id: str) -> None:
        """Drop the cached access tokens of a partner Endpoint (e.g. after its credentials changed)."""
        for key in [key for key in self._tokens if key[0] == endpoint_id]:
            del self._tokens[key]

    @staticmethod
    def _url(partner: Partner, url_or_path: str) -> str:
        if url_or_path.startswith(("http://", "https://")):
            # The partner's bearer token goes with the request: only to URLs under its own base.
            if not url_or_path.startswith(partner.base_url + "/"):
                raise DeliveryError("URL outside the partner's FHIR base", retryable=False)
            return url_or_path
        return f"{partner.base_url}/{url_or_path.lstrip('/')}"

    async def _fhir(
        self,
        partner: Partner,
        method: str,
        url: str,
        resource: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        *,
        max_bytes: int = MAX_RESPONSE_BYTES,
    ) -> dict[str, Any]:
        content = jsonio.dumps(resource) if resource is not None else None
        request_headers = {"accept": FHIR_JSON, **(headers or {})}
        if content is not None:
            request_headers["content-type"] = FHIR_JSON
        retried = False
        while True:
            token = await self._access_token(partner)
            if token is not None:
                request_headers["authorization"] = f"Bearer {token}"
            status, response_headers, body = await self._exchange(
                "partner", method, url, headers=request_headers, content=content, max_bytes=max_bytes
            )
            if status == 401 and token is not None and not retried:
                # The token may have been revoked or the partner's keys rotated: one new token.
                logger.info(
                    "partner endpoint %s: 401 on %s, renewing the access token", partner.endpoint_id, method
                )
                self.forget_token(partner.endpoint_id)
                retried = True
                continue
            break
        if 200 <= status < 300:
            if not body.strip():
                return {}
            document = _json_object(body)
            if document is None:
                raise DeliveryError(
                    f"partner answered {status} with a body that is not a JSON object",
                    retryable=False,
                    status=status,
                )
            return document
        # A second 401 (or one with no credentials to renew) is final: 401 is not retryable.
        error = _status_error("partner", status, response_headers, body)
        logger.info(
            "partner endpoint %s: %s answered %s (%s)",
            partner.endpoint_id,
            method,
            status,
            "retryable" if error.retryable else "final",
        )
        raise error

    async def _exchange(
        self,
        what: str,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        content: bytes | None,
        max_bytes: int = MAX_RESPONSE_BYTES,
    ) -> tuple[int, httpx.Headers, bytes]:
        """One HTTP exchange within ``delivery_timeout`` in all (not per read: a partner that
        trickles bytes is still cut off), at most ``max_bytes`` read."""
        try:
            async with asyncio.timeout(self._timeout):
                async with self._http.stream(
                    method, url, headers=headers, content=content, timeout=self._timeout
                ) as response:
                    size = 0
                    chunks: list[bytes] = []
                    if response.status_code >= 300:
                        # An error answer is only looked at for its OperationOutcome.
                        max_bytes = min(max_bytes, MAX_ERROR_BYTES)
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > max_bytes and response.status_code >= 300:
                            break  # keep the status; an outcome cut short is simply not kept
                        if size > max_bytes:
                            raise DeliveryError(
                                f"{what} answer larger than {max_bytes} bytes",
                                retryable=False,
                                status=response.status_code,
                            )
                        chunks.append(chunk)
                    return response.status_code, response.headers, b"".join(chunks)
        except OutboundRefused as exc:
            # The address is loopback/private/... and not allowlisted: no retry will change that.
            raise DeliveryError(
                f"{what} address is not allowed by the outbound address policy", retryable=False
            ) from exc
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise DeliveryError(f"{what} did not answer within {self._timeout:g}s", retryable=True) from exc
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as exc:
            # Our request or the configured address is wrong: sending it again changes nothing.
            raise DeliveryError(
                f"{what} request cannot be sent ({type(exc).__name__})", retryable=False
            ) from exc
        except httpx.TransportError as exc:
            # Connect errors, resets, a connection closed without an answer, malformed answers.
            raise DeliveryError(f"{what} connection failed ({type(exc).__name__})", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise DeliveryError(f"{what} answer unreadable ({type(exc).__name__})", retryable=False) from exc

    # --- partner authentication --------------------------------------------------------------------

    async def _access_token(self, partner: Partner) -> str | None:
        """The bearer token for a partner (cached), or None when it has no credentials.

        Cached per (Endpoint, address), and only issued for the address the credentials are
        bound to: a changed address neither reuses the old token nor gets a new one."""
        key = (partner.endpoint_id, partner.base_url)
        cached = self._tokens.get(key)
        if cached is not None and time.monotonic() < cached.refresh_at:
            return cached.value
        lock = self._token_locks.setdefault(key, asyncio.Lock())
        async with lock:
            # Concurrent deliveries to one partner wait for one token request, then share its token.
            cached = self._tokens.get(key)
            if cached is not None and time.monotonic() < cached.refresh_at:
                return cached.value
            try:
                credentials = await load_credentials(self._pool, self._settings, partner.endpoint_id)
            except CredentialsError as exc:
                raise DeliveryError(str(exc), retryable=False) from exc
            if credentials is None:
                return None
            if credentials.address != partner.base_url:
                self.forget_token(partner.endpoint_id)
                logger.warning(
                    "partner endpoint %s: address differs from the one its credentials were set for;"
                    " nothing sent until an operator confirms it",
                    partner.endpoint_id,
                )
                raise AddressUnconfirmed(partner.endpoint_id)
            token, lifetime = await self._request_token(credentials)
            margin = min(TOKEN_REFRESH_MARGIN, lifetime / 5)
            self._tokens[key] = _CachedToken(token, time.monotonic() + lifetime - margin)
            logger.info(
                "partner endpoint %s: access token obtained (%s)",
                partner.endpoint_id,
                credentials.auth_method,
            )
            return token

    async def _request_token(self, credentials: PartnerCredentials) -> tuple[str, float]:
        """RFC 6749 §4.4.2-4.4.3: the client_credentials grant; (access token, lifetime seconds)."""
        form = {"grant_type": "client_credentials", "scope": SCOPE}
        headers = {"accept": "application/json", "content-type": FORM}
        if credentials.auth_method == "client_secret":
            assert credentials.client_secret is not None
            # RFC 6749 §2.3.1: both parts form-urlencoded before the Basic encoding.
            basic = f"{quote_plus(credentials.client_id)}:{quote_plus(credentials.client_secret)}"
            headers["authorization"] = "Basic " + base64.b64encode(basic.encode("utf-8")).decode("ascii")
        else:
            form["client_assertion_type"] = ASSERTION_TYPE
            form["client_assertion"] = client_assertion(credentials)
        status, response_headers, body = await self._exchange(
            "token endpoint",
            "POST",
            credentials.token_url,
            headers=headers,
            content=urlencode(form).encode("ascii"),
        )
        if status != 200:
            error = _status_error("token endpoint", status, response_headers, body)
            logger.info(
                "partner endpoint %s: token endpoint answered %s (%s)",
                credentials.endpoint_id,
                status,
                "retryable" if error.retryable else "final",
            )
            raise error
        document = _json_object(body) or {}
        token = document.get("access_token")
        token_type = document.get("token_type", "bearer")
        if not isinstance(token, str) or not token or not isinstance(token_type, str):
            raise DeliveryError(
                "token endpoint answered without an access token", retryable=False, status=status
            )
        if token_type.lower() != "bearer":
            raise DeliveryError("token endpoint issued a token that is not a bearer token", retryable=False)
        expires_in = document.get("expires_in")
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        else:
            lifetime = float(expires_in)
        return token, lifetime


def client_assertion(credentials: PartnerCredentials, *, now: float | None = None) -> str:
    """A SMART Backend Services client assertion (RFC 7523 §3): iss = sub = client_id, aud = the
    token URL, exp within five minutes, a unique jti; signed with the partner key's ``alg``/``kid``."""
    if credentials.private_key_pem is None or credentials.alg is None or credentials.kid is None:
        raise DeliveryError("partner credentials lack the private key, alg or kid", retryable=False)
    issued = int(now if now is not None else time.time())
    claims = {
        "iss": credentials.client_id,
        "sub": credentials.client_id,
        "aud": credentials.token_url,
        "iat": issued,
        "exp": issued + ASSERTION_LIFETIME,
        "jti": uuid.uuid4().hex,
    }
    header = {"alg": credentials.alg, "kid": credentials.kid, "typ": "JWT"}
    try:
        key = (
            ECKey.import_key(credentials.private_key_pem)
            if credentials.alg == "ES384"
            else RSAKey.import_key(credentials.private_key_pem)
        )
        return jwt.encode(header, claims, key, algorithms=[credentials.alg])
    except (JoseError, ValueError) as exc:
        raise DeliveryError(
            "the partner private key cannot sign the client assertion", retryable=False
        ) from exc
