"""A real ``carecoord serve`` process on a loopback port, for the tests that need one over real
HTTP (a browser, several uvicorn worker processes, what a process writes to stderr)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    base: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_server(
    database_url: str, tmp_path: Path, *serve_args: str, env: dict[str, str] | None = None
) -> Iterator[RunningServer]:
    """``carecoord serve --no-worker`` on ``database_url`` (already migrated), ready when yielded;
    stdout and stderr go to ``server.log`` in ``tmp_path``. Stopped with SIGINT at the end.
    One process unless ``serve_args`` say ``--workers`` (serve's default is one per CPU)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    environment = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CARECOORD_DATABASE_URL")}
    # The failed /auth request counts are in the database, which the in-process tests share (and
    # fail on purpose in, from 127.0.0.1): the server's limit is the tests' (conftest), unless given.
    environment.update(
        {
            "DATABASE_URL": database_url,
            "CARECOORD_BASE_URL": base,
            "CARECOORD_AUTH_FAILURE_LIMIT": "10000",
            **(env or {}),
        }
    )
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-worker",
                *([] if "--workers" in serve_args else ["--workers", "1"]),
                *serve_args,
            ],
            env=environment,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        server = RunningServer(base, log_path, process)
        try:
            deadline = time.monotonic() + 90
            while True:
                assert process.poll() is None, server.log()[-3000:]
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not become ready"
                time.sleep(0.3)
            yield server
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
