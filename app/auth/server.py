"""The token, revocation and introspection endpoints' logic (RFC 6749 §4.1, §4.4, §5, §6;
RFC 7523; RFC 7009; RFC 7662; SMART App Launch and Backend Services).

* ``POST /auth/token``: the ``client_credentials`` grant (RFC 6749 §4.4) for clients that
  authenticate with ``client_secret_basic``, ``client_secret_post`` (§2.3.1) or
  ``private_key_jwt`` (RFC 7523 §2.2 as profiled by SMART Backend Services: RS384 or ES384,
  ``kid`` required, ``exp`` at most five minutes ahead, ``jti`` never reused); and for app
  clients the ``authorization_code`` and ``refresh_token`` grants of people who signed in at
  /auth/authorize (app/auth/user_grants.py). A public app client identifies itself with
  ``client_id`` only (no secret: PKCE binds its code); a confidential one authenticates as above.
* ``POST /auth/revoke``: RFC 7009, for app clients (app/auth/user_grants.py).
* ``POST /auth/introspect``: RFC 7662 for an authenticated client. Only the client a token was
  issued to, or a client registered with ``introspection``, learns about it; any other caller
  gets ``{"active": false}`` (RFC 7662 §2.2 and §4: the server may answer so to protect
  information).

Errors are :class:`OAuthError` (RFC 6749 §5.2), rendered by app/routers/auth.py; failed
requests count towards app/auth/ratelimit.py's limits. Nothing here logs a secret, an
assertion or a token.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

import asyncpg
from joserfc import jwt
from joserfc.errors import JoseError

from app.auth.audit import AuditTrail
from app.auth.clients import Client, ClientRegistrationError, check_secret, get_client, parse_client_jwks
from app.auth.grants import narrow_scopes
from app.auth.jwks import JwksUnavailable, select_key
from app.auth.keys import ID_TOKEN_ALG
from app.auth.ratelimit import FailureLimiter, pair_key
from app.auth.tokens import InvalidToken, TokenService, peek
from app.auth.user_grants import GrantError, UserGrants
from app.settings import Settings

logger = logging.getLogger("carecoord.auth")

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGS = ("RS384", "ES384")
MAX_ASSERTION_LIFETIME = 300
CLOCK_LEEWAY = 15
MAX_FORM_FIELDS = 32
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"

SCOPES_SUPPORTED = [
    "openid",
    "fhirUser",
    "launch/patient",
    "offline_access",
    "online_access",
    "system/*.cruds",
    "system/*.rs",
    "system/*.read",
    "system/*.write",
    "system/*.*",
    "user/*.cruds",
    "user/*.rs",
    "user/*.read",
    "patient/*.cruds",
    "patient/*.rs",
    "patient/*.read",
]


class OAuthError(Exception):
    """An RFC 6749 §5.2 error response: ``error`` code, description, status, extra headers."""

    def __init__(
        self, error: str, description: str, *, status: int = 400, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.headers = dict(headers or {})


class RateLimited(OAuthError):
    def __init__(self, retry_after: int) -> None:
        super().__init__(
            "slow_down",
            "too many failed requests; retry later",
            status=429,
            headers={"Retry-After": str(retry_after)},
        )


def _invalid_client(description: str, *, basic: bool = False) -> OAuthError:
    headers = {"WWW-Authenticate": 'Basic realm="carecoord"'} if basic else None
    return OAuthError("invalid_client", description, status=401, headers=headers)


@dataclass
class OAuthRequest:
    """An /auth request as received: body, its media type, Authorization header, source address.

    ``form`` and ``basic`` are filled in by :meth:`parse`.
    """

    content_type: str | None
    body: bytes
    authorization: str | None = None
    address: str | None = None
    form: dict[str, str] = field(default_factory=dict, init=False)
    basic: tuple[str, str] | None = field(default=None, init=False)
    authenticated: bool = field(default=False, init=False)
    """Set once the client proved who it is (failures after that are not guesses)."""

    def parse(self) -> None:
        self.form = parse_form(self.content_type, self.body)
        self.basic = _parse_basic(self.authorization)

    def claimed_client_id(self) -> str | None:
        """The client the request says it is (not authenticated): for rate limiting and logs."""
        if self.basic is not None:
            return self.basic[0]
        if "client_assertion" in self.form:
            try:
                issuer = peek(self.form["client_assertion"])[1].get("iss")
            except InvalidToken:
                return self.form.get("client_id")
            return issuer if isinstance(issuer, str) else self.form.get("client_id")
        return self.form.get("client_id")


def parse_form(content_type: str | None, body: bytes) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body; each parameter at most once (RFC 6749 §3.2)."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != FORM_CONTENT_TYPE:
        raise OAuthError("invalid_request", f"the request body must be {FORM_CONTENT_TYPE}")
    try:
        pairs = parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_FORM_FIELDS
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise OAuthError("invalid_request", "the request body cannot be parsed") from exc
    form: dict[str, str] = {}
    for name, value in pairs:
        if "\x00" in name or "\x00" in value:
            # PostgreSQL text cannot hold NUL: refused here, not as a database error later.
            raise OAuthError("invalid_request", "the request body contains a NUL character")
        if name in form:
            raise OAuthError("invalid_request", f"parameter {name} given more than once")
        form[name] = value
    return form


def _parse_basic(authorization: str | None) -> tuple[str, str] | None:
    """``Authorization: Basic`` credentials, form-urlencoded inside (RFC 6749 §2.3.1)."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise _invalid_client("malformed Basic credentials", basic=True) from exc
    client_id, colon, secret = decoded.partition(":")
    if not colon or not client_id:
        raise _invalid_client("malformed Basic credentials", basic=True)
    return unquote_plus(client_id), unquote_plus(secret)


class AuthorizationServer:
    """The /auth endpoints of one process; built in the lifespan."""

    def __init__(
        self,
        *,
        settings: Settings,
        pool: asyncpg.Pool,
        tokens: TokenService,
        audit: AuditTrail | None = None,
    ) -> None:
        self.pool = pool
        self.tokens = tokens
        self.issuer = settings.base_url
        self.token_url = f"{settings.base_url}/auth/token"
        self.introspection_url = f"{settings.base_url}/auth/introspect"
        self.jwks_url = f"{settings.base_url}/auth/jwks"
        self.authorize_url = f"{settings.base_url}/auth/authorize"
        self.revocation_url = f"{settings.base_url}/auth/revoke"
        self.user_grants = UserGrants(settings=settings, pool=pool, tokens=tokens, audit=audit)
        self.limiter = FailureLimiter(
            pool, limit=settings.auth_failure_limit, window=settings.auth_failure_window
        )
        self._next_jti_cleanup = 0.0

    # --- endpoints -------------------------------------------------------------------------

    async def token(self, request: OAuthRequest) -> dict[str, Any]:
        """RFC 6749 §4.4.2-4.4.3: the client_credentials grant; the token response body."""
        return await self._limited(request, self._token)

    async def revoke(self, request: OAuthRequest) -> dict[str, Any]:
        """RFC 7009 §2: revoke a refresh token (and its family); an empty answer on success."""
        return await self._limited(request, self._revoke)

    async def introspect(self, request: OAuthRequest) -> dict[str, Any]:
        """RFC 7662 §2: ``{"active": false}`` for any token that is not valid here, and for
        another client's token unless the caller is registered with ``introspection``."""
        return await self._limited(request, self._introspect)

    async def _limited(
        self, request: OAuthRequest, handler: Callable[[OAuthRequest], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        # ratelimit.py: per address, and per (claimed client, address); never per client alone,
        # so that failures from one address cannot lock a client out at its own. One statement
        # checks the limits and counts the attempt (every process shares the counts); a second
        # one forgives it when the request succeeds.
        address = f"address:{request.address}" if request.address else None
        try:
            request.parse()
        except OAuthError:
            # Parsing needs no database: the malformed request is counted (or, from an address
            # at its limit, refused with 429 like any other request from there) afterwards.
            malformed = await self.limiter.attempt(address)
            if malformed.retry_after is not None:
                raise RateLimited(malformed.retry_after) from None
            raise
        claimed = request.claimed_client_id()
        client_key = pair_key(claimed, request.address) if claimed else None
        if self.limiter.proven(client_key):
            return await self._proven_request(request, handler, address, client_key, claimed)
        # Counted as a failure until it succeeds: concurrent guesses cannot all slip under the limit.
        attempt = await self.limiter.attempt(address, client_key)
        if attempt.retry_after is not None:
            raise RateLimited(attempt.retry_after)
        try:
            result: dict[str, Any] = await handler(request)
        except OAuthError as exc:
            # The client id is the caller's claim: repr and truncation keep it from forging log lines.
            logger.info("auth request refused: %s (client %.80r)", exc.error, claimed)
            if request.authenticated:
                # Its credentials were right (it asked for a scope it does not have, say): not a
                # guess, so not a failure that could lock its address out.
                await self.limiter.forgive(attempt)
                self.limiter.prove(client_key)
            raise
        await self.limiter.forgive(attempt)
        if request.authenticated:
            self.limiter.prove(client_key)
        return result

    async def _proven_request(
        self,
        request: OAuthRequest,
        handler: Callable[[OAuthRequest], Awaitable[dict[str, Any]]],
        address: str | None,
        client_key: str | None,
        claimed: str | None,
    ) -> dict[str, Any]:
        """A pair that proved its credentials within the window: handled first, counted only if
        it fails (ratelimit.py, "Proven clients are not counted up front")."""
        try:
            return await handler(request)
        except OAuthError as exc:
            logger.info("auth request refused: %s (client %.80r)", exc.error, claimed)
            if request.authenticated:
                raise
            self.limiter.disprove(client_key)
            failure = await self.limiter.attempt(address, client_key)
            if failure.retry_after is not None:
                raise RateLimited(failure.retry_after) from None
            raise

    async def _token(self, request: OAuthRequest) -> dict[str, Any]:
        form = request.form
        grant_type = form.get("grant_type")
        if not grant_type:
            raise OAuthError("invalid_request", "grant_type is required")
        if grant_type in ("authorization_code", "refresh_token"):
            client = await self.app_client(request)
            try:
                if grant_type == "authorization_code":
                    return await self.user_grants.authorization_code(form, client, request.address)
                return await self.user_grants.refresh(form, client, request.address)
            except GrantError as exc:
                raise OAuthError(exc.error, exc.description) from exc
        if grant_type != "client_credentials":
            raise OAuthError(
                "unsupported_grant_type", "supported: authorization_code, refresh_token, client_credentials"
            )
        client = await self.authenticate(request, audiences=(self.token_url,))
        if client.public:
            raise _invalid_client("a public client cannot use client_credentials")
        requested = form.get("scope") or None
        granted = narrow_scopes(client.scopes, requested, patient_context=client.patient is not None)
        if not granted:
            raise OAuthError("invalid_scope", "none of the requested scopes can be granted to this client")
        scope = " ".join(granted)
        token, expires_in = await self.tokens.issue(
            client_id=client.client_id, scope=scope, patient=client.patient, organization=client.organization
        )
        logger.info("token issued to client %s, scope %s", client.client_id, scope)
        body: dict[str, Any] = {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": expires_in,
            "scope": scope,
        }
        if client.patient is not None:
            body["patient"] = client.patient
        return body

    async def _revoke(self, request: OAuthRequest) -> dict[str, Any]:
        client = await self.app_client(request)
        try:
            await self.user_grants.revoke(request.form, client, request.address)
        except GrantError as exc:
            raise OAuthError(exc.error, exc.description) from exc
        return {}

    async def app_client(self, request: OAuthRequest) -> Client:
        """The app client of an authorization_code, refresh_token or revocation request: a
        confidential one authenticates (RFC 6749 §3.2.1); a public one only names itself
        (``client_id``, §2.3: it has no credentials; PKCE and the code's binding protect it)."""
        form = request.form
        credentials = request.basic is not None or any(
            name in form for name in ("client_secret", "client_assertion", "client_assertion_type")
        )
        if credentials:
            client = await self.authenticate(request, audiences=(self.token_url, self.revocation_url))
        else:
            client_id = form.get("client_id")
            if not client_id:
                raise _invalid_client("client_id is required")
            found = await get_client(self.pool, client_id)
            if found is None or not found.public:
                raise _invalid_client("client authentication failed")
            client = found
        if not client.redirect_uris:
            raise OAuthError(
                "unauthorized_client", "this client is not registered for the authorization code flow"
            )
        return client

    async def _introspect(self, request: OAuthRequest) -> dict[str, Any]:
        caller = await self.authenticate(request, audiences=(self.introspection_url, self.token_url))
        token = request.form.get("token")
        if not token:
            raise OAuthError("invalid_request", "token is required")
        try:
            claims = await self.tokens.verify(token)
        except InvalidToken:
            return {"active": False}
        own = claims.issuer == self.tokens.issuer and claims.client_id == caller.client_id
        if not (own or caller.introspection):
            return {"active": False}
        body: dict[str, Any] = {
            "active": True,
            "scope": claims.scope,
            "client_id": claims.client_id,
            "exp": claims.expires_at,
            "sub": claims.subject,
            "iss": claims.issuer,
            "token_type": "bearer",
        }
        if claims.issued_at is not None:
            body["iat"] = claims.issued_at
        if claims.token_id is not None:
            body["jti"] = claims.token_id
        if claims.patient is not None:
            body["patient"] = claims.patient
        if claims.organization is not None:
            body["organization"] = claims.organization
        return body

    # --- client authentication (RFC 6749 §2.3, RFC 7523 §2.2) --------------------------------

    async def authenticate(self, request: OAuthRequest, *, audiences: tuple[str, ...]) -> Client:
        """The registered client the request authenticates as, by exactly one method."""
        client = await self._authenticate(request, audiences=audiences)
        request.authenticated = True
        return client

    async def _authenticate(self, request: OAuthRequest, *, audiences: tuple[str, ...]) -> Client:
        form = request.form
        has_assertion = "client_assertion" in form or "client_assertion_type" in form
        methods = (request.basic is not None) + has_assertion + ("client_secret" in form)
        if methods > 1:
            raise OAuthError("invalid_request", "use exactly one client authentication method")
        if request.basic is not None:
            client_id, secret = request.basic
            if form.get("client_id", client_id) != client_id:
                raise OAuthError("invalid_request", "client_id does not match the Basic credentials")
            return await self._secret_client(client_id, secret, basic=True)
        if has_assertion:
            return await self._assertion_client(form, audiences)
        if "client_secret" in form:
            posted_id = form.get("client_id")
            if not posted_id:
                raise OAuthError("invalid_request", "client_id is required with client_secret")
            return await self._secret_client(posted_id, form["client_secret"], basic=False)
        raise _invalid_client("client authentication required")

    async def _secret_client(self, client_id: str, secret: str, *, basic: bool) -> Client:
        client = await get_client(self.pool, client_id)
        if not await check_secret(client, secret) or client is None:
            raise _invalid_client("client authentication failed", basic=basic)
        return client

    async def _assertion_client(self, form: Mapping[str, str], audiences: tuple[str, ...]) -> Client:
        assertion_type = form.get("client_assertion_type")
        assertion = form.get("client_assertion")
        if not assertion_type or not assertion:
            raise OAuthError("invalid_request", "client_assertion and client_assertion_type go together")
        if assertion_type != ASSERTION_TYPE:
            raise _invalid_client("unsupported client_assertion_type")
        try:
            header, unverified = peek(assertion)
        except InvalidToken as exc:
            raise _invalid_client("malformed client assertion") from exc
        alg, kid, client_id = header.get("alg"), header.get("kid"), unverified.get("iss")
        if alg not in ASSERTION_ALGS:
            raise _invalid_client("client assertion must be signed with RS384 or ES384")
        if not isinstance(kid, str) or not kid:
            raise _invalid_client("client assertion header needs a kid")
        if not isinstance(client_id, str) or form.get("client_id", client_id) != client_id:
            raise _invalid_client("client assertion iss must be the client_id")
        client = await get_client(self.pool, client_id)
        if client is None or (client.jwks is None and client.jwks_url is None):
            raise _invalid_client("client authentication failed")
        jku = header.get("jku")
        if jku is not None and jku != client.jwks_url:
            raise _invalid_client("client assertion jku is not the registered JWKS URL")
        if client.jwks is not None:
            try:
                key = select_key(parse_client_jwks(client.jwks), kid, alg)
            except ClientRegistrationError as exc:
                raise _invalid_client("the client's registered JWKS is unusable") from exc
        else:
            assert client.jwks_url is not None
            try:
                key = await self.tokens.jwks.key(client.jwks_url, kid, alg)
            except JwksUnavailable as exc:
                raise _invalid_client("the client's JWKS cannot be fetched") from exc
        if key is None:
            raise _invalid_client("no registered key matches the client assertion kid")
        try:
            claims = jwt.decode(assertion, key, algorithms=[alg]).claims
        except JoseError as exc:
            raise _invalid_client("client assertion signature is invalid") from exc
        self._check_assertion_claims(claims, client_id, audiences)
        await self._record_jti(client_id, claims["jti"], int(claims["exp"]))
        return client

    @staticmethod
    def _check_assertion_claims(
        claims: Mapping[str, Any], client_id: str, audiences: tuple[str, ...]
    ) -> None:
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            raise _invalid_client("client assertion iss and sub must be the client_id")
        aud = claims.get("aud")
        if not (
            aud in audiences
            if isinstance(aud, str)
            else isinstance(aud, list) and any(item in audiences for item in aud)
        ):
            raise _invalid_client("client assertion aud must be the token endpoint URL")
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise _invalid_client("client assertion needs exp")
        now = time.time()
        if exp + CLOCK_LEEWAY <= now:
            raise _invalid_client("client assertion expired")
        if exp > now + MAX_ASSERTION_LIFETIME + CLOCK_LEEWAY:
            raise _invalid_client("client assertion exp is more than five minutes ahead")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and not isinstance(nbf, bool) and nbf > now + CLOCK_LEEWAY:
            raise _invalid_client("client assertion not yet valid")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 255:
            raise _invalid_client("client assertion needs a jti")

    async def _record_jti(self, client_id: str, jti: str, exp: int) -> None:
        """RFC 7523 §3 item 7: a jti is accepted once while its assertion could be valid.

        The row outlives the assertion's ``exp`` by the clock leeway; a stale row for the same
        jti is taken over (the old assertion can no longer be replayed anyway).
        """
        expires_at = datetime.fromtimestamp(exp + CLOCK_LEEWAY, UTC)
        async with self.pool.acquire() as conn:
            fresh = await conn.fetchval(
                "INSERT INTO auth_jti (issuer, jti, expires_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (issuer, jti) DO UPDATE SET expires_at = EXCLUDED.expires_at"
                " WHERE auth_jti.expires_at < now() RETURNING true",
                client_id,
                jti,
                expires_at,
            )
            if time.monotonic() >= self._next_jti_cleanup:
                self._next_jti_cleanup = time.monotonic() + 60
                await conn.execute("DELETE FROM auth_jti WHERE expires_at < now()")
        if not fresh:
            raise _invalid_client("client assertion jti was already used")

    # --- discovery ---------------------------------------------------------------------------

    def smart_configuration(self) -> dict[str, Any]:
        """SMART App Launch 2.x §Well-Known Uniform Resource Identifiers (conformance-smart-config).

        It advertises only what this server does; tests/test_discovery.py and
        tests/test_smart_launch.py exercise every entry. ``issuer`` and ``jwks_uri`` are there
        because of ``sso-openid-connect`` (the id_token's issuer and keys). Not advertised, as
        not supported: the EHR launch (``launch-ehr``, the ``launch`` scope), ``launch/encounter``,
        ``context-ehr-*``, ``context-banner``/``context-style``, and asymmetric authentication of
        app clients at the authorization code flow beyond what ``private_key_jwt`` already does.
        """
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_url,
            "authorization_endpoint": self.authorize_url,
            "token_endpoint": self.token_url,
            "introspection_endpoint": self.introspection_url,
            "revocation_endpoint": self.revocation_url,
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": [
                "private_key_jwt",
                "client_secret_basic",
                "client_secret_post",
                "none",
            ],
            "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
            "introspection_endpoint_auth_methods_supported": [
                "private_key_jwt",
                "client_secret_basic",
                "client_secret_post",
            ],
            "revocation_endpoint_auth_methods_supported": [
                "private_key_jwt",
                "client_secret_basic",
                "client_secret_post",
                "none",
            ],
            "scopes_supported": SCOPES_SUPPORTED,
            "capabilities": [
                "launch-standalone",
                "client-public",
                "client-confidential-symmetric",
                "client-confidential-asymmetric",
                "context-standalone-patient",
                "permission-offline",
                "permission-online",
                "permission-patient",
                "permission-user",
                "permission-v1",
                "permission-v2",
                "sso-openid-connect",
            ],
        }

    def openid_configuration(self) -> dict[str, Any]:
        """OpenID Connect Discovery 1.0 §3 for the id_tokens of ``openid`` sign-ins."""
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.authorize_url,
            "token_endpoint": self.token_url,
            "jwks_uri": self.jwks_url,
            "revocation_endpoint": self.revocation_url,
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [ID_TOKEN_ALG],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "scopes_supported": ["openid", "fhirUser", "launch/patient", "offline_access", "online_access"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "fhirUser"],
        }
