"""The CapabilityStatement tells clients what is routed and searchable (capabilitystatement.html)."""

from __future__ import annotations

import httpx

from app.fhir.types import SERVED_TYPES


async def test_capability_statement_lists_every_type_and_search(client: httpx.AsyncClient) -> None:
    response = await client.get("/fhir/metadata")
    assert response.status_code == 200
    statement = response.json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    assert statement["kind"] == "instance"
    assert "json" in statement["format"]
    rest = statement["rest"][0]
    assert {i["code"] for i in rest["interaction"]} >= {"history-system", "search-system"}
    by_type = {r["type"]: r for r in rest["resource"]}
    # The served types, and the definitions of the operations (tests/test_operations.py).
    assert set(by_type) == {*SERVED_TYPES, "OperationDefinition"}
    del by_type["OperationDefinition"]
    every = {"read", "vread", "update", "patch", "delete", "create", "history-instance", "history-type",
             "search-type"}
    for resource in by_type.values():
        codes = {i["code"] for i in resource["interaction"]}
        if resource["type"] == "AuditEvent":  # records of what happened, in the audit store (issue 14)
            assert codes == {"read", "vread", "search-type"}
            assert resource["conditionalDelete"] == "not-supported"
            assert {p["name"] for p in resource["searchParam"]} == {
                "_id", "_lastUpdated", "action", "address", "agent", "date", "entity", "outcome", "patient",
                "site", "subtype", "type",
            }
            assert resource["searchInclude"] == [] and resource["searchRevInclude"] == []
            assert resource["versioning"] == "versioned" and resource["readHistory"] is False
            continue
        assert codes == every
        assert resource["conditionalCreate"] is True
        assert resource["conditionalUpdate"] is True
        assert resource["conditionalDelete"] == "multiple"
        assert resource["conditionalRead"] == "full-support"
        assert resource["versioning"] == "versioned-update"
        assert resource["updateCreate"] is True
    patient_params = {p["name"]: p for p in by_type["Patient"]["searchParam"]}
    assert patient_params["name"] == {
        "name": "name", "definition": "http://hl7.org/fhir/SearchParameter/Patient-name", "type": "string"
    }
    assert patient_params["_id"]["type"] == "token"
    assert patient_params["birthdate"]["type"] == "date"
    task_params = {p["name"] for p in by_type["Task"]["searchParam"]}
    assert {"owner", "requester", "status", "focus", "patient", "code", "_lastUpdated"} <= task_params
    assert "Goal:subject" in by_type["Goal"]["searchInclude"]
    assert "Goal:subject" in by_type["Patient"]["searchRevInclude"]
    assert "Provenance:target" in by_type["Patient"]["searchRevInclude"]
    assert not [r for r in by_type["Patient"]["searchRevInclude"] if r.startswith("AuditEvent:")]


async def test_metadata_needs_no_body_and_honours_format(client: httpx.AsyncClient) -> None:
    assert (await client.get("/fhir/metadata?_format=xml")).status_code == 406
    pretty = await client.get("/fhir/metadata?_pretty=true")
    assert pretty.text.startswith("{\n")
