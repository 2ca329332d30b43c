"""CORS (CapabilityStatement rest.security.cors): a browser app on another origin can call the
FHIR API and the token endpoint and read the answers, errors included."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from app.main import create_app
from app.settings import Settings
from tests.conftest import BASE_URL, FHIR

ORIGIN = "https://app.example.org"


async def test_a_preflight_allows_the_fhir_methods_and_headers(client: httpx.AsyncClient) -> None:
    response = await client.options(
        f"{FHIR}/Patient/1",
        headers={
            "origin": ORIGIN,
            "access-control-request-method": "PUT",
            "access-control-request-headers": "authorization, content-type, if-match",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"
    assert "PUT" in response.headers["access-control-allow-methods"]
    allowed = response.headers["access-control-allow-headers"].lower()
    assert {"authorization", "content-type", "if-match"} <= {h.strip() for h in allowed.split(",")}
    assert "access-control-allow-credentials" not in response.headers  # bearer tokens, no cookies


async def test_answers_and_errors_are_readable_from_another_origin(client: httpx.AsyncClient) -> None:
    created = await client.post(
        f"{FHIR}/Patient", json={"resourceType": "Patient"}, headers={"origin": ORIGIN}
    )
    assert created.status_code == 201
    assert created.headers["access-control-allow-origin"] == "*"
    exposed = {h.strip().lower() for h in created.headers["access-control-expose-headers"].split(",")}
    assert {"location", "etag", "last-modified", "x-request-id"} <= exposed
    missing = await client.get(f"{FHIR}/Patient/nobody", headers={"origin": ORIGIN})
    assert missing.status_code == 404 and missing.headers["access-control-allow-origin"] == "*"
    metadata = await client.get(f"{FHIR}/metadata")
    assert metadata.json()["rest"][0]["security"]["cors"] is True


async def test_origins_can_be_limited_or_cors_turned_off(settings: Settings) -> None:
    for origins, allowed, cors in ((ORIGIN, ORIGIN, True), ("", None, False)):
        app: FastAPI = create_app(settings.model_copy(update={"cors_origins": origins}))
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http,
        ):
            for origin in (ORIGIN, "https://evil.example"):
                answer = await http.get(f"{FHIR}/metadata", headers={"origin": origin})
                expected = allowed if origin == ORIGIN else None
                assert answer.headers.get("access-control-allow-origin") == expected
            assert (await http.get(f"{FHIR}/metadata")).json()["rest"][0]["security"]["cors"] is cors
