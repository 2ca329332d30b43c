"""Logging: one format in every process, a request id on every line, no PHI.

* **Format.** ``CARECOORD_LOG_FORMAT=json`` (the default): one JSON object per line on stderr
  (``time``, ``level``, ``logger``, ``message``, ``request_id``, ``process`` and, on request
  lines, ``method``, ``path``, ``status``, ``duration_ms``); ``text``: a plain line for local
  development. :func:`configure_logging` installs it in a process (``carecoord`` commands and
  :func:`app.main.create_app`); :func:`uvicorn_log_config` hands the same handler to uvicorn,
  which configures logging itself in its supervisor and in every ``--workers`` process, so its
  own loggers (``uvicorn.error``...) write the same lines.
* **Request id.** :class:`RequestIdMiddleware` takes the client's ``X-Request-ID`` when it is a
  safe short token (:data:`SAFE_REQUEST_ID`), generates one otherwise, returns it in the
  response's ``X-Request-ID`` and holds it in a context variable while the request runs: every
  record logged meanwhile carries it (a log record factory sets ``record.request_id``; lines
  outside a request have ``null``). When the request ends it logs one line: method, path
  (never the query string, which holds search values), status and duration.
* **No PHI.** Log calls name ids, types, statuses and codes, never resource content or query
  values. Exceptions are rendered as their type and the stack's code locations only: exception
  messages (validation errors, database errors) can quote what a client sent.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

LogFormat = Literal["json", "text"]

REQUEST_ID_HEADER = "X-Request-ID"
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
"""A client's request id is kept if it is 1-64 letters, digits, ``.``, ``_``, ``:`` or ``-``
(a UUID, a trace id): anything else could forge or bloat log lines, and is replaced."""

request_id_var: ContextVar[str | None] = ContextVar("carecoord_request_id", default=None)

REQUEST_FIELDS = ("method", "path", "status", "duration_ms")
"""The ``extra`` fields a JSON line carries besides the standard ones (other extras, such as
uvicorn's ``color_message``, are left out)."""

_MISSING = object()
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
MAX_PATH_CHARS = 256
STACK_FRAMES = 12

access_logger = logging.getLogger("carecoord.access")


def current_request_id() -> str | None:
    return request_id_var.get()


# --- records and formats ---------------------------------------------------------------------


class RequestIdFilter(logging.Filter):
    """Gives every record a ``request_id`` (the running request's, else None)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


_base_factory = logging.getLogRecordFactory()
_factory_installed = False


def _record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    record.request_id = request_id_var.get()
    return record


def _install_record_factory() -> None:
    global _base_factory, _factory_installed
    if _factory_installed:
        return
    _base_factory = logging.getLogRecordFactory()
    logging.setLogRecordFactory(_record_factory)
    _factory_installed = True


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def _exception_summary(exc_info: ExcInfo) -> tuple[str, list[str]]:
    """The exception's type and where it was raised: never its message (it can hold PHI)."""
    exc_type, _, tb = exc_info
    name = exc_type.__name__ if exc_type is not None else "Exception"
    frames = traceback.extract_tb(tb)[-STACK_FRAMES:] if tb is not None else []
    return name, [f"{frame.filename}:{frame.lineno} in {frame.name}" for frame in frames]


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
            "process": record.process,
        }
        for name in REQUEST_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc_type"], entry["stack"] = _exception_summary(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [request id] message``; exceptions as type and locations only."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        # The record is shared with other handlers: what is set here for the line is put back.
        saved_id, saved_exc_text = record.__dict__.get("request_id", _MISSING), record.exc_text
        record.request_id = getattr(record, "request_id", None) or request_id_var.get() or "-"
        record.exc_text = None  # another formatter's traceback (with the message) is not reused
        try:
            return super().format(record)
        finally:
            record.exc_text = saved_exc_text
            if saved_id is _MISSING:
                del record.__dict__["request_id"]
            else:
                record.request_id = saved_id

    def formatException(self, ei: Any) -> str:
        name, frames = _exception_summary(ei)
        return "\n".join([f"{name} (message not logged)", *(f"  at {frame}" for frame in frames)])


def make_formatter(log_format: str = "json") -> logging.Formatter:
    return TextFormatter() if log_format == "text" else JsonFormatter()


def _level(name: str) -> int:
    if name.lower() == "trace":
        return 5  # uvicorn's TRACE level
    level = logging.getLevelNamesMapping().get(name.upper())
    return level if level is not None else logging.INFO


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` installs (and replaces on a second call)."""


UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.asgi")
UVICORN_ACCESS = "uvicorn.access"
"""uvicorn's access log is always off: its lines carry the query string (search values, PHI).
RequestIdMiddleware writes the request lines instead. (uvicorn logs access lines whenever this
logger has a handler, its parents' included: so no handler and no propagation.)"""


def configure_logging(log_format: LogFormat | str = "json", level: str = "info") -> None:
    """Send every logger's records (uvicorn's too) to one stderr handler in ``log_format``.

    Idempotent: a second call replaces the handler the first one installed. Handlers others
    installed on the root logger (pytest's log capture, say) are left in place.
    """
    _install_record_factory()
    # What no format here shows is not collected for each record (the logging HOWTO,
    # "Optimization"): the caller's file and line (a walk up the stack), the thread and the
    # multiprocessing names. Every request logs a line, so this is per-request CPU (issue 14).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for installed in [each for each in root.handlers if isinstance(each, _Handler)]:
        root.removeHandler(installed)
    handler = _Handler(sys.stderr)
    handler.setFormatter(make_formatter(log_format))
    handler.addFilter(RequestIdFilter())
    root.addHandler(handler)
    root.setLevel(_level(level))
    for name in UVICORN_LOGGERS:
        uvicorn_logger = logging.getLogger(name)
        for own in list(uvicorn_logger.handlers):
            uvicorn_logger.removeHandler(own)
        uvicorn_logger.propagate = True
    access = logging.getLogger(UVICORN_ACCESS)
    for own in list(access.handlers):
        access.removeHandler(own)
    access.propagate = False


def uvicorn_log_config(log_format: LogFormat | str = "json", level: str = "info") -> dict[str, Any]:
    """uvicorn's ``log_config``: the handler of :func:`configure_logging` as a dictConfig, which
    uvicorn applies in its own process and in each worker process it spawns."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "app.logs.RequestIdFilter"}},
        "formatters": {"carecoord": {"()": "app.logs.make_formatter", "log_format": log_format}},
        "handlers": {
            "stderr": {
                # The same class: create_app's configure_logging in a worker replaces it (one line each).
                "class": "app.logs._Handler",
                "stream": "ext://sys.stderr",
                "formatter": "carecoord",
                "filters": ["request_id"],
            }
        },
        "root": {"handlers": ["stderr"], "level": _level(level)},
        "loggers": {
            **{name: {"handlers": [], "propagate": True} for name in UVICORN_LOGGERS},
            UVICORN_ACCESS: {"handlers": [], "propagate": False},
        },
    }


# --- the request id of each request ----------------------------------------------------------


def _client_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            return candidate if SAFE_REQUEST_ID.fullmatch(candidate) else None
    return None


def _loggable_path(path: str) -> str:
    """The request path for a log line: ids and types, never the query string; control and
    other unprintable characters escaped (a path cannot forge a line), length capped."""
    path = path[:MAX_PATH_CHARS]
    return path if path.isprintable() else path.encode("unicode_escape").decode("ascii")


class RequestIdMiddleware:
    """ASGI middleware (the outermost): the request id, its response header, the request line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _client_request_id(scope) or os.urandom(16).hex()
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status: int | None = None
        header = (b"x-request-id", request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if access_logger.isEnabledFor(logging.INFO):
                method = scope.get("method", "")
                path = _loggable_path(scope.get("path", ""))
                duration = round((time.perf_counter() - started) * 1000, 1)
                access_logger.info(
                    "%s %s %s %.1f ms",
                    method,
                    path,
                    status if status is not None else "-",
                    duration,
                    extra={"method": method, "path": path, "status": status, "duration_ms": duration},
                )
            request_id_var.reset(token)
