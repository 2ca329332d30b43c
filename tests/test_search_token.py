"""Token search (R4 search.html#token): code, system|code, |code, system|, modifiers."""

from __future__ import annotations

import httpx

from tests.test_search_support import ids, put

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
LOINC = "http://loinc.org"




async def _identified_patients(client: httpx.AsyncClient) -> None:
    mr_type = {"coding": [{"system": V2_0203, "code": "MR"}]}
    await put(
        client,
        "Patient",
        "mrn",
        {"identifier": [{"system": "urn:oid:1.2.3", "value": "123", "type": mr_type}]},
    )
    await put(client, "Patient", "ssn", {"identifier": [{"system": "urn:oid:9.9.9", "value": "123"}]})
    await put(client, "Patient", "nosys", {"identifier": [{"value": "123"}]})
    await put(client, "Patient", "other", {"identifier": [{"system": "urn:oid:1.2.3", "value": "456"}]})
    await put(client, "Patient", "none", {"name": [{"family": "Nobody"}]})


async def test_identifier_code_only_matches_any_system(client: httpx.AsyncClient) -> None:
    await _identified_patients(client)
    assert await ids(client, "Patient", ("identifier", "123")) == {"mrn", "ssn", "nosys"}


async def test_identifier_system_and_code(client: httpx.AsyncClient) -> None:
    await _identified_patients(client)
    assert await ids(client, "Patient", ("identifier", "urn:oid:1.2.3|123")) == {"mrn"}
    assert await ids(client, "Patient", ("identifier", "urn:oid:1.2.3|999")) == set()


async def test_identifier_without_system(client: httpx.AsyncClient) -> None:
    """``|code``: the code matches and the Identifier has no system."""
    await _identified_patients(client)
    assert await ids(client, "Patient", ("identifier", "|123")) == {"nosys"}


async def test_identifier_system_only(client: httpx.AsyncClient) -> None:
    """``system|``: any value in that system."""
    await _identified_patients(client)
    assert await ids(client, "Patient", ("identifier", "urn:oid:1.2.3|")) == {"mrn", "other"}


async def test_identifier_not_includes_resources_without_a_value(client: httpx.AsyncClient) -> None:
    """:not reverses the match and includes resources with no value (search.html#token)."""
    await _identified_patients(client)
    assert await ids(client, "Patient", ("identifier:not", "urn:oid:1.2.3|123")) == {
        "ssn",
        "nosys",
        "other",
        "none",
    }


async def test_identifier_of_type(client: httpx.AsyncClient) -> None:
    """:of-type takes [type system]|[type code]|[identifier value]."""
    await _identified_patients(client)
    assert await ids(client, "Patient", ("identifier:of-type", f"{V2_0203}|MR|123")) == {"mrn"}
    assert await ids(client, "Patient", ("identifier:of-type", f"{V2_0203}|MR|456")) == set()
    assert await ids(client, "Patient", ("identifier:of-type", f"{V2_0203}|SS|123")) == set()


async def test_identifier_missing(client: httpx.AsyncClient) -> None:
    await _identified_patients(client)
    assert await ids(client, "Patient", ("identifier:missing", "true")) == {"none"}
    assert await ids(client, "Patient", ("identifier:missing", "false")) == {"mrn", "ssn", "nosys", "other"}


async def test_identifier_value_with_escaped_pipe(client: httpx.AsyncClient) -> None:
    """``\\|`` is a literal | inside a token value (search.html#escaping)."""
    await put(client, "Patient", "piped", {"identifier": [{"system": "urn:sys", "value": "a|b"}]})
    await put(client, "Patient", "split", {"identifier": [{"system": "a", "value": "b"}]})
    assert await ids(client, "Patient", ("identifier", "urn:sys|a\\|b")) == {"piped"}
    assert await ids(client, "Patient", ("identifier", "a\\|b")) == {"piped"}


async def _coded_observations(client: httpx.AsyncClient) -> None:
    code = {
        "coding": [
            {"system": LOINC, "code": "88122-7", "display": "Food insecurity risk"},
            {"system": "http://snomed.info/sct", "code": "733423003"},
        ],
        "text": "Hunger vital sign",
    }
    await put(client, "Observation", "food", {"status": "final", "code": code})
    await put(
        client,
        "Observation",
        "housing",
        {
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "71802-3", "display": "Housing status"}]},
        },
    )
    await put(client, "Observation", "textonly", {"status": "final", "code": {"text": "Transport barrier"}})


async def test_codeable_concept_matches_any_coding(client: httpx.AsyncClient) -> None:
    await _coded_observations(client)
    assert await ids(client, "Observation", ("code", "88122-7")) == {"food"}
    assert await ids(client, "Observation", ("code", "733423003")) == {"food"}
    assert await ids(client, "Observation", ("code", f"{LOINC}|88122-7")) == {"food"}
    assert await ids(client, "Observation", ("code", "http://snomed.info/sct|88122-7")) == set()
    assert await ids(client, "Observation", ("code", f"{LOINC}|")) == {"food", "housing"}


async def test_token_or_values(client: httpx.AsyncClient) -> None:
    await _coded_observations(client)
    assert await ids(client, "Observation", ("code", "88122-7,71802-3")) == {"food", "housing"}
    assert await ids(client, "Observation", ("code", f"{LOINC}|71802-3,unknown")) == {"housing"}


async def test_token_text_modifier(client: httpx.AsyncClient) -> None:
    """:text searches CodeableConcept.text and Coding.display as a string (starts-with, any case)."""
    await _coded_observations(client)
    assert await ids(client, "Observation", ("code:text", "hunger")) == {"food"}
    assert await ids(client, "Observation", ("code:text", "FOOD insec")) == {"food"}
    assert await ids(client, "Observation", ("code:text", "housing")) == {"housing"}
    assert await ids(client, "Observation", ("code:text", "transport")) == {"textonly"}
    assert await ids(client, "Observation", ("code:text", "88122")) == set()


async def test_code_not_and_missing(client: httpx.AsyncClient) -> None:
    await _coded_observations(client)
    await put(client, "Observation", "nocategory", {"status": "final", "code": {"text": "x"}})
    assert await ids(client, "Observation", ("code:not", "88122-7")) == {"housing", "textonly", "nocategory"}
    assert await ids(client, "Observation", ("category:missing", "true")) == {
        "food",
        "housing",
        "textonly",
        "nocategory",
    }


async def test_coding_tag_and_security(client: httpx.AsyncClient) -> None:
    tags = "http://example.org/tags"
    conf = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
    await put(client, "Patient", "t1", {"meta": {"tag": [{"system": tags, "code": "urgent"}]}})
    await put(client, "Patient", "t2", {"meta": {"tag": [{"system": "http://other.org", "code": "urgent"}]}})
    await put(client, "Patient", "t3", {"meta": {"security": [{"system": conf, "code": "R"}]}})
    await put(client, "Patient", "t4", {"name": [{"family": "Plain"}]})
    assert await ids(client, "Patient", ("_tag", "urgent")) == {"t1", "t2"}
    assert await ids(client, "Patient", ("_tag", f"{tags}|urgent")) == {"t1"}
    assert await ids(client, "Patient", ("_tag", f"{tags}|")) == {"t1"}
    assert await ids(client, "Patient", ("_tag:not", f"{tags}|urgent")) == {"t2", "t3", "t4"}
    assert await ids(client, "Patient", ("_security", f"{conf}|R")) == {"t3"}
    assert await ids(client, "Patient", ("_security", "N")) == set()


async def test_boolean_active(client: httpx.AsyncClient) -> None:
    await put(client, "Patient", "yes", {"active": True})
    await put(client, "Patient", "no", {"active": False})
    await put(client, "Patient", "unknown", {"gender": "other"})
    assert await ids(client, "Patient", ("active", "true")) == {"yes"}
    assert await ids(client, "Patient", ("active", "false")) == {"no"}
    assert await ids(client, "Patient", ("active:not", "true")) == {"no", "unknown"}
    assert await ids(client, "Patient", ("active:missing", "true")) == {"unknown"}
    assert await ids(client, "Patient", ("active:missing", "false")) == {"yes", "no"}


async def test_code_task_status(client: httpx.AsyncClient) -> None:
    for fhir_id, status in (("req", "requested"), ("done", "completed"), ("stop", "cancelled")):
        await put(client, "Task", fhir_id, {"status": status, "intent": "order"})
    assert await ids(client, "Task", ("status", "requested")) == {"req"}
    assert await ids(client, "Task", ("status", "completed,cancelled")) == {"done", "stop"}
    assert await ids(client, "Task", ("status:not", "completed")) == {"req", "stop"}
    assert await ids(client, "Task", ("status", "Completed")) == set()  # codes are case-sensitive


async def test_contact_point_phone_email_telecom(client: httpx.AsyncClient) -> None:
    await put(
        client,
        "Patient",
        "ana",
        {
            "telecom": [
                {"system": "phone", "value": "555-0100"},
                {"system": "email", "value": "ana@example.org"},
            ]
        },
    )
    await put(client, "Patient", "bo", {"telecom": [{"system": "email", "value": "555-0100"}]})
    await put(client, "Patient", "cy", {"telecom": [{"system": "phone", "value": "555-0199"}]})
    assert await ids(client, "Patient", ("phone", "555-0100")) == {"ana"}
    assert await ids(client, "Patient", ("email", "ana@example.org")) == {"ana"}
    assert await ids(client, "Patient", ("email", "555-0100")) == {"bo"}
    assert await ids(client, "Patient", ("telecom", "555-0100")) == {"ana", "bo"}
    assert await ids(client, "Patient", ("phone:missing", "true")) == {"bo"}


async def test_token_and_of_repeated_parameters(client: httpx.AsyncClient) -> None:
    """A repeated parameter is AND: both codes must be present (search.html#combining)."""
    await _coded_observations(client)
    assert await ids(client, "Observation", ("code", "88122-7"), ("code", "733423003")) == {"food"}
    assert await ids(client, "Observation", ("code", "88122-7"), ("code", "71802-3")) == set()


async def test_identifier_of_type_matches_any_type_coding(client: httpx.AsyncClient) -> None:
    identifier_type = {
        "coding": [
            {"system": V2_0203, "code": "MR"},
            {"system": "http://example.org/id-types", "code": "chart"},
        ]
    }
    await put(
        client,
        "Patient",
        "two-types",
        {"identifier": [{"system": "urn:oid:1.2.3", "value": "777", "type": identifier_type}]},
    )
    assert await ids(client, "Patient", ("identifier:of-type", f"{V2_0203}|MR|777")) == {"two-types"}
    assert await ids(client, "Patient", ("identifier:of-type", "http://example.org/id-types|chart|777")) == {
        "two-types"
    }


async def test_identifier_text_searches_identifier_type_text(client: httpx.AsyncClient) -> None:
    """:text matches CodeableConcept.text, Coding.display or Identifier.type.text (R4 search.html#token)."""
    await put(
        client,
        "Patient",
        "typed",
        {"identifier": [{"value": "555", "type": {"text": "Medical record number"}}]},
    )
    await put(client, "Patient", "untyped", {"identifier": [{"value": "556"}]})
    assert await ids(client, "Patient", ("identifier:text", "medical record")) == {"typed"}


async def test_deceased(client: httpx.AsyncClient) -> None:
    """deceased = ``deceased.exists() and deceased != false``: a Patient without it is not deceased."""
    await put(client, "Patient", "dead", {"deceasedBoolean": True})
    await put(client, "Patient", "died", {"deceasedDateTime": "2024-02-01T10:00:00Z"})
    await put(client, "Patient", "alive", {"deceasedBoolean": False})
    await put(client, "Patient", "unknown", {"gender": "male"})
    assert await ids(client, "Patient", ("deceased", "true")) == {"dead", "died"}
    assert await ids(client, "Patient", ("deceased", "false")) == {"alive", "unknown"}
    assert await ids(client, "Patient", ("death-date", "2024-02")) == {"died"}
