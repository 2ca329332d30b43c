"""Task/$referral-metrics against a fixture of referrals moved through their states by real API
writes (the requester, and each partner with its own token); the expected figures are computed
here from the version times the server recorded (each version's meta.lastUpdated)."""

from __future__ import annotations

import importlib.util
import math
from datetime import datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.db import MIGRATIONS_DIR
from tests.conftest import bearer

TASK_CODE = {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]}
PAST = "2020-01-01T00:00:00Z"
FUTURE = "2099-01-01T00:00:00Z"


def percentile_cont(values: list[float], fraction: float) -> float | None:
    """PostgreSQL's percentile_cont: linear interpolation between the closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class Referrals:
    """The requester (Organization/cm, the home client) and partners a and b, each a client."""

    def __init__(self, app: FastAPI, home: httpx.AsyncClient) -> None:
        self.app = app
        self.home = home
        self.partners: dict[str, dict[str, str]] = {}
        self.ids: dict[str, str] = {}

    async def partner(self, org: str) -> dict[str, str]:
        if org not in self.partners:
            scope = "system/Task.cruds system/ServiceRequest.rs system/Patient.rs"
            self.partners[org] = await bearer(
                self.app, scope, organization=f"Organization/{org}", client_id=org
            )
        return self.partners[org]

    async def send(self, name: str, owner: str, *, due: str | None = None, status: str = "requested",
                   focus: str = "ServiceRequest/sr1", code: dict[str, Any] = TASK_CODE) -> str:  # fmt: skip
        task: dict[str, Any] = {
            "resourceType": "Task",
            "status": status,
            "intent": "order",
            "code": code,
            "focus": {"reference": focus},
            "for": {"reference": "Patient/p1"},
            "requester": {"reference": "Organization/cm"},
            "owner": {"reference": f"Organization/{owner}"},
        }
        if due:
            task["restriction"] = {"period": {"end": due}}
        response = await self.home.post("/fhir/Task", json=task)
        assert response.status_code == 201, response.text
        self.ids[name] = response.json()["id"]
        return self.ids[name]

    async def move(self, name: str, status: str, by: str | None = None) -> None:
        """``by``: the partner organisation making the change; None: the requester."""
        headers = await self.partner(by) if by else {}
        client_headers = {**self.home.headers, **headers}
        current = (await self.home.get(f"/fhir/Task/{self.ids[name]}", headers=client_headers)).json()
        current["status"] = status
        response = await self.home.put(f"/fhir/Task/{self.ids[name]}", json=current, headers=client_headers)
        assert response.status_code == 200, response.text

    async def history(self, name: str) -> list[tuple[str, datetime]]:
        response = await self.home.get(f"/fhir/Task/{self.ids[name]}/_history?_count=50")
        versions = [e["resource"] for e in response.json()["entry"]]
        return sorted(
            ((v["status"], instant(v["meta"]["lastUpdated"])) for v in versions), key=lambda x: x[1]
        )


@pytest.fixture
async def referrals(app: FastAPI, home_client: httpx.AsyncClient) -> Referrals:
    home = home_client
    for resource in (
        {"resourceType": "Patient", "id": "p1"},
        {"resourceType": "Organization", "id": "cm", "name": "Case management"},
        {"resourceType": "Organization", "id": "a", "name": "Food bank"},
        {"resourceType": "Organization", "id": "b", "name": "Housing"},
        {
            "resourceType": "ServiceRequest",
            "id": "sr1",
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/p1"},
            "code": {"text": "Food assistance"},
        },
    ):
        response = await home.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource)
        assert response.status_code in (200, 201), response.text
    world = Referrals(app, home)
    # Partner a: completed, rejected, accepted and overdue, cancelled, open and not yet due.
    await world.send("a-done", "a")
    await world.send("a-rejected", "a")
    await world.send("a-overdue", "a", due=PAST)
    await world.send("a-cancelled", "a")
    await world.send("a-open", "a", due=FUTURE)
    await world.move("a-done", "accepted", by="a")
    await world.move("a-rejected", "rejected", by="a")
    await world.move("a-overdue", "accepted", by="a")
    await world.move("a-done", "in-progress", by="a")
    await world.move("a-cancelled", "cancelled")
    await world.move("a-done", "completed", by="a")
    # Partner b: one completed through in-progress and on-hold, one accepted and still open.
    await world.send("b-done", "b")
    await world.send("b-accepted", "b", due="2020-06")
    await world.move("b-done", "accepted", by="b")
    await world.move("b-accepted", "accepted", by="b")
    await world.move("b-done", "in-progress", by="b")
    await world.move("b-done", "on-hold", by="b")
    await world.move("b-done", "completed", by="b")
    # Not counted: a draft never sent, one entered in error, a Task that is not a referral.
    await world.send("draft", "a", status="draft")
    await world.send("error", "a")
    await world.move("error", "entered-in-error")
    await world.send("not-a-referral", "a", focus="Patient/p1")
    return world


def _metrics(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = {}
    for parameter in body["parameter"]:
        if parameter["name"] not in ("partner", "total"):
            continue
        parts = {p["name"]: p for p in parameter["part"]}
        key = (
            "total" if parameter["name"] == "total" else parts["organization"]["valueReference"]["reference"]
        )
        found[key] = {
            name: (
                part.get(
                    "valueInteger", part.get("valueDecimal", (part.get("valueDuration") or {}).get("value"))
                )
            )
            for name, part in parts.items()
            if name != "organization"
        }
    return found


async def _expected(world: Referrals, names: list[str]) -> dict[str, Any]:
    accept, complete = [], []
    statuses = []
    for name in names:
        versions = await world.history(name)
        sent = min(t for s, t in versions if s != "draft")
        accepted = [t for s, t in versions if s in ("accepted", "in-progress", "on-hold", "completed")]
        completed = [t for s, t in versions if s == "completed"]
        if accepted:
            accept.append((min(accepted) - sent).total_seconds())
        if completed:
            complete.append((min(completed) - sent).total_seconds())
        statuses.append(versions[-1][0])
    return {
        "sent": len(names),
        "accepted": len(accept),
        "completed": statuses.count("completed"),
        "rejected": statuses.count("rejected"),
        "cancelled": statuses.count("cancelled"),
        "medianTimeToAccept": percentile_cont(accept, 0.5),
        "p90TimeToAccept": percentile_cont(accept, 0.9),
        "medianTimeToComplete": percentile_cont(complete, 0.5),
        "p90TimeToComplete": percentile_cont(complete, 0.9),
    }


def _check(found: dict[str, Any], expected: dict[str, Any]) -> None:
    for name, value in expected.items():
        if value is None:
            assert found.get(name) is None, name
        elif isinstance(value, float):
            # meta.lastUpdated carries milliseconds; the database keeps microseconds.
            assert found[name] == pytest.approx(value, abs=0.002), name
        else:
            assert found[name] == value, name


async def test_metrics_per_partner_from_the_version_history(referrals: Referrals) -> None:
    response = await referrals.home.get("/fhir/Task/$referral-metrics?requester=Organization/cm")
    assert response.status_code == 200, response.text
    found = _metrics(response.json())
    assert set(found) == {"Organization/a", "Organization/b", "total"}
    a_names = ["a-done", "a-rejected", "a-overdue", "a-cancelled", "a-open"]
    b_names = ["b-done", "b-accepted"]
    _check(found["Organization/a"], await _expected(referrals, a_names))
    _check(found["Organization/b"], await _expected(referrals, b_names))
    _check(found["total"], await _expected(referrals, a_names + b_names))
    a, b = found["Organization/a"], found["Organization/b"]
    assert (a["open"], a["overdue"], a["failed"]) == (2, 1, 0)
    assert (b["open"], b["overdue"]) == (1, 1)  # due "2020-06": the whole month has passed
    assert a["closedLoopRate"] == pytest.approx(1 / 5)
    assert b["closedLoopRate"] == pytest.approx(1 / 2)
    assert found["total"]["sent"] == 7 and found["total"]["open"] == 3


async def test_the_partner_sees_only_its_referrals(referrals: Referrals) -> None:
    headers = await referrals.partner("b")
    response = await referrals.home.get(
        "/fhir/Task/$referral-metrics?requester=Organization/cm",
        headers={**referrals.home.headers, **headers},
    )
    assert response.status_code == 200, response.text
    found = _metrics(response.json())
    assert set(found) == {"Organization/b", "total"}
    assert found["total"]["sent"] == 2
    # From the owner's side: what b received, per requester.
    response = await referrals.home.get(
        "/fhir/Task/$referral-metrics?owner=Organization/b", headers={**referrals.home.headers, **headers}
    )
    assert set(_metrics(response.json())) == {"Organization/cm", "total"}


async def test_period_keeps_the_referrals_sent_in_it(referrals: Referrals) -> None:
    first_sent = min(t for s, t in await referrals.history("a-done") if s == "requested")
    last_sent = min(t for s, t in await referrals.history("b-accepted") if s == "requested")
    day = first_sent.date().isoformat()
    response = await referrals.home.get(
        f"/fhir/Task/$referral-metrics?requester=Organization/cm&period=ge{day}&period=le{day}"
    )
    found = _metrics(response.json())
    if last_sent.date() == first_sent.date():
        assert found["total"]["sent"] == 7
    later = await referrals.home.get(
        "/fhir/Task/$referral-metrics?requester=Organization/cm&period=gt2099-01-01"
    )
    assert _metrics(later.json()) == {"total": {**_metrics(later.json())["total"], "sent": 0}}
    assert _metrics(later.json())["total"]["sent"] == 0
    period = [p for p in later.json()["parameter"] if p["name"] == "period"]
    assert period == [{"name": "period", "valuePeriod": {"start": "2099-01-01"}}]


@pytest.mark.parametrize(
    "query",
    [
        "",
        "requester=Organization/cm&owner=Organization/a",
        "requester=Organization/cm&period=2026-01-01",
        "requester=Organization/cm&period=genot-a-date",
        "requester=Organization/cm&period=ge2026&period=le2027&period=lt2028",
        "requester=Organization/cm&unknown=1",
    ],
)
async def test_bad_requests(home_client: httpx.AsyncClient, query: str) -> None:
    response = await home_client.get(f"/fhir/Task/$referral-metrics?{query}")
    assert response.status_code == 400, response.text
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_a_token_without_task_access_is_refused(app: FastAPI, home_client: httpx.AsyncClient) -> None:
    headers = await bearer(app, "system/Patient.rs", client_id="no-tasks")
    response = await home_client.get(
        "/fhir/Task/$referral-metrics?requester=Organization/cm", headers={**home_client.headers, **headers}
    )
    assert response.status_code == 403, response.text


async def test_the_migration_backfill_matches_what_the_write_hook_records(
    app: FastAPI, referrals: Referrals
) -> None:
    """Migration 0021 fills referral_version from resource_history for referrals stored before
    it: the same rows the write hook records for every version (times included)."""
    spec = importlib.util.spec_from_file_location(
        "m0021", MIGRATIONS_DIR / "versions" / "0021_referral_versions.py"
    )
    assert spec is not None and spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    query = "SELECT task_id, version_id, status, recorded, due FROM referral_version ORDER BY 1, 2"
    async with app.state.pool.acquire() as conn, conn.transaction():
        recorded = [tuple(r) for r in await conn.fetch(query)]
        await conn.execute("DELETE FROM referral_version")
        await conn.execute(migration._BACKFILL)
        backfilled = [tuple(r) for r in await conn.fetch(query)]
    assert len(recorded) >= 20
    assert backfilled == recorded
