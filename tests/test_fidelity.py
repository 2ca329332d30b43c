"""A resource read back is the JSON that was written, plus the server's id and meta."""

from __future__ import annotations

import httpx

JSON = {"content-type": "application/fhir+json"}

OBSERVATION = (
    b'{"resourceType":"Observation","status":"final",'
    b'"meta":{"profile":["http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-sdoh-assessment"]},'
    b'"code":{"text":"Monthly rent"},"subject":{"reference":"Patient/p1"},'
    b'"valueQuantity":{"value":1250.50,"unit":"USD","system":"urn:iso:std:iso:4217","code":"USD"},'
    b'"effectiveDateTime":"2026-03-05","_effectiveDateTime":{"extension":[{"url":"http://example.org/precision",'
    b'"valueString":"day"}]},"extension":[{"url":"http://partner.example.org/unknown-to-us","valueDecimal":0.10}],'
    b'"note":[{"text":"Caf\xc3\xa9 \xe2\x80\x94 \xe6\x97\xa5\xe6\x9c\xac"}]}'
)


async def test_decimals_extensions_and_text_survive(client: httpx.AsyncClient) -> None:
    created = await client.post("/fhir/Observation", content=OBSERVATION, headers=JSON)
    assert created.status_code == 201, created.text
    rid = created.json()["id"]
    read = await client.get(f"/fhir/Observation/{rid}")
    raw = read.text
    assert '"value":1250.50' in raw
    assert '"valueDecimal":0.10' in raw
    body = read.json()
    assert body["_effectiveDateTime"]["extension"][0]["valueString"] == "day"
    assert body["extension"][0]["url"] == "http://partner.example.org/unknown-to-us"
    assert body["note"][0]["text"] == "Café — 日本"
    assert body["meta"]["profile"] == [
        "http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-sdoh-assessment"
    ]
    assert list(body)[:3] == ["resourceType", "id", "meta"]
    pretty = await client.get(f"/fhir/Observation/{rid}?_pretty=true")
    assert '"value": 1250.50' in pretty.text
    history = await client.get(f"/fhir/Observation/{rid}/_history")
    assert '"value":1250.50' in history.text


async def test_written_body_equals_read_body_apart_from_server_elements(client: httpx.AsyncClient) -> None:
    import json

    original = json.loads(OBSERVATION)
    created = (await client.post("/fhir/Observation", content=OBSERVATION, headers=JSON)).json()
    read = (await client.get(f"/fhir/Observation/{created['id']}")).json()
    for key in ("id",):
        read.pop(key)
    read["meta"].pop("versionId")
    read["meta"].pop("lastUpdated")
    assert read == original
