"""From the change feed to subscription events: matching, numbering, scheduling delivery.

The dispatcher is the change feed's ``subscriptions`` consumer (app/events/changes.py). In one
transaction it takes the next changes, matches each against the subscriptions of its type's
topics, gives every match the subscription's next event number, stores the events and
schedules their delivery, and moves its cursor. The transaction commits all of that or none of
it, so an event is numbered exactly once, numbers never skip, and they follow the feed's commit
order (per resource: the order of its versions).

A change becomes an event of a subscription when the topic's interaction and state rules hold
(topics.py), the filters match the version it wrote (filters.py; a deletion is judged by the
version it deleted), and the subscription's owner may read that version (owner.py): a
subscription never learns of what its owner could not read, not even an id, nor does its
counter move for it. Subscriptions that are ``requested`` (handshake pending), ``active`` or
``error`` count events; ``off`` ones do not.

An active rest-hook subscription's new events get a delivery job (delivery.py); an active
websocket subscription's are announced with ``NOTIFY subscription_events`` in the same
transaction, so the API processes holding its sockets send them once they are committed
(app/subscriptions/websocket.py; Backport IG 1.1, "Channels: Websockets").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from asyncpg import Connection, Pool, Record

from app.events.changes import Change, ChangeFeed, prune
from app.fhir import jsonio
from app.fhir.access import AccessContext
from app.fhir.errors import FHIRError
from app.fhir.indexing import IndexRows, extract, split_reference
from app.fhir.repository import RepositoryFactory
from app.settings import Settings
from app.subscriptions import jobs
from app.subscriptions.filters import Filter, matches
from app.subscriptions.owner import owner_access
from app.subscriptions.spec import WEBSOCKET
from app.subscriptions.topics import BY_TYPE

logger = logging.getLogger("carecoord.subscriptions")

CONSUMER = "subscriptions"
BATCH = 500
PRUNE_EVERY = 600.0
"""Seconds between removals of consumed changes and expired events."""
CHANGE_RETENTION = 3600.0
"""Seconds consumed changes stay in the feed (for inspection; nothing reads them again)."""

FILTER_CACHE = 100_000
"""Parsed filters kept between batches (cleared when there are more subscriptions than this)."""

REFRESH_SECONDS = 30.0
"""The longest the dispatcher keeps its copy of the subscriptions without reading them again."""

_SUBSCRIPTIONS = """
SELECT fhir_id, topic, filters, status, end_at, owner_client, owner_scope, owner_organization,
    owner_patient, owner_user, owner_unrestricted
FROM subscription
WHERE status IN ('requested', 'active', 'error') AND (end_at IS NULL OR end_at > now())
ORDER BY fhir_id
"""

_VERSIONS = """
SELECT h.resource_type, h.fhir_id, h.version_id, h.body
FROM unnest($1::text[], $2::text[], $3::int[]) AS w(resource_type, fhir_id, version_id)
JOIN resource_history h USING (resource_type, fhir_id, version_id)
"""


class Dispatcher:
    def __init__(self, pool: Pool, settings: Settings, repositories: RepositoryFactory) -> None:
        self.pool = pool
        self.settings = settings
        self.repositories = repositories
        self.feed = ChangeFeed(CONSUMER)
        self._filters: dict[str, tuple[str, Filter]] = {}
        self._by_topic: dict[str, _TopicIndex] = {}
        self._generation: int | None = None
        self._loaded_at = 0.0
        self.fhir_base = settings.fhir_base

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch until ``stop`` is set, looking again at once while there is work."""
        last_prune = 0.0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                handled = await self.dispatch_once()
                if loop.time() - last_prune > PRUNE_EVERY:
                    last_prune = loop.time()
                    await self.prune()
            except Exception as exc:  # the database went away: try again shortly
                logger.error("subscription dispatcher: %s", type(exc).__name__)
                handled = 0
            if not handled:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.subscription_poll_interval)

    async def dispatch_once(self) -> int:
        """Turn the next batch of changes into events; returns how many changes it consumed."""
        async with self.pool.acquire() as conn, conn.transaction():
            changes, position = await self.feed.claim(conn, BATCH)
            if changes:
                await self._dispatch(
                    conn, [c for c in changes if not c.bookkeeping and c.resource_type in BY_TYPE]
                )
            await self.feed.advance(conn, position)
        return len(changes)

    async def prune(self) -> None:
        async with self.pool.acquire() as conn:
            await prune(conn, CHANGE_RETENTION)
            await conn.execute(
                "DELETE FROM subscription_event WHERE created_at < now() - make_interval(secs => $1)",
                self.settings.subscription_event_retention,
            )

    async def _dispatch(self, conn: Connection, changes: list[Change]) -> None:
        if not changes:
            return
        by_topic = await self._subscriptions(conn)
        if not by_topic:
            return
        now = datetime.now(UTC)
        versions = await self._versions(conn, changes)
        matched: dict[str, list[Change]] = defaultdict(list)
        rows_cache: dict[tuple[str, str, int], IndexRows] = {}
        # An owner's access is read (its client's registration) only once a change passes its
        # filters, and once per batch: most subscriptions match most changes not at all.
        owners: dict[str, AccessContext | None] = {}
        for change in changes:
            previous = versions.get((change.resource_type, change.fhir_id, change.version_id - 1))
            current = versions.get((change.resource_type, change.fhir_id, change.version_id))
            judged_version = change.version_id - 1 if change.action == "delete" else change.version_id
            judged = previous if change.action == "delete" else current
            if judged is None:
                continue  # the version is gone (a resource removed by an operator): nothing to judge
            rows: IndexRows | None = None
            for topic in BY_TYPE[change.resource_type]:
                # The topic's rules once per change, then only its own subscriptions.
                if change.action not in topic.interactions or not topic.qualifies(previous, current):
                    continue
                index = by_topic.get(topic.url)
                if index is None:
                    continue
                if rows is None:
                    key = (change.resource_type, change.fhir_id, judged_version)
                    rows = rows_cache.get(key)
                    if rows is None:
                        rows = rows_cache[key] = extract(change.resource_type, judged, self.fhir_base)
                for subscription, flt in index.candidates(change.fhir_id, rows):
                    subscription_id = subscription["fhir_id"]
                    if subscription["end_at"] is not None and subscription["end_at"] <= now:
                        continue  # past its end a subscription counts nothing more
                    if not matches(flt, change.fhir_id, change.changed_at, rows, self.fhir_base):
                        continue
                    if subscription_id not in owners:
                        owners[subscription_id] = await owner_access(conn, subscription)
                    if not await self._owner_reads(
                        conn, owners[subscription_id], change.resource_type, change.fhir_id, judged_version
                    ):
                        continue
                    matched[subscription_id].append(change)
        for subscription_id, events in matched.items():
            await self._record(conn, subscription_id, events)

    async def _subscriptions(self, conn: Connection) -> dict[str, _TopicIndex]:
        """The subscriptions that count events, by topic, indexed: kept in memory and read again
        when a Subscription was written since (``subscription_generation``, raised by every write
        in its transaction, so this transaction sees it once the write is in the feed's window)
        or every REFRESH_SECONDS."""
        generation = await conn.fetchval("SELECT generation FROM subscription_generation WHERE id = 1")
        loop = asyncio.get_running_loop()
        if generation != self._generation or loop.time() - self._loaded_at > REFRESH_SECONDS:
            by_topic: dict[str, _TopicIndex] = defaultdict(_TopicIndex)
            for subscription in await conn.fetch(_SUBSCRIPTIONS):
                flt = self._filter(subscription["fhir_id"], subscription["filters"])
                by_topic[subscription["topic"]].add(subscription, flt, self.fhir_base)
            self._by_topic, self._generation, self._loaded_at = dict(by_topic), generation, loop.time()
        return self._by_topic

    def _filter(self, subscription_id: str, stored: Any) -> Filter:
        """A subscription's filters, parsed once per version of them (kept between batches)."""
        text = stored if isinstance(stored, str) else json.dumps(stored)
        cached = self._filters.get(subscription_id)
        if cached is not None and cached[0] == text:
            return cached[1]
        parsed = Filter.from_json(json.loads(text))  # plain strings: the standard library's parser
        if len(self._filters) > FILTER_CACHE:
            self._filters.clear()
        self._filters[subscription_id] = (text, parsed)
        return parsed

    async def _versions(
        self, conn: Connection, changes: list[Change]
    ) -> dict[tuple[str, str, int], dict[str, Any]]:
        """The bodies of each change's version and the one before it (deletions have none)."""
        wanted = {
            (c.resource_type, c.fhir_id, v)
            for c in changes
            for v in (c.version_id, c.version_id - 1)
            if v > 0
        }
        ordered = sorted(wanted)
        rows = await conn.fetch(
            _VERSIONS, [w[0] for w in ordered], [w[1] for w in ordered], [w[2] for w in ordered]
        )
        return {
            (r["resource_type"], r["fhir_id"], r["version_id"]): jsonio.loads(r["body"])
            for r in rows
            if r["body"] is not None
        }

    async def _owner_reads(
        self, conn: Connection, access: AccessContext | None, resource_type: str, fhir_id: str, version: int
    ) -> bool:
        if access is None:
            return False  # the owner's client is no longer registered
        if not access.is_limited(resource_type, "r"):
            return access.allows(resource_type, "r")
        repo = self.repositories.for_client(conn, access)
        try:
            async with conn.transaction():  # a savepoint: a refusal must not end the dispatch
                await repo.vread(resource_type, fhir_id, version)
        except FHIRError:
            return False
        return True

    async def _record(self, conn: Connection, subscription_id: str, changes: list[Change]) -> None:
        """Number the events (the subscription's counter, row-locked) and store them."""
        row = await conn.fetchrow(
            "UPDATE subscription SET events_count = events_count + $2 WHERE fhir_id = $1"
            " RETURNING events_count, status, channel_type",
            subscription_id,
            len(changes),
        )
        if row is None:
            return  # deleted meanwhile
        first = row["events_count"] - len(changes) + 1
        await conn.execute(
            """
            INSERT INTO subscription_event
                (subscription_id, event_number, resource_type, fhir_id, version_id, action, occurred_at)
            SELECT $1, n, t, i, v, a, o
            FROM unnest($2::bigint[], $3::text[], $4::text[], $5::int[], $6::text[],
                $7::timestamptz[]) AS u(n, t, i, v, a, o)
            """,
            subscription_id,
            list(range(first, first + len(changes))),
            [c.resource_type for c in changes],
            [c.fhir_id for c in changes],
            [c.version_id for c in changes],
            [c.action for c in changes],
            [c.changed_at for c in changes],
        )
        if row["status"] != "active":
            return
        if row["channel_type"] == WEBSOCKET:
            await jobs.announce(conn, subscription_id)
        else:
            await jobs.request_delivery(conn, subscription_id)


class _TopicIndex:
    """A topic's subscriptions, found by the values their filters ask for.

    Each subscription is filed under the values of one of its equality criteria (a token code,
    a reference's id, ``_id``); a change is then judged only against the subscriptions filed
    under a value it has, and those that have no such criterion. ``matches`` still decides:
    the index only leaves out subscriptions that cannot match (a filter's criteria must all
    hold, and the filed one cannot). With 1,000 subscriptions each following one organisation's
    Tasks, a Task is judged against its own few instead of all of them.
    """

    def __init__(self) -> None:
        self._filed: dict[tuple[str, str], list[tuple[Record, Filter]]] = defaultdict(list)
        self._unfiled: list[tuple[Record, Filter]] = []
        self._order: dict[str, int] = {}

    def add(self, subscription: Record, flt: Filter, fhir_base: str) -> None:
        self._order[subscription["fhir_id"]] = len(self._order)
        keys = _filing_keys(flt, fhir_base)
        if keys is None:
            self._unfiled.append((subscription, flt))
            return
        for key in keys:
            self._filed[key].append((subscription, flt))

    def candidates(self, fhir_id: str, rows: IndexRows) -> list[tuple[Record, Filter]]:
        """The subscriptions a version could match, in the order they were added."""
        found: dict[str, tuple[Record, Filter]] = {s["fhir_id"]: (s, f) for s, f in self._unfiled}
        keys = {("_id", fhir_id)}
        keys.update((row[0], row[2]) for row in rows.token if row[2] is not None)
        keys.update((row[0], row[2]) for row in rows.reference if row[2] is not None)
        for key in keys:
            for subscription, flt in self._filed.get(key, ()):
                found.setdefault(subscription["fhir_id"], (subscription, flt))
        return sorted(found.values(), key=lambda item: self._order[item[0]["fhir_id"]])


def _filing_keys(flt: Filter, fhir_base: str) -> list[tuple[str, str]] | None:
    """(parameter, code or id) keys of the first criterion that is an equality on token codes,
    reference ids or ``_id``; None when there is none (the subscription is judged every time)."""
    for criterion in flt.criteria:
        if criterion.modifier is not None:
            continue
        keys: list[tuple[str, str]] = []
        for value in criterion.values:
            if criterion.type == "id":
                keys.append(("_id", value))
            elif criterion.type == "token":
                code = value.split("|", 1)[1] if "|" in value else value
                if not code:
                    break  # ``system|`` matches any code of the system: not an equality on a code
                keys.append((criterion.name, code))
            elif criterion.type == "reference":
                _, target_id, _url = split_reference(value, fhir_base)
                if target_id is None and ("/" in value or ":" in value):
                    break  # an absolute URL elsewhere: compared by URL, not filed
                keys.append((criterion.name, target_id or value))
            else:
                break
        else:
            if keys:
                return keys
    return None
