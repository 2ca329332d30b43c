"""Partners for the referral tests: a real second carecoord server and a misbehaving one.

* :class:`PartnerServer` (fixture ``partner_server``): ``python -m app.cli serve`` in a
  subprocess on a fresh database of the test PostgreSQL, with a client-secret client and
  ``private_key_jwt`` clients (ES384, RS384) registered through ``carecoord clients add``.
  Session-scoped and shared by every module that imports the fixture
  (``from tests.partner_support import partner_server_fixture  # noqa: F401``).
* :class:`MisbehavingServer` (fixture ``misbehaving_server``, import
  ``misbehaving_server_fixture``): a raw loopback HTTP server,
  in a thread, that answers each path from a script: a status with headers and body, a hang,
  a connection closed without an answer, or a reset.
* :class:`RequestLog`: an httpx request event hook that records what a client sent.

The partner's database is created on the tests' PostgreSQL: the ``DATABASE_URL`` server, or
the embedded one when it is unset.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from joserfc.jwk import ECKey, RSAKey

from tests import REPO_ROOT
from tests.conftest import LOOPBACK_ALLOWLIST

PARTNER_SCOPE = "system/*.cruds"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _plain(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@dataclass(frozen=True)
class JwtClient:
    """A private_key_jwt client registered at the partner: its id, key id, alg and private PEM."""

    client_id: str
    kid: str
    alg: str
    private_key_pem: str
    public_jwk: dict[str, Any]


@dataclass
class PartnerServer:
    """A running carecoord that plays the partner agency."""

    root: str
    database: str
    admin_dsn: str
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    secret_client: tuple[str, str] = ("", "")
    jwt_clients: dict[str, JwtClient] = field(default_factory=dict)

    @property
    def fhir_base(self) -> str:
        return f"{self.root}/fhir"

    @property
    def token_url(self) -> str:
        return f"{self.root}/auth/token"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        database_url = with_database(self.admin_dsn, self.database)
        env.update(
            {
                "DATABASE_URL": database_url,
                "CARECOORD_DATABASE_URL": database_url,
                "CARECOORD_BASE_URL": self.root,
                "CARECOORD_DATA_DIR": str(self.workdir / "data"),
                "CARECOORD_LOG_LEVEL": "warning",
                # Tests provoke refused token requests on purpose; they must not lock out the others.
                "CARECOORD_AUTH_FAILURE_LIMIT": "100000",
                # The partner fetches clients' JWKS from loopback servers of the tests.
                "CARECOORD_OUTBOUND_ALLOWLIST": LOOPBACK_ALLOWLIST,
            }
        )
        return env

    def cli(self, *args: str) -> str:
        """Run ``python -m app.cli ARGS`` against the partner's database; its standard output."""
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", *args],
            cwd=REPO_ROOT,
            env=self.env(),
            capture_output=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"carecoord {args[0]} failed: {done.stderr.decode(errors='replace')[-2000:]}")
        return done.stdout.decode()

    def register_secret_client(self, name: str = "partner", scope: str = PARTNER_SCOPE) -> tuple[str, str]:
        created = json.loads(self.cli("clients", "add", "--name", name, "--scope", scope, "--json"))
        return created["client_id"], created["client_secret"]

    def register_jwt_client(self, alg: str, scope: str = PARTNER_SCOPE) -> JwtClient:
        kid = uuid.uuid4().hex
        key: ECKey | RSAKey
        if alg == "ES384":
            key = ECKey.generate_key("P-384", parameters={"kid": kid})  # type: ignore[arg-type]
        else:
            key = RSAKey.generate_key(2048, parameters={"kid": kid})  # type: ignore[arg-type]
        public = key.as_dict(private=False)
        jwks_file = self.workdir / f"jwks-{kid}.json"
        jwks_file.write_text(json.dumps({"keys": [public]}))
        created = json.loads(
            self.cli(
                "clients",
                "add",
                "--name",
                f"partner-{alg}",
                "--scope",
                scope,
                "--jwks-file",
                str(jwks_file),
                "--json",
            )
        )
        pem = key.as_pem(private=True)
        return JwtClient(
            created["client_id"], kid, alg, pem.decode() if isinstance(pem, bytes) else pem, public
        )

    def start(self) -> None:
        asyncio.run(_admin_sql(self.admin_dsn, f'CREATE DATABASE "{self.database}"'))
        port = int(self.root.rsplit(":", 1)[1])
        log = (self.workdir / "server.log").open("wb")
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)),
                *("--workers", "1"),
            ],
            cwd=REPO_ROOT,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 90
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the partner server exited: {self.log_tail()}")
            try:
                if httpx.get(f"{self.root}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the partner server did not become ready: {self.log_tail()}")
            time.sleep(0.2)
        self.secret_client = self.register_secret_client()
        for alg in ("ES384", "RS384"):
            self.jwt_clients[alg] = self.register_jwt_client(alg)

    def log_tail(self) -> str:
        path = self.workdir / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        asyncio.run(_admin_sql(self.admin_dsn, f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))
        shutil.rmtree(self.workdir, ignore_errors=True)


async def _admin_sql(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


_shared: dict[str, Any] = {"server": None, "users": 0}


def with_database(url: str, name: str) -> str:
    """``url`` naming database ``name`` (keeps a unix-socket ``?host=`` of the embedded server)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@pytest.fixture(scope="session", name="partner_server")
def partner_server_fixture(database_url: str) -> Iterator[PartnerServer]:
    """A real carecoord partner server (one per test session, however many modules use it), with
    its own database on the tests' PostgreSQL (DATABASE_URL's server, or the embedded one)."""
    if _shared["server"] is None:
        server = PartnerServer(
            root=f"http://127.0.0.1:{free_port()}",
            database=f"carecoord_partner_{uuid.uuid4().hex[:8]}",
            admin_dsn=_plain(database_url),
            workdir=Path(tempfile.mkdtemp(prefix="carecoord-partner-")),
        )
        try:
            server.start()
        except BaseException:
            server.stop()
            raise
        _shared["server"] = server
    _shared["users"] += 1
    try:
        yield _shared["server"]
    finally:
        _shared["users"] -= 1
        if _shared["users"] == 0:
            _shared["server"].stop()
            _shared["server"] = None


# --- a misbehaving partner ------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """Answer with this status, headers and body (a dict is sent as JSON)."""

    status: int = 200
    body: dict[str, Any] | bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Hang:
    """Read the request, answer nothing for ``seconds``, then close."""

    seconds: float = 30.0


@dataclass(frozen=True)
class Close:
    """Read the request and close the connection without answering."""


@dataclass(frozen=True)
class Reset:
    """Read the request and reset the connection (TCP RST)."""


Behaviour = Reply | Hang | Close | Reset


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def operation_outcome(code: str = "invalid", diagnostics: str = "rejected") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }


def token_reply(token: str | None = None, expires_in: int = 300) -> Reply:
    return Reply(
        200,
        {
            "access_token": token or uuid.uuid4().hex,
            "token_type": "bearer",
            "expires_in": expires_in,
            "scope": PARTNER_SCOPE,
        },
    )


class MisbehavingServer:
    """A loopback HTTP/1.1 server answering each path (query ignored) from a script.

    ``script(path, *behaviours)``: each request to ``path`` takes the next behaviour; the last
    one repeats. Unscripted paths get a 404 OperationOutcome. Every connection is closed after
    one exchange. ``requests`` records what arrived, in order.
    """

    def __init__(self) -> None:
        self._scripts: dict[str, list[Behaviour]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.requests: list[Recorded] = []
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                owner._handle(self)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> MisbehavingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def script(self, path: str, *behaviours: Behaviour) -> None:
        with self._lock:
            self._scripts[path] = list(behaviours)

    def requests_to(self, path: str) -> list[Recorded]:
        return [request for request in self.requests if request.path.split("?", 1)[0] == path]

    def _next(self, path: str) -> Behaviour:
        with self._lock:
            script = self._scripts.get(path)
            if not script:
                return Reply(404, operation_outcome("not-found", "no such path"))
            return script.pop(0) if len(script) > 1 else script[0]

    def _handle(self, handler: socketserver.StreamRequestHandler) -> None:
        request_line = handler.rfile.readline(65536).decode("latin-1").strip()
        if not request_line:
            return
        method, target, _ = request_line.split(" ", 2)
        headers: dict[str, str] = {}
        while True:
            line = handler.rfile.readline(65536).decode("latin-1")
            if line in ("\r\n", "\n", ""):
                break
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = handler.rfile.read(int(headers.get("content-length", "0") or 0))
        with self._lock:
            self.requests.append(Recorded(method, target, headers, body))
        behaviour = self._next(target.split("?", 1)[0])
        connection = handler.connection
        if isinstance(behaviour, Hang):
            self._stopping.wait(behaviour.seconds)
            return
        if isinstance(behaviour, Close):
            return
        if isinstance(behaviour, Reset):
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if isinstance(behaviour.body, dict):
            payload = json.dumps(behaviour.body).encode()
            content_type = "application/json" if "access_token" in behaviour.body else "application/fhir+json"
        else:
            payload = behaviour.body or b""
            content_type = "text/plain"
        reason = {200: "OK", 201: "Created"}.get(behaviour.status, "Status")
        head = [
            f"HTTP/1.1 {behaviour.status} {reason}",
            f"content-length: {len(payload)}",
            "connection: close",
        ]
        if payload:
            head.append(f"content-type: {content_type}")
        head.extend(f"{name}: {value}" for name, value in behaviour.headers.items())
        handler.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
        handler.wfile.flush()


@pytest.fixture(name="misbehaving_server")
def misbehaving_server_fixture() -> Iterator[MisbehavingServer]:
    with MisbehavingServer() as server:
        yield server


class RequestLog:
    """An httpx ``request`` event hook recording (method, URL) of everything a client sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def __call__(self, request: httpx.Request) -> None:
        self.sent.append((request.method, str(request.url)))

    def count(self, url_prefix: str) -> int:
        return sum(1 for _, url in self.sent if url.startswith(url_prefix))
