"""What a FHIR interaction or operation handler gets from its request (one dependency)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from app.fhir.cursors import CursorCodec
from app.fhir.repository import FhirRepository
from app.fhir.responses import OutputFormat, Prefer
from app.settings import Settings


@dataclass(frozen=True)
class FhirContext:
    """Everything an interaction needs from the request, resolved as one dependency.

    ``repo`` carries the caller's access context: a handler reads and writes through it only,
    so what it answers is what the caller's token allows (app/fhir/access.py)."""

    request: Request
    repo: FhirRepository
    settings: Settings
    cursors: CursorCodec
    fmt: OutputFormat
    prefer: Prefer

    def param(self, name: str) -> str:
        value: str = self.request.path_params[name]
        return value
