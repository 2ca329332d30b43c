"""Bad input of every kind gets the right 4xx OperationOutcome and changes nothing."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import count_rows
from tests.samples import SAMPLES

JSON = {"content-type": "application/fhir+json"}

BAD_BODIES: list[tuple[str, bytes, int, str | None]] = [
    ("malformed json", b'{"resourceType": "Patient",', 400, None),
    ("not an object", b'["Patient"]', 400, None),
    ("empty body", b"", 400, None),
    ("missing resourceType", b'{"name": [{"family": "x"}]}', 400, "resourceType"),
    (
        "wrong resourceType",
        b'{"resourceType": "Observation", "status": "final", "code": {"text": "x"}}',
        400,
        "resourceType",
    ),
    (
        "unknown element",
        b'{"resourceType": "Patient", "favouriteColour": "blue"}',
        400,
        "Patient.favouriteColour",
    ),
    ("bad date", b'{"resourceType": "Patient", "birthDate": "1970-13-45"}', 400, "Patient.birthDate"),
    ("wrong type", b'{"resourceType": "Patient", "name": {"family": "x"}}', 400, "Patient.name"),
    (
        "bad nested type",
        b'{"resourceType": "Patient", "name": [{"given": [7]}]}',
        400,
        "Patient.name[0].given[0]",
    ),
    ("bad required code", b'{"resourceType": "Patient", "gender": "robot"}', 400, "Patient.gender"),
    (
        "bad nested code",
        b'{"resourceType": "Patient", "telecom": [{"system": "pager2", "value": "1"}]}',
        400,
        "Patient.telecom[0].system",
    ),
    (
        "unknown contained type",
        b'{"resourceType": "Patient", "contained": [{"resourceType": "Nope", "id": "a"}]}',
        400,
        None,
    ),
    ("not utf-8", b'{"resourceType": "Patient", "name": [{"family": "\xff\xfe"}]}', 400, None),
    (
        "deep nesting",
        b'{"resourceType": "Patient", "extension": ' + b'[{"extension": ' * 200 + b"[]" + b"}]" * 200 + b"}",
        400,
        None,
    ),
    ("very deep nesting", b'{"a":' * 100000 + b"1" + b"}" * 100000, 400, None),
]


@pytest.mark.parametrize(
    ("label", "body", "status", "expression"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES]
)
async def test_bad_create_bodies(
    client: httpx.AsyncClient,
    engine: AsyncEngine,
    label: str,
    body: bytes,
    status: int,
    expression: str | None,
) -> None:
    response = await client.post("/fhir/Patient", content=body, headers=JSON)
    assert response.status_code in (status, 413), label
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] in ("error", "fatal")
    if expression:
        expressions = [e for issue in outcome["issue"] for e in issue.get("expression", [])]
        assert expression in expressions
    assert await count_rows(engine) == 0


@pytest.mark.parametrize(
    ("resource_type", "element", "value"),
    [
        ("Task", "status", "done"),
        ("Task", "intent", "wish"),
        ("CarePlan", "status", "ongoing"),
        ("CarePlan", "intent", "maybe"),
        ("Goal", "lifecycleStatus", "finished"),
        ("ServiceRequest", "status", "open"),
        ("ServiceRequest", "intent", "please"),
        ("Consent", "status", "yes"),
        ("Observation", "status", "seen"),
    ],
)
async def test_required_binding_codes_of_status_elements(
    client: httpx.AsyncClient, engine: AsyncEngine, resource_type: str, element: str, value: str
) -> None:
    body = {**SAMPLES[resource_type], element: value}
    response = await client.post(f"/fhir/{resource_type}", json=body, headers=JSON)
    assert response.status_code == 400
    assert response.json()["issue"][0]["expression"] == [f"{resource_type}.{element}"]
    assert await count_rows(engine) == 0


async def test_missing_required_element(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    body = {k: v for k, v in SAMPLES["Task"].items() if k != "status"}
    response = await client.post("/fhir/Task", json=body, headers=JSON)
    assert response.status_code == 400
    assert await count_rows(engine) == 0


async def test_update_id_rules(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    created = (await client.post("/fhir/Patient", json=SAMPLES["Patient"], headers=JSON)).json()
    url = f"/fhir/Patient/{created['id']}"
    other = await client.put(url, json={**created, "id": "someone-else"}, headers=JSON)
    assert other.status_code == 400
    assert other.json()["issue"][0]["expression"] == ["Patient.id"]
    missing = await client.put(url, json={k: v for k, v in created.items() if k != "id"}, headers=JSON)
    assert missing.status_code == 400
    invalid = await client.put("/fhir/Patient/has space", json={**created, "id": "has space"}, headers=JSON)
    assert invalid.status_code == 400
    assert (await client.get(url)).json()["meta"]["versionId"] == "1"
    assert await count_rows(engine) == 1


async def test_body_over_limit_is_413(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    big = {**SAMPLES["Patient"], "name": [{"family": "x" * 100_000}]}
    response = await client.post("/fhir/Patient", json=big, headers=JSON)
    assert response.status_code == 413
    assert response.json()["issue"][0]["code"] == "too-long"
    assert await count_rows(engine) == 0


async def test_xml_is_refused_with_outcome(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    xml = b'<Patient xmlns="http://hl7.org/fhir"><gender value="female"/></Patient>'
    posted = await client.post("/fhir/Patient", content=xml, headers={"content-type": "application/fhir+xml"})
    assert posted.status_code == 415
    assert "JSON" in posted.json()["issue"][0]["diagnostics"]
    created = (await client.post("/fhir/Patient", json=SAMPLES["Patient"], headers=JSON)).json()
    wants_xml = await client.get(f"/fhir/Patient/{created['id']}", headers={"accept": "application/fhir+xml"})
    assert wants_xml.status_code == 406
    assert wants_xml.json()["resourceType"] == "OperationOutcome"
    format_xml = await client.get(f"/fhir/Patient/{created['id']}?_format=xml")
    assert format_xml.status_code == 406
    assert await count_rows(engine) == 1


async def test_plain_json_and_format_override(client: httpx.AsyncClient) -> None:
    created = (
        await client.post(
            "/fhir/Patient", json=SAMPLES["Patient"], headers={"content-type": "application/json"}
        )
    ).json()
    url = f"/fhir/Patient/{created['id']}"
    as_json = await client.get(url, headers={"accept": "application/json"})
    assert as_json.headers["content-type"].startswith("application/json")
    any_type = await client.get(url, headers={"accept": "*/*"})
    assert any_type.headers["content-type"].startswith("application/fhir+json")
    forced = await client.get(f"{url}?_format=json", headers={"accept": "application/fhir+xml"})
    assert forced.status_code == 200
    pretty = await client.get(f"{url}?_pretty=true")
    assert pretty.text.startswith('{\n  "resourceType"')
    assert pretty.json() == as_json.json()


async def test_unknown_route_is_operation_outcome(client: httpx.AsyncClient) -> None:
    response = await client.get("/nowhere")
    assert response.status_code == 404
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_required_binding_on_codeable_concept(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    system = "http://terminology.hl7.org/CodeSystem/condition-clinical"
    bad = {**SAMPLES["Condition"], "clinicalStatus": {"coding": [{"system": system, "code": "cured"}]}}
    response = await client.post("/fhir/Condition", json=bad, headers=JSON)
    assert response.status_code == 400
    assert response.json()["issue"][0]["expression"] == ["Condition.clinicalStatus.coding[0].code"]
    good = {**SAMPLES["Condition"], "clinicalStatus": {"coding": [{"system": system, "code": "remission"}]}}
    assert (await client.post("/fhir/Condition", json=good, headers=JSON)).status_code == 201
    assert await count_rows(engine) == 1


@pytest.mark.parametrize(
    "body",
    [
        b'{"resourceType": "Patient", "name": [{"family": "nul\\u0000byte"}]}',
        b'{"resourceType": "Patient", "name": [{"given": ["bell\\u0007"]}]}',
        b'{"resourceType": "Patient", "name": [{"family": "lone \\ud800 surrogate"}]}',
    ],
    ids=["nul", "control", "surrogate"],
)
async def test_control_characters_and_bad_unicode_are_400(
    client: httpx.AsyncClient, engine: AsyncEngine, body: bytes
) -> None:
    response = await client.post("/fhir/Patient", content=body, headers=JSON)
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"
    assert await count_rows(engine) == 0


async def test_out_of_range_decimal_is_stored_not_indexed(client: httpx.AsyncClient) -> None:
    body = (
        b'{"resourceType": "Observation", "status": "final", "code": {"text": "x"},'
        b' "valueQuantity": {"value": 1e400, "unit": "mg"}}'
    )
    created = await client.post("/fhir/Observation", content=body, headers=JSON)
    assert created.status_code == 201
    read = await client.get(f"/fhir/Observation/{created.json()['id']}")
    assert float(read.json()["valueQuantity"]["value"]) == float("1e400")
    found = await client.get("/fhir/Observation", params={"value-quantity": "gt1"})
    assert found.status_code == 200
    assert "entry" not in found.json(), found.json().get("entry")


async def test_format_with_unencoded_plus(client: httpx.AsyncClient) -> None:
    created = (await client.post("/fhir/Patient", json=SAMPLES["Patient"], headers=JSON)).json()
    response = await client.get(f"/fhir/Patient/{created['id']}?_format=application/fhir+json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
