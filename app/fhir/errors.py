"""One error vocabulary, rendered in one place as OperationOutcome.

Code raises subclasses of :class:`FHIRError`; the handlers installed by
:func:`install_error_handlers` turn them, request-validation errors, unknown routes
and unexpected exceptions into an OperationOutcome with the right status
(FHIR R4 http.html#Status, operationoutcome.html). A 500 says nothing about internals.

    FHIRError
    ├── BadRequest (400, invalid)          ├── NotFound (404, not-found)
    │   └── InvalidResource (400, ...)     ├── NotSupported (404, not-supported)
    ├── MethodNotAllowed (405)             ├── Gone (410, deleted)
    ├── Conflict (409, conflict)           ├── PreconditionFailed (412, conflict)
    ├── PayloadTooLarge (413, too-long)    ├── UnsupportedMediaType (415, not-supported)
    ├── NotAcceptable (406, not-supported) └── BusinessRule (422, business-rule)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.fhir import jsonio

logger = logging.getLogger("carecoord.errors")

FHIR_JSON = "application/fhir+json"


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome.issue."""

    code: str
    diagnostics: str
    severity: str = "error"
    expression: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics}
        if self.expression:
            out["expression"] = list(self.expression)
        return out


def operation_outcome(issues: list[Issue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [issue.as_json() for issue in issues]}


@dataclass
class FHIRError(Exception):
    """Base of every error carecoord reports to a client."""

    diagnostics: str = "error"
    expression: tuple[str, ...] = ()
    issues: list[Issue] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 400
    code: str = "processing"

    def all_issues(self) -> list[Issue]:
        return self.issues or [Issue(self.code, self.diagnostics, expression=self.expression)]

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.diagnostics}"


@dataclass
class BadRequest(FHIRError):
    status: int = 400
    code: str = "invalid"


@dataclass
class InvalidResource(BadRequest):
    """A body that fails parsing or validation; ``issues`` names each element."""


@dataclass
class Unauthorized(FHIRError):
    status: int = 401
    code: str = "login"


@dataclass
class Forbidden(FHIRError):
    status: int = 403
    code: str = "forbidden"


@dataclass
class NotFound(FHIRError):
    status: int = 404
    code: str = "not-found"


@dataclass
class NotSupported(FHIRError):
    status: int = 404
    code: str = "not-supported"


@dataclass
class MethodNotAllowed(FHIRError):
    status: int = 405
    code: str = "not-supported"


@dataclass
class NotAcceptable(FHIRError):
    status: int = 406
    code: str = "not-supported"


@dataclass
class Conflict(FHIRError):
    status: int = 409
    code: str = "conflict"


@dataclass
class Gone(FHIRError):
    status: int = 410
    code: str = "deleted"


@dataclass
class PreconditionFailed(FHIRError):
    status: int = 412
    code: str = "conflict"


@dataclass
class PayloadTooLarge(FHIRError):
    status: int = 413
    code: str = "too-long"


@dataclass
class UnsupportedMediaType(FHIRError):
    status: int = 415
    code: str = "not-supported"


@dataclass
class Timeout(FHIRError):
    """The database cancelled a statement that ran longer than the server allows
    (``CARECOORD_DB_STATEMENT_TIMEOUT``): the request changed nothing."""

    status: int = 503
    code: str = "timeout"


@dataclass
class BusinessRule(FHIRError):
    status: int = 422
    code: str = "business-rule"


ONLY_JSON = (
    "carecoord serves FHIR JSON only (application/fhir+json or application/json); XML is not supported"
)


def outcome_response(status: int, issues: list[Issue], headers: dict[str, str] | None = None) -> Response:
    return Response(
        content=jsonio.dumps(operation_outcome(issues)),
        status_code=status,
        media_type=FHIR_JSON + "; charset=utf-8",
        headers=headers,
    )


def _request_validation_issues(exc: RequestValidationError) -> list[Issue]:
    issues = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        issues.append(Issue("invalid", f"{where or 'request'}: {error.get('msg', 'invalid')}"))
    return issues or [Issue("invalid", "invalid request")]


_HTTP_STATUS_ISSUE = {404: "not-found", 405: "not-supported", 401: "login", 403: "forbidden", 413: "too-long"}


def install_error_handlers(app: FastAPI) -> None:
    """Render every reported failure as an OperationOutcome.

    Unexpected exceptions are turned into a 500 by app.main.UnexpectedErrorMiddleware.
    """

    @app.exception_handler(FHIRError)
    async def _fhir_error(request: Request, exc: FHIRError) -> Response:
        logger.info("fhir error %s %s -> %s %s", request.method, request.url.path, exc.status, exc.code)
        return outcome_response(exc.status, exc.all_issues(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return outcome_response(400, _request_validation_issues(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = _HTTP_STATUS_ISSUE.get(exc.status_code, "processing")
        message = "unknown path" if exc.status_code == 404 else str(exc.detail)
        return outcome_response(exc.status_code, [Issue(code, message)], dict(exc.headers or {}))
