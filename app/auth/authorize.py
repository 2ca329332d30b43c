"""The authorization endpoint: SMART App Launch 2.x standalone launch (app-launch.html §Obtain
authorization code; RFC 6749 §4.1; RFC 7636 PKCE; OpenID Connect Core §3.1.2).

``GET`` (or ``POST``) ``/auth/authorize`` checks the request in the order RFC 6749 §4.1.2.1
asks: a bad ``client_id`` or ``redirect_uri`` is shown on the page and never redirected (the
redirect target is not trusted yet); every other error redirects to the registered
``redirect_uri`` with ``error`` and the same ``state``. A valid request becomes an
``auth_flow`` row and the sign-in pages follow:

1. login (username and password; failed sign-ins limited per user and per address across
   processes, app/auth/users.py ``LoginLimiter``);
2. for a Practitioner or RelatedPerson who asked for ``launch/patient``: the patient picker,
   listing only their caseload (users.CASELOAD_SQL); a Patient user is their own context;
3. consent: each granted scope in words beside the scope string; Allow or Deny.

Allow redirects with a one-time ``code`` (60 s, stored hashed, bound to the client, the
redirect URI and the PKCE S256 challenge) and ``state``; Deny with ``error=access_denied``.

CSRF: every form carries the flow id and a random ``csrf_token`` stored with the flow, and the
flow is bound to the browser that started it by a cookie (only its hash is stored): a post
with a missing or wrong token, or from another browser, is refused with 403 and changes
nothing. The pages are served ``no-store``, may not be framed, and their CSP allows this
server's stylesheet and forms posting to this server and to the app's redirect URI only.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from app.auth.audit import AuditTrail
from app.auth.auth_events import auth_event
from app.auth.clients import Client, get_client
from app.auth.grants import narrow_scopes
from app.auth.pages import FlowFields, consent_page, error_page, login_page, patient_page
from app.auth.scopes import looks_like_resource_scope, parse_resource_scope, parse_scope
from app.auth.upstream import UpstreamError, UpstreamProvider, UpstreamRequest, upstream_user
from app.auth.users import LoginLimiter, User, caseload, check_password, find_user, get_user
from app.settings import Settings

logger = logging.getLogger("carecoord.auth")

FLOW_LIFETIME = timedelta(minutes=15)
CODE_LIFETIME = timedelta(seconds=60)
"""RFC 6749 §4.1.2: "A maximum authorization code lifetime of 10 minutes is RECOMMENDED"; an
app redeems its code at once, so one minute is plenty."""
MAX_PARAM_LENGTH = 2000
LAUNCH_SCOPES = frozenset({"openid", "fhirUser", "launch/patient", "offline_access", "online_access"})
"""The non-resource scopes of the standalone launch this server grants (``launch``, the EHR
launch, and ``launch/encounter`` are not supported and are never granted)."""
COOKIE_PREFIX = "cc_flow_"
_FLOW_COLUMNS = (
    "flow_id, browser_hash, csrf_token, client_id, redirect_uri, scope, state, nonce, code_challenge, step,"
    " user_id, patient, upstream"
)
COOKIE_PATH = "/auth/authorize"


def code_hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def pkce_challenge(verifier: str) -> str:
    """RFC 7636 §4.2 S256: BASE64URL(SHA256(ASCII(code_verifier))), unpadded."""
    import base64

    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass
class Page:
    """An HTML answer: status, the page, cookies to set, and the app origin forms may reach."""

    html: str
    status: int = 200
    cookies: dict[str, tuple[str, int]] = field(default_factory=dict)
    """name -> (value, max-age seconds); max-age 0 deletes."""
    form_target: str | None = None


@dataclass
class Redirect:
    location: str
    cookies: dict[str, tuple[str, int]] = field(default_factory=dict)


Answer = Page | Redirect


@dataclass(frozen=True)
class Flow:
    flow_id: str
    browser_hash: str
    csrf_token: str
    client_id: str
    redirect_uri: str
    scope: str
    state: str | None
    nonce: str | None
    code_challenge: str
    step: str
    user_id: str | None
    patient: str | None
    upstream: str | None = None

    @property
    def fields(self) -> FlowFields:
        return FlowFields(self.flow_id, self.csrf_token)


def redirect_with(uri: str, params: Mapping[str, str | None]) -> str:
    """``uri`` with ``params`` added to its query (RFC 6749 §4.1.2: keep the registered query)."""
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query += [(name, value) for name, value in params.items() if value is not None]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def form_target(uri: str) -> str:
    """The CSP source of a redirect URI: its origin (``scheme://host:port``) or, for a
    private-use scheme, the scheme."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        return f"{parts.scheme}://{parts.netloc}"
    return f"{parts.scheme}:"


_TYPE_WORDS = {"*": "all kinds of records"}
_LETTER_WORDS = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}


def scope_words(scope: str) -> str:
    """What a scope lets the app do, in words a person understands (shown beside the scope)."""
    fixed = {
        "openid": "Confirm who you are to the app",
        "fhirUser": "Know which person you are in the records (your own record's link)",
        "launch/patient": "Know which patient's record you chose",
        "offline_access": "Keep access when you are not using the app, until you sign out of it or"
        " the access is revoked",
        "online_access": "Keep access while you are using the app",
    }
    if scope in fixed:
        return fixed[scope]
    parsed = parse_resource_scope(scope)
    if parsed is None:
        return "Other access"
    verbs = [word for letter, word in _LETTER_WORDS.items() if letter in parsed.letters]
    action = ", ".join(verbs[:-1]) + (" and " if len(verbs) > 1 else "") + verbs[-1]
    kind = _TYPE_WORDS.get(parsed.resource_type, f"{parsed.resource_type} records")
    whose = {
        "patient": "of the chosen patient",
        "user": "that you may see",
        "system": "of everyone",
    }[parsed.context]
    words = f"{action.capitalize()} {kind} {whose}"
    permission = parse_scope(scope)
    if permission is not None and permission.restriction:
        limits = ", ".join(f"{name} = {value}" for name, value in permission.restriction)
        words += f" (only where {limits})"
    return words


class AuthorizeError(Exception):
    """An error redirected to the app (RFC 6749 §4.1.2.1)."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


class AuthorizationEndpoint:
    """/auth/authorize and its pages; one per process (app.state.authorize)."""

    def __init__(
        self,
        *,
        settings: Settings,
        pool: asyncpg.Pool,
        audit: AuditTrail,
        upstream: UpstreamProvider | None = None,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.pool = pool
        self.audit = audit
        self.fhir_base = settings.fhir_base
        self.limiter = LoginLimiter(
            pool, limit=settings.login_failure_limit, window=settings.login_failure_window
        )

    # --- step 0: the authorization request ---------------------------------------------------

    async def start(self, params: list[tuple[str, str]], address: str | None) -> Answer:
        query: dict[str, str] = {}
        for name, value in params:
            if "\x00" in name or "\x00" in value:
                return self._bad_request("The sign-in link is malformed.")
            if name in query:
                if name in ("client_id", "redirect_uri"):
                    return self._bad_request("The request names its app or return address twice.")
                query["__duplicate__"] = name
            query[name] = value
        client_id = query.get("client_id", "")
        client = await get_client(self.pool, client_id) if 0 < len(client_id) <= 200 else None
        if client is None or not client.redirect_uris:
            return self._bad_request("The app that sent you here is not registered with this server.")
        redirect_uri = query.get("redirect_uri")
        if redirect_uri is None or redirect_uri not in client.redirect_uris:
            # RFC 6749 §3.1.2.4: never redirect to an unregistered URI (an open redirector).
            return self._bad_request("The app asked to return to an address that is not registered for it.")
        state = query.get("state")
        try:
            scope = self._check_request(query, client)
        except AuthorizeError as exc:
            logger.info("authorization request refused: %s (client %s)", exc.error, client.client_id)
            return Redirect(
                redirect_with(
                    redirect_uri, {"error": exc.error, "error_description": exc.description, "state": state}
                )
            )
        flow_id = secrets.token_urlsafe(24)
        browser_secret = secrets.token_urlsafe(32)
        flow = Flow(
            flow_id=flow_id,
            browser_hash=code_hash(browser_secret),
            csrf_token=secrets.token_urlsafe(32),
            client_id=client.client_id,
            redirect_uri=redirect_uri,
            scope=scope,
            state=state,
            nonce=query.get("nonce"),
            code_challenge=query["code_challenge"],
            step="login",
            user_id=None,
            patient=None,
        )
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO auth_flow (flow_id, browser_hash, csrf_token, client_id, redirect_uri, scope,"
                " state, nonce, code_challenge, step, expires_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'login', now() + $10::interval)",
                flow.flow_id,
                flow.browser_hash,
                flow.csrf_token,
                flow.client_id,
                flow.redirect_uri,
                flow.scope,
                flow.state,
                flow.nonce,
                flow.code_challenge,
                FLOW_LIFETIME,
            )
            await conn.execute("DELETE FROM auth_flow WHERE expires_at < now()")
        page = await self._login(flow, client)
        page.cookies[COOKIE_PREFIX + flow_id] = (browser_secret, int(FLOW_LIFETIME.total_seconds()))
        return page

    def _check_request(self, query: Mapping[str, str], client: Client) -> str:
        """The scope to ask consent for; :class:`AuthorizeError` for anything else wrong."""
        if "__duplicate__" in query:
            raise AuthorizeError("invalid_request", f"parameter {query['__duplicate__'][:40]} given twice")
        if any(len(value) > MAX_PARAM_LENGTH for value in query.values()):
            raise AuthorizeError("invalid_request", "a parameter is too long")
        if query.get("response_type") != "code":
            raise AuthorizeError("unsupported_response_type", "only response_type=code is supported")
        if not query.get("state"):
            raise AuthorizeError("invalid_request", "state is required (SMART App Launch)")
        if query.get("aud") != self.fhir_base:
            raise AuthorizeError(
                "invalid_request", f"aud must be this server's FHIR base URL {self.fhir_base}"
            )
        challenge = query.get("code_challenge")
        method = query.get("code_challenge_method")
        if not challenge or method is None:
            raise AuthorizeError(
                "invalid_request", "PKCE is required: code_challenge and code_challenge_method"
            )
        if method != "S256":
            raise AuthorizeError(
                "invalid_request", "code_challenge_method must be S256 (plain is not accepted)"
            )
        if not (43 <= len(challenge) <= 128) or not all(c.isalnum() or c in "-_" for c in challenge):
            raise AuthorizeError("invalid_request", "code_challenge is not a base64url SHA-256 value")
        requested = query.get("scope", "").split()
        if not requested:
            raise AuthorizeError("invalid_scope", "scope is required")
        wanted = [s for s in requested if looks_like_resource_scope(s) or s in LAUNCH_SCOPES]
        granted = narrow_scopes(client.scopes, " ".join(wanted), patient_context=False) if wanted else []
        if not any(looks_like_resource_scope(s) or s == "openid" for s in granted):
            raise AuthorizeError("invalid_scope", "none of the requested scopes can be granted to this app")
        return " ".join(granted)

    # --- the pages -------------------------------------------------------------------------

    def _bad_request(self, message: str) -> Page:
        return Page(error_page("This sign-in link does not work", message + " Go back to the app."), 400)

    async def _login(
        self, flow: Flow, client: Client, *, error: str | None = None, username: str = "", status: int = 200
    ) -> Page:
        upstream_name = self.upstream.display_name if self.upstream is not None else None
        html = login_page(
            flow.fields, client_name=client.name, error=error, username=username, upstream_name=upstream_name
        )
        targets = form_target(flow.redirect_uri)
        if self.upstream is not None:
            origin = await self.upstream.origin()
            targets += f" {origin}" if origin else ""
        return Page(html, status, form_target=targets)

    async def _load(self, form: Mapping[str, str], cookies: Mapping[str, str]) -> Flow | Page:
        """The flow a form belongs to, after the CSRF checks; a 403 page when they fail."""
        flow_id = form.get("flow", "")
        token = form.get("csrf_token", "")
        row = (
            await self.pool.fetchrow(
                f"SELECT {_FLOW_COLUMNS} FROM auth_flow WHERE flow_id = $1 AND expires_at > now()",  # noqa: S608
                flow_id,
            )
            if 0 < len(flow_id) <= 64
            else None
        )
        browser_secret = cookies.get(COOKIE_PREFIX + flow_id, "")
        if (
            row is None
            or not token
            or not hmac.compare_digest(token.encode(), row["csrf_token"].encode())
            or not hmac.compare_digest(code_hash(browser_secret).encode(), row["browser_hash"].encode())
        ):
            logger.info("authorization form refused: missing or wrong CSRF token or flow cookie")
            return Page(
                error_page(
                    "This form has expired",
                    "The sign-in form was not sent by this browser, or it is too old. Go back to the app"
                    " and start again.",
                ),
                403,
            )
        return Flow(**dict(row))

    async def _client(self, flow: Flow) -> Client | None:
        return await get_client(self.pool, flow.client_id)

    # --- step 1: login ------------------------------------------------------------------------

    async def login(self, form: Mapping[str, str], cookies: Mapping[str, str], address: str | None) -> Answer:
        flow = await self._load(form, cookies)
        if isinstance(flow, Page):
            return flow
        client = await self._client(flow)
        if client is None or flow.step != "login":
            return await self._gone(flow)
        username = form.get("username", "")[:128]
        password = form.get("password", "")
        if not username or not password:
            return await self._login(
                flow, client, error="Enter your username and password.", username=username
            )
        keys = self.limiter.keys(username, address)
        wait = await self.limiter.retry_after(keys)
        if wait is not None:
            await self._audit("login", "4", None, client.client_id, address, "too many failed sign-ins")
            minutes = max(1, round(wait / 60))
            return await self._login(
                flow,
                client,
                error=f"Too many failed sign-ins. Try again in about {minutes} minute{'s' * (minutes != 1)}.",
                username=username,
                status=429,
            )
        attempt = await self.limiter.record_failure(keys)
        user = await find_user(self.pool, username)
        if not await check_password(user, password):
            await self._audit(
                "login",
                "4",
                user if user is not None and not user.disabled else None,
                client.client_id,
                address,
                "wrong username or password",
            )
            return await self._login(
                flow, client, error="The username or password is not right.", username=username, status=401
            )
        assert user is not None
        await self.limiter.forgive(attempt)
        await self._audit("login", "0", user, client.client_id, address, None)
        return await self._signed_in(flow, client, user)

    async def _signed_in(self, flow: Flow, client: Client, user: User) -> Page:
        """After a sign-in (password or upstream): the patient picker or the consent page."""
        patient: str | None = None
        step = "consent"
        if user.kind == "Patient":
            patient = user.resource_id
        elif "launch/patient" in flow.scope.split():
            step = "patient"
        # The flow now belongs to this user; a fresh CSRF token for the pages after sign-in.
        csrf = secrets.token_urlsafe(32)
        await self.pool.execute(
            "UPDATE auth_flow SET step = $2, user_id = $3, patient = $4, csrf_token = $5, upstream = NULL"
            " WHERE flow_id = $1",
            flow.flow_id,
            step,
            user.user_id,
            patient,
            csrf,
        )
        flow = Flow(
            **{
                **flow.__dict__,
                "step": step,
                "user_id": user.user_id,
                "patient": patient,
                "csrf_token": csrf,
                "upstream": None,
            }
        )
        if step == "patient":
            return await self._patient_page(flow, client, user)
        return self._consent_page(flow, client, user)

    # --- step 1b: sign-in at the upstream OpenID Connect provider ---------------------------------

    async def upstream_start(self, form: Mapping[str, str], cookies: Mapping[str, str]) -> Answer:
        flow = await self._load(form, cookies)
        if isinstance(flow, Page):
            return flow
        client = await self._client(flow)
        if client is None or flow.step != "login" or self.upstream is None:
            return await self._gone(flow)
        try:
            url, request = await self.upstream.authorization_url(flow.flow_id)
        except UpstreamError as exc:
            return await self._login(
                flow, client, error=f"{exc}. Sign in with your password instead.", status=502
            )
        await self.pool.execute(
            "UPDATE auth_flow SET upstream = $2 WHERE flow_id = $1", flow.flow_id, request.dumps()
        )
        return Redirect(url)

    async def upstream_callback(
        self, params: Mapping[str, str], cookies: Mapping[str, str], address: str | None
    ) -> Answer:
        """The provider sends the person back (OpenID Connect Core §3.1.2.5): ``state`` names the
        flow and must be the one stored with it, from the browser that started it."""
        state = params.get("state", "")
        flow_id = state.split(".", 1)[0]
        row = (
            await self.pool.fetchrow(
                f"SELECT {_FLOW_COLUMNS} FROM auth_flow WHERE flow_id = $1 AND expires_at > now()",  # noqa: S608
                flow_id,
            )
            if 0 < len(flow_id) <= 64
            else None
        )
        browser_secret = cookies.get(COOKIE_PREFIX + flow_id, "")
        request = UpstreamRequest.loads(row["upstream"]) if row is not None and row["upstream"] else None
        if (
            row is None
            or request is None
            or self.upstream is None
            or not hmac.compare_digest(state.encode(), request.state.encode())
            or not hmac.compare_digest(code_hash(browser_secret).encode(), row["browser_hash"].encode())
        ):
            logger.info("upstream sign-in refused: unknown state or another browser")
            return Page(error_page("This sign-in has expired", "Go back to the app and start again."), 403)
        flow = Flow(**dict(row))
        client = await self._client(flow)
        if client is None or flow.step != "login":
            return await self._gone(flow)
        await self.pool.execute("UPDATE auth_flow SET upstream = NULL WHERE flow_id = $1", flow.flow_id)
        code = params.get("code")
        if not code:
            return await self._login(
                flow, client, error="The sign-in provider did not sign you in.", status=401
            )
        try:
            subject, fhir_user = await self.upstream.finish(code, request)
        except UpstreamError as exc:
            logger.info("upstream sign-in failed: %s", exc)
            await self._audit("login", "4", None, client.client_id, address, f"upstream: {exc}")
            return await self._login(flow, client, error=f"Sign-in failed: {exc}.", status=401)
        user = await upstream_user(self.pool, subject, fhir_user)
        if user.disabled:
            await self._audit("login", "4", None, client.client_id, address, "upstream: user disabled")
            return await self._login(flow, client, error="This account may not sign in.", status=401)
        await self._audit("login", "0", user, client.client_id, address, "upstream OpenID Connect")
        return await self._signed_in(flow, client, user)

    # --- step 2: the patient picker ----------------------------------------------------------

    async def _patient_page(self, flow: Flow, client: Client, user: User, error: str | None = None) -> Page:
        patients = await caseload(self.pool, user.fhir_user)
        html = patient_page(flow.fields, client_name=client.name, patients=patients, error=error)
        return Page(html, 200 if error is None else 400, form_target=form_target(flow.redirect_uri))

    async def choose_patient(self, form: Mapping[str, str], cookies: Mapping[str, str]) -> Answer:
        flow = await self._load(form, cookies)
        if isinstance(flow, Page):
            return flow
        client = await self._client(flow)
        user = await get_user(self.pool, flow.user_id) if flow.user_id else None
        if client is None or user is None or user.disabled or flow.step != "patient":
            return await self._gone(flow)
        chosen = form.get("patient", "")
        allowed = {patient.patient_id for patient in await caseload(self.pool, user.fhir_user)}
        if chosen not in allowed:
            return await self._patient_page(flow, client, user, error="Choose one of your patients.")
        await self.pool.execute(
            "UPDATE auth_flow SET step = 'consent', patient = $2 WHERE flow_id = $1", flow.flow_id, chosen
        )
        flow = Flow(**{**flow.__dict__, "step": "consent", "patient": chosen})
        return self._consent_page(flow, client, user)

    # --- step 3: consent ----------------------------------------------------------------------

    @staticmethod
    def granted_scopes(flow: Flow) -> list[str]:
        """The flow's scopes once the patient context is known: without one, no ``patient/``
        scopes and no ``launch/patient`` (they would have no patient to apply to)."""
        scopes = flow.scope.split()
        if flow.patient is None:
            scopes = [s for s in scopes if not s.startswith("patient/") and s != "launch/patient"]
        return scopes

    def _consent_page(self, flow: Flow, client: Client, user: User) -> Page:
        scopes = [(scope, scope_words(scope)) for scope in self.granted_scopes(flow)]
        html = consent_page(
            flow.fields,
            client_name=client.name,
            scopes=scopes,
            user_display=f"{user.username} ({user.fhir_user})",
            patient_display=f"Patient/{flow.patient}" if flow.patient else None,
        )
        return Page(html, form_target=form_target(flow.redirect_uri))

    async def consent(
        self, form: Mapping[str, str], cookies: Mapping[str, str], address: str | None
    ) -> Answer:
        flow = await self._load(form, cookies)
        if isinstance(flow, Page):
            return flow
        client = await self._client(flow)
        user = await get_user(self.pool, flow.user_id) if flow.user_id else None
        decision = form.get("decision")
        cookie = {COOKIE_PREFIX + flow.flow_id: ("", 0)}
        if client is None or decision not in ("approve", "deny") or flow.step == "login":
            return await self._gone(flow)
        deleted = await self.pool.fetchval(
            "DELETE FROM auth_flow WHERE flow_id = $1 RETURNING true", flow.flow_id
        )
        if not deleted:  # the same form sent twice: the first one decided
            return await self._gone(flow)
        if decision == "deny" or user is None or user.disabled:
            await self._audit("consent-deny", "4", user, client.client_id, address, "access denied")
            location = redirect_with(
                flow.redirect_uri,
                {
                    "error": "access_denied",
                    "error_description": "the user denied access",
                    "state": flow.state,
                },
            )
            return Redirect(location, cookie)
        if flow.step != "consent":
            return await self._gone(flow)
        code = secrets.token_urlsafe(32)
        await self.pool.execute(
            "INSERT INTO auth_code (code_hash, client_id, redirect_uri, code_challenge, scope, user_id,"
            " patient, nonce, family, expires_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now() + $10::interval)",
            code_hash(code),
            client.client_id,
            flow.redirect_uri,
            flow.code_challenge,
            " ".join(self.granted_scopes(flow)),
            user.user_id,
            flow.patient,
            flow.nonce,
            secrets.token_urlsafe(16),
            CODE_LIFETIME,
        )
        await self._audit("consent-approve", "0", user, client.client_id, address, None)
        return Redirect(redirect_with(flow.redirect_uri, {"code": code, "state": flow.state}), cookie)

    async def _gone(self, flow: Flow) -> Page:
        return Page(
            error_page(
                "This sign-in has already ended",
                "This step is done or no longer possible. Go back to the app and start again.",
            ),
            400,
        )

    async def _audit(
        self,
        action: str,
        outcome: str,
        user: User | None,
        client_id: str,
        address: str | None,
        reason: str | None,
    ) -> None:
        event = auth_event(
            action,
            outcome=outcome,
            fhir_user=user.fhir_user if user is not None else None,
            client_id=client_id,
            address=address,
            reason=reason,
            fhir_base=self.fhir_base,
        )
        await record_auth_event(self.pool, self.audit, event)


async def record_auth_event(pool: asyncpg.Pool, audit: AuditTrail, event: dict[str, Any]) -> None:
    """Store an authentication AuditEvent (its own short transaction: sign-ins are rare)."""
    async with pool.acquire() as conn, conn.transaction():
        await audit.write(conn, event)
