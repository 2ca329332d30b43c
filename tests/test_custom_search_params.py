"""Search parameters carecoord ships beyond R4 (tools/ig: the SDOH Clinical Care IG's) and
``carecoord reindex``, the resumable job that indexes stored resources for a new parameter."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import httpx
from asyncpg import Pool
from fastapi import FastAPI

from app.fhir.search_params import PathSpec, SearchParam, registry
from app.jobs import Runner, queue
from app.reindex import KIND, Reindexer, enqueue
from tests.conftest import FHIR, wait_until
from tests.test_search_support import ids, put, search, typed_ids

SDOH = "http://hl7.org/fhir/us/sdoh-clinicalcare/SearchParameter"


async def test_sdoh_task_output_and_service_request_supporting_info(client: httpx.AsyncClient) -> None:
    await put(client, "Patient", "p1", {"name": [{"family": "Rivera"}]})
    await put(
        client,
        "QuestionnaireResponse",
        "screening",
        {"status": "completed", "subject": {"reference": "Patient/p1"}},
    )
    await put(
        client,
        "ServiceRequest",
        "sr1",
        {
            "status": "active",
            "intent": "order",
            "subject": {"reference": "Patient/p1"},
            "supportingInfo": [{"reference": "QuestionnaireResponse/screening"}],
        },
    )
    await put(
        client,
        "Task",
        "t1",
        {
            "status": "completed",
            "intent": "order",
            "focus": {"reference": "ServiceRequest/sr1"},
            "output": [
                {
                    "type": {"text": "result"},
                    "valueReference": {"reference": "QuestionnaireResponse/screening"},
                }
            ],
        },
    )
    await put(client, "Task", "t2", {"status": "requested", "intent": "order"})
    assert await ids(client, "Task", ("output", "QuestionnaireResponse/screening")) == {"t1"}
    assert await ids(client, "ServiceRequest", ("supporting-info", "QuestionnaireResponse/screening")) == {
        "sr1"
    }
    bundle = await search(client, "Task", [("_id", "t1"), ("_include", "Task:output")])
    assert typed_ids(bundle, "include") == ["QuestionnaireResponse/screening"]
    bundle = await search(
        client,
        "QuestionnaireResponse",
        [("_id", "screening"), ("_revinclude", "ServiceRequest:supporting-info")],
    )
    assert typed_ids(bundle, "include") == ["ServiceRequest/sr1"]


async def test_capability_statement_lists_custom_parameters_with_their_definitions(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/fhir/metadata")
    assert response.status_code == 200
    resources = {r["type"]: r for r in response.json()["rest"][0]["resource"]}
    task = {p["name"]: p for p in resources["Task"]["searchParam"]}
    assert task["output"]["definition"] == f"{SDOH}/Task-output-reference"
    assert task["output"]["type"] == "reference"
    request = {p["name"]: p for p in resources["ServiceRequest"]["searchParam"]}
    assert request["supporting-info"]["definition"] == f"{SDOH}/ServiceRequest-supporting-info"
    assert "Task:output" in resources["Task"]["searchInclude"]


# -- reindex -----------------------------------------------------------------------------------

NOTE_PARAM = SearchParam(
    name="note-text",
    type="string",
    url="http://example.org/SearchParameter/Task-note-text",
    paths=(PathSpec((("key", "note"), ("key", "text")), "markdown"),),
)


@contextmanager
def new_parameter() -> Iterator[SearchParam]:
    """A parameter a new release adds (as if tools/ig had gained a SearchParameter): resources
    stored before it have no index rows for it."""
    params = registry().params["Task"]
    params[NOTE_PARAM.name] = NOTE_PARAM
    try:
        yield NOTE_PARAM
    finally:
        del params[NOTE_PARAM.name]


async def _tasks_with_notes(client: httpx.AsyncClient, count: int) -> None:
    for number in range(count):
        await put(
            client,
            "Task",
            f"t{number}",
            {"status": "requested", "intent": "order", "note": [{"text": f"Needs a ride, call {number}"}]},
        )


async def _reindex_job(pool: Pool) -> queue.Job:
    async with pool.acquire() as conn:
        job = await queue.latest(conn, KIND, "Task")
    assert job is not None
    return job


async def test_a_new_parameter_finds_existing_resources_after_reindex(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await _tasks_with_notes(client, 5)
    with new_parameter():
        assert await ids(client, "Task", ("note-text", "needs a ride")) == set()  # stored before it
        pool: Pool = app.state.pool
        async with pool.acquire() as conn:
            jobs = await enqueue(conn, ["Task"])
        assert jobs["Task"] is not None
        runner = Runner(pool, name="reindex-test", lease=5)
        Reindexer(pool, FHIR, batch=2).register(runner)
        while (await _reindex_job(pool)).state != "done":
            assert await runner.run_once() == 1
        job = await _reindex_job(pool)
        assert job.payload["indexed"] == 5
        assert await ids(client, "Task", ("note-text", "needs a ride")) == {f"t{n}" for n in range(5)}
        # ...and the parameters it had before still find them (their rows were rewritten too)
        assert await ids(client, "Task", ("status", "requested")) == {f"t{n}" for n in range(5)}


async def test_reindex_resumes_from_its_checkpoint_after_a_worker_dies(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    await _tasks_with_notes(client, 5)
    with new_parameter():
        await _resume_after_a_kill(app, client)


async def _resume_after_a_kill(app: FastAPI, client: httpx.AsyncClient) -> None:
    pool: Pool = app.state.pool
    async with pool.acquire() as conn:
        await enqueue(conn, ["Task"])
    first = Runner(pool, name="first", lease=5)
    Reindexer(pool, FHIR, batch=2).register(first)
    assert await first.run_once() == 1  # one batch: t0, t1
    checkpoint = (await _reindex_job(pool)).payload
    assert checkpoint["indexed"] == 2
    assert await ids(client, "Task", ("note-text", "needs a ride")) == {"t0", "t1"}

    # A worker claims the next batch and is killed before it commits anything.
    async with pool.acquire() as conn:
        claimed = await queue.claim(conn, "killed-worker", 0.5, [KIND], 1)
    assert [job.id for job in claimed] == [(await _reindex_job(pool)).id]

    async def lease_ran_out() -> bool:
        job = await _reindex_job(pool)
        return job.lease_until is not None and job.lease_until < datetime.now(UTC)

    await wait_until(lease_ran_out, "the dead worker's lease to run out")
    second = Runner(pool, name="second", lease=5)
    Reindexer(pool, FHIR, batch=2).register(second)
    while (await _reindex_job(pool)).state != "done":
        assert await second.run_once() == 1
    job = await _reindex_job(pool)
    # Resumed after t1: each resource indexed once (a restart from the first would count 7).
    assert job.payload["indexed"] == 5
    assert job.payload["after"] > checkpoint["after"]
    assert await ids(client, "Task", ("note-text", "needs a ride")) == {f"t{n}" for n in range(5)}


async def test_carecoord_reindex_queues_one_job_per_type(
    app: FastAPI, client: httpx.AsyncClient, database_url: str
) -> None:
    from tests.test_cli import _acli

    queued = await _acli(database_url, "reindex", "--type", "Task", "--type", "Location")
    assert queued.returncode == 0, queued.stderr
    assert "Task: job" in queued.stdout and "Location: job" in queued.stdout
    again = await _acli(database_url, "reindex", "--type", "Task")
    assert "Task: a reindex is queued or running" in again.stdout  # one at a time per type
    pool: Pool = app.state.pool
    async with pool.acquire() as conn:
        jobs = await queue.find(conn, kinds=[KIND])
    assert sorted(job.key for job in jobs if job.key) == ["Location", "Task"]
    unknown = await _acli(database_url, "reindex", "--type", "Spaceship")
    assert unknown.returncode != 0
    assert "Spaceship" in unknown.stderr
