"""The audit table: one append-only row per AuditEvent, partitioned by month (issue 14).

``audit_event`` is ``PARTITION BY RANGE (recorded)`` with one partition per calendar month
(``audit_event_pYYYYMM``, migration 0019). A row holds the typed columns the R4 AuditEvent search
parameters and the access rules need (auditevent.html#search) and the compact JSON body that
reads return unchanged, so a read answers exactly the AuditEvent that was recorded.

Partitions are created ahead (``ensure_partitions``: this month and ``MONTHS_AHEAD`` more, at
start-up and by the daily maintenance job) and dropped whole once every row in them is older than
``CARECOORD_AUDIT_RETENTION`` days (``drop_expired``): an event is kept at least the retention,
at most a month longer, and expiry never deletes row by row.

Nothing here updates or deletes a row: the only ways out are a partition's expiry.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
from asyncpg import Connection

from app.fhir import jsonio
from app.fhir.indexing import split_reference
from app.fhir.repository import new_id

logger = logging.getLogger("carecoord.audit")

TABLE = "audit_event"
PARTITION_NAME = re.compile(r"^audit_event_p(\d{4})(\d{2})$")
MONTHS_AHEAD = 3
"""Partitions created beyond the current month: writes never meet a missing partition even if the
maintenance job does not run for a while."""
MAINTENANCE_LOCK = 0x61756469  # "audi": one process at a time creates or drops partitions

CLIENT_SYSTEM = "urn:carecoord:oauth-client"
"""The identifier system naming the OAuth client in AuditEvent.agent.who."""
PERSON_TYPES = frozenset({"Practitioner", "PractitionerRole", "Patient", "RelatedPerson", "Device"})

COLUMNS: tuple[str, ...] = (
    "id",
    "recorded",
    "type_system",
    "type_code",
    "subtype",
    "subtype_token",
    "action",
    "outcome",
    "agent_client",
    "agent_user",
    "agent_organization",
    "patient",
    "entity",
    "query",
    "address",
    "site",
    "source",
    "body",
)
"""Column order of a row (``event_row``), of the INSERT and of the COPY."""

_INSERT = (
    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)})"
    f" VALUES ({', '.join(f'${n}' for n in range(1, len(COLUMNS) + 1))})"
)

Row = tuple[Any, ...]


def _token(coding: dict[str, Any]) -> str:
    return f"{coding.get('system') or ''}|{coding.get('code') or ''}"


def _short_reference(reference: str, fhir_base: str) -> tuple[str | None, str]:
    """(type, ``Type/id``) of a reference (its version and this server's base dropped); an
    external or unparseable one is kept as written, with no type."""
    target_type, target_id, url = split_reference(reference, fhir_base)
    if target_type and target_id:
        return target_type, f"{target_type}/{target_id}"
    return None, url or reference


def _parse_instant(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _instant_text(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_row(event: dict[str, Any], fhir_base: str, fhir_id: str | None = None) -> Row:
    """The table row of an AuditEvent as app/auth/audit.py ``build_event`` (or any caller) made it:
    the typed columns, and the body with its server-assigned id and meta (as every stored
    resource has them). ``recorded`` is the partition key; an event without one is recorded now."""
    fhir_id = fhir_id or new_id()
    recorded = _parse_instant(event.get("recorded"))
    if recorded is None:
        recorded = datetime.now(UTC)
        event = {**event, "recorded": _instant_text(recorded)}
    event_type = event.get("type") or {}
    subtypes = [s for s in event.get("subtype") or () if isinstance(s, dict)]
    client = user = organization = address = None
    patients: list[str] = []
    entities: list[str] = []
    for agent in event.get("agent") or ():
        who = agent.get("who") or {}
        identifier = who.get("identifier") or {}
        if client is None and identifier.get("system") == CLIENT_SYSTEM:
            client = identifier.get("value")
        reference = who.get("reference")
        if isinstance(reference, str):
            target_type, short = _short_reference(reference, fhir_base)
            if target_type == "Organization":
                organization = organization or short
            elif user is None:
                user = short
            if target_type == "Patient":
                patients.append(short.split("/", 1)[1])
        address = address or (agent.get("network") or {}).get("address")
    query = None
    for entity in event.get("entity") or ():
        reference = (entity.get("what") or {}).get("reference")
        if isinstance(reference, str):
            target_type, short = _short_reference(reference, fhir_base)
            entities.append(short)
            if target_type == "Patient":
                patients.append(short.split("/", 1)[1])
        if query is None and entity.get("query"):
            try:
                query = base64.b64decode(entity["query"]).decode("utf-8", "replace")
            except (binascii.Error, ValueError):
                query = None
    source = event.get("source") or {}
    observer = source.get("observer") or {}
    stamped = {
        "resourceType": "AuditEvent",
        "id": fhir_id,
        "meta": {**(event.get("meta") or {}), "versionId": "1", "lastUpdated": event["recorded"]},
    }
    for key, value in event.items():
        if key not in stamped:
            stamped[key] = value
    try:
        body = jsonio.dumps_plain(stamped)
    except TypeError:  # a Decimal somewhere (an event a caller built from parsed JSON)
        body = jsonio.dumps(stamped).decode("utf-8")
    return (
        fhir_id,
        recorded,
        event_type.get("system"),
        event_type.get("code"),
        [s.get("code") or "" for s in subtypes],
        [_token(s) for s in subtypes],
        event.get("action"),
        event.get("outcome"),
        client,
        user,
        organization,
        list(dict.fromkeys(patients)),
        list(dict.fromkeys(entities)),
        query,
        address,
        source.get("site"),
        observer.get("display") or observer.get("reference"),
        body,
    )


async def insert_row(conn: Connection, row: Row) -> None:
    """One row, in ``conn``'s current transaction (a write's AuditEvent commits with the write)."""
    await conn.execute(_INSERT, *row)


async def insert_event(conn: Connection, event: dict[str, Any], fhir_base: str) -> str:
    """Store ``event`` in ``conn``'s current transaction; its id."""
    row = event_row(event, fhir_base)
    await insert_row(conn, row)
    return str(row[0])


async def copy_rows(conn: Connection, rows: Sequence[Row]) -> None:
    """Write buffered rows with one COPY (no per-row statement, no index of the clinical tables).
    A month without a partition (an event recorded far from now) gets one, and the COPY is
    repeated: COPY is all or nothing, so nothing was written twice."""
    try:
        await conn.copy_records_to_table(TABLE, records=rows, columns=COLUMNS)
    except asyncpg.CheckViolationError:  # "no partition of relation ... found for row"
        await ensure_months(conn, {_month(row[1]) for row in rows})
        await conn.copy_records_to_table(TABLE, records=rows, columns=COLUMNS)


# -- partitions ---------------------------------------------------------------------------------


def _month(moment: datetime) -> date:
    moment = moment.astimezone(UTC)
    return date(moment.year, moment.month, 1)


def _next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def partition_name(month: date) -> str:
    return f"{TABLE}_p{month.year:04d}{month.month:02d}"


async def _existing(conn: Connection) -> dict[str, date]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = $1::regclass",
        TABLE,
    )
    found: dict[str, date] = {}
    for row in rows:
        match = PARTITION_NAME.match(row["relname"])
        if match:
            found[row["relname"]] = date(int(match.group(1)), int(match.group(2)), 1)
    return found


async def ensure_months(conn: Connection, months: Iterable[date]) -> list[str]:
    """Create the partitions of ``months`` that do not exist yet; the names created."""
    created = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MAINTENANCE_LOCK)
        existing = set(await _existing(conn))
        for month in sorted(set(months)):
            name = partition_name(month)
            if name in existing:
                continue
            # Names and bounds come from dates, never from a request.
            await conn.execute(
                f"CREATE TABLE {name} PARTITION OF {TABLE}"
                f" FOR VALUES FROM ('{month.isoformat()}') TO ('{_next_month(month).isoformat()}')"
            )
            created.append(name)
    if created:
        logger.info("audit partitions created: %s", ", ".join(created))
    return created


async def ensure_partitions(conn: Connection, now: datetime | None = None) -> list[str]:
    """This month's partition and ``MONTHS_AHEAD`` more."""
    month = _month(now or datetime.now(UTC))
    months = [month]
    for _ in range(MONTHS_AHEAD):
        months.append(_next_month(months[-1]))
    return await ensure_months(conn, months)


async def drop_expired(conn: Connection, retention_days: int, now: datetime | None = None) -> list[str]:
    """Drop every partition whose rows are all older than ``retention_days``; the names dropped."""
    horizon = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    dropped = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MAINTENANCE_LOCK)
        for name, month in sorted((await _existing(conn)).items()):
            end = datetime.combine(_next_month(month), datetime.min.time(), tzinfo=UTC)
            if end <= horizon:
                await conn.execute(f"DROP TABLE {name}")  # a name matched by PARTITION_NAME
                dropped.append(name)
    if dropped:
        logger.info("audit partitions dropped after the retention: %s", ", ".join(dropped))
    return dropped


async def maintain(conn: Connection, retention_days: int, now: datetime | None = None) -> None:
    """Partition maintenance: create ahead, drop what the retention no longer keeps."""
    await ensure_partitions(conn, now)
    await drop_expired(conn, retention_days, now)
