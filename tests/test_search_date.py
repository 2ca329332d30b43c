"""Date search (R4 search.html#date): prefixes over implicit precision ranges.

A search value and a resource value each denote a range (``2024-03`` is the whole month);
eq = the search range contains the resource range, gt/lt = the range above/below the
search value overlaps the resource range, ge/le = gt/lt or eq, sa/eb = the resource range
starts after / ends before the search range, ne = not eq.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.test_search_support import bad_request, ids, put, search


async def _birthdates(client: httpx.AsyncClient) -> None:
    for fhir_id, date in (
        ("d0305", "2024-03-05"),
        ("d0320", "2024-03-20"),
        ("d0701", "2024-07-01"),
        ("d1231", "2023-12-31"),
        ("y2024", "2024"),
        ("m2403", "2024-03"),
    ):
        await put(client, "Patient", fhir_id, {"birthDate": date})
    await put(client, "Patient", "unborn", {"gender": "unknown"})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024", {"d0305", "d0320", "d0701", "y2024", "m2403"}),
        ("eq2024", {"d0305", "d0320", "d0701", "y2024", "m2403"}),
        ("2024-03", {"d0305", "d0320", "m2403"}),
        ("2024-03-05", {"d0305"}),
        ("2023", {"d1231"}),
        ("ne2024-03", {"d0701", "d1231", "y2024"}),
        ("gt2024-03", {"d0701", "y2024"}),
        ("lt2024-03", {"d1231", "y2024"}),
        ("ge2024-03", {"d0305", "d0320", "d0701", "y2024", "m2403"}),
        ("le2024-03", {"d0305", "d0320", "d1231", "y2024", "m2403"}),
        ("sa2024-03", {"d0701"}),
        ("eb2024-03", {"d1231"}),
        ("gt2024-03-05", {"d0320", "d0701", "y2024", "m2403"}),
        ("ge2024-03-05", {"d0305", "d0320", "d0701", "y2024", "m2403"}),
        ("lt2024-03-20", {"d0305", "d1231", "y2024", "m2403"}),
        ("le2024-03-20", {"d0305", "d0320", "d1231", "y2024", "m2403"}),
        ("sa2024-03-05", {"d0320", "d0701"}),
        ("eb2024-03-20", {"d0305", "d1231"}),
        ("gt2025", set()),
    ],
)
async def test_birthdate_prefixes(client: httpx.AsyncClient, value: str, expected: set[str]) -> None:
    await _birthdates(client)
    assert await ids(client, "Patient", ("birthdate", value)) == expected


async def test_birthdate_range_by_and(client: httpx.AsyncClient) -> None:
    """Two prefixed parameters are AND: a closed interval."""
    await _birthdates(client)
    assert await ids(client, "Patient", ("birthdate", "ge2024-03-01"), ("birthdate", "le2024-03-31")) == {
        "d0305",
        "d0320",
        "m2403",
        "y2024",  # the year overlaps both bounds
    }
    assert await ids(client, "Patient", ("birthdate", "2023,2024-07")) == {"d1231", "d0701"}


async def test_approximately(client: httpx.AsyncClient) -> None:
    await put(client, "Patient", "same", {"birthDate": "2024-03-05"})
    await put(client, "Patient", "close", {"birthDate": "2024-03-09"})
    await put(client, "Patient", "far", {"birthDate": "2010-01-01"})
    assert await ids(client, "Patient", ("birthdate", "ap2024-03-06")) == {"same", "close"}


async def _authored_tasks(client: httpx.AsyncClient) -> None:
    for fhir_id, moment in (
        ("t1000", "2024-03-05T10:00:30Z"),
        ("t1001", "2024-03-05T10:01:00Z"),
        ("tnight", "2024-03-05T23:59:59Z"),
        ("tnext", "2024-03-06T00:00:00Z"),
        ("toffset", "2024-03-05T12:00:10+02:00"),  # 10:00:10Z
    ):
        await put(client, "Task", fhir_id, {"status": "requested", "intent": "order", "authoredOn": moment})


async def test_datetime_day_and_minute_precision(client: httpx.AsyncClient) -> None:
    await _authored_tasks(client)
    assert await ids(client, "Task", ("authored-on", "2024-03-05")) == {"t1000", "t1001", "tnight", "toffset"}
    assert await ids(client, "Task", ("authored-on", "2024-03-05T10:00Z")) == {"t1000", "toffset"}
    assert await ids(client, "Task", ("authored-on", "2024-03-05T11:00+01:00")) == {"t1000", "toffset"}
    assert await ids(client, "Task", ("authored-on", "2024-03-05T10:00:30Z")) == {"t1000"}
    assert await ids(client, "Task", ("authored-on", "gt2024-03-05T10:00Z")) == {"t1001", "tnight", "tnext"}
    assert await ids(client, "Task", ("authored-on", "lt2024-03-05T10:01Z")) == {"t1000", "toffset"}
    assert await ids(client, "Task", ("authored-on", "ge2024-03-06")) == {"tnext"}
    assert await ids(client, "Task", ("authored-on", "sa2024-03-05")) == {"tnext"}


async def _periods(client: httpx.AsyncClient) -> None:
    periods = {
        "march": {"start": "2024-03-01", "end": "2024-03-31"},
        "open": {"start": "2024-03-10"},  # ongoing: no end
        "before": {"end": "2024-02-15"},  # no start
    }
    for fhir_id, period in periods.items():
        await put(
            client, "Task", fhir_id, {"status": "in-progress", "intent": "order", "executionPeriod": period}
        )
    await put(client, "Task", "noperiod", {"status": "draft", "intent": "order"})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-03", {"march"}),
        ("2024", {"march"}),
        ("2024-03-15", set()),
        ("ne2024-03", {"open", "before"}),
        ("gt2024-06", {"open"}),
        ("lt2024-03", {"before"}),
        ("ge2024-03-15", {"march", "open"}),
        ("le2024-03-15", {"march", "open", "before"}),
        ("sa2024-02", {"march", "open"}),
        ("eb2024-03-05", {"before"}),
        ("eb2024-04-01", {"march", "before"}),
    ],
)
async def test_task_period(client: httpx.AsyncClient, value: str, expected: set[str]) -> None:
    await _periods(client)
    assert await ids(client, "Task", ("period", value)) == expected


async def test_careplan_date_is_a_period(client: httpx.AsyncClient) -> None:
    base = {"status": "active", "intent": "plan", "subject": {"reference": "Patient/p"}}
    await put(client, "CarePlan", "q1", {**base, "period": {"start": "2024-01-01", "end": "2024-03-31"}})
    await put(client, "CarePlan", "jan", {**base, "period": {"start": "2024-01-10", "end": "2024-01-20"}})
    await put(client, "CarePlan", "y25", {**base, "period": {"start": "2025-01-01"}})
    assert await ids(client, "CarePlan", ("date", "2024-01")) == {"jan"}
    assert await ids(client, "CarePlan", ("date", "2024")) == {"q1", "jan"}
    assert await ids(client, "CarePlan", ("date", "ge2024-02")) == {"q1", "y25"}
    assert await ids(client, "CarePlan", ("date", "lt2024-01-15")) == {"q1", "jan"}
    assert await ids(client, "CarePlan", ("date", "gt2030")) == {"y25"}


async def test_observation_date_datetime_and_period(client: httpx.AsyncClient) -> None:
    base = {"status": "final", "code": {"text": "screen"}}
    await put(client, "Observation", "instant", {**base, "effectiveDateTime": "2024-03-05T08:00:00Z"})
    await put(
        client,
        "Observation",
        "span",
        {**base, "effectivePeriod": {"start": "2024-03-04T00:00:00Z", "end": "2024-03-06T00:00:00Z"}},
    )
    await put(client, "Observation", "april", {**base, "effectiveDateTime": "2024-04-01"})
    await put(client, "Observation", "undated", base)
    assert await ids(client, "Observation", ("date", "2024-03-05")) == {"instant"}
    assert await ids(client, "Observation", ("date", "2024-03")) == {"instant", "span"}
    assert await ids(client, "Observation", ("date", "ge2024-03-05")) == {"instant", "span", "april"}
    assert await ids(client, "Observation", ("date", "lt2024-03-05")) == {"span"}
    assert await ids(client, "Observation", ("date", "eb2024-03-31")) == {"instant", "span"}
    assert await ids(client, "Observation", ("date", "sa2024-03-05")) == {"april"}
    assert await ids(client, "Observation", ("date:missing", "true")) == {"undated"}


async def test_last_updated(client: httpx.AsyncClient) -> None:
    first = await put(client, "Patient", "first", {"gender": "female"})
    await asyncio.sleep(0.01)
    second = await put(client, "Patient", "second", {"gender": "male"})
    first_at, second_at = first["meta"]["lastUpdated"], second["meta"]["lastUpdated"]
    assert await ids(client, "Patient", ("_lastUpdated", f"gt{first_at}")) == {"second"}
    assert await ids(client, "Patient", ("_lastUpdated", f"ge{first_at}")) == {"first", "second"}
    assert await ids(client, "Patient", ("_lastUpdated", f"lt{second_at}")) == {"first"}
    assert await ids(client, "Patient", ("_lastUpdated", first_at)) == {"first"}
    assert await ids(client, "Patient", ("_lastUpdated", f"gt{second_at}")) == set()
    assert await ids(client, "Patient", ("_lastUpdated", "gt2020-01-01")) == {"first", "second"}
    assert await ids(client, "Patient", ("_lastUpdated", "lt2020-01-01")) == set()


@pytest.mark.parametrize("value", ["xx2020", "2020-13-01", "2020-02-30", "yesterday", "2020-1-1", "ge"])
async def test_malformed_dates_are_400(client: httpx.AsyncClient, value: str) -> None:
    await bad_request(client, "Patient", ("birthdate", value), names="birthdate")


async def test_malformed_last_updated_is_400(client: httpx.AsyncClient) -> None:
    await bad_request(client, "Patient", ("_lastUpdated", "gtnow"), names="_lastUpdated")


async def test_date_modifier_is_400(client: httpx.AsyncClient) -> None:
    await bad_request(client, "Patient", ("birthdate:exact", "2024"), names="birthdate")


async def test_datetime_search_on_resource_without_match_is_empty_bundle(client: httpx.AsyncClient) -> None:
    await _authored_tasks(client)
    bundle = await search(client, "Task", [("authored-on", "2019"), ("_total", "accurate")])
    assert bundle["total"] == 0
    assert not bundle.get("entry")
