"""Request dependencies: authentication, the request-owned transaction, the repository.

``RepositoryDep`` opens one database transaction per writing request, at its first statement
(app/lease.py: reading, parsing and validating the body hold no connection); it commits when
the handler returns and rolls back when it raises, before the response is sent, so a
client never sees a success that was not committed. Reads run without a transaction.
The repository carries the caller's access context (auth reaches storage), and every
interaction leaves an AuditEvent: a successful write's in its own transaction, the rest
through the audit buffer (app/auth/audit.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from asyncpg.exceptions import QueryCanceledError
from fastapi import Depends, Request

from app.auth.audit import AuditTrail, build_event, interaction_of
from app.auth.context import authenticate
from app.fhir.access import OPEN_ACCESS, AccessContext
from app.fhir.errors import FHIRError, PayloadTooLarge, Timeout
from app.fhir.params import declared_length
from app.fhir.repository import FhirRepository
from app.lease import ConnectionLease
from app.settings import Settings


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


async def get_access(request: Request) -> AccessContext:
    """The caller's access context from its bearer token (OPEN_ACCESS when auth is off)."""
    state = request.app.state
    # Back-pressure: while the audit buffer is full, a request waits here, before any work.
    await state.audit.admit()
    if not state.settings.auth_enabled:
        return OPEN_ACCESS
    try:
        return await authenticate(request.headers.get("authorization"), state.tokens)
    except FHIRError as exc:
        # A refused attempt is security-relevant: record it (no client is known).
        state.audit.record(_audit_event(request, exc.status, UNAUTHENTICATED))
        raise


AccessDep = Annotated[AccessContext, Depends(get_access)]


READ_ONLY_METHODS = frozenset({"GET", "HEAD"})
UNAUTHENTICATED = AccessContext(client_id="unauthenticated", unrestricted=False)


def _audit_event(
    request: Request, status: int, access: AccessContext, repo: FhirRepository | None = None
) -> dict[str, Any]:
    """The AuditEvent of this request: what ``repo`` touched, or (refused before any storage
    work) just the interaction and the query."""
    path, query_string = _path_and_query(request)
    fhir_path = path.removeprefix("/fhir")
    interaction = (repo.interaction if repo else None) or interaction_of(request.method, fhir_path)
    searching = interaction.startswith("search") or interaction.startswith("history-")
    query = f"{fhir_path.lstrip('/')}?{query_string}" if searching else None
    return build_event(
        interaction=interaction,
        status=status,
        access=access,
        touched=repo.touched if repo else (),
        query=query,
        address=request.client.host if request.client else None,
        fhir_base=request.app.state.settings.fhir_base,
    )


def _path_and_query(request: Request) -> tuple[str, str]:
    """``request.url.path`` and ``request.url.query``, from the scope: Starlette assembles the
    whole URL and parses it again for them (~8 us on every audited request, issue 14). Its
    escapes are applied here; a tab or line break (which URL parsing drops) or a ``#`` in the
    query (where parsing cuts the fragment) take Starlette's way."""
    path: str = request.scope["path"]
    query: str = request.scope.get("query_string", b"").decode()
    if any(c in path or c in query for c in "\t\r\n") or "#" in query:
        return request.url.path, request.url.query
    return path.replace("?", "%3F").replace("#", "%23").replace("\\", "%5C"), query


async def received_body(request: Request) -> bytes | None:
    """A writing request's whole body, read (within the size limit) before the repository can
    take a database connection: a client trickling its body must not hold one of the pool's few
    connections, and with them the whole API (issue 15). Handlers get it from ``read_body``."""
    if request.method in READ_ONLY_METHODS:
        return None
    body: bytes = await read_body(request, request.app.state.settings.max_body_bytes)
    return body


async def get_repository(request: Request) -> AsyncIterator[FhirRepository]:
    """The request's repository over a :class:`ConnectionLease`: the pool connection (and a
    writing request's transaction) is taken at the first statement, so parsing and validating
    the body, and every refusal that needs no data, hold no connection (issue 14). Reads run
    without a transaction: each statement sees committed data, and skipping BEGIN/COMMIT saves
    two round trips per read.

    The caller's access and the body come first, called here rather than declared as
    dependencies of their own: each dependency FastAPI resolves costs tens of microseconds per
    request (issue 14)."""
    access = await get_access(request)
    await received_body(request)
    state = request.app.state
    audit: AuditTrail = state.audit
    writing = request.method not in READ_ONLY_METHODS
    lease = ConnectionLease(state.pool, transaction=writing)
    repo = state.repositories.for_client(lease, access)
    try:
        try:
            yield repo
            if writing and audit.enabled:
                event = _audit_event(request, 200, repo.access, repo)
                if lease.taken:
                    # The write's record commits with it, or neither does.
                    await audit.write(await lease.connection(), event)
                else:  # nothing stored ($validate): no transaction to share
                    audit.record(event)
        except BaseException:
            await lease.finish(commit=False)
            raise
        await lease.finish(commit=True)
    except QueryCanceledError as exc:
        timeout = Timeout(
            "the database took longer than this server allows for one statement"
            " (CARECOORD_DB_STATEMENT_TIMEOUT); nothing was changed"
        )
        audit.record(_audit_event(request, timeout.status, repo.access, repo))
        raise timeout from exc
    except FHIRError as exc:
        audit.record(_audit_event(request, exc.status, repo.access, repo))
        raise
    if not writing:
        audit.record(_audit_event(request, 200, repo.access, repo))


# scope="function": the transaction ends (commit or rollback) when the handler returns,
# before the response is sent; FastAPI's default exits after sending.
RepositoryDep = Annotated[FhirRepository, Depends(get_repository, scope="function")]

repository_scope = asynccontextmanager(get_repository)
"""``get_repository`` for a dependency that builds on it (app/routers/fhir.py ``fhir_context``):
the handler's exception reaches it as FastAPI would hand it over."""


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes with 413 before reading it all; read
    once (``received_body`` reads it before a connection is taken), then served from memory."""
    cached: bytes | None = getattr(request.state, "body", None)
    if cached is not None:
        return cached
    declared = declared_length(request.headers.get("content-length"))
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request.state.body = body
    return body
