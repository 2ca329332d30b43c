"""The ``websocket`` channel of FHIR Subscriptions (Subscriptions R5 Backport IG 1.1 for R4,
"Channels: Websockets", and OperationDefinition backport-subscription-get-ws-binding-token).

Workflow (the IG's numbered steps):

1. A client creates a Subscription with ``channel.type`` = ``websocket`` (no endpoint); it is
   ``active`` at once (hooks.py) and the dispatcher counts its events as for any channel.
2. It asks for a binding token: ``binding_token`` below is the ``$get-ws-binding-token``
   operation at instance level. The answer is a ``Parameters`` with ``token``, ``expiration``,
   ``subscription`` (the full reference) and ``websocket-url``.
3. It connects to ``websocket-url`` (``{CARECOORD_BASE_URL}/fhir/ws``, ``ws://`` or ``wss://``
   as the base URL is http or https) and sends the text message ``bind-with-token: <token>``
   (``bind-with-token <token>``, as the IG's diagram also writes it, is accepted too). One
   socket may bind several subscriptions and bind again with a fresh token (that moves the
   binding's expiry; the IG: "repeated ... serially for continued operation").
4. The server answers each binding with a ``handshake`` Bundle, then sends every new event of
   the subscription as an ``event-notification`` Bundle (JSON text frames, at most
   ``backport-max-count`` events each, in event-number order, starting after the
   subscription's ``events-since-subscription-start`` at binding time), and a ``heartbeat``
   Bundle whenever nothing was sent on the binding for ``backport-heartbeat-period`` seconds.
   Bundles are read with the subscription owner's access (owner.py), as rest-hook ones are.
   Earlier or missed events are replayed by ``$events``. There are no acknowledgements (the
   IG: the client has "no responsibilities beyond reading the message").
5. A binding ends when its token expires (the client binds again with a new token before
   that, so that access is checked again: the IG's security note on revoking long-lived
   connections), when the Subscription is deleted, turned ``off`` or no longer a websocket
   one; the socket is closed when its last binding ends, or by either side at any time.

Refusals never surface as a 500: a bad, forged or expired token, an unknown message, or no
binding within ``BIND_WITHIN`` seconds closes the socket with code 1008 after an
OperationOutcome text frame saying why; a server fault closes it with 1011. A client that
reads too slowly (its send queue, ``SEND_QUEUE`` notifications, stays full for
``CARECOORD_SUBSCRIPTION_WS_SEND_TIMEOUT`` seconds) is closed with 1008 and recovers what it
missed with ``$events``: a socket holds at most that many notifications in memory.

Tokens are stateless: ``base64url(payload).base64url(HMAC-SHA256)`` under a server secret kept
in table ``server_key`` (as the paging cursor key, app/fhir/cursors.py), so any API process
verifies a token another issued. The payload names the subscriptions, their owner client at
issue time and the expiry.

Several processes: the socket lives in one API process, the dispatcher may run in another.
The dispatcher ``NOTIFY``s ``subscription_events`` with the Subscription id in the transaction
that records its events (and the write hook does on every write of a websocket Subscription);
each API process keeps one ``LISTEN`` connection (``SocketHub``, opened at the first binding)
and wakes its local bindings, which read the new events from their own cursor. A binding also
looks every ``RECHECK_SECONDS`` in case a notification was lost with the connection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from asyncpg import Connection, Pool, Record
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketState

from app import db
from app.fhir import jsonio
from app.fhir.errors import BusinessRule, Issue, NotFound, operation_outcome
from app.fhir.repository import FhirRepository, RepositoryFactory, fhir_instant
from app.fhir.validation import check_id
from app.settings import Settings
from app.subscriptions import metrics
from app.subscriptions.delivery import audit_attempt, disclosed
from app.subscriptions.jobs import EVENTS_CHANNEL
from app.subscriptions.notifications import load_events, notification_bundle
from app.subscriptions.owner import owner_access
from app.subscriptions.spec import WEBSOCKET

logger = logging.getLogger("carecoord.subscriptions")

WEBSOCKET_PATH = "/fhir/ws"
"""Where clients connect (the ``websocket-url`` of $get-ws-binding-token, under the base URL)."""

_KEY_NAME = "ws-binding-hmac"
MAX_MESSAGE_CHARS = 4096
"""Longest client message read (a ``bind-with-token`` line is far shorter)."""
WS_MAX_MESSAGE_BYTES = 16 * 1024
"""uvicorn's ``ws_max_size`` under ``carecoord serve``: longer client messages end the socket
(1009) before they are buffered."""
MAX_BINDINGS = 32
"""Subscriptions one socket may be bound to at once."""
MAX_SOCKETS_PER_SUBSCRIPTION = 8
"""Sockets of one server process bound to one subscription (a token binds any number)."""
MAX_BINDINGS_PER_PROCESS = 2000
"""Bindings one server process serves at once (each polls and builds its notifications)."""
SEND_QUEUE = 16
"""Notifications waiting to be written to one socket."""
BIND_WITHIN = 30.0
"""Seconds a new socket has to send its first ``bind-with-token``."""
RECHECK_SECONDS = 30.0
"""A bound subscription is looked at this often even without a notification."""
LISTEN_READY_SECONDS = 10.0

_BIND = re.compile(r"bind-with-token:?[ \t]*([A-Za-z0-9_.=-]{1,2000})[ \t\r\n]*")

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_SERVER_ERROR = 1011


# -- tokens ------------------------------------------------------------------------------------


class TokenRefused(Exception):
    """A binding token that does not bind (the message says why; it names no resource data)."""


@dataclass(frozen=True)
class Claims:
    subscriptions: tuple[str, ...]
    owners: tuple[str | None, ...]
    expires: float
    """Seconds since the epoch."""


class BindingTokens:
    """Issue and verify binding tokens under one HMAC key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def issue(self, subscriptions: list[tuple[str, str | None]], expires: int) -> str:
        payload = {
            "s": [s for s, _ in subscriptions],
            "o": [o for _, o in subscriptions],
            "x": expires,
            "n": secrets.token_urlsafe(12),
        }
        raw = json.dumps(payload, separators=(",", ":")).encode()
        return f"{_b64(raw)}.{_b64(self._mac(raw))}"

    def verify(self, token: str, now: float | None = None) -> Claims:
        try:
            raw_part, mac_part = token.split(".", 1)
            raw, mac = _unb64(raw_part), _unb64(mac_part)
        except ValueError as exc:
            raise TokenRefused("the binding token is not one this server issued") from exc
        if not hmac.compare_digest(mac, self._mac(raw)):
            raise TokenRefused("the binding token is not one this server issued")
        payload = json.loads(raw)
        claims = Claims(tuple(payload["s"]), tuple(payload["o"]), float(payload["x"]))
        if claims.expires <= (time.time() if now is None else now):
            raise TokenRefused(
                "the binding token expired; ask Subscription/[id]/$get-ws-binding-token for a new one"
            )
        return claims

    def _mac(self, raw: bytes) -> bytes:
        return hmac.new(self._key, b"ws-binding\0" + raw, hashlib.sha256).digest()


async def load_binding_tokens(conn: Connection) -> BindingTokens:
    """The token key, shared by every process through ``server_key``; created once."""
    secret = await conn.fetchval("SELECT secret FROM server_key WHERE name = $1", _KEY_NAME)
    if secret is None:
        await conn.execute(
            "INSERT INTO server_key (name, secret) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            _KEY_NAME,
            secrets.token_hex(32),
        )
        secret = await conn.fetchval("SELECT secret FROM server_key WHERE name = $1", _KEY_NAME)
    return BindingTokens(bytes.fromhex(secret))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def websocket_url(settings: Settings) -> str:
    """``ws://`` or ``wss://`` (as ``CARECOORD_BASE_URL`` is http or https) + ``/fhir/ws``."""
    scheme, _, rest = settings.base_url.partition("://")
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{WEBSOCKET_PATH}"


async def binding_token(repo: FhirRepository, settings: Settings, subscription_id: str) -> dict[str, Any]:
    """``Subscription/[id]/$get-ws-binding-token`` (Backport IG 1.1, OperationDefinition
    backport-subscription-get-ws-binding-token, instance level): a ``Parameters`` with
    ``token``, ``expiration``, ``subscription`` and ``websocket-url``.

    404 (410 when deleted) unless the caller may read the Subscription; 422 when it is not a
    websocket subscription or is ``off``. The token is valid for
    ``CARECOORD_SUBSCRIPTION_WS_TOKEN_LIFETIME`` seconds (5 minutes by default)."""
    check_id(subscription_id)
    await repo.read("Subscription", subscription_id)
    conn = await repo.db()
    row = await conn.fetchrow("SELECT * FROM subscription WHERE fhir_id = $1", subscription_id)
    if row is None:
        raise NotFound(f"Subscription/{subscription_id} is not known")
    if row["end_at"] is not None and row["end_at"] <= datetime.now(UTC):
        raise BusinessRule(f"Subscription/{subscription_id} has ended", expression=("Subscription.end",))
    if row["channel_type"] != WEBSOCKET:
        raise BusinessRule(
            f"Subscription/{subscription_id} is not a websocket subscription"
            f" (its channel.type is {row['channel_type']})",
            expression=("Subscription.channel.type",),
        )
    if row["status"] == "off":
        raise BusinessRule(
            f"Subscription/{subscription_id} is off: set its status to requested to use it again",
            expression=("Subscription.status",),
        )
    tokens = await load_binding_tokens(conn)
    expires = int(time.time() + settings.subscription_ws_token_lifetime)
    token = tokens.issue([(subscription_id, row["owner_client"])], expires)
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "token", "valueString": token},
            {"name": "expiration", "valueDateTime": fhir_instant(datetime.fromtimestamp(expires, UTC))},
            {"name": "subscription", "valueString": f"{settings.fhir_base}/Subscription/{subscription_id}"},
            {"name": "websocket-url", "valueUrl": websocket_url(settings)},
        ],
    }


# -- the process's LISTEN connection -------------------------------------------------------------


class SocketHub:
    """One ``LISTEN subscription_events`` connection per API process, opened at the first
    binding and kept until shutdown (reopened if it is lost), waking the local bindings of the
    subscription each notification names."""

    def __init__(self, pool: Pool, settings: Settings, repositories: RepositoryFactory) -> None:
        self.pool = pool
        self.settings = settings
        self.repositories = repositories
        self._dsn = db.asyncpg_dsn(settings.database_url) if settings.database_url else None
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def attach(self, subscription_id: str, wake: asyncio.Event) -> None:
        """Wake ``wake`` on every notification for the subscription; returns once listening."""
        self._waiters[subscription_id].add(wake)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._listen(), name="subscription-websocket-listen")
        try:
            await asyncio.wait_for(self._ready.wait(), LISTEN_READY_SECONDS)
        except BaseException:  # not listening in time, or the socket went meanwhile
            self.detach(subscription_id, wake)
            raise

    def detach(self, subscription_id: str, wake: asyncio.Event) -> None:
        waiters = self._waiters.get(subscription_id)
        if waiters is not None:
            waiters.discard(wake)
            if not waiters:
                del self._waiters[subscription_id]

    def bound(self, subscription_id: str) -> int:
        """How many sockets of this process are bound to the subscription."""
        return len(self._waiters.get(subscription_id, ()))

    def total(self) -> int:
        """How many bindings this process serves."""
        return sum(len(waiters) for waiters in self._waiters.values())

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        for wake in self._waiters.get(payload, ()):
            wake.set()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for wake in waiters:
                wake.set()

    async def _listen(self) -> None:
        while True:
            try:
                await self._listen_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database went away: listen again shortly
                logger.error("subscription websocket listener: %s", type(exc).__name__)
            self._wake_all()
            await asyncio.sleep(1.0)

    async def _listen_once(self) -> None:
        """Listen until the connection is lost."""
        lost = asyncio.Event()
        conn: Connection = await asyncpg.connect(self._dsn)
        try:
            conn.add_termination_listener(lambda _c: lost.set())
            await conn.add_listener(EVENTS_CHANNEL, self._notified)
            self._ready.set()
            self._wake_all()  # anything committed while nothing listened
            await lost.wait()
        finally:
            self._ready.clear()
            with contextlib.suppress(Exception):
                await conn.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None


# -- one socket ---------------------------------------------------------------------------------


@dataclass
class _Binding:
    subscription_id: str
    expires: float
    """Loop time."""
    cursor: int
    """The last event number sent (or skipped at binding time)."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    handshake_pending: bool = True
    task: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class _Outgoing:
    text: str
    subscription_id: str | None = None
    last_event: int = 0
    events: int = 0
    oldest: datetime | None = None
    shown: tuple[tuple[str, str, int], ...] = ()
    """(type, id, version) of the resources the notification names (its AuditEvent's entities)."""


class _Session:
    """A connected socket: a reader (bind messages), one task per binding, one writer."""

    def __init__(self, websocket: WebSocket, hub: SocketHub) -> None:
        self.ws = websocket
        self.hub = hub
        self.pool = hub.pool
        self.fhir_base = hub.settings.fhir_base
        self.bindings: dict[str, _Binding] = {}
        self.queue: asyncio.Queue[_Outgoing] = asyncio.Queue(maxsize=SEND_QUEUE)
        self.closing = asyncio.Event()
        self.close_code = CLOSE_NORMAL
        self.close_reason = ""
        self.close_outcome: dict[str, Any] | None = None

    def close(self, code: int, reason: str, outcome: str | None = None, severity: str = "error") -> None:
        """End the session (the first reason wins); ``outcome`` is sent before the close frame."""
        if self.closing.is_set():
            return
        self.close_code, self.close_reason = code, reason[:120]
        if outcome is not None:
            code_name = {CLOSE_POLICY: "security", CLOSE_NORMAL: "informational"}.get(code, "processing")
            self.close_outcome = operation_outcome([Issue(code_name, outcome, severity=severity)])
        self.closing.set()

    async def run(self) -> None:
        await self.ws.accept()
        loop = asyncio.get_running_loop()
        reader = asyncio.create_task(self._read())
        writer = asyncio.create_task(self._write())
        closing = asyncio.create_task(self.closing.wait())
        try:
            await asyncio.wait({reader, writer, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            tasks = [reader, writer, closing, *(b.task for b in self.bindings.values() if b.task)]
            for task in tasks:
                task.cancel()
            for binding in self.bindings.values():
                self.hub.detach(binding.subscription_id, binding.wake)
            self.bindings.clear()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.closing.is_set() and self.ws.client_state == WebSocketState.CONNECTED:
            deadline = loop.time() + 5
            with contextlib.suppress(Exception):
                if self.close_outcome is not None:
                    await asyncio.wait_for(
                        self.ws.send_text(jsonio.dumps(self.close_outcome).decode()), deadline - loop.time()
                    )
                await asyncio.wait_for(
                    self.ws.close(self.close_code, self.close_reason), max(deadline - loop.time(), 0.1)
                )

    # -- reading ------------------------------------------------------------------------------

    async def _read(self) -> None:
        """Bind messages until the client disconnects."""
        loop = asyncio.get_running_loop()
        first_by = loop.time() + BIND_WITHIN
        while True:
            try:
                if self.bindings:
                    message = await self.ws.receive()
                else:
                    message = await asyncio.wait_for(self.ws.receive(), max(first_by - loop.time(), 0.01))
            except TimeoutError:
                self.close(
                    CLOSE_POLICY,
                    "no bind-with-token",
                    f"send 'bind-with-token: <token>' within {BIND_WITHIN:.0f} seconds of connecting",
                )
                return
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None and message.get("bytes") is not None:
                text = bytes(message["bytes"][:MAX_MESSAGE_CHARS]).decode("utf-8", "replace")
            match = _BIND.fullmatch(text or "") if len(text or "") <= MAX_MESSAGE_CHARS else None
            if match is None:
                self.close(
                    CLOSE_POLICY,
                    "unknown message",
                    "the only message a client sends is 'bind-with-token: <token>'",
                )
                return
            try:
                await self._bind(match.group(1))
            except TokenRefused as exc:
                self.close(CLOSE_POLICY, "binding token refused", str(exc))
                return
            except Exception as exc:  # the database is unavailable: nothing was bound
                logger.error("subscription websocket bind: %s", type(exc).__name__)
                self.close(CLOSE_SERVER_ERROR, "server error; connect and bind again", "server error")
                return

    async def _bind(self, token: str) -> None:
        """Bind the token's subscriptions: each gets a handshake, then its new events."""
        async with self.pool.acquire() as conn:
            claims = (await load_binding_tokens(conn)).verify(token)
            rows = {}
            for subscription_id, owner in zip(claims.subscriptions, claims.owners, strict=True):
                row = await _subscription(conn, subscription_id)
                refusal = _unbindable(row, subscription_id)
                if refusal is None and row is not None and row["owner_client"] != owner:
                    refusal = f"Subscription/{subscription_id} changed hands since the token was issued"
                if refusal is None and row is not None and await owner_access(conn, row) is None:
                    refusal = f"Subscription/{subscription_id}: its client is no longer registered"
                if refusal is None and self.hub.bound(subscription_id) >= MAX_SOCKETS_PER_SUBSCRIPTION:
                    refusal = (
                        f"Subscription/{subscription_id} has {MAX_SOCKETS_PER_SUBSCRIPTION} sockets bound"
                        " in this server process already"
                    )
                if refusal is None and self.hub.total() >= MAX_BINDINGS_PER_PROCESS:
                    refusal = "this server process has as many websocket bindings as it serves; try later"
                if refusal is not None:
                    raise TokenRefused(refusal)
                rows[subscription_id] = row
        loop = asyncio.get_running_loop()
        expires = loop.time() + (claims.expires - time.time())
        for subscription_id in claims.subscriptions:
            binding = self.bindings.get(subscription_id)
            if binding is not None:  # bound again: a new handshake, a later expiry, same cursor
                binding.expires = max(binding.expires, expires)
                binding.handshake_pending = True
                binding.wake.set()
                continue
            if len(self.bindings) >= MAX_BINDINGS:
                raise TokenRefused(f"a socket may be bound to at most {MAX_BINDINGS} subscriptions")
            binding = _Binding(subscription_id, expires, cursor=0)
            # Listening before the cursor is read: no event committed after it goes unnoticed.
            await self.hub.attach(subscription_id, binding.wake)
            try:
                count = await self.pool.fetchval(
                    "SELECT events_count FROM subscription WHERE fhir_id = $1", subscription_id
                )
            except BaseException:
                self.hub.detach(subscription_id, binding.wake)
                raise
            binding.cursor = int(count or 0)
            self.bindings[subscription_id] = binding
            binding.task = asyncio.create_task(self._serve(binding))
        logger.info("subscription websocket bound to %s", ", ".join(claims.subscriptions))

    # -- one binding --------------------------------------------------------------------------

    async def _serve(self, binding: _Binding) -> None:
        try:
            await self._serve_binding(binding)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.error("subscription websocket %s: %s", binding.subscription_id, type(exc).__name__)
            self.close(CLOSE_SERVER_ERROR, "server error; connect and bind again", "server error")

    async def _serve_binding(self, binding: _Binding) -> None:
        loop = asyncio.get_running_loop()
        last_sent = loop.time()
        while True:
            binding.wake.clear()
            now = loop.time()
            if now >= binding.expires:
                self._unbind(binding, "the binding token expired")
                return
            outgoing: _Outgoing | None = None
            heartbeat_due: float | None = None
            async with self.pool.acquire() as conn:
                row = await _subscription(conn, binding.subscription_id)
                refusal = _unbindable(row, binding.subscription_id)
                if refusal is None and row is not None and await owner_access(conn, row) is None:
                    refusal = "the subscription's client is no longer registered"
                if refusal is not None or row is None:
                    self._unbind(binding, refusal or "gone")
                    return
                if row["heartbeat_seconds"]:
                    heartbeat_due = last_sent + float(row["heartbeat_seconds"])
                if binding.handshake_pending:
                    binding.handshake_pending = False
                    outgoing = _Outgoing(await _text(None, row, self.fhir_base, "handshake"))
                else:
                    outgoing = await self._events(conn, row, binding)
                if outgoing is None and heartbeat_due is not None and now >= heartbeat_due:
                    outgoing = _Outgoing(await _text(None, row, self.fhir_base, "heartbeat"))
            if outgoing is not None:
                await self._enqueue(outgoing)
                last_sent = loop.time()
                continue
            timeout = min(binding.expires - now, RECHECK_SECONDS)
            if heartbeat_due is not None:
                timeout = min(timeout, heartbeat_due - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(binding.wake.wait(), max(timeout, 0.01))

    async def _events(self, conn: Connection, row: Record, binding: _Binding) -> _Outgoing | None:
        """The next notification of events after the binding's cursor (None: none yet)."""
        if row["events_count"] <= binding.cursor:
            return None
        events = await load_events(
            conn, binding.subscription_id, binding.cursor, row["events_count"], row["max_count"]
        )
        if not events:  # expired meanwhile ($events has no more of them either)
            binding.cursor = row["events_count"]
            return None
        access = await owner_access(conn, row)
        repo = None if access is None else self.hub.repositories.for_client(conn, access)
        bundle = await notification_bundle(repo, row, self.fhir_base, "event-notification", events)
        binding.cursor = events[-1].number
        return _Outgoing(
            jsonio.dumps(bundle).decode(),
            binding.subscription_id,
            events[-1].number,
            len(events),
            min(e.occurred_at for e in events),
            tuple(disclosed(bundle)),
        )

    def _unbind(self, binding: _Binding, reason: str) -> None:
        self.bindings.pop(binding.subscription_id, None)
        self.hub.detach(binding.subscription_id, binding.wake)
        if not self.bindings:
            self.close(CLOSE_NORMAL, reason[:120], reason, severity="information")
            return
        note = f"Subscription/{binding.subscription_id}: {reason}"
        outcome = operation_outcome([Issue("informational", note, severity="information")])
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(_Outgoing(jsonio.dumps(outcome).decode()))

    async def _enqueue(self, outgoing: _Outgoing) -> None:
        waited = self.hub.settings.subscription_ws_send_timeout
        try:
            await asyncio.wait_for(self.queue.put(outgoing), waited)
        except TimeoutError:
            self.close(
                CLOSE_POLICY,
                "client too slow; missed events are in $events",
                f"the client read too slowly: notifications waited longer than {waited:g} seconds;"
                " recover missed events with $events and bind again",
            )
            await asyncio.Event().wait()  # cancelled by run()

    # -- writing ------------------------------------------------------------------------------

    async def _write(self) -> None:
        while True:
            outgoing = await self.queue.get()
            await self.ws.send_text(outgoing.text)
            if outgoing.subscription_id is None:
                continue
            metrics.NOTIFICATIONS_SENT.inc()
            metrics.EVENTS_DELIVERED.inc(outgoing.events)
            if outgoing.oldest is not None:
                metrics.DELIVERY_LATENCY.observe(
                    max((datetime.now(UTC) - outgoing.oldest).total_seconds(), 0.0)
                )
            # Sent (written to the connection): the subscription's lag metrics and listing move.
            await self._delivered(outgoing)

    async def _delivered(self, outgoing: _Outgoing) -> None:
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "UPDATE subscription SET delivered_through = GREATEST(delivered_through, $2),"
                    " last_sent_at = now() WHERE fhir_id = $1",
                    outgoing.subscription_id,
                    outgoing.last_event,
                )
                # Each notification sent is audited with what it disclosed, as on rest-hook.
                await audit_attempt(
                    self.hub.repositories,
                    conn,
                    str(outgoing.subscription_id),
                    "event-notification (websocket)",
                    None,
                    outgoing.shown,
                )
        except Exception as exc:  # bookkeeping only: the socket goes on
            logger.error("subscription websocket %s: %s", outgoing.subscription_id, type(exc).__name__)


async def _subscription(conn: Connection, subscription_id: str) -> Record | None:
    """The working state of a Subscription that exists (a deleted one keeps its state, off)."""
    row: Record | None = await conn.fetchrow(
        "SELECT s.* FROM subscription s JOIN resource r ON r.resource_type = 'Subscription'"
        " AND r.fhir_id = s.fhir_id AND NOT r.deleted WHERE s.fhir_id = $1",
        subscription_id,
    )
    return row


def _unbindable(row: Record | None, subscription_id: str) -> str | None:
    """Why the subscription cannot be (or stay) bound; None when it can."""
    if row is None:
        return f"Subscription/{subscription_id} no longer exists"
    if row["channel_type"] != WEBSOCKET:
        return f"Subscription/{subscription_id} is no longer a websocket subscription"
    if row["status"] == "off":
        return f"Subscription/{subscription_id} is off"
    if row["end_at"] is not None and row["end_at"] <= datetime.now(UTC):
        return f"Subscription/{subscription_id} has ended (Subscription.end)"
    return None


async def _text(repo: FhirRepository | None, row: Record, fhir_base: str, kind: str, events: Any = ()) -> str:
    bundle = await notification_bundle(repo, row, fhir_base, kind, events)
    return jsonio.dumps(bundle).decode()


router = APIRouter()


@router.websocket(WEBSOCKET_PATH)
async def subscription_socket(websocket: WebSocket) -> None:
    """The websocket channel's endpoint (module docstring; Backport IG 1.1 "Channels:
    Websockets"): ``bind-with-token: <token>`` in, notification Bundles out."""
    hub: SocketHub = websocket.app.state.ws_hub
    await _Session(websocket, hub).run()
