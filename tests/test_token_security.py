"""Security review findings of the authorization server, each driven through the real token,
introspection and FHIR endpoints over ASGI (a real PostgreSQL behind them).

* (6) ``*`` never grants AuditEvent at the token endpoint either;
* (5) a requested scope restriction is granted only if it is plain and narrower than (or the
  same as) the registered one; registration refuses non-plain restrictions;
* (11) removing a client revokes its tokens within seconds, in every process; introspection
  details go to the token's own client or to a client registered for introspection only;
* (12) failures from one address never lock a client out at its own address.

Every test asserts what the attacker must not get and what the legitimate client still gets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.auth.clients import ClientRegistrationError, register_client, remove_client
from app.auth.grants import covers, narrow_scopes
from app.auth.scopes import restriction_problem
from app.auth.tokens import CLIENT_CHECK_INTERVAL, InvalidToken, TokenService, build_token_service
from app.main import create_app
from app.settings import Settings
from tests.conftest import forget_auth_failures

BASE = "http://cc.test"
ATTACKER = ("203.0.113.7", 1234)
VICTIM = ("198.51.100.20", 4321)


@pytest.fixture(scope="module")
async def sec_app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The app with failure limits high enough that refused scopes here do not trip them
    (the lockout test has its own app)."""
    app = create_app(settings.model_copy(update={"auth_failure_limit": 10_000}))
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def http(sec_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sec_app), base_url=BASE) as client:
        yield client


async def _client(app: FastAPI, scope: str, **extra: Any) -> tuple[str, str]:
    client_id, secret = await register_client(app.state.pool, name="security test", scope=scope, **extra)
    assert secret is not None
    return client_id, secret


async def _token(
    http: httpx.AsyncClient, credentials: tuple[str, str], scope: str | None = None
) -> httpx.Response:
    form = {"grant_type": "client_credentials"}
    if scope is not None:
        form["scope"] = scope
    return await http.post("/auth/token", data=form, auth=credentials)


def _granted(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    scope: str = response.json()["scope"]
    return scope.split()


def _refused(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_scope"
    assert "access_token" not in response.json()


def _bearer(response: httpx.Response) -> dict[str, str]:
    return {"authorization": f"Bearer {response.json()['access_token']}", "accept": "application/fhir+json"}


# --- (6) AuditEvent is never granted through * -----------------------------------------------


@pytest.mark.parametrize(
    ("registered", "requested", "expected"),
    [
        ("system/*.rs", "system/AuditEvent.rs", False),
        ("system/*.cruds", "system/AuditEvent.r", False),
        ("system/*.read", "system/AuditEvent.read", False),
        ("patient/*.rs", "patient/AuditEvent.rs", False),
        ("user/*.*", "user/AuditEvent.s", False),
        ("system/*.rs?_tag=a", "system/AuditEvent.rs?_tag=a", False),
        ("system/AuditEvent.rs", "system/AuditEvent.rs", True),
        ("system/AuditEvent.read", "system/AuditEvent.s", True),
        ("system/*.rs", "system/*.rs", True),  # the wildcard itself: enforcement leaves AuditEvent out
        ("system/*.rs", "system/Patient.rs", True),
    ],
)
def test_wildcard_never_covers_audit_events(registered: str, requested: str, expected: bool) -> None:
    assert covers(registered, requested) is expected


async def test_token_endpoint_does_not_grant_audit_events_through_a_wildcard(
    http: httpx.AsyncClient, sec_app: FastAPI
) -> None:
    backend = await _client(sec_app, "system/*.rs")
    _refused(await _token(http, backend, "system/AuditEvent.rs"))
    _refused(await _token(http, backend, "system/AuditEvent.read"))
    mixed = await _token(http, backend, "system/AuditEvent.rs system/Patient.rs")
    assert _granted(mixed) == ["system/Patient.rs"]
    assert (await http.get("/fhir/AuditEvent", headers=_bearer(mixed))).status_code == 403
    assert (await http.get("/fhir/Patient", headers=_bearer(mixed))).status_code == 200

    patient_app = await _client(sec_app, "patient/*.rs", patient="sec-p1")
    _refused(await _token(http, patient_app, "patient/AuditEvent.rs"))
    assert _granted(await _token(http, patient_app, "patient/AuditEvent.rs patient/Observation.rs")) == [
        "patient/Observation.rs"
    ]

    # An auditor registered for the audit trail explicitly still gets it.
    auditor = await _client(sec_app, "system/*.rs system/AuditEvent.rs")
    audit = await _token(http, auditor, "system/AuditEvent.rs")
    assert _granted(audit) == ["system/AuditEvent.rs"]
    assert (await http.get("/fhir/AuditEvent", headers=_bearer(audit))).status_code == 200


# --- (5) scope restrictions: plain only, never wider than registered -------------------------


@pytest.mark.parametrize(
    ("resource_type", "query"),
    [
        ("Patient", "_has:Condition:patient:code=1234"),
        ("Patient", "_has=x"),
        ("Patient", "general-practitioner:Practitioner.name=smith"),
        ("Patient", "general-practitioner.name=smith"),
        ("Observation", "subject:Patient.name=x"),
        ("Observation", "subject.name=x"),
        ("Patient", "_include=Patient:link"),
        ("Patient", "_revinclude=Observation:subject"),
        ("Patient", "_count=1"),
        ("Patient", "_sort=family"),
        ("Patient", "_summary=count"),
        ("Patient", "_elements=name"),
        ("Patient", "_total=accurate"),
        ("Patient", "_type=Observation"),
        ("Patient", "_filter=name eq x"),
        ("Patient", "no-such-param=1"),
        ("Patient", "code=1234"),  # an Observation parameter, not a Patient one
        ("*", "family=smith"),  # only the common parameters apply to every type
        ("*", "_has:Condition:patient:code=1"),
        ("Observation", "subject:Patient:name=x"),
        ("Observation", "code:Patient=x"),  # a type modifier on a token parameter
        ("Observation", "subject:NotAType=x"),
        ("Foo", "_id=1"),
    ],
)
def test_non_plain_restrictions_have_a_problem(resource_type: str, query: str) -> None:
    name, _, value = query.partition("=")
    problem = restriction_problem(resource_type, [(name, value)])
    assert problem is not None and problem.strip()
    # The same pair among acceptable ones is still a problem.
    assert restriction_problem(resource_type, [("_id", "1"), (name, value)]) is not None


@pytest.mark.parametrize(
    ("resource_type", "pairs"),
    [
        ("Patient", [("gender", "female")]),
        ("Patient", [("family:exact", "Smith"), ("birthdate", "ge2000")]),
        ("Observation", [("subject:Patient", "Patient/1")]),
        ("Observation", [("subject", "Patient/1"), ("code:not", "http://loinc.org|1")]),
        ("Observation", [("category", "vital-signs"), ("category", "laboratory")]),
        ("Observation", [("value-quantity:missing", "true")]),
        ("*", [("_tag", "http://example.org|x")]),
        ("*", [("_id", "1"), ("_lastUpdated", "ge2024"), ("_security", "R"), ("_profile", "x")]),
        ("*", [("_source", "http://example.org")]),
    ],
)
def test_plain_restrictions_are_acceptable(resource_type: str, pairs: list[tuple[str, str]]) -> None:
    assert restriction_problem(resource_type, pairs) is None


@pytest.mark.parametrize(
    ("registered", "requested", "expected"),
    [
        # Under an unrestricted scope: any plain restriction is narrower, nothing else is granted.
        ("system/Patient.rs", "system/Patient.rs?gender=female", True),
        ("system/Patient.rs", "system/Patient.rs?_has:Condition:patient:code=1234", False),
        ("system/Patient.rs", "system/Patient.rs?general-practitioner:Practitioner.name=x", False),
        ("system/Patient.rs", "system/Patient.rs?_count=1", False),
        ("system/*.rs", "system/Patient.rs?link:Patient.name=x", False),
        ("system/*.rs", "system/*.rs?family=x", False),
        ("system/*.rs", "system/*.rs?_tag=x", True),
        ("system/Patient.read", "system/Patient.read?gender=female", False),  # v1 has no restrictions
        # Under a restricted scope: the registered pairs, possibly more, in any order.
        ("system/Observation.rs?category=vital-signs", "system/Observation.rs?category=vital-signs", True),
        ("system/Observation.rs?category=vital-signs", "system/Observation.r?category=vital-signs", True),
        (
            "system/Observation.rs?category=vital-signs",
            "system/Observation.rs?code=1234-5&category=vital-signs",
            True,
        ),
        ("system/Observation.rs?category=vital-signs", "system/Observation.rs?category=laboratory", False),
        ("system/Observation.rs?category=vital-signs", "system/Observation.rs", False),
        (
            "system/Observation.rs?category=vital-signs",
            "system/Observation.rs?category=vital-signs&subject:Patient.name=x",
            False,
        ),
        (
            "system/Observation.rs?category=vital-signs",
            "system/Observation.rs?category:not=x&category=vital-signs",
            True,
        ),
        ("system/Observation.rs?category=a&category=b", "system/Observation.rs?category=a", False),
        ("system/Observation.rs?category=a&category=b", "system/Observation.rs?category=b&category=a", True),
        ("system/Observation.rs?category=a&category=b", "system/Observation.rs?category=a&category=a", False),
        ("system/Observation.rs?category=a", "system/Observation.rs?category=a&category=a", True),
        ("system/*.rs?_tag=t", "system/Patient.rs?gender=male&_tag=t", True),
        ("system/*.rs?_tag=t", "system/Patient.rs?gender=male", False),
        # A non-plain restriction registered before this rule is never granted.
        (
            "system/Patient.rs?_has:Condition:patient:code=1",
            "system/Patient.rs?_has:Condition:patient:code=1",
            False,
        ),
    ],
)
def test_restricted_scope_covering(registered: str, requested: str, expected: bool) -> None:
    assert covers(registered, requested) is expected


def test_registered_non_plain_restrictions_are_not_granted_by_default() -> None:
    registered = "system/Patient.rs?_has:Condition:patient:code=1 system/Observation.rs?category=x"
    assert narrow_scopes(registered, None, patient_context=False) == ["system/Observation.rs?category=x"]


async def test_token_endpoint_grants_only_plain_narrower_restrictions(
    http: httpx.AsyncClient, sec_app: FastAPI
) -> None:
    backend = await _client(sec_app, "system/Patient.rs system/Observation.rs?category=vital-signs")
    for oracle in (
        "system/Patient.rs?_has:Condition:patient:code=http://snomed.info/sct|44054006",
        "system/Patient.rs?general-practitioner:Practitioner.name=smith",
        "system/Patient.rs?_include=Patient:general-practitioner",
        "system/Observation.rs?category=vital-signs&subject:Patient.name=Rivera",
        "system/Observation.rs?category=laboratory",
        "system/Observation.rs",
    ):
        _refused(await _token(http, backend, oracle))
    narrower = await _token(
        http,
        backend,
        "system/Patient.rs?gender=female system/Observation.rs?code=1234-5&category=vital-signs"
        " system/Patient.rs?_has:Condition:patient:code=1",
    )
    assert _granted(narrower) == [
        "system/Patient.rs?gender=female",
        "system/Observation.rs?code=1234-5&category=vital-signs",
    ]
    same = await _token(http, backend, "system/Observation.rs?category=vital-signs")
    assert _granted(same) == ["system/Observation.rs?category=vital-signs"]


@pytest.mark.parametrize(
    "scope",
    [
        "system/Patient.rs?_has:Condition:patient:code=1",
        "system/Observation.rs?subject:Patient.name=x",
        "system/Patient.rs?_count=1",
        "system/*.rs?family=x",
        "system/Patient.rs?code=1",
        "system/Patient.read?gender=male",
        "system/Patient.rs?=x",
    ],
)
async def test_registration_refuses_non_plain_restrictions(sec_app: FastAPI, scope: str) -> None:
    with pytest.raises(ClientRegistrationError) as raised:
        await register_client(sec_app.state.pool, name="oracle", scope=f"system/Task.rs {scope}")
    assert str(raised.value)
    # Plain restrictions still register.
    await register_client(
        sec_app.state.pool, name="plain", scope="system/Observation.rs?category=vital-signs&subject=Patient/1"
    )


# --- (11) removal revokes; introspection only for the token's client or an introspector -------


async def _wait_refused(check: Any, deadline: float) -> None:
    while True:
        if await check():
            return
        assert time.monotonic() < deadline, "still accepted after the revocation delay"
        await asyncio.sleep(0.2)


async def test_removing_a_client_revokes_its_tokens_in_every_process(
    http: httpx.AsyncClient, sec_app: FastAPI, settings: Settings
) -> None:
    removed = await _client(sec_app, "system/*.rs")
    kept = await _client(sec_app, "system/*.rs")
    introspector = await _client(sec_app, "system/*.rs", introspection=True)
    doomed = await _token(http, removed, "system/Patient.rs")
    keeper = await _token(http, kept, "system/Patient.rs")
    assert (await http.get("/fhir/Patient", headers=_bearer(doomed))).status_code == 200
    # Another process (its own TokenService and caches, same database) knows the token too.
    other: TokenService = await build_token_service(settings, sec_app.state.pool, sec_app.state.http)
    doomed_token = doomed.json()["access_token"]
    assert (await other.verify(doomed_token)).client_id == removed[0]

    assert await remove_client(sec_app.state.pool, removed[0])
    removed_at = time.monotonic()
    deadline = removed_at + CLIENT_CHECK_INTERVAL + 2

    async def refused_here() -> bool:
        response = await http.get("/fhir/Patient", headers=_bearer(doomed))
        assert response.status_code in (200, 401), response.text
        return response.status_code == 401

    async def refused_there() -> bool:
        try:
            await other.verify(doomed_token)  # a hit of its verified-token cache
        except InvalidToken:
            return True
        return False

    await _wait_refused(refused_here, deadline)
    await _wait_refused(refused_there, deadline)
    assert CLIENT_CHECK_INTERVAL <= 10
    refused = await http.get("/fhir/Patient", headers=_bearer(doomed))
    assert 'error="invalid_token"' in refused.headers["www-authenticate"]
    inactive = await http.post("/auth/introspect", data={"token": doomed_token}, auth=introspector)
    assert inactive.json() == {"active": False}
    # The other client's token is untouched, in both processes.
    assert (await http.get("/fhir/Patient", headers=_bearer(keeper))).status_code == 200
    assert (await other.verify(keeper.json()["access_token"])).client_id == kept[0]


async def test_revocation_check_costs_a_dict_lookup(sec_app: FastAPI) -> None:
    client_id, _ = await _client(sec_app, "system/*.rs")
    tokens: TokenService = sec_app.state.tokens
    token, _ = await tokens.issue(client_id=client_id, scope="system/*.rs")
    first = await tokens.verify(token)
    started = time.perf_counter()
    for _ in range(1000):
        assert await tokens.verify(token) is first
    assert time.perf_counter() - started < 0.05


async def test_unregistered_clients_tokens_are_refused(sec_app: FastAPI) -> None:
    tokens: TokenService = sec_app.state.tokens
    token, _ = await tokens.issue(client_id="never-registered", scope="system/*.rs")
    with pytest.raises(InvalidToken):
        await tokens.verify(token)


async def test_introspection_details_only_for_the_tokens_client_or_an_introspector(
    http: httpx.AsyncClient, sec_app: FastAPI
) -> None:
    owner = await _client(sec_app, "system/*.rs", organization="Organization/sec-org")
    stranger = await _client(sec_app, "system/*.rs")
    resource_server = await _client(sec_app, "system/Patient.r", introspection=True)
    token = (await _token(http, owner, "system/Patient.rs")).json()["access_token"]

    nosy = await http.post("/auth/introspect", data={"token": token}, auth=stranger)
    assert nosy.status_code == 200, nosy.text
    assert nosy.json() == {"active": False}

    own = await http.post("/auth/introspect", data={"token": token}, auth=owner)
    assert own.json()["active"] is True
    assert own.json()["client_id"] == owner[0] and own.json()["scope"] == "system/Patient.rs"

    privileged = await http.post("/auth/introspect", data={"token": token}, auth=resource_server)
    body = privileged.json()
    assert body["active"] is True
    assert body["client_id"] == owner[0]
    assert body["organization"] == "Organization/sec-org"


# --- (12) failures from elsewhere never lock a client out ------------------------------------


async def test_failures_from_one_address_do_not_lock_out_the_client_elsewhere(settings: Settings) -> None:
    limited = create_app(settings.model_copy(update={"auth_failure_limit": 3, "auth_failure_window": 60}))
    async with limited.router.lifespan_context(limited):
        await forget_auth_failures(limited)
        victim_id, victim_secret = await _client(limited, "system/*.rs")
        other_id, other_secret = await _client(limited, "system/*.rs")

        def at(peer: tuple[str, int]) -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=httpx.ASGITransport(app=limited, client=peer), base_url=BASE)

        form = {"grant_type": "client_credentials"}
        async with at(ATTACKER) as attacker, at(VICTIM) as victim:
            for _ in range(10):
                guess = await attacker.post("/auth/token", data=form, auth=(victim_id, "guess"))
                assert guess.status_code in (401, 429), guess.text
            # The attacker's address is limited, whatever it tries...
            blocked = await attacker.post("/auth/token", data=form, auth=(victim_id, victim_secret))
            assert blocked.status_code == 429 and "access_token" not in blocked.json()
            assert (
                await attacker.post("/auth/token", data=form, auth=(other_id, other_secret))
            ).status_code == 429
            # ...while the victim, from its own address, gets its tokens, again and again.
            for _ in range(5):
                ok = await victim.post("/auth/token", data=form, auth=(victim_id, victim_secret))
                assert ok.status_code == 200, ok.text
            token = ok.json()["access_token"]
            introspected = await victim.post(
                "/auth/introspect", data={"token": token}, auth=(victim_id, victim_secret)
            )
            assert introspected.status_code == 200 and introspected.json()["active"] is True
            # The victim's own failures still count at its own address.
            for _ in range(3):
                wrong = await victim.post("/auth/token", data=form, auth=(victim_id, "typo"))
                assert wrong.status_code == 401, wrong.text
            assert (
                await victim.post("/auth/token", data=form, auth=(victim_id, victim_secret))
            ).status_code == 429


async def test_a_correct_client_asking_for_the_wrong_scope_is_no_guess(settings: Settings) -> None:
    """Requests that authenticate but ask for a scope the client lacks (invalid_scope) are not
    failed guesses: they never lock out the address (a proxy shared by every client, say)."""
    limited = create_app(settings.model_copy(update={"auth_failure_limit": 3, "auth_failure_window": 60}))
    async with limited.router.lifespan_context(limited):
        await forget_auth_failures(limited)
        client_id, secret = await _client(limited, "system/Patient.rs")
        other_id, other_secret = await _client(limited, "system/*.rs")
        transport = httpx.ASGITransport(app=limited, client=VICTIM)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as http:
            for _ in range(10):
                refused = await http.post(
                    "/auth/token",
                    data={"grant_type": "client_credentials", "scope": "system/Observation.rs"},
                    auth=(client_id, secret),
                )
                assert refused.status_code == 400 and refused.json()["error"] == "invalid_scope"
            ok = await http.post(
                "/auth/token", data={"grant_type": "client_credentials"}, auth=(other_id, other_secret)
            )
            assert ok.status_code == 200, ok.text
