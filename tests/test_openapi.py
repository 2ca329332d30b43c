"""The committed OpenAPI document is current, and a generated client gets typed models."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from app.main import create_app
from app.openapi import openapi_json
from app.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "openapi" / "openapi.json"


def test_committed_openapi_is_current(settings: Settings) -> None:
    assert SPEC.read_text() == openapi_json(create_app(settings)), (
        "openapi/openapi.json is stale: run `carecoord openapi`"
    )


@pytest.fixture(scope="module")
def generated_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tool = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    assert tool, "openapi-python-client is a test dependency (pip install -e '.[test]')"
    out = tmp_path_factory.mktemp("client")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(
        [tool, "generate", "--path", str(SPEC), "--meta", "none", "--output-path", str(out / "cc_client")],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )
    return out


async def test_generated_client_round_trips_typed_models(
    generated_client: Path, client: httpx.AsyncClient
) -> None:
    sys.path.insert(0, str(generated_client))
    try:
        client_module = importlib.import_module("cc_client")
        patient_models = importlib.import_module("cc_client.models.patient")
        create = importlib.import_module("cc_client.api.patient.create_patient")
        read = importlib.import_module("cc_client.api.patient.read_patient")
        care_plan_models = importlib.import_module("cc_client.models.care_plan")
    finally:
        sys.path.remove(str(generated_client))

    api = client_module.Client(base_url=str(client.base_url))
    api.set_async_httpx_client(client)  # carries the test's bearer token
    patient = patient_models.Patient.from_dict(
        {
            "resourceType": "Patient",
            "name": [{"family": "Nguyen", "given": ["Lan"]}],
            "birthDate": "1948-02-29",
        }
    )
    created = await create.asyncio_detailed(client=api, body=patient)
    assert created.status_code == 201
    assert isinstance(created.parsed, patient_models.Patient)
    fetched = await read.asyncio(created.parsed.id, client=api)
    assert isinstance(fetched, patient_models.Patient)
    assert fetched.name[0].family == "Nguyen"
    assert fetched.meta.version_id == "1"
    assert hasattr(care_plan_models, "CarePlan")


async def test_generated_client_signs_a_person_in_with_the_documented_code_flow(
    generated_client: Path, app: FastAPI, clean_db: None
) -> None:
    """An app built from the OpenAPI document: Authlib's OAuth 2.0 client takes the authorization
    and token URLs from its securitySchemes (authorizationCode flow) and does PKCE S256, a person
    signs in and allows access (the forms followed over HTTP, the redirect received by a real
    loopback server), and the generated client reads with the token."""
    import httpx2
    from authlib.common.security import generate_token
    from authlib.integrations.httpx_client import AsyncOAuth2Client

    from app.auth.clients import register_client
    from app.auth.users import add_user
    from tests.conftest import BASE_URL, FHIR, bearer
    from tests.smart_support import code_receiver, follow_to_receiver, sign_in

    sys.path.insert(0, str(generated_client))
    try:
        client_module = importlib.import_module("cc_client")
        read = importlib.import_module("cc_client.api.patient.read_patient")
    finally:
        sys.path.remove(str(generated_client))
    schemes = json.loads(SPEC.read_text())["components"]["securitySchemes"]
    flow = schemes["smart"]["flows"]["authorizationCode"]
    scope = "openid fhirUser patient/*.rs offline_access"
    assert set(scope.split()) <= set(flow["scopes"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as browser:
        put = await browser.put(
            "/fhir/Patient/oa-client",
            json={"resourceType": "Patient", "id": "oa-client", "name": [{"family": "Osei"}]},
            headers={"content-type": "application/fhir+json", **await bearer(app)},
        )
        assert put.status_code in (200, 201), put.text
        username = f"osei-{uuid.uuid4().hex[:10]}"
        await add_user(
            app.state.pool, username=username, fhir_user="Patient/oa-client", password="generated-client-pw"
        )
        with code_receiver() as receiver:
            client_id, _ = await register_client(
                app.state.pool,
                name="generated",
                scope=scope,
                redirect_uris=[receiver.redirect_uri],
                public=True,
            )
            verifier = generate_token(64)
            async with AsyncOAuth2Client(
                client_id=client_id,
                scope=scope,
                redirect_uri=receiver.redirect_uri,
                code_challenge_method="S256",
                token_endpoint_auth_method="none",
                transport=httpx2.ASGITransport(app=app),
            ) as oauth:
                url, state = oauth.create_authorization_url(
                    BASE_URL + flow["authorizationUrl"], code_verifier=verifier, aud=FHIR
                )
                redirect = await sign_in(browser, url, username=username, password="generated-client-pw")
                await follow_to_receiver(redirect)
                token = await oauth.fetch_token(
                    BASE_URL + flow["tokenUrl"],
                    authorization_response=redirect.headers["location"],
                    code_verifier=verifier,
                )
    assert receiver.last()["state"] == state
    assert token["patient"] == "oa-client" and token["refresh_token"]
    api = client_module.AuthenticatedClient(
        base_url=BASE_URL, token=token["access_token"], httpx_args={"transport": httpx.ASGITransport(app=app)}
    )
    fetched = await read.asyncio("oa-client", client=api)
    assert fetched.name[0].family == "Osei"
