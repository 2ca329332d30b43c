"""The authorization server's HTTP surface: authorize (and its sign-in pages), token, revocation,
introspection, JWKS, SMART and OpenID Connect discovery.

Thin: the logic is app/auth/server.py and app/auth/authorize.py. OAuth responses are plain JSON
(OAuth, not FHIR), token, revocation and introspection answers with ``Cache-Control: no-store``
(RFC 6749 §5.1). The sign-in pages are HTML with strict security headers (:func:`_page_headers`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from app.auth.authorize import COOKIE_PATH, Answer, AuthorizationEndpoint, Page
from app.auth.pages import STYLESHEET, STYLESHEET_PATH, error_page
from app.auth.server import FORM_CONTENT_TYPE, AuthorizationServer, OAuthError, OAuthRequest, parse_form
from app.auth.upstream import CALLBACK_PATH
from app.fhir.params import declared_length

router = APIRouter(tags=["auth"])

MAX_FORM_BYTES = 64 * 1024
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _form_body(fields: dict[str, str], required: list[str]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                FORM_CONTENT_TYPE: {
                    "schema": {
                        "type": "object",
                        "properties": {
                            name: {"type": "string", "description": description}
                            for name, description in fields.items()
                        },
                        "required": required,
                    }
                }
            },
        }
    }


_CLIENT_AUTH_FIELDS = {
    "client_id": "a public client's id; client_secret_post (or with an assertion, equal to its iss)",
    "client_secret": "client_secret_post",
    "client_assertion_type": "private_key_jwt: urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
    "client_assertion": "private_key_jwt: a JWT signed RS384 or ES384 with a registered key",
}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "OAuth error (RFC 6749 §5.2)"},
    401: {"description": "invalid_client"},
    429: {"description": "too many failed requests (Retry-After)"},
}


def _oauth_error(exc: OAuthError) -> JSONResponse:
    return JSONResponse(
        {"error": exc.error, "error_description": exc.description},
        status_code=exc.status,
        headers={**_NO_STORE, **exc.headers},
    )


async def _oauth_request(request: Request) -> OAuthRequest:
    declared = declared_length(request.headers.get("content-length"))
    if declared is not None and declared > MAX_FORM_BYTES:
        raise OAuthError("invalid_request", "request body too large", status=413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            raise OAuthError("invalid_request", "request body too large", status=413)
        chunks.append(chunk)
    return OAuthRequest(
        content_type=request.headers.get("content-type"),
        body=b"".join(chunks),
        authorization=request.headers.get("authorization"),
        address=request.client.host if request.client else None,
    )


@router.post(
    "/auth/token",
    operation_id="token",
    summary="Token endpoint: authorization_code and refresh_token (SMART App Launch), client_credentials"
    " (SMART Backend Services)",
    openapi_extra=_form_body(
        {
            "grant_type": "authorization_code, refresh_token or client_credentials",
            "code": "authorization_code: the code from /auth/authorize",
            "redirect_uri": "authorization_code: the redirect_uri of the authorization request",
            "code_verifier": "authorization_code: the PKCE verifier (RFC 7636)",
            "refresh_token": "refresh_token: the refresh token (a new one comes back: rotation)",
            "scope": "space-separated SMART scopes (client_credentials; refresh_token: a subset)",
            **_CLIENT_AUTH_FIELDS,
        },
        ["grant_type"],
    ),
    responses=_ERROR_RESPONSES,
)
async def token(request: Request) -> JSONResponse:
    server: AuthorizationServer = request.app.state.oauth
    try:
        body = await server.token(await _oauth_request(request))
    except OAuthError as exc:
        return _oauth_error(exc)
    return JSONResponse(body, headers=_NO_STORE)


@router.post(
    "/auth/revoke",
    operation_id="revoke",
    summary="Token revocation (RFC 7009): revoke a refresh token and every token of its sign-in",
    openapi_extra=_form_body(
        {
            "token": "the refresh token",
            "token_type_hint": "refresh_token (access tokens are short-lived and not revocable)",
            "client_id": "a public client's id (confidential clients authenticate instead)",
            "client_secret": "client_secret_post",
        },
        ["token"],
    ),
    responses=_ERROR_RESPONSES,
)
async def revoke(request: Request) -> JSONResponse:
    server: AuthorizationServer = request.app.state.oauth
    try:
        body = await server.revoke(await _oauth_request(request))
    except OAuthError as exc:
        return _oauth_error(exc)
    return JSONResponse(body, headers=_NO_STORE)


@router.post(
    "/auth/introspect",
    operation_id="introspect",
    summary="Token introspection (RFC 7662)",
    openapi_extra=_form_body({"token": "the access token", **_CLIENT_AUTH_FIELDS}, ["token"]),
    responses=_ERROR_RESPONSES,
)
async def introspect(request: Request) -> JSONResponse:
    server: AuthorizationServer = request.app.state.oauth
    try:
        body = await server.introspect(await _oauth_request(request))
    except OAuthError as exc:
        return _oauth_error(exc)
    return JSONResponse(body, headers=_NO_STORE)


@router.get("/auth/jwks", operation_id="jwks", summary="The public keys that sign access tokens")
async def jwks(request: Request) -> JSONResponse:
    server: AuthorizationServer = request.app.state.oauth
    # Short: after a rotation, verifiers also refetch on an unknown kid.
    return JSONResponse(
        await server.tokens.keys.public_jwks(),
        headers={"Cache-Control": "public, max-age=60"},
    )


@router.get(
    "/fhir/.well-known/smart-configuration",
    operation_id="smart_configuration",
    summary="SMART configuration (authorization endpoints and capabilities)",
)
@router.get("/.well-known/smart-configuration", include_in_schema=False)
async def smart_configuration(request: Request) -> JSONResponse:
    server: AuthorizationServer = request.app.state.oauth
    return JSONResponse(server.smart_configuration(), headers={"Cache-Control": "public, max-age=3600"})


@router.get(
    "/.well-known/openid-configuration",
    operation_id="openid_configuration",
    summary="OpenID Connect discovery (id_tokens of openid sign-ins)",
)
async def openid_configuration(request: Request) -> JSONResponse:
    server: AuthorizationServer = request.app.state.oauth
    return JSONResponse(server.openid_configuration(), headers={"Cache-Control": "public, max-age=3600"})


# --- /auth/authorize and its sign-in pages (SMART App Launch 2.x standalone launch) ----------


def _page_headers(form_target: str | None) -> dict[str, str]:
    """No caching (the pages hold one person's flow), no framing (clickjacking), no scripts at
    all, styles and forms from this server only, plus the app's redirect target: browsers apply
    ``form-action`` to the redirect that follows a form post."""
    targets = "'self'" + (f" {form_target}" if form_target else "")
    return {
        "Content-Security-Policy": (
            "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none';"
            f" form-action {targets}; frame-ancestors 'none'"
        ),
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
        **_NO_STORE,
    }


def _answer(answer: Answer, request: Request, *, after_post: bool) -> Response:
    response: Response
    if isinstance(answer, Page):
        response = HTMLResponse(
            answer.html, status_code=answer.status, headers=_page_headers(answer.form_target)
        )
    else:
        # 303 after a form post (the app's GET follows), 302 for the authorization request itself.
        response = RedirectResponse(
            answer.location, status_code=303 if after_post else 302, headers=_page_headers(None)
        )
    secure = request.app.state.settings.base_url.startswith("https://")
    for name, (value, max_age) in answer.cookies.items():
        response.set_cookie(
            name, value, max_age=max_age, path=COOKIE_PATH, secure=secure, httponly=True, samesite="lax"
        )
    return response


async def _form(request: Request) -> dict[str, str]:
    oauth_request = await _oauth_request(request)
    return parse_form(oauth_request.content_type, oauth_request.body)


def _bad_form(exc: OAuthError) -> Response:
    page = Page(error_page("This form could not be read", exc.description), 413 if exc.status == 413 else 400)
    return HTMLResponse(page.html, status_code=page.status, headers=_page_headers(None))


def _address(request: Request) -> str | None:
    return request.client.host if request.client else None


_AUTHORIZE_PARAMETERS = {
    "response_type": ("code", True),
    "client_id": ("the app's client id", True),
    "redirect_uri": ("one of the app's registered redirect URIs, exactly", True),
    "scope": (
        "space-separated scopes, e.g. 'openid fhirUser launch/patient patient/*.rs offline_access'",
        True,
    ),
    "state": ("an unguessable value the app checks on return", True),
    "aud": ("this server's FHIR base URL", True),
    "code_challenge": ("PKCE: BASE64URL(SHA256(code_verifier))", True),
    "code_challenge_method": ("S256 (plain is refused)", True),
    "nonce": ("OpenID Connect: echoed in the id_token", False),
}


@router.get(
    "/auth/authorize",
    operation_id="authorize",
    summary="Authorization endpoint (SMART App Launch standalone launch): sign-in, patient choice and"
    " consent pages, then a redirect to redirect_uri with code and state",
    response_class=HTMLResponse,
    openapi_extra={
        "parameters": [
            {
                "in": "query",
                "name": name,
                "required": required,
                "description": text,
                "schema": {"type": "string"},
            }
            for name, (text, required) in _AUTHORIZE_PARAMETERS.items()
        ]
    },
    responses={
        200: {"description": "the sign-in page", "content": {"text/html": {}}},
        302: {"description": "redirect to redirect_uri with error and state"},
        400: {"description": "unknown client_id or unregistered redirect_uri (shown, never redirected)"},
    },
)
async def authorize(request: Request) -> Response:
    endpoint: AuthorizationEndpoint = request.app.state.authorize
    answer = await endpoint.start(list(request.query_params.multi_items()), _address(request))
    return _answer(answer, request, after_post=False)


async def _form_step(
    request: Request, step: Callable[[AuthorizationEndpoint, dict[str, str]], Awaitable[Answer]]
) -> Response:
    """One posted step of the authorization pages: the form read (an unreadable one is an error
    page, never a redirect), then ``step`` of the authorization endpoint on it."""
    try:
        form = await _form(request)
    except OAuthError as exc:
        return _bad_form(exc)
    endpoint: AuthorizationEndpoint = request.app.state.authorize
    return _answer(await step(endpoint, form), request, after_post=True)


@router.post("/auth/authorize", include_in_schema=False)
async def authorize_post(request: Request) -> Response:
    """SMART App Launch: the authorization request may also be a form post."""
    return await _form_step(request, lambda e, form: e.start(list(form.items()), _address(request)))


@router.post("/auth/authorize/login", include_in_schema=False)
async def authorize_login(request: Request) -> Response:
    return await _form_step(request, lambda e, form: e.login(form, request.cookies, _address(request)))


@router.post("/auth/authorize/patient", include_in_schema=False)
async def authorize_patient(request: Request) -> Response:
    return await _form_step(request, lambda e, form: e.choose_patient(form, request.cookies))


@router.post("/auth/authorize/consent", include_in_schema=False)
async def authorize_consent(request: Request) -> Response:
    return await _form_step(request, lambda e, form: e.consent(form, request.cookies, _address(request)))


@router.post("/auth/authorize/upstream", include_in_schema=False)
async def authorize_upstream(request: Request) -> Response:
    """Sign in at the upstream OpenID Connect provider instead (CARECOORD_OIDC_ISSUER)."""
    return await _form_step(request, lambda e, form: e.upstream_start(form, request.cookies))


@router.get(CALLBACK_PATH, include_in_schema=False)
async def authorize_upstream_callback(request: Request) -> Response:
    endpoint: AuthorizationEndpoint = request.app.state.authorize
    params = {
        name: value
        for name, value in request.query_params.items()
        if len(value) <= 4096 and "\x00" not in value
    }
    answer = await endpoint.upstream_callback(params, request.cookies, _address(request))
    return _answer(answer, request, after_post=False)


@router.get(STYLESHEET_PATH, include_in_schema=False)
async def authorize_stylesheet() -> Response:
    return Response(
        STYLESHEET,
        media_type="text/css",
        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )
