"""_include, _revinclude and :iterate (R4 search.html#include)."""

from __future__ import annotations

from collections import Counter

import httpx

from tests.conftest import FHIR
from tests.test_search_support import (
    bad_request,
    delete,
    entries,
    put,
    search,
    typed_ids,
)


def ref(target: str) -> dict[str, str]:
    return {"reference": target}


async def _world(client: httpx.AsyncClient) -> None:
    await put(client, "Organization", "org", {"name": "Eastside"})
    await put(
        client,
        "Patient",
        "p1",
        {"name": [{"family": "One"}], "managingOrganization": ref("Organization/org")},
    )
    await put(client, "Patient", "p2", {"name": [{"family": "Two"}]})
    goal = {"lifecycleStatus": "active", "description": {"text": "g"}}
    await put(client, "Goal", "g1", {**goal, "subject": ref("Patient/p1")})
    await put(client, "Goal", "g2", {**goal, "subject": ref("Patient/p1")})
    await put(client, "Goal", "g3", {**goal, "subject": ref("Organization/org")})
    await put(client, "Goal", "g4", {**goal, "subject": ref("Patient/p2"), "lifecycleStatus": "completed"})
    await put(
        client,
        "Provenance",
        "prov",
        {
            "target": [ref("Patient/p1")],
            "recorded": "2024-01-01T10:00:00Z",
            "agent": [{"who": ref("Organization/org")}],
        },
    )


def _assert_unique(bundle: dict[str, object]) -> None:
    counts = Counter(typed_ids(bundle, "match") + typed_ids(bundle, "include"))  # type: ignore[arg-type]
    assert [k for k, n in counts.items() if n > 1] == [], "an entry appears twice"


async def test_include_reference_targets(client: httpx.AsyncClient) -> None:
    await _world(client)
    bundle = await search(client, "Goal", [("_id", "g1,g2,g3"), ("_include", "Goal:subject")])
    assert set(typed_ids(bundle)) == {"Goal/g1", "Goal/g2", "Goal/g3"}
    assert sorted(typed_ids(bundle, "include")) == ["Organization/org", "Patient/p1"]
    _assert_unique(bundle)
    assert bundle["total"] == 3  # total counts matches only
    for entry in entries(bundle, "include"):
        resource = entry["resource"]
        assert entry["fullUrl"] == f"{FHIR}/{resource['resourceType']}/{resource['id']}"


async def test_include_with_target_type(client: httpx.AsyncClient) -> None:
    await _world(client)
    bundle = await search(client, "Goal", [("_id", "g1,g3"), ("_include", "Goal:subject:Patient")])
    assert typed_ids(bundle, "include") == ["Patient/p1"]
    bundle = await search(client, "Goal", [("_id", "g1,g3"), ("_include", "Goal:subject:Organization")])
    assert typed_ids(bundle, "include") == ["Organization/org"]


async def test_include_wildcard(client: httpx.AsyncClient) -> None:
    await _world(client)
    bundle = await search(client, "Provenance", [("_include", "Provenance:*")])
    assert typed_ids(bundle) == ["Provenance/prov"]
    assert sorted(typed_ids(bundle, "include")) == ["Organization/org", "Patient/p1"]


async def test_include_only_for_matches_on_this_page(client: httpx.AsyncClient) -> None:
    await _world(client)
    bundle = await search(client, "Goal", [("lifecycle-status", "completed"), ("_include", "Goal:subject")])
    assert typed_ids(bundle) == ["Goal/g4"]
    assert typed_ids(bundle, "include") == ["Patient/p2"]


async def test_include_iterate(client: httpx.AsyncClient) -> None:
    await _world(client)
    bundle = await search(
        client,
        "Goal",
        [("_id", "g1"), ("_include", "Goal:subject"), ("_include:iterate", "Patient:organization")],
    )
    assert typed_ids(bundle) == ["Goal/g1"]
    assert sorted(typed_ids(bundle, "include")) == ["Organization/org", "Patient/p1"]
    plain = await search(client, "Goal", [("_id", "g1"), ("_include", "Goal:subject")])
    assert typed_ids(plain, "include") == ["Patient/p1"]


async def test_revinclude(client: httpx.AsyncClient) -> None:
    await _world(client)
    bundle = await search(client, "Patient", [("_id", "p1"), ("_revinclude", "Goal:subject")])
    assert typed_ids(bundle) == ["Patient/p1"]
    assert sorted(typed_ids(bundle, "include")) == ["Goal/g1", "Goal/g2"]
    bundle = await search(
        client,
        "Patient",
        [("_id", "p1"), ("_revinclude", "Goal:subject"), ("_revinclude", "Provenance:target")],
    )
    assert sorted(typed_ids(bundle, "include")) == ["Goal/g1", "Goal/g2", "Provenance/prov"]
    _assert_unique(bundle)


async def test_revinclude_for_several_matches(client: httpx.AsyncClient) -> None:
    await _world(client)
    bundle = await search(client, "Patient", [("_revinclude", "Goal:patient")])
    assert sorted(typed_ids(bundle)) == ["Patient/p1", "Patient/p2"]
    assert sorted(typed_ids(bundle, "include")) == ["Goal/g1", "Goal/g2", "Goal/g4"]


async def test_include_never_duplicates_a_match(client: httpx.AsyncClient) -> None:
    """A resource that is both a match and an include target appears once, as a match."""
    await put(client, "Patient", "a", {"link": [{"other": ref("Patient/b"), "type": "seealso"}]})
    await put(client, "Patient", "b", {"link": [{"other": ref("Patient/a"), "type": "seealso"}]})
    await put(client, "Patient", "c", {"gender": "male"})
    bundle = await search(client, "Patient", [("_id", "a,b"), ("_include", "Patient:link")])
    assert sorted(typed_ids(bundle)) == ["Patient/a", "Patient/b"]
    assert typed_ids(bundle, "include") == []
    _assert_unique(bundle)


async def test_include_skips_deleted_targets(client: httpx.AsyncClient) -> None:
    await _world(client)
    await delete(client, "Patient", "p1")
    bundle = await search(client, "Goal", [("_id", "g1"), ("_include", "Goal:subject")])
    assert typed_ids(bundle) == ["Goal/g1"]
    assert typed_ids(bundle, "include") == []
    await delete(client, "Goal", "g4")
    bundle = await search(client, "Patient", [("_id", "p2"), ("_revinclude", "Goal:subject")])
    assert typed_ids(bundle, "include") == []


async def test_include_of_unknown_parameter_is_400(client: httpx.AsyncClient) -> None:
    await bad_request(client, "Goal", ("_include", "Goal:lifecycle-status"), names="_include")
    await bad_request(client, "Goal", ("_include", "Goal"), names="_include")
    await bad_request(client, "Goal", ("_revinclude", "Spaceship:subject"), names="_revinclude")
