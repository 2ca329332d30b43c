"""Every primitive has the JSON type R4 gives it (json.html#primitive), on every write path.

boolean is a JSON boolean; integer, positiveInt, unsignedInt and decimal are JSON numbers
(the integer types without fraction or exponent, within 32 bits, positiveInt > 0,
unsignedInt >= 0); every other primitive is a JSON string. ``null`` appears only to align a
repeating primitive with its ``_element`` array, and arrays are never empty. fhir.resources
(pydantic) would coerce ``"yes"`` or ``"1"`` and accept ``null``: what it accepts does not
decide what is valid.
"""

from __future__ import annotations

import base64
import copy
import json
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.fhir import jsonio
from app.fhir.types import SERVED_TYPES
from app.fhir.validation import validate_resource
from tests.conftest import count_rows
from tests.samples import SAMPLES

JSON = {"content-type": "application/fhir+json"}
V = object()
"""Where a row's value goes in its template."""


def ext(value_key: str) -> dict[str, Any]:
    return {"extension": [{"url": "http://example.org/fhir/StructureDefinition/probe", value_key: V}]}


def rank() -> dict[str, Any]:
    return {"telecom": [{"system": "phone", "value": "555-0100", "rank": V}]}


# (resource type, elements merged into SAMPLES[type] with V for the value, the element's
#  expression, a value of the wrong JSON type, a valid value)
Row = tuple[str, dict[str, Any], str, Any, Any]
BOOLEAN_AS_STRING: list[Row] = [
    ("Patient", {"active": V}, "Patient.active", "true", True),
    ("RelatedPerson", {"active": V}, "RelatedPerson.active", "false", False),
    ("Practitioner", {"active": V}, "Practitioner.active", "yes", True),
    ("PractitionerRole", {"active": V}, "PractitionerRole.active", "1", True),
    ("Organization", {"active": V}, "Organization.active", "TRUE", True),
    ("Endpoint", ext("valueBoolean"), "Endpoint.extension[0].valueBoolean", "true", True),
    ("CareTeam", ext("valueBoolean"), "CareTeam.extension[0].valueBoolean", "false", False),
    ("EpisodeOfCare", ext("valueBoolean"), "EpisodeOfCare.extension[0].valueBoolean", "true", True),
    (
        "CarePlan",
        {"activity": [{"detail": {"status": "scheduled", "doNotPerform": V}}]},
        "CarePlan.activity[0].detail.doNotPerform",
        "false",
        False,
    ),
    ("Goal", ext("valueBoolean"), "Goal.extension[0].valueBoolean", "no", False),
    ("ServiceRequest", {"doNotPerform": V}, "ServiceRequest.doNotPerform", "false", False),
    (
        "Task",
        {"input": [{"type": {"text": "consent given"}, "valueBoolean": V}]},
        "Task.input[0].valueBoolean",
        "true",
        True,
    ),
    ("Condition", ext("valueBoolean"), "Condition.extension[0].valueBoolean", "true", True),
    ("Observation", {"valueBoolean": V}, "Observation.valueBoolean", "false", False),
    ("Procedure", ext("valueBoolean"), "Procedure.extension[0].valueBoolean", "true", True),
    ("Consent", ext("valueBoolean"), "Consent.extension[0].valueBoolean", "true", True),
    ("Communication", ext("valueBoolean"), "Communication.extension[0].valueBoolean", "true", True),
    ("Appointment", ext("valueBoolean"), "Appointment.extension[0].valueBoolean", "true", True),
    ("Questionnaire", {"experimental": V}, "Questionnaire.experimental", "false", False),
    (
        "QuestionnaireResponse",
        {"item": [{"linkId": "1", "answer": [{"valueBoolean": V}]}]},
        "QuestionnaireResponse.item[0].answer[0].valueBoolean",
        "true",
        True,
    ),
    ("Provenance", ext("valueBoolean"), "Provenance.extension[0].valueBoolean", "true", True),
    (
        "AuditEvent",
        {"agent": [{"requestor": V, "who": {"reference": "Practitioner/p1"}}]},
        "AuditEvent.agent[0].requestor",
        "true",
        True,
    ),
    ("Subscription", ext("valueBoolean"), "Subscription.extension[0].valueBoolean", "true", True),
    ("Group", {"actual": V}, "Group.actual", "true", True),
    ("HealthcareService", {"appointmentRequired": V}, "HealthcareService.appointmentRequired", "no", False),
    ("Location", ext("valueBoolean"), "Location.extension[0].valueBoolean", "true", True),
    ("OrganizationAffiliation", {"active": V}, "OrganizationAffiliation.active", "true", True),
    ("DocumentReference", ext("valueBoolean"), "DocumentReference.extension[0].valueBoolean", "true", True),
    ("Basic", ext("valueBoolean"), "Basic.extension[0].valueBoolean", "false", False),
]
INTEGER_AS_STRING: list[Row] = [
    ("Patient", {"multipleBirthInteger": V}, "Patient.multipleBirthInteger", "2", 2),
    ("RelatedPerson", rank(), "RelatedPerson.telecom[0].rank", "1", 1),
    ("Practitioner", rank(), "Practitioner.telecom[0].rank", "2", 2),
    ("PractitionerRole", rank(), "PractitionerRole.telecom[0].rank", "1", 1),
    ("Organization", rank(), "Organization.telecom[0].rank", "1", 1),
    (
        "Endpoint",
        {"contact": [{"system": "email", "value": "ops@example.org", "rank": V}]},
        "Endpoint.contact[0].rank",
        "1",
        1,
    ),
    ("CareTeam", rank(), "CareTeam.telecom[0].rank", "3", 3),
    (
        "EpisodeOfCare",
        {"diagnosis": [{"condition": {"reference": "Condition/c1"}, "rank": V}]},
        "EpisodeOfCare.diagnosis[0].rank",
        "1",
        1,
    ),
    ("CarePlan", ext("valueInteger"), "CarePlan.extension[0].valueInteger", "-4", -4),
    (
        "Goal",
        {"target": [{"measure": {"text": "nights housed"}, "detailInteger": V}]},
        "Goal.target[0].detailInteger",
        "30",
        30,
    ),
    ("ServiceRequest", ext("valuePositiveInt"), "ServiceRequest.extension[0].valuePositiveInt", "2", 2),
    ("Task", {"restriction": {"repetitions": V}}, "Task.restriction.repetitions", "1", 1),
    ("Condition", ext("valueUnsignedInt"), "Condition.extension[0].valueUnsignedInt", "0", 0),
    ("Observation", {"valueInteger": V}, "Observation.valueInteger", "7", 7),
    ("Procedure", ext("valueInteger"), "Procedure.extension[0].valueInteger", "1", 1),
    ("Consent", ext("valuePositiveInt"), "Consent.extension[0].valuePositiveInt", "5", 5),
    ("Communication", ext("valueInteger"), "Communication.extension[0].valueInteger", "0", 0),
    ("Appointment", {"minutesDuration": V}, "Appointment.minutesDuration", "30", 30),
    (
        "Questionnaire",
        {"item": [{"linkId": "1", "type": "string", "maxLength": V}]},
        "Questionnaire.item[0].maxLength",
        "10",
        10,
    ),
    (
        "QuestionnaireResponse",
        {"item": [{"linkId": "1", "answer": [{"valueInteger": V}]}]},
        "QuestionnaireResponse.item[0].answer[0].valueInteger",
        "4",
        4,
    ),
    ("Provenance", ext("valueInteger"), "Provenance.extension[0].valueInteger", "1", 1),
    ("AuditEvent", ext("valueInteger"), "AuditEvent.extension[0].valueInteger", "1", 1),
    ("Subscription", ext("valueInteger"), "Subscription.extension[0].valueInteger", "1", 1),
    ("Group", {"quantity": V}, "Group.quantity", "12", 12),
    ("HealthcareService", rank(), "HealthcareService.telecom[0].rank", "1", 1),
    ("Location", rank(), "Location.telecom[0].rank", "1", 1),
    ("OrganizationAffiliation", rank(), "OrganizationAffiliation.telecom[0].rank", "1", 1),
    (
        "DocumentReference",
        {"content": [{"attachment": {"size": V}}]},
        "DocumentReference.content[0].attachment.size",
        "5",
        5,
    ),
    ("Basic", ext("valueInteger"), "Basic.extension[0].valueInteger", "1", 1),
]
STRING_AS_NUMBER: list[Row] = [
    ("Patient", {"birthDate": V}, "Patient.birthDate", 19700101, "1970-01-01"),
    ("RelatedPerson", {"gender": V}, "RelatedPerson.gender", 1, "other"),
    ("Practitioner", {"name": [{"family": V}]}, "Practitioner.name[0].family", 42, "Okafor"),
    (
        "PractitionerRole",
        {"availabilityExceptions": V},
        "PractitionerRole.availabilityExceptions",
        7,
        "Holidays",
    ),
    ("Organization", {"name": V}, "Organization.name", 5, "Eastside"),
    ("Endpoint", {"address": V}, "Endpoint.address", 443, "https://partner.example.org/fhir"),
    ("CareTeam", {"name": V}, "CareTeam.name", 99, "Housing team"),
    ("EpisodeOfCare", {"status": V}, "EpisodeOfCare.status", 1, "active"),
    ("CarePlan", {"description": V}, "CarePlan.description", 3, "Plan"),
    ("Goal", {"statusReason": V}, "Goal.statusReason", 1, "Moved"),
    ("ServiceRequest", {"authoredOn": V}, "ServiceRequest.authoredOn", 20260101, "2026-01-01"),
    ("Task", {"description": V}, "Task.description", 12, "Call the client"),
    ("Condition", {"onsetString": V}, "Condition.onsetString", 5, "childhood"),
    ("Observation", {"issued": V}, "Observation.issued", 12345, "2026-01-01T10:00:00Z"),
    ("Procedure", {"performedString": V}, "Procedure.performedString", 3, "last week"),
    ("Consent", {"dateTime": V}, "Consent.dateTime", 2026, "2026-01-01"),
    ("Communication", {"sent": V}, "Communication.sent", 1, "2026-01-01T10:00:00Z"),
    ("Appointment", {"description": V}, "Appointment.description", Decimal("5.5"), "Intake"),
    ("Questionnaire", {"title": V}, "Questionnaire.title", 1, "Housing screening"),
    ("QuestionnaireResponse", {"authored": V}, "QuestionnaireResponse.authored", 1, "2026-01-01"),
    ("Provenance", {"recorded": V}, "Provenance.recorded", 2026, "2026-01-01T10:00:00Z"),
    ("AuditEvent", {"outcomeDesc": V}, "AuditEvent.outcomeDesc", 0, "ok"),
    ("Subscription", {"reason": V}, "Subscription.reason", 1, "Follow referrals"),
    ("Group", {"name": V}, "Group.name", 7, "Eastside caseload"),
    ("HealthcareService", {"comment": V}, "HealthcareService.comment", 3, "Walk-ins welcome"),
    ("Location", {"description": V}, "Location.description", 4, "Shelter"),
    (
        "OrganizationAffiliation",
        ext("valueString"),
        "OrganizationAffiliation.extension[0].valueString",
        1,
        "x",
    ),
    ("DocumentReference", {"description": V}, "DocumentReference.description", 9, "Lease"),
    ("Basic", {"created": V}, "Basic.created", 2026, "2026-01-01"),
]
NULL: list[Row] = [
    ("Patient", {"gender": V}, "Patient.gender", None, "female"),
    ("RelatedPerson", {"birthDate": V}, "RelatedPerson.birthDate", None, "1980-02-29"),
    ("Practitioner", {"name": [{"given": [V]}]}, "Practitioner.name[0].given[0]", None, "Ana"),
    ("PractitionerRole", {"period": V}, "PractitionerRole.period", None, {"start": "2026-01-01"}),
    ("Organization", {"alias": [V]}, "Organization.alias[0]", None, "EHP"),
    ("Endpoint", {"name": V}, "Endpoint.name", None, "Partner API"),
    ("CareTeam", {"status": V}, "CareTeam.status", None, "active"),
    ("EpisodeOfCare", {"period": V}, "EpisodeOfCare.period", None, {"start": "2026-01-01"}),
    ("CarePlan", {"title": V}, "CarePlan.title", None, "Plan"),
    ("Goal", {"startDate": V}, "Goal.startDate", None, "2026-01-01"),
    ("ServiceRequest", {"patientInstruction": V}, "ServiceRequest.patientInstruction", None, "Bring ID"),
    ("Task", {"priority": V}, "Task.priority", None, "routine"),
    ("Condition", {"recordedDate": V}, "Condition.recordedDate", None, "2026-01-01"),
    ("Observation", {"effectiveDateTime": V}, "Observation.effectiveDateTime", None, "2026-01-01"),
    ("Procedure", {"performedDateTime": V}, "Procedure.performedDateTime", None, "2026-01-01"),
    ("Consent", {"policyRule": V}, "Consent.policyRule", None, {"text": "opt-in"}),
    ("Communication", {"priority": V}, "Communication.priority", None, "urgent"),
    ("Appointment", {"start": V}, "Appointment.start", None, "2026-01-01T10:00:00Z"),
    ("Questionnaire", {"date": V}, "Questionnaire.date", None, "2026-01-01"),
    (
        "QuestionnaireResponse",
        {"questionnaire": V},
        "QuestionnaireResponse.questionnaire",
        None,
        "http://q.example",
    ),
    ("Provenance", {"policy": [V]}, "Provenance.policy[0]", None, "http://policy.example"),
    ("AuditEvent", {"action": V}, "AuditEvent.action", None, "C"),
    ("Subscription", {"reason": V}, "Subscription.reason", None, "Follow referrals"),
    ("Group", {"name": V}, "Group.name", None, "Eastside caseload"),
    ("HealthcareService", {"comment": V}, "HealthcareService.comment", None, "Walk-ins welcome"),
    ("Location", {"description": V}, "Location.description", None, "Shelter"),
    (
        "OrganizationAffiliation",
        {"period": V},
        "OrganizationAffiliation.period",
        None,
        {"start": "2026-01-01"},
    ),
    ("DocumentReference", {"description": V}, "DocumentReference.description", None, "Lease"),
    ("Basic", {"created": V}, "Basic.created", None, "2026-01-01"),
]
EMPTY_ARRAY: list[Row] = [
    ("Patient", {"name": V}, "Patient.name", [], [{"family": "Rivera"}]),
    ("RelatedPerson", {"identifier": V}, "RelatedPerson.identifier", [], [{"value": "1"}]),
    ("Practitioner", {"qualification": V}, "Practitioner.qualification", [], [{"code": {"text": "RN"}}]),
    (
        "PractitionerRole",
        {"availableTime": [{"daysOfWeek": V}]},
        "PractitionerRole.availableTime[0].daysOfWeek",
        [],
        ["mon"],
    ),
    ("Organization", {"address": V}, "Organization.address", [], [{"city": "Springfield"}]),
    ("Endpoint", {"payloadMimeType": V}, "Endpoint.payloadMimeType", [], ["application/fhir+json"]),
    ("CareTeam", {"note": V}, "CareTeam.note", [], [{"text": "x"}]),
    ("EpisodeOfCare", {"type": V}, "EpisodeOfCare.type", [], [{"text": "housing"}]),
    ("CarePlan", {"category": V}, "CarePlan.category", [], [{"text": "housing"}]),
    ("Goal", {"note": V}, "Goal.note", [], [{"text": "x"}]),
    ("ServiceRequest", {"category": V}, "ServiceRequest.category", [], [{"text": "housing"}]),
    ("Task", {"note": V}, "Task.note", [], [{"text": "x"}]),
    ("Condition", {"category": V}, "Condition.category", [], [{"text": "problem"}]),
    ("Observation", {"component": V}, "Observation.component", [], [{"code": {"text": "x"}}]),
    ("Procedure", {"note": V}, "Procedure.note", [], [{"text": "x"}]),
    ("Consent", {"performer": V}, "Consent.performer", [], [{"reference": "Patient/example"}]),
    ("Communication", {"payload": V}, "Communication.payload", [], [{"contentString": "hi"}]),
    ("Appointment", {"reasonCode": V}, "Appointment.reasonCode", [], [{"text": "intake"}]),
    ("Questionnaire", {"subjectType": V}, "Questionnaire.subjectType", [], ["Patient"]),
    ("QuestionnaireResponse", {"item": V}, "QuestionnaireResponse.item", [], [{"linkId": "1"}]),
    ("Provenance", {"reason": V}, "Provenance.reason", [], [{"text": "x"}]),
    ("AuditEvent", {"purposeOfEvent": V}, "AuditEvent.purposeOfEvent", [], [{"text": "TREAT"}]),
    ("Subscription", {"contact": V}, "Subscription.contact", [], [{"system": "email", "value": "a@x.org"}]),
    (
        "Group",
        {"characteristic": V},
        "Group.characteristic",
        [],
        [{"code": {"text": "programme"}, "valueBoolean": True, "exclude": False}],
    ),
    ("HealthcareService", {"category": V}, "HealthcareService.category", [], [{"text": "housing"}]),
    ("Location", {"alias": V}, "Location.alias", [], ["Eastside"]),
    ("OrganizationAffiliation", {"code": V}, "OrganizationAffiliation.code", [], [{"text": "provider"}]),
    ("DocumentReference", {"category": V}, "DocumentReference.category", [], [{"text": "lease"}]),
    ("Basic", {"identifier": V}, "Basic.identifier", [], [{"value": "1"}]),
]
MORE: list[Row] = [
    ("Patient", {"active": V}, "Patient.active", 1, True),
    ("Patient", {"active": V}, "Patient.active", [True], False),
    ("Patient", {"gender": V}, "Patient.gender", True, "male"),
    ("Patient", {"birthDate": V}, "Patient.birthDate", {"value": "1970"}, "1970"),
    ("Patient", {"multipleBirthInteger": V}, "Patient.multipleBirthInteger", Decimal("2.0"), 2),
    ("Patient", {"multipleBirthInteger": V}, "Patient.multipleBirthInteger", Decimal("2E+1"), 20),
    ("Patient", {"multipleBirthInteger": V}, "Patient.multipleBirthInteger", 2**31, 2**31 - 1),
    ("Patient", {"multipleBirthInteger": V}, "Patient.multipleBirthInteger", -(2**31) - 1, -(2**31)),
    ("Patient", {"multipleBirthInteger": V}, "Patient.multipleBirthInteger", True, 1),
    ("Patient", {"name": V}, "Patient.name", {"family": "x"}, [{"family": "x"}]),
    ("Patient", {"name": [{"given": V}]}, "Patient.name[0].given", "Ana", ["Ana"]),
    ("Patient", {"name": [V]}, "Patient.name[0]", None, {"family": "x"}),
    ("Patient", {"name": [V]}, "Patient.name[0]", "Rivera", {"family": "Rivera"}),
    (
        "Patient",
        {"_birthDate": V},
        "Patient._birthDate",
        None,
        {"extension": [{"url": "http://x", "valueCode": "unknown"}]},
    ),
    (
        "Patient",
        {"contained": [{"resourceType": "Patient", "id": "c", "active": V}]},
        "Patient.contained[0].active",
        "yes",
        False,
    ),
    (
        "Patient",
        {"contained": [{"resourceType": "Medication", "id": "m", "status": V}]},
        "Patient.contained[0].status",
        1,
        "active",
    ),
    ("Appointment", {"minutesDuration": V}, "Appointment.minutesDuration", 0, 1),
    ("Appointment", {"minutesDuration": V}, "Appointment.minutesDuration", Decimal("30.0"), 30),
    ("Appointment", {"priority": V}, "Appointment.priority", -1, 0),
    (
        "Observation",
        {"valueQuantity": {"value": V}},
        "Observation.valueQuantity.value",
        "1.5",
        Decimal("1.50"),
    ),
    ("Observation", {"valueQuantity": {"value": V}}, "Observation.valueQuantity.value", True, 2),
    (
        "Observation",
        {"text": {"status": "generated", "div": V}},
        "Observation.text.div",
        5,
        '<div xmlns="http://www.w3.org/1999/xhtml">x</div>',
    ),
]
ROWS = BOOLEAN_AS_STRING + INTEGER_AS_STRING + STRING_AS_NUMBER + NULL + EMPTY_ARRAY + MORE


def fill(template: Any, value: Any) -> Any:
    if template is V:
        return value
    if isinstance(template, dict):
        return {key: fill(item, value) for key, item in template.items()}
    if isinstance(template, list):
        return [fill(item, value) for item in template]
    return template


def resource(row: Row, value: Any) -> dict[str, Any]:
    resource_type, template, _, _, _ = row
    return {**copy.deepcopy(SAMPLES[resource_type]), **fill(template, value)}


def row_id(row: Row) -> str:
    return f"{row[2]}={json.dumps(row[3], default=str)}"


def expressions(outcome: dict[str, Any]) -> list[str]:
    return [e for issue in outcome["issue"] for e in issue.get("expression", [])]


def test_every_served_type_has_a_row_of_each_kind() -> None:
    for rows in (BOOLEAN_AS_STRING, INTEGER_AS_STRING, STRING_AS_NUMBER, NULL, EMPTY_ARRAY):
        assert [row[0] for row in rows] == list(SERVED_TYPES)


@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_the_valid_value_of_each_row_is_accepted(row: Row) -> None:
    """The control: each row's resource is valid with the right value, so its 400 below is
    about the element's JSON type and nothing else."""
    validate_resource(resource(row, row[4]), row[0])


@pytest.mark.parametrize("row", ROWS, ids=row_id)
async def test_a_wrong_json_type_is_400_naming_the_element(
    client: httpx.AsyncClient, engine: AsyncEngine, row: Row
) -> None:
    resource_type, _, expression, bad, _ = row
    body = jsonio.dumps(resource(row, bad))
    response = await client.post(f"/fhir/{resource_type}", content=body, headers=JSON)
    assert response.status_code == 400, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert expressions(outcome) == [expression], outcome
    assert await count_rows(engine) == 0


# -- the other write paths ------------------------------------------------------------------


async def _created(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.post("/fhir/Patient", json=SAMPLES["Patient"], headers=JSON)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def test_update_with_a_wrong_json_type_is_400(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    created = await _created(client)
    url = f"/fhir/Patient/{created['id']}"
    for bad, expression in (
        ({**created, "active": "yes"}, "Patient.active"),
        ({**created, "name": None}, "Patient.name"),
        ({**created, "telecom": []}, "Patient.telecom"),
    ):
        response = await client.put(url, json=bad, headers=JSON)
        assert response.status_code == 400, response.text
        assert expressions(response.json()) == [expression]
    assert (await client.get(url)).json()["meta"]["versionId"] == "1"
    assert await count_rows(engine) == 1


async def test_a_patch_result_with_a_wrong_json_type_is_400(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    created = await _created(client)
    url = f"/fhir/Patient/{created['id']}"
    json_patch = {"content-type": "application/json-patch+json"}
    for operations, expression in (
        ([{"op": "add", "path": "/active", "value": "yes"}], "Patient.active"),
        ([{"op": "add", "path": "/multipleBirthInteger", "value": "2"}], "Patient.multipleBirthInteger"),
        ([{"op": "add", "path": "/name/0/given/-", "value": None}], "Patient.name[0].given[1]"),
        ([{"op": "remove", "path": "/name/0/given/0"}], "Patient.name[0].given"),
    ):
        response = await client.patch(url, json=operations, headers=json_patch)
        assert response.status_code == 400, response.text
        assert expressions(response.json()) == [expression]
    fhirpath_patch = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "operation",
                "part": [
                    {"name": "type", "valueCode": "add"},
                    {"name": "path", "valueString": "Patient"},
                    {"name": "name", "valueString": "active"},
                    {"name": "value", "valueString": "true"},
                ],
            }
        ],
    }
    response = await client.patch(url, json=fhirpath_patch, headers=JSON)
    assert response.status_code == 400, response.text
    assert expressions(response.json()) == ["Patient.active"]
    assert (await client.get(url)).json()["meta"]["versionId"] == "1"
    assert await count_rows(engine) == 1


async def test_bundle_entries_with_a_wrong_json_type(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    good = {"resource": SAMPLES["Patient"], "request": {"method": "POST", "url": "Patient"}}
    bad = {
        "resource": {**SAMPLES["Patient"], "active": "yes"},
        "request": {"method": "POST", "url": "Patient"},
    }
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [good, bad]}
    response = await client.post("/fhir", json=transaction, headers=JSON)
    assert response.status_code == 400, response.text
    outcome = response.json()
    assert expressions(outcome) == ["Patient.active"]
    assert "Bundle.entry[1]" in outcome["issue"][0]["diagnostics"]
    assert await count_rows(engine) == 0

    put_null = {
        "resource": {"resourceType": "Patient", "id": "p-null", "birthDate": None},
        "request": {"method": "PUT", "url": "Patient/p-null"},
    }
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [good, put_null]}
    response = await client.post("/fhir", json=transaction, headers=JSON)
    assert response.status_code == 400, response.text
    assert expressions(response.json()) == ["Patient.birthDate"]
    assert await count_rows(engine) == 0

    batch = {"resourceType": "Bundle", "type": "batch", "entry": [good, bad]}
    response = await client.post("/fhir", json=batch, headers=JSON)
    assert response.status_code == 200, response.text
    first, second = response.json()["entry"]
    assert first["response"]["status"].startswith("201")
    assert second["response"]["status"].startswith("400")
    assert expressions(second["response"]["outcome"]) == ["Patient.active"]
    assert await count_rows(engine) == 1


async def test_a_transaction_patch_entry_with_a_wrong_json_type_is_400(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    created = await _created(client)
    operations = [{"op": "add", "path": "/active", "value": "false"}]
    entry = {
        "resource": {
            "resourceType": "Binary",
            "contentType": "application/json-patch+json",
            "data": base64.b64encode(json.dumps(operations).encode()).decode(),
        },
        "request": {"method": "PATCH", "url": f"Patient/{created['id']}"},
    }
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    response = await client.post("/fhir", json=transaction, headers=JSON)
    assert response.status_code == 400, response.text
    assert expressions(response.json()) == ["Patient.active"]
    assert (await client.get(f"/fhir/Patient/{created['id']}")).json()["meta"]["versionId"] == "1"
    assert await count_rows(engine) == 1


# -- what stays valid ---------------------------------------------------------------------------


async def test_valid_edge_cases_are_accepted_and_stored_as_sent(client: httpx.AsyncClient) -> None:
    ext = "http://example.org/fhir/StructureDefinition"
    body = (
        b'{"resourceType":"Observation","status":"final","code":{"text":"Rent"},'
        b'"valueQuantity":{"value":1.50,"unit":"USD"},'
        b'"component":[{"code":{"text":"a"},"valueInteger":0},'
        b'{"code":{"text":"b"},"valueInteger":-2147483648},'
        b'{"code":{"text":"c"},"valueInteger":2147483647},'
        b'{"code":{"text":"d"},"valueQuantity":{"value":-0.000}},'
        b'{"code":{"text":"e"},"valueQuantity":{"value":12}}],'
        b'"extension":[{"url":"' + ext.encode() + b'/u","valueUnsignedInt":0},'
        b'{"url":"' + ext.encode() + b'/p","valuePositiveInt":1},'
        b'{"url":"' + ext.encode() + b'/d","valueDecimal":0.10}]}'
    )
    created = await client.post("/fhir/Observation", content=body, headers=JSON)
    assert created.status_code == 201, created.text
    raw = (await client.get(f"/fhir/Observation/{created.json()['id']}")).text
    for kept in (
        '"value":1.50',
        '"valueInteger":0',
        '"valueInteger":-2147483648',
        '"valueInteger":2147483647',
        '"value":-0.000',
        '"value":12',
        '"valueUnsignedInt":0',
        '"valuePositiveInt":1',
        '"valueDecimal":0.10',
    ):
        assert kept in raw, kept


async def test_null_aligns_a_repeating_primitive_with_its_extensions(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """json.html#primitive: ``given`` and ``_given`` are aligned arrays; null fills a position
    where one of the two has nothing (a value without extension, or an extension without value)."""
    absent = {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}
    nickname = {"url": "http://example.org/fhir/StructureDefinition/nickname", "valueBoolean": True}
    name = {
        "family": "Rivera",
        "given": ["Ana", None, "Maria"],
        "_given": [None, {"extension": [absent]}, {"extension": [nickname]}],
    }
    patient = {
        "resourceType": "Patient",
        "name": [name, {"_family": {"extension": [absent]}, "_given": [{"extension": [absent]}]}],
        "_birthDate": {"extension": [absent]},
        "_active": {"id": "a1", "extension": [nickname]},
        "active": True,
    }
    created = await client.post("/fhir/Patient", json=patient, headers=JSON)
    assert created.status_code == 201, created.text
    read = (await client.get(f"/fhir/Patient/{created.json()['id']}")).json()
    assert read["name"] == patient["name"]
    assert read["_birthDate"] == patient["_birthDate"]

    misaligned: list[tuple[dict[str, Any], str]] = [
        ({"given": ["Ana", None]}, "Patient.name[0].given[1]"),  # null without an extension
        ({"given": ["Ana", None], "_given": [None, None]}, "Patient.name[0].given[1]"),
        ({"given": ["Ana", "Bo"], "_given": [None]}, "Patient.name[0]._given"),  # lengths differ
        ({"_given": [None]}, "Patient.name[0]._given[0]"),  # null extension for no value
        ({"given": ["Ana"], "_given": []}, "Patient.name[0]._given"),
        ({"given": ["Ana"], "_given": {"extension": [absent]}}, "Patient.name[0]._given"),
        ({"family": "Rivera", "_family": None}, "Patient.name[0]._family"),
        ({"family": "Rivera", "_family": [{"extension": [absent]}]}, "Patient.name[0]._family"),
    ]
    for bad_name, expression in misaligned:
        body = {"resourceType": "Patient", "name": [bad_name]}
        response = await client.post("/fhir/Patient", json=body, headers=JSON)
        assert response.status_code == 400, (bad_name, response.text)
        assert expression in expressions(response.json()), (bad_name, response.json())
    assert await count_rows(engine) == 1
