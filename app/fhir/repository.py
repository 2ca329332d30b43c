"""FhirRepository: the FHIR R4 instance, type and system storage interactions.

One repository is built per request from the request's database connection (whose
transaction the request owns) and the caller's :class:`AccessContext`. Methods only
execute statements; they never commit. Each cites the R4 section it implements.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from asyncpg import Connection, Record

from app.fhir import jsonio
from app.fhir.access import OPEN_ACCESS, AccessContext
from app.fhir.conditions import TRUE, Older, render
from app.fhir.errors import (
    BadRequest,
    FHIRError,
    Forbidden,
    Gone,
    MethodNotAllowed,
    NotFound,
    PreconditionFailed,
)
from app.fhir.indexing import IndexRows, extract, local_references
from app.fhir.search import (
    MAX_INCLUDES,
    MAX_ITERATE,
    Binder,
    Include,
    SearchCompiler,
    SearchLimits,
    SearchRequest,
)
from app.fhir.search_params import registry
from app.fhir.sql import Statement
from app.fhir.types import SERVED_TYPE_SET, SERVED_TYPES
from app.fhir.validation import check_attachments
from app.lease import ConnectionLease

if TYPE_CHECKING:
    from app.settings import Settings


@dataclass(frozen=True)
class StoredVersion:
    """One version of a resource as stored; ``body`` is None for a deletion."""

    resource_type: str
    fhir_id: str
    version_id: int
    last_updated: datetime
    deleted: bool
    body: str | None
    method: str = "GET"


@dataclass(frozen=True)
class HistoryPage:
    versions: list[StoredVersion]
    next_cursor: int | None


def new_id() -> str:
    """A server-assigned id: a random UUID (RFC 9562 version 4) in its canonical text, as
    ``str(uuid.uuid4())`` writes it, at a third of its cost (resource, Bundle and AuditEvent
    ids, several per request: issue 14)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def fhir_instant(moment: datetime) -> str:
    """R4 ``instant``: millisecond precision, explicit UTC offset."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:{moment.minute:02d}:"
        f"{moment.second:02d}.{moment.microsecond // 1000:03d}Z"
    )


_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(moment: datetime) -> str:
    """An HTTP date (RFC 9110 5.6.7 IMF-fixdate, ``Sun, 06 Nov 1994 08:49:37 GMT``), as
    ``email.utils.format_datetime(usegmt=True)`` writes it for a UTC time, a fifth of its cost."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return (
        f"{_WEEKDAYS[moment.weekday()]}, {moment.day:02d} {_MONTHS[moment.month - 1]} {moment.year:04d} "
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d} GMT"
    )


def _now() -> datetime:
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def stamp(
    data: dict[str, Any], fhir_id: str, version_id: int, last_updated: datetime, *, plain: bool = False
) -> str:
    """The stored JSON: the client's resource with the server-owned id and meta.

    resourceType, id and meta lead, as FHIR JSON is conventionally written; every
    other element keeps the client's order and values (decimals included).
    """
    meta = dict(data.get("meta") or {})
    meta["versionId"] = str(version_id)
    meta["lastUpdated"] = fhir_instant(last_updated)
    stamped: dict[str, Any] = {"resourceType": data["resourceType"], "id": fhir_id, "meta": meta}
    for key, value in data.items():
        if key not in stamped:
            stamped[key] = value
    if plain:  # a server-built record: no decimals to keep
        return jsonio.dumps_plain(stamped)
    return jsonio.dumps(stamped).decode("utf-8")


# Index tables and their value columns, in IndexRows tuple order (after ``param``).
INDEX_TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "token": (
        ("system", "text"),
        ("code", "text"),
        ("display", "text"),
        ("type_system", "text"),
        ("type_code", "text"),
    ),
    "string": (("value_norm", "text"), ("value_exact", "text")),
    "date": (("low", "timestamptz"), ("high", "timestamptz")),
    "reference": (
        ("target_type", "text"),
        ("target_id", "text"),
        ("url", "text"),
        ("ident_system", "text"),
        ("ident_value", "text"),
    ),
    "quantity": (("value", "numeric"), ("system", "text"), ("code", "text"), ("unit", "text")),
    "uri": (("uri", "text"),),
    "position": (("latitude", "float8"), ("longitude", "float8")),
    "worklist": (
        ("owner_type", "text"),
        ("owner_id", "text"),
        ("status", "text"),
        ("priority", "int4"),
        ("authored_low", "timestamptz"),
        ("authored_high", "timestamptz"),
        ("period_low", "timestamptz"),
        ("period_high", "timestamptz"),
    ),
}


def _index_ctes(source: str, *, replace: bool) -> str:
    """CTEs that write a resource's index rows from array parameters (and drop the old ones)."""
    ctes = []
    for table, columns in INDEX_TABLES.items():
        names = ", ".join(name for name, _ in columns)
        arrays = ", ".join(
            f"CAST(:{table}_{name} AS {kind}[])" for name, kind in (("param", "text"), *columns)
        )
        if replace:
            ctes.append(f"del_{table} AS (DELETE FROM search_{table} WHERE rid = :rid)")
        ctes.append(
            f"ins_{table} AS (INSERT INTO search_{table} (rid, resource_type, param, {names}) "
            f"SELECT {source}.rid, :rtype, u.* FROM {source}, unnest({arrays}) AS u)"
        )
    return ",\n".join(ctes)


def _index_params(rows: IndexRows) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for table, columns in INDEX_TABLES.items():
        arrays = rows.columns(table, len(columns) + 1)
        for (name, _), values in zip((("param", "text"), *columns), arrays, strict=True):
            params[f"{table}_{name}"] = values
    return params


_INSERT = Statement(
    f"""
    WITH new_row AS (
        INSERT INTO resource (resource_type, fhir_id, version_id, last_updated, deleted, body, writer_org)
        VALUES (:rtype, :fid, 1, :ts, false, :body, :org)
        ON CONFLICT (resource_type, fhir_id) DO NOTHING
        RETURNING rid
    ),
    history AS (
        INSERT INTO resource_history (rid, resource_type, fhir_id, version_id, last_updated, method, body)
        SELECT rid, :rtype, :fid, 1, :ts, :method, :body FROM new_row
    ),
    change AS (
        INSERT INTO resource_change (resource_type, fhir_id, version_id, action, changed_at, bookkeeping)
        SELECT :rtype, :fid, 1, 'create', :ts, :bookkeeping FROM new_row
    ),
    {_index_ctes("new_row", replace=False)}
    SELECT rid FROM new_row
    """
)

_WRITE_VERSION = Statement(
    f"""
    WITH changed AS (
        UPDATE resource SET version_id = :vid, last_updated = :ts, deleted = :deleted, body = :body,
            -- carecoord's bookkeeping (a status it records) leaves the resource its writer's
            writer_org = CASE WHEN :bookkeeping THEN writer_org ELSE :org END
        WHERE rid = :rid
        RETURNING rid
    ),
    history AS (
        INSERT INTO resource_history (rid, resource_type, fhir_id, version_id, last_updated, method, body)
        SELECT rid, :rtype, :fid, :vid, :ts, :method, :body FROM changed
    ),
    change AS (
        INSERT INTO resource_change (resource_type, fhir_id, version_id, action, changed_at, bookkeeping)
        SELECT :rtype, :fid, :vid, CASE WHEN :deleted THEN 'delete' ELSE 'update' END, :ts, :bookkeeping
        FROM changed
    ),
    {_index_ctes("changed", replace=True)}
    SELECT rid FROM changed
    """
)

_CURRENT_COLUMNS = "r.rid, r.version_id, r.last_updated, r.deleted, r.body"
_CURRENT_WHERE = "r.resource_type = $1 AND r.fhir_id = $2"
_READ = Statement(
    f"SELECT {_CURRENT_COLUMNS} FROM resource r WHERE r.resource_type = :rtype AND r.fhir_id = :fid"
)
_READ_VISIBLE = f"SELECT {_CURRENT_COLUMNS}, TRUE AS visible FROM resource r WHERE {_CURRENT_WHERE}"
"""The current row of a token whose access needs no condition (``_judged_row``)."""
_READ_FOR_UPDATE_VISIBLE = f"{_READ_VISIBLE} FOR UPDATE OF r"

_VREAD = Statement(
    """
    SELECT version_id, last_updated, method, body FROM resource_history
    WHERE resource_type = :rtype AND fhir_id = :fid AND version_id = :vid
    """
)

_HISTORY_COLUMNS = "hid, resource_type, fhir_id, version_id, last_updated, method, body"


class WriteHook(Protocol):
    """Domain rules that run inside a write's transaction (the referral workflow's state
    machine and outbox): ``before_write`` may refuse the write, ``after_write`` may add rows."""

    types: frozenset[str]

    async def before_write(
        self,
        repo: FhirRepository,
        resource_type: str,
        previous: dict[str, Any] | None,
        data: dict[str, Any] | None,
    ) -> None: ...

    async def after_write(
        self,
        repo: FhirRepository,
        version: StoredVersion,
        previous: dict[str, Any] | None,
        data: dict[str, Any] | None,
    ) -> None: ...


@dataclass(frozen=True)
class RepositoryFactory:
    """Where every FhirRepository of the API and the workers comes from: the same write hooks
    and search limits for all, and an explicit actor.

    ``for_client`` acts for a caller (its token's access; the Task state machine judges its
    changes); ``for_system`` is carecoord itself (copies of a partner's data, a Task mirrored
    from its partner), with the access it is given: open, or a partner's when it acts on that
    partner's data; ``for_bookkeeping`` is carecoord recording its own state (a referral's
    delivery state, an AuditEvent of a delivery attempt): its writes are in the change feed
    marked as bookkeeping, never events for subscribers.
    """

    fhir_base: str
    hooks: Sequence[WriteHook] = ()
    search_limits: SearchLimits = field(default_factory=SearchLimits)
    home_organization: str | None = None
    """``Organization/ID`` of the organisation running the server (CARECOORD_ORGANIZATION)."""
    max_resource_bytes: int = 5 * 1024 * 1024
    """The largest resource a write may store (CARECOORD_MAX_BODY_BYTES): what a PATCH or a
    partner's data may build here too."""
    max_attachment_bytes: int = 1024 * 1024
    """The largest decoded inline attachment a write may store (CARECOORD_ATTACHMENT_MAX_BYTES)."""

    @classmethod
    def from_settings(cls, settings: Settings, hooks: Sequence[WriteHook]) -> RepositoryFactory:
        return cls(
            settings.fhir_base,
            tuple(hooks),
            SearchLimits.from_settings(settings),
            settings.organization,
            settings.max_body_bytes,
            settings.attachment_max_bytes,
        )

    def for_client(self, connection: Connection | ConnectionLease, access: AccessContext) -> FhirRepository:
        return self._make(connection, access, system=False)

    def for_system(self, connection: Connection, access: AccessContext = OPEN_ACCESS) -> FhirRepository:
        return self._make(connection, access, system=True)

    def for_bookkeeping(self, connection: Connection) -> FhirRepository:
        return self._make(connection, OPEN_ACCESS, system=True, bookkeeping=True)

    def _make(
        self,
        connection: Connection | ConnectionLease,
        access: AccessContext,
        *,
        system: bool,
        bookkeeping: bool = False,
    ) -> FhirRepository:
        return FhirRepository(
            connection,
            access,
            fhir_base=self.fhir_base,
            hooks=self.hooks,
            system=system,
            bookkeeping=bookkeeping,
            search_limits=self.search_limits,
            home_organization=self.home_organization,
            max_resource_bytes=self.max_resource_bytes,
            max_attachment_bytes=self.max_attachment_bytes,
        )


class FhirRepository:
    """Storage interactions of FHIR R4 http.html for every served type."""

    def __init__(
        self,
        connection: Connection | ConnectionLease,
        access: AccessContext,
        *,
        fhir_base: str,
        hooks: Sequence[WriteHook] = (),
        system: bool = False,
        bookkeeping: bool = False,
        search_limits: SearchLimits = SearchLimits(),
        home_organization: str | None = None,
        max_resource_bytes: int = 5 * 1024 * 1024,
        max_attachment_bytes: int = 1024 * 1024,
    ) -> None:
        self._source = connection
        self.access = access
        self.fhir_base = fhir_base
        self.hooks = hooks
        self.search_limits = search_limits
        """The complexity budget of every search this repository runs (conditions included)."""
        self._home = tuple(home_organization.split("/", 1)) if home_organization else None
        self.max_resource_bytes = max_resource_bytes
        self.max_attachment_bytes = max_attachment_bytes
        self.system = system
        """Writes made by carecoord itself (mirroring a partner's Task), not by a client."""
        self.bookkeeping = bookkeeping
        """Writes that only record carecoord's own state: marked so in the change feed."""
        self.touched: list[tuple[str, str, int]] = []
        """(type, id, version) of every resource read or written, for the interaction's AuditEvent."""
        self.interaction: str | None = None
        """Set by a router when the path does not tell (a Bundle is a batch or a transaction)."""
        self._pending_creates: set[tuple[str, str]] = set()
        self._locked: dict[tuple[str, str], tuple[tuple[str, ...], Record]] = {}
        """Rows this transaction locked, with the letters they were judged for (``_current_row``
        with ``lock``): a PATCH's read-for-update is the row its update writes, so the update
        reads it again neither to lock nor to judge it (issue 14: a PATCH took 8 statements)."""
        self._previous: dict[int, str | None] = {}
        """The body of each row ``_lock`` locked, by rid, for the ``_write`` that follows."""

    async def db(self) -> Connection:
        """The connection every statement of this repository runs on; write hooks add their rows
        to the same transaction. A request's is taken from the pool at its first statement
        (app/lease.py), after the body was read, parsed and validated."""
        source = self._source
        if isinstance(source, ConnectionLease):
            return await source.connection()
        return source

    async def _fetch(self, sql: str, *args: Any) -> list[Record]:
        rows: list[Record] = await (await self.db()).fetch(sql, *args)
        return rows

    async def _fetchrow(self, sql: str, *args: Any) -> Record | None:
        row: Record | None = await (await self.db()).fetchrow(sql, *args)
        return row

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        return await (await self.db()).fetchval(sql, *args)

    async def _execute(self, sql: str, *args: Any) -> str:
        status: str = await (await self.db()).execute(sql, *args)
        return status

    def _hooks_for(self, resource_type: str) -> list[WriteHook]:
        return [hook for hook in self.hooks if resource_type in hook.types]

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """A nested transaction (SAVEPOINT): batch entries fail alone."""
        try:
            async with (await self.db()).transaction():
                yield
        except BaseException:
            # Rolling back to the savepoint releases the row locks taken inside it.
            self._locked.clear()
            self._previous.clear()
            raise

    async def lock_condition(self, key: str) -> None:
        """Serialize requests with the same condition until this transaction ends.

        Conditional create/update/delete search, then write; two identical requests racing
        would both see no match and both create (the duplicate bug every peer has). A
        transaction-level advisory lock on the normalized condition makes the second wait
        for the first to commit; its search then sees the first one's resource.
        """
        await self._execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", key)

    async def read_for_update(self, resource_type: str, fhir_id: str) -> StoredVersion:
        """The current version, row-locked until the transaction ends (read-modify-write: a
        PATCH shows and changes it, so it needs both ``r`` and ``u``)."""
        _check_mutable(resource_type)
        return _live(await self._current(resource_type, fhir_id, "r", "u", lock=True))

    def _compiler(self) -> SearchCompiler:
        return SearchCompiler(registry(), self.fhir_base, Binder(), self.access)

    def expect_creates(self, keys: Sequence[tuple[str, str]]) -> None:
        """(type, id) of resources this transaction is about to create (a transaction's POST
        entries): references to them are not references to missing resources."""
        self._pending_creates.update(keys)

    async def _check_references(self, data: dict[str, Any], previous: dict[str, Any] | None = None) -> None:
        """A limited token may only point a resource at what it can read (403 otherwise).

        Visibility follows references (a patient's compartment, what a partner's referrals
        grant), so without this check a write could widen what its own token sees: a partner
        adding a reference to its referral, a patient app naming itself as performer of
        another patient's Observation. Every reference the write adds counts, wherever it sits
        in the resource (references the previous version already had were placed by someone
        allowed to), and so does a reference to a resource that does not exist (yet): written
        by a limited token it would squat the id, granting access to whatever is later stored
        there. The two are refused alike, so that the answer does not reveal which it was.
        Resources that a later entry of the same transaction creates are not missing, and the
        organisation running the server may always be named (partners refer clients to it).
        """
        if not self.access.limited_writer:
            return
        targets = local_references(data, self.fhir_base)
        if previous is not None:
            targets -= local_references(previous, self.fhir_base)
        targets = {t for t in targets if t[0] in SERVED_TYPE_SET and t != self._home} - self._pending_creates
        if not targets:
            return
        ordered = sorted(targets)
        compiler = self._compiler()
        types = compiler.bind([t for t, _ in ordered])
        ids = compiler.bind([i for _, i in ordered])
        readable = render(self.access.row_filter(compiler, "r", "r", SERVED_TYPES) or TRUE)
        sql = (
            f"SELECT t.resource_type FROM unnest(CAST({types} AS text[]), CAST({ids} AS text[]))"
            " AS t(resource_type, fhir_id)"
            " LEFT JOIN resource r ON r.resource_type = t.resource_type AND r.fhir_id = t.fhir_id"
            # NULL (no row, or an IN over NULLs) is not readable.
            f" WHERE r.rid IS NULL OR r.deleted OR NOT COALESCE(({readable}), false) LIMIT 1"
        )
        refused = await self._fetchval(sql, *compiler.bind.values)
        if refused is not None:
            raise Forbidden(
                "the resource refers to a resource that the access token may not read or that does not exist",
                expression=(refused,),
            )

    async def _check_written(self, rid: int, resource_type: str, letter: str) -> None:
        """The version just written must lie within what the token allows (patient compartment,
        scope restrictions); otherwise the request fails and its transaction rolls back."""
        if not self.access.is_limited(resource_type, letter):
            return
        compiler = self._compiler()
        rid_placeholder = compiler.bind(rid)
        condition = self.access.condition(compiler, "r", resource_type, letter) or TRUE
        sql = f"SELECT {render(condition)} FROM resource r WHERE r.rid = {rid_placeholder}"
        if not await self._fetchval(sql, *compiler.bind.values):
            raise Forbidden(
                f"the access token does not allow this {resource_type}"
                " (outside its patient compartment, organisation or scope restrictions)"
            )

    async def search(
        self, request: SearchRequest, after: tuple[Any, ...] | None, backwards: bool
    ) -> SearchPage:
        """search.html: one page of matches, their includes and (when asked) a total."""
        if request.store == "audit_event":
            from app.audit import fhir as audit_fhir  # the audit store's adapter imports this module

            return await audit_fhir.search(await self.db(), request, after, backwards)
        return await SearchExecutor(await self.db(), self.fhir_base).search(request, after, backwards)

    async def create(
        self, resource_type: str, data: dict[str, Any], *, fhir_id: str | None = None
    ) -> StoredVersion:
        """http.html#create: a new resource with a server-assigned id, version 1.

        ``fhir_id`` is an id the server chose beforehand (a transaction assigns the ids of
        its POST entries before writing, to rewrite references to them).
        """
        if resource_type in IMMUTABLE_TYPES:
            # The server records them in their own store (app/audit), never through this repository.
            raise MethodNotAllowed(f"{resource_type} resources are written by the server, not by clients")
        self.access.require(resource_type, "c")
        return await self._insert(resource_type, fhir_id or new_id(), data, method="POST", letter="c")

    async def _insert(
        self, resource_type: str, fhir_id: str, data: dict[str, Any], *, method: str, letter: str
    ) -> StoredVersion:
        hooks = self._hooks_for(resource_type)
        for hook in hooks:
            await hook.before_write(self, resource_type, None, data)
        check_attachments(resource_type, data, self.max_attachment_bytes)
        rows = extract(resource_type, data, self.fhir_base)
        await self._check_references(data)
        now = _now()
        body = stamp(data, fhir_id, 1, now)
        params = {
            "rtype": resource_type,
            "fid": fhir_id,
            "ts": now,
            "body": body,
            "method": method,
            "org": self.access.organization,
            "bookkeeping": self.bookkeeping,
            **_index_params(rows),
        }
        inserted = await self._fetchrow(_INSERT.sql, *_INSERT.args(params))
        if inserted is None:
            raise _IdTaken()
        await self._check_written(inserted["rid"], resource_type, letter)
        self.touched.append((resource_type, fhir_id, 1))
        version = StoredVersion(resource_type, fhir_id, 1, now, False, body, method)
        for hook in hooks:
            await hook.after_write(self, version, None, data)
        return version

    async def read(self, resource_type: str, fhir_id: str) -> StoredVersion:
        """http.html#read: the current version; 404 when unknown, 410 when deleted."""
        return _live(await self._current(resource_type, fhir_id, "r"))

    async def vread(self, resource_type: str, fhir_id: str, version_id: int) -> StoredVersion:
        """http.html#vread: one version; a deletion version answers 410."""
        if resource_type in IMMUTABLE_TYPES:  # one version each, in the audit store
            version = await self._current(resource_type, fhir_id, "r")
            if version_id != 1:
                raise NotFound(f"{resource_type}/{fhir_id} has no version {version_id}")
            return version
        limited = self.access.is_limited(resource_type, "r")
        seen = None
        if limited:
            seen = await self.read_any(resource_type, fhir_id)  # 404 unless the token may see it
        else:
            self.access.require(resource_type, "r")
        params = {"rtype": resource_type, "fid": fhir_id, "vid": version_id}
        row = await self._fetchrow(_VREAD.sql, *_VREAD.args(params))
        if row is None:
            if not limited:
                await self.read_any(resource_type, fhir_id)
            raise NotFound(f"{resource_type}/{fhir_id} has no version {version_id}")
        version = StoredVersion(
            resource_type,
            fhir_id,
            row["version_id"],
            row["last_updated"],
            row["method"] == "DELETE",
            row["body"],
            row["method"],
        )
        if seen is not None and not await self._allowed_versions(
            [version], "r", judged_current=seen.version_id
        ):
            raise NotFound(f"{resource_type}/{fhir_id} has no version {version_id} this token may read")
        self.touched.append((resource_type, fhir_id, version_id))
        if version.deleted:
            raise Gone(
                f"version {version_id} of {resource_type}/{fhir_id} is a deletion",
                headers=version_headers(version),
            )
        return version

    async def read_any(self, resource_type: str, fhir_id: str) -> StoredVersion:
        """The current row, deleted or not; 404 only when the id was never used (or the
        token may not see it)."""
        return await self._current(resource_type, fhir_id, "r")

    async def current_for(self, resource_type: str, fhir_id: str, letter: str) -> StoredVersion:
        """The current row, deleted or not, if the token may use it with ``letter`` (``u``,
        ``d``): what an update or a delete would start from, without locking or changing it
        (R4 Resource-validate's update and delete modes). 403/404 as that interaction."""
        return await self._current(resource_type, fhir_id, letter)

    async def labels(self, resource_type: str | None) -> dict[str, list[Any]]:
        """R4 Resource-meta at the type (``resource_type``) or system (None) level: the
        profiles, tags and security labels of the current resources the token may search,
        from the search index (``_profile``, ``_tag``, ``_security``)."""
        compiler = self._compiler()
        bind = compiler.bind
        if resource_type is not None:
            self.access.require(resource_type, "s")
            types: tuple[str, ...] = (resource_type,)
            limit = self.access.condition(compiler, "r", resource_type, "s")
        else:
            types = tuple(t for t in SERVED_TYPES if self.access.allows(t, "s"))
            if not types:
                raise Forbidden("the access token does not allow searching any resource type")
            limit = self.access.row_filter(compiler, "r", "s", types)
        # Fixed clauses; values travel as bind parameters.
        where = f"i.resource_type = ANY({bind(list(types))}) AND NOT r.deleted" + (
            f" AND {render(limit)}" if limit is not None else ""
        )
        sql = (
            "SELECT i.param, i.system, i.code, min(i.display) AS display, NULL AS uri"
            " FROM search_token i JOIN resource r ON r.rid = i.rid"
            f" WHERE i.param IN ('_tag', '_security') AND {where} GROUP BY i.param, i.system, i.code"
            " UNION ALL SELECT DISTINCT i.param, NULL, NULL, NULL, i.uri"
            f" FROM search_uri i JOIN resource r ON r.rid = i.rid WHERE i.param = '_profile' AND {where}"
            " ORDER BY 1, 2, 3, 5"
        )
        found: dict[str, list[Any]] = {"profile": [], "tag": [], "security": []}
        for row in await self._fetch(sql, *bind.values):
            if row["param"] == "_profile":
                found["profile"].append(row["uri"])
                continue
            coding = {key: row[key] for key in ("system", "code", "display") if row[key] is not None}
            found[row["param"].lstrip("_")].append(coding)
        return {key: value for key, value in found.items() if value}

    async def _current(
        self, resource_type: str, fhir_id: str, *letters: str, lock: bool = False
    ) -> StoredVersion:
        """The current version if the token may use it with every one of ``letters``."""
        if resource_type in IMMUTABLE_TYPES:
            from app.audit import fhir as audit_fhir  # the audit store's adapter imports this module

            version = await audit_fhir.read(await self.db(), self.access, self.fhir_base, fhir_id, letters[0])
            self.touched.append((resource_type, fhir_id, 1))
            return version
        row = await self._current_row(resource_type, fhir_id, *letters, lock=lock)
        self.touched.append((resource_type, fhir_id, row["version_id"]))
        return StoredVersion(
            resource_type, fhir_id, row["version_id"], row["last_updated"], row["deleted"], row["body"]
        )

    async def _current_row(
        self, resource_type: str, fhir_id: str, *letters: str, lock: bool = False
    ) -> Record:
        """The current row if the token may use it with every one of ``letters``: 403 when its
        scopes do not cover one, 404 when the row is unknown or outside its limits. A locked
        row is remembered for the write that follows (``_lock``)."""
        for letter in letters:
            self.access.require(resource_type, letter)
        row = await self._judged_row(resource_type, fhir_id, letters, lock=lock)
        if row is None or not row["visible"]:
            raise NotFound(f"{resource_type}/{fhir_id} is not known")
        if lock:
            self._locked[(resource_type, fhir_id)] = (letters, row)
        return row

    async def _judged_row(
        self, resource_type: str, fhir_id: str, letters: tuple[str, ...], *, lock: bool
    ) -> Record | None:
        """The current row (None when the id is unused) and, as ``visible``, whether the token
        may use it with every one of ``letters``: one statement, the access conditions in it."""
        limited = [letter for letter in letters if self.access.is_limited(resource_type, letter)]
        if not limited:
            sql = _READ_FOR_UPDATE_VISIBLE if lock else _READ_VISIBLE
            return await self._fetchrow(sql, resource_type, fhir_id)
        compiler = self._compiler()
        compiler.bind(resource_type)  # $1
        compiler.bind(fhir_id)  # $2
        conditions = [
            render(self.access.condition(compiler, "r", resource_type, code) or TRUE) for code in limited
        ]
        sql = (
            f"SELECT {_CURRENT_COLUMNS}, ({') AND ('.join(conditions)}) AS visible FROM resource r"
            f" WHERE {_CURRENT_WHERE}"
        )
        row = await self._fetchrow(sql + (" FOR UPDATE OF r" if lock else ""), *compiler.bind.values)
        return row

    async def update(
        self, resource_type: str, fhir_id: str, data: dict[str, Any], *, if_match: int | None = None
    ) -> tuple[StoredVersion, bool]:
        """http.html#update: a new version, or update-as-create for an unknown id.

        Returns the stored version and whether it was created. ``if_match`` is the
        version the client based its change on (http.html#concurrency): any other
        current version is a 412.
        """
        _check_mutable(resource_type)
        self.access.require(resource_type, "u")
        while True:
            current = await self._lock(resource_type, fhir_id, "u")
            if current is None:
                if self.access.limited_writer:
                    # A limited token may not choose ids (it would squat them), and a new id must
                    # answer as a hidden one does, or the answer reveals which ids exist.
                    raise NotFound(f"{resource_type}/{fhir_id} is not known")
                if if_match is not None:
                    raise PreconditionFailed(f"{resource_type}/{fhir_id} does not exist (If-Match given)")
                try:
                    return await self._insert(resource_type, fhir_id, data, method="PUT", letter="u"), True
                except _IdTaken:
                    continue  # a concurrent request created it first: update that version instead
            rid, version_id, _deleted = current
            _check_if_match(resource_type, fhir_id, version_id, if_match)
            version = await self._write(rid, resource_type, fhir_id, version_id + 1, data, method="PUT")
            await self._check_written(rid, resource_type, "u")
            return version, False

    async def delete(self, resource_type: str, fhir_id: str, *, if_match: int | None = None) -> StoredVersion:
        """http.html#delete: a deletion version; deleting a deleted resource changes nothing."""
        _check_mutable(resource_type)
        current = await self._lock(resource_type, fhir_id, "d")
        if current is None:
            raise NotFound(f"{resource_type}/{fhir_id} is not known")
        rid, version_id, deleted = current
        _check_if_match(resource_type, fhir_id, version_id, if_match)
        if deleted:
            return await self._current(resource_type, fhir_id, "d")
        return await self._write(rid, resource_type, fhir_id, version_id + 1, None, method="DELETE")

    async def _lock(self, resource_type: str, fhir_id: str, letter: str) -> tuple[int, int, bool] | None:
        """Lock the current row for a write; None when the id is unused. A row the token may
        not use is a 404 (its existence is not revealed)."""
        self.access.require(resource_type, letter)
        judged_for, row = self._locked.pop((resource_type, fhir_id), ((), None))
        if letter not in judged_for:  # not locked and judged for this letter already
            row = await self._judged_row(resource_type, fhir_id, (letter,), lock=True)
            if row is None:
                return None
            if not row["visible"]:
                raise NotFound(f"{resource_type}/{fhir_id} is not known")
        self._previous[row["rid"]] = row["body"]
        return row["rid"], row["version_id"], row["deleted"]

    async def _write(
        self,
        rid: int,
        resource_type: str,
        fhir_id: str,
        version_id: int,
        data: dict[str, Any] | None,
        *,
        method: str,
    ) -> StoredVersion:
        hooks = self._hooks_for(resource_type)
        previous: dict[str, Any] | None = None
        locked = rid in self._previous
        locked_body = self._previous.pop(rid, None)
        if hooks or self.access.limited_writer:
            if not locked:
                locked_body = await self._fetchval("SELECT body FROM resource WHERE rid = $1", rid)
            previous_body = locked_body
            previous = jsonio.loads(previous_body) if previous_body else None
        for hook in hooks:
            await hook.before_write(self, resource_type, previous, data)
        if data is not None:
            check_attachments(resource_type, data, self.max_attachment_bytes)
        rows = IndexRows() if data is None else extract(resource_type, data, self.fhir_base)
        if data is not None:
            await self._check_references(data, previous)
        now = _now()
        body = None if data is None else stamp(data, fhir_id, version_id, now)
        params = {
            "rid": rid,
            "vid": version_id,
            "ts": now,
            "deleted": data is None,
            "body": body,
            "rtype": resource_type,
            "fid": fhir_id,
            "method": method,
            # A deletion belongs to no one: whoever deleted a resource may not revive it at will.
            "org": None if data is None else self.access.organization,
            "bookkeeping": self.bookkeeping,
            **_index_params(rows),
        }
        await self._execute(_WRITE_VERSION.sql, *_WRITE_VERSION.args(params))
        self.touched.append((resource_type, fhir_id, version_id))
        version = StoredVersion(resource_type, fhir_id, version_id, now, data is None, body, method)
        for hook in hooks:
            await hook.after_write(self, version, previous, data)
        return version

    async def history(
        self,
        *,
        resource_type: str | None = None,
        fhir_id: str | None = None,
        since: datetime | None = None,
        count: int,
        cursor: int | None = None,
    ) -> HistoryPage:
        """http.html#history for an instance, a type or the whole system, newest first.

        Pages by keyset on the history sequence (``cursor`` = the last ``hid`` seen), so
        writes between page requests neither duplicate nor skip entries.
        """
        if resource_type in IMMUTABLE_TYPES:
            raise MethodNotAllowed(
                f"{resource_type} has no history: each is one version, read and searched in the audit store"
            )
        compiler = self._compiler()
        bind = compiler.bind
        clauses = []
        judged_current = None
        if resource_type is not None and fhir_id is not None:
            judged_current = (await self.read_any(resource_type, fhir_id)).version_id  # r: a read
        elif resource_type is not None:
            limit = self.access.condition(compiler, "r", resource_type, "s")
            if limit is not None:
                clauses.append(f"EXISTS (SELECT 1 FROM resource r WHERE r.rid = h.rid AND {render(limit)})")
        else:
            if not any(self.access.allows(t, "s") for t in SERVED_TYPES):
                raise Forbidden("the access token does not allow system history")
            limit = self.access.row_filter(compiler, "r", "s", SERVED_TYPES)
            if limit is not None:
                clauses.append(f"EXISTS (SELECT 1 FROM resource r WHERE r.rid = h.rid AND {render(limit)})")
        if resource_type is not None:
            clauses.append(f"h.resource_type = {bind(resource_type)}")
        if fhir_id is not None:
            clauses.append(f"h.fhir_id = {bind(fhir_id)}")
        if since is not None:
            clauses.append(f"h.last_updated >= {bind(since)}")
        if cursor is not None:
            clauses.append(f"h.hid < {bind(cursor)}")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        # The clauses are fixed strings chosen above; values travel as bind parameters.
        sql = (
            f"SELECT {_HISTORY_COLUMNS} FROM resource_history h {where}"
            f" ORDER BY h.hid DESC LIMIT {bind(count + 1)}"
        )
        rows = await self._fetch(sql, *bind.values)
        versions = [
            StoredVersion(
                r["resource_type"],
                r["fhir_id"],
                r["version_id"],
                r["last_updated"],
                r["method"] == "DELETE",
                r["body"],
                r["method"],
            )
            for r in rows[:count]
        ]
        next_cursor = rows[count - 1]["hid"] if count and len(rows) > count else None
        letter = "r" if fhir_id is not None else "s"
        kept = await self._allowed_versions(versions, letter, judged_current=judged_current)
        # A page may come out shorter than _count; the cursor still moves past what was judged.
        return HistoryPage(kept, next_cursor)

    async def _allowed_versions(
        self, versions: list[StoredVersion], letter: str, *, judged_current: int | None = None
    ) -> list[StoredVersion]:
        """The stored versions that lie within the token's limits. A current version passed the
        SQL conditions already (history pages and vread start from a visible current row):
        ``judged_current`` is the version an instance's earlier statement judged (``read_any``),
        so that a version written since, current by now, is judged like any other (a type or
        system history page judges its current rows in the statement that lists them); an
        older one is judged by the same condition tree (AccessContext.condition), rendered for
        older versions (app/fhir/conditions.py ``Older``): what the tree says of the row's own
        content is asked of that version's index rows, what it says of its identity and of
        other rows (a Task focusing it, a referral's grants) of the current row. A deletion (no
        body) shows nothing; a version that no longer indexes (stored before a rule it breaks
        existed) is not shown."""
        judged = {
            n: v
            for n, v in enumerate(versions)
            if v.body is not None and self.access.is_limited(v.resource_type, letter)
        }
        if not judged:
            return versions
        extracted: dict[int, IndexRows | None] = {}
        for n, version in judged.items():
            try:
                body = jsonio.loads(version.body or "{}")
                extracted[n] = extract(version.resource_type, body, self.fhir_base)
            except FHIRError:
                extracted[n] = None
        compiler = self._compiler()
        bind = compiler.bind
        older = Older()
        alternatives = []
        for resource_type in sorted({v.resource_type for v in judged.values()}):
            condition = self.access.condition(compiler, "r", resource_type, letter)
            rendered = "TRUE" if condition is None else render(condition, older=older)
            alternatives.append(f"(v.resource_type = {bind(resource_type)} AND {rendered})")
        numbers = list(judged)
        relations = []
        for kind in sorted(older.tables):
            columns = INDEX_TABLES[kind]
            owners: list[int] = []
            types: list[str] = []
            values: list[list[Any]] = [[] for _ in range(len(columns) + 1)]
            for n in numbers:
                rows = extracted[n]
                if rows is None:
                    continue
                arrays = rows.columns(kind, len(columns) + 1)
                owners.extend([n] * len(arrays[0]))
                types.extend([judged[n].resource_type] * len(arrays[0]))
                for target, array in zip(values, arrays, strict=True):
                    target.extend(array)
            kinds = ("text", *(sql_type for _, sql_type in columns))  # param, then the value columns
            typed = [("int", owners), ("text", types), *zip(kinds, values, strict=True)]
            unnest = ", ".join(f"CAST({bind(array)} AS {sql_type}[])" for sql_type, array in typed)
            names = ", ".join(name for name, _ in columns)
            relations.append(
                f"older_{kind}(n, resource_type, param, {names}) AS (SELECT * FROM unnest({unnest}))"
            )
        versions_of = (
            f"unnest(CAST({bind(numbers)} AS int[]), CAST({bind([judged[n].resource_type for n in numbers])}"
            f" AS text[]), CAST({bind([judged[n].fhir_id for n in numbers])} AS text[]),"
            f" CAST({bind([judged[n].version_id for n in numbers])} AS int[]),"
            f" CAST({bind([judged[n].last_updated for n in numbers])} AS timestamptz[]),"
            f" CAST({bind([extracted[n] is not None for n in numbers])} AS boolean[]),"
            f" CAST({bind([judged_current for _ in numbers])} AS int[]))"
            " AS v(n, resource_type, fhir_id, version_id, last_updated, indexed, judged_current)"
        )
        sql = (
            ("WITH " + ", ".join(relations) + " " if relations else "")
            + f"SELECT v.n FROM {versions_of}"
            " JOIN resource r ON r.resource_type = v.resource_type AND r.fhir_id = v.fhir_id"
            f" WHERE COALESCE(v.judged_current, r.version_id) = v.version_id"
            f" OR (v.indexed AND ({' OR '.join(alternatives)}))"
        )
        allowed = {row["n"] for row in await self._fetch(sql, *bind.values)}
        return [v for n, v in enumerate(versions) if n not in judged or n in allowed]


IMMUTABLE_TYPES = frozenset({"AuditEvent"})
"""Records of what happened: written by the server into the audit store (app/audit), never
created, updated, patched or deleted through the API; read and searched there (read, vread,
search-type)."""


def _check_mutable(resource_type: str) -> None:
    if resource_type in IMMUTABLE_TYPES:
        raise MethodNotAllowed(f"{resource_type} resources cannot be updated, patched or deleted")


class _IdTaken(Exception):
    """An INSERT found the (type, id) already present (a concurrent create won)."""


def _check_if_match(resource_type: str, fhir_id: str, current: int, if_match: int | None) -> None:
    if if_match is not None and if_match != current:
        raise PreconditionFailed(
            f"{resource_type}/{fhir_id} is at version {current}, not {if_match} (If-Match)",
            headers={"ETag": f'W/"{current}"'},
        )


def version_headers(version: StoredVersion) -> dict[str, str]:
    """``ETag: W/"n"`` and ``Last-Modified`` of a version (http.html#versioning)."""
    return {
        "ETag": f'W/"{version.version_id}"',
        "Last-Modified": http_date(version.last_updated),
    }


def _live(version: StoredVersion) -> StoredVersion:
    """A current version that is not a deletion (else 410 Gone, with its version headers)."""
    if version.deleted:
        raise Gone(f"{version.resource_type}/{version.fhir_id} was deleted", headers=version_headers(version))
    return version


@dataclass(frozen=True)
class Found:
    """A resource in a search result (match or include)."""

    rid: int
    resource_type: str
    fhir_id: str
    body: str
    keys: tuple[Any, ...] = ()


@dataclass
class SearchPage:
    matches: list[Found]
    included: list[Found]
    total: int | None
    next_keys: tuple[Any, ...] | None
    previous_keys: tuple[Any, ...] | None


def cursor_value(value: Any) -> str:
    """Cursor sort values are bound as text and cast in SQL to the key's type."""
    return value.isoformat() if isinstance(value, datetime) else str(value)


class SearchExecutor:
    """Runs a parsed search (app/fhir/search.py) as one keyset-paged statement plus includes."""

    def __init__(self, connection: Connection, fhir_base: str) -> None:
        self._conn = connection
        self._fhir_base = fhir_base

    @staticmethod
    def _where(request: SearchRequest, driven: bool = False) -> str:
        """The WHERE clause; ``driven``: the page is cut by the driver, which enforces the
        access limits that are sets of rids (``request.driven_limits``) on its own (repeated
        here, PostgreSQL would check them again row by row, rescanning a caseload per row)."""
        placeholder = request.type_placeholder
        if len(request.resource_types) == 1:
            clauses = [f"r.resource_type = {placeholder}"]
        else:
            clauses = [f"r.resource_type = ANY({placeholder})"]
        clauses.append("NOT r.deleted")
        clauses.extend(request.where(request.driven_limits if driven else frozenset()))
        return " AND ".join(clauses)

    async def search(
        self, request: SearchRequest, after: tuple[Any, ...] | None, backwards: bool
    ) -> SearchPage:
        """search.html#paging: the page after (or before) the cursor's sort values."""
        bind = request.binder
        where = self._where(request)
        where_values = bind.values[: request.where_count]  # all the count and estimate statements use
        keys = [(key.expression, key.descending, key.sql_type) for key in request.sort]
        # A worklist's rows come in the order of its index, whose last column is the row id.
        keys.append(("w.rid" if request.worklist_filter else "r.rid", False, "bigint"))
        keyset = ""
        if after is not None:
            if len(after) != len(keys):
                raise BadRequest("_cursor: does not belong to this query", expression=("_cursor",))
            alternatives = []
            for position, (expression, descending, sql_type) in enumerate(keys):
                ascending = descending == backwards
                equal = [
                    f"{keys[j][0]} = CAST(CAST({bind(cursor_value(after[j]))} AS text) AS {keys[j][2]})"
                    for j in range(position)
                ]
                op = ">" if ascending else "<"
                value = f"CAST(CAST({bind(cursor_value(after[position]))} AS text) AS {sql_type})"
                alternatives.append("(" + " AND ".join([*equal, f"{expression} {op} {value}"]) + ")")
            keyset = " AND (" + " OR ".join(alternatives) + ")"
        order = ", ".join(
            f"k{i} {'ASC' if (descending == backwards) else 'DESC'}"
            for i, (_, descending, _) in enumerate(keys)
        )
        selected = ", ".join(f"{expression} AS k{i}" for i, (expression, _, _) in enumerate(keys))
        limit = request.count + 1
        driver = self._driver(request, after, backwards, limit) if not request.sort else ""
        page_where = self._where(request, driven=True) if driver else where
        # Every identifier and operator above comes from the parameter table; values are bound.
        if request.worklist_filter:
            # The worklist index is read in order and each of its rows judged by the WHERE clause
            # in a subquery that PostgreSQL may not flatten (OFFSET 0): the scan stops when the
            # page is full, instead of filtering every row of the type and sorting the matches.
            sql = (
                f"SELECT r.rid, r.resource_type, r.fhir_id, r.body, {selected} FROM search_worklist w"
                f" CROSS JOIN LATERAL (SELECT r.* FROM resource r WHERE r.rid = w.rid AND {where} OFFSET 0) r"
                f" WHERE {request.worklist_filter}{keyset} ORDER BY {order} LIMIT {limit}"
            )
        else:
            sql = (
                f"SELECT r.rid, r.resource_type, r.fhir_id, r.body, {selected} FROM resource r"
                f" WHERE {page_where}{keyset}{driver} ORDER BY {order} LIMIT {limit}"
            )
        rows = [] if request.summary == "count" else list(await self._conn.fetch(sql, *bind.values))
        more = len(rows) > request.count
        rows = rows[: request.count]
        if backwards:
            rows.reverse()
        matches = [
            Found(
                row["rid"],
                row["resource_type"],
                row["fhir_id"],
                row["body"],
                tuple(row[f"k{i}"] for i in range(len(keys))),
            )
            for row in rows
        ]
        next_keys = previous_keys = None
        if matches:
            if backwards:
                next_keys = matches[-1].keys
                previous_keys = matches[0].keys if more else None
            else:
                next_keys = matches[-1].keys if more else None
                previous_keys = matches[0].keys if after is not None else None
        total = await self._total(request, where, where_values, matches, more, after)
        included = await self._includes(request, matches) if request.includes and matches else []
        return SearchPage(matches, included, total, next_keys, previous_keys)

    def _driver(
        self, request: SearchRequest, after: tuple[Any, ...] | None, backwards: bool, limit: int
    ) -> str:
        """Cut the page from the index rows alone, before any resource row is read.

        With the default order (rid) and conditions that are all sets of rids, the page is
        the first ``limit`` rids of their intersection after the cursor; only those resource
        rows are then fetched. Without this, PostgreSQL fetches and sorts every match (2,444
        Tasks of one owner at 1M resources) to return 21.
        """
        if not request.drivable:
            return ""
        first, *others = [s for s in request.rid_sets if s is not None]
        clauses = [f"d.rid IN ({rid_set})" for rid_set in others]
        if after is not None:
            cursor_rid = request.binder(cursor_value(after[-1]))
            clauses.append(f"d.rid {'<' if backwards else '>'} CAST(CAST({cursor_rid} AS text) AS bigint)")
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        direction = "DESC" if backwards else "ASC"
        page = f"SELECT DISTINCT d.rid FROM ({first}) d{where} ORDER BY d.rid {direction} LIMIT {limit}"
        return f" AND r.rid IN ({page})"

    async def _total(
        self,
        request: SearchRequest,
        where: str,
        values: list[Any],
        matches: list[Found],
        more: bool,
        after: tuple[Any, ...] | None,
    ) -> int | None:
        if request.total == "accurate" or request.summary == "count":
            sql = f"SELECT count(*) FROM resource r{_worklist_join(request)} WHERE {where}"
            return int(await self._conn.fetchval(sql, *values))
        if request.total == "estimate":
            sql = f"EXPLAIN (FORMAT JSON) SELECT 1 FROM resource r{_worklist_join(request)} WHERE {where}"
            plan = await self._conn.fetchval(sql, *values)
            document = jsonio.loads(plan) if isinstance(plan, str) else plan
            return int(document[0]["Plan"]["Plan Rows"])
        if after is None and not more:
            return len(matches)  # a complete first page: the count is known for free
        return None

    async def _includes(self, request: SearchRequest, matches: list[Found]) -> list[Found]:
        """_include and _revinclude, with :iterate (search.html#include)."""
        seen = {(m.resource_type, m.fhir_id) for m in matches}
        included: list[Found] = []
        frontier = matches
        for round_number in range(MAX_ITERATE + 1):
            directives = [i for i in request.includes if i.iterate or round_number == 0]
            if not directives or not frontier:
                break
            found: list[Found] = []
            for directive in directives:
                rows = await (
                    self._revinclude(request, directive, frontier)
                    if directive.reverse
                    else self._include(request, directive, frontier)
                )
                for item in rows:
                    if (item.resource_type, item.fhir_id) not in seen and len(included) + len(
                        found
                    ) < MAX_INCLUDES:
                        seen.add((item.resource_type, item.fhir_id))
                        found.append(item)
            included.extend(found)
            frontier = found
        return included

    def _compiler(self, request: SearchRequest) -> SearchCompiler:
        return SearchCompiler(registry(), self._fhir_base, Binder(), request.access)

    async def _include(self, request: SearchRequest, directive: Include, sources: list[Found]) -> list[Found]:
        rids = [s.rid for s in sources if directive.source_type in ("*", s.resource_type)]
        if not rids:
            return []
        compiler = self._compiler(request)
        clauses = [f"i.rid = ANY({compiler.bind(rids)})", *_reference_filters(directive, compiler)]
        clauses.extend(_readable(request, compiler, "t", directive.target_type))
        sql = (
            "SELECT DISTINCT t.rid, t.resource_type, t.fhir_id, t.body FROM search_reference i"
            " JOIN resource t ON t.resource_type = i.target_type AND t.fhir_id = i.target_id"
            f" WHERE {' AND '.join(clauses)} AND NOT t.deleted LIMIT {MAX_INCLUDES}"
        )
        return await self._found(sql, compiler)

    async def _revinclude(
        self, request: SearchRequest, directive: Include, targets: list[Found]
    ) -> list[Found]:
        compiler = self._compiler(request)
        types = compiler.bind([t.resource_type for t in targets])
        ids = compiler.bind([t.fhir_id for t in targets])
        clauses = []
        source_type = None if directive.source_type == "*" else directive.source_type
        if source_type is not None:
            clauses.append(f"i.resource_type = {compiler.bind(source_type)}")
        clauses.extend(_reference_filters(directive, compiler))
        clauses.extend(_readable(request, compiler, "s", source_type))
        extra = "".join(f" AND {c}" for c in clauses)
        sql = (
            "SELECT DISTINCT s.rid, s.resource_type, s.fhir_id, s.body"
            f" FROM unnest(CAST({types} AS text[]), CAST({ids} AS text[])) AS p(target_type, target_id)"
            " JOIN search_reference i ON i.target_type = p.target_type AND i.target_id = p.target_id"
            f" JOIN resource s ON s.rid = i.rid WHERE NOT s.deleted{extra} LIMIT {MAX_INCLUDES}"
        )
        return await self._found(sql, compiler)

    async def _found(self, sql: str, compiler: SearchCompiler) -> list[Found]:
        rows = await self._conn.fetch(sql, *compiler.bind.values)
        return [Found(r["rid"], r["resource_type"], r["fhir_id"], r["body"]) for r in rows]


def _worklist_join(request: SearchRequest) -> str:
    if not request.worklist_filter:
        return ""
    return f" JOIN search_worklist w ON w.rid = r.rid AND {request.worklist_filter}"


def _readable(
    request: SearchRequest, compiler: SearchCompiler, alias: str, resource_type: str | None
) -> list[str]:
    """Included resources are the caller's only where it may read them; others are left out."""
    access = request.access
    types = (resource_type,) if resource_type else SERVED_TYPES
    condition = access.row_filter(compiler, alias, "r", types)
    return [render(condition)] if condition is not None else []


def _reference_filters(directive: Include, compiler: SearchCompiler) -> list[str]:
    """The reference parameter and target type an include directive names (``*`` = any)."""
    clauses = []
    if directive.param != "*":
        clauses.append(f"i.param = {compiler.bind(directive.param)}")
    if directive.target_type:
        clauses.append(f"i.target_type = {compiler.bind(directive.target_type)}")
    return clauses
