"""String search (R4 search.html#string): starts-with, case- and accent-insensitive, modifiers."""

from __future__ import annotations

import httpx

from tests.test_search_support import ids, put


async def _names(client: httpx.AsyncClient) -> None:
    await put(client, "Patient", "umlaut", {"name": [{"family": "Müller", "given": ["Hans", "Peter"]}]})
    await put(client, "Patient", "plain", {"name": [{"family": "Muller", "given": ["Ana"]}]})
    await put(
        client, "Patient", "mullins", {"name": [{"family": "Mullins", "given": ["Zoë"], "prefix": ["Dr"]}]}
    )
    await put(client, "Patient", "text", {"name": [{"text": "Keller Smith"}]})
    await put(client, "Patient", "nameless", {"gender": "unknown"})


async def test_default_is_case_and_accent_insensitive_starts_with(client: httpx.AsyncClient) -> None:
    await _names(client)
    assert await ids(client, "Patient", ("family", "muller")) == {"umlaut", "plain"}
    assert await ids(client, "Patient", ("family", "MUL")) == {"umlaut", "plain", "mullins"}
    assert await ids(client, "Patient", ("family", "Müll")) == {"umlaut", "plain", "mullins"}
    assert await ids(client, "Patient", ("family", "ller")) == set()  # starts-with, not contains
    assert await ids(client, "Patient", ("family", "mullerx")) == set()


async def test_name_searches_every_part_of_human_name(client: httpx.AsyncClient) -> None:
    await _names(client)
    assert await ids(client, "Patient", ("name", "hans")) == {"umlaut"}
    assert await ids(client, "Patient", ("name", "peter")) == {"umlaut"}
    assert await ids(client, "Patient", ("name", "zoe")) == {"mullins"}
    assert await ids(client, "Patient", ("name", "dr")) == {"mullins"}
    assert await ids(client, "Patient", ("name", "keller")) == {"text"}
    assert await ids(client, "Patient", ("name", "mul")) == {"umlaut", "plain", "mullins"}
    assert await ids(client, "Patient", ("given", "ana")) == {"plain"}
    assert await ids(client, "Patient", ("given", "muller")) == set()


async def test_exact_is_case_and_accent_sensitive_full_match(client: httpx.AsyncClient) -> None:
    await _names(client)
    assert await ids(client, "Patient", ("family:exact", "Müller")) == {"umlaut"}
    assert await ids(client, "Patient", ("family:exact", "Muller")) == {"plain"}
    assert await ids(client, "Patient", ("family:exact", "müller")) == set()
    assert await ids(client, "Patient", ("family:exact", "Mül")) == set()
    assert await ids(client, "Patient", ("name:exact", "Hans")) == {"umlaut"}


async def test_contains_matches_anywhere(client: httpx.AsyncClient) -> None:
    await _names(client)
    assert await ids(client, "Patient", ("family:contains", "LLE")) == {"umlaut", "plain"}
    assert await ids(client, "Patient", ("family:contains", "lin")) == {"mullins"}
    assert await ids(client, "Patient", ("name:contains", "smi")) == {"text"}
    assert await ids(client, "Patient", ("name:contains", "ü")) == {"umlaut", "plain", "mullins"}


async def test_string_missing(client: httpx.AsyncClient) -> None:
    await _names(client)
    assert await ids(client, "Patient", ("name:missing", "true")) == {"nameless"}
    assert await ids(client, "Patient", ("family:missing", "true")) == {"text", "nameless"}
    assert await ids(client, "Patient", ("name:missing", "false")) == {"umlaut", "plain", "mullins", "text"}


async def test_string_or_and(client: httpx.AsyncClient) -> None:
    await _names(client)
    assert await ids(client, "Patient", ("family", "mullins,keller")) == {"mullins"}
    assert await ids(client, "Patient", ("name", "mullins,keller")) == {"mullins", "text"}
    assert await ids(client, "Patient", ("name", "muller"), ("name", "hans")) == {"umlaut"}


async def test_address_and_address_city(client: httpx.AsyncClient) -> None:
    await put(
        client,
        "Patient",
        "home",
        {
            "address": [
                {"line": ["12 Main Street"], "city": "Springfield", "state": "IL", "postalCode": "62701"}
            ]
        },
    )
    await put(client, "Patient", "away", {"address": [{"line": ["Spring Lane 5"], "city": "Zürich"}]})
    await put(client, "Patient", "noaddress", {"gender": "male"})
    assert await ids(client, "Patient", ("address", "springfield")) == {"home"}
    assert await ids(client, "Patient", ("address", "spring")) == {"home", "away"}
    assert await ids(client, "Patient", ("address", "12 main")) == {"home"}
    assert await ids(client, "Patient", ("address", "62701")) == {"home"}
    assert await ids(client, "Patient", ("address-city", "spring")) == {"home"}
    assert await ids(client, "Patient", ("address-city", "zurich")) == {"away"}
    assert await ids(client, "Patient", ("address-city", "main")) == set()
    assert await ids(client, "Patient", ("address-postalcode", "627")) == {"home"}
    assert await ids(client, "Patient", ("address:missing", "true")) == {"noaddress"}


async def test_escaped_comma_is_literal(client: httpx.AsyncClient) -> None:
    """``\\,`` is a comma inside one value, not an OR separator (search.html#escaping)."""
    await put(client, "Organization", "acme", {"name": "Acme, Inc"})
    await put(client, "Organization", "a", {"name": "Acme Holdings"})
    await put(client, "Organization", "inc", {"name": "Inc Partners"})
    assert await ids(client, "Organization", ("name", "acme\\, inc")) == {"acme"}
    assert await ids(client, "Organization", ("name", "acme,inc")) == {"acme", "a", "inc"}


async def test_organization_name_includes_alias(client: httpx.AsyncClient) -> None:
    await put(client, "Organization", "o1", {"name": "Eastside Housing Partners", "alias": ["EHP"]})
    await put(client, "Organization", "o2", {"name": "Westside Food Bank"})
    assert await ids(client, "Organization", ("name", "east")) == {"o1"}
    assert await ids(client, "Organization", ("name", "ehp")) == {"o1"}
    assert await ids(client, "Organization", ("name:contains", "side")) == {"o1", "o2"}
