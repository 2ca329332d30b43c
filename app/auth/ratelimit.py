"""Failed-authentication limits for /auth/token and /auth/introspect (RFC 6819 §4.3.2, §5.1.4.2.3).

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

The counts are in memory, per process: with N processes an attacker gets up to N x ``limit``
attempts per window and address; a restart forgets them.
"""

from __future__ import annotations

import math
import time
from collections import deque

MAX_TRACKED = 100_000
"""Most keys (addresses, client/address pairs) remembered at once (memory bound under a spray)."""


def pair_key(client_id: str, address: str | None) -> str:
    """The key of one claimed client at one source address."""
    return f"client:{client_id}@{address or '-'}"


class FailureLimiter:
    def __init__(self, *, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, *keys: str | None) -> int | None:
        """Seconds until a request for these keys may be tried again, or None when not limited."""
        now = time.monotonic()
        wait: float | None = None
        for key in keys:
            if key is None:
                continue
            failures = self._recent(key, now)
            if failures is not None and len(failures) >= self.limit:
                remaining = failures[-self.limit] + self.window - now
                wait = remaining if wait is None else max(wait, remaining)
        return None if wait is None else max(1, math.ceil(wait))

    def record_failure(self, *keys: str | None) -> float:
        """Count a failure (or an attempt, see :meth:`forgive`) for each key; returns its stamp."""
        now = time.monotonic()
        for key in keys:
            if key is None:
                continue
            failures = self._recent(key, now)
            if failures is None:
                if len(self._failures) >= MAX_TRACKED:
                    self._prune(now)
                failures = self._failures[key] = deque(maxlen=self.limit)
            failures.append(now)
        return now

    def forgive(self, stamp: float, *keys: str | None) -> None:
        """Take back an attempt counted up front that turned out to succeed.

        Attempts are counted before the credentials are checked, so that many concurrent
        guesses cannot all pass the limit check before the first failure is recorded.
        """
        for key in keys:
            failures = self._failures.get(key) if key is not None else None
            if failures is not None and stamp in failures:
                failures.remove(stamp)

    def _recent(self, key: str, now: float) -> deque[float] | None:
        failures = self._failures.get(key)
        if failures is None:
            return None
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[key]
            return None
        return failures

    def _prune(self, now: float) -> None:
        for key in [key for key, failures in self._failures.items() if failures[-1] <= now - self.window]:
            del self._failures[key]
        if len(self._failures) >= MAX_TRACKED:  # all recent: forget the oldest tenth
            for key in list(self._failures)[: MAX_TRACKED // 10]:
                del self._failures[key]
