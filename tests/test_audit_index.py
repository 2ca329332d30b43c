"""The AuditEvent hot path builds its search-index rows by hand (app/auth/audit.py
event_index_rows); they must be exactly what the generic extractor makes of the same event,
or AuditEvent searches would silently miss events."""

from __future__ import annotations

import pytest

from app.auth.audit import build_event, event_index_rows
from app.fhir.access import OPEN_ACCESS, AccessContext
from app.fhir.indexing import extract

BASE = "http://cc.test/fhir"
TABLES = ("token", "string", "date", "reference", "quantity", "uri")


@pytest.mark.parametrize(
    ("interaction", "status", "access", "touched", "query", "address"),
    [
        (
            "read",
            200,
            AccessContext(client_id="c1", unrestricted=False),
            [("Patient", "p1", 3)],
            None,
            "10.0.0.1",
        ),
        (
            "transaction",
            403,
            AccessContext(client_id="partner", organization="Organization/o1", unrestricted=False),
            [("Patient", "p1", 1), ("Observation", "o1", 2), ("Task", "t1", 4)],
            None,
            "::1",
        ),
        ("search-type", 200, AccessContext(client_id="c2", unrestricted=False), [], "Patient?name=Ana", None),
        ("history-system", 500, OPEN_ACCESS, [], "_history?_count=5", "127.0.0.1"),
        (
            "create",
            201,
            AccessContext(client_id="c3", patient="p9", unrestricted=False),
            [("Goal", "g", 1)],
            None,
            None,
        ),
    ],
)
def test_hand_built_rows_equal_the_extractor(
    interaction: str,
    status: int,
    access: AccessContext,
    touched: list[tuple[str, str, int]],
    query: str | None,
    address: str | None,
) -> None:
    event = build_event(
        interaction=interaction,
        status=status,
        access=access,
        touched=touched,
        query=query,
        address=address,
        fhir_base=BASE,
    )
    fast = event_index_rows(event, BASE)
    generic = extract("AuditEvent", event, BASE)
    for table in TABLES:
        assert set(getattr(fast, table)) == set(getattr(generic, table)), table
