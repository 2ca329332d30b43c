"""Failed-authentication limits for /auth/token, /auth/revoke and /auth/introspect (RFC 6819
§4.3.2, §5.1.4.2.3), counted in PostgreSQL: every server process sees the same counts.

What is limited: failed requests (an attempt counts until it succeeds) per key, two keys per
request (server.py ``_limited``):

* the source address (``address:A``): after ``limit`` failures within ``window`` seconds from
  one address, every request from it is refused with 429 until the oldest failure leaves the
  window, correct credentials included. That stops online guessing of secrets from one place,
  whichever client ids it names (and a malformed request counts here too);
* the claimed client at that address (``client:C@A``, :func:`pair_key`): the same limit for
  one client_id from one address. (With one limit for both keys the address count is never
  the smaller; the pair count keeps a client's own failures apart, so that the address limit
  can be raised for addresses many clients share without raising the per-client one.)

There is deliberately no key for a client_id alone: a client id is no secret, and such a key
would let anyone lock a known client out everywhere, its own correct credentials from its own
address included (issue 12). So an attacker's failures block the attacker's address only; the
price is that guesses spread over many addresses are limited per address, which still makes
guessing a 256-bit secret (or forging a private_key_jwt assertion) hopeless.

**Shared by every process** (``auth_request_failure``, migration 0023): with N ``serve
--workers`` processes, or N servers behind a load balancer, an address still gets ``limit``
attempts per window in total, not N x ``limit``; a restart forgets nothing.

**Count, then check the credentials, then forgive.** An attempt is counted before the
credentials are checked and taken back (:meth:`FailureLimiter.forgive`) when they turn out to
be right, so that concurrent guesses cannot all pass the check before the first failure is
counted. The check and the count are one step: ``carecoord_auth_attempt()`` takes a
transaction-level advisory lock per key (in key order: no deadlocks), then reads the keys'
counts and, unless one is at the limit, counts the attempt against every key; a second attempt
on a key waits for the first to commit. So exactly ``limit`` attempts pass per window, however
many processes and connections the guesses are spread over.

**Cost on the token path.** One statement per attempt (the function: the keys' rows by primary
key, then an upsert of each) and, for requests that succeed, one more (:meth:`forgive`). Why a
row per key with an array of stamps rather than a row per failure (``auth_login_failure``'s
shape): the count is read from at most two rows by primary key, each holding at most ``limit``
stamps (the upsert keeps the most recent ones, like a bounded queue), and a forgiven attempt is
one array element removed, not a row deleted and an index entry left to vacuum.

**Proven clients are not counted up front.** A (client, address) pair whose credentials
succeeded within the window (:meth:`FailureLimiter.proven`, remembered per process) is checked
first and counted only when it fails: otherwise more concurrent requests than ``limit`` from a
busy client with the right secret (a resource server introspecting every request, workers
behind one NAT) would be refused as guesses. Its first failure drops the proof, so the pair is
counted up front again; claiming a proven client's id from its address gains a guesser at most
one burst of concurrent attempts (against a 256-bit secret or a signed assertion: nothing).

**Bounded growth.** Each row holds at most ``limit`` stamps; rows whose failures have all left
the window are deleted by the attempt statement itself about once every :data:`PRUNE_EVERY`
seconds per process (``prune``: a scan of the ``last_at`` index). Under a spray from many
addresses the table holds about one row per address seen in the last window plus that interval.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime

import asyncpg

MAX_PROVEN = 10_000
"""Most proven (client, address) pairs one process remembers."""

PRUNE_EVERY = 60.0
"""Seconds between the prunings of one process (each attempt statement may do one)."""

_ATTEMPT = "SELECT wait, stamp FROM carecoord_auth_attempt($1::text[], $2, $3, $4)"
# The rows are locked in key order, as carecoord_auth_attempt() locks them: the two cannot deadlock.
_FORGIVE = (
    "UPDATE auth_request_failure f SET stamps = array_remove(f.stamps, $2::timestamptz)"
    " FROM (SELECT key FROM auth_request_failure WHERE key = ANY($1::text[]) ORDER BY key FOR UPDATE) locked"
    " WHERE f.key = locked.key"
)


def pair_key(client_id: str, address: str | None) -> str:
    """The key of one claimed client at one source address."""
    return f"client:{client_id}@{address or '-'}"


@dataclass(frozen=True)
class Attempt:
    """One request's attempt: refused (``retry_after`` seconds), or counted at ``stamp``."""

    keys: tuple[str, ...]
    stamp: datetime | None = None
    retry_after: int | None = None


class FailureLimiter:
    """``limit`` failed requests per key within ``window`` seconds, in PostgreSQL (see above)."""

    def __init__(self, pool: asyncpg.Pool, *, limit: int, window: float) -> None:
        self.pool = pool
        self.limit = limit
        self.window = window
        self._next_prune = 0.0
        self._proven: dict[str, float] = {}
        """Pair keys whose credentials succeeded, with when the proof lapses (monotonic)."""

    def proven(self, pair: str | None) -> bool:
        """Whether ``pair`` succeeded within the window (in this process)."""
        if pair is None:
            return False
        until = self._proven.get(pair)
        if until is None or until < time.monotonic():
            self._proven.pop(pair, None)
            return False
        return True

    def prove(self, pair: str | None) -> None:
        """Remember that ``pair``'s credentials succeeded (bounded: lapsed proofs are dropped,
        and past MAX_PROVEN pairs the oldest go)."""
        if pair is None:
            return
        now = time.monotonic()
        if len(self._proven) >= MAX_PROVEN:
            self._proven = {k: v for k, v in self._proven.items() if v >= now}
            while len(self._proven) >= MAX_PROVEN:
                self._proven.pop(next(iter(self._proven)))
        self._proven[pair] = now + self.window

    def disprove(self, pair: str | None) -> None:
        if pair is not None:
            self._proven.pop(pair, None)

    async def attempt(self, *keys: str | None) -> Attempt:
        """Check the keys' limits and, unless one is reached, count an attempt against each.

        A refused attempt (``retry_after`` set: seconds until the key's oldest counted failure
        leaves the window) counts against nothing, so refusals do not extend a lockout.
        """
        present = tuple(key for key in keys if key is not None)
        if not present:
            return Attempt(present)
        prune = time.monotonic() >= self._next_prune
        if prune:
            self._next_prune = time.monotonic() + PRUNE_EVERY
        row = await self.pool.fetchrow(_ATTEMPT, list(present), self.limit, float(self.window), prune)
        assert row is not None  # the function returns one row
        if row["wait"] is not None:
            return Attempt(present, retry_after=max(1, math.ceil(row["wait"])))
        stamp: datetime = row["stamp"]
        return Attempt(present, stamp=stamp)

    async def forgive(self, attempt: Attempt) -> None:
        """Take back an attempt counted up front that turned out to succeed."""
        if attempt.stamp is not None:
            await self.pool.execute(_FORGIVE, list(attempt.keys), attempt.stamp)
