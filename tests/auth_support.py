"""Helpers for the authorization server tests: a loopback JWKS server, client keys, assertions."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class JwksServer:
    """A real HTTP server on 127.0.0.1 serving JSON documents by path (JWK Sets), in a thread."""

    def __init__(self) -> None:
        self.documents: dict[str, Any] = {}
        self.cache_control: dict[str, str] = {}
        self.hits: dict[str, int] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits[self.path] = owner.hits.get(self.path, 0) + 1
                document = owner.documents.get(self.path)
                if document is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                body = json.dumps(document).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                if self.path in owner.cache_control:
                    self.send_header("cache-control", owner.cache_control[self.path])
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> JwksServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"


def client_key(alg: str, kid: str | None = None) -> ECKey | RSAKey:
    """A fresh private key for ``alg`` (ES384/ES256 on the matching curve, RS* 2048-bit RSA)."""
    parameters: dict[str, str] = {"kid": kid or uuid.uuid4().hex}
    if alg == "ES384":
        return ECKey.generate_key("P-384", parameters=parameters)  # type: ignore[arg-type]
    if alg == "ES256":
        return ECKey.generate_key("P-256", parameters=parameters)  # type: ignore[arg-type]
    return RSAKey.generate_key(2048, parameters=parameters)  # type: ignore[arg-type]


def public_jwks(*keys: ECKey | RSAKey) -> dict[str, Any]:
    return {"keys": [key.as_dict(private=False) for key in keys]}


def sign_assertion(
    key: ECKey | RSAKey,
    client_id: str,
    audience: str,
    *,
    alg: str,
    kid: str | None = None,
    header: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A SMART Backend Services client assertion; ``claims`` override or (value None) drop defaults."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "exp": now + 240,
        "iat": now,
        "jti": uuid.uuid4().hex,
    }
    payload.update(claims)
    payload = {name: value for name, value in payload.items() if value is not None}
    jws_header = {"alg": alg, "kid": kid if kid is not None else key.kid, "typ": "JWT", **(header or {})}
    return jwt.encode(jws_header, payload, key, algorithms=[alg])


def assertion_form(assertion: str, **extra: str) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
        **extra,
    }
