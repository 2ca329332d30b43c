"""Opaque, tamper-evident paging cursors (keyset paging, search.html#paging).

A cursor is ``base64url(payload).base64url(hmac)``; the payload is JSON the server
wrote. A cursor that was edited or signed by another key is a 400, never a query.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from typing import Any

import asyncpg

from app.fhir.errors import BadRequest

_KEY_NAME = "cursor-hmac"


class CursorCodec:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def encode(self, payload: Any) -> str:
        raw = json.dumps(payload, separators=(",", ":")).encode()
        mac = hmac.new(self._key, raw, hashlib.sha256).digest()[:16]
        return f"{_b64(raw)}.{_b64(mac)}"

    def decode(self, cursor: str, parameter: str = "_cursor") -> Any:
        try:
            raw_part, mac_part = cursor.split(".", 1)
            raw = _unb64(raw_part)
            mac = _unb64(mac_part)
        except ValueError as exc:
            raise BadRequest(
                f"{parameter}: not a cursor issued by this server", expression=(parameter,)
            ) from exc
        expected = hmac.new(self._key, raw, hashlib.sha256).digest()[:16]
        if not hmac.compare_digest(mac, expected):
            raise BadRequest(f"{parameter}: not a cursor issued by this server", expression=(parameter,))
        return json.loads(raw)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


async def load_cursor_codec(pool: asyncpg.Pool) -> CursorCodec:
    """The cursor key is shared by every process through the database; created once."""
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO server_key (name, secret) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            _KEY_NAME,
            secrets.token_hex(32),
        )
        secret = await conn.fetchval("SELECT secret FROM server_key WHERE name = $1", _KEY_NAME)
    return CursorCodec(bytes.fromhex(secret))
