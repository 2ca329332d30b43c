"""The authorization server's HTTP surface: token, introspection, JWKS, SMART discovery.

Thin: the logic is app/auth/server.py. Responses are plain JSON (OAuth, not FHIR), token and
introspection answers with ``Cache-Control: no-store`` (RFC 6749 §5.1).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.auth.server import FORM_CONTENT_TYPE, AuthorizationServer, OAuthError, OAuthRequest
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
    "client_id": "client_secret_post (or with an assertion, equal to its iss)",
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
    summary="Token endpoint: client_credentials grant (SMART Backend Services)",
    openapi_extra=_form_body(
        {"grant_type": "client_credentials", "scope": "space-separated SMART scopes", **_CLIENT_AUTH_FIELDS},
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
