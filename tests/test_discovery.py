"""The SMART discovery document advertises only what works (app/auth/server.py smart_configuration).

Every entry is exercised: each endpoint URL answers, the advertised grant types are exactly the
ones /auth/token accepts, each client authentication method and signing algorithm authenticates
(and others do not), each scope in scopes_supported is granted and usable, each capability is
shown working. An entry added without a check here fails the first test.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from joserfc import jwt
from joserfc.jwk import KeySet

from app.auth.clients import register_client
from app.main import create_app
from app.settings import Settings
from tests.auth_support import assertion_form, client_key, public_jwks, sign_assertion
from tests.conftest import BASE_URL, bearer

CHECKED_ENTRIES = {
    "jwks_uri",
    "token_endpoint",
    "introspection_endpoint",
    "grant_types_supported",
    "token_endpoint_auth_methods_supported",
    "token_endpoint_auth_signing_alg_values_supported",
    "introspection_endpoint_auth_methods_supported",
    "scopes_supported",
    "capabilities",
}

GRANT_TYPES = (
    "client_credentials",
    "authorization_code",
    "refresh_token",
    "password",
    "implicit",
    "urn:ietf:params:oauth:grant-type:jwt-bearer",
    "urn:ietf:params:oauth:grant-type:token-exchange",
    "urn:ietf:params:oauth:grant-type:device_code",
)
SIGNING_ALGS = ("RS384", "ES384", "RS256", "ES256", "PS384")
FHIR_JSON = {"content-type": "application/fhir+json"}


@pytest.fixture(scope="module")
async def discovery_app(settings: Settings) -> AsyncIterator[FastAPI]:
    """Failure limits high enough for the refusals this module provokes on purpose."""
    app = create_app(settings.model_copy(update={"auth_failure_limit": 10_000}))
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def http(discovery_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=discovery_app), base_url=BASE_URL
    ) as client:
        yield client


@pytest.fixture
async def config(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/fhir/.well-known/smart-configuration")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


async def _secret_client(app: FastAPI, scope: str, **extra: Any) -> tuple[str, str]:
    client_id, secret = await register_client(app.state.pool, name="discovery test", scope=scope, **extra)
    assert secret is not None
    return client_id, secret


async def _token(http: httpx.AsyncClient, url: str, auth: tuple[str, str], scope: str) -> dict[str, Any]:
    response = await http.post(url, data={"grant_type": "client_credentials", "scope": scope}, auth=auth)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_discovery_has_only_checked_entries_and_no_authorization_endpoint(
    config: dict[str, Any],
) -> None:
    assert set(config) == CHECKED_ENTRIES
    for url in (config["jwks_uri"], config["token_endpoint"], config["introspection_endpoint"]):
        assert url.startswith(f"{BASE_URL}/auth/")


async def test_jwks_uri_publishes_the_keys_that_sign_access_tokens(
    discovery_app: FastAPI, http: httpx.AsyncClient, config: dict[str, Any]
) -> None:
    client_id, secret = await _secret_client(discovery_app, "system/*.rs")
    token = (await _token(http, config["token_endpoint"], (client_id, secret), "system/*.rs"))["access_token"]
    jwks = await http.get(config["jwks_uri"])
    assert jwks.status_code == 200
    claims = jwt.decode(token, KeySet.import_key_set(jwks.json())).claims
    assert claims["client_id"] == client_id


async def test_token_endpoint_accepts_exactly_the_advertised_grant_types(
    discovery_app: FastAPI, http: httpx.AsyncClient, config: dict[str, Any]
) -> None:
    client_id, secret = await _secret_client(discovery_app, "system/*.rs")
    assert config["grant_types_supported"] == ["client_credentials"]
    for grant_type in GRANT_TYPES:
        response = await http.post(
            config["token_endpoint"],
            data={
                "grant_type": grant_type,
                "code": "x",
                "refresh_token": "x",
                "username": "x",
                "password": "x",
            },
            auth=(client_id, secret),
        )
        if grant_type in config["grant_types_supported"]:
            assert response.status_code == 200, (grant_type, response.text)
        else:
            assert response.status_code == 400, grant_type
            assert response.json()["error"] == "unsupported_grant_type", grant_type


async def _authenticate(
    http: httpx.AsyncClient, app: FastAPI, url: str, method: str, extra: dict[str, str], *, alg: str = "ES384"
) -> httpx.Response:
    """A request to ``url`` authenticated with ``method`` by a freshly registered client."""
    scope = "system/*.rs"
    if method == "private_key_jwt":
        key = client_key(alg, f"key-{alg}")
        client_id, _ = await register_client(app.state.pool, name="jwt", scope=scope, jwks=public_jwks(key))
        assertion = sign_assertion(key, client_id, url, alg=alg)
        return await http.post(url, data=assertion_form(assertion, **extra))
    client_id, secret = await _secret_client(app, scope)
    if method == "client_secret_basic":
        return await http.post(
            url, data={"grant_type": "client_credentials", **extra}, auth=(client_id, secret)
        )
    if method == "client_secret_post":
        form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret, **extra}
        return await http.post(url, data=form)
    if method == "none":  # a public client: its id alone
        return await http.post(
            url, data={"grant_type": "client_credentials", "client_id": client_id, **extra}
        )
    raise AssertionError(f"no check for the client authentication method {method}")


async def test_every_advertised_token_endpoint_auth_method_and_alg_authenticates(
    discovery_app: FastAPI, http: httpx.AsyncClient, config: dict[str, Any]
) -> None:
    url = config["token_endpoint"]
    methods = config["token_endpoint_auth_methods_supported"]
    assert methods
    for method in methods:
        if method == "private_key_jwt":
            continue
        response = await _authenticate(http, discovery_app, url, method, {})
        assert response.status_code == 200, (method, response.text)
    algs = config["token_endpoint_auth_signing_alg_values_supported"]
    assert ("private_key_jwt" in methods) == bool(algs)
    for alg in SIGNING_ALGS:
        response = await _authenticate(http, discovery_app, url, "private_key_jwt", {}, alg=alg)
        if alg in algs:
            assert response.status_code == 200, (alg, response.text)
        else:
            assert response.status_code == 401 and response.json()["error"] == "invalid_client", alg
    # A method that is not advertised does not authenticate.
    assert "none" not in methods
    refused = await _authenticate(http, discovery_app, url, "none", {})
    assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"


async def test_every_advertised_introspection_auth_method_authenticates(
    discovery_app: FastAPI, http: httpx.AsyncClient, config: dict[str, Any]
) -> None:
    url = config["introspection_endpoint"]
    token = (await bearer(discovery_app, "system/*.rs", client_id="introspected"))["authorization"][7:]
    for method in config["introspection_endpoint_auth_methods_supported"]:
        response = await _authenticate(http, discovery_app, url, method, {"token": token})
        assert response.status_code == 200, (method, response.text)
        # Authenticated (a failure is a 401): another client's token is reported inactive to it.
        assert response.json() == {"active": False}, method
    introspector_id, secret = await _secret_client(discovery_app, "system/*.rs", introspection=True)
    answer = await http.post(url, data={"token": token}, auth=(introspector_id, secret))
    assert answer.json()["active"] is True
    assert answer.json()["client_id"] == "introspected"


async def _use(http: httpx.AsyncClient, token: str, scope: str, patient_id: str) -> None:
    """Do with the token what its scope allows: read/search and, where it allows it, create."""
    headers = {"authorization": f"Bearer {token}", "accept": "application/fhir+json"}
    action = scope.split(".", 1)[1]
    if action in ("read", "rs", "cruds", "*"):
        found = await http.get("/fhir/Patient", params={"_id": patient_id}, headers=headers)
        assert found.status_code == 200, (scope, found.text)
        assert found.json()["total"] == 1, scope
        read = await http.get(f"/fhir/Patient/{patient_id}", headers=headers)
        assert read.status_code == 200, scope
    if action in ("write", "cruds", "*"):
        created = await http.post(
            "/fhir/Condition",
            json={"resourceType": "Condition", "subject": {"reference": f"Patient/{patient_id}"}},
            headers={**headers, **FHIR_JSON},
        )
        assert created.status_code == 201, (scope, created.text)
    if action not in ("read", "rs", "cruds", "*", "write"):
        raise AssertionError(f"no check for the scope {scope}")


async def test_every_advertised_scope_is_granted_and_works(
    discovery_app: FastAPI, http: httpx.AsyncClient, config: dict[str, Any]
) -> None:
    admin = await bearer(discovery_app)
    patient_id = f"disc-{uuid.uuid4().hex[:12]}"
    put = await http.put(
        f"/fhir/Patient/{patient_id}",
        json={"resourceType": "Patient", "id": patient_id},
        headers={**admin, **FHIR_JSON},
    )
    assert put.status_code == 201, put.text
    for scope in config["scopes_supported"]:
        context = {"patient": patient_id} if scope.startswith("patient/") else {}
        client_id, secret = await _secret_client(discovery_app, scope, **context)
        body = await _token(http, config["token_endpoint"], (client_id, secret), scope)
        assert body["scope"] == scope
        await _use(http, body["access_token"], scope, patient_id)


async def test_every_advertised_capability_works(
    discovery_app: FastAPI, http: httpx.AsyncClient, config: dict[str, Any]
) -> None:
    url = config["token_endpoint"]
    admin = await bearer(discovery_app)
    own, other = f"cap-{uuid.uuid4().hex[:12]}", f"cap-{uuid.uuid4().hex[:12]}"
    for patient_id in (own, other):
        response = await http.put(
            f"/fhir/Patient/{patient_id}",
            json={"resourceType": "Patient", "id": patient_id},
            headers={**admin, **FHIR_JSON},
        )
        assert response.status_code == 201

    async def asymmetric() -> None:
        response = await _authenticate(http, discovery_app, url, "private_key_jwt", {})
        assert response.status_code == 200, response.text

    async def symmetric() -> None:
        response = await _authenticate(http, discovery_app, url, "client_secret_basic", {})
        assert response.status_code == 200, response.text

    async def scope_form(scope: str) -> None:
        client_id, secret = await _secret_client(discovery_app, scope)
        body = await _token(http, url, (client_id, secret), scope)
        await _use(http, body["access_token"], scope, own)

    async def patient_scopes() -> None:
        client_id, secret = await _secret_client(discovery_app, "patient/*.rs", patient=own)
        body = await _token(http, url, (client_id, secret), "patient/*.rs")
        assert body["patient"] == own
        headers = {"authorization": f"Bearer {body['access_token']}"}
        assert (await http.get(f"/fhir/Patient/{own}", headers=headers)).status_code == 200
        assert (await http.get(f"/fhir/Patient/{other}", headers=headers)).status_code == 404

    checks = {
        "client-confidential-asymmetric": asymmetric,
        "client-confidential-symmetric": symmetric,
        "permission-v1": lambda: scope_form("system/*.read"),
        "permission-v2": lambda: scope_form("system/*.rs"),
        "permission-patient": patient_scopes,
    }
    assert set(config["capabilities"]) <= set(checks), set(config["capabilities"]) - set(checks)
    for capability in config["capabilities"]:
        await checks[capability]()
