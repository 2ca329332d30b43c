"""Partner credentials (``partner_credentials``): how carecoord authenticates to partners.

A partner's FHIR server is reached through a local Endpoint (standards.md §1.1, Direct
pattern: the source POSTs the referral to the target). Per Endpoint, carecoord keeps one of

* a client secret: OAuth 2.0 ``client_credentials`` (RFC 6749 §4.4) authenticated with
  ``client_secret_basic`` (§2.3.1);
* a private key: SMART Backend Services ``private_key_jwt`` (RFC 7523 §2.2), ES384 on P-384 or
  RS384 with a 2048-bit or larger RSA key, and the ``kid`` the partner registered it under.

No row means the partner takes unauthenticated requests. Secrets and private keys are
encrypted at rest with Fernet (AES-128-CBC + HMAC-SHA256); the key is SHA-256 of
``settings.secret_key`` (``CARECOORD_SECRET_KEY``), or, when that is unset, of a random secret
created once in ``{data_dir}/secret.key`` (mode 0600).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import asyncpg
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from app.jobs import queue
from app.referrals import jobs as referral_jobs
from app.referrals.directory import find_partner
from app.settings import Settings

AuthMethod = Literal["client_secret", "private_key_jwt"]
ASSERTION_ALGS = ("ES384", "RS384")
MIN_RSA_BITS = 2048
SECRET_KEY_FILE = "secret.key"  # noqa: S105  (a file name, not a secret)

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_COLUMNS = (
    "endpoint_id, token_url, client_id, auth_method, secret_encrypted, private_key_encrypted,"
    " kid, alg, address, updated"
)
_UPSERT = f"""
INSERT INTO partner_credentials ({_COLUMNS})
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now())
ON CONFLICT (endpoint_id) DO UPDATE SET
    token_url = EXCLUDED.token_url,
    client_id = EXCLUDED.client_id,
    auth_method = EXCLUDED.auth_method,
    secret_encrypted = EXCLUDED.secret_encrypted,
    private_key_encrypted = EXCLUDED.private_key_encrypted,
    kid = EXCLUDED.kid,
    alg = EXCLUDED.alg,
    address = EXCLUDED.address,
    updated = now()
"""  # noqa: S608  (fixed column list; every value is a bind parameter)
_ENDPOINT_ADDRESS = (
    "SELECT rtrim(body::jsonb ->> 'address', '/') FROM resource"
    " WHERE resource_type = 'Endpoint' AND fhir_id = $1 AND NOT deleted"
)

# Job states (app/jobs/table.py) -> the delivery-health column they count in.
_HEALTH_COLUMNS = {
    "pending": "pending",
    "leased": "pending",
    "paused": "paused",
    "failed": "failed",
    "delivered": "delivered",
    "done": "delivered",
}


class CredentialsError(ValueError):
    """Credentials that cannot be stored or used (the message says why; it never holds a secret)."""


@dataclass(frozen=True)
class PartnerCredentials:
    """Decrypted credentials of one partner Endpoint; secrets stay out of ``repr``."""

    endpoint_id: str
    token_url: str
    client_id: str
    auth_method: AuthMethod
    client_secret: str | None = field(default=None, repr=False)
    private_key_pem: str | None = field(default=None, repr=False)
    kid: str | None = None
    alg: str | None = None
    address: str | None = None
    """The Endpoint address these credentials were set or confirmed for: they are used for no
    other (a token must not follow an Endpoint whose address someone changed, issue 15)."""
    updated: datetime | None = None


@dataclass(frozen=True)
class PartnerSummary:
    """One partner Organization with its FHIR REST Endpoint, for ``carecoord partners list``.

    ``pending``/``failed``/``delivered`` count the partner's referral delivery jobs; None while
    the ``job`` table does not exist.
    """

    organization_id: str
    name: str | None
    endpoint_id: str
    address: str
    credentials: AuthMethod | None
    confirmed_address: str | None = None
    """The address the credentials are bound to (None without credentials)."""
    pending: int | None = None
    failed: int | None = None
    delivered: int | None = None
    paused: int | None = None

    @property
    def address_changed(self) -> bool:
        """Credentials exist, but the Endpoint's address is not the one they were confirmed for:
        deliveries wait for ``carecoord partners confirm``."""
        return self.credentials is not None and self.confirmed_address != self.address

    def summary(self) -> dict[str, Any]:
        return {
            "organization": f"Organization/{self.organization_id}",
            "name": self.name,
            "endpoint": f"Endpoint/{self.endpoint_id}",
            "address": self.address,
            "credentials": self.credentials,
            "confirmed_address": self.confirmed_address,
            "address_changed": self.address_changed,
            "pending": self.pending,
            "paused": self.paused,
            "failed": self.failed,
            "delivered": self.delivered,
        }


# --- encryption at rest ------------------------------------------------------------------------


def _key_material(settings: Settings) -> bytes:
    """``settings.secret_key``, else the secret in ``{data_dir}/secret.key`` (created 0600 once)."""
    if settings.secret_key:
        return settings.secret_key.encode("utf-8")
    path = Path(settings.data_dir) / SECRET_KEY_FILE
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_urlsafe(32).encode("ascii")
    try:
        # O_EXCL: two processes starting together must not each write (and use) their own secret.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret + b"\n")
    return secret


def fernet(settings: Settings) -> Fernet:
    """The Fernet key of partner secrets: urlsafe base64 of SHA-256 of the key material."""
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(_key_material(settings)).digest()))


def _decrypt(box: Fernet, token: str, endpoint_id: str) -> str:
    try:
        return box.decrypt(token.encode("ascii")).decode("utf-8")
    except (InvalidToken, UnicodeError) as exc:
        raise CredentialsError(
            f"the credentials of Endpoint/{endpoint_id} cannot be decrypted (was the secret key changed?)"
        ) from exc


# --- validation ----------------------------------------------------------------------------------


def endpoint_id_of(value: str) -> str:
    """``Endpoint/ID`` or ``ID`` -> ``ID`` (a valid FHIR id, R4 datatypes.html#id)."""
    endpoint_id = value.removeprefix("Endpoint/")
    if not _FHIR_ID.fullmatch(endpoint_id):
        raise CredentialsError("the endpoint must be Endpoint/ID with a FHIR id")
    return endpoint_id


def _check_token_url(token_url: str) -> None:
    """An absolute http(s) URL; plain http only to a loopback host (the secret travels in it)."""
    parts = urlsplit(token_url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.fragment:
        raise CredentialsError("the token URL must be an absolute https URL without a fragment")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise CredentialsError("the token URL must use https (plain http only for a loopback host)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalize_private_key(private_key_pem: str, alg: str) -> str:
    """The key as unencrypted PKCS#8 PEM, checked against ``alg`` (SMART Backend Services:
    ES384 is ECDSA on P-384, RS384 is RSASSA-PKCS1-v1_5 with SHA-384, RFC 7518 §3.1)."""
    if alg not in ASSERTION_ALGS:
        raise CredentialsError("alg must be ES384 or RS384")
    try:
        key = serialization.load_pem_private_key(private_key_pem.encode("utf-8"), password=None)
    except (ValueError, TypeError) as exc:
        # TypeError: the PEM is password-protected; carecoord stores keys unencrypted (encrypted at rest).
        raise CredentialsError("the private key is not an unencrypted PEM private key") from exc
    if alg == "ES384":
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
            raise CredentialsError("ES384 needs an EC private key on the P-384 curve")
    elif not isinstance(key, rsa.RSAPrivateKey) or key.key_size < MIN_RSA_BITS:
        raise CredentialsError(f"RS384 needs an RSA private key of at least {MIN_RSA_BITS} bits")
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


# --- storage ---------------------------------------------------------------------------------------


async def set_credentials(
    conn: asyncpg.Connection,
    settings: Settings,
    *,
    endpoint_id: str,
    token_url: str,
    client_id: str,
    client_secret: str | None = None,
    private_key_pem: str | None = None,
    kid: str | None = None,
    alg: str = "ES384",
    address: str | None = None,
) -> PartnerCredentials:
    """Store (replace) the credentials of a partner Endpoint: exactly one of a client secret
    (``client_secret_basic``) or a private key with its ``kid`` (``private_key_jwt``).

    They are bound to ``address`` (default: the Endpoint's address now) and used for no other.
    """
    endpoint_id = endpoint_id_of(endpoint_id)
    if address is None:
        address = await conn.fetchval(_ENDPOINT_ADDRESS, endpoint_id)
    else:
        address = address.rstrip("/")
    _check_token_url(token_url)
    if not client_id.strip():
        raise CredentialsError("a client id is required")
    if (client_secret is None) == (private_key_pem is None):
        raise CredentialsError("give exactly one of a client secret or a private key")
    box = fernet(settings)
    if client_secret is not None:
        if not client_secret:
            raise CredentialsError("the client secret is empty")
        if kid is not None:
            raise CredentialsError("a kid goes with a private key, not with a client secret")
        credentials = PartnerCredentials(
            endpoint_id, token_url, client_id, "client_secret", client_secret=client_secret, address=address
        )
        secret_encrypted: str | None = box.encrypt(client_secret.encode("utf-8")).decode("ascii")
        key_encrypted: str | None = None
        stored_alg: str | None = None
    else:
        assert private_key_pem is not None
        if not kid:
            raise CredentialsError("a private key needs the kid the partner registered it under")
        pem = normalize_private_key(private_key_pem, alg)
        credentials = PartnerCredentials(
            endpoint_id,
            token_url,
            client_id,
            "private_key_jwt",
            private_key_pem=pem,
            kid=kid,
            alg=alg,
            address=address,
        )
        secret_encrypted = None
        key_encrypted = box.encrypt(pem.encode("ascii")).decode("ascii")
        stored_alg = alg
    await conn.execute(
        _UPSERT,
        endpoint_id,
        token_url,
        client_id,
        credentials.auth_method,
        secret_encrypted,
        key_encrypted,
        credentials.kid,
        stored_alg,
        address,
    )
    await resume_paused(conn, endpoint_id)
    return credentials


async def confirm_address(conn: asyncpg.Connection, endpoint_id: str) -> str | None:
    """Bind a partner Endpoint's credentials to the Endpoint's current address (an operator has
    checked the change) and resume the deliveries that waited for it; the address, or None
    when the Endpoint has no credentials (or no longer exists)."""
    endpoint_id = endpoint_id_of(endpoint_id)
    address: str | None = await conn.fetchval(
        f"UPDATE partner_credentials SET address = ({_ENDPOINT_ADDRESS}), updated = now()"  # noqa: S608
        " WHERE endpoint_id = $1 RETURNING address",
        endpoint_id,
    )
    if address is not None:
        await resume_paused(conn, endpoint_id)
    return address


async def resume_paused(conn: asyncpg.Connection, endpoint_id: str) -> None:
    """Referral jobs paused because the Endpoint's address changed become due again."""
    if not await queue.installed(conn):
        return
    await queue.resume(conn, "partner_endpoint", endpoint_id, kinds=referral_jobs.KINDS)


async def load_credentials(
    conn: asyncpg.Connection | asyncpg.Pool, settings: Settings, endpoint_id: str
) -> PartnerCredentials | None:
    """The decrypted credentials of a partner Endpoint, or None (it takes unauthenticated requests)."""
    endpoint_id = endpoint_id.removeprefix("Endpoint/")
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM partner_credentials WHERE endpoint_id = $1",  # noqa: S608
        endpoint_id,
    )
    if row is None:
        return None
    box = fernet(settings)
    method: AuthMethod = "client_secret" if row["auth_method"] == "client_secret" else "private_key_jwt"
    return PartnerCredentials(
        endpoint_id=row["endpoint_id"],
        token_url=row["token_url"],
        client_id=row["client_id"],
        auth_method=method,
        client_secret=(
            _decrypt(box, row["secret_encrypted"], endpoint_id) if row["secret_encrypted"] else None
        ),
        private_key_pem=(
            _decrypt(box, row["private_key_encrypted"], endpoint_id) if row["private_key_encrypted"] else None
        ),
        kid=row["kid"],
        alg=row["alg"],
        address=row["address"],
        updated=row["updated"],
    )


async def delete_credentials(conn: asyncpg.Connection, endpoint_id: str) -> bool:
    """Forget a partner Endpoint's credentials; False when it had none."""
    status: str = await conn.execute(
        "DELETE FROM partner_credentials WHERE endpoint_id = $1", endpoint_id.removeprefix("Endpoint/")
    )
    return status != "DELETE 0"


async def list_partners(conn: asyncpg.Connection) -> list[PartnerSummary]:
    """Every Organization with an active FHIR REST Endpoint (a delivery target, see
    app/referrals/directory.py), whether credentials are set (and for which address), and the
    health of its deliveries."""
    organizations = await conn.fetch(
        "SELECT fhir_id, body FROM resource WHERE resource_type = 'Organization' AND NOT deleted"
        " AND body::jsonb ? 'endpoint' ORDER BY fhir_id"
    )
    credentials = {
        row["endpoint_id"]: (row["auth_method"], row["address"])
        for row in await conn.fetch("SELECT endpoint_id, auth_method, address FROM partner_credentials")
    }
    health = await _job_health(conn)
    partners: list[PartnerSummary] = []
    for row in organizations:
        found = await find_partner(conn, row["fhir_id"])
        if found is None:
            continue
        name = json.loads(row["body"]).get("name")
        counts = health.get(found.endpoint_id, {}) if health is not None else None
        method, confirmed = credentials.get(found.endpoint_id, (None, None))
        partners.append(
            PartnerSummary(
                organization_id=found.organization_id,
                name=name if isinstance(name, str) else None,
                endpoint_id=found.endpoint_id,
                address=found.base_url,
                credentials=method,
                confirmed_address=confirmed,
                pending=None if counts is None else counts.get("pending", 0),
                paused=None if counts is None else counts.get("paused", 0),
                failed=None if counts is None else counts.get("failed", 0),
                delivered=None if counts is None else counts.get("delivered", 0),
            )
        )
    return partners


async def _job_health(conn: asyncpg.Connection) -> dict[str, dict[str, int]] | None:
    """Referral job counts per partner endpoint id; None before the job table exists."""
    if not await queue.installed(conn):
        return None
    # Deliveries only: each referral also has tracking (and maybe cancellation) jobs.
    per_endpoint = await queue.counts(conn, referral_jobs.DELIVER, "partner_endpoint")
    health: dict[str, dict[str, int]] = {}
    for endpoint, states in per_endpoint.items():
        counts = health.setdefault(endpoint.removeprefix("Endpoint/"), {})
        for state, n in states.items():
            column = _HEALTH_COLUMNS.get(state)
            if column is not None:
                counts[column] = counts.get(column, 0) + n
    return health
