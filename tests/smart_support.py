"""Helpers of the SMART App Launch tests: a real loopback redirect target that receives the code,
an HTML form reader, PKCE, and a driver that follows the sign-in pages over HTTP like a browser
without JavaScript would."""

from __future__ import annotations

import base64
import hashlib
import http.server
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx


@dataclass
class CodeReceiver:
    """An HTTP server on 127.0.0.1 standing in for the app's redirect URI: it records the query
    of every request to /callback and answers with a small page."""

    base: str
    received: list[dict[str, str]] = field(default_factory=list)

    @property
    def redirect_uri(self) -> str:
        return f"{self.base}/callback"

    def last(self) -> dict[str, str]:
        assert self.received, "the redirect target received nothing"
        return self.received[-1]


@contextmanager
def code_receiver() -> Iterator[CodeReceiver]:
    receiver = CodeReceiver("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if parts.path == "/callback":
                receiver.received.append({k: v[0] for k, v in parse_qs(parts.query).items()})
            body = b"<!DOCTYPE html><title>done</title><p id='done'>Signed in. Return to the app.</p>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


@dataclass
class Form:
    action: str
    method: str
    fields: dict[str, str]
    inputs: list[dict[str, str]]
    buttons: list[dict[str, str]]


class FormReader(HTMLParser):
    """Every <form> of a page with its inputs and buttons (attributes as written)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []
        self.labels: dict[str, str] = {}
        self._label_for: str | None = None
        self._label_text: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.forms.append(
                Form(attributes.get("action", ""), attributes.get("method", "get").lower(), {}, [], [])
            )
        elif tag == "input" and self.forms:
            self.forms[-1].inputs.append(attributes)
            if attributes.get("type") == "hidden":
                self.forms[-1].fields[attributes["name"]] = attributes.get("value", "")
        elif tag == "button" and self.forms:
            self.forms[-1].buttons.append(attributes)
        elif tag == "label":
            self._label_for = attributes.get("for")
            self._label_text = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "label" and self._label_for is not None:
            self.labels[self._label_for] = "".join(self._label_text).strip()
            self._label_for = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._label_for is not None:
            self._label_text.append(data)


def read_page(html: str) -> FormReader:
    reader = FormReader()
    reader.feed(html)
    return reader


def authorize_query(
    *, client_id: str, redirect_uri: str, scope: str, aud: str, challenge: str, state: str, **extra: str
) -> dict[str, str]:
    return {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": state,
        "aud": aud,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **extra,
    }


async def post_form(http: httpx.AsyncClient, page_url: str, form: Form, **values: str) -> httpx.Response:
    data = {**form.fields, **values}
    return await http.post(urljoin(page_url, form.action), data=data)


def form_with(reader: FormReader, field_name: str) -> Form:
    for form in reader.forms:
        if any(item.get("name") == field_name for item in form.inputs + form.buttons):
            return form
    raise AssertionError(f"no form with {field_name}: {[f.action for f in reader.forms]}")


async def sign_in(
    http: httpx.AsyncClient,
    query: dict[str, str] | str,
    *,
    username: str,
    password: str,
    patient: str | None = None,
    decision: str = "approve",
) -> httpx.Response:
    """Follow the pages from the authorization request (its parameters, or its whole URL) to the
    redirect (not followed)."""
    page = await (http.get(query) if isinstance(query, str) else http.get("/auth/authorize", params=query))
    assert page.status_code == 200, page.text
    login = form_with(read_page(page.text), "password")
    page = await post_form(http, str(page.url), login, username=username, password=password)
    if page.status_code == 200 and 'name="patient"' in page.text:
        picker = form_with(read_page(page.text), "patient")
        assert patient is not None, "the picker was shown"
        page = await post_form(http, str(page.url), picker, patient=patient)
    assert page.status_code == 200, page.text
    consent = form_with(read_page(page.text), "decision")
    response = await post_form(http, str(page.url), consent, decision=decision)
    assert response.status_code == 303, response.text
    return response


async def follow_to_receiver(response: httpx.Response) -> None:
    """Let the real redirect target receive the redirect (a browser would follow it)."""
    async with httpx.AsyncClient() as outside:
        got = await outside.get(response.headers["location"])
        assert got.status_code == 200
