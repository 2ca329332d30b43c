"""SMART App Launch standalone launch (issue 11): sign-in pages, consent, the patient picker, the
authorization code and refresh token grants, revocation, discovery and audit, driven over HTTP by
following the forms, with a real loopback redirect target receiving the code."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from joserfc import jwt
from joserfc.jwk import KeySet

from app.auth.clients import register_client
from app.auth.users import add_user
from app.main import create_app
from app.settings import Settings
from tests.conftest import BASE_URL, FHIR, bearer
from tests.server_support import running_server
from tests.smart_support import (
    CodeReceiver,
    authorize_query,
    code_receiver,
    follow_to_receiver,
    form_with,
    pkce_pair,
    post_form,
    read_page,
    sign_in,
)

PASSWORD = "correct horse battery staple"
APP_SCOPE = "openid fhirUser launch/patient offline_access online_access patient/*.rs user/*.rs"
FHIR_JSON = {"content-type": "application/fhir+json", "accept": "application/fhir+json"}


@pytest.fixture(scope="module")
async def smart_app(settings: Settings) -> AsyncIterator[FastAPI]:
    """Limits high enough for the failures this module provokes on purpose (the rate limit
    test runs its own servers with a low one)."""
    app = create_app(
        settings.model_copy(update={"auth_failure_limit": 10_000, "login_failure_limit": 10_000})
    )
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture(scope="module")
def receiver() -> Iterator[CodeReceiver]:
    with code_receiver() as running:
        yield running


@pytest.fixture
async def browser(smart_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A fresh cookie jar per test, as one browser."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=smart_app), base_url=BASE_URL) as http:
        yield http


def _suffix() -> str:
    return uuid.uuid4().hex[:10]


async def _put(app: FastAPI, resource: dict[str, Any]) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as http:
        response = await http.put(
            f"/fhir/{resource['resourceType']}/{resource['id']}",
            json=resource,
            headers={**FHIR_JSON, **await bearer(app)},
        )
        assert response.status_code in (200, 201), response.text


@pytest.fixture
async def world(smart_app: FastAPI, receiver: CodeReceiver) -> dict[str, str]:
    """A practitioner with a caseload (A by a CareTeam their PractitionerRole is on, B as care
    manager of an EpisodeOfCare; C on an inactive team and D on someone else's are not), a patient
    user (A) and a public app client."""
    s = _suffix()
    ids = {name: f"{name}-{s}" for name in ("pr", "role", "a", "b", "c", "d", "other")}
    await _put(smart_app, {"resourceType": "Practitioner", "id": ids["pr"], "name": [{"family": "Okafor"}]})
    await _put(smart_app, {"resourceType": "Practitioner", "id": ids["other"]})
    await _put(
        smart_app,
        {
            "resourceType": "PractitionerRole",
            "id": ids["role"],
            "practitioner": {"reference": f"Practitioner/{ids['pr']}"},
        },
    )
    for key, family in (("a", "Anand"), ("b", "Baptiste"), ("c", "Castillo"), ("d", "Dubois")):
        await _put(
            smart_app,
            {"resourceType": "Patient", "id": ids[key], "name": [{"family": family, "given": ["Sam"]}]},
        )
    await _put(
        smart_app,
        {
            "resourceType": "CareTeam",
            "id": f"team-a-{s}",
            "status": "active",
            "subject": {"reference": f"Patient/{ids['a']}"},
            "participant": [{"member": {"reference": f"PractitionerRole/{ids['role']}"}}],
        },
    )
    await _put(
        smart_app,
        {
            "resourceType": "EpisodeOfCare",
            "id": f"episode-b-{s}",
            "status": "active",
            "patient": {"reference": f"Patient/{ids['b']}"},
            "careManager": {"reference": f"Practitioner/{ids['pr']}"},
        },
    )
    await _put(
        smart_app,
        {
            "resourceType": "CareTeam",
            "id": f"team-c-{s}",
            "status": "inactive",
            "subject": {"reference": f"Patient/{ids['c']}"},
            "participant": [{"member": {"reference": f"Practitioner/{ids['pr']}"}}],
        },
    )
    await _put(
        smart_app,
        {
            "resourceType": "CareTeam",
            "id": f"team-d-{s}",
            "status": "active",
            "subject": {"reference": f"Patient/{ids['d']}"},
            "participant": [{"member": {"reference": f"Practitioner/{ids['other']}"}}],
        },
    )
    pool = smart_app.state.pool
    await add_user(pool, username=f"okafor-{s}", fhir_user=f"Practitioner/{ids['pr']}", password=PASSWORD)
    await add_user(pool, username=f"anand-{s}", fhir_user=f"Patient/{ids['a']}", password=PASSWORD)
    client_id, secret = await register_client(
        pool,
        name="Care plan app",
        scope=APP_SCOPE,
        redirect_uris=[receiver.redirect_uri, "org.example.careplan:/callback"],
        public=True,
    )
    assert secret is None
    return {
        **ids,
        "client_id": client_id,
        "practitioner_user": f"okafor-{s}",
        "patient_user": f"anand-{s}",
    }


def _query(world: dict[str, str], receiver: CodeReceiver, challenge: str, **extra: str) -> dict[str, str]:
    return authorize_query(
        client_id=world["client_id"],
        redirect_uri=receiver.redirect_uri,
        scope=extra.pop("scope", APP_SCOPE),
        aud=FHIR,
        challenge=challenge,
        state=extra.pop("state", f"st-{_suffix()}"),
        **extra,
    )


async def _exchange(
    http: httpx.AsyncClient, world: dict[str, str], receiver: CodeReceiver, code: str, verifier: str
) -> httpx.Response:
    return await http.post(
        "/auth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": receiver.redirect_uri,
            "client_id": world["client_id"],
            "code_verifier": verifier,
        },
    )


async def _code(
    browser: httpx.AsyncClient,
    world: dict[str, str],
    receiver: CodeReceiver,
    *,
    user: str = "practitioner_user",
    patient: str | None = "a",
    **extra: str,
) -> tuple[str, str, str]:
    """Sign in and approve; (code, verifier, state) as received by the redirect target."""
    verifier, challenge = pkce_pair()
    query = _query(world, receiver, challenge, **extra)
    response = await sign_in(
        browser,
        query,
        username=world[user],
        password=PASSWORD,
        patient=world[patient] if patient else None,
    )
    await follow_to_receiver(response)
    got = receiver.last()
    assert got["state"] == query["state"]
    return got["code"], verifier, query["state"]


# --- the whole flow ------------------------------------------------------------------------------


async def test_practitioner_signs_in_picks_from_caseload_consents_and_uses_the_token(
    smart_app: FastAPI, browser: httpx.AsyncClient, world: dict[str, str], receiver: CodeReceiver
) -> None:
    verifier, challenge = pkce_pair()
    query = _query(world, receiver, challenge, nonce="n-123")
    page = await browser.get("/auth/authorize", params=query)
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src" not in csp and "default-src 'none'" in csp
    assert f"form-action 'self' {receiver.base}" in csp
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "DENY"
    reader = read_page(page.text)
    login = form_with(reader, "password")
    assert login.method == "post"
    assert {item["name"] for item in login.inputs} >= {"username", "password", "csrf_token", "flow"}
    assert reader.labels["username"] == "Username" and reader.labels["password"] == "Password"
    assert "<script" not in page.text

    picker_page = await post_form(
        browser, str(page.url), login, username=world["practitioner_user"], password=PASSWORD
    )
    assert picker_page.status_code == 200, picker_page.text
    picker = form_with(read_page(picker_page.text), "patient")
    offered = {item["value"] for item in picker.inputs if item.get("name") == "patient"}
    assert offered == {world["a"], world["b"]}  # not C (inactive team), not D (someone else's)
    assert all(item["type"] == "radio" for item in picker.inputs if item.get("name") == "patient")

    refused = await post_form(browser, str(picker_page.url), picker, patient=world["d"])
    assert refused.status_code == 400  # not in the caseload
    consent_page = await post_form(browser, str(picker_page.url), picker, patient=world["b"])
    assert consent_page.status_code == 200
    consent_reader = read_page(consent_page.text)
    consent = form_with(consent_reader, "decision")
    assert {b["value"] for b in consent.buttons if b.get("name") == "decision"} == {"approve", "deny"}
    text = " ".join(consent_reader.text)
    for scope in APP_SCOPE.split():
        assert scope in text, scope
    assert "Read and search all kinds of records of the chosen patient" in text
    assert "Keep access when you are not using the app" in text

    redirect = await post_form(browser, str(consent_page.url), consent, decision="approve")
    assert redirect.status_code == 303
    assert redirect.headers["location"].startswith(receiver.redirect_uri + "?")
    await follow_to_receiver(redirect)
    got = receiver.last()
    assert got["state"] == query["state"] and got["code"]

    token = await _exchange(browser, world, receiver, got["code"], verifier)
    assert token.status_code == 200, token.text
    assert token.headers["cache-control"] == "no-store"
    body = token.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] > 0
    assert body["patient"] == world["b"]
    assert set(body["scope"].split()) == set(APP_SCOPE.split())
    assert body["refresh_token"]
    keys = KeySet.import_key_set((await browser.get("/auth/jwks")).json())
    decoded = jwt.decode(body["id_token"], keys, algorithms=["RS256"])
    # OpenID Connect Discovery §3 / SMART: id_tokens are RS256, which relying parties must accept.
    assert decoded.header["alg"] == "RS256"
    id_token = decoded.claims
    assert id_token["iss"] == BASE_URL and id_token["aud"] == world["client_id"]
    assert id_token["fhirUser"] == f"{FHIR}/Practitioner/{world['pr']}"
    assert id_token["nonce"] == "n-123"
    access = jwt.decode(body["access_token"], keys).claims
    assert access["fhirUser"] == f"Practitioner/{world['pr']}" and access["patient"] == world["b"]

    headers = {"authorization": f"Bearer {body['access_token']}", "accept": "application/fhir+json"}
    read = await browser.get(f"/fhir/Patient/{world['b']}", headers=headers)
    assert read.status_code == 200, read.text
    assert read.json()["name"][0]["family"] == "Baptiste"


async def test_patient_user_gets_their_own_context_without_a_picker(
    browser: httpx.AsyncClient, world: dict[str, str], receiver: CodeReceiver
) -> None:
    code, verifier, _ = await _code(
        browser, world, receiver, user="patient_user", patient=None, scope="openid fhirUser patient/*.rs"
    )
    body = (await _exchange(browser, world, receiver, code, verifier)).json()
    assert body["patient"] == world["a"]
    assert "refresh_token" not in body  # neither offline_access nor online_access asked for
    headers = {"authorization": f"Bearer {body['access_token']}", "accept": "application/fhir+json"}
    assert (await browser.get(f"/fhir/Patient/{world['a']}", headers=headers)).status_code == 200
    assert (await browser.get(f"/fhir/Patient/{world['b']}", headers=headers)).status_code == 404


async def test_practitioner_without_launch_patient_gets_no_patient_scopes(
    browser: httpx.AsyncClient, world: dict[str, str], receiver: CodeReceiver
) -> None:
    code, verifier, _ = await _code(
        browser, world, receiver, patient=None, scope="openid fhirUser user/*.rs patient/*.rs"
    )
    body = (await _exchange(browser, world, receiver, code, verifier)).json()
    assert body["scope"].split() == ["openid", "fhirUser", "user/*.rs"]
    assert "patient" not in body


# --- refusals ------------------------------------------------------------------------------------


async def test_deny_redirects_access_denied_with_state(
    browser: httpx.AsyncClient, world: dict[str, str], receiver: CodeReceiver
) -> None:
    _, challenge = pkce_pair()
    query = _query(world, receiver, challenge)
    response = await sign_in(
        browser,
        query,
        username=world["practitioner_user"],
        password=PASSWORD,
        patient=world["a"],
        decision="deny",
    )
    await follow_to_receiver(response)
    got = receiver.last()
    assert got["error"] == "access_denied" and got["state"] == query["state"] and "code" not in got


async def test_code_is_used_once_and_reuse_revokes_what_it_gave(
    browser: httpx.AsyncClient, world: dict[str, str], receiver: CodeReceiver
) -> None:
    code, verifier, _ = await _code(browser, world, receiver)
    first = await _exchange(browser, world, receiver, code, verifier)
    assert first.status_code == 200
    again = await _exchange(browser, world, receiver, code, verifier)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    refresh = await browser.post(
        "/auth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": first.json()["refresh_token"],
            "client_id": world["client_id"],
        },
    )
    assert refresh.status_code == 400 and refresh.json()["error"] == "invalid_grant"


async def test_wrong_verifier_wrong_redirect_uri_and_other_client_are_refused(
    smart_app: FastAPI, browser: httpx.AsyncClient, world: dict[str, str], receiver: CodeReceiver
) -> None:
    code, verifier, _ = await _code(browser, world, receiver)
    wrong = await _exchange(browser, world, receiver, code, pkce_pair()[0])
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    # The failed attempt used the code up: the right verifier is too late.
    assert (await _exchange(browser, world, receiver, code, verifier)).status_code == 400

    code, verifier, _ = await _code(browser, world, receiver)
    other_uri = await browser.post(
        "/auth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": "org.example.careplan:/callback",
            "client_id": world["client_id"],
            "code_verifier": verifier,
        },
    )
    assert other_uri.status_code == 400 and other_uri.json()["error"] == "invalid_grant"

    code, verifier, _ = await _code(browser, world, receiver)
    other_id, _ = await register_client(
        smart_app.state.pool,
        name="other",
        scope=APP_SCOPE,
        redirect_uris=[receiver.redirect_uri],
        public=True,
    )
    stolen = await _exchange(browser, {**world, "client_id": other_id}, receiver, code, verifier)
    assert stolen.status_code == 400 and stolen.json()["error"] == "invalid_grant"

    code, _, _ = await _code(browser, world, receiver)
    no_verifier = await browser.post(
        "/auth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": receiver.redirect_uri,
            "client_id": world["client_id"],
        },
    )
    assert no_verifier.status_code == 400 and no_verifier.json()["error"] == "invalid_request"


async def test_expired_code_is_refused(
    smart_app: FastAPI, browser: httpx.AsyncClient, world: dict[str, str], receiver: CodeReceiver
) -> None:
    code, verifier, _ = await _code(browser, world, receiver)
    from app.auth.authorize import code_hash

    # Its minute has passed (moved back in the database rather than waited for).
    await smart_app.state.pool.execute(
        "UPDATE auth_code SET expires_at = now() - interval '1 second' WHERE code_hash = $1", code_hash(code)
    )
    response = await _exchange(browser, world, receiver, code, verifier)
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"aud": "https://elsewhere.example/fhir"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "launch system/*.cruds"}, "invalid_scope"),
        ({"code_challenge": ""}, "invalid_request"),
    ],
)
async def test_bad_requests_redirect_with_error_and_state(
    browser: httpx.AsyncClient,
    world: dict[str, str],
    receiver: CodeReceiver,
    change: dict[str, str],
    error: str,
) -> None:
    _, challenge = pkce_pair()
    query = {**_query(world, receiver, challenge), **change}
    response = await browser.get("/auth/authorize", params=query)
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith(receiver.redirect_uri + "?")
    await follow_to_receiver(response)
    got = receiver.last()
    assert got["error"] == error and got["state"] == query["state"] and "code" not in got


@pytest.mark.parametrize(
    "change",
    [
        {"redirect_uri": "http://127.0.0.1:9/callback"},
        {"redirect_uri": "REPLACED/callback/"},
        {"client_id": "no-such-client"},
        {"client_id": ""},
        {"client_id": "nul\x00byte"},
    ],
)
async def test_bad_client_or_redirect_uri_is_shown_never_redirected(
    browser: httpx.AsyncClient, world: dict[str, str], receiver: CodeReceiver, change: dict[str, str]
) -> None:
    _, challenge = pkce_pair()
    change = {k: v.replace("REPLACED", receiver.base) for k, v in change.items()}
    before = len(receiver.received)
    response = await browser.get("/auth/authorize", params={**_query(world, receiver, challenge), **change})
    assert response.status_code == 400
    assert "location" not in response.headers
    assert response.headers["content-type"].startswith("text/html")
    assert 'role="alert"' in response.text
    assert len(receiver.received) == before


async def test_forms_without_the_csrf_token_or_cookie_are_refused(
    smart_app: FastAPI, browser: httpx.AsyncClient, world: dict[str, str], receiver: CodeReceiver
) -> None:
    _, challenge = pkce_pair()
    page = await browser.get("/auth/authorize", params=_query(world, receiver, challenge))
    login = form_with(read_page(page.text), "password")
    fields = {"username": world["practitioner_user"], "password": PASSWORD}
    missing = await browser.post("/auth/authorize/login", data={"flow": login.fields["flow"], **fields})
    assert missing.status_code == 403
    wrong = await browser.post(
        "/auth/authorize/login", data={**login.fields, "csrf_token": "forged", **fields}
    )
    assert wrong.status_code == 403
    # The right token from another browser (no flow cookie) is refused too.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=smart_app), base_url=BASE_URL) as other:
        elsewhere = await other.post("/auth/authorize/login", data={**login.fields, **fields})
    assert elsewhere.status_code == 403
    step = await smart_app.state.pool.fetchval(
        "SELECT step FROM auth_flow WHERE flow_id = $1", login.fields["flow"]
    )
    assert step == "login"  # nothing happened
    # The page's own form still works.
    assert (await post_form(browser, str(page.url), login, **fields)).status_code == 200


async def test_wrong_password_is_shown_on_the_login_page(
    browser: httpx.AsyncClient, world: dict[str, str], receiver: CodeReceiver
) -> None:
    _, challenge = pkce_pair()
    page = await browser.get("/auth/authorize", params=_query(world, receiver, challenge))
    login = form_with(read_page(page.text), "password")
    failed = await post_form(
        browser, str(page.url), login, username=world["practitioner_user"], password="nope"
    )
    assert failed.status_code == 401
    assert 'role="alert"' in failed.text and 'aria-describedby="form-error"' in failed.text
    assert PASSWORD not in failed.text and "nope" not in failed.text


# --- refresh and revocation ----------------------------------------------------------------------


async def _refresh(http: httpx.AsyncClient, world: dict[str, str], token: str) -> httpx.Response:
    return await http.post(
        "/auth/token",
        data={"grant_type": "refresh_token", "refresh_token": token, "client_id": world["client_id"]},
    )


async def test_refresh_rotates_and_reuse_revokes_the_family(
    browser: httpx.AsyncClient, world: dict[str, str], receiver: CodeReceiver
) -> None:
    code, verifier, _ = await _code(browser, world, receiver)
    first = (await _exchange(browser, world, receiver, code, verifier)).json()
    second = await _refresh(browser, world, first["refresh_token"])
    assert second.status_code == 200, second.text
    rotated = second.json()
    assert rotated["refresh_token"] != first["refresh_token"]
    assert rotated["patient"] == world["a"] and rotated["scope"] == first["scope"]
    third = await _refresh(browser, world, rotated["refresh_token"])
    assert third.status_code == 200
    # The first token again: someone copied it. Everything of this sign-in is revoked.
    reused = await _refresh(browser, world, first["refresh_token"])
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
    latest = await _refresh(browser, world, third.json()["refresh_token"])
    assert latest.status_code == 400 and latest.json()["error"] == "invalid_grant"


async def test_refresh_may_narrow_but_not_widen_scope(
    browser: httpx.AsyncClient, world: dict[str, str], receiver: CodeReceiver
) -> None:
    code, verifier, _ = await _code(
        browser, world, receiver, scope="launch/patient patient/*.rs offline_access"
    )
    first = (await _exchange(browser, world, receiver, code, verifier)).json()
    wider = await browser.post(
        "/auth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
            "client_id": world["client_id"],
            "scope": "patient/*.rs user/*.rs",
        },
    )
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"


async def test_revocation_ends_the_refresh_token(
    browser: httpx.AsyncClient, world: dict[str, str], receiver: CodeReceiver
) -> None:
    code, verifier, _ = await _code(browser, world, receiver)
    body = (await _exchange(browser, world, receiver, code, verifier)).json()
    revoked = await browser.post(
        "/auth/revoke",
        data={
            "token": body["refresh_token"],
            "token_type_hint": "refresh_token",
            "client_id": world["client_id"],
        },
    )
    assert revoked.status_code == 200 and revoked.json() == {}
    assert (await _refresh(browser, world, body["refresh_token"])).status_code == 400
    unknown = await browser.post("/auth/revoke", data={"token": "unknown", "client_id": world["client_id"]})
    assert unknown.status_code == 200  # RFC 7009 §2.2
    access = await browser.post(
        "/auth/revoke", data={"token": body["access_token"], "client_id": world["client_id"]}
    )
    assert access.status_code == 400 and access.json()["error"] == "unsupported_token_type"


async def test_disabled_user_cannot_refresh(
    smart_app: FastAPI, browser: httpx.AsyncClient, world: dict[str, str], receiver: CodeReceiver
) -> None:
    from app.auth.users import set_disabled

    code, verifier, _ = await _code(browser, world, receiver)
    body = (await _exchange(browser, world, receiver, code, verifier)).json()
    async with smart_app.state.pool.acquire() as conn:
        assert await set_disabled(conn, world["practitioner_user"])
    assert (await _refresh(browser, world, body["refresh_token"])).status_code == 400


# --- discovery and audit -------------------------------------------------------------------------


async def test_discovery_documents_describe_the_code_flow(browser: httpx.AsyncClient) -> None:
    smart = (await browser.get("/fhir/.well-known/smart-configuration")).json()
    assert smart["issuer"] == BASE_URL and smart["jwks_uri"] == f"{BASE_URL}/auth/jwks"
    assert smart["authorization_endpoint"] == f"{BASE_URL}/auth/authorize"
    assert smart["code_challenge_methods_supported"] == ["S256"]
    assert smart["response_types_supported"] == ["code"]
    assert {
        "launch-standalone",
        "client-public",
        "client-confidential-symmetric",
        "context-standalone-patient",
        "permission-offline",
        "permission-patient",
        "permission-user",
        "permission-v2",
        "sso-openid-connect",
    } <= set(smart["capabilities"])
    oidc = (await browser.get("/.well-known/openid-configuration")).json()
    assert oidc["issuer"] == BASE_URL and oidc["jwks_uri"] == smart["jwks_uri"]
    assert oidc["authorization_endpoint"] == smart["authorization_endpoint"]
    metadata = (await browser.get("/fhir/metadata")).json()
    uris = {
        item["url"]: item["valueUri"] for item in metadata["rest"][0]["security"]["extension"][0]["extension"]
    }
    assert uris["authorize"] == smart["authorization_endpoint"]
    assert uris["revoke"] == smart["revocation_endpoint"]
    flows = (await browser.get("/openapi.json")).json()["components"]["securitySchemes"]["smart"]["flows"]
    assert flows["authorizationCode"]["authorizationUrl"] == "/auth/authorize"
    assert flows["authorizationCode"]["tokenUrl"] == "/auth/token"


async def test_logins_consents_and_tokens_are_audited_with_the_user_as_agent(
    smart_app: FastAPI, browser: httpx.AsyncClient, world: dict[str, str], receiver: CodeReceiver
) -> None:
    _, challenge = pkce_pair()
    page = await browser.get("/auth/authorize", params=_query(world, receiver, challenge))
    login = form_with(read_page(page.text), "password")
    await post_form(
        browser, str(page.url), login, username=world["practitioner_user"], password="wrong-password"
    )
    code, verifier, _ = await _code(browser, world, receiver)
    body = (await _exchange(browser, world, receiver, code, verifier)).json()
    await _refresh(browser, world, body["refresh_token"])
    practitioner = f"Practitioner/{world['pr']}"
    # Read back as an auditor would: AuditEvent?agent= on the audit store (app/audit).
    await smart_app.state.audit.flush()
    auditor = await bearer(smart_app, "system/AuditEvent.rs", client_id="smart-auditor")
    found = await browser.get(
        "/fhir/AuditEvent", params={"agent": practitioner, "_count": "200"}, headers=auditor
    )
    assert found.status_code == 200, found.text[:300]
    events = [entry["resource"] for entry in found.json().get("entry", [])]
    seen = {
        (sub["code"], event["outcome"])
        for event in events
        for sub in event["subtype"]
        if sub["system"] == "urn:carecoord:auth-event"
    }
    assert {("login", "4"), ("login", "0"), ("consent-approve", "0"), ("token-issue", "0")} <= seen
    assert ("token-refresh", "0") in seen
    for event in events:
        text = json.dumps(event)
        assert PASSWORD not in text and "wrong-password" not in text
        assert event["agent"][0]["who"]["reference"] == practitioner


# --- the login limit across processes --------------------------------------------------------------


def test_login_limit_is_shared_by_two_server_processes(database_url: str, tmp_path: Path) -> None:
    """Failures at one process count at the other: the limit state is in PostgreSQL."""
    import asyncio

    s = _suffix()
    username = f"limited-{s}"

    async def setup() -> str:
        conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            # Failures other tests provoked from 127.0.0.1 would count against this address too.
            await conn.execute("DELETE FROM auth_login_failure")
            await add_user(conn, username=username, fhir_user=f"Practitioner/lim-{s}", password=PASSWORD)
            client_id, _ = await register_client(
                conn,
                name="limit test",
                scope="openid fhirUser user/*.rs",
                redirect_uris=["http://127.0.0.1:9/callback"],
                public=True,
            )
            return client_id
        finally:
            await conn.close()

    client_id = asyncio.run(setup())
    env = {"CARECOORD_LOGIN_FAILURE_LIMIT": "3", "CARECOORD_LOGIN_FAILURE_WINDOW": "600"}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    with (
        running_server(database_url, tmp_path / "one", env=env) as one,
        running_server(database_url, tmp_path / "two", env=env) as two,
    ):

        def attempt(server_base: str, password: str) -> httpx.Response:
            with httpx.Client(base_url=server_base) as http:
                _, challenge = pkce_pair()
                query = authorize_query(
                    client_id=client_id,
                    redirect_uri="http://127.0.0.1:9/callback",
                    scope="openid fhirUser user/*.rs",
                    aud=f"{server_base}/fhir",
                    challenge=challenge,
                    state="s",
                )
                page = http.get("/auth/authorize", params=query)
                assert page.status_code == 200, page.text
                login = form_with(read_page(page.text), "password")
                return http.post(
                    login.action, data={**login.fields, "username": username, "password": password}
                )

        assert attempt(one.base, "guess-one-1").status_code == 401
        assert attempt(two.base, "guess-two-1").status_code == 401
        assert attempt(one.base, "guess-one-2").status_code == 401
        # Three failures in all, two of them at the other process: the right password is refused
        # at both.
        for base in (two.base, one.base):
            limited = attempt(base, PASSWORD)
            assert limited.status_code == 429, limited.text
            assert "Too many failed sign-ins" in limited.text


async def test_nul_characters_are_refused_without_a_server_error(
    browser: httpx.AsyncClient, world: dict[str, str]
) -> None:
    token = await browser.post(
        "/auth/token", data={"grant_type": "authorization_code", "client_id": "a\x00b"}
    )
    assert token.status_code == 400 and token.json()["error"] == "invalid_request"
    login = await browser.post("/auth/authorize/login", data={"flow": "x", "username": "a\x00b"})
    assert login.status_code == 400


async def test_related_person_picks_the_patient_they_are_related_to(
    smart_app: FastAPI, browser: httpx.AsyncClient, world: dict[str, str], receiver: CodeReceiver
) -> None:
    s = _suffix()
    await _put(
        smart_app,
        {"resourceType": "RelatedPerson", "id": f"rp-{s}", "patient": {"reference": f"Patient/{world['c']}"}},
    )
    await add_user(
        smart_app.state.pool, username=f"carer-{s}", fhir_user=f"RelatedPerson/rp-{s}", password=PASSWORD
    )
    _, challenge = pkce_pair()
    page = await browser.get("/auth/authorize", params=_query(world, receiver, challenge))
    login = form_with(read_page(page.text), "password")
    picker_page = await post_form(browser, str(page.url), login, username=f"carer-{s}", password=PASSWORD)
    picker = form_with(read_page(picker_page.text), "patient")
    assert {item["value"] for item in picker.inputs if item.get("name") == "patient"} == {world["c"]}
