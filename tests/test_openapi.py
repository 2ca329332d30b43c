"""The committed OpenAPI document is current, and a generated client gets typed models."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

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
