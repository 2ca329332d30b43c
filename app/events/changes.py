"""The change feed: every committed resource write, read by consumers in commit order.

Writing: app/fhir/repository.py adds a ``resource_change`` row in the very statement that
writes a version, so a change exists exactly when (and only if) its write commits; every writer
(API, batch and transaction entries, conditional writes, the workers) goes through that
repository (RepositoryFactory).

Reading without losing anything: ``seq`` is taken when a row is inserted, not when its
transaction commits, so a consumer that simply followed ``seq`` would skip a change whose
transaction committed after a later ``seq`` had been read. The feed is therefore read in
windows of transaction ids: ``[lower, upper)`` where ``upper`` is the oldest transaction still
running when the window opened (``pg_snapshot_xmin``). Every transaction below ``upper`` has
ended, so a window's rows never change once it is open; inside it rows are taken in ``seq``
order. Two versions of one resource keep their order: the second writer waited on the row lock
of the first, so the first has ended whenever the second has, and its ``seq`` is lower.

The cost: a transaction left open anywhere on the PostgreSQL server (any database) holds the
next window back until it ends (the pool's ``idle_in_transaction_session_timeout`` bounds
carecoord's own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from asyncpg import Connection

_XMIN = "SELECT (pg_snapshot_xmin(pg_current_snapshot())::text)::bigint"

_READ = """
SELECT seq, resource_type, fhir_id, version_id, action, changed_at, bookkeeping
FROM resource_change
WHERE txid >= $1 AND txid < $2 AND seq > $3
ORDER BY seq
LIMIT $4
"""


@dataclass(frozen=True)
class Change:
    """One committed write of one resource version."""

    seq: int
    resource_type: str
    fhir_id: str
    version_id: int
    action: str
    """``create``, ``update`` or ``delete``."""
    changed_at: datetime
    bookkeeping: bool
    """carecoord's own record-keeping, never an event for subscribers."""


@dataclass(frozen=True)
class Position:
    """A consumer's place in the feed: the open window and the last ``seq`` done in it."""

    lower: int
    upper: int
    after_seq: int
    stored: tuple[int, int, int] | None = field(default=None, compare=False)
    """The position the consumer's cursor row held when ``claim`` read it."""

    @property
    def moved(self) -> bool:
        return (self.lower, self.upper, self.after_seq) != self.stored


class ChangeFeed:
    """The feed as one named consumer reads it.

    ``claim`` and ``advance`` run in the consumer's transaction, together with whatever the
    consumer makes of the changes (e.g. subscription events), so a change is consumed exactly
    once: the cursor moves if and only if the consumer's own rows commit. ``claim`` also takes
    a transaction-level advisory lock on the consumer's name, so that one process at a time
    works through a consumer's changes (others wait, then see the moved cursor).
    """

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer

    async def claim(self, conn: Connection, limit: int) -> tuple[list[Change], Position]:
        """The next changes (at most ``limit``) and the position after them. Call it before
        the transaction writes anything (its own transaction id must not hold the window)."""
        # The window's end is read before this transaction takes an id of its own.
        xmin = int(await conn.fetchval(_XMIN))
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))", f"feed:{self.consumer}")
        row = await conn.fetchrow(
            "SELECT lower, upper, after_seq FROM change_cursor WHERE consumer = $1", self.consumer
        )
        if row is None:
            # A new consumer starts at the oldest change kept (nothing before it is lost).
            oldest = await conn.fetchval("SELECT min(txid) FROM resource_change")
            start = min(int(oldest), xmin) if oldest is not None else xmin
            await conn.execute(
                "INSERT INTO change_cursor (consumer, lower, upper, after_seq) VALUES ($1, $2, $2, 0)"
                " ON CONFLICT (consumer) DO NOTHING",
                self.consumer,
                start,
            )
            stored = (start, start, 0)
        else:
            stored = (row["lower"], row["upper"], row["after_seq"])
        position = Position(*stored, stored=stored)
        while True:
            rows = await conn.fetch(_READ, position.lower, position.upper, position.after_seq, limit)
            if rows:
                changes = [Change(**dict(r)) for r in rows]
                return changes, Position(position.lower, position.upper, changes[-1].seq, stored)
            if xmin <= position.upper:
                # Nothing new. The cursor keeps its stored position even if empty windows were
                # passed: they stay empty (every transaction below ``xmin`` has ended), so the
                # next claim passes them again at the cost of an index probe, and an idle
                # consumer writes nothing; storing them made each look a commit whose own
                # transaction id opened the next empty window (issue 14).
                return [], Position(*stored, stored=stored)
            position = Position(position.upper, xmin, 0, stored)

    async def advance(self, conn: Connection, position: Position) -> None:
        """Record ``position`` (in the transaction that consumed the changes before it). A
        position the cursor already holds is not written again: an idle consumer looks at the
        feed many times a second, and each look would otherwise be a committed write (issue 14)."""
        if not position.moved:
            return
        await conn.execute(
            "UPDATE change_cursor SET lower = $2, upper = $3, after_seq = $4, updated_at = now()"
            " WHERE consumer = $1",
            self.consumer,
            position.lower,
            position.upper,
            position.after_seq,
        )


async def prune(conn: Connection, keep_seconds: float) -> int:
    """Delete changes older than ``keep_seconds`` that every consumer has passed; returns how
    many. Without consumers, only the age counts (nothing waits for them)."""
    status = await conn.execute(
        """
        DELETE FROM resource_change
        WHERE changed_at < now() - make_interval(secs => $1)
          AND txid < COALESCE((SELECT min(lower) FROM change_cursor), 9223372036854775807)
        """,
        keep_seconds,
    )
    return int(status.split()[-1])
