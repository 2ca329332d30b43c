"""Quantity and composite search (R4 search.html#quantity, #number, #composite).

eq uses the implicit precision of the search value: ``100`` means [99.5, 100.5) and
``5.4`` means [5.35, 5.45); gt/lt/ge/le compare with the exact value.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.test_search_support import bad_request, ids, put, put_raw

UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"




async def _observation(client: httpx.AsyncClient, fhir_id: str, value: str, code: str = "mg") -> None:
    """An Observation with valueQuantity ``value`` written verbatim (keeps 5.40 as 5.40)."""
    resource = {
        "resourceType": "Observation",
        "id": fhir_id,
        "status": "final",
        "code": {"text": "level"},
        "valueQuantity": {"value": "VALUE", "unit": code, "system": UCUM, "code": code},
    }
    await put_raw(client, "Observation", fhir_id, json.dumps(resource).replace('"VALUE"', value))


async def _quantities(client: httpx.AsyncClient) -> None:
    for fhir_id, value in (
        ("v5-4", "5.4"),
        ("v5-40", "5.40"),
        ("v5-46", "5.46"),
        ("v5-35", "5.35"),
        ("v100", "100"),
        ("v99-5", "99.5"),
        ("v100-5", "100.5"),
        ("v99-4", "99.4"),
    ):
        await _observation(client, fhir_id, value)
    await _observation(client, "mmol", "5.4", code="mmol/L")
    await put(client, "Observation", "novalue", {"status": "final", "code": {"text": "level"}})


SMALL = {"v5-4", "v5-40", "v5-46", "v5-35", "mmol"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5.4", {"v5-4", "v5-40", "v5-35", "mmol"}),
        ("eq5.4", {"v5-4", "v5-40", "v5-35", "mmol"}),
        ("5.40", {"v5-4", "v5-40", "mmol"}),
        ("5.5", {"v5-46"}),
        ("100", {"v100", "v99-5"}),
        ("100.0", {"v100"}),
        ("ne100", {*SMALL, "v100-5", "v99-4"}),
        ("gt100", {"v100-5"}),
        ("ge100", {"v100", "v100-5"}),
        ("lt100", {*SMALL, "v99-5", "v99-4"}),
        ("le100", {*SMALL, "v99-5", "v99-4", "v100"}),
        ("gt5.4", {"v5-46", "v100", "v99-5", "v100-5", "v99-4"}),
        ("ap100", {"v100", "v99-5", "v100-5", "v99-4"}),
        ("lt0", set()),
        ("-1", set()),
    ],
)
async def test_value_quantity_prefixes(client: httpx.AsyncClient, value: str, expected: set[str]) -> None:
    await _quantities(client)
    assert await ids(client, "Observation", ("value-quantity", value)) == expected


async def test_value_quantity_units(client: httpx.AsyncClient) -> None:
    """``number|system|code`` and ``number||code`` (code or unit) restrict the unit."""
    await _quantities(client)
    assert await ids(client, "Observation", ("value-quantity", f"5.4|{UCUM}|mg")) == {
        "v5-4",
        "v5-40",
        "v5-35",
    }
    assert await ids(client, "Observation", ("value-quantity", f"5.4|{UCUM}|mmol/L")) == {"mmol"}
    assert await ids(client, "Observation", ("value-quantity", "5.4||mmol/L")) == {"mmol"}
    assert await ids(client, "Observation", ("value-quantity", "5.4|http://other.org|mg")) == set()
    assert await ids(client, "Observation", ("value-quantity", f"gt99|{UCUM}|mg")) == {
        "v100",
        "v99-5",
        "v100-5",
        "v99-4",
    }


async def test_value_quantity_or_and_missing(client: httpx.AsyncClient) -> None:
    await _quantities(client)
    assert await ids(client, "Observation", ("value-quantity", "5.5,100.5")) == {"v5-46", "v100-5"}
    assert await ids(client, "Observation", ("value-quantity", "gt5"), ("value-quantity", "lt6")) == SMALL
    assert await ids(client, "Observation", ("value-quantity:missing", "true")) == {"novalue"}


@pytest.mark.parametrize("value", ["abc", "5.4.1", "gt", "1,5x", "xx5", "5.4e"])
async def test_malformed_quantity_is_400(client: httpx.AsyncClient, value: str) -> None:
    await bad_request(client, "Observation", ("value-quantity", value), names="value-quantity")


async def _blood_pressure(client: httpx.AsyncClient, fhir_id: str, code: str, value: int) -> None:
    await put(
        client,
        "Observation",
        fhir_id,
        {
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "valueQuantity": {"value": value, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
        },
    )


async def test_composite_code_value_quantity(client: httpx.AsyncClient) -> None:
    await _blood_pressure(client, "sys120", "8480-6", 120)
    await _blood_pressure(client, "dia80", "8462-4", 80)
    await _blood_pressure(client, "sys90", "8480-6", 90)
    assert await ids(client, "Observation", ("code-value-quantity", f"{LOINC}|8480-6$gt100")) == {"sys120"}
    assert await ids(client, "Observation", ("code-value-quantity", "8480-6$lt100")) == {"sys90"}
    assert await ids(client, "Observation", ("code-value-quantity", "8462-4$gt100")) == set()
    assert await ids(client, "Observation", ("code-value-quantity", "8462-4$80")) == {"dia80"}
    assert await ids(client, "Observation", ("code-value-quantity", f"8480-6$120|{UCUM}|mm[Hg]")) == {
        "sys120"
    }
    assert await ids(client, "Observation", ("code-value-quantity", "8480-6$gt100,8462-4$80")) == {
        "sys120",
        "dia80",
    }


async def test_composite_needs_every_component(client: httpx.AsyncClient) -> None:
    await bad_request(client, "Observation", ("code-value-quantity", "8480-6"), names="code-value-quantity")
