"""The statement that reads one batch of an export: one type, in ``rid`` order (keyset), each
resource's version current as of the export's snapshot, within the caller's access limits.

Consistency (Bulk Data IG v2.0.0 export.html, ``transactionTime``: "the server SHALL ... include
all resources modified up to this instant"): the kick-off records ``pg_current_snapshot()``.
Every version in ``resource_history`` carries the transaction that wrote it (``txid``,
revision 0015); a batch takes, per resource, the newest version whose transaction that snapshot
sees (``pg_visible_in_snapshot``). Later writes are invisible, a resource deleted later is
still exported with the version it had, one created later is not: the files hold exactly the
state as of ``transactionTime`` whatever runs meanwhile, and a batch read again after a crash
reads the same rows. The NDJSON lines are the stored ``body`` text, never re-serialised
(except with ``_elements``).

What limits the rows (the token's access, ``_typeFilter``, a patient compartment) is the search
compiler's (app/fhir/search.py ``parse_search``, app/fhir/access.py): the same conditions a
search of the caller gets, judged on the current index rows (they describe current versions).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.fhir import jsonio
from app.fhir.access import AccessContext
from app.fhir.errors import FHIRError
from app.fhir.indexing import extract
from app.fhir.search import SearchLimits, parse_search
from app.fhir.search_params import registry

_PLACEHOLDER = re.compile(r"\$(\d+)")


@dataclass(frozen=True)
class BatchQuery:
    """A batch statement with its values; the last four placeholders are the snapshot, its
    ``xmin``, the ``rid`` to continue after and the batch size (see :meth:`values`).

    ``judged_compartment``: a ``deleted`` batch of a compartment export selects, as
    ``last_body``, each deleted resource's last version, whose Patient compartment membership
    the caller judges (:func:`was_in_compartment`): a deleted resource has no index rows left."""

    sql: str
    fixed: tuple[Any, ...]
    judged_compartment: bool = False
    patients: tuple[str, ...] | None = None

    def values(self, snapshot: str, xmin: int, after: int, limit: int) -> list[Any]:
        return [*self.fixed, snapshot, xmin, after, limit]


def _shift(sql: str, offset: int) -> str:
    """Renumber the ``$n`` placeholders of a compiled condition (every value in compiled SQL is a
    bind value, app/fhir/search.py Binder, so ``$`` appears nowhere else)."""
    return _PLACEHOLDER.sub(lambda m: f"${int(m.group(1)) + offset}", sql)


def _compiled(
    resource_type: str,
    pairs: list[tuple[str, str]],
    access: AccessContext,
    fhir_base: str,
    limits: SearchLimits,
    strict: bool,
) -> tuple[str, list[Any]]:
    """``pairs`` (a ``_typeFilter`` query, or none) and the access limits as one condition over
    ``r``, with its values."""
    request = parse_search(
        (resource_type,),
        pairs,
        registry=registry(),
        fhir_base=fhir_base,
        strict=strict,
        access=access,
        limits=limits,
    )
    values = request.binder.values[: request.where_count]
    # The type's placeholder is among the WHERE values: use it (PostgreSQL cannot type a
    # parameter no statement text uses).
    conditions = [f"r.resource_type = {request.type_placeholder}", *request.where()]
    return " AND ".join(f"({c})" for c in conditions), list(values)


def batch_query(
    resource_type: str,
    *,
    kind: str,
    access: AccessContext,
    fhir_base: str,
    limits: SearchLimits,
    type_filters: Sequence[list[tuple[str, str]]] = (),
    since: datetime | None = None,
    patients: Sequence[str] | None = None,
    compartment: bool = False,
    strict: bool = True,
) -> BatchQuery:
    """The batch statement of ``resource_type``: ``kind`` ``output`` (the versions that exist as
    of the snapshot, changed after ``since``) or ``deleted`` (deleted after ``since``, as of the
    snapshot). ``compartment``: only resources in the Patient compartment of ``patients`` (None:
    of any patient); several ``type_filters`` are alternatives (export.html#_typefilter)."""
    values: list[Any] = []
    conditions: list[str] = []
    alternatives: list[str] = []
    for pairs in type_filters or ([],):
        condition, bound = _compiled(resource_type, pairs, access, fhir_base, limits, strict)
        alternatives.append("(" + _shift(condition, len(values)) + ")")
        values.extend(bound)
    conditions.append("(" + " OR ".join(alternatives) + ")")

    def bind(value: Any) -> str:
        values.append(value)
        return f"${len(values)}"

    judged = compartment and kind == "deleted" and resource_type != "Patient"
    if compartment and not judged:
        conditions.append(_compartment(resource_type, patients, bind))
    since_value = bind(since) if since is not None else None
    n = len(values)
    snapshot, xmin, after, limit = (f"${n + i}" for i in range(1, 5))
    # The fast path: the resource row's current tuple was written by a transaction that ended
    # before the snapshot's xmin (its 32-bit xid precedes it, modulo 2^32), so no later write
    # replaced it and it is the version as of the snapshot. Any other row (written since, or
    # frozen long ago with an xid that no longer compares) takes the version from the history.
    old = (
        f"((({xmin} % 4294967296) - (r.xmin::text)::bigint + 4294967296) % 4294967296)"
        " BETWEEN 1 AND 2147483647"
    )
    exists = "NOT r.deleted" if kind == "output" else "r.deleted"
    then_exists = "h.method <> 'DELETE'" if kind == "output" else "h.method = 'DELETE'"
    if since_value is not None:
        exists += f" AND r.last_updated > {since_value}"
        then_exists += f" AND h.last_updated > {since_value}"
    conditions.append(f"CASE WHEN {old} THEN {exists} ELSE h.method IS NOT NULL AND {then_exists} END")
    # A deletion's last version (the one before it), for the compartment it was in.
    last_body = (
        ", (SELECT l.body FROM resource_history l WHERE l.resource_type = r.resource_type"
        " AND l.fhir_id = r.fhir_id AND l.method <> 'DELETE' ORDER BY l.version_id DESC LIMIT 1)"
        " AS last_body"
        if judged
        else ""
    )
    sql = (
        f"SELECT r.rid, r.fhir_id, CASE WHEN {old} THEN r.body ELSE h.body END AS body{last_body}"  # noqa: S608  (compiled conditions; values are bound)
        " FROM resource r LEFT JOIN LATERAL ("
        " SELECT h.method, h.body, h.last_updated FROM resource_history h"
        f" WHERE NOT ({old}) AND h.resource_type = r.resource_type AND h.fhir_id = r.fhir_id"
        f" AND (h.txid IS NULL OR h.txid < {xmin}"
        f" OR pg_visible_in_snapshot(h.txid::text::xid8, {snapshot}::text::pg_snapshot))"
        " ORDER BY h.version_id DESC LIMIT 1) h ON TRUE"
        f" WHERE {' AND '.join(conditions)} AND r.rid > {after}"
        f" ORDER BY r.rid LIMIT {limit}"
    )
    return BatchQuery(
        sql,
        tuple(values),
        judged_compartment=judged,
        patients=None if patients is None else tuple(patients),
    )


def was_in_compartment(
    resource_type: str, last_body: str | None, patients: tuple[str, ...] | None, fhir_base: str
) -> bool:
    """Whether a deleted resource's last version was in the Patient compartment of ``patients``
    (None: of any patient), judged from that version's references by the indexer that wrote
    its index rows (R4 CompartmentDefinition/patient parameters): the ``deleted`` file of a
    Patient or Group export lists what its ``output`` would have held (export.html, ``deleted``)."""
    if last_body is None:
        return False
    params = registry().patient_compartment.get(resource_type, ())
    try:
        rows = extract(resource_type, jsonio.loads(last_body), fhir_base)
    except (FHIRError, ValueError):  # stored before a rule it breaks existed: not judged
        return False
    return any(
        param in params and target_type == "Patient" and (patients is None or target_id in patients)
        for param, target_type, target_id, *_ in rows.reference
    )


def _compartment(resource_type: str, patients: Sequence[str] | None, bind: Any) -> str:
    """Membership of the Patient compartment (R4 CompartmentDefinition/patient) of ``patients``
    (None: of any patient), from the reference index."""
    params = registry().patient_compartment.get(resource_type, ())
    clauses = []
    if resource_type == "Patient":
        clauses.append("TRUE" if patients is None else f"r.fhir_id = ANY({bind(list(patients))}::text[])")
    if params:
        target = "" if patients is None else f" AND k.target_id = ANY({bind(list(patients))}::text[])"
        clauses.append(
            "EXISTS (SELECT 1 FROM search_reference k WHERE k.rid = r.rid"  # noqa: S608  (compiled conditions; every value is a bind parameter)
            f" AND k.param = ANY({bind(list(params))}::text[]) AND k.target_type = 'Patient'{target})"
        )
    return "(" + " OR ".join(clauses) + ")" if clauses else "FALSE"


def compartment_types(served: Sequence[str]) -> list[str]:
    """The served types of the Patient compartment (Patient first)."""
    members = registry().patient_compartment
    return [t for t in served if t == "Patient"] + [t for t in served if t != "Patient" and t in members]
