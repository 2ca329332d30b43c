"""The audit store derives its typed columns by hand (app/audit/store.py event_row); for every
search parameter the store serves they must hold exactly what the generic extractor (the R4
FHIRPath expressions, app/fhir/indexing.py) makes of the same event, or AuditEvent searches
would silently miss events."""

from __future__ import annotations

import pytest

from app.audit.store import COLUMNS, event_row
from app.auth.audit import build_event
from app.fhir.access import OPEN_ACCESS, AccessContext
from app.fhir.fhirdate import date_range
from app.fhir.indexing import extract

BASE = "http://cc.test/fhir"


@pytest.mark.parametrize(
    ("interaction", "status", "access", "touched", "query", "address"),
    [
        (
            "read",
            200,
            AccessContext(client_id="c1", user="Practitioner/dr", unrestricted=False),
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
            AccessContext(client_id="c3", patient="p9", user="Patient/p9", unrestricted=False),
            [("Goal", "g", 1)],
            None,
            None,
        ),
    ],
)
def test_typed_columns_equal_the_extractor(
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
    row = dict(zip(COLUMNS, event_row(event, BASE), strict=True))
    generic = extract("AuditEvent", event, BASE)

    def tokens(param: str) -> set[tuple[str | None, str]]:
        return {(t[1], t[2]) for t in generic.token if t[0] == param}

    def references(param: str) -> set[str]:
        return {f"{r[1]}/{r[2]}" for r in generic.reference if r[0] == param and r[2] is not None}

    assert tokens("action") == {(None, row["action"])}
    assert tokens("outcome") == {(None, row["outcome"])}
    assert tokens("type") == {(row["type_system"], row["type_code"])}
    assert {f"{s}|{c}" for s, c in tokens("subtype")} == set(row["subtype_token"])
    assert {c for _, c in tokens("subtype")} == set(row["subtype"])
    assert {c for _, c in tokens("site")} == {row["site"]}
    assert references("entity") == set(row["entity"])
    assert references("patient") == {f"Patient/{p}" for p in row["patient"]}
    assert references("agent") == {row["agent_user"], row["agent_organization"]} - {None}
    identifiers = {(r[4], r[5]) for r in generic.reference if r[0] == "agent" and r[5] is not None}
    assert identifiers == {("urn:carecoord:oauth-client", row["agent_client"])}
    assert {s[2] for s in generic.string if s[0] == "address"} == ({row["address"]} - {None})
    span = date_range(event["recorded"])
    assert span is not None and span[0] == row["recorded"]
    assert [(d[1], d[2]) for d in generic.date if d[0] == "date"] == [span]
