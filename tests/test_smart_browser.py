"""The SMART App Launch sign-in in a real browser (issue 11): headless Chromium, driven by
Playwright with the keyboard and by accessible names (labels, roles), signs a practitioner in at
a real ``carecoord serve``, picks a patient from their caseload, allows access, and lands on a
real loopback redirect target with the code and state; the app then gets a token and reads."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import urlencode

import asyncpg
import httpx
import pytest

from app.auth.clients import register_client
from app.auth.users import add_user
from tests.server_support import running_server
from tests.smart_support import code_receiver, pkce_pair

PASSWORD = "browser-test-password"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


async def _setup(database_url: str, redirect_uri: str, s: str) -> tuple[str, str, str]:
    """A practitioner user, a public app client, and a machine client to load the data with."""
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await add_user(conn, username=f"nurse-{s}", fhir_user=f"Practitioner/nurse-{s}", password=PASSWORD)
        app_id, _ = await register_client(
            conn,
            name="Home visit app",
            scope="openid fhirUser launch/patient patient/*.rs offline_access",
            redirect_uris=[redirect_uri],
            public=True,
        )
        admin_id, admin_secret = await register_client(conn, name="loader", scope="system/*.cruds")
        assert admin_secret is not None
        return app_id, admin_id, admin_secret
    finally:
        await conn.close()


async def test_sign_in_pick_patient_and_consent_in_chromium(database_url: str, tmp_path: Path) -> None:
    chromium = _chromium()
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from playwright.async_api import async_playwright

    s = uuid.uuid4().hex[:10]
    with code_receiver() as receiver, running_server(database_url, tmp_path) as server:
        app_id, admin_id, admin_secret = await _setup(database_url, receiver.redirect_uri, s)
        async with httpx.AsyncClient(base_url=server.base) as http:
            token = await http.post(
                "/auth/token", data={"grant_type": "client_credentials"}, auth=(admin_id, admin_secret)
            )
            admin = {"authorization": f"Bearer {token.json()['access_token']}"}
            fhir = {"content-type": "application/fhir+json"}
            for resource in (
                {
                    "resourceType": "Patient",
                    "id": f"mira-{s}",
                    "name": [{"given": ["Mira"], "family": "Kowalski"}],
                },
                {
                    "resourceType": "CareTeam",
                    "id": f"team-{s}",
                    "status": "active",
                    "subject": {"reference": f"Patient/mira-{s}"},
                    "participant": [{"member": {"reference": f"Practitioner/nurse-{s}"}}],
                },
            ):
                put = await http.put(
                    f"/fhir/{resource['resourceType']}/{resource['id']}",
                    json=resource,
                    headers={**admin, **fhir},
                )
                assert put.status_code == 201, put.text

            verifier, challenge = pkce_pair()
            query = {
                "response_type": "code",
                "client_id": app_id,
                "redirect_uri": receiver.redirect_uri,
                "scope": "openid fhirUser launch/patient patient/*.rs offline_access",
                "state": f"state-{s}",
                "aud": f"{server.base}/fhir",
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(
                    executable_path=chromium,
                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
                )
                try:
                    page = await browser.new_page()
                    blocked: list[str] = []
                    page.on(
                        "console",
                        lambda message: (
                            blocked.append(message.text) if "Content Security" in message.text else None
                        ),
                    )
                    await page.goto(f"{server.base}/auth/authorize?{urlencode(query)}")
                    assert await page.title() == "Sign in - carecoord"
                    # Keyboard only: the tab order is username, password, the Sign in button.
                    await page.keyboard.press("Tab")
                    assert await page.evaluate("document.activeElement.id") == "username"
                    await page.keyboard.type(f"nurse-{s}")
                    await page.keyboard.press("Tab")
                    assert await page.evaluate("document.activeElement.id") == "password"
                    await page.keyboard.type(PASSWORD)
                    await page.keyboard.press("Tab")
                    assert await page.evaluate("document.activeElement.textContent") == "Sign in"
                    await page.keyboard.press("Enter")

                    # The picker: radios named by their labels, in a group named by its legend.
                    await page.get_by_role("heading", name="Choose a patient").wait_for()
                    group = page.get_by_role("group", name="Your patients")
                    radio = group.get_by_role("radio", name=f"Mira Kowalski (Patient/mira-{s})")
                    await radio.check()
                    await page.get_by_role("button", name="Continue").click()

                    await page.get_by_role("heading", name="Allow Home visit app?").wait_for()
                    assert await page.get_by_text("patient/*.rs").is_visible()
                    assert await page.get_by_text("Keep access when you are not using the app").is_visible()
                    await page.get_by_role("button", name="Allow").click()
                    await page.wait_for_url(f"{receiver.redirect_uri}?*")
                    assert await page.locator("#done").is_visible()
                finally:
                    await browser.close()
            assert not blocked, blocked
            got = receiver.last()
            assert got["state"] == f"state-{s}"
            exchanged = await http.post(
                "/auth/token",
                data={
                    "grant_type": "authorization_code",
                    "code": got["code"],
                    "redirect_uri": receiver.redirect_uri,
                    "client_id": app_id,
                    "code_verifier": verifier,
                },
            )
            assert exchanged.status_code == 200, exchanged.text
            body = exchanged.json()
            assert body["patient"] == f"mira-{s}" and body["refresh_token"] and body["id_token"]
            read = await http.get(
                f"/fhir/Patient/mira-{s}", headers={"authorization": f"Bearer {body['access_token']}"}
            )
            assert read.status_code == 200
            assert read.json()["name"][0]["family"] == "Kowalski"
