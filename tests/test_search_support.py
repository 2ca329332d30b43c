"""Shared helpers of the search tests (tests/test_search_*.py); holds no tests itself.

Every search test writes its own resources through the REST API (mostly ``PUT`` with a
chosen id, so result sets can be asserted by id) and reads searchset Bundles back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from tests.conftest import BASE_URL

JSON = {"content-type": "application/fhir+json"}
Param = tuple[str, str]



async def put(
    client: httpx.AsyncClient, resource_type: str, fhir_id: str, body: dict[str, Any]
) -> dict[str, Any]:
    """Create (or update) ``resource_type/fhir_id`` with ``body``; returns the stored resource."""
    resource = {"resourceType": resource_type, "id": fhir_id, **body}
    response = await client.put(f"/fhir/{resource_type}/{fhir_id}", json=resource, headers=JSON)
    assert response.status_code in (200, 201), response.text
    stored: dict[str, Any] = response.json()
    return stored


async def put_raw(client: httpx.AsyncClient, resource_type: str, fhir_id: str, text: str) -> None:
    """PUT a resource given as JSON text (keeps decimals such as ``5.40`` as written)."""
    response = await client.put(f"/fhir/{resource_type}/{fhir_id}", content=text.encode(), headers=JSON)
    assert response.status_code in (200, 201), response.text


async def delete(client: httpx.AsyncClient, resource_type: str, fhir_id: str) -> None:
    response = await client.delete(f"/fhir/{resource_type}/{fhir_id}")
    assert response.status_code in (200, 204), response.text


async def search(
    client: httpx.AsyncClient,
    path: str,
    params: Sequence[Param] = (),
    *,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``GET /fhir/{path}?params``; asserts a 200 searchset Bundle and returns it."""
    response = await client.get(f"/fhir/{path}" if path else "/fhir", params=list(params), headers=headers)
    assert response.status_code == 200, response.text
    bundle: dict[str, Any] = response.json()
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "searchset"
    return bundle


async def get_url(client: httpx.AsyncClient, url: str) -> httpx.Response:
    """Follow a link URL of a Bundle (an absolute URL on this server)."""
    assert url.startswith(BASE_URL + "/fhir"), url
    return await client.get(url[len(BASE_URL) :])


def entries(bundle: dict[str, Any], mode: str = "match") -> list[dict[str, Any]]:
    return [e for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == mode]


def match_ids(bundle: dict[str, Any]) -> list[str]:
    """Ids of the matches, in Bundle order."""
    return [e["resource"]["id"] for e in entries(bundle)]


def typed_ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    """``Type/id`` of the entries with this search mode, in Bundle order."""
    return [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in entries(bundle, mode)]


def link(bundle: dict[str, Any], relation: str) -> str | None:
    for item in bundle.get("link", []):
        if item["relation"] == relation:
            url: str = item["url"]
            return url
    return None


async def ids(client: httpx.AsyncClient, path: str, *params: Param) -> set[str]:
    """The ids matching a search whose results fit on one page."""
    bundle = await search(client, path, [*params, ("_count", "100")])
    assert link(bundle, "next") is None, "the result set should fit on one page"
    found = match_ids(bundle)
    assert len(found) == len(set(found)), f"duplicate matches: {found}"
    return set(found)


async def bad_request(
    client: httpx.AsyncClient,
    path: str,
    *params: Param,
    names: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
) -> dict[str, Any]:
    """Asserts a 400 OperationOutcome whose issue names the parameter ``names``."""
    response = await client.request(method, f"/fhir/{path}", params=list(params), headers=headers)
    assert response.status_code == 400, response.text
    outcome: dict[str, Any] = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    issues = outcome["issue"]
    assert issues and all(i["severity"] in ("error", "fatal") for i in issues)
    named = [i for i in issues if names in i.get("expression", []) or names in i.get("diagnostics", "")]
    assert named, f"no issue names {names!r}: {issues}"
    return outcome


async def walk(
    client: httpx.AsyncClient, first: dict[str, Any], relation: str = "next"
) -> list[dict[str, Any]]:
    """Follows ``relation`` links from ``first``; returns every page, ``first`` included."""
    pages = [first]
    url = link(first, relation)
    while url is not None:
        assert len(pages) < 200, "paging does not terminate"
        response = await get_url(client, url)
        assert response.status_code == 200, response.text
        pages.append(response.json())
        url = link(pages[-1], relation)
    return pages
