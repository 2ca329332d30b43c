"""``carecoord users`` and ``carecoord clients add --redirect-uri/--public`` (issue 11), run as
real processes on the test database; passwords only ever on standard input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg

from app.auth.users import check_password, find_user

REPO_ROOT = Path(__file__).resolve().parents[1]


def _cli(database_url: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CARECOORD_DATABASE_URL")}
    env["DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        cwd=REPO_ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
    )


async def _connect(database_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))


async def test_users_add_list_set_password_disable_remove(database_url: str) -> None:
    name = f"cm-{uuid.uuid4().hex[:8]}"
    password = "first password 123"
    added = _cli(
        database_url,
        "users", "add", "--username", name, "--fhir-user", "Practitioner/cm-1", "--password-stdin", "--json",
        stdin=password + "\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["fhir_user"] == "Practitioner/cm-1"
    assert password not in added.stdout + added.stderr
    conn = await _connect(database_url)
    try:
        user = await find_user(conn, name)
        assert user is not None and user.password_hash is not None
        assert user.password_hash.startswith("scrypt$") and password not in user.password_hash
        assert await check_password(user, password)

        again = _cli(
            database_url,
            "users", "add", "--username", name, "--fhir-user", "Patient/x", "--password-stdin",
            stdin="another password 1\n",
        )  # fmt: skip
        assert again.returncode == 2 and "already" in again.stderr
        for fhir_user, pw in (("Organization/x", "long enough pw"), ("Patient/x", "short")):
            refused = _cli(
                database_url,
                "users", "add", "--username", f"x{uuid.uuid4().hex[:6]}", "--fhir-user", fhir_user,
                "--password-stdin",
                stdin=pw + "\n",
            )  # fmt: skip
            assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        no_stdin = _cli(
            database_url,
            "users",
            "add",
            "--username",
            "nostdin",
            "--fhir-user",
            "Patient/x",
            "--password-stdin",
        )
        assert no_stdin.returncode == 2 and "standard input" in no_stdin.stderr

        listed = _cli(database_url, "users", "list", "--json")
        entry = next(u for u in json.loads(listed.stdout) if u["username"] == name)
        assert entry == {**entry, "fhir_user": "Practitioner/cm-1", "disabled": False}
        assert "password_hash" not in entry

        await conn.execute(
            "INSERT INTO auth_refresh_token (token_hash, family, client_id, scope, user_id, expires_at)"
            " VALUES ($1, 'f', 'c', 'offline_access', $2, now() + interval '1 day')",
            f"h-{name}",
            user.user_id,
        )
        changed = _cli(
            database_url, "users", "set-password", name, "--password-stdin", stdin="second password 456\n"
        )
        assert changed.returncode == 0, changed.stderr
        user = await find_user(conn, name)
        assert not await check_password(user, password)
        assert await check_password(user, "second password 456")
        revoked = await conn.fetchval(
            "SELECT revoked_at FROM auth_refresh_token WHERE token_hash = $1", f"h-{name}"
        )
        assert revoked is not None

        assert _cli(database_url, "users", "disable", name).returncode == 0
        user = await find_user(conn, name)
        assert user is not None and user.disabled
        assert not await check_password(user, "second password 456")
        assert _cli(database_url, "users", "disable", name, "--enable").returncode == 0
        assert await check_password(await find_user(conn, name), "second password 456")

        assert _cli(database_url, "users", "remove", name).returncode == 0
        assert await find_user(conn, name) is None
        assert _cli(database_url, "users", "remove", name).returncode == 1
    finally:
        await conn.close()


async def test_clients_add_public_app_client_with_exact_redirect_uris(database_url: str) -> None:
    added = _cli(
        database_url,
        "clients", "add", "--name", "Goals app", "--scope", "openid fhirUser launch/patient patient/*.rs",
        "--redirect-uri", "https://app.example/callback", "--redirect-uri", "org.example.goals:/callback",
        "--public", "--json",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    created = json.loads(added.stdout)
    assert created["client_secret"] is None
    listed = json.loads(_cli(database_url, "clients", "list", "--json").stdout)
    entry = next(c for c in listed if c["client_id"] == created["client_id"])
    assert entry["public"] is True and entry["auth"] == "none"
    assert entry["redirect_uris"] == ["https://app.example/callback", "org.example.goals:/callback"]

    confidential = _cli(
        database_url,
        "clients", "add", "--name", "Portal", "--scope", "openid user/*.rs",
        "--redirect-uri", "http://127.0.0.1:8765/cb", "--json",
    )  # fmt: skip
    assert confidential.returncode == 0, confidential.stderr
    assert json.loads(confidential.stdout)["client_secret"]

    for extra in (
        ["--public"],  # no redirect URI
        ["--redirect-uri", "http://app.example/callback"],  # http off loopback
        ["--redirect-uri", "https://app.example/callback#x"],  # fragment
        ["--redirect-uri", "javascript:alert(1)"],
        ["--public", "--redirect-uri", "https://app.example/cb", "--patient", "p1"],
    ):
        refused = _cli(
            database_url,
            "clients",
            "add",
            "--name",
            "bad",
            "--scope",
            "openid patient/*.rs",
            *extra,
            "--json",
        )
        assert refused.returncode == 2, (extra, refused.stdout, refused.stderr)
        assert not refused.stdout.strip() and "Traceback" not in refused.stderr
