"""FHIR Subscriptions (R5 Backport IG 1.1 for R4) delivered to real loopback receivers.

The receivers are real HTTP servers (tests/partner_support.py MisbehavingServer) scripted to
answer, fail or hang; the job runner and the dispatcher run as ``carecoord serve`` runs them
(app/background.py). Tests wait for what a receiver must get, never for time.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.background import background_tasks
from app.settings import Settings
from tests.conftest import FHIR, bearer
from tests.conftest import wait_until as conftest_wait_until
from tests.partner_support import Hang, MisbehavingServer, Recorded, Reply, misbehaving_server_fixture

misbehaving_server = misbehaving_server_fixture


async def wait_until(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """tests/conftest.py wait_until with 15 s by default: a handshake or a notification goes
    through the dispatcher's poll, the runner and a loopback receiver."""
    return await conftest_wait_until(check, what, timeout)

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
TASK_TOPIC = "http://hl7.org/fhir/us/sdoh-clinicalcare/SubscriptionTopic/Task"
SR_TOPIC = "http://hl7.org/fhir/us/sdoh-clinicalcare/SubscriptionTopic/Servicerequest"


@pytest.fixture
async def running(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    """The job runner and the subscription dispatcher, as `serve` starts them."""
    async with background_tasks(app.state.pool, app.state.http, settings, app.state.repositories):
        yield




def subscription(
    endpoint: str,
    *,
    topic: str = TASK_TOPIC,
    filters: tuple[str, ...] = (),
    content: str = "id-only",
    headers: tuple[str, ...] = (),
    heartbeat: int | None = None,
    timeout: int | None = None,
    max_count: int | None = None,
) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "type": "rest-hook",
        "endpoint": endpoint,
        "payload": "application/fhir+json",
        "_payload": {"extension": [{"url": f"{BACKPORT}/backport-payload-content", "valueCode": content}]},
    }
    extensions = []
    if heartbeat is not None:
        extensions.append({"url": f"{BACKPORT}/backport-heartbeat-period", "valueUnsignedInt": heartbeat})
    if timeout is not None:
        extensions.append({"url": f"{BACKPORT}/backport-timeout", "valueUnsignedInt": timeout})
    if max_count is not None:
        extensions.append({"url": f"{BACKPORT}/backport-max-count", "valuePositiveInt": max_count})
    if extensions:
        channel["extension"] = extensions
    if headers:
        channel["header"] = list(headers)
    resource: dict[str, Any] = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "test",
        "criteria": topic,
        "channel": channel,
    }
    if filters:
        resource["_criteria"] = {
            "extension": [{"url": f"{BACKPORT}/backport-filter-criteria", "valueString": f} for f in filters]
        }
    return resource


def task(owner: str = "Organization/o1", status: str = "requested", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "status": status,
        "intent": "order",
        "owner": {"reference": owner},
        "requester": {"reference": "Organization/cm"},
        **extra,
    }


def status_of(bundle: dict[str, Any]) -> dict[str, Any]:
    """The subscription-status Parameters (first entry) as {name: value or [parts]}."""
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "history"
    parameters = bundle["entry"][0]["resource"]
    assert parameters["resourceType"] == "Parameters"
    found: dict[str, Any] = {"notification-event": []}
    for parameter in parameters["parameter"]:
        if parameter["name"] == "notification-event":
            found["notification-event"].append(
                {
                    part["name"]: next(v for k, v in part.items() if k.startswith("value"))
                    for part in parameter["part"]
                }
            )
        else:
            found[parameter["name"]] = next(v for k, v in parameter.items() if k.startswith("value"))
    return found


def bundles(server: MisbehavingServer, path: str) -> list[dict[str, Any]]:
    return [json.loads(r.body) for r in server.requests_to(path)]


def event_numbers(server: MisbehavingServer, path: str) -> list[int]:
    numbers = []
    for bundle in bundles(server, path):
        status = status_of(bundle)
        if status["type"] == "event-notification":
            numbers.extend(int(e["event-number"]) for e in status["notification-event"])
    return numbers


async def create_subscription(client: httpx.AsyncClient, resource: dict[str, Any]) -> str:
    response = await client.post(f"{FHIR}/Subscription", json=resource)
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "requested"
    return str(response.json()["id"])


async def subscription_status(client: httpx.AsyncClient, subscription_id: str) -> str:
    return str((await client.get(f"{FHIR}/Subscription/{subscription_id}")).json()["status"])


async def active_subscription(
    client: httpx.AsyncClient, server: MisbehavingServer, path: str, **options: Any
) -> str:
    server.script(path, Reply(200))
    subscription_id = await create_subscription(client, subscription(server.url(path), **options))

    async def active() -> bool:
        return await subscription_status(client, subscription_id) == "active"

    await wait_until(active, "the handshake to make the subscription active")
    return subscription_id


async def test_handshake_then_id_only_notifications_with_headers(
    client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, running: None
) -> None:
    server = misbehaving_server
    subscription_id = await active_subscription(
        client,
        server,
        "/hook",
        filters=("Task?owner=Organization/o1",),
        headers=("Authorization: Bearer s3cret",),
    )
    handshake = status_of(bundles(server, "/hook")[0])
    assert handshake["type"] == "handshake" and handshake["events-since-subscription-start"] == "0"
    assert handshake["topic"] == TASK_TOPIC
    assert handshake["subscription"]["reference"].endswith(f"/Subscription/{subscription_id}")
    assert server.requests_to("/hook")[0].headers["authorization"] == "Bearer s3cret"
    assert server.requests_to("/hook")[0].headers["content-type"].startswith("application/fhir+json")

    created = (await client.post(f"{FHIR}/Task", json=task())).json()
    await client.post(f"{FHIR}/Task", json=task(owner="Organization/other"))  # filtered out
    await client.post(f"{FHIR}/Task", json=task(status="draft"))  # the topic leaves drafts out
    await wait_until(lambda: event_numbers(server, "/hook"), "the event notification")
    notification = bundles(server, "/hook")[1]
    status = status_of(notification)
    assert status["type"] == "event-notification" and status["status"] == "active"
    assert status["events-since-subscription-start"] == "1"
    [event] = status["notification-event"]
    assert event["event-number"] == "1"
    assert event["focus"]["reference"].endswith(f"/Task/{created['id']}")
    [entry] = notification["entry"][1:]
    assert entry["fullUrl"].endswith(f"/Task/{created['id']}") and "resource" not in entry
    assert entry["request"]["method"] == "POST"
    assert all(r.headers["authorization"] == "Bearer s3cret" for r in server.requests_to("/hook"))
    # Nothing more arrives for the filtered-out and draft Tasks: a later matching one is event 2.
    await client.post(f"{FHIR}/Task", json=task())
    await wait_until(lambda: event_numbers(server, "/hook") == [1, 2], "event 2")


async def test_full_resource_payload_carries_the_version_written(
    client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, running: None
) -> None:
    await active_subscription(client, misbehaving_server, "/full", content="full-resource")
    created = (await client.post(f"{FHIR}/Task", json=task())).json()
    updated = {**created, "status": "accepted"}
    await client.put(f"{FHIR}/Task/{created['id']}", json=updated)
    await wait_until(lambda: event_numbers(misbehaving_server, "/full") == [1, 2], "two events")
    resources = [
        entry["resource"]
        for bundle in bundles(misbehaving_server, "/full")[1:]
        for entry in bundle["entry"][1:]
    ]
    assert [(r["meta"]["versionId"], r["status"]) for r in resources] == [
        ("1", "requested"),
        ("2", "accepted"),
    ]


async def test_a_refused_handshake_puts_the_subscription_in_error_without_retries(
    app: FastAPI, client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, running: None
) -> None:
    misbehaving_server.script("/refuse", Reply(500))
    subscription_id = await create_subscription(client, subscription(misbehaving_server.url("/refuse")))

    async def in_error() -> bool:
        return await subscription_status(client, subscription_id) == "error"

    await wait_until(in_error, "the subscription to go to error")
    await client.post(f"{FHIR}/Task", json=task())
    await client.post(f"{FHIR}/Task", json=task())

    # The events are counted (for $events) but nothing more is sent.
    async def counted() -> bool:
        return await _events_count(app, subscription_id) == 2

    await wait_until(counted, "the events to be counted")
    assert len(misbehaving_server.requests_to("/refuse")) == 1


async def _events_count(app: FastAPI, subscription_id: str) -> int:
    count = await app.state.pool.fetchval(
        "SELECT events_count FROM subscription WHERE fhir_id = $1", subscription_id
    )
    return int(count or 0)


async def test_a_thousand_rapid_updates_arrive_numbered_and_in_order(
    client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, running: None
) -> None:
    await active_subscription(client, misbehaving_server, "/many", content="full-resource", max_count=50)
    tasks = [(await client.post(f"{FHIR}/Task", json=task())).json() for _ in range(10)]

    async def update(task_resource: dict[str, Any], rounds: int) -> None:
        for round_number in range(rounds):
            body = {**task_resource, "description": f"round {round_number}"}
            assert (await client.put(f"{FHIR}/Task/{task_resource['id']}", json=body)).status_code == 200

    await asyncio.gather(*(update(t, 99) for t in tasks))  # 10 creates + 990 updates
    await wait_until(
        lambda: len(event_numbers(misbehaving_server, "/many")) >= 1000, "1000 events", timeout=90
    )
    assert event_numbers(misbehaving_server, "/many") == list(range(1, 1001))
    versions: dict[str, list[int]] = {}
    for bundle in bundles(misbehaving_server, "/many")[1:]:
        for entry in bundle["entry"][1:]:
            versions.setdefault(entry["resource"]["id"], []).append(
                int(entry["resource"]["meta"]["versionId"])
            )
    assert all(v == list(range(1, 101)) for v in versions.values()) and len(versions) == 10


async def test_failures_are_retried_with_the_same_numbers_until_the_receiver_recovers(
    client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, running: None
) -> None:
    server = misbehaving_server
    await active_subscription(client, server, "/flaky", timeout=1)
    server.script("/flaky", Reply(500), Hang(3), Reply(503), Reply(200))
    await client.post(f"{FHIR}/Task", json=task())
    await client.post(f"{FHIR}/Task", json=task())
    await wait_until(lambda: len(server.requests_to("/flaky")) >= 5, "three failures and a success")

    def delivered() -> list[int]:
        # Each attempt carries the same numbers; what counts is what the receiver acknowledged.
        attempts = bundles(server, "/flaky")[1:]
        numbers = [int(e["event-number"]) for e in status_of(attempts[-1])["notification-event"]]
        return numbers

    await wait_until(lambda: sorted(set(event_numbers(server, "/flaky"))) == [1, 2], "events 1 and 2")
    first_attempt = [
        int(e["event-number"]) for e in status_of(bundles(server, "/flaky")[1])["notification-event"]
    ]
    assert first_attempt[0] == 1 and delivered()[-1] == 2


async def test_too_many_failures_put_it_in_error_and_the_owner_reactivates_it(
    app: FastAPI, client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, settings: Settings
) -> None:
    server = misbehaving_server
    limited = settings.model_copy(update={"subscription_max_failures": 2, "delivery_backoff": 0.05})
    async with background_tasks(app.state.pool, app.state.http, limited, app.state.repositories):
        subscription_id = await active_subscription(client, server, "/down")
        server.script("/down", Reply(500))
        await client.post(f"{FHIR}/Task", json=task())

        async def in_error() -> bool:
            return await subscription_status(client, subscription_id) == "error"

        await wait_until(in_error, "the subscription to go to error after two failures")
        assert len(server.requests_to("/down")) == 3  # handshake + two attempts
        await client.post(f"{FHIR}/Task", json=task())  # still counted while in error
        server.script("/down", Reply(200))
        current = (await client.get(f"{FHIR}/Subscription/{subscription_id}")).json()
        reactivated = await client.put(
            f"{FHIR}/Subscription/{subscription_id}", json={**current, "status": "requested"}
        )
        assert reactivated.status_code == 200 and reactivated.json()["status"] == "requested"
        await wait_until(
            lambda: sorted(set(event_numbers(server, "/down"))) == [1, 2], "events 1 and 2 after reactivation"
        )


async def test_notifications_follow_the_owners_access(
    app: FastAPI, client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, running: None
) -> None:
    """A partner's subscription learns only of Tasks its organisation may read: not even the
    ids of another organisation's Tasks, nor does its counter move for them."""
    server = misbehaving_server
    partner = await bearer(
        app, "system/Task.rs system/Subscription.crud", client_id="partner-a", organization="Organization/pa"
    )
    server.script("/partner", Reply(200))
    created = await client.post(
        f"{FHIR}/Subscription", json=subscription(server.url("/partner")), headers=partner
    )
    assert created.status_code == 201, created.text
    subscription_id = created.json()["id"]

    async def active() -> bool:
        answer = await client.get(f"{FHIR}/Subscription/{subscription_id}", headers=partner)
        return answer.json().get("status") == "active"

    await wait_until(active, "the partner's subscription to be active")
    await client.post(f"{FHIR}/Task", json=task(owner="Organization/pb"))  # another partner's referral
    mine = (await client.post(f"{FHIR}/Task", json=task(owner="Organization/pa"))).json()
    await wait_until(lambda: event_numbers(server, "/partner"), "the partner's event")
    assert event_numbers(server, "/partner") == [1]
    sent = b"".join(r.body for r in server.requests_to("/partner"))
    assert mine["id"].encode() in sent


async def test_deleting_a_subscription_stops_its_notifications(
    client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, running: None
) -> None:
    server = misbehaving_server
    first = await active_subscription(client, server, "/gone")
    await active_subscription(client, server, "/stays")
    assert (await client.delete(f"{FHIR}/Subscription/{first}")).status_code in (200, 204)
    await client.post(f"{FHIR}/Task", json=task())
    await wait_until(lambda: event_numbers(server, "/stays") == [1], "the other subscription's event")
    assert event_numbers(server, "/gone") == []


async def test_heartbeats_when_nothing_happens(
    client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, running: None
) -> None:
    await active_subscription(client, misbehaving_server, "/beat", heartbeat=1)

    def heartbeats() -> list[Recorded]:
        return [
            r
            for r in misbehaving_server.requests_to("/beat")
            if status_of(json.loads(r.body))["type"] == "heartbeat"
        ]

    await wait_until(lambda: len(heartbeats()) >= 2, "two heartbeats")


@pytest.mark.parametrize(
    ("change", "status", "says"),
    [
        ({"criteria": "http://example.org/SubscriptionTopic/unknown"}, 422, "topic"),
        (
            {
                "_criteria": {
                    "extension": [
                        {"url": f"{BACKPORT}/backport-filter-criteria", "valueString": "Task?focus=x"}
                    ]
                }
            },
            400,
            "focus",
        ),
        (
            {
                "_criteria": {
                    "extension": [
                        {"url": f"{BACKPORT}/backport-filter-criteria", "valueString": "Patient?name=x"}
                    ]
                }
            },
            400,
            "Patient",
        ),
        ({"channel": {"type": "email", "endpoint": "mailto:a@example.org"}}, 422, "email"),
        ({"channel": {"type": "rest-hook", "endpoint": "ftp://example.org/x"}}, 400, "http"),
        (
            {"channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/x", "header": ["Host: evil"]}},
            400,
            "header",
        ),
        (
            {
                "channel": {
                    "type": "rest-hook",
                    "endpoint": "http://127.0.0.1:9/x",
                    "payload": "application/fhir+xml",
                }
            },
            422,
            "payload",
        ),
        ({"status": "error"}, 400, "status"),
        ({"channel": {"type": "rest-hook", "endpoint": "http://[::1"}}, 400, "endpoint"),
        ({"channel": {"type": "rest-hook", "endpoint": "http://" + "a" * 300 + ".com/"}}, 400, "endpoint"),
    ],
)
async def test_subscriptions_carecoord_cannot_honour_are_refused(
    client: httpx.AsyncClient, change: dict[str, Any], status: int, says: str
) -> None:
    body = {**subscription("http://127.0.0.1:9/x"), **change}
    response = await client.post(f"{FHIR}/Subscription", json=body)
    assert response.status_code == status, response.text
    assert says in json.dumps(response.json())
    assert not (await client.get(f"{FHIR}/Subscription")).json().get("entry")


async def test_an_endpoint_the_outbound_policy_refuses_is_a_422(app: FastAPI, settings: Settings) -> None:
    from app.main import create_app
    from tests.conftest import BASE_URL

    strict = create_app(settings.model_copy(update={"outbound_allowlist": ""}))
    async with (
        strict.router.lifespan_context(strict),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=strict), base_url=BASE_URL) as http,
    ):
        http.headers.update(await bearer(app))
        for endpoint in (
            "http://127.0.0.1:8080/hook",
            "http://10.1.2.3/hook",
            "http://169.254.169.254/latest",
        ):
            response = await http.post(f"{FHIR}/Subscription", json=subscription(endpoint))
            assert response.status_code == 422, endpoint
            assert "outbound" in response.text


async def test_status_and_events_let_a_subscriber_that_was_down_recover(
    client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, running: None
) -> None:
    server = misbehaving_server
    subscription_id = await active_subscription(client, server, "/down-a-while")
    server.script("/down-a-while", Reply(500))
    created = [(await client.post(f"{FHIR}/Task", json=task())).json()["id"] for _ in range(3)]

    async def counted() -> Any:
        answer = await client.get(f"{FHIR}/Subscription/{subscription_id}/$status")
        assert answer.status_code == 200, answer.text
        bundle = answer.json()
        assert bundle["type"] == "searchset"
        status = status_of({**bundle, "type": "history"})
        return status if status["events-since-subscription-start"] == "3" else None

    status = await wait_until(counted, "$status to count three events")
    assert status["type"] == "query-status" and status["status"] == "active"
    typed = await client.get(f"{FHIR}/Subscription/$status", params={"id": subscription_id})
    assert typed.status_code == 200 and typed.json()["total"] == 1

    replay = await client.get(
        f"{FHIR}/Subscription/{subscription_id}/$events",
        params={"eventsSinceNumber": "2", "content": "full-resource"},
    )
    assert replay.status_code == 200, replay.text
    status = status_of(replay.json())
    assert status["type"] == "query-event"
    assert [e["event-number"] for e in status["notification-event"]] == ["2", "3"]
    assert [e["resource"]["id"] for e in replay.json()["entry"][1:]] == created[1:]
    until = await client.get(
        f"{FHIR}/Subscription/{subscription_id}/$events", params={"eventsUntilNumber": "1"}
    )
    assert [e["event-number"] for e in status_of(until.json())["notification-event"]] == ["1"]
    bad = await client.get(
        f"{FHIR}/Subscription/{subscription_id}/$events", params={"eventsSinceNumber": "x"}
    )
    assert bad.status_code == 400 and bad.json()["resourceType"] == "OperationOutcome"
    missing = await client.get(f"{FHIR}/Subscription/nobody/$events")
    assert missing.status_code == 404


async def test_the_capability_statement_lists_topics_and_operations(client: httpx.AsyncClient) -> None:
    statement = (await client.get(f"{FHIR}/metadata")).json()
    [entry] = [r for r in statement["rest"][0]["resource"] if r["type"] == "Subscription"]
    topics = {e["valueCanonical"] for e in entry["extension"]}
    assert {TASK_TOPIC, SR_TOPIC} <= topics and len(topics) == 5
    assert {"status", "events"} <= {o["name"] for o in entry["operation"]}
    for operation in entry["operation"]:
        definition = await client.get(operation["definition"])
        assert definition.status_code == 200, operation


async def test_a_handshake_to_an_endpoint_not_yet_listening_is_tried_again(
    app: FastAPI, client: httpx.AsyncClient, running: None
) -> None:
    """Connection refused is not a refusal: the handshake is retried (with the notification
    backoff) and succeeds once the receiver listens."""
    from tests.partner_support import free_port

    port = free_port()
    subscription_id = await create_subscription(client, subscription(f"http://127.0.0.1:{port}/late"))

    async def failed_once() -> bool:
        error = await app.state.pool.fetchval(
            "SELECT last_error FROM subscription WHERE fhir_id = $1", subscription_id
        )
        return error is not None

    await wait_until(failed_once, "the first handshake attempt to fail")
    assert await subscription_status(client, subscription_id) == "requested"
    received: list[bytes] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:

        async def active() -> bool:
            return await subscription_status(client, subscription_id) == "active"

        await wait_until(active, "the retried handshake to succeed")
        assert status_of(json.loads(received[0]))["type"] == "handshake"
    finally:
        server.shutdown()
        server.server_close()


async def test_a_subscription_is_its_owners_alone(
    app: FastAPI, client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, running: None
) -> None:
    """Another client, whatever its scopes, neither sees nor changes a Subscription it did not
    create (its channel carries the owner's secrets, its events what the owner may read)."""
    server = misbehaving_server
    subscription_id = await active_subscription(
        client, server, "/owned", headers=("Authorization: Bearer owner-secret",), content="full-resource"
    )
    await client.post(f"{FHIR}/Task", json=task())
    await wait_until(lambda: event_numbers(server, "/owned") == [1], "the owner's event")
    others = {
        "patient app": await bearer(app, "patient/*.cruds", client_id="patient-app", patient="p1"),
        "other backend": await bearer(app, "system/Subscription.cruds system/Task.rs", client_id="other"),
    }
    current = (await client.get(f"{FHIR}/Subscription/{subscription_id}")).json()
    hijack = {**current, "channel": {**current["channel"], "endpoint": server.url("/thief")}}
    patch = [{"op": "replace", "path": "/channel/endpoint", "value": server.url("/thief")}]
    for who, headers in others.items():
        assert (
            await client.get(f"{FHIR}/Subscription/{subscription_id}", headers=headers)
        ).status_code == 404, who
        search = await client.get(f"{FHIR}/Subscription", headers=headers)
        assert search.status_code == 200 and not search.json().get("entry"), who
        assert "owner-secret" not in search.text
        for path in ("$events", "$status"):
            answer = await client.get(f"{FHIR}/Subscription/{subscription_id}/{path}", headers=headers)
            assert answer.status_code == 404, (who, path)
        typed = await client.get(f"{FHIR}/Subscription/$status", headers=headers)
        assert typed.json()["total"] == 0, who
        put = await client.put(f"{FHIR}/Subscription/{subscription_id}", json=hijack, headers=headers)
        assert put.status_code == 404, who
        patched = await client.patch(
            f"{FHIR}/Subscription/{subscription_id}",
            json=patch,
            headers={**headers, "content-type": "application/json-patch+json"},
        )
        assert patched.status_code == 404, who
        assert (
            await client.delete(f"{FHIR}/Subscription/{subscription_id}", headers=headers)
        ).status_code == 404
    assert await subscription_status(client, subscription_id) == "active"
    assert server.requests_to("/thief") == []


async def test_events_carry_what_the_callers_token_may_read(
    app: FastAPI, client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, running: None
) -> None:
    """$events reads with the caller's token: the owner's client with a token for its
    Subscriptions only gets the event numbers, not the Tasks."""
    full = await bearer(app, "system/Subscription.cruds system/Task.rs", client_id="subscriber")
    misbehaving_server.script("/mine", Reply(200))
    created = await client.post(
        f"{FHIR}/Subscription", json=subscription(misbehaving_server.url("/mine")), headers=full
    )
    subscription_id = created.json()["id"]
    task_id = (await client.post(f"{FHIR}/Task", json=task())).json()["id"]

    async def counted() -> bool:
        return await _events_count(app, subscription_id) == 1

    await wait_until(counted, "the event")
    narrow = await bearer(app, "system/Subscription.rs", client_id="subscriber")
    replay = await client.get(
        f"{FHIR}/Subscription/{subscription_id}/$events", params={"content": "full-resource"}, headers=narrow
    )
    assert replay.status_code == 200, replay.text
    [event] = status_of(replay.json())["notification-event"]
    assert event["event-number"] == "1" and "focus" not in event
    assert task_id not in replay.text
    with_tasks = await client.get(
        f"{FHIR}/Subscription/{subscription_id}/$events", params={"content": "full-resource"}, headers=full
    )
    assert [e["resource"]["id"] for e in with_tasks.json()["entry"][1:]] == [task_id]


async def test_a_subscription_past_its_end_sends_nothing(
    app: FastAPI, client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, running: None
) -> None:
    misbehaving_server.script("/ended", Reply(200))
    await active_subscription(client, misbehaving_server, "/live")
    ended = {**subscription(misbehaving_server.url("/ended")), "end": "2020-01-01T00:00:00Z"}
    assert (await client.post(f"{FHIR}/Subscription", json=ended)).status_code == 201
    await client.post(f"{FHIR}/Task", json=task())
    await wait_until(
        lambda: event_numbers(misbehaving_server, "/live") == [1], "the live subscription's event"
    )
    assert misbehaving_server.requests_to("/ended") == []


async def test_an_external_issuers_token_owns_no_subscription(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """A trusted external issuer's client id is that issuer's, not a client registered here: the
    same string must not open a registered client's Subscription, nor may such a token own one."""
    from app.auth.scopes import parse_scopes
    from app.fhir.access import AccessContext
    from app.fhir.errors import BusinessRule, NotFound

    existing = await create_subscription(client, subscription("http://127.0.0.1:9/x"))  # test-client's
    external = AccessContext(
        client_id="test-client", permissions=parse_scopes("system/*.cruds"), unrestricted=False, external=True
    )
    async with app.state.pool.acquire() as conn:
        repo = app.state.repositories.for_client(conn, external)
        with pytest.raises(NotFound):
            await repo.read("Subscription", existing)
        with pytest.raises(BusinessRule):
            async with conn.transaction():
                await repo.create("Subscription", subscription("http://127.0.0.1:9/y"))


async def test_filters_of_every_form_find_their_changes(
    client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, running: None
) -> None:
    """Codes, bare ids, system-only tokens and :not all match as search would, whichever
    subscriptions the dispatcher's index files under a value and which it judges every time."""
    server = misbehaving_server
    forms = {
        "/status": ("Task?status=accepted",),
        "/bare-id": ("Task?owner=o1",),
        "/system-only": ("Task?code=http://example.org/codes|",),
        "/not": ("Task?status:not=requested",),
        "/both": ("Task?owner=Organization/o1&status=requested,accepted",),
    }
    for path, filters in forms.items():
        await active_subscription(client, server, path, filters=filters)
    coded = task(code={"coding": [{"system": "http://example.org/codes", "code": "fulfill"}]})
    created = (await client.post(f"{FHIR}/Task", json=coded)).json()
    await client.put(f"{FHIR}/Task/{created['id']}", json={**created, "status": "accepted"})
    expected = {"/status": [1], "/bare-id": [1, 2], "/system-only": [1, 2], "/not": [1], "/both": [1, 2]}
    await wait_until(
        lambda: {path: event_numbers(server, path) for path in forms} == expected, "each filter's events"
    )


async def test_one_clients_hanging_endpoints_do_not_hold_back_another_clients(
    app: FastAPI, client: httpx.AsyncClient, misbehaving_server: MisbehavingServer, running: None
) -> None:
    """Each owner gets a fair share of the runner's subscription slots: eight handshakes of one
    client hanging at its endpoint leave room for another client's handshake."""
    server = misbehaving_server
    server.script("/hangs", Hang(8))
    hog = await bearer(app, "system/Subscription.cruds system/Task.rs", client_id="hog")
    for _ in range(8):
        created = await client.post(
            f"{FHIR}/Subscription", json=subscription(server.url("/hangs"), timeout=10), headers=hog
        )
        assert created.status_code == 201
    await wait_until(lambda: len(server.requests_to("/hangs")) >= 2, "the hog's handshakes to hang")
    subscription_id = await active_subscription(client, server, "/fair")
    assert await subscription_status(client, subscription_id) == "active"
