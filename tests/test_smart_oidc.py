"""Sign-in through a trusted upstream OpenID Connect provider (issue 11, optional part), against a
small provider on loopback: discovery, authorize (it signs everyone in at once), token with PKCE
and client_secret_basic, JWKS. carecoord verifies the id_token and maps its fhirUser claim."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet

from app.auth.clients import register_client
from app.main import create_app
from app.settings import Settings
from tests.conftest import BASE_URL, FHIR, bearer
from tests.smart_support import (
    CodeReceiver,
    authorize_query,
    code_receiver,
    follow_to_receiver,
    form_with,
    pkce_pair,
    post_form,
    read_page,
)

CLIENT_ID, CLIENT_SECRET = "carecoord", "upstream-secret"


def _key(kid: str) -> ECKey:
    return ECKey.generate_key("P-256", {"kid": kid, "alg": "ES256"}, private=True)


@dataclass
class Provider:
    base: str = ""
    key: ECKey = field(default_factory=lambda: _key("up-1"))
    forged_key: ECKey | None = None
    """Sign id_tokens with this key (not in the JWKS) instead."""
    subject: str = ""
    fhir_user: str = ""
    codes: dict[str, dict[str, str]] = field(default_factory=dict)


@contextmanager
def loopback_provider() -> Iterator[Provider]:
    provider = Provider()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            if parts.path == "/.well-known/openid-configuration":
                self._send(
                    200,
                    {
                        "issuer": provider.base,
                        "authorization_endpoint": f"{provider.base}/authorize",
                        "token_endpoint": f"{provider.base}/token",
                        "jwks_uri": f"{provider.base}/jwks",
                    },
                )
            elif parts.path == "/jwks":
                self._send(200, KeySet([provider.key]).as_dict(private=False))
            elif parts.path == "/authorize":
                assert query["client_id"] == CLIENT_ID and query["code_challenge_method"] == "S256"
                code = secrets.token_urlsafe(16)
                provider.codes[code] = query
                target = f"{query['redirect_uri']}?{urlencode({'code': code, 'state': query['state']})}"
                self._send(302, headers={"Location": target})
            else:
                self._send(404)

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
            expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
            request = provider.codes.pop(form.get("code", ""), None)
            if self.headers.get("authorization") != expected or request is None:
                self._send(400, {"error": "invalid_grant"})
                return
            digest = hashlib.sha256(form["code_verifier"].encode()).digest()
            if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != request["code_challenge"]:
                self._send(400, {"error": "invalid_grant"})
                return
            key = provider.forged_key or provider.key
            now = int(time.time())
            claims = {
                "iss": provider.base,
                "sub": provider.subject,
                "aud": CLIENT_ID,
                "iat": now,
                "exp": now + 300,
                "nonce": request["nonce"],
                "fhirUser": provider.fhir_user,
            }
            id_token = jwt.encode({"alg": "ES256", "kid": key.kid}, claims, key)
            self._send(200, {"access_token": "upstream-at", "token_type": "Bearer", "id_token": id_token})

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    provider.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield provider
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    with loopback_provider() as running:
        yield running


@pytest.fixture(scope="module")
def receiver() -> Iterator[CodeReceiver]:
    with code_receiver() as running:
        yield running


@pytest.fixture(scope="module")
async def oidc_app(settings: Settings, provider: Provider) -> AsyncIterator[FastAPI]:
    app = create_app(
        settings.model_copy(
            update={
                "oidc_issuer": provider.base,
                "oidc_client_id": CLIENT_ID,
                "oidc_client_secret": CLIENT_SECRET,
                "oidc_display_name": "Loopback IdP",
            }
        )
    )
    async with app.router.lifespan_context(app):
        yield app


async def _to_provider_and_back(
    browser: httpx.AsyncClient, app: FastAPI, receiver: CodeReceiver, scope: str
) -> tuple[httpx.Response, str, str]:
    """Start a launch, choose the upstream sign-in, let the provider send the browser back;
    the page carecoord shows then, with the verifier and state of the app's request."""
    client_id, _ = await register_client(
        app.state.pool, name="Family app", scope=scope, redirect_uris=[receiver.redirect_uri], public=True
    )
    verifier, challenge = pkce_pair()
    state = uuid.uuid4().hex
    page = await browser.get(
        "/auth/authorize",
        params=authorize_query(
            client_id=client_id,
            redirect_uri=receiver.redirect_uri,
            scope=scope,
            aud=FHIR,
            challenge=challenge,
            state=state,
        ),
    )
    assert page.status_code == 200
    upstream_form = next(f for f in read_page(page.text).forms if f.action == "/auth/authorize/upstream")
    assert "Sign in with Loopback IdP" in page.text
    # Browsers apply form-action to the redirect after the post: the provider's origin is allowed.
    provider_origin = urlsplit(app.state.authorize.upstream.issuer)
    assert f"{provider_origin.scheme}://{provider_origin.netloc}" in page.headers["content-security-policy"]
    to_provider = await post_form(browser, str(page.url), upstream_form)
    assert to_provider.status_code == 303, to_provider.text
    async with httpx.AsyncClient() as outside:
        at_provider = await outside.get(to_provider.headers["location"])
    assert at_provider.status_code == 302
    back = await browser.get(at_provider.headers["location"])
    return back, verifier, f"{client_id} {state}"


async def test_upstream_sign_in_maps_the_fhir_user_claim(
    oidc_app: FastAPI, provider: Provider, receiver: CodeReceiver
) -> None:
    patient = f"up-{uuid.uuid4().hex[:8]}"
    provider.subject, provider.fhir_user = f"sub-{patient}", f"https://ehr.example/fhir/Patient/{patient}"
    provider.forged_key = None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=oidc_app), base_url=BASE_URL) as browser:
        put = await browser.put(
            f"/fhir/Patient/{patient}",
            json={"resourceType": "Patient", "id": patient},
            headers={"content-type": "application/fhir+json", **await bearer(oidc_app)},
        )
        assert put.status_code == 201
        back, verifier, ids = await _to_provider_and_back(
            browser, oidc_app, receiver, "openid fhirUser patient/*.rs"
        )
        client_id, state = ids.split()
        assert back.status_code == 200, back.text  # the consent page: a Patient user needs no picker
        consent = form_with(read_page(back.text), "decision")
        redirect = await post_form(browser, str(back.url), consent, decision="approve")
        await follow_to_receiver(redirect)
        assert receiver.last()["state"] == state
        token = await browser.post(
            "/auth/token",
            data={
                "grant_type": "authorization_code",
                "code": receiver.last()["code"],
                "redirect_uri": receiver.redirect_uri,
                "client_id": client_id,
                "code_verifier": verifier,
            },
        )
        assert token.status_code == 200, token.text
        body = token.json()
        assert body["patient"] == patient
        keys = KeySet.import_key_set((await browser.get("/auth/jwks")).json())
        assert jwt.decode(body["id_token"], keys).claims["fhirUser"] == f"{FHIR}/Patient/{patient}"
        user = await oidc_app.state.pool.fetchrow(
            "SELECT fhir_user, password_hash FROM app_user WHERE username = $1", f"oidc:sub-{patient}"
        )
        assert user["fhir_user"] == f"Patient/{patient}" and user["password_hash"] is None


async def test_upstream_id_token_with_an_unknown_key_is_refused(
    oidc_app: FastAPI, provider: Provider, receiver: CodeReceiver
) -> None:
    provider.subject, provider.fhir_user = f"forged-{uuid.uuid4().hex[:8]}", "Practitioner/anyone"
    provider.forged_key = _key("forged")
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=oidc_app), base_url=BASE_URL
        ) as browser:
            back, _, _ = await _to_provider_and_back(browser, oidc_app, receiver, "openid fhirUser user/*.rs")
    finally:
        provider.forged_key = None
    assert back.status_code == 401
    assert "Sign-in failed" in back.text and 'name="password"' in back.text
    assert not await oidc_app.state.pool.fetchval(
        "SELECT true FROM app_user WHERE username = $1", f"oidc:{provider.subject}"
    )


async def test_upstream_callback_from_another_browser_is_refused(
    oidc_app: FastAPI, provider: Provider, receiver: CodeReceiver
) -> None:
    provider.subject, provider.fhir_user = f"other-{uuid.uuid4().hex[:8]}", "Practitioner/p"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=oidc_app), base_url=BASE_URL) as browser:
        client_id, _ = await register_client(
            oidc_app.state.pool, name="x", scope="openid", redirect_uris=[receiver.redirect_uri], public=True
        )
        _, challenge = pkce_pair()
        page = await browser.get(
            "/auth/authorize",
            params=authorize_query(
                client_id=client_id,
                redirect_uri=receiver.redirect_uri,
                scope="openid",
                aud=FHIR,
                challenge=challenge,
                state="s",
            ),
        )
        upstream_form = next(f for f in read_page(page.text).forms if f.action == "/auth/authorize/upstream")
        to_provider = await post_form(browser, str(page.url), upstream_form)
        async with httpx.AsyncClient() as outside:
            at_provider = await outside.get(to_provider.headers["location"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=oidc_app), base_url=BASE_URL) as attacker:
        hijacked = await attacker.get(at_provider.headers["location"])
    assert hijacked.status_code == 403
