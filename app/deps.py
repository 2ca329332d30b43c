"""Request dependencies: the request-owned transaction, the repository, settings.

``RepositoryDep`` opens one database transaction per writing request; it commits when
the handler returns and rolls back when it raises, before the response is sent, so a
client never sees a success that was not committed. Reads run without a transaction.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from app.fhir.access import OPEN_ACCESS, AccessContext
from app.fhir.errors import PayloadTooLarge
from app.fhir.repository import FhirRepository
from app.settings import Settings


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


async def get_access(request: Request) -> AccessContext:
    return getattr(request.state, "access", OPEN_ACCESS)


AccessDep = Annotated[AccessContext, Depends(get_access)]


READ_ONLY_METHODS = frozenset({"GET", "HEAD"})


async def get_repository(request: Request, access: AccessDep) -> AsyncIterator[FhirRepository]:
    fhir_base = request.app.state.settings.fhir_base
    async with request.app.state.pool.acquire() as connection:
        if request.method in READ_ONLY_METHODS:
            # Reads need no transaction: each statement sees committed data, and skipping
            # BEGIN/COMMIT saves two round trips per read.
            yield FhirRepository(connection, access, fhir_base=fhir_base)
            return
        async with connection.transaction():
            yield FhirRepository(connection, access, fhir_base=fhir_base)


# scope="function": the transaction ends (commit or rollback) when the handler returns,
# before the response is sent; FastAPI's default exits after sending.
RepositoryDep = Annotated[FhirRepository, Depends(get_repository, scope="function")]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes with 413 before reading it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
