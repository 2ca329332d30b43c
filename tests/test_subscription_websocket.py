"""The websocket channel of FHIR Subscriptions (Backport IG 1.1 for R4, "Channels: Websockets";
app/subscriptions/websocket.py), over real sockets.

The app runs under a real uvicorn server on a loopback port, without background work; the
subscription dispatcher runs beside it on the session app's own pool (as a ``carecoord worker``
process would), so events reach the sockets only through PostgreSQL's ``NOTIFY``. Clients are
the ``websockets`` library and httpx. Tests await messages with a timeout, never sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app.auth.clients import remove_client
from app.background import background_tasks
from app.fhir.errors import BadRequest, BusinessRule, Gone, NotFound
from app.main import create_app
from app.settings import Settings
from app.subscriptions.websocket import WS_MAX_MESSAGE_BYTES, load_binding_tokens
from tests.conftest import bearer
from tests.partner_support import free_port
from tests.server_support import running_server
from tests.test_subscriptions import BACKPORT, TASK_TOPIC, status_of, task, wait_until

RECEIVE_TIMEOUT = 15.0


@dataclass
class Served:
    app: FastAPI
    base: str
    http: httpx.AsyncClient

    @property
    def fhir(self) -> str:
        return f"{self.base}/fhir"


@asynccontextmanager
async def serving(app: FastAPI, settings: Settings, **overrides: Any) -> AsyncIterator[Served]:
    """carecoord under uvicorn on a loopback port (no background work in it), and the
    dispatcher and job runner running elsewhere (the session app's pool)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    application = create_app(settings.model_copy(update={"base_url": base, "run_worker": False, **overrides}))
    config = uvicorn.Config(
        application,
        host="127.0.0.1",
        port=port,
        log_config=None,
        lifespan="on",
        ws_max_size=WS_MAX_MESSAGE_BYTES,  # as `carecoord serve`
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started or task.done(), "uvicorn to start")
        assert not task.done(), "uvicorn did not start"
        async with (
            background_tasks(app.state.pool, app.state.http, settings, app.state.repositories),
            httpx.AsyncClient(trust_env=False, timeout=30) as http,
        ):
            http.headers["accept"] = "application/fhir+json"
            # Tokens of the served app: their issuer is its base URL.
            http.headers.update(await bearer(application))
            yield Served(application, base, http)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@pytest.fixture
async def served(app: FastAPI, settings: Settings, clean_db: None) -> AsyncIterator[Served]:
    async with serving(app, settings) as running:
        yield running


def ws_subscription(
    *, content: str = "id-only", heartbeat: int | None = None, max_count: int | None = None
) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "type": "websocket",
        "payload": "application/fhir+json",
        "_payload": {"extension": [{"url": f"{BACKPORT}/backport-payload-content", "valueCode": content}]},
    }
    extensions = []
    if heartbeat is not None:
        extensions.append({"url": f"{BACKPORT}/backport-heartbeat-period", "valueUnsignedInt": heartbeat})
    if max_count is not None:
        extensions.append({"url": f"{BACKPORT}/backport-max-count", "valuePositiveInt": max_count})
    if extensions:
        channel["extension"] = extensions
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "websocket test",
        "criteria": TASK_TOPIC,
        "channel": channel,
    }


async def create_ws_subscription(
    served: Served, headers: dict[str, str] | None = None, **options: Any
) -> str:
    response = await served.http.post(
        f"{served.fhir}/Subscription", json=ws_subscription(**options), headers=headers
    )
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "active"  # no handshake to wait for
    return str(response.json()["id"])


async def get_token(
    served: Served, subscription_id: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """``GET Subscription/[id]/$get-ws-binding-token`` over HTTP as the caller of ``headers``;
    a refusal raises the FHIRError its OperationOutcome stands for (404, 422...)."""
    response = await served.http.get(
        f"{served.fhir}/Subscription/{subscription_id}/$get-ws-binding-token", headers=headers
    )
    if response.status_code != 200:
        assert response.json()["resourceType"] == "OperationOutcome"
        error = {404: NotFound, 410: Gone, 422: BusinessRule, 400: BadRequest}[response.status_code]
        raise error(response.text)
    parameters: dict[str, Any] = response.json()
    return parameters


def parameter(parameters: dict[str, Any], name: str) -> Any:
    [value] = [
        v for p in parameters["parameter"] if p["name"] == name for k, v in p.items() if k.startswith("value")
    ]
    return value


async def receive(ws: ClientConnection) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.recv(), RECEIVE_TIMEOUT)
    assert isinstance(message, str)  # JSON text frames
    parsed: dict[str, Any] = json.loads(message)
    return parsed


async def bind(served: Served, subscription_id: str) -> ClientConnection:
    """A socket bound to the subscription, its handshake received."""
    token = await get_token(served, subscription_id)
    ws = await connect(parameter(token, "websocket-url"), proxy=None)
    await ws.send(f"bind-with-token: {parameter(token, 'token')}")
    handshake = status_of(await receive(ws))
    assert handshake["type"] == "handshake"
    assert handshake["subscription"]["reference"].endswith(f"/Subscription/{subscription_id}")
    return ws


async def event_numbers(ws: ClientConnection, count: int) -> tuple[list[int], list[dict[str, Any]]]:
    """Receive event notifications until ``count`` events came (heartbeats skipped)."""
    numbers: list[int] = []
    received: list[dict[str, Any]] = []
    while len(numbers) < count:
        bundle = await receive(ws)
        status = status_of(bundle)
        if status["type"] == "heartbeat":
            continue
        assert status["type"] == "event-notification", status
        received.append(bundle)
        numbers.extend(int(e["event-number"]) for e in status["notification-event"])
    return numbers, received


async def closed(ws: ClientConnection) -> tuple[ConnectionClosed, list[dict[str, Any]]]:
    """What the server sent before closing, and the close."""
    before: list[dict[str, Any]] = []
    while True:
        try:
            before.append(await receive(ws))
        except ConnectionClosed as exc:
            return exc, before


async def test_binding_token_parameters(served: Served) -> None:
    subscription_id = await create_ws_subscription(served)
    answer = await get_token(served, subscription_id)
    assert answer["resourceType"] == "Parameters"
    names = [p["name"] for p in answer["parameter"]]
    assert names == ["token", "expiration", "subscription", "websocket-url"]
    assert parameter(answer, "websocket-url") == served.base.replace("http://", "ws://") + "/fhir/ws"
    assert parameter(answer, "subscription") == f"{served.fhir}/Subscription/{subscription_id}"
    expiration = parameter(answer, "expiration")
    assert expiration.endswith("Z")
    again = await get_token(served, subscription_id)
    assert parameter(again, "token") != parameter(answer, "token")


async def test_handshake_then_numbered_events_at_most_max_count_a_bundle(served: Served) -> None:
    subscription_id = await create_ws_subscription(served, max_count=2)
    await served.http.post(f"{served.fhir}/Task", json=task())  # before binding: $events has it
    await wait_until(lambda: _events_count(served, subscription_id), "the event before binding to be counted")
    ws = await bind(served, subscription_id)
    try:
        created = [(await served.http.post(f"{served.fhir}/Task", json=task())).json() for _ in range(5)]
        numbers, bundles = await event_numbers(ws, 5)
        assert numbers == [2, 3, 4, 5, 6]  # contiguous, in order, from after the binding
        assert all(len(status_of(b)["notification-event"]) <= 2 for b in bundles)
        focus = [
            e["focus"]["reference"].rsplit("/", 1)[-1]
            for b in bundles
            for e in status_of(b)["notification-event"]
        ]
        assert focus == [t["id"] for t in created]
        assert all(status_of(b)["status"] == "active" for b in bundles)
        assert status_of(bundles[-1])["events-since-subscription-start"] == "6"

        async def delivered() -> bool:
            value = await served.app.state.pool.fetchval(
                "SELECT delivered_through FROM subscription WHERE fhir_id = $1", subscription_id
            )
            return bool(value == 6)

        await wait_until(delivered, "delivered_through to reach 6")
    finally:
        await ws.close()


async def _events_count(served: Served, subscription_id: str) -> int:
    count = await served.app.state.pool.fetchval(
        "SELECT events_count FROM subscription WHERE fhir_id = $1", subscription_id
    )
    return int(count or 0)


async def test_full_resource_content_over_the_socket(served: Served) -> None:
    subscription_id = await create_ws_subscription(served, content="full-resource")
    ws = await bind(served, subscription_id)
    try:
        created = (await served.http.post(f"{served.fhir}/Task", json=task())).json()
        _, [bundle] = await event_numbers(ws, 1)
        [entry] = bundle["entry"][1:]
        assert entry["resource"]["id"] == created["id"]
        assert entry["request"]["method"] == "POST"
    finally:
        await ws.close()


async def test_two_sockets_on_one_subscription_both_get_the_events(served: Served) -> None:
    subscription_id = await create_ws_subscription(served)
    first = await bind(served, subscription_id)
    second = await bind(served, subscription_id)
    try:
        await served.http.post(f"{served.fhir}/Task", json=task())
        assert (await event_numbers(first, 1))[0] == [1]
        assert (await event_numbers(second, 1))[0] == [1]
        await first.close()  # closing one socket unbinds it only
        await served.http.post(f"{served.fhir}/Task", json=task())
        assert (await event_numbers(second, 1))[0] == [2]
    finally:
        await first.close()
        await second.close()


async def test_heartbeats_when_nothing_happens(served: Served) -> None:
    subscription_id = await create_ws_subscription(served, heartbeat=1)
    ws = await bind(served, subscription_id)
    try:
        kinds = [status_of(await receive(ws))["type"] for _ in range(2)]
        assert kinds == ["heartbeat", "heartbeat"]
    finally:
        await ws.close()


@pytest.mark.parametrize("message", ["bind-with-token: abc.def", "bind-with-token: ", "hello"])
async def test_a_bad_token_or_message_closes_the_socket_with_a_reason(served: Served, message: str) -> None:
    ws = await connect(served.base.replace("http://", "ws://") + "/fhir/ws", proxy=None)
    await ws.send(message)
    close, before = await closed(ws)
    assert close.rcvd is not None and close.rcvd.code == 1008
    [outcome] = before
    assert outcome["resourceType"] == "OperationOutcome"


async def test_forged_and_expired_tokens_are_refused(served: Served) -> None:
    subscription_id = await create_ws_subscription(served)
    token = parameter(await get_token(served, subscription_id), "token")
    payload, mac = token.split(".")
    forged = f"{payload}.{mac[:-2]}{'AA' if not mac.endswith('AA') else 'BB'}"
    async with served.app.state.pool.acquire() as conn:
        tokens = await load_binding_tokens(conn)
    expired = tokens.issue([(subscription_id, "test-client")], int(time.time()) - 1)
    for bad, says in ((forged, "not one this server issued"), (expired, "expired")):
        ws = await connect(served.base.replace("http://", "ws://") + "/fhir/ws", proxy=None)
        await ws.send(f"bind-with-token: {bad}")
        close, [outcome] = await closed(ws)
        assert close.rcvd is not None and close.rcvd.code == 1008
        assert says in outcome["issue"][0]["diagnostics"]


async def test_another_clients_subscription_gets_no_token(served: Served) -> None:
    scopes = "system/Task.rs system/Subscription.crud"
    app = served.app
    partner_a = await bearer(app, scopes, client_id="ws-partner-a", organization="Organization/pa")
    partner_b = await bearer(app, scopes, client_id="ws-partner-b", organization="Organization/pb")
    subscription_id = await create_ws_subscription(served, headers=partner_a)
    assert parameter(await get_token(served, subscription_id, partner_a), "token")
    with pytest.raises(NotFound):
        await get_token(served, subscription_id, partner_b)
    with pytest.raises(NotFound):
        await get_token(served, "no-such-subscription")


async def test_a_rest_hook_subscription_gets_no_token(served: Served) -> None:
    body = {
        **ws_subscription(),
        "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook"},
    }
    response = await served.http.post(f"{served.fhir}/Subscription", json=body)
    assert response.status_code == 201, response.text
    with pytest.raises(BusinessRule):
        await get_token(served, response.json()["id"])


async def test_a_websocket_channel_takes_no_endpoint(served: Served) -> None:
    body = ws_subscription()
    body["channel"]["endpoint"] = "wss://example.org/ws"
    response = await served.http.post(f"{served.fhir}/Subscription", json=body)
    assert response.status_code == 400
    assert "endpoint" in response.text


async def test_deleting_the_subscription_unbinds_and_closes(served: Served) -> None:
    subscription_id = await create_ws_subscription(served)
    ws = await bind(served, subscription_id)
    deleted = await served.http.delete(f"{served.fhir}/Subscription/{subscription_id}")
    assert deleted.status_code in (200, 204)
    close, before = await closed(ws)
    assert close.rcvd is not None and close.rcvd.code == 1000
    assert before[-1]["resourceType"] == "OperationOutcome"
    assert "no longer exists" in before[-1]["issue"][0]["diagnostics"]


async def test_a_binding_ends_when_its_token_expires_unless_bound_again(served: Served) -> None:
    subscription_id = await create_ws_subscription(served)
    async with served.app.state.pool.acquire() as conn:
        tokens = await load_binding_tokens(conn)
    ws = await connect(served.base.replace("http://", "ws://") + "/fhir/ws", proxy=None)
    short = tokens.issue([(subscription_id, "test-client")], int(time.time()) + 2)
    await ws.send(f"bind-with-token {short}")  # as the IG's diagram writes it, without the colon
    assert status_of(await receive(ws))["type"] == "handshake"
    # Bound again with a fresh token: a new handshake, and the binding outlives the first token.
    await ws.send(f"bind-with-token: {parameter(await get_token(served, subscription_id), 'token')}")
    assert status_of(await receive(ws))["type"] == "handshake"
    await served.http.post(f"{served.fhir}/Task", json=task())
    assert (await event_numbers(ws, 1))[0] == [1]
    await ws.close()

    ws = await connect(served.base.replace("http://", "ws://") + "/fhir/ws", proxy=None)
    short = tokens.issue([(subscription_id, "test-client")], int(time.time()) + 2)
    await ws.send(f"bind-with-token: {short}")
    assert status_of(await receive(ws))["type"] == "handshake"
    close, [outcome] = await closed(ws)  # not bound again: the binding ends with its token
    assert close.rcvd is not None and close.rcvd.code == 1000 and "expired" in close.rcvd.reason
    assert outcome["issue"][0]["severity"] == "information"


async def test_a_client_that_reads_too_slowly_is_closed_and_memory_stays_bounded(
    app: FastAPI, settings: Settings, clean_db: None
) -> None:
    """The client stops reading: the server's writes block, its bounded queue fills, and after
    CARECOORD_SUBSCRIPTION_WS_SEND_TIMEOUT the socket is closed. What arrived is contiguous from
    event 1; the rest stays in the database for $events."""
    async with serving(app, settings, subscription_ws_send_timeout=1) as served:
        subscription_id = await create_ws_subscription(served, content="full-resource", max_count=1)
        token = await get_token(served, subscription_id)
        # A small receive buffer, the client library buffering one frame, and no compression
        # (repeated text deflates to nothing): the client's side fills after a few kilobytes.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(served.base.rsplit(":", 1)[1])))
        ws = await connect(
            parameter(token, "websocket-url"), sock=sock, proxy=None, max_queue=1, compression=None
        )
        await ws.send(f"bind-with-token: {parameter(token, 'token')}")
        # About 8 MB of notifications (400 of 20 kB): more than the kernel's socket buffers
        # (tcp_wmem allows 4 MB) and the transport's 64 kB hold, so the server's writes block.
        total, per_request = 400, 3
        for first in range(0, total, per_request):
            entries = [
                {"resource": task(description="x" * 20_000), "request": {"method": "POST", "url": "Task"}}
                for _ in range(min(per_request, total - first))
            ]
            bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
            answer = await served.http.post(served.fhir, json=bundle)
            assert answer.status_code == 200, answer.text

        async def counted() -> bool:
            return await _events_count(served, subscription_id) == total

        await wait_until(counted, "every event to be counted")
        hub = served.app.state.ws_hub
        await wait_until(lambda: hub.bound(subscription_id) == 0, "the slow socket to be unbound", 60)

        # The client reads again: what was written before the server gave up, then why it did.
        close, received = await closed(ws)
        *bundles, outcome = received
        numbers = [int(e["event-number"]) for b in bundles[1:] for e in status_of(b)["notification-event"]]
        assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) < total, len(numbers)
        assert "too slowly" in outcome["issue"][0]["diagnostics"]
        assert close.rcvd is not None and close.rcvd.code == 1008
        delivered = await served.app.state.pool.fetchval(
            "SELECT delivered_through FROM subscription WHERE fhir_id = $1", subscription_id
        )
        assert delivered < total


async def test_sockets_in_two_processes_get_the_events_of_a_dispatcher_in_a_third(
    served: Served, database_url: str, tmp_path: Path
) -> None:
    """A real `carecoord serve --no-worker` process holds one socket, the in-process uvicorn
    server another, and the dispatcher runs in neither (the session app's): each process learns
    of the events through its own LISTEN. A token one process issued binds in the other."""
    with contextlib.ExitStack() as stack:
        other = await asyncio.to_thread(stack.enter_context, running_server(database_url, tmp_path))
        try:
            subscription_id = await create_ws_subscription(served)
            token = parameter(await get_token(served, subscription_id), "token")
            sockets = []
            for base in (served.base, other.base):
                ws = await connect(base.replace("http://", "ws://") + "/fhir/ws", proxy=None)
                sockets.append(ws)
                await ws.send(f"bind-with-token: {token}")
                assert status_of(await receive(ws))["type"] == "handshake"
            await served.http.post(f"{served.fhir}/Task", json=task())
            await served.http.post(f"{served.fhir}/Task", json=task())
            for ws in sockets:
                assert (await event_numbers(ws, 2))[0] == [1, 2]
                await ws.close()
        finally:
            await asyncio.to_thread(stack.close)


async def test_frames_are_audited_and_a_removed_clients_socket_ends(served: Served) -> None:
    """Each notification over a socket is an AuditEvent naming what it disclosed; once the
    owner's client is removed its bindings end (and its tokens bind nothing)."""
    owner = await bearer(served.app, "system/*.cruds", client_id="ws-owner")
    subscription_id = await create_ws_subscription(served, headers=owner, content="full-resource")
    token = await get_token(served, subscription_id, owner)
    ws = await connect(parameter(token, "websocket-url"), proxy=None)
    await ws.send(f"bind-with-token: {parameter(token, 'token')}")
    assert status_of(await receive(ws))["type"] == "handshake"
    created = await served.http.post(f"{served.fhir}/Task", json=task())
    task_id = created.json()["id"]
    notification = await receive(ws)
    assert [e["resource"]["id"] for e in notification["entry"][1:]] == [task_id]
    pool = served.app.state.pool

    async def audited() -> bool:
        count = await pool.fetchval(
            "SELECT count(*) FROM audit_event a"
            " WHERE a.body LIKE '%subscription event-notification (websocket)%'"
            " AND ('Task/' || $1) = ANY(a.entity)",
            task_id,
        )
        return bool(count)

    await wait_until(audited, "the notification's AuditEvent")
    assert await remove_client(pool, "ws-owner")  # as `carecoord clients remove` does
    close, before = await closed(ws)
    assert close.rcvd is not None and close.rcvd.code == 1000
    assert "no longer registered" in before[-1]["issue"][0]["diagnostics"]
    again = await connect(parameter(token, "websocket-url"), proxy=None)
    await again.send(f"bind-with-token: {parameter(token, 'token')}")
    refused, said = await closed(again)
    assert refused.rcvd is not None and refused.rcvd.code == 1008
    assert "no longer registered" in said[-1]["issue"][0]["diagnostics"]
