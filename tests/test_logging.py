"""Structured logs (app/logs.py): a request id on every line and in the X-Request-ID header, JSON
lines (or text) in every process, uvicorn's worker processes included, and no PHI."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from app.logs import SAFE_REQUEST_ID, JsonFormatter, TextFormatter, configure_logging, request_id_var
from tests.server_support import running_server

FHIR_JSON = {"content-type": "application/fhir+json"}
NAME = "Quizzleworth"
"""A distinctive family name: it must never appear in a log line."""

CLIENT_SIDE = ("httpx", "httpcore")
"""The test's own HTTP client logs its requests' URLs; the server's outgoing client is kept quiet
by app/outbound.py (tests/test_outbound_policy.py), so these records are not the server's."""


def _server_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if not record.name.startswith(CLIENT_SIDE)]


def _rendered(records: list[logging.LogRecord]) -> list[str]:
    """Each record as both formats would write it."""
    json_format, text_format = JsonFormatter(), TextFormatter()
    return [line for record in records for line in (json_format.format(record), text_format.format(record))]


async def test_request_records_carry_the_request_id_of_the_response_header(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    response = await client.get("/fhir/Patient/no-such-patient")
    assert response.status_code == 404
    request_id = response.headers["x-request-id"]
    assert SAFE_REQUEST_ID.fullmatch(request_id)
    records = {record.name: record for record in _server_records(caplog)}
    # The FHIR error handler's line and the request line, both with the header's id.
    assert records["carecoord.errors"].request_id == request_id
    access = records["carecoord.access"]
    assert access.request_id == request_id
    assert (access.method, access.path, access.status) == ("GET", "/fhir/Patient/no-such-patient", 404)
    for line in _rendered([records["carecoord.errors"], access]):
        assert request_id in line
    # Another request gets another id; outside a request there is none.
    assert (await client.get("/fhir/Patient/no-such-patient")).headers["x-request-id"] != request_id
    assert request_id_var.get() is None


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("4bf92f3577b34da6a3ce929d0e0e4736", True),
        ("client-7.trace:42_a", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("two words", False),
        ('x"}{"level": "error', False),
        ("-starts-with-dash", False),
    ],
)
async def test_client_request_id_is_kept_only_when_it_is_a_safe_short_token(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, sent: str, kept: bool
) -> None:
    caplog.set_level(logging.INFO)
    response = await client.get("/healthz", headers={"x-request-id": sent})
    returned = response.headers["x-request-id"]
    if kept:
        assert returned == sent
    else:
        assert returned != sent and SAFE_REQUEST_ID.fullmatch(returned) and len(returned) == 32
    access = [record for record in caplog.records if record.name == "carecoord.access"]
    assert [record.request_id for record in access] == [returned]


async def test_request_id_header_on_responses_without_a_handler(app_client: httpx.AsyncClient) -> None:
    for path in ("/no-such-route", "/fhir/metadata", "/fhir/Patient"):  # 404, open, 401
        response = await app_client.get(path, headers={"authorization": ""})
        assert SAFE_REQUEST_ID.fullmatch(response.headers["x-request-id"]), path


def test_json_and_text_lines() -> None:
    token = request_id_var.set("rid-1")
    try:
        record = logging.getLogger("carecoord.test").makeRecord(
            "carecoord.test", logging.WARNING, __file__, 1, "job %s: %s", ("7", "failed"), None
        )
    finally:
        request_id_var.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "job 7: failed"
    assert line["level"] == "warning"
    assert line["logger"] == "carecoord.test"
    assert line["request_id"] == "rid-1"
    assert line["time"].endswith("+00:00")
    assert "\n" not in JsonFormatter().format(record)
    assert TextFormatter().format(record).endswith("WARNING carecoord.test [rid-1] job 7: failed")


def test_exceptions_are_logged_as_type_and_location_only() -> None:
    """An exception's message can quote what a client sent: neither format writes it."""
    try:
        raise ValueError(f"invalid family name {NAME}")
    except ValueError:
        record = logging.getLogger("carecoord.test").makeRecord(
            "carecoord.test", logging.ERROR, __file__, 1, "unexpected error", (), sys.exc_info()
        )
    as_json = JsonFormatter().format(record)
    line = json.loads(as_json)
    assert line["exc_type"] == "ValueError"
    assert any("test_logging.py" in frame for frame in line["stack"])
    as_text = TextFormatter().format(record)
    assert "ValueError" in as_text and "test_logging.py" in as_text
    # A standard formatter that saw the record first does not leak its traceback into ours.
    logging.Formatter().format(record)
    for rendered in (as_json, as_text, JsonFormatter().format(record), TextFormatter().format(record)):
        assert NAME not in rendered


async def test_no_resource_content_or_query_values_in_logs(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    patient = {"resourceType": "Patient", "name": [{"family": NAME, "given": ["Ana"]}], "gender": "female"}
    created = await client.post("/fhir/Patient", json=patient, headers=FHIR_JSON)
    assert created.status_code == 201
    patient_id = created.json()["id"]
    assert (await client.get(f"/fhir/Patient?family={NAME}")).json()["total"] == 1
    assert (await client.post("/fhir/Patient/_search", data={"family": NAME})).status_code == 200
    updated = {**patient, "id": patient_id, "gender": NAME.lower()}  # not a valid code: a 400 naming it
    refused = await client.put(f"/fhir/Patient/{patient_id}", json=updated, headers=FHIR_JSON)
    assert refused.status_code == 400 and NAME.lower() in refused.text
    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": patient, "request": {"method": "POST", "url": "Patient"}}],
    }
    assert (await client.post("/fhir", json=transaction, headers=FHIR_JSON)).status_code == 200
    records = _server_records(caplog)
    assert any(record.name == "carecoord.access" for record in records)
    paths = [record.path for record in records if record.name == "carecoord.access"]
    assert "/fhir/Patient" in paths and f"/fhir/Patient/{patient_id}" in paths
    for line in _rendered(records):
        assert NAME not in line and NAME.lower() not in line, line


def test_configure_logging_keeps_foreign_handlers_and_replaces_its_own() -> None:
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    try:
        configure_logging("text", "warning")
        configure_logging("json", "warning")
        ours = [handler for handler in root.handlers if type(handler).__name__ == "_Handler"]
        assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter)
        assert foreign in root.handlers
        assert logging.getLogger("uvicorn.error").handlers == []
        assert logging.getLogger("uvicorn.error").propagate
        # uvicorn's access log (query strings) stays off: it logs only if this has handlers.
        assert not logging.getLogger("uvicorn.access").hasHandlers()
    finally:
        root.removeHandler(foreign)


def test_every_worker_process_writes_json_lines_with_request_ids(database_url: str, tmp_path: Path) -> None:
    """`carecoord serve --workers 2`: the supervisor's, each worker's and uvicorn's own lines are
    JSON; each request's line carries the id its response returned; no resource content."""
    env = {"CARECOORD_LOG_LEVEL": "info", "CARECOORD_LOG_FORMAT": "json", "CARECOORD_AUTH_ENABLED": "false"}
    sent: dict[str, int] = {}
    with running_server(database_url, tmp_path, "--workers", "2", env=env) as server:
        for n in range(12):
            request_id = f"workers-test-{n}"
            patient = {"resourceType": "Patient", "name": [{"family": NAME}]}
            response = httpx.post(
                f"{server.base}/fhir/Patient",
                json=patient,
                headers={**FHIR_JSON, "x-request-id": request_id},
                timeout=30,
            )
            assert response.status_code == 201, response.text
            assert response.headers["x-request-id"] == request_id
            sent[request_id] = response.status_code
        generated = httpx.get(f"{server.base}/fhir/Patient?family={NAME}", timeout=30)
        assert generated.status_code == 200
        sent[generated.headers["x-request-id"]] = 200
    lines = [line for line in server.log().splitlines() if line.strip()]
    entries = []
    for line in lines:
        entries.append(json.loads(line))  # every line, whichever process wrote it, is JSON
        assert NAME not in line
    uvicorn_processes = {
        entry["process"] for entry in entries if entry["message"].startswith("Started server process")
    }
    assert len(uvicorn_processes) == 2, lines  # one per worker, each writing JSON
    assert any(
        entry["logger"] == "uvicorn.error" and "parent process" in entry["message"] for entry in entries
    )
    access = [entry for entry in entries if entry["logger"] == "carecoord.access"]
    requests = {entry["request_id"]: entry for entry in access}
    assert len(requests) == len(access)  # one line per request: not written twice in a worker
    for request_id, status in sent.items():
        assert requests[request_id]["status"] == status
        assert requests[request_id]["path"] == "/fhir/Patient"
    assert all(entry["request_id"] is None for entry in entries if entry["logger"].startswith("uvicorn"))


async def test_a_partner_output_refused_by_validation_is_logged_without_its_content(
    app: FastAPI, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The tracking worker logs why it did not keep a partner's output: the status and issue
    codes, not the validation message, which quotes the partner's data."""
    from tests.referral_support import FakePartner
    from tests.test_partner_data import _outputs, _poll, _track

    partner = FakePartner("https://logging-partner.example/fhir")
    partner.resources["Observation/bad"] = {
        "resourceType": "Observation",
        "id": "bad",
        "status": NAME.lower(),  # not a valid code: the validation message quotes it
        "code": {"text": "screening"},
    }
    task_id = await _track(app, client, partner, "logpartner", "-log")
    _outputs(partner, "completed", "Observation/bad")
    caplog.set_level(logging.INFO)
    await _poll(app, partner)
    assert (await client.get(f"/fhir/Task/{task_id}")).json()["status"] == "completed"
    not_kept = [record for record in caplog.records if "not kept" in record.getMessage()]
    assert not_kept, [record.getMessage() for record in caplog.records]
    assert "400" in not_kept[0].getMessage()
    for line in _rendered(_server_records(caplog)):
        assert NAME.lower() not in line, line
