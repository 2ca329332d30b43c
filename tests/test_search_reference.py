"""Reference, uri, _id and _profile search (R4 search.html#reference, #uri, #all)."""

from __future__ import annotations

import httpx

from tests.conftest import FHIR
from tests.test_search_support import bad_request, ids, put

EXTERNAL = "http://other.example.org/fhir/Patient/p1"




async def _goal(client: httpx.AsyncClient, fhir_id: str, subject: dict[str, object]) -> None:
    await put(
        client,
        "Goal",
        fhir_id,
        {"lifecycleStatus": "active", "description": {"text": fhir_id}, "subject": subject},
    )


async def _goals(client: httpx.AsyncClient) -> None:
    await _goal(client, "relative", {"reference": "Patient/p1"})
    await _goal(client, "absolute", {"reference": f"{FHIR}/Patient/p1"})
    await _goal(client, "other", {"reference": "Patient/p2"})
    await _goal(client, "external", {"reference": EXTERNAL})
    await _goal(client, "org", {"reference": "Organization/p1"})
    await _goal(client, "byident", {"identifier": {"system": "urn:mrn", "value": "m1"}})


async def test_reference_type_and_id(client: httpx.AsyncClient) -> None:
    """A local reference matches whether it was written relative or absolute on this server."""
    await _goals(client)
    assert await ids(client, "Goal", ("subject", "Patient/p1")) == {"relative", "absolute"}
    assert await ids(client, "Goal", ("subject", "Patient/p2")) == {"other"}
    assert await ids(client, "Goal", ("subject", "Patient/p9")) == set()


async def test_reference_absolute_url_on_this_server(client: httpx.AsyncClient) -> None:
    await _goals(client)
    assert await ids(client, "Goal", ("subject", f"{FHIR}/Patient/p1")) == {"relative", "absolute"}


async def test_reference_bare_id_matches_any_target_type(client: httpx.AsyncClient) -> None:
    await _goals(client)
    assert await ids(client, "Goal", ("subject", "p1")) == {"relative", "absolute", "org"}


async def test_reference_type_modifier(client: httpx.AsyncClient) -> None:
    await _goals(client)
    assert await ids(client, "Goal", ("subject:Patient", "p1")) == {"relative", "absolute"}
    assert await ids(client, "Goal", ("subject:Organization", "p1")) == {"org"}
    assert await ids(client, "Goal", ("patient", "p1")) == {"relative", "absolute"}


async def test_reference_external_absolute_url(client: httpx.AsyncClient) -> None:
    await _goals(client)
    assert await ids(client, "Goal", ("subject", EXTERNAL)) == {"external"}
    assert await ids(client, "Goal", ("subject", "http://other.example.org/fhir/Patient/p2")) == set()


async def test_reference_identifier_modifier(client: httpx.AsyncClient) -> None:
    await _goals(client)
    assert await ids(client, "Goal", ("subject:identifier", "urn:mrn|m1")) == {"byident"}
    assert await ids(client, "Goal", ("subject:identifier", "m1")) == {"byident"}
    assert await ids(client, "Goal", ("subject:identifier", "urn:other|m1")) == set()


async def test_reference_or_values(client: httpx.AsyncClient) -> None:
    await _goals(client)
    assert await ids(client, "Goal", ("subject", "Patient/p2,Organization/p1")) == {"other", "org"}


async def test_reference_missing(client: httpx.AsyncClient) -> None:
    base = {"status": "requested", "intent": "order"}
    await put(client, "Task", "owned", {**base, "owner": {"reference": "Organization/o1"}})
    await put(client, "Task", "unowned", base)
    assert await ids(client, "Task", ("owner:missing", "true")) == {"unowned"}
    assert await ids(client, "Task", ("owner:missing", "false")) == {"owned"}
    assert await ids(client, "Task", ("owner", "Organization/o1")) == {"owned"}


async def test_reference_unknown_modifier_is_400(client: httpx.AsyncClient) -> None:
    await bad_request(client, "Goal", ("subject:contains", "p1"), names="subject")


async def _questionnaires(client: httpx.AsyncClient) -> None:
    for fhir_id, url in (
        ("housing", "http://example.org/q/housing"),
        ("housing2024", "http://example.org/q/housing/2024"),
        ("food", "http://example.org/q/food"),
        ("elsewhere", "http://other.org/q/housing"),
    ):
        await put(client, "Questionnaire", fhir_id, {"status": "active", "url": url})
    await put(client, "Questionnaire", "nourl", {"status": "draft"})


async def test_uri_exact(client: httpx.AsyncClient) -> None:
    await _questionnaires(client)
    assert await ids(client, "Questionnaire", ("url", "http://example.org/q/housing")) == {"housing"}
    assert await ids(client, "Questionnaire", ("url", "http://example.org/q")) == set()
    assert await ids(client, "Questionnaire", ("url", "HTTP://EXAMPLE.ORG/q/housing")) == set()


async def test_uri_below(client: httpx.AsyncClient) -> None:
    await _questionnaires(client)
    assert await ids(client, "Questionnaire", ("url:below", "http://example.org/q/")) == {
        "housing",
        "housing2024",
        "food",
    }
    assert await ids(client, "Questionnaire", ("url:below", "http://example.org/q/housing")) == {
        "housing",
        "housing2024",
    }


async def test_uri_above(client: httpx.AsyncClient) -> None:
    await _questionnaires(client)
    assert await ids(client, "Questionnaire", ("url:above", "http://example.org/q/housing/2024/v1")) == {
        "housing",
        "housing2024",
    }
    assert await ids(client, "Questionnaire", ("url:above", "http://example.org/q/food")) == {"food"}


async def test_uri_missing(client: httpx.AsyncClient) -> None:
    await _questionnaires(client)
    assert await ids(client, "Questionnaire", ("url:missing", "true")) == {"nourl"}


async def test_uri_like_wildcards_are_literal(client: httpx.AsyncClient) -> None:
    await put(client, "Questionnaire", "under", {"status": "active", "url": "http://example.org/a_b/x"})
    await put(client, "Questionnaire", "plain", {"status": "active", "url": "http://example.org/axb/x"})
    assert await ids(client, "Questionnaire", ("url:below", "http://example.org/a_b")) == {"under"}
    assert await ids(client, "Questionnaire", ("url:below", "http://example.org/%")) == set()
    assert await ids(client, "Questionnaire", ("url:above", "http://example.org/a_b/x/1")) == {"under"}


async def test_canonical_reference(client: httpx.AsyncClient) -> None:
    base = {"status": "completed"}
    url = "http://example.org/q/housing"
    await put(client, "QuestionnaireResponse", "versioned", {**base, "questionnaire": f"{url}|2.0"})
    await put(client, "QuestionnaireResponse", "plain", {**base, "questionnaire": url})
    await put(
        client, "QuestionnaireResponse", "other", {**base, "questionnaire": "http://example.org/q/food"}
    )
    assert await ids(client, "QuestionnaireResponse", ("questionnaire", url)) == {"versioned", "plain"}


async def test_profile(client: httpx.AsyncClient) -> None:
    sdoh = "http://example.org/StructureDefinition/sdoh-patient"
    await put(client, "Patient", "profiled", {"meta": {"profile": [sdoh]}})
    await put(client, "Patient", "other", {"meta": {"profile": ["http://example.org/StructureDefinition/x"]}})
    await put(client, "Patient", "none", {"gender": "male"})
    assert await ids(client, "Patient", ("_profile", sdoh)) == {"profiled"}
    assert await ids(client, "Patient", ("_profile:below", "http://example.org/StructureDefinition/")) == {
        "profiled",
        "other",
    }
    assert await ids(client, "Patient", ("_profile:missing", "true")) == {"none"}


async def test_id(client: httpx.AsyncClient) -> None:
    for fhir_id in ("a1", "a2", "a3"):
        await put(client, "Patient", fhir_id, {"gender": "female"})
    await put(
        client,
        "Goal",
        "a1",
        {"lifecycleStatus": "active", "description": {"text": "g"}, "subject": {"reference": "Patient/a1"}},
    )
    assert await ids(client, "Patient", ("_id", "a1")) == {"a1"}
    assert await ids(client, "Patient", ("_id", "a1,a3")) == {"a1", "a3"}
    assert await ids(client, "Patient", ("_id", "a1"), ("_id", "a2")) == set()
    assert await ids(client, "Patient", ("_id", "A1")) == set()
    assert await ids(client, "Patient", ("_id", "nope")) == set()
