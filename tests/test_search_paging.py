"""_sort, _count and paging links (R4 search.html#sort, #count, http.html#paging)."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.conftest import FHIR
from tests.test_search_support import (
    bad_request,
    get_url,
    link,
    match_ids,
    put,
    search,
    walk,
)

PEOPLE = (
    ("s1", "Baker", "1990-05-01"),
    ("s2", "Adams", "1985-01-01"),
    ("s3", "Carter", "1990-05-01"),
    ("s4", "Baker", "1980-01-01"),
    ("s5", "Adams", "2000-01-01"),
)


async def _people(client: httpx.AsyncClient) -> None:
    for fhir_id, family, born in PEOPLE:
        await put(client, "Patient", fhir_id, {"name": [{"family": family}], "birthDate": born})


def _families(bundle: dict[str, object]) -> list[str]:
    return [e["resource"]["name"][0]["family"] for e in bundle["entry"] if e["search"]["mode"] == "match"]  # type: ignore[index, union-attr, attr-defined]


def _query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


async def test_sort_by_string_ascending_and_descending(client: httpx.AsyncClient) -> None:
    await _people(client)
    assert _families(await search(client, "Patient", [("_sort", "family")])) == [
        "Adams",
        "Adams",
        "Baker",
        "Baker",
        "Carter",
    ]
    assert _families(await search(client, "Patient", [("_sort", "-family")])) == [
        "Carter",
        "Baker",
        "Baker",
        "Adams",
        "Adams",
    ]


async def test_sort_by_several_keys(client: httpx.AsyncClient) -> None:
    await _people(client)
    bundle = await search(client, "Patient", [("_sort", "family,-birthdate")])
    assert match_ids(bundle) == ["s5", "s2", "s1", "s4", "s3"]
    bundle = await search(client, "Patient", [("_sort", "-birthdate,family")])
    assert match_ids(bundle) == ["s5", "s1", "s3", "s2", "s4"]
    bundle = await search(client, "Patient", [("_sort", "-birthdate"), ("_sort", "-family")])
    assert match_ids(bundle) == ["s5", "s3", "s1", "s2", "s4"]


async def test_sort_by_date(client: httpx.AsyncClient) -> None:
    await _people(client)
    ascending = match_ids(await search(client, "Patient", [("_sort", "birthdate,_id")]))
    assert ascending == ["s4", "s2", "s1", "s3", "s5"]
    descending = match_ids(await search(client, "Patient", [("_sort", "-birthdate,-_id")]))
    assert descending == list(reversed(ascending))


async def test_sort_by_id(client: httpx.AsyncClient) -> None:
    await _people(client)
    assert match_ids(await search(client, "Patient", [("_sort", "_id")])) == ["s1", "s2", "s3", "s4", "s5"]
    assert match_ids(await search(client, "Patient", [("_sort", "-_id")])) == ["s5", "s4", "s3", "s2", "s1"]


async def test_sort_by_last_updated(client: httpx.AsyncClient) -> None:
    for fhir_id in ("z", "m", "a"):
        await put(client, "Patient", fhir_id, {"gender": "other"})
        await asyncio.sleep(0.005)
    await put(client, "Patient", "m", {"gender": "female"})  # m is now the most recent
    assert match_ids(await search(client, "Patient", [("_sort", "_lastUpdated")])) == ["z", "a", "m"]
    assert match_ids(await search(client, "Patient", [("_sort", "-_lastUpdated")])) == ["m", "a", "z"]


async def test_sort_by_token_and_reference(client: httpx.AsyncClient) -> None:
    for fhir_id, status, owner in (
        ("t1", "requested", "o2"),
        ("t2", "completed", "o3"),
        ("t3", "draft", "o1"),
    ):
        await put(
            client,
            "Task",
            fhir_id,
            {"status": status, "intent": "order", "owner": {"reference": f"Organization/{owner}"}},
        )
    assert match_ids(await search(client, "Task", [("_sort", "status")])) == ["t2", "t3", "t1"]
    assert match_ids(await search(client, "Task", [("_sort", "-owner")])) == ["t2", "t1", "t3"]


async def test_sort_unknown_parameter_is_400(client: httpx.AsyncClient) -> None:
    await bad_request(client, "Patient", ("_sort", "shoe-size"), names="_sort")


async def test_sort_is_stable_across_pages(client: httpx.AsyncClient) -> None:
    families = ["Baker", "Adams", "Carter"]
    for n in range(11):
        await put(client, "Patient", f"p{n:02d}", {"name": [{"family": families[n % 3]}]})
    for sort in ("family", "-family", "family,-_id", "-_lastUpdated"):
        whole = match_ids(await search(client, "Patient", [("_sort", sort), ("_count", "100")]))
        first = await search(client, "Patient", [("_sort", sort), ("_count", "2")])
        pages = await walk(client, first)
        paged = [fhir_id for page in pages for fhir_id in match_ids(page)]
        assert paged == whole, sort
        assert len(set(paged)) == 11
        backwards = await walk(client, pages[-1], "previous")
        assert [match_ids(p) for p in backwards] == [match_ids(p) for p in reversed(pages)], sort


async def test_sort_with_missing_values_is_stable_across_pages(client: httpx.AsyncClient) -> None:
    """Resources without a value for the sort parameter are still paged through exactly once."""
    for n in range(5):
        await put(
            client, "Patient", f"born{n}", {"birthDate": f"199{n}-01-01", "name": [{"family": f"F{n}"}]}
        )
        await put(client, "Patient", f"none{n}", {"gender": "unknown"})
    for sort in ("birthdate", "-birthdate", "family", "-family"):
        whole = match_ids(await search(client, "Patient", [("_sort", sort), ("_count", "100")]))
        assert len(whole) == 10
        first = await search(client, "Patient", [("_sort", sort), ("_count", "3")])
        paged = [fhir_id for page in await walk(client, first) for fhir_id in match_ids(page)]
        assert paged == whole, sort


async def test_paging_links(client: httpx.AsyncClient) -> None:
    await _people(client)
    first = await search(client, "Patient", [("_count", "2"), ("_sort", "_id")])
    assert match_ids(first) == ["s1", "s2"]
    assert link(first, "previous") is None
    self_url, first_url, next_url = link(first, "self"), link(first, "first"), link(first, "next")
    assert self_url is not None and first_url is not None and next_url is not None
    assert self_url.startswith(f"{FHIR}/Patient?")
    assert _query(self_url)["_count"] == ["2"] and _query(self_url)["_sort"] == ["_id"]
    assert _query(next_url)["_sort"] == ["_id"]

    pages = await walk(client, first)
    assert [match_ids(p) for p in pages] == [["s1", "s2"], ["s3", "s4"], ["s5"]]
    assert link(pages[-1], "next") is None
    assert link(pages[1], "previous") is not None

    backwards = await walk(client, pages[-1], "previous")
    assert [match_ids(p) for p in backwards] == [["s5"], ["s3", "s4"], ["s1", "s2"]]

    again = await get_url(client, first_url)
    assert match_ids(again.json()) == ["s1", "s2"]
    page_two_self = link(pages[1], "self")
    assert page_two_self is not None
    assert match_ids((await get_url(client, page_two_self)).json()) == ["s3", "s4"]


async def test_walking_pages_returns_every_match_once(client: httpx.AsyncClient) -> None:
    for n in range(23):
        await put(client, "Patient", f"w{n:02d}", {"gender": "female" if n % 2 else "male"})
    first = await search(client, "Patient", [("gender", "female"), ("_count", "4")])
    seen = [fhir_id for page in await walk(client, first) for fhir_id in match_ids(page)]
    assert sorted(seen) == sorted(f"w{n:02d}" for n in range(23) if n % 2)
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("sort", [None, "family", "-family", "_id", "family,-birthdate"])
async def test_writes_between_pages_neither_duplicate_nor_skip(
    client: httpx.AsyncClient, sort: str | None
) -> None:
    """Creates and updates between page requests: every original match is seen exactly once."""
    originals = [f"o{n:02d}" for n in range(12)]
    for n, fhir_id in enumerate(originals):
        await put(client, "Patient", fhir_id, {"name": [{"family": f"F{n % 4}"}], "birthDate": f"19{50 + n}"})
    params = [("_count", "3")] + ([("_sort", sort)] if sort else [])
    page = await search(client, "Patient", params)
    seen: list[str] = []
    step = 0
    while True:
        seen.extend(match_ids(page))
        step += 1
        # a new match that sorts first, one that sorts last, and updates (sort keys unchanged)
        await put(client, "Patient", f"a{step:02d}", {"name": [{"family": "A"}], "birthDate": "1900"})
        await put(client, "Patient", f"z{step:02d}", {"name": [{"family": "Z"}], "birthDate": "2000"})
        for fhir_id in (seen[0], originals[-1]):
            n = originals.index(fhir_id) if fhir_id in originals else None
            if n is not None:
                body = {"name": [{"family": f"F{n % 4}"}], "birthDate": f"19{50 + n}", "gender": "other"}
                await put(client, "Patient", fhir_id, body)
        next_url = link(page, "next")
        if next_url is None:
            break
        response = await get_url(client, next_url)
        assert response.status_code == 200, response.text
        page = response.json()
        assert step < 50
    assert len(seen) == len(set(seen)), f"duplicates: {seen}"
    assert set(originals) <= set(seen), f"skipped: {set(originals) - set(seen)}"


async def test_deleting_between_pages_does_not_skip(client: httpx.AsyncClient) -> None:
    for n in range(9):
        await put(client, "Patient", f"d{n}", {"gender": "male"})
    page = await search(client, "Patient", [("_count", "3"), ("_sort", "_id")])
    assert match_ids(page) == ["d0", "d1", "d2"]
    response = await client.delete("/fhir/Patient/d2")  # the row the cursor points after
    assert response.status_code == 200
    next_url = link(page, "next")
    assert next_url is not None
    page = (await get_url(client, next_url)).json()
    assert match_ids(page) == ["d3", "d4", "d5"]


async def test_empty_result(client: httpx.AsyncClient) -> None:
    await _people(client)
    bundle = await search(client, "Patient", [("family", "nobody")])
    assert bundle["total"] == 0
    assert not bundle.get("entry")
    assert link(bundle, "next") is None and link(bundle, "previous") is None
    assert link(bundle, "self") is not None


async def _next_url(client: httpx.AsyncClient, path: str = "Patient", **extra: str) -> str:
    bundle = await search(client, path, [("_count", "1"), *extra.items()])
    url = link(bundle, "next")
    assert url is not None
    return url


def _cursor(url: str) -> str:
    return _query(url)["_cursor"][0]


async def test_tampered_cursor_is_400(client: httpx.AsyncClient) -> None:
    await _people(client)
    url = await _next_url(client)
    cursor = _cursor(url)
    flipped = cursor[:5] + ("A" if cursor[5] != "A" else "B") + cursor[6:]
    await bad_request(client, "Patient", ("_count", "1"), ("_cursor", flipped), names="_cursor")
    await bad_request(client, "Patient", ("_count", "1"), ("_cursor", "not-a-cursor"), names="_cursor")
    await bad_request(client, "Patient", ("_count", "1"), ("_cursor", cursor + "x"), names="_cursor")


async def test_cursor_of_another_query_is_400(client: httpx.AsyncClient) -> None:
    await _people(client)
    goal = {"lifecycleStatus": "active", "description": {"text": "g"}, "subject": {"reference": "Patient/s1"}}
    await put(client, "Goal", "g1", goal)
    await put(client, "Goal", "g2", goal)
    patient_cursor = _cursor(await _next_url(client))
    await bad_request(client, "Goal", ("_count", "1"), ("_cursor", patient_cursor), names="_cursor")
    await bad_request(
        client, "Patient", ("_count", "1"), ("family", "baker"), ("_cursor", patient_cursor), names="_cursor"
    )
    sorted_cursor = _cursor(await _next_url(client, _sort="family"))
    await bad_request(client, "Patient", ("_count", "1"), ("_cursor", sorted_cursor), names="_cursor")


async def test_history_cursor_is_not_a_search_cursor(client: httpx.AsyncClient) -> None:
    await _people(client)
    history = (await client.get("/fhir/Patient/_history", params={"_count": "1"})).json()
    url = link(history, "next")
    assert url is not None
    await bad_request(client, "Patient", ("_count", "1"), ("_cursor", _cursor(url)), names="_cursor")


async def test_count_zero_reports_only_the_total(client: httpx.AsyncClient) -> None:
    """``_count=0`` is treated as ``_summary=count`` (R4 search.html#count)."""
    await _people(client)
    bundle = await search(client, "Patient", [("_count", "0")])
    assert bundle["total"] == 5
    assert match_ids(bundle) == []
    assert link(bundle, "next") is None and link(bundle, "previous") is None


async def test_count_limits_page_size(client: httpx.AsyncClient) -> None:
    await _people(client)
    assert len(match_ids(await search(client, "Patient", [("_count", "3")]))) == 3
    bundle = await search(client, "Patient", [("_count", "100")])
    assert len(match_ids(bundle)) == 5
    assert link(bundle, "next") is None


async def test_default_page_size_is_bounded(client: httpx.AsyncClient) -> None:
    await asyncio.gather(*(put(client, "Patient", f"n{n:02d}", {"gender": "male"}) for n in range(25)))
    bundle = await search(client, "Patient")
    assert 0 < len(match_ids(bundle)) < 25
    assert link(bundle, "next") is not None


async def test_count_above_maximum_is_capped(client: httpx.AsyncClient) -> None:
    semaphore = asyncio.Semaphore(20)

    async def make(n: int) -> None:
        async with semaphore:
            await put(client, "Patient", f"c{n:04d}", {"gender": "female"})

    await asyncio.gather(*(make(n) for n in range(1003)))
    bundle = await search(client, "Patient", [("_count", "5000")])
    assert len(match_ids(bundle)) == 1000
    self_url = link(bundle, "self")
    assert self_url is not None and _query(self_url)["_count"] == ["1000"]
    next_url = link(bundle, "next")
    assert next_url is not None
    rest = (await get_url(client, next_url)).json()
    assert len(match_ids(rest)) == 3


@pytest.mark.parametrize("value", ["-1", "abc", "1.5"])
async def test_malformed_count_is_400(client: httpx.AsyncClient, value: str) -> None:
    await bad_request(client, "Patient", ("_count", value), names="_count")
