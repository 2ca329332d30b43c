"""Operations (R4 operations.html): ``$name`` routed at system, type and instance level before
the generic routes, invoked with GET or a POST Parameters body, described by OperationDefinitions
the CapabilityStatement points at and documented in the OpenAPI document; ``$validate``
(R4 Resource-validate) and ``$meta`` (R4 Resource-meta) read through the caller's access."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.fhir.operations import (
    Operation,
    OperationParameter,
    OperationRegistry,
    operation_definition,
    parse_parameters,
)
from app.fhir.types import SERVED_TYPES
from app.openapi import build_openapi
from tests.conftest import FHIR, bearer
from tests.test_search_support import JSON, put

TAG = {"system": "http://example.org/tags", "code": "vip"}
SECRET = {"system": "http://example.org/tags", "code": "secret"}
PROFILE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"


def _meta(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["resourceType"] == "Parameters"
    [parameter] = body["parameter"]
    assert parameter["name"] == "return"
    meta: dict[str, Any] = parameter["valueMeta"]
    return meta


def _outcome(response: httpx.Response, status: int, code: str | None = None) -> list[dict[str, Any]]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    if code is not None:
        assert body["issue"][0]["code"] == code, body
    issues: list[dict[str, Any]] = body["issue"]
    return issues


def _parameters(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(entries)}


async def _two_patients(client: httpx.AsyncClient) -> None:
    await put(client, "Patient", "p1", {"meta": {"tag": [TAG], "profile": [PROFILE]}, "gender": "female"})
    await put(client, "Patient", "p2", {"meta": {"tag": [SECRET]}, "gender": "male"})


# -- routing -----------------------------------------------------------------------------------


async def test_meta_at_the_three_levels(client: httpx.AsyncClient) -> None:
    await _two_patients(client)
    await put(
        client,
        "Goal",
        "g1",
        {
            "meta": {"security": [{"system": "http://example.org/s", "code": "R"}]},
            "lifecycleStatus": "active",
            "description": {"text": "walk"},
            "subject": {"reference": "Patient/p1"},
        },
    )
    instance = _meta(await client.get("/fhir/Patient/p1/$meta"))
    assert instance["versionId"] == "1" and "lastUpdated" in instance
    assert instance["tag"] == [TAG] and instance["profile"] == [PROFILE]

    by_type = _meta(await client.get("/fhir/Patient/$meta"))
    assert "versionId" not in by_type and "lastUpdated" not in by_type
    assert {(t["system"], t["code"]) for t in by_type["tag"]} == {
        (TAG["system"], "vip"),
        (TAG["system"], "secret"),
    }
    assert by_type["profile"] == [PROFILE]
    assert "security" not in by_type

    system = _meta(await client.get("/fhir/$meta"))
    assert {t["code"] for t in system["tag"]} == {"vip", "secret"}
    assert system["security"] == [{"system": "http://example.org/s", "code": "R"}]

    # POST with an empty body or an empty-of-input Parameters is the same invocation.
    assert _meta(await client.post("/fhir/Patient/p1/$meta")) == instance
    # A deleted resource is gone (410), an unknown one 404, both as OperationOutcomes.
    await client.delete("/fhir/Patient/p2")
    _outcome(await client.get("/fhir/Patient/p2/$meta"), 410, "deleted")
    _outcome(await client.get("/fhir/Patient/nobody/$meta"), 404, "not-found")
    assert {t["code"] for t in _meta(await client.get("/fhir/Patient/$meta"))["tag"]} == {"vip"}


async def test_an_operation_path_is_not_a_compartment_search(client: httpx.AsyncClient) -> None:
    await _two_patients(client)
    issues = _outcome(await client.get("/fhir/Patient/p1/$lastn"), 404, "not-supported")
    assert "unknown operation $lastn" in issues[0]["diagnostics"]
    # $everything is offered on Patient only (tests/test_everything.py), not at the system level.
    issues = _outcome(await client.get("/fhir/$everything"), 404, "not-supported")
    assert "system level" in issues[0]["diagnostics"]
    _outcome(
        await client.post("/fhir/Patient/$nothing", json=_parameters(), headers=JSON), 404, "not-supported"
    )
    # The compartment search itself still works.
    assert (await client.get("/fhir/Patient/p1/Observation")).status_code == 200


async def test_operation_not_offered_at_that_level_or_type(client: httpx.AsyncClient) -> None:
    issues = _outcome(
        await client.post("/fhir/$validate", json=_parameters(), headers=JSON), 404, "not-supported"
    )
    assert "system level" in issues[0]["diagnostics"]
    _outcome(await client.get("/fhir/Unicorn/$meta"), 404, "not-supported")
    _outcome(await client.get("/fhir/Patient/not%20an%20id/$meta"), 400, "invalid")


async def test_wrong_method_is_405(client: httpx.AsyncClient) -> None:
    await _two_patients(client)
    # $validate takes a resource: POST only (a URL cannot carry one).
    response = await client.get("/fhir/Patient/$validate")
    _outcome(response, 405, "not-supported")
    assert response.headers["allow"] == "POST"
    for method in ("PUT", "DELETE", "PATCH"):
        response = await client.request(method, "/fhir/Patient/p1/$meta", json=_parameters(), headers=JSON)
        _outcome(response, 405, "not-supported")
        assert response.headers["allow"] == "GET, POST, HEAD"
    assert (await client.head("/fhir/Patient/p1/$meta")).status_code == 200


async def test_parameters_are_checked_against_the_definition(client: httpx.AsyncClient) -> None:
    patient = {"resourceType": "Patient", "gender": "female"}
    url = "/fhir/Patient/$validate"
    _outcome(await client.get("/fhir/$meta?color=blue"), 400, "not-supported")
    _outcome(
        await client.post(url, json=_parameters({"name": "color", "valueString": "x"}), headers=JSON),
        400,
        "not-supported",
    )
    # The wrong value type, a repeated 0..1 parameter, a code outside its required binding.
    _outcome(
        await client.post(
            url,
            json=_parameters(
                {"name": "mode", "valueString": "create"}, {"name": "resource", "resource": patient}
            ),
            headers=JSON,
        ),
        400,
        "structure",
    )
    _outcome(await client.post(url + "?mode=create&mode=create", json=patient, headers=JSON), 400, "invalid")
    _outcome(await client.post(url + "?mode=sideways", json=patient, headers=JSON), 400, "code-invalid")
    _outcome(
        await client.post(
            url, json={"resourceType": "Parameters", "parameter": [{"value": 1}]}, headers=JSON
        ),
        400,
        "structure",
    )
    _outcome(await client.post(url, content=b"{not json", headers=JSON), 400)
    response = await client.post(url, content=b"mode=create", headers={"content-type": "text/plain"})
    _outcome(response, 415)


# -- $validate ---------------------------------------------------------------------------------


async def test_validate_get_and_post_forms(client: httpx.AsyncClient) -> None:
    good = {"resourceType": "Patient", "gender": "female", "birthDate": "1950-01-01"}
    bad = {"resourceType": "Patient", "gender": "sometimes", "birthDate": 1950}
    for body in (
        good,
        _parameters({"name": "resource", "resource": good}),
        _parameters({"name": "resource", "resource": good}, {"name": "mode", "valueCode": "create"}),
    ):
        issues = _outcome(await client.post("/fhir/Patient/$validate", json=body, headers=JSON), 200)
        assert issues == [{"severity": "information", "code": "informational", "diagnostics": "All OK"}]
    # An invalid resource: still 200, the problems as issues naming the elements.
    issues = _outcome(await client.post("/fhir/Patient/$validate?mode=create", json=bad, headers=JSON), 200)
    assert {i["severity"] for i in issues} == {"error"}
    assert {e for i in issues for e in i.get("expression", [])} >= {"Patient.gender", "Patient.birthDate"}
    # A resource of another type than the URL's.
    issues = _outcome(await client.post("/fhir/Goal/$validate", json=good, headers=JSON), 200)
    assert issues[0]["severity"] == "error"
    # Nothing was stored.
    assert (await client.get("/fhir/Patient")).json().get("total", 0) == 0
    _outcome(
        await client.post(
            "/fhir/Patient/$validate", json=_parameters({"name": "mode", "valueCode": "create"}), headers=JSON
        ),
        400,
        "required",
    )
    _outcome(
        await client.post("/fhir/Patient/$validate?profile=http://example.org/p", json=good, headers=JSON),
        400,
        "not-supported",
    )
    base = "http://hl7.org/fhir/StructureDefinition/Patient"
    _outcome(
        await client.post(f"/fhir/Patient/$validate?mode=profile&profile={base}", json=good, headers=JSON),
        200,
    )


async def test_validate_modes_at_the_instance_level(client: httpx.AsyncClient) -> None:
    await _two_patients(client)
    update = {"resourceType": "Patient", "id": "p1", "gender": "other"}
    issues = _outcome(
        await client.post("/fhir/Patient/p1/$validate?mode=update", json=update, headers=JSON), 200
    )
    assert issues[0]["diagnostics"] == "All OK"
    issues = _outcome(
        await client.post("/fhir/Patient/p2/$validate?mode=update", json=update, headers=JSON), 200
    )
    assert issues[0]["expression"] == ["Patient.id"]
    delete = _parameters({"name": "mode", "valueCode": "delete"})
    assert (
        _outcome(await client.post("/fhir/Patient/p1/$validate", json=delete, headers=JSON), 200)[0][
            "diagnostics"
        ]
        == "All OK"
    )
    _outcome(await client.post("/fhir/Patient/ghost/$validate", json=delete, headers=JSON), 404, "not-found")
    _outcome(await client.post("/fhir/Patient/$validate", json=delete, headers=JSON), 400)
    _outcome(await client.post("/fhir/Patient/p1/$validate?mode=create", json=update, headers=JSON), 400)
    issues = _outcome(
        await client.post(
            "/fhir/AuditEvent/$validate?mode=create", json={"resourceType": "AuditEvent"}, headers=JSON
        ),
        200,
    )
    assert any(i["code"] == "not-supported" for i in issues)
    assert (await client.get("/fhir/Patient/p1")).json()["gender"] == "female"


# -- access ------------------------------------------------------------------------------------


async def test_operations_respect_the_token(app: FastAPI, client: httpx.AsyncClient) -> None:
    await _two_patients(client)
    p1 = await bearer(app, "patient/*.rs", patient="p1", client_id="ops-p1-app")
    assert _meta(await client.get("/fhir/Patient/p1/$meta", headers=p1))["tag"] == [TAG]
    _outcome(await client.get("/fhir/Patient/p2/$meta", headers=p1), 404, "not-found")
    # Type and system summaries hold only what the token may search.
    assert [t["code"] for t in _meta(await client.get("/fhir/Patient/$meta", headers=p1))["tag"]] == ["vip"]
    assert [t["code"] for t in _meta(await client.get("/fhir/$meta", headers=p1))["tag"]] == ["vip"]
    # A token without any scope on a type is refused there, and hidden resources stay 404.
    goals = await bearer(app, "system/Goal.rs", client_id="ops-goal-reader")
    _outcome(await client.get("/fhir/Patient/$meta", headers=goals), 403, "forbidden")
    _outcome(await client.get("/fhir/Patient/p1/$meta", headers=goals), 403, "forbidden")
    assert _meta(await client.get("/fhir/$meta", headers=goals)) == {}
    patient = {"resourceType": "Patient", "gender": "female"}
    _outcome(await client.post("/fhir/Patient/$validate", json=patient, headers={**JSON, **goals}), 403)
    # Read-only: general validation yes, "would this create succeed" no.
    _outcome(await client.post("/fhir/Patient/$validate", json=patient, headers={**JSON, **p1}), 200)
    _outcome(
        await client.post("/fhir/Patient/$validate?mode=create", json=patient, headers={**JSON, **p1}), 403
    )
    _outcome(await client.post("/fhir/Patient/p2/$validate", json=patient, headers={**JSON, **p1}), 404)
    # Without a token: 401, like every interaction.
    _outcome(await client.get("/fhir/$meta", headers={"authorization": ""}), 401)


async def test_operations_are_audited_as_operations(app: FastAPI, client: httpx.AsyncClient) -> None:
    await put(client, "Patient", "audited", {"gender": "female"})
    assert (await client.get("/fhir/Patient/audited/$meta")).status_code == 200
    await app.state.audit.flush()
    auditor = await bearer(app, "system/AuditEvent.rs", client_id="ops-auditor")
    events = (await client.get("/fhir/AuditEvent?subtype=operation", headers=auditor)).json()["entry"]
    touched = [e["resource"]["entity"][0]["what"]["reference"] for e in events if "entity" in e["resource"]]
    assert "Patient/audited/_history/1" in touched
    assert {e["resource"]["subtype"][0]["code"] for e in events} == {"operation"}


# -- definitions, CapabilityStatement, OpenAPI ---------------------------------------------------


async def test_capability_statement_lists_operations_with_resolvable_definitions(
    client: httpx.AsyncClient,
) -> None:
    rest = (await client.get("/fhir/metadata")).json()["rest"][0]
    assert rest["operation"] == [
        {"name": "export", "definition": f"{FHIR}/OperationDefinition/export"},
        {"name": "meta", "definition": f"{FHIR}/OperationDefinition/Resource-meta"},
    ]
    by_type = {r["type"]: r for r in rest["resource"]}
    for resource_type in SERVED_TYPES:
        extra = {
            "Subscription": {"status", "events", "get-ws-binding-token"},
            "Patient": {"everything", "export"},  # Bulk Data: Patient/$export
            "Group": {"export"},  # Bulk Data: Group/[id]/$export
            "QuestionnaireResponse": {"extract"},
            "Goal": {"progress"},
            "CarePlan": {"progress"},
            "Task": {"referral-metrics"},
        }.get(resource_type, set())
        assert {o["name"] for o in by_type[resource_type]["operation"]} == {"meta", "validate", *extra}
    assert {i["code"] for i in by_type["OperationDefinition"]["interaction"]} == {"read", "search-type"}
    definitions = [o["definition"] for r in rest["resource"] for o in r.get("operation", [])]
    no_token = {"authorization": ""}
    for url in sorted(set(definitions + [o["definition"] for o in rest["operation"]])):
        response = await client.get(url.removeprefix("http://cc.test"), headers=no_token)
        assert response.status_code == 200, url
        definition = response.json()
        assert definition["resourceType"] == "OperationDefinition"
        assert definition["url"] == url
    validate = (await client.get("/fhir/OperationDefinition/Resource-validate")).json()
    assert validate["code"] == "validate"
    assert validate["base"] == "http://hl7.org/fhir/OperationDefinition/Resource-validate"
    assert (validate["system"], validate["type"], validate["instance"]) == (False, True, True)
    assert validate["affectsState"] is False
    assert set(validate["resource"]) == set(SERVED_TYPES)
    mode = next(p for p in validate["parameter"] if p["name"] == "mode")
    assert mode["binding"]["valueSet"].startswith("http://hl7.org/fhir/ValueSet/resource-validation-mode")
    meta = (await client.get("/fhir/OperationDefinition/Resource-meta")).json()
    assert meta["parameter"] == [
        {
            "name": "return",
            "use": "out",
            "min": 1,
            "max": "1",
            "type": "Meta",
            "documentation": "The meta returned by the operation",
        }
    ]
    _outcome(await client.get("/fhir/OperationDefinition/unknown"), 404, "not-found")
    _outcome(await client.put("/fhir/OperationDefinition/Resource-meta", json=meta, headers=JSON), 405)
    found = (await client.get("/fhir/OperationDefinition?code=validate,meta")).json()
    assert found["total"] == 2
    assert (await client.get("/fhir/OperationDefinition?url=" + meta["url"])).json()["total"] == 1
    _outcome(await client.get("/fhir/OperationDefinition?status=active"), 400)


def test_openapi_documents_every_operation(app: FastAPI) -> None:
    paths = build_openapi(app)["paths"]
    assert set(paths["/fhir/$meta"]) == {"get", "post"}
    assert set(paths["/fhir/Patient/$meta"]) == {"get", "post"}
    assert set(paths["/fhir/Patient/{id}/$meta"]) == {"get", "post"}
    validate = paths["/fhir/Task/{id}/$validate"]
    assert set(validate) == {"post"}
    post = validate["post"]
    assert post["operationId"] == "validate_instance_Task"
    assert post["requestBody"]["content"]["application/fhir+json"]["schema"]["oneOf"] == [
        {"$ref": "#/components/schemas/Parameters"},
        {"$ref": "#/components/schemas/Task"},
    ]
    assert post["responses"]["200"]["content"]["application/fhir+json"]["schema"] == {
        "$ref": "#/components/schemas/OperationOutcome"
    }
    assert {p["name"] for p in post["parameters"]} >= {"id", "mode", "profile"}
    assert "/fhir/$validate" not in paths
    assert "security" not in paths["/fhir/OperationDefinition/{definition_id}"]["get"]
    assert paths["/fhir/Patient/$meta"]["get"]["security"] == [{"smart": []}]


async def test_operations_in_a_batch_are_refused_not_taken_for_reads(client: httpx.AsyncClient) -> None:
    await _two_patients(client)
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": "Patient/p1/$meta"}},
            {"request": {"method": "GET", "url": "Patient/p1"}},
        ],
    }
    response = await client.post("/fhir", json=batch, headers=JSON)
    assert response.status_code == 200, response.text
    first, second = response.json()["entry"]
    assert first["response"]["status"].startswith("400")
    assert first["response"]["outcome"]["issue"][0]["code"] == "not-supported"
    assert "resource" not in first
    assert second["response"]["status"].startswith("200")


# -- the registry ------------------------------------------------------------------------------


async def _noop(ctx: Any, resource_type: str | None, fhir_id: str | None, parameters: Any) -> Any:
    raise AssertionError("not invoked")


def test_registry_derives_methods_and_checks_declarations() -> None:
    status = Operation(
        name="status",
        title="Status",
        description="d",
        levels=("type", "instance"),
        resource_types=("Task",),
        handler=_noop,
        parameters=(
            OperationParameter("ids", "in", "id", max="*"),
            OperationParameter("return", "out", "Bundle", min=1),
        ),
    )
    assert status.methods == ("GET", "POST")
    assert Operation("x", "t", "d", ("system",), _noop, affects_state=True).methods == ("POST",)
    registry = OperationRegistry([status])
    assert registry.resolve("status", "instance", "Task", "HEAD") is status
    parsed = parse_parameters(status, [("ids", "a"), ("ids", "b"), ("_format", "json")], None)
    assert [v.text() for v in parsed.all("ids")] == ["a", "b"]
    definition = operation_definition(status, "http://h/fhir")
    assert definition["url"] == "http://h/fhir/OperationDefinition/status"
    assert (definition["system"], definition["type"], definition["instance"]) == (False, True, True)
    assert definition["resource"] == ["Task"]
    with pytest.raises(ValueError):
        registry.register(status)  # twice
    with pytest.raises(ValueError):
        Operation("s", "t", "d", ("type",), _noop, resource_types=("Medication",))  # not served
    with pytest.raises(ValueError):
        Operation("s", "t", "d", ("type",), _noop, body_resource="resource")  # no such parameter
    with pytest.raises(ValueError):
        Operation("s", "t", "d", ("everywhere",), _noop)  # type: ignore[arg-type]
