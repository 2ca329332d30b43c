"""Input that used to crash the server (issue 15, finding 13) is a 4xx OperationOutcome that
changes nothing: Unicode digits, dates outside what can be represented in UTC, approximate
ranges that leave the supported dates, and unpaired UTF-16 surrogates anywhere in a body."""

from __future__ import annotations

import base64

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import count_rows
from tests.test_search_support import JSON, put

EARLY = "0001-01-01T00:00:00+14:00"  # in UTC: year 0
LATE = "9999-12-31T23:00:00-14:00"  # in UTC: year 10000


def _outcome_4xx(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    "path",
    [
        "/fhir/Patient?_count=\u00b2",
        "/fhir/Patient?_count=\u0663",
        "/fhir/Patient/_history?_count=\u00b2",
        "/fhir/Patient/p/_history/\u00b2",
        "/fhir/Patient?birthdate=ap9999",
        "/fhir/Patient?birthdate=ap0001",
        "/fhir/Patient?_lastUpdated=ap9999-12-31",
        f"/fhir/Patient?birthdate={EARLY.replace('+', '%2B')}",
        f"/fhir/Patient?_lastUpdated=gt{EARLY.replace('+', '%2B')}",
        f"/fhir/Patient?birthdate={LATE}",
        f"/fhir/Patient/_history?_since={EARLY.replace('+', '%2B')}",
        f"/fhir/_history?_since={LATE}",
    ],
)
async def test_malformed_search_and_history_parameters_are_4xx(client: httpx.AsyncClient, path: str) -> None:
    await put(client, "Patient", "p", {"gender": "other"})
    _outcome_4xx(await client.get(path))


@pytest.mark.parametrize("when", [EARLY, LATE])
async def test_writes_with_unrepresentable_dates_are_400_and_store_nothing(
    client: httpx.AsyncClient, engine: AsyncEngine, when: str
) -> None:
    before = await count_rows(engine)
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "effectiveDateTime": when,
    }
    _outcome_4xx(await client.post("/fhir/Observation", json=observation, headers=JSON))
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": observation, "request": {"method": "POST", "url": "Observation"}}],
    }
    _outcome_4xx(await client.post("/fhir", json=bundle, headers=JSON))
    stored = await put(client, "Observation", "o", {"status": "final", "code": {"text": "x"}})
    patch = [{"op": "add", "path": "/effectiveDateTime", "value": when}]
    _outcome_4xx(
        await client.patch(
            f"/fhir/Observation/{stored['id']}",
            json=patch,
            headers={"content-type": "application/json-patch+json"},
        )
    )
    assert await count_rows(engine) == before + 1  # only the plain Observation


async def test_the_last_representable_dates_still_work(client: httpx.AsyncClient) -> None:
    await put(
        client,
        "Observation",
        "end",
        {"status": "final", "code": {"text": "x"}, "effectiveDateTime": "9999-12-31"},
    )
    await put(
        client,
        "Observation",
        "start",
        {"status": "final", "code": {"text": "x"}, "effectiveDateTime": "0001-01-01T00:00:00-05:00"},
    )
    found = (await client.get("/fhir/Observation", params={"date": "9999-12-31"})).json()
    assert [e["resource"]["id"] for e in found["entry"]] == ["end"]
    found = (await client.get("/fhir/Observation", params={"date": "lt0002"})).json()
    assert [e["resource"]["id"] for e in found["entry"]] == ["start"]


LONE = "\\ud800"


@pytest.mark.parametrize(
    "body",
    [
        '{"resourceType":"' + LONE + '"}',
        '{"resourceType":"Patient","name":[{"family":"x' + LONE + '"}]}',
        '{"resourceType":"Patient","' + LONE + '":1}',
    ],
)
async def test_an_unpaired_surrogate_in_a_resource_is_400(
    client: httpx.AsyncClient, engine: AsyncEngine, body: str
) -> None:
    before = await count_rows(engine)
    _outcome_4xx(await client.post("/fhir/Patient", content=body, headers=JSON))
    _outcome_4xx(
        await client.put(
            "/fhir/Patient/s", content=body.replace('"Patient"', '"Patient","id":"s"'), headers=JSON
        )
    )
    assert await count_rows(engine) == before


@pytest.mark.parametrize(
    "request_part",
    [
        '{"method":"GET","url":"Patient/' + LONE + '"}',
        '{"method":"GET","url":"Patient?name=' + LONE + '"}',
        '{"method":"POST","url":"Patient","ifNoneExist":"identifier=' + LONE + '"}',
        '{"method":"PUT","url":"Patient/a","ifMatch":"W/\\"' + LONE + '\\""}',
    ],
)
@pytest.mark.parametrize("kind", ["batch", "transaction"])
async def test_an_unpaired_surrogate_in_a_bundle_request_is_400(
    client: httpx.AsyncClient, engine: AsyncEngine, request_part: str, kind: str
) -> None:
    before = await count_rows(engine)
    resource = '{"resourceType":"Patient","id":"a"}'
    body = (
        '{"resourceType":"Bundle","type":"'
        + kind
        + '","entry":[{"resource":'
        + resource
        + ',"request":'
        + request_part
        + "}]}"
    )
    _outcome_4xx(await client.post("/fhir", content=body, headers=JSON))
    assert await count_rows(engine) == before


@pytest.mark.parametrize(
    "path",
    [
        "/fhir/Patient?_sort=name&_total=accurate",
        "/fhir/Patient?_sort=-birthdate,name&_total=estimate",
        "/fhir/Patient?_sort=name&_summary=count",
        "/fhir/Patient?_sort=name&_count=0",
        "/fhir?_type=Patient,Task&name=x",
        "/fhir?_type=Task,Patient&name=x&_total=accurate",
    ],
)
async def test_searches_that_used_to_fail_in_the_database_are_answered(
    client: httpx.AsyncClient, path: str
) -> None:
    await put(client, "Patient", "s1", {"name": [{"family": "x"}]})
    response = await client.get(path)
    assert response.status_code == 200, response.text[:300]


async def test_a_deeply_nested_bundle_is_400(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    """600 nested extensions in a transaction entry overflowed the reference rewriting's recursion."""
    before = await count_rows(engine)
    nested = '{"url":"urn:x","extension":[' * 600 + '{"url":"urn:x","valueString":"leaf"}' + "]}" * 600
    bundle = (
        '{"resourceType":"Bundle","type":"transaction","entry":[{"resource":{"resourceType":"Patient",'
        '"extension":[' + nested + ']},"request":{"method":"POST","url":"Patient"}}]}'
    )
    _outcome_4xx(await client.post("/fhir", content=bundle, headers=JSON))
    assert await count_rows(engine) == before


async def test_malformed_bundle_request_fields_fail_their_entry_only(client: httpx.AsyncClient) -> None:
    await put(client, "Patient", "mb", {"gender": "other"})
    deep = "[" * 600 + "]" * 600
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": "Patient/mb", "ifNoneMatch": 5}},
            {
                "resource": {"resourceType": "Patient", "id": "mb"},
                "request": {"method": "PUT", "url": "Patient/mb", "ifMatch": 1},
            },
            {
                "resource": {"resourceType": "Patient"},
                "request": {"method": "POST", "url": "Patient", "ifNoneExist": 7},
            },
            {
                "resource": {
                    "resourceType": "Binary",
                    "contentType": "application/json-patch+json",
                    "data": base64.b64encode(deep.encode()).decode(),
                },
                "request": {"method": "PATCH", "url": "Patient/mb"},
            },
            {"request": {"method": "GET", "url": "Patient/mb"}},
        ],
    }
    response = await client.post("/fhir", json=bundle, headers=JSON)
    assert response.status_code == 200, response.text[:300]
    statuses = [e["response"]["status"][:3] for e in response.json()["entry"]]
    assert statuses == ["400", "400", "400", "400", "200"]
