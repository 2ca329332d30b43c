"""The OAuth2 / SMART Backend Services authorization server (/auth, discovery, tokens, CLI).

Against the real app over ASGI and a real PostgreSQL; client and issuer JWK Sets are served
by a real HTTP server on a loopback port; Authlib's OAuth client exercises private_key_jwt.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from authlib.integrations.httpx_client import AsyncOAuth2Client
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from fastapi import FastAPI
from joserfc import jwt
from joserfc.jwk import OctKey

from app.auth import jwks as jwks_module
from app.auth.clients import ClientRegistrationError, register_client
from app.auth.grants import covers, narrow_scopes
from app.auth.keys import SIGNING_ALG, maintain_signing_keys
from app.auth.tokens import InvalidToken, TokenService, build_token_service
from app.main import create_app
from app.settings import Settings
from tests import REPO_ROOT
from tests.auth_support import (
    ASSERTION_TYPE,
    JwksServer,
    assertion_form,
    client_key,
    public_jwks,
    sign_assertion,
)
from tests.conftest import forget_auth_failures, register_test_client

BASE = "http://cc.test"
FHIR_BASE = f"{BASE}/fhir"
TOKEN_URL = f"{BASE}/auth/token"
INTROSPECT_URL = f"{BASE}/auth/introspect"
IDP = "https://idp.example.test"


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[JwksServer]:
    with JwksServer() as server:
        yield server


@pytest.fixture(scope="module")
def idp_key(jwks_server: JwksServer) -> Any:
    key = client_key("RS256", "idp-key-1")
    jwks_server.documents["/idp/jwks"] = public_jwks(key)
    jwks_server.cache_control["/idp/jwks"] = "public, max-age=600"
    return key


@pytest.fixture(scope="module")
async def auth_app(settings: Settings, jwks_server: JwksServer, idp_key: Any) -> AsyncIterator[FastAPI]:
    """The app with a trusted external issuer (keys on the loopback server); failure limits high
    enough that the negative tests here do not trip them (rate limiting has its own app)."""
    app_settings = settings.model_copy(
        update={
            "trusted_issuers": [
                {"issuer": IDP, "jwks_url": jwks_server.url("/idp/jwks"), "audience": FHIR_BASE}
            ],
            "auth_failure_limit": 10_000,
        }
    )
    app = create_app(app_settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def http(auth_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=auth_app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        yield client


@pytest.fixture
def tokens(auth_app: FastAPI) -> TokenService:
    service: TokenService = auth_app.state.tokens
    return service


async def _secret_client(app: FastAPI, scope: str = "system/*.rs", **extra: Any) -> tuple[str, str]:
    client_id, secret = await register_client(app.state.pool, name="test secret client", scope=scope, **extra)
    assert secret is not None
    return client_id, secret


def _token_form(**extra: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", **extra}


def _assert_oauth_error(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    assert body["error"] == error
    assert body["error_description"]
    return body


# --- scope covering ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("registered", "requested", "expected"),
    [
        ("system/*.cruds", "system/Patient.rs", True),
        ("system/Patient.read", "system/Patient.rs", True),
        ("system/Patient.read", "system/Patient.r", True),
        ("system/Patient.rs", "system/Patient.read", True),
        ("system/Patient.read", "system/Patient.cud", False),
        ("system/*.write", "system/Observation.cud", True),
        ("system/*.*", "system/Observation.cruds", True),
        ("system/Patient.cruds", "system/Observation.rs", False),
        ("system/*.rs", "user/Patient.rs", False),
        ("system/*.rs", "system/*.cruds", False),
        ("system/Observation.rs?category=vital-signs", "system/Observation.rs", False),
        ("system/Observation.rs", "system/Observation.rs?category=vital-signs", True),
        ("system/Patient.sr", "system/Patient.s", False),  # out-of-order letters: not a scope
        ("launch", "launch", True),
        ("launch", "launch/patient", False),
    ],
)
def test_registered_scope_covers_requested(registered: str, requested: str, expected: bool) -> None:
    assert covers(registered, requested) is expected


def test_narrowing_keeps_requested_form_and_patient_context() -> None:
    registered = "system/Patient.read system/Observation.*"
    assert narrow_scopes(
        registered, "system/Patient.rs system/Observation.cud user/Patient.rs", patient_context=False
    ) == ["system/Patient.rs", "system/Observation.cud"]
    assert narrow_scopes(registered, None, patient_context=False) == registered.split()
    assert narrow_scopes("patient/*.rs", "patient/Observation.rs system/*.rs", patient_context=True) == [
        "patient/Observation.rs"
    ]


# --- secret clients --------------------------------------------------------------------------


async def test_secret_client_basic_gets_a_token_that_verifies(
    http: httpx.AsyncClient, auth_app: FastAPI, tokens: TokenService
) -> None:
    client_id, secret = await _secret_client(auth_app, "system/*.rs")
    response = await http.post(
        "/auth/token", data=_token_form(scope="system/Patient.rs"), auth=(client_id, secret)
    )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 300
    assert body["scope"] == "system/Patient.rs"
    assert "patient" not in body
    claims = await tokens.verify(body["access_token"])
    assert claims.client_id == client_id
    assert claims.subject == client_id
    assert claims.scope == "system/Patient.rs"
    assert claims.issuer == BASE
    assert claims.patient is None and claims.organization is None
    assert claims.token_id
    assert abs(claims.expires_at - (time.time() + 300)) < 10
    header, payload = _decode_parts(body["access_token"])
    assert header["alg"] == "ES256" and header["kid"]
    assert payload["aud"] == FHIR_BASE
    assert payload["iss"] == BASE


async def test_secret_client_post_and_registered_scopes_by_default(
    http: httpx.AsyncClient, auth_app: FastAPI, tokens: TokenService
) -> None:
    client_id, secret = await _secret_client(
        auth_app, "system/Patient.read system/Task.cruds", organization="Organization/partner-1"
    )
    response = await http.post("/auth/token", data=_token_form(client_id=client_id, client_secret=secret))
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "system/Patient.read system/Task.cruds"
    claims = await tokens.verify(response.json()["access_token"])
    assert claims.organization == "Organization/partner-1"


async def test_wrong_secret_is_invalid_client(http: httpx.AsyncClient, auth_app: FastAPI) -> None:
    client_id, secret = await _secret_client(auth_app)
    basic = await http.post("/auth/token", data=_token_form(), auth=(client_id, secret + "x"))
    _assert_oauth_error(basic, 401, "invalid_client")
    assert basic.headers["www-authenticate"].startswith("Basic")
    posted = await http.post("/auth/token", data=_token_form(client_id=client_id, client_secret="nope"))
    _assert_oauth_error(posted, 401, "invalid_client")
    unknown = await http.post("/auth/token", data=_token_form(), auth=("no-such-client", secret))
    _assert_oauth_error(unknown, 401, "invalid_client")
    anonymous = await http.post("/auth/token", data=_token_form(client_id=client_id))
    _assert_oauth_error(anonymous, 401, "invalid_client")


async def test_request_errors(http: httpx.AsyncClient, auth_app: FastAPI) -> None:
    client_id, secret = await _secret_client(auth_app)
    unsupported = await http.post(
        "/auth/token",
        data={"grant_type": "password", "username": "u", "password": "p"},
        auth=(client_id, secret),
    )
    _assert_oauth_error(unsupported, 400, "unsupported_grant_type")
    missing = await http.post("/auth/token", data={"scope": "system/*.rs"}, auth=(client_id, secret))
    _assert_oauth_error(missing, 400, "invalid_request")
    as_json = await http.post("/auth/token", json=_token_form(), auth=(client_id, secret))
    _assert_oauth_error(as_json, 400, "invalid_request")
    repeated = await http.post(
        "/auth/token",
        content=b"grant_type=client_credentials&scope=a&scope=b",
        headers={"content-type": "application/x-www-form-urlencoded"},
        auth=(client_id, secret),
    )
    _assert_oauth_error(repeated, 400, "invalid_request")
    two_methods = await http.post(
        "/auth/token", data=_token_form(client_id=client_id, client_secret=secret), auth=(client_id, secret)
    )
    _assert_oauth_error(two_methods, 400, "invalid_request")


async def test_scope_narrowing_and_invalid_scope(http: httpx.AsyncClient, auth_app: FastAPI) -> None:
    client_id, secret = await _secret_client(auth_app, "system/Patient.read system/Observation.*")
    narrowed = await http.post(
        "/auth/token",
        data=_token_form(scope="system/Patient.rs system/Observation.cud system/Task.rs user/Patient.rs"),
        auth=(client_id, secret),
    )
    assert narrowed.status_code == 200, narrowed.text
    assert narrowed.json()["scope"] == "system/Patient.rs system/Observation.cud"
    refused = await http.post(
        "/auth/token", data=_token_form(scope="system/Task.rs system/Patient.cud"), auth=(client_id, secret)
    )
    _assert_oauth_error(refused, 400, "invalid_scope")


async def test_patient_client_gets_patient_context_only(
    http: httpx.AsyncClient, auth_app: FastAPI, tokens: TokenService
) -> None:
    client_id, secret = await _secret_client(auth_app, "patient/*.rs", patient="pat-7")
    response = await http.post(
        "/auth/token", data=_token_form(scope="patient/Observation.rs"), auth=(client_id, secret)
    )
    assert response.status_code == 200, response.text
    assert response.json()["patient"] == "pat-7"
    claims = await tokens.verify(response.json()["access_token"])
    assert claims.patient == "pat-7"
    assert claims.scope == "patient/Observation.rs"
    system = await http.post("/auth/token", data=_token_form(scope="system/*.rs"), auth=(client_id, secret))
    _assert_oauth_error(system, 400, "invalid_scope")
    with pytest.raises(ClientRegistrationError):
        await register_client(auth_app.state.pool, name="x", scope="system/*.rs", patient="pat-7")
    with pytest.raises(ClientRegistrationError):
        await register_client(auth_app.state.pool, name="x", scope="patient/*.rs")
    with pytest.raises(ClientRegistrationError):
        await register_client(auth_app.state.pool, name="x", scope="system/*.rs", organization="Patient/1")


# --- private_key_jwt (SMART Backend Services) ---------------------------------------------------


async def _jwks_client(app: FastAPI, alg: str, scope: str = "system/*.rs") -> tuple[str, Any]:
    key = client_key(alg)
    client_id, secret = await register_client(
        app.state.pool, name=f"backend {alg}", scope=scope, jwks=public_jwks(key)
    )
    assert secret is None
    return client_id, key


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
async def test_authlib_private_key_jwt_client(auth_app: FastAPI, tokens: TokenService, alg: str) -> None:
    client_id, key = await _jwks_client(auth_app, alg, "system/*.rs system/Task.cruds")
    auth_method = PrivateKeyJWT(
        TOKEN_URL,
        alg=alg,
        headers={"kid": key.kid},
        # SMART: exp no more than five minutes ahead (Authlib's default is an hour).
        claims={"exp": int(time.time()) + 240},
    )
    async with AsyncOAuth2Client(
        client_id=client_id,
        client_secret=key,
        token_endpoint_auth_method=auth_method,
        scope="system/Patient.rs system/Task.cud",
        # Authlib's httpx integration runs on httpx2 (its httpx fallback is deprecated).
        transport=httpx2.ASGITransport(app=auth_app),
    ) as oauth:
        token = await oauth.fetch_token(TOKEN_URL, grant_type="client_credentials")
    assert token["token_type"] == "bearer"
    assert token["scope"] == "system/Patient.rs system/Task.cud"
    claims = await tokens.verify(token["access_token"])
    assert claims.client_id == client_id
    assert claims.scope == "system/Patient.rs system/Task.cud"


async def test_assertion_replay_is_refused(http: httpx.AsyncClient, auth_app: FastAPI) -> None:
    client_id, key = await _jwks_client(auth_app, "ES384")
    assertion = sign_assertion(key, client_id, TOKEN_URL, alg="ES384")
    first = await http.post("/auth/token", data=assertion_form(assertion, scope="system/Patient.rs"))
    assert first.status_code == 200, first.text
    replay = await http.post("/auth/token", data=assertion_form(assertion, scope="system/Patient.rs"))
    body = _assert_oauth_error(replay, 401, "invalid_client")
    assert "jti" in body["error_description"]
    # The same jti in a fresh assertion is a replay too.
    jti = _decode_parts(assertion)[1]["jti"]
    again = sign_assertion(key, client_id, TOKEN_URL, alg="ES384", jti=jti)
    _assert_oauth_error(await http.post("/auth/token", data=assertion_form(again)), 401, "invalid_client")


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"exp": -120}, "expired"),
        ({"exp": 600}, "five minutes"),
        ({"aud": f"{BASE}/other/token"}, "aud"),
        ({"aud": FHIR_BASE}, "aud"),
        ({"jti": None}, "jti"),
        ({"exp": None}, "exp"),
        ({"sub": "someone-else"}, "sub"),
    ],
)
async def test_bad_assertions_are_invalid_client(
    http: httpx.AsyncClient, auth_app: FastAPI, overrides: dict[str, Any], reason: str
) -> None:
    client_id, key = await _jwks_client(auth_app, "RS384")
    claims = dict(overrides)
    if isinstance(claims.get("exp"), int):
        claims["exp"] = int(time.time()) + claims["exp"]
    assertion = sign_assertion(key, client_id, TOKEN_URL, alg="RS384", **claims)
    response = await http.post("/auth/token", data=assertion_form(assertion))
    assert reason in _assert_oauth_error(response, 401, "invalid_client")["error_description"]


async def test_assertion_keys_and_algorithms(http: httpx.AsyncClient, auth_app: FastAPI) -> None:
    client_id, key = await _jwks_client(auth_app, "ES384")
    unknown_kid = sign_assertion(key, client_id, TOKEN_URL, alg="ES384", kid="not-registered")
    _assert_oauth_error(
        await http.post("/auth/token", data=assertion_form(unknown_kid)), 401, "invalid_client"
    )
    # A different key presenting the registered kid: the signature does not verify.
    impostor = client_key("ES384", key.kid)
    forged = sign_assertion(impostor, client_id, TOKEN_URL, alg="ES384")
    _assert_oauth_error(await http.post("/auth/token", data=assertion_form(forged)), 401, "invalid_client")
    # SMART allows RS384 and ES384 only.
    es256_key = client_key("ES256")
    es256_id, _ = await register_client(
        auth_app.state.pool, name="es256", scope="system/*.rs", jwks=public_jwks(es256_key)
    )
    es256 = sign_assertion(es256_key, es256_id, TOKEN_URL, alg="ES256")
    _assert_oauth_error(await http.post("/auth/token", data=assertion_form(es256)), 401, "invalid_client")
    unsigned = _unsigned_jwt({"alg": "none", "kid": key.kid}, _decode_parts(forged)[1])
    _assert_oauth_error(await http.post("/auth/token", data=assertion_form(unsigned)), 401, "invalid_client")
    # client_id, when sent, must be the assertion's issuer.
    good = sign_assertion(key, client_id, TOKEN_URL, alg="ES384")
    mismatch = await http.post("/auth/token", data=assertion_form(good, client_id="another"))
    _assert_oauth_error(mismatch, 401, "invalid_client")
    wrong_type = {**assertion_form(good), "client_assertion_type": "urn:example:other"}
    _assert_oauth_error(await http.post("/auth/token", data=wrong_type), 401, "invalid_client")
    # A secret client cannot authenticate with an assertion, nor a JWKS client with a secret.
    secret_id, secret = await _secret_client(auth_app)
    as_secret_client = sign_assertion(key, secret_id, TOKEN_URL, alg="ES384")
    _assert_oauth_error(
        await http.post("/auth/token", data=assertion_form(as_secret_client)), 401, "invalid_client"
    )
    _assert_oauth_error(
        await http.post("/auth/token", data=_token_form(), auth=(client_id, secret)), 401, "invalid_client"
    )


async def test_jwks_url_client_over_loopback_http(
    http: httpx.AsyncClient,
    auth_app: FastAPI,
    tokens: TokenService,
    jwks_server: JwksServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = client_key("ES384")
    path = f"/clients/{uuid.uuid4().hex}/jwks.json"
    jwks_server.documents[path] = public_jwks(key)
    url = jwks_server.url(path)
    client_id, secret = await register_client(
        auth_app.state.pool, name="url client", scope="system/*.rs", jwks_url=url
    )
    assert secret is None
    assertion = sign_assertion(key, client_id, TOKEN_URL, alg="ES384", header={"jku": url})
    response = await http.post("/auth/token", data=assertion_form(assertion, scope="system/Patient.rs"))
    assert response.status_code == 200, response.text
    assert (await tokens.verify(response.json()["access_token"])).client_id == client_id
    assert jwks_server.hits[path] == 1
    # Cached: a second token needs no fetch.
    second = sign_assertion(key, client_id, TOKEN_URL, alg="ES384")
    assert (await http.post("/auth/token", data=assertion_form(second))).status_code == 200
    assert jwks_server.hits[path] == 1
    # jku must be the registered URL.
    elsewhere = sign_assertion(key, client_id, TOKEN_URL, alg="ES384", header={"jku": jwks_server.url("/x")})
    _assert_oauth_error(await http.post("/auth/token", data=assertion_form(elsewhere)), 401, "invalid_client")
    # The client rotates its key: an unknown kid makes the server refetch the set.
    monkeypatch.setattr(jwks_module, "REFETCH_INTERVAL", 0.0)
    new_key = client_key("RS384")
    jwks_server.documents[path] = public_jwks(key, new_key)
    rotated = sign_assertion(new_key, client_id, TOKEN_URL, alg="RS384")
    assert (await http.post("/auth/token", data=assertion_form(rotated))).status_code == 200
    assert jwks_server.hits[path] == 2


# --- the server's keys and tokens ------------------------------------------------------------


async def test_jwks_endpoint_publishes_the_signing_key(http: httpx.AsyncClient, tokens: TokenService) -> None:
    token, _ = await tokens.issue(client_id="c", scope="system/*.rs")
    kid = _decode_parts(token)[0]["kid"]
    response = await http.get("/auth/jwks")
    assert response.status_code == 200
    keys = {key["kid"]: key for key in response.json()["keys"]}
    assert kid in keys
    published = keys[kid]
    assert {"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig"}.items() <= published.items()
    assert published["x"] and published["y"]
    assert not any("d" in key for key in keys.values())


async def test_key_rotation_keeps_old_tokens_valid(
    http: httpx.AsyncClient, auth_app: FastAPI, settings: Settings, tokens: TokenService
) -> None:
    await register_test_client(auth_app, "rotating")
    await register_test_client(auth_app, "other-process")
    old_token, _ = await tokens.issue(client_id="rotating", scope="system/*.rs")
    old_kid = _decode_parts(old_token)[0]["kid"]
    new_kid = await tokens.keys.maintain(force=True)
    assert new_kid and new_kid != old_kid
    new_token, _ = await tokens.issue(client_id="rotating", scope="system/*.rs")
    assert _decode_parts(new_token)[0]["kid"] == new_kid
    # Another process (its own TokenService, same database) verifies both, signatures and all.
    other = await build_token_service(settings, auth_app.state.pool, auth_app.state.http)
    assert (await other.verify(old_token)).client_id == "rotating"
    assert (await other.verify(new_token)).client_id == "rotating"
    published = {key["kid"] for key in (await http.get("/auth/jwks")).json()["keys"]}
    assert {old_kid, new_kid} <= published
    # That process rotates and signs at once; this one accepts the unknown kid after a reload.
    third_kid = await other.keys.maintain(force=True)
    third_token, _ = await other.issue(client_id="other-process", scope="system/*.rs")
    assert _decode_parts(third_token)[0]["kid"] == third_kid
    await asyncio.sleep(1.05)  # unknown-kid reloads are at most once a second
    assert (await tokens.verify(third_token)).client_id == "other-process"


async def test_retired_keys_are_dropped_after_their_tokens_expire(
    auth_app: FastAPI, tokens: TokenService
) -> None:
    pool = auth_app.state.pool
    await pool.execute(
        "INSERT INTO auth_signing_key (kid, private_jwk, created, retired_at) VALUES ($1, $2, $3, $4)",
        "ancient",
        json.dumps(client_key("ES256").as_dict(private=True)),
        datetime.now(UTC) - timedelta(days=40),
        datetime.now(UTC) - timedelta(days=1),
    )
    await tokens.keys.maintain()
    assert await pool.fetchval("SELECT count(*) FROM auth_signing_key WHERE kid = 'ancient'") == 0
    # One signing key of each kind: ES256 (access tokens) and RS256 (id_tokens).
    assert await pool.fetchval("SELECT count(*) FROM auth_signing_key WHERE retired_at IS NULL") == 2


async def test_processes_starting_together_create_one_key(auth_app: FastAPI, settings: Settings) -> None:
    """The current keys are due for rotation (max age 1 s): processes maintaining at once create
    one successor of each kind between them and leave exactly one signing key of each kind."""
    pool = auth_app.state.pool
    await asyncio.sleep(1.1)

    async def one_process() -> str | None:
        async with pool.acquire() as conn:
            return await maintain_signing_keys(conn, max_age=1, token_ttl=settings.token_ttl)

    created = [kid for kid in await asyncio.gather(*(one_process() for _ in range(6))) if kid]
    assert len(created) == 1  # the access-token key's successor
    current = await pool.fetch(
        "SELECT kid, CAST(private_jwk AS jsonb) ->> 'kty' AS kty FROM auth_signing_key"
        " WHERE retired_at IS NULL ORDER BY kty"
    )
    assert [row["kty"] for row in current] == ["EC", "RSA"]
    assert current[0]["kid"] == created[0]


async def test_verify_rejects_bad_tokens(auth_app: FastAPI, tokens: TokenService, idp_key: Any) -> None:
    await register_test_client(auth_app, "c1")
    signing = await tokens.keys.signing_key()
    now = int(time.time())
    good_claims = {
        "iss": BASE,
        "aud": FHIR_BASE,
        "sub": "c1",
        "client_id": "c1",
        "scope": "system/*.rs",
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }

    def ours(header: dict[str, Any] | None = None, **claims: Any) -> str:
        return jwt.encode(
            {"alg": SIGNING_ALG, "kid": signing.kid, **(header or {})},
            {**good_claims, **claims},
            signing.key,
            algorithms=[SIGNING_ALG],
        )

    assert (await tokens.verify(ours())).client_id == "c1"
    payload = _decode_parts(ours())[1]
    cases = {
        "algorithm": _unsigned_jwt({"alg": "none", "kid": signing.kid}, payload),
        "signature": _tamper(ours(), scope="system/*.cruds"),
        "expired": ours(exp=now - 120, iat=now - 420),
        "issuer": ours(iss="http://evil.test"),
        "audience": ours(aud="http://other.test/fhir"),
        "key": ours({"kid": "no-such-key"}),
        "algorithm ": jwt.encode(
            {"alg": "HS256", "kid": signing.kid},
            good_claims,
            OctKey.import_key(json.dumps(signing.key.as_dict(private=False)).encode()),
            algorithms=["HS256"],
        ),
        "malformed": "abc.def",
        "malformed ": "not-a-token",
        "algorithm  ": jwt.encode(
            {"alg": "RS256", "kid": idp_key.kid}, good_claims, idp_key, algorithms=["RS256"]
        ),
        "key ": ours({"kid": idp_key.kid}),
    }
    for reason, token in cases.items():
        with pytest.raises(InvalidToken) as raised:
            await tokens.verify(token)
        assert reason.strip() in str(raised.value), (reason, str(raised.value))
        assert len(str(raised.value)) < 60


async def test_verified_tokens_are_cached(auth_app: FastAPI, tokens: TokenService) -> None:
    await register_test_client(auth_app, "hot")
    token, _ = await tokens.issue(client_id="hot", scope="system/*.rs")
    first = await tokens.verify(token)
    started = time.perf_counter()
    for _ in range(1000):
        assert await tokens.verify(token) is first
    assert time.perf_counter() - started < 0.05  # microseconds each, not a signature check


async def test_trusted_external_issuer(
    http: httpx.AsyncClient, auth_app: FastAPI, tokens: TokenService, idp_key: Any, jwks_server: JwksServer
) -> None:
    now = int(time.time())
    claims = {
        "iss": IDP,
        "aud": [FHIR_BASE, "https://elsewhere.test"],
        "sub": "svc-account-9",
        "azp": "partner-app",
        "scp": ["system/Patient.rs", "system/Task.cu"],
        "fhirOrganization": "https://partner.test/fhir/Organization/org-9",
        "iat": now,
        "exp": now + 600,
    }
    token = jwt.encode({"alg": "RS256", "kid": idp_key.kid}, claims, idp_key, algorithms=["RS256"])
    verified = await tokens.verify(token)
    assert verified.issuer == IDP
    assert verified.client_id == "partner-app"
    assert verified.subject == "svc-account-9"
    assert verified.scope == "system/Patient.rs system/Task.cu"
    assert verified.organization == "Organization/org-9"
    assert verified.patient is None
    # An issuer not in the list is refused even with a key the trusted issuer publishes.
    untrusted = jwt.encode(
        {"alg": "RS256", "kid": idp_key.kid},
        {**claims, "iss": "https://untrusted.test"},
        idp_key,
        algorithms=["RS256"],
    )
    with pytest.raises(InvalidToken):
        await tokens.verify(untrusted)
    wrong_audience = jwt.encode(
        {"alg": "RS256", "kid": idp_key.kid}, {**claims, "aud": BASE}, idp_key, algorithms=["RS256"]
    )
    with pytest.raises(InvalidToken):
        await tokens.verify(wrong_audience)
    stranger = client_key("RS256", idp_key.kid)
    forged = jwt.encode({"alg": "RS256", "kid": idp_key.kid}, claims, stranger, algorithms=["RS256"])
    with pytest.raises(InvalidToken):
        await tokens.verify(forged)
    assert jwks_server.hits["/idp/jwks"] == 1  # max-age=600: fetched once
    # Introspection reports a trusted issuer's token too, to a client registered for introspection.
    client_id, secret = await _secret_client(auth_app, introspection=True)
    response = await http.post("/auth/introspect", data={"token": token}, auth=(client_id, secret))
    assert response.json()["active"] is True
    assert response.json()["iss"] == IDP
    # Any other client learns nothing about it (its client is not that client).
    other_id, other_secret = await _secret_client(auth_app)
    hidden = await http.post("/auth/introspect", data={"token": token}, auth=(other_id, other_secret))
    assert hidden.json() == {"active": False}


async def test_introspection(http: httpx.AsyncClient, auth_app: FastAPI, tokens: TokenService) -> None:
    resource_server, secret = await _secret_client(auth_app, introspection=True)
    await register_test_client(auth_app, "someone", "patient/*.rs", patient="p-1")
    token, _ = await tokens.issue(
        client_id="someone", scope="patient/*.rs", patient="p-1", organization="Organization/o-1"
    )
    active = await http.post("/auth/introspect", data={"token": token}, auth=(resource_server, secret))
    assert active.status_code == 200, active.text
    assert active.headers["cache-control"] == "no-store"
    body = active.json()
    assert body["active"] is True
    assert body["client_id"] == "someone" and body["sub"] == "someone"
    assert body["scope"] == "patient/*.rs"
    assert body["iss"] == BASE
    assert body["token_type"] == "bearer"
    assert body["patient"] == "p-1" and body["organization"] == "Organization/o-1"
    assert body["exp"] > body["iat"]
    inactive = await http.post(
        "/auth/introspect",
        data={"token": _tamper(token, scope="system/*.cruds")},
        auth=(resource_server, secret),
    )
    assert inactive.json() == {"active": False}
    garbage = await http.post("/auth/introspect", data={"token": "garbage"}, auth=(resource_server, secret))
    assert garbage.json() == {"active": False}
    # private_key_jwt callers may address the introspection endpoint (here about their own token;
    # another client's token is {"active": false} to a client not registered for introspection).
    jwks_client, key = await _jwks_client(auth_app, "ES384")
    own_token, _ = await tokens.issue(client_id=jwks_client, scope="system/Patient.rs")
    for introspected, active in ((own_token, True), (token, False)):
        assertion = sign_assertion(key, jwks_client, INTROSPECT_URL, alg="ES384")
        by_key = await http.post(
            "/auth/introspect",
            data={
                "token": introspected,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion,
            },
        )
        assert by_key.status_code == 200, by_key.text
        assert by_key.json()["active"] is active
    unauthenticated = await http.post("/auth/introspect", data={"token": token})
    _assert_oauth_error(unauthenticated, 401, "invalid_client")
    missing = await http.post("/auth/introspect", data={}, auth=(resource_server, secret))
    _assert_oauth_error(missing, 400, "invalid_request")


async def test_failed_requests_are_rate_limited(settings: Settings) -> None:
    limited = create_app(settings.model_copy(update={"auth_failure_limit": 3, "auth_failure_window": 60}))
    async with limited.router.lifespan_context(limited):
        await forget_auth_failures(limited)
        client_id, secret = await _secret_client(limited)

        def at(address: str) -> httpx.AsyncClient:
            transport = httpx.ASGITransport(app=limited, client=(address, 40000))
            return httpx.AsyncClient(transport=transport, base_url=BASE)

        async with at("10.1.1.1") as attacker, at("10.2.2.2") as elsewhere, at("10.3.3.3") as bystander:
            for _ in range(3):
                wrong = await attacker.post("/auth/token", data=_token_form(), auth=(client_id, "guess"))
                _assert_oauth_error(wrong, 401, "invalid_client")
            # Limited now: even the right secret gets 429 from that address...
            blocked = await attacker.post("/auth/token", data=_token_form(), auth=(client_id, secret))
            _assert_oauth_error(blocked, 429, "slow_down")
            assert 1 <= int(blocked.headers["retry-after"]) <= 60
            # ...but not from elsewhere: another address's failures never lock the client out.
            same_client = await elsewhere.post("/auth/token", data=_token_form(), auth=(client_id, secret))
            assert same_client.status_code == 200, same_client.text
            other_id, other_secret = await _secret_client(limited)
            from_attacker = await attacker.post(
                "/auth/introspect", data={"token": "x"}, auth=(other_id, other_secret)
            )
            _assert_oauth_error(from_attacker, 429, "slow_down")
            fine = await bystander.post("/auth/token", data=_token_form(), auth=(other_id, other_secret))
            assert fine.status_code == 200, fine.text

        # Concurrent guesses are counted before their secrets are checked: no more than the limit pass.
        third_id, _ = await _secret_client(limited)
        async with at("10.4.4.4") as burst:
            guesses = await asyncio.gather(
                *(
                    burst.post("/auth/token", data=_token_form(), auth=(third_id, f"guess-{n}"))
                    for n in range(12)
                )
            )
        statuses = sorted(response.status_code for response in guesses)
        assert statuses.count(401) <= 3 and statuses.count(429) >= 9, statuses
        # Successful requests do not count.
        fourth_id, fourth_secret = await _secret_client(limited)
        async with at("10.5.5.5") as busy:
            for _ in range(5):
                ok = await busy.post("/auth/token", data=_token_form(), auth=(fourth_id, fourth_secret))
                assert ok.status_code == 200, ok.text

        # A client that proved its secret from an address is not counted up front there: more
        # concurrent requests than the limit all succeed (a resource server introspecting for
        # every request it serves, workers behind one NAT)...
        async with at("10.6.6.6") as busy:
            first = await busy.post("/auth/token", data=_token_form(), auth=(fourth_id, fourth_secret))
            assert first.status_code == 200, first.text
            right = (fourth_id, fourth_secret)
            burst = await asyncio.gather(
                *(busy.post("/auth/token", data=_token_form(), auth=right) for _ in range(8))
            )
            assert [r.status_code for r in burst] == [200] * 8
            # ...and its first failure there drops the proof: guesses are counted up front again.
            wrong = await busy.post("/auth/token", data=_token_form(), auth=(fourth_id, "guess"))
            _assert_oauth_error(wrong, 401, "invalid_client")
            guesses = await asyncio.gather(
                *(busy.post("/auth/token", data=_token_form(), auth=(fourth_id, f"g{n}")) for n in range(8))
            )
        statuses = sorted(response.status_code for response in guesses)
        assert statuses.count(401) <= 2 and statuses.count(429) >= 6, statuses


@pytest.mark.parametrize(
    "path", ["/fhir/.well-known/smart-configuration", "/.well-known/smart-configuration"]
)
async def test_smart_configuration(http: httpx.AsyncClient, path: str) -> None:
    response = await http.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    config = response.json()
    assert config["token_endpoint"] == TOKEN_URL
    assert config["jwks_uri"] == f"{BASE}/auth/jwks"
    assert config["introspection_endpoint"] == INTROSPECT_URL
    assert config["grant_types_supported"] == ["authorization_code", "refresh_token", "client_credentials"]
    assert set(config["token_endpoint_auth_methods_supported"]) == {
        "private_key_jwt",
        "client_secret_basic",
        "client_secret_post",
        "none",  # public app clients (SMART App Launch, tests/test_smart_launch.py)
    }
    assert config["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert {"system/*.cruds", "system/*.rs", "patient/*.rs", "system/*.read"} <= set(
        config["scopes_supported"]
    )
    # The authorization code flow (tests/test_smart_launch.py; tests/test_discovery.py checks
    # every entry works).
    assert config["authorization_endpoint"] == f"{BASE}/auth/authorize"
    assert config["response_types_supported"] == ["code"]
    assert config["code_challenge_methods_supported"] == ["S256"]
    assert config["issuer"] == BASE
    assert {
        "client-confidential-asymmetric",
        "client-confidential-symmetric",
        "permission-v1",
        "permission-v2",
    } <= set(config["capabilities"])


# --- the CLI ---------------------------------------------------------------------------------


def _cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CARECOORD_DATABASE_URL"}
    env["DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_cli_clients_add_list_remove(
    database_url: str, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    added = await asyncio.to_thread(
        _cli, database_url, "clients", "add", "--name", "CLI client", "--scope", "system/*.rs", "--json"
    )
    assert added.returncode == 0, added.stderr
    registered = json.loads(added.stdout)
    client_id, secret = registered["client_id"], registered["client_secret"]
    assert secret
    token = await http.post("/auth/token", data=_token_form(), auth=(client_id, secret))
    assert token.status_code == 200, token.text

    key = client_key("ES384")
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(public_jwks(key)))
    with_keys = await asyncio.to_thread(
        _cli,
        database_url,
        "clients",
        "add",
        "--name",
        "CLI backend",
        "--scope",
        "system/Patient.rs",
        "--organization",
        "Organization/org-cli",
        "--jwks-file",
        str(jwks_file),
        "--json",
    )
    assert with_keys.returncode == 0, with_keys.stderr
    backend = json.loads(with_keys.stdout)
    assert backend["client_secret"] is None
    assertion = sign_assertion(key, backend["client_id"], TOKEN_URL, alg="ES384")
    assert (await http.post("/auth/token", data=assertion_form(assertion))).status_code == 200

    listed = await asyncio.to_thread(_cli, database_url, "clients", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    by_id = {entry["client_id"]: entry for entry in json.loads(listed.stdout)}
    assert by_id[client_id]["name"] == "CLI client"
    assert by_id[backend["client_id"]]["organization"] == "Organization/org-cli"
    assert secret not in listed.stdout and "scrypt" not in listed.stdout

    removed = await asyncio.to_thread(_cli, database_url, "clients", "remove", client_id)
    assert removed.returncode == 0, removed.stderr
    refused = await http.post("/auth/token", data=_token_form(), auth=(client_id, secret))
    _assert_oauth_error(refused, 401, "invalid_client")
    again = await asyncio.to_thread(_cli, database_url, "clients", "remove", client_id)
    assert again.returncode == 1

    bad = await asyncio.to_thread(
        _cli, database_url, "clients", "add", "--name", "bad", "--scope", "system/Patient.xyz"
    )
    assert bad.returncode == 2 and "scope" in bad.stderr


async def test_cli_keys_rotate(database_url: str, auth_app: FastAPI, tokens: TokenService) -> None:
    await register_test_client(auth_app, "pre-rotation")
    before, _ = await tokens.issue(client_id="pre-rotation", scope="system/*.rs")
    rotated = await asyncio.to_thread(_cli, database_url, "keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    current = await auth_app.state.pool.fetchval(
        "SELECT kid FROM auth_signing_key WHERE retired_at IS NULL ORDER BY created DESC LIMIT 1"
    )
    assert current in rotated.stdout
    await tokens.keys.maintain()  # what a running server does within a minute
    after, _ = await tokens.issue(client_id="post-rotation", scope="system/*.rs")
    assert _decode_parts(after)[0]["kid"] == current
    assert (await tokens.verify(before)).client_id == "pre-rotation"


# --- helpers -----------------------------------------------------------------------------------


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _decode_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload, _ = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return json.loads(base64.urlsafe_b64decode(pad(header))), json.loads(
        base64.urlsafe_b64decode(pad(payload))
    )


def _unsigned_jwt(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{_b64(header)}.{_b64(payload)}."


def _tamper(token: str, **claims: Any) -> str:
    """The token with changed claims and the original signature."""
    header, _payload, signature = token.split(".")
    changed = {**_decode_parts(token)[1], **claims}
    return f"{header}.{_b64(changed)}.{signature}"
