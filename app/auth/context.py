"""Bearer token -> AccessContext (RFC 6750; SMART App Launch 2.x scopes).

``authenticate`` is the request's whole authentication step: no token is a 401 with a
bare ``WWW-Authenticate: Bearer`` challenge (RFC 6750 section 3: no error code when the
request carried no credentials); a token that fails verification is a 401 with
``error="invalid_token"``. What the token may do is decided later, in storage.
"""

from __future__ import annotations

from functools import lru_cache

from app.auth.scopes import parse_scopes
from app.auth.tokens import InvalidToken, TokenClaims, TokenService
from app.fhir.access import AccessContext
from app.fhir.errors import Unauthorized

REALM = 'realm="carecoord"'


@lru_cache(maxsize=4096)
def access_context(claims: TokenClaims) -> AccessContext:
    """The access context of verified claims (cached: tokens are reused for their lifetime)."""
    return AccessContext(
        client_id=claims.client_id,
        organization=claims.organization,
        patient=claims.patient,
        user=claims.fhir_user,
        permissions=parse_scopes(claims.scope),
        unrestricted=False,
        external=claims.external,
    )


async def authenticate(authorization: str | None, tokens: TokenService) -> AccessContext:
    """The caller's access context from its ``Authorization`` header."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    token = credentials.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(
            "this request needs an access token (Authorization: Bearer)",
            headers={"WWW-Authenticate": f"Bearer {REALM}"},
        )
    try:
        claims = await tokens.verify(token)
    except InvalidToken as exc:
        reason = str(exc).replace('"', "'")[:200]
        raise Unauthorized(
            f"the access token is not valid: {reason}",
            headers={
                "WWW-Authenticate": f'Bearer {REALM}, error="invalid_token", error_description="{reason}"'
            },
        ) from exc
    return access_context(claims)
