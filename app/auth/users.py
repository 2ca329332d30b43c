"""People who sign in at /auth/authorize (SMART App Launch 2.x, app-launch.html): ``app_user``.

Each user is one FHIR resource (``fhir_user``: ``Practitioner/ID``, ``Patient/ID`` or
``RelatedPerson/ID``); their access tokens carry it as ``fhirUser`` (app/auth/tokens.py), which
app/fhir/access.py turns into what the token may see. Passwords are stored as salted scrypt
hashes (memory-hard: 16 MiB per check, app/auth/clients.py ``hash_secret``), never in clear.

Failed sign-ins are limited per user and per source address by :class:`LoginLimiter`, whose
counts live in PostgreSQL (``auth_login_failure``): every server process sees the same counts,
so N processes do not give an attacker N times the attempts, and a restart forgets nothing.
"""

from __future__ import annotations

import asyncio
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from app.auth.clients import hash_secret, verify_secret

FHIR_USER = re.compile(r"(?P<type>Practitioner|Patient|RelatedPerson)/(?P<id>[A-Za-z0-9\-.]{1,64})")
_USERNAME = re.compile(r"[A-Za-z0-9._@+\-]{1,128}")
MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024
_COLUMNS = "user_id, username, fhir_user, password_hash, disabled, created"


class UserError(ValueError):
    """The user command cannot be done (the message says why)."""


@dataclass(frozen=True)
class User:
    user_id: str
    username: str
    fhir_user: str
    password_hash: str | None
    disabled: bool
    created: datetime | None = None

    @property
    def kind(self) -> str:
        """``Practitioner``, ``Patient`` or ``RelatedPerson``."""
        return self.fhir_user.split("/", 1)[0]

    @property
    def resource_id(self) -> str:
        return self.fhir_user.split("/", 1)[1]

    def summary(self) -> dict[str, Any]:
        """What may be shown about a user (no password hash)."""
        return {
            "user_id": self.user_id,
            "username": self.username,
            "fhir_user": self.fhir_user,
            "disabled": self.disabled,
            "created": self.created.isoformat() if self.created else None,
        }


def _user(row: Mapping[str, Any]) -> User:
    return User(
        user_id=row["user_id"],
        username=row["username"],
        fhir_user=row["fhir_user"],
        password_hash=row["password_hash"],
        disabled=bool(row["disabled"]),
        created=row["created"],
    )


def check_password_rules(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password needs at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UserError(f"the password may have at most {MAX_PASSWORD_LENGTH} characters")


async def add_user(
    db: asyncpg.Pool | asyncpg.Connection, *, username: str, fhir_user: str, password: str
) -> User:
    if not _USERNAME.fullmatch(username):
        raise UserError("a username is 1-128 letters, digits or . _ @ + -")
    if not FHIR_USER.fullmatch(fhir_user):
        raise UserError("--fhir-user must be Practitioner/ID, Patient/ID or RelatedPerson/ID")
    check_password_rules(password)
    password_hash = await asyncio.to_thread(hash_secret, password)
    user_id = str(uuid.uuid4())
    row = await db.fetchrow(
        "INSERT INTO app_user (user_id, username, fhir_user, password_hash) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (username) DO NOTHING"
        " RETURNING user_id, username, fhir_user, password_hash, disabled, created",
        user_id,
        username,
        fhir_user,
        password_hash,
    )
    if row is None:
        raise UserError(f"there is already a user {username!r}")
    return _user(row)


async def get_user(db: asyncpg.Pool | asyncpg.Connection, user_id: str) -> User | None:
    row = await db.fetchrow(f"SELECT {_COLUMNS} FROM app_user WHERE user_id = $1", user_id)  # noqa: S608
    return _user(row) if row is not None else None


async def find_user(db: asyncpg.Pool | asyncpg.Connection, username: str) -> User | None:
    row = await db.fetchrow(f"SELECT {_COLUMNS} FROM app_user WHERE username = $1", username)  # noqa: S608
    return _user(row) if row is not None else None


async def list_users(db: asyncpg.Pool | asyncpg.Connection) -> list[User]:
    rows = await db.fetch(f"SELECT {_COLUMNS} FROM app_user ORDER BY username")  # noqa: S608
    return [_user(row) for row in rows]


async def set_disabled(db: asyncpg.Connection, username: str, *, disabled: bool = True) -> bool:
    """Disable (or enable) a user. Disabling also revokes their refresh tokens: their apps lose
    access when the current access token expires (CARECOORD_TOKEN_TTL)."""
    async with db.transaction():
        user_id = await db.fetchval(
            "UPDATE app_user SET disabled = $2 WHERE username = $1 RETURNING user_id", username, disabled
        )
        if user_id is None:
            return False
        if disabled:
            await revoke_user_tokens(db, user_id)
    return True


async def remove_user(db: asyncpg.Connection, username: str) -> bool:
    async with db.transaction():
        user_id = await db.fetchval("DELETE FROM app_user WHERE username = $1 RETURNING user_id", username)
        if user_id is None:
            return False
        await revoke_user_tokens(db, user_id)
        await db.execute("DELETE FROM auth_flow WHERE user_id = $1", user_id)
        await db.execute("DELETE FROM auth_code WHERE user_id = $1", user_id)
    return True


async def set_password(db: asyncpg.Connection, username: str, password: str) -> bool:
    """A new password; refresh tokens issued under the old one are revoked (a password is
    changed because it may be known to someone else)."""
    check_password_rules(password)
    password_hash = await asyncio.to_thread(hash_secret, password)
    async with db.transaction():
        user_id = await db.fetchval(
            "UPDATE app_user SET password_hash = $2 WHERE username = $1 RETURNING user_id",
            username,
            password_hash,
        )
        if user_id is None:
            return False
        await revoke_user_tokens(db, user_id)
    return True


async def revoke_user_tokens(db: asyncpg.Connection, user_id: str) -> None:
    await db.execute(
        "UPDATE auth_refresh_token SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL", user_id
    )


_DUMMY_HASH: str | None = None


async def check_password(user: User | None, password: str) -> bool:
    """Whether ``password`` is ``user``'s (and the user may sign in). An unknown or disabled
    user costs the same scrypt run, so that timing does not tell which usernames exist."""
    global _DUMMY_HASH
    stored = user.password_hash if user is not None and user.password_hash else None
    if stored is None:
        if _DUMMY_HASH is None:
            _DUMMY_HASH = await asyncio.to_thread(hash_secret, uuid.uuid4().hex)
        stored = _DUMMY_HASH
    if len(password) > MAX_PASSWORD_LENGTH:
        password = password[:MAX_PASSWORD_LENGTH]
    matches = await asyncio.to_thread(verify_secret, password, stored)
    return matches and user is not None and user.password_hash is not None and not user.disabled


class LoginLimiter:
    """Failed sign-ins per user and per address within a window, counted in PostgreSQL.

    RFC 6819 §4.4.3.6 / §5.1.4.2.3 (online guessing): after ``limit`` failures within ``window``
    seconds for a username, or from an address, sign-in for that username (or from that
    address) is refused until the oldest failure leaves the window, correct password included.
    A failure is recorded before the password is checked and taken back on success, so that
    concurrent guesses cannot all pass the check before the first failure is counted.
    """

    def __init__(self, pool: asyncpg.Pool, *, limit: int, window: int) -> None:
        self.pool = pool
        self.limit = limit
        self.window = window

    @staticmethod
    def keys(username: str, address: str | None) -> list[str]:
        keys = [f"user:{username.lower()[:128]}"]
        if address:
            keys.append(f"address:{address}")
        return keys

    async def retry_after(self, keys: list[str]) -> int | None:
        """Seconds until sign-in for these keys may be tried again, or None when not limited."""
        rows = await self.pool.fetch(
            "SELECT key, count(*) AS failures,"
            " extract(epoch FROM (min(at) + make_interval(secs => $3)) - now()) AS wait"
            " FROM (SELECT key, at, row_number() OVER (PARTITION BY key ORDER BY at DESC) AS n"
            "       FROM auth_login_failure"
            "       WHERE key = ANY($1::text[]) AND at > now() - make_interval(secs => $3)) recent"
            " WHERE n <= $2 GROUP BY key",
            keys,
            self.limit,
            float(self.window),
        )
        waits = [float(row["wait"]) for row in rows if row["failures"] >= self.limit]
        return max(1, math.ceil(max(waits))) if waits else None

    async def record_failure(self, keys: list[str]) -> list[int]:
        """Count an attempt against every key; returns the rows (to :meth:`forgive` on success)."""
        async with self.pool.acquire() as conn:
            ids: list[int] = [
                row["id"]
                for row in await conn.fetch(
                    "INSERT INTO auth_login_failure (key) SELECT unnest($1::text[]) RETURNING id", keys
                )
            ]
            # Old rows go as they are met; the table holds at most one window of failures.
            await conn.execute(
                "DELETE FROM auth_login_failure WHERE at < now() - make_interval(secs => $1)",
                float(self.window),
            )
        return ids

    async def forgive(self, ids: list[int]) -> None:
        await self.pool.execute("DELETE FROM auth_login_failure WHERE id = ANY($1::bigint[])", ids)


CASELOAD_SQL = """
WITH me(target_type, target_id) AS (
    SELECT $1::text, $2::text
    UNION
    SELECT 'PractitionerRole', role.fhir_id
    FROM search_reference ref
    JOIN resource role ON role.rid = ref.rid AND NOT role.deleted
    WHERE $1::text = 'Practitioner' AND ref.resource_type = 'PractitionerRole'
      AND ref.param = 'practitioner' AND ref.target_type = 'Practitioner' AND ref.target_id = $2
),
caseload(patient_id) AS (
    SELECT subject.target_id
    FROM search_reference participant
    JOIN search_reference subject ON subject.rid = participant.rid AND subject.resource_type = 'CareTeam'
        AND subject.param = 'subject' AND subject.target_type = 'Patient'
    JOIN search_token status ON status.rid = participant.rid AND status.resource_type = 'CareTeam'
        AND status.param = 'status' AND status.code = 'active'
    WHERE participant.resource_type = 'CareTeam' AND participant.param = 'participant'
      AND (participant.target_type, participant.target_id) IN (SELECT target_type, target_id FROM me)
    UNION
    SELECT patient.target_id
    FROM search_reference manager
    JOIN search_reference patient ON patient.rid = manager.rid AND patient.resource_type = 'EpisodeOfCare'
        AND patient.param = 'patient' AND patient.target_type = 'Patient'
    JOIN search_token status ON status.rid = manager.rid AND status.resource_type = 'EpisodeOfCare'
        AND status.param = 'status' AND status.code = 'active'
    WHERE manager.resource_type = 'EpisodeOfCare' AND manager.param = 'care-manager'
      AND (manager.target_type, manager.target_id) IN (SELECT target_type, target_id FROM me)
    UNION
    SELECT related.target_id
    FROM search_reference related
    JOIN resource person ON person.rid = related.rid AND NOT person.deleted
    WHERE $1::text = 'RelatedPerson' AND related.resource_type = 'RelatedPerson'
      AND related.param = 'patient' AND related.target_type = 'Patient' AND person.fhir_id = $2
)
SELECT p.fhir_id, p.body
FROM caseload c
JOIN resource p ON p.resource_type = 'Patient' AND p.fhir_id = c.patient_id AND NOT p.deleted
ORDER BY p.fhir_id
LIMIT $3
"""
"""The patients a user may pick at launch (SMART ``launch/patient``): for a Practitioner, the
subjects of active CareTeams in which they (or one of their PractitionerRoles) participate and
the patients of active EpisodesOfCare they are the care manager of; for a RelatedPerson, the
patient they are related to. Computed over the search index (current versions only)."""

MAX_CASELOAD = 500


@dataclass(frozen=True)
class CaseloadPatient:
    patient_id: str
    name: str
    birth_date: str | None


def _display_name(body: Mapping[str, Any]) -> str:
    for name in body.get("name") or []:
        if not isinstance(name, dict):
            continue
        if isinstance(name.get("text"), str):
            return str(name["text"])
        given = " ".join(part for part in name.get("given") or [] if isinstance(part, str))
        family = name.get("family") if isinstance(name.get("family"), str) else ""
        text = f"{given} {family}".strip()
        if text:
            return text
    return "(no name recorded)"


async def caseload(db: asyncpg.Pool | asyncpg.Connection, fhir_user: str) -> list[CaseloadPatient]:
    """The patients ``fhir_user`` may choose at launch (see :data:`CASELOAD_SQL`)."""
    import json

    match = FHIR_USER.fullmatch(fhir_user)
    if match is None or match["type"] == "Patient":
        return []
    rows = await db.fetch(CASELOAD_SQL, match["type"], match["id"], MAX_CASELOAD)
    found = []
    for row in rows:
        body = json.loads(row["body"]) if row["body"] else {}
        birth_date = body.get("birthDate") if isinstance(body.get("birthDate"), str) else None
        found.append(CaseloadPatient(row["fhir_id"], _display_name(body), birth_date))
    return found
