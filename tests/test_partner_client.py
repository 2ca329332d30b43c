"""The partner side of referral delivery: bundle builder, credentials, partner HTTP client.

Against a real second carecoord (tests/partner_support.py ``partner_server``) for tokens,
transactions, reads and updates; against a misbehaving loopback server for failure classes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import email.utils
import json
import stat
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import asyncpg
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import FastAPI
from joserfc import jwt
from joserfc.jwk import ECKey

from app import db
from app.referrals.bundle import (
    escape_search_value,
    identifier_condition,
    identifier_for,
    identifier_system,
    referral_bundle,
)
from app.referrals.cli import add_partner_commands
from app.referrals.credentials import (
    CredentialsError,
    delete_credentials,
    list_partners,
    load_credentials,
    set_credentials,
)
from app.referrals.directory import Partner
from app.referrals.partner import SCOPE, DeliveryError, PartnerClient, parse_retry_after
from app.settings import Settings, get_settings
from tests.partner_support import (
    Close,
    Hang,
    MisbehavingServer,
    PartnerServer,
    Reply,
    RequestLog,
    Reset,
    free_port,
    misbehaving_server_fixture,  # noqa: F401  (fixture misbehaving_server)
    operation_outcome,
    partner_server_fixture,  # noqa: F401  (fixture partner_server)
    token_reply,
)

SOURCE = "http://source.test/fhir"
FHIR_JSON = {"content-type": "application/fhir+json"}


# --- the referral Bundle ---------------------------------------------------------------------------


def referral(suffix: str = "1") -> dict[str, Any]:
    """A referral's resources as stored at the source (ids, meta, references between them)."""
    patient = {
        "resourceType": "Patient",
        "id": f"pat-{suffix}",
        "meta": {"versionId": "3", "lastUpdated": "2026-01-01T00:00:00Z", "profile": ["http://p/Patient"]},
        "identifier": [{"system": "urn:oid:1.2.3", "value": f"MRN-{suffix}"}],
        "name": [{"family": "Rivera", "given": ["Ana"]}],
        "managingOrganization": {"reference": "Organization/source-org"},
    }
    consent = {
        "resourceType": "Consent",
        "id": f"consent-{suffix}",
        "status": "active",
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
            ]
        },
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IDSCL"}]}
        ],
        "patient": {"reference": f"Patient/pat-{suffix}"},
        "dateTime": "2026-01-02",
        "organization": [{"reference": "Organization/source-org"}],
        "sourceAttachment": {"title": "signed consent"},
    }
    condition = {
        "resourceType": "Condition",
        "id": f"cond-{suffix}",
        "clinicalStatus": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}
            ]
        },
        "code": {"text": "Food insecurity"},
        "subject": {"reference": f"{SOURCE}/Patient/pat-{suffix}"},
        "contained": [{"resourceType": "Practitioner", "id": "asserter", "name": [{"family": "Ng"}]}],
        "asserter": {"reference": "#asserter"},
    }
    service_request = {
        "resourceType": "ServiceRequest",
        "id": f"sr-{suffix}",
        "status": "active",
        "intent": "order",
        "code": {"text": "Food pantry application assistance"},
        "subject": {"reference": f"Patient/pat-{suffix}"},
        "supportingInfo": [{"reference": f"Consent/consent-{suffix}"}],
        "reasonReference": [{"reference": f"Condition/cond-{suffix}/_history/2"}],
        "requester": {"reference": "PractitionerRole/role-1", "display": "Case manager"},
        "performer": [{"reference": "https://elsewhere.example/fhir/Organization/x"}],
    }
    task = {
        "resourceType": "Task",
        "id": f"task-{suffix}",
        "meta": {"versionId": "1", "tag": [{"system": "urn:local", "code": "x"}]},
        "status": "requested",
        "intent": "order",
        "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]},
        "focus": {"reference": f"ServiceRequest/sr-{suffix}"},
        "for": {"reference": f"Patient/pat-{suffix}"},
        "authoredOn": "2026-01-02T10:00:00Z",
        "requester": {"reference": "PractitionerRole/role-1"},
        "owner": {"reference": "Organization/partner-org", "display": "Food bank"},
    }
    return {
        "task": task,
        "service_request": service_request,
        "patient": patient,
        "supporting": [consent, condition],
    }


def entries_by_type(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["resource"]["resourceType"]: entry for entry in bundle["entry"]}


def test_bundle_rewrites_references_between_bundled_resources() -> None:
    bundle = referral_bundle(**referral(), source_base=SOURCE)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    entries = entries_by_type(bundle)
    assert list(entries) == ["Patient", "Consent", "Condition", "ServiceRequest", "Task"]
    url = {kind: entry["fullUrl"] for kind, entry in entries.items()}
    assert all(value.startswith("urn:uuid:") for value in url.values())
    assert len(set(url.values())) == 5
    task = entries["Task"]["resource"]
    request = entries["ServiceRequest"]["resource"]
    assert task["for"] == {"reference": url["Patient"]}
    assert task["focus"] == {"reference": url["ServiceRequest"]}
    assert request["subject"] == {"reference": url["Patient"]}
    assert request["supportingInfo"] == [{"reference": url["Consent"]}]
    # A versioned reference to a bundled resource points at the copy (the version is the source's).
    assert request["reasonReference"] == [{"reference": url["Condition"]}]
    assert entries["Consent"]["resource"]["patient"] == {"reference": url["Patient"]}
    # An absolute reference to the source counts as the same resource.
    assert entries["Condition"]["resource"]["subject"] == {"reference": url["Patient"]}


def test_bundle_keeps_other_references_resolvable_at_the_source() -> None:
    entries = entries_by_type(referral_bundle(**referral(), source_base=SOURCE))
    task = entries["Task"]["resource"]
    request = entries["ServiceRequest"]["resource"]
    assert task["owner"] == {"reference": f"{SOURCE}/Organization/partner-org", "display": "Food bank"}
    assert task["requester"] == {"reference": f"{SOURCE}/PractitionerRole/role-1"}
    assert request["requester"] == {
        "reference": f"{SOURCE}/PractitionerRole/role-1",
        "display": "Case manager",
    }
    assert entries["Consent"]["resource"]["organization"] == [
        {"reference": f"{SOURCE}/Organization/source-org"}
    ]
    # Another server's URL and a contained reference stay as they are.
    assert request["performer"] == [{"reference": "https://elsewhere.example/fhir/Organization/x"}]
    condition = entries["Condition"]["resource"]
    assert condition["asserter"] == {"reference": "#asserter"}
    assert condition["contained"][0]["id"] == "asserter"


def test_bundle_lets_the_partner_recognise_itself_as_owner() -> None:
    """The owner is not sent; the reference to it carries its identifier and name."""
    owner = {
        "resourceType": "Organization",
        "id": "partner-org",
        "name": "Food bank",
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}],
    }
    bundle = referral_bundle(**referral(), source_base=SOURCE, directory={"Organization/partner-org": owner})
    task = entries_by_type(bundle)["Task"]["resource"]
    assert task["owner"] == {
        "reference": f"{SOURCE}/Organization/partner-org",
        "display": "Food bank",
        "identifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"},
    }


def test_bundle_entries_are_conditional_creates_on_carecoord_identifiers() -> None:
    bundle = referral_bundle(**referral(), source_base=SOURCE)
    system = identifier_system(SOURCE)
    assert system == f"{SOURCE}/referral-identifier"
    local_ids = {
        "Patient": "pat-1",
        "Consent": "consent-1",
        "Condition": "cond-1",
        "ServiceRequest": "sr-1",
        "Task": "task-1",
    }
    for entry in bundle["entry"]:
        resource = entry["resource"]
        kind = resource["resourceType"]
        ours = identifier_for(kind, local_ids[kind], SOURCE)
        assert ours == {"system": system, "value": f"{kind}/{local_ids[kind]}"}
        assert resource["identifier"][-1] == ours
        assert "id" not in resource
        assert entry["request"]["method"] == "POST"
        assert entry["request"]["url"] == kind
        condition = entry["request"]["ifNoneExist"]
        assert condition == identifier_condition(ours)
        # A query string: URL-decoding gives back identifier=system|value.
        assert parse_qs(condition) == {"identifier": [f"{system}|{kind}/{local_ids[kind]}"]}
    entries = entries_by_type(bundle)
    patient = entries["Patient"]["resource"]
    assert patient["identifier"][0] == {"system": "urn:oid:1.2.3", "value": "MRN-1"}  # kept
    # Server bookkeeping is dropped; what describes the content (profile) is kept.
    assert patient["meta"] == {"profile": ["http://p/Patient"]}
    assert "meta" not in entries["Task"]["resource"]


def test_bundle_is_pure_and_deterministic() -> None:
    resources = referral()
    before = copy.deepcopy(resources)
    first = referral_bundle(**resources, source_base=SOURCE)
    assert resources == before
    assert referral_bundle(**resources, source_base=SOURCE) == first
    # A resource already carrying carecoord's identifier is not given a second one.
    resources["patient"]["identifier"].append(identifier_for("Patient", "pat-1", SOURCE))
    again = entries_by_type(referral_bundle(**resources, source_base=SOURCE))["Patient"]["resource"]
    assert len(again["identifier"]) == 2
    # The same resource named twice (the patient among the supporting ones) is sent once.
    resources["supporting"].append(resources["patient"])
    assert len(referral_bundle(**resources, source_base=SOURCE)["entry"]) == 5


def test_bundle_rejects_an_inconsistent_referral() -> None:
    resources = referral()
    resources["task"]["for"] = {"reference": "Patient/someone-else"}
    with pytest.raises(ValueError, match=r"Task\.for"):
        referral_bundle(**resources, source_base=SOURCE)
    resources = referral()
    del resources["service_request"]["id"]
    with pytest.raises(ValueError, match="local id"):
        referral_bundle(**resources, source_base=SOURCE)
    resources = referral()
    resources["supporting"].append({"resourceType": "Provenance", "id": "p"})
    with pytest.raises(ValueError, match="Provenance"):
        referral_bundle(**resources, source_base=SOURCE)


def test_identifier_condition_escapes_search_specials() -> None:
    assert escape_search_value(r"a,b|c$d\e") == r"a\,b\|c\$d\\e"
    condition = identifier_condition({"system": "http://x/a|b", "value": "T/1,2"})
    assert condition == "identifier=" + "http%3A%2F%2Fx%2Fa%5C%7Cb%7CT%2F1%5C%2C2"
    assert unquote(condition.removeprefix("identifier=")) == r"http://x/a\|b|T/1\,2"


# --- credentials ------------------------------------------------------------------------------------


@pytest.fixture
def secret_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"secret_key": "test-secret-key", "delivery_timeout": 5.0})


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(db.asyncpg_dsn(database_url))
    try:
        yield connection
    finally:
        await connection.close()


def ec_pem(curve: ec.EllipticCurve | None = None) -> str:
    key = ec.generate_private_key(curve or ec.SECP384R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()


def rsa_pem(bits: int = 2048) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def new_endpoint_id() -> str:
    return f"ep-{uuid.uuid4().hex[:12]}"


async def test_client_secret_is_encrypted_at_rest(
    conn: asyncpg.Connection, secret_settings: Settings
) -> None:
    endpoint = new_endpoint_id()
    stored = await set_credentials(
        conn,
        secret_settings,
        endpoint_id=f"Endpoint/{endpoint}",
        token_url="https://partner.example/auth/token",
        client_id="carecoord",
        client_secret="s3cret-value",
    )
    assert stored.auth_method == "client_secret"
    assert "s3cret-value" not in repr(stored)
    row = await conn.fetchrow("SELECT * FROM partner_credentials WHERE endpoint_id = $1", endpoint)
    assert row["auth_method"] == "client_secret" and row["private_key_encrypted"] is None
    assert "s3cret" not in row["secret_encrypted"]
    loaded = await load_credentials(conn, secret_settings, endpoint)
    assert loaded is not None
    assert (loaded.client_secret, loaded.client_id, loaded.kid, loaded.alg) == (
        "s3cret-value",
        "carecoord",
        None,
        None,
    )
    # Another key cannot read it (and says so without revealing anything).
    other = secret_settings.model_copy(update={"secret_key": "another-key"})
    with pytest.raises(CredentialsError, match="cannot be decrypted"):
        await load_credentials(conn, other, endpoint)
    assert await load_credentials(conn, secret_settings, new_endpoint_id()) is None
    assert await delete_credentials(conn, endpoint)
    assert await load_credentials(conn, secret_settings, endpoint) is None


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
async def test_private_key_is_stored_as_pkcs8_and_encrypted(
    conn: asyncpg.Connection, secret_settings: Settings, alg: str
) -> None:
    endpoint = new_endpoint_id()
    pem = ec_pem() if alg == "ES384" else rsa_pem()
    await set_credentials(
        conn,
        secret_settings,
        endpoint_id=endpoint,
        token_url="https://partner.example/auth/token",
        client_id="carecoord",
        private_key_pem=pem,
        kid="k1",
        alg=alg,
    )
    row = await conn.fetchrow("SELECT * FROM partner_credentials WHERE endpoint_id = $1", endpoint)
    assert row["secret_encrypted"] is None and "PRIVATE KEY" not in row["private_key_encrypted"]
    loaded = await load_credentials(conn, secret_settings, endpoint)
    assert loaded is not None and loaded.auth_method == "private_key_jwt"
    assert (loaded.kid, loaded.alg) == ("k1", alg)
    assert loaded.private_key_pem is not None and loaded.private_key_pem.startswith(
        "-----BEGIN PRIVATE KEY-----"
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "exactly one"),
        ({"client_secret": "s", "private_key_pem": "x", "kid": "k"}, "exactly one"),
        ({"private_key_pem": "not a pem", "kid": "k"}, "not an unencrypted PEM"),
        ({"private_key_pem": "EC384", "kid": None}, "kid"),
        ({"private_key_pem": "EC256", "kid": "k"}, "P-384"),
        ({"private_key_pem": "RSA", "kid": "k", "alg": "ES384"}, "P-384"),
        ({"private_key_pem": "EC384", "kid": "k", "alg": "RS384"}, "RSA"),
        ({"private_key_pem": "EC384", "kid": "k", "alg": "HS256"}, "ES384 or RS384"),
        ({"client_secret": "s", "kid": "k"}, "kid goes with a private key"),
        ({"client_secret": "s", "token_url": "http://partner.example/token"}, "https"),
        ({"client_secret": "s", "endpoint_id": "Endpoint/a b"}, "FHIR id"),
    ],
)
async def test_invalid_credentials_are_refused(
    conn: asyncpg.Connection, secret_settings: Settings, arguments: dict[str, Any], message: str
) -> None:
    pems = {"EC384": ec_pem(), "EC256": ec_pem(ec.SECP256R1()), "RSA": rsa_pem()}
    values: dict[str, Any] = {
        "endpoint_id": new_endpoint_id(),
        "token_url": "https://partner.example/auth/token",
        "client_id": "carecoord",
        **arguments,
    }
    if values.get("private_key_pem") in pems:
        values["private_key_pem"] = pems[values["private_key_pem"]]
    with pytest.raises(CredentialsError, match=message):
        await set_credentials(conn, secret_settings, **values)


async def test_without_a_secret_key_a_key_file_is_created_0600(
    conn: asyncpg.Connection, settings: Settings, tmp_path: Path
) -> None:
    local = settings.model_copy(update={"data_dir": tmp_path / "data", "secret_key": None})
    endpoint = new_endpoint_id()
    await set_credentials(
        conn,
        local,
        endpoint_id=endpoint,
        token_url="http://127.0.0.1:1/token",
        client_id="c",
        client_secret="s",
    )
    key_file = tmp_path / "data" / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    content = key_file.read_bytes()
    loaded = await load_credentials(conn, local, endpoint)
    assert loaded is not None and loaded.client_secret == "s"
    assert key_file.read_bytes() == content  # reused, not replaced
    await delete_credentials(conn, endpoint)


# --- resolving partners --------------------------------------------------------------------------


def endpoint_resource(
    status: str = "active", code: str = "hl7-fhir-rest", address: str = "https://p.example/fhir/"
) -> dict[str, Any]:
    return {
        "resourceType": "Endpoint",
        "status": status,
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": code,
        },
        "payloadType": [{"text": "FHIR"}],
        "address": address,
    }


async def test_resolve_and_list_partners(
    client: httpx.AsyncClient, app: FastAPI, conn: asyncpg.Connection, secret_settings: Settings
) -> None:
    suffix = uuid.uuid4().hex[:8]
    endpoints = {
        f"off-{suffix}": endpoint_resource(status="off"),
        f"mllp-{suffix}": endpoint_resource(code="hl7v2-mllp", address="https://p.example/mllp"),
        f"rest-{suffix}": endpoint_resource(),
    }
    for endpoint_id, body in endpoints.items():
        response = await client.put(
            f"/fhir/Endpoint/{endpoint_id}", json={**body, "id": endpoint_id}, headers=FHIR_JSON
        )
        assert response.status_code == 201, response.text
    organization = {
        "resourceType": "Organization",
        "id": f"org-{suffix}",
        "name": "Food bank",
        "endpoint": [{"reference": f"Endpoint/{endpoint_id}"} for endpoint_id in endpoints],
    }
    response = await client.put(f"/fhir/Organization/org-{suffix}", json=organization, headers=FHIR_JSON)
    assert response.status_code == 201, response.text
    response = await client.put(
        f"/fhir/Organization/plain-{suffix}",
        json={"resourceType": "Organization", "id": f"plain-{suffix}", "name": "x"},
        headers=FHIR_JSON,
    )
    assert response.status_code == 201, response.text

    async with httpx.AsyncClient() as http:
        partners = PartnerClient(http, app.state.pool, secret_settings)
        expected = Partner(f"org-{suffix}", f"rest-{suffix}", "https://p.example/fhir")
        assert await partners.resolve(conn, f"org-{suffix}") == expected
        assert await partners.resolve(conn, f"Organization/org-{suffix}") == expected
        assert await partners.resolve(conn, f"plain-{suffix}") is None
        assert await partners.resolve(conn, "no-such-org") is None

    listed = [partner for partner in await list_partners(conn) if partner.organization_id == f"org-{suffix}"]
    assert [(p.name, p.endpoint_id, p.address, p.credentials) for p in listed] == [
        ("Food bank", f"rest-{suffix}", "https://p.example/fhir", None)
    ]
    await set_credentials(
        conn,
        secret_settings,
        endpoint_id=f"rest-{suffix}",
        token_url="https://p.example/auth/token",
        client_id="c",
        client_secret="s",
    )
    (listed_again,) = [p for p in await list_partners(conn) if p.organization_id == f"org-{suffix}"]
    assert listed_again.credentials == "client_secret"
    has_jobs = await conn.fetchval("SELECT to_regclass('job')") is not None
    assert (listed_again.pending, listed_again.failed, listed_again.delivered) == (
        (0, 0, 0) if has_jobs else (None,) * 3
    )
    assert listed_again.summary()["endpoint"] == f"Endpoint/rest-{suffix}"


def test_partners_cli(
    database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``carecoord partners set-credentials | list | remove-credentials`` (add_partner_commands)."""
    parser = argparse.ArgumentParser(prog="carecoord")
    add_partner_commands(parser.add_subparsers(dest="command", required=True))
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("CARECOORD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CARECOORD_SECRET_KEY", "cli-secret")
    get_settings.cache_clear()
    try:
        endpoint_id = new_endpoint_id()

        def run(*argv: str) -> int:
            args = parser.parse_args(argv)
            result: int = args.func(args)
            return result

        key_file = tmp_path / "key.pem"
        key_file.write_text(ec_pem())
        common = ["--token-url", "https://p.example/auth/token", "--client-id", "cc"]
        assert (
            run(
                "partners",
                "set-credentials",
                "--endpoint",
                f"Endpoint/{endpoint_id}",
                *common,
                "--client-secret",
                "x",
            )
            == 2
        )
        assert "create the Endpoint first" in capsys.readouterr().err

        async def add_endpoint() -> None:
            conn = await asyncpg.connect(db.asyncpg_dsn(database_url))
            try:
                await conn.execute(
                    "INSERT INTO resource (resource_type, fhir_id, version_id, last_updated, body)"
                    " VALUES ('Endpoint', $1, 1, now(), $2)",
                    endpoint_id,
                    json.dumps(endpoint_resource()),
                )
            finally:
                await conn.close()

        asyncio.run(add_endpoint())
        argv = ["partners", "set-credentials", "--endpoint", f"Endpoint/{endpoint_id}", *common]
        assert run(*argv, "--private-key-file", str(key_file), "--kid", "k1", "--alg", "ES384") == 0
        assert f"credentials set for Endpoint/{endpoint_id} (private_key_jwt)" in capsys.readouterr().out
        assert run(*argv, "--private-key-file", str(key_file), "--kid", "k1", "--alg", "RS384") == 2
        assert "RS384 needs an RSA private key" in capsys.readouterr().err
        assert run("partners", "list", "--json") == 0
        assert isinstance(json.loads(capsys.readouterr().out), list)
        assert run("partners", "remove-credentials", "--endpoint", f"Endpoint/{endpoint_id}") == 0
        assert run("partners", "remove-credentials", "--endpoint", f"Endpoint/{endpoint_id}") == 1
    finally:
        get_settings.cache_clear()


# --- against a real partner carecoord --------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[tuple[httpx.AsyncClient, RequestLog]]:
    log = RequestLog()
    async with httpx.AsyncClient(event_hooks={"request": [log]}) as client:
        yield client, log


async def partner_with_credentials(
    conn: asyncpg.Connection, settings: Settings, server: PartnerServer, method: str
) -> Partner:
    """A Partner for the real partner server, with credentials of ``method`` stored locally."""
    endpoint = new_endpoint_id()
    if method == "client_secret":
        client_id, secret = server.secret_client
        await set_credentials(
            conn,
            settings,
            endpoint_id=endpoint,
            token_url=server.token_url,
            client_id=client_id,
            client_secret=secret,
            address=server.fhir_base,
        )
    else:
        jwt_client = server.jwt_clients[method]
        await set_credentials(
            conn,
            settings,
            endpoint_id=endpoint,
            token_url=server.token_url,
            client_id=jwt_client.client_id,
            private_key_pem=jwt_client.private_key_pem,
            kid=jwt_client.kid,
            alg=method,
            address=server.fhir_base,
        )
    return Partner("partner-org", endpoint, server.fhir_base)


@pytest.mark.parametrize("method", ["client_secret", "ES384", "RS384"])
async def test_tokens_are_obtained_and_reused(
    partner_server: PartnerServer,
    conn: asyncpg.Connection,
    secret_settings: Settings,
    app: FastAPI,
    http: tuple[httpx.AsyncClient, RequestLog],
    method: str,
) -> None:
    client, log = http
    partner = await partner_with_credentials(conn, secret_settings, partner_server, method)
    partners = PartnerClient(client, app.state.pool, secret_settings)
    first = await partners.read(partner, "Patient?_count=1")
    assert first["resourceType"] == "Bundle"
    await partners.read(partner, f"{partner_server.fhir_base}/Task?_count=1")
    assert log.count(partner_server.token_url) == 1
    assert log.count(partner_server.fhir_base) == 2


async def test_a_refused_client_is_a_final_failure(
    partner_server: PartnerServer, conn: asyncpg.Connection, secret_settings: Settings, app: FastAPI
) -> None:
    endpoint = new_endpoint_id()
    await set_credentials(
        conn,
        secret_settings,
        endpoint_id=endpoint,
        token_url=partner_server.token_url,
        client_id=partner_server.secret_client[0],
        client_secret="wrong",
        address=partner_server.fhir_base,
    )
    async with httpx.AsyncClient() as client:
        partners = PartnerClient(client, app.state.pool, secret_settings)
        with pytest.raises(DeliveryError) as failure:
            await partners.read(Partner("o", endpoint, partner_server.fhir_base), "Patient")
    assert (failure.value.retryable, failure.value.status) == (False, 401)
    assert "invalid_client" in failure.value.message
    # No credentials at all: the partner's 401 is final too (there is no token to renew).
    async with httpx.AsyncClient() as client:
        partners = PartnerClient(client, app.state.pool, secret_settings)
        with pytest.raises(DeliveryError) as failure:
            await partners.read(Partner("o", new_endpoint_id(), partner_server.fhir_base), "Patient")
    assert (failure.value.retryable, failure.value.status) == (False, 401)


async def test_transaction_twice_creates_each_resource_once_then_read_and_update(
    partner_server: PartnerServer,
    conn: asyncpg.Connection,
    secret_settings: Settings,
    app: FastAPI,
    http: tuple[httpx.AsyncClient, RequestLog],
) -> None:
    client, log = http
    partner = await partner_with_credentials(conn, secret_settings, partner_server, "ES384")
    partners = PartnerClient(client, app.state.pool, secret_settings)
    suffix = uuid.uuid4().hex[:8]
    bundle = referral_bundle(**referral(suffix), source_base=SOURCE)

    first = await partners.transaction(partner, bundle)
    second = await partners.transaction(partner, bundle)
    assert first["type"] == second["type"] == "transaction-response"
    assert [entry["response"]["status"][:3] for entry in first["entry"]] == ["201"] * 5
    assert [entry["response"]["status"][:3] for entry in second["entry"]] == ["200"] * 5
    first_locations = [entry["response"]["location"].split("/_history")[0] for entry in first["entry"]]
    second_locations = [entry["response"]["location"].split("/_history")[0] for entry in second["entry"]]
    assert [loc.rsplit("/", 2)[-2:] for loc in first_locations] == [
        loc.rsplit("/", 2)[-2:] for loc in second_locations
    ]

    system = identifier_system(SOURCE)
    local = {
        "Patient": f"pat-{suffix}",
        "Consent": f"consent-{suffix}",
        "Condition": f"cond-{suffix}",
        "ServiceRequest": f"sr-{suffix}",
        "Task": f"task-{suffix}",
    }
    found: dict[str, dict[str, Any]] = {}
    for kind, local_id in local.items():
        result = await partners.read(partner, f"{kind}?identifier={system}|{kind}/{local_id}&_total=accurate")
        assert result["total"] == 1, kind
        found[kind] = result["entry"][0]["resource"]
    patient_ref = f"Patient/{found['Patient']['id']}"
    assert found["Task"]["for"]["reference"] == patient_ref
    assert found["Task"]["focus"]["reference"] == f"ServiceRequest/{found['ServiceRequest']['id']}"
    assert found["ServiceRequest"]["supportingInfo"][0]["reference"] == f"Consent/{found['Consent']['id']}"
    assert found["Task"]["owner"]["reference"] == f"{SOURCE}/Organization/partner-org"

    task_path = f"Task/{found['Task']['id']}"
    task = await partners.read(partner, task_path)
    assert task["meta"]["versionId"] == "1"
    task["status"] = "accepted"
    updated = await partners.update(partner, task_path, task, if_match='W/"1"')
    assert (updated["status"], updated["meta"]["versionId"]) == ("accepted", "2")
    with pytest.raises(DeliveryError) as stale:
        await partners.update(partner, task_path, task, if_match='W/"1"')
    assert (stale.value.status, stale.value.retryable) == (412, False)
    assert stale.value.outcome is not None and stale.value.outcome["resourceType"] == "OperationOutcome"
    assert log.count(partner_server.token_url) == 1

    # The partner's token goes to its own base only.
    with pytest.raises(DeliveryError, match="outside the partner's FHIR base") as outside:
        await partners.read(partner, "https://elsewhere.example/fhir/Task/1")
    assert not outside.value.retryable


# --- against a misbehaving partner -----------------------------------------------------------------


@pytest.fixture
def quick_settings(secret_settings: Settings) -> Settings:
    return secret_settings.model_copy(update={"delivery_timeout": 0.5})


async def misbehaving_partner(
    conn: asyncpg.Connection,
    settings: Settings,
    server: MisbehavingServer,
    *,
    method: str | None = "client_secret",
) -> Partner:
    endpoint = new_endpoint_id()
    if method == "client_secret":
        await set_credentials(
            conn,
            settings,
            endpoint_id=endpoint,
            token_url=server.url("/token"),
            client_id="cc id",
            client_secret="s&cret",
            address=server.url("/fhir"),
        )
    elif method is not None:
        await set_credentials(
            conn,
            settings,
            endpoint_id=endpoint,
            token_url=server.url("/token"),
            client_id="cc",
            private_key_pem=ec_pem(),
            kid="kid-1",
            alg="ES384",
            address=server.url("/fhir"),
        )
    server.script("/token", token_reply())
    return Partner("o", endpoint, server.url("/fhir"))


async def failure_of(partners: PartnerClient, partner: Partner, path: str = "Task/1") -> DeliveryError:
    with pytest.raises(DeliveryError) as failure:
        await partners.read(partner, path)
    return failure.value


async def test_failure_classification(
    misbehaving_server: MisbehavingServer, conn: asyncpg.Connection, quick_settings: Settings, app: FastAPI
) -> None:
    server = misbehaving_server
    partner = await misbehaving_partner(conn, quick_settings, server, method=None)
    in_a_minute = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    async with httpx.AsyncClient() as client:
        partners = PartnerClient(client, app.state.pool, quick_settings)

        server.script("/fhir/Task/1", Reply(500, operation_outcome("exception")))
        error = await failure_of(partners, partner)
        assert (error.retryable, error.status, error.retry_after) == (True, 500, None)
        assert error.outcome is not None

        server.script("/fhir/Task/1", Reply(429, headers={"Retry-After": "7"}))
        error = await failure_of(partners, partner)
        assert (error.retryable, error.status, error.retry_after) == (True, 429, 7.0)

        server.script("/fhir/Task/1", Reply(503, headers={"Retry-After": in_a_minute}))
        error = await failure_of(partners, partner)
        assert error.retryable and error.status == 503
        assert error.retry_after is not None and 50 < error.retry_after <= 60

        server.script("/fhir/Task/1", Reply(408))
        assert (await failure_of(partners, partner)).retryable

        server.script(
            "/fhir/Task/1", Reply(400, operation_outcome("invalid", "Task.for: patient 123 unknown"))
        )
        error = await failure_of(partners, partner)
        assert (error.retryable, error.status) == (False, 400)
        assert error.outcome == operation_outcome("invalid", "Task.for: patient 123 unknown")
        assert "123" not in error.message  # the short message never carries the partner's text

        server.script("/fhir/Task/1", Reply(404, b"not here"))
        error = await failure_of(partners, partner)
        assert (error.retryable, error.status, error.outcome) == (False, 404, None)

        server.script("/fhir/Task/1", Reply(200, b"<html>"))
        error = await failure_of(partners, partner)
        assert (error.retryable, error.status) == (False, 200)

        server.script("/fhir/Task/1", Hang(5))
        started = time.monotonic()
        error = await failure_of(partners, partner)
        assert error.retryable and error.status is None and "did not answer" in error.message
        assert time.monotonic() - started < 3

        server.script("/fhir/Task/1", Close())
        error = await failure_of(partners, partner)
        assert error.retryable and error.status is None

        server.script("/fhir/Task/1", Reset())
        assert (await failure_of(partners, partner)).retryable

        # (an Endpoint without credentials: with them, another address is refused before sending)
        refused = Partner("o", new_endpoint_id(), f"http://127.0.0.1:{free_port()}/fhir")
        error = await failure_of(partners, refused)
        assert error.retryable and "connection failed" in error.message

        bad_scheme = Partner("o", new_endpoint_id(), "ftp://127.0.0.1/fhir")
        assert not (await failure_of(partners, bad_scheme)).retryable


def test_retry_after_parsing() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


async def test_a_401_renews_the_token_once(
    misbehaving_server: MisbehavingServer, conn: asyncpg.Connection, quick_settings: Settings, app: FastAPI
) -> None:
    server = misbehaving_server
    partner = await misbehaving_partner(conn, quick_settings, server)
    server.script("/token", token_reply("first"), token_reply("second"), token_reply("third"))
    server.script("/fhir/Task/1", Reply(401), Reply(200, {"resourceType": "Task", "id": "1"}))
    async with httpx.AsyncClient() as client:
        partners = PartnerClient(client, app.state.pool, quick_settings)
        assert (await partners.read(partner, "Task/1"))["id"] == "1"
        sent = [request.headers["authorization"] for request in server.requests_to("/fhir/Task/1")]
        assert sent == ["Bearer first", "Bearer second"]

        # Refused again with the new token: final, after exactly one renewal.
        server.script("/fhir/Task/2", Reply(401))
        error = await failure_of(partners, partner, "Task/2")
        assert (error.retryable, error.status) == (False, 401)
        assert len(server.requests_to("/token")) == 3
        assert len(server.requests_to("/fhir/Task/2")) == 2


async def test_client_secret_basic_request(
    misbehaving_server: MisbehavingServer, conn: asyncpg.Connection, quick_settings: Settings, app: FastAPI
) -> None:
    server = misbehaving_server
    partner = await misbehaving_partner(conn, quick_settings, server)
    server.script("/fhir/Task/1", Reply(200, {"resourceType": "Task", "id": "1"}))
    async with httpx.AsyncClient() as client:
        partners = PartnerClient(client, app.state.pool, quick_settings)
        await partners.read(partner, "Task/1")
    (token_request,) = server.requests_to("/token")
    assert token_request.method == "POST"
    assert token_request.headers["content-type"] == "application/x-www-form-urlencoded"
    # RFC 6749 §2.3.1: client id and secret form-urlencoded, then Basic.
    basic = base64.b64decode(token_request.headers["authorization"].removeprefix("Basic ")).decode()
    assert basic == "cc+id:s%26cret"
    assert parse_qs(token_request.body.decode()) == {"grant_type": ["client_credentials"], "scope": [SCOPE]}
    (read,) = server.requests_to("/fhir/Task/1")
    assert read.headers["accept"] == "application/fhir+json"


async def test_private_key_jwt_assertion(
    misbehaving_server: MisbehavingServer, conn: asyncpg.Connection, quick_settings: Settings, app: FastAPI
) -> None:
    server = misbehaving_server
    partner = await misbehaving_partner(conn, quick_settings, server, method="ES384")
    # Tokens that expire at once: every request needs a new one (and a new assertion).
    server.script("/token", token_reply(expires_in=1))
    server.script("/fhir/Task/1", Reply(200, {"resourceType": "Task", "id": "1"}))
    credentials = await load_credentials(conn, quick_settings, partner.endpoint_id)
    assert credentials is not None and credentials.private_key_pem is not None
    public = ECKey.import_key(credentials.private_key_pem)
    async with httpx.AsyncClient() as client:
        partners = PartnerClient(client, app.state.pool, quick_settings)
        await partners.read(partner, "Task/1")
        await partners.read(partner, "Task/1")  # within the token's life (refreshed 0.2 s early)
        assert len(server.requests_to("/token")) == 1
        await asyncio.sleep(1.0)
        await partners.read(partner, "Task/1")
    jtis = set()
    for request in server.requests_to("/token"):
        form = {name: values[0] for name, values in parse_qs(request.body.decode()).items()}
        assert "authorization" not in request.headers
        assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        token = jwt.decode(form["client_assertion"], public, algorithms=["ES384"])
        assert token.header["kid"] == "kid-1" and token.header["alg"] == "ES384"
        claims = token.claims
        assert claims["iss"] == claims["sub"] == "cc"
        assert claims["aud"] == server.url("/token")
        assert 0 < claims["exp"] - time.time() <= 300
        jtis.add(claims["jti"])
    assert len(jtis) == 2


async def test_concurrent_requests_share_one_token(
    misbehaving_server: MisbehavingServer, conn: asyncpg.Connection, secret_settings: Settings, app: FastAPI
) -> None:
    # The usual partner timeout: this is about sharing the token, not about timeouts (0.5 s
    # failed on a loaded machine, where eight requests to a one-thread-per-request server queue).
    server = misbehaving_server
    partner = await misbehaving_partner(conn, secret_settings, server)
    server.script("/fhir/Task/1", Reply(200, {"resourceType": "Task", "id": "1"}))
    async with httpx.AsyncClient() as client:
        partners = PartnerClient(client, app.state.pool, secret_settings)
        await asyncio.gather(*(partners.read(partner, "Task/1") for _ in range(8)))
    assert len(server.requests_to("/token")) == 1
    assert len(server.requests_to("/fhir/Task/1")) == 8


@pytest.mark.parametrize(
    ("behaviour", "retryable", "status"),
    [
        (Reply(503), True, 503),
        (Reply(429, {"error": "slow_down"}, {"Retry-After": "3"}), True, 429),
        (Reply(400, {"error": "invalid_client", "error_description": "who are you"}), False, 400),
        (Reply(401, {"error": "invalid_client"}), False, 401),
        (Reply(200, {"token_type": "bearer"}), False, 200),
        (Hang(5), True, None),
        (Close(), True, None),
    ],
)
async def test_token_endpoint_failures(
    misbehaving_server: MisbehavingServer,
    conn: asyncpg.Connection,
    quick_settings: Settings,
    app: FastAPI,
    behaviour: Reply | Hang | Close,
    retryable: bool,
    status: int | None,
) -> None:
    server = misbehaving_server
    partner = await misbehaving_partner(conn, quick_settings, server)
    server.script("/token", behaviour)
    async with httpx.AsyncClient() as client:
        partners = PartnerClient(client, app.state.pool, quick_settings)
        error = await failure_of(partners, partner)
    assert (error.retryable, error.status) == (retryable, status)
    assert error.message.startswith("token endpoint")
    assert "who are you" not in error.message
    assert not server.requests_to("/fhir/Task/1")
    if isinstance(behaviour, Reply) and behaviour.status == 429:
        assert error.retry_after == 3.0
