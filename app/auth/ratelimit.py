"""Failed-authentication limits for /auth/token and /auth/introspect (RFC 6819 §4.3.2, §5.1.4.2.3).

After ``limit`` failed requests within ``window`` seconds from one source address, or naming
one client_id, further requests from that address or for that client are refused with 429
until the oldest failure leaves the window, correct credentials included: that is what stops
online guessing of a secret.

The counts are in memory, per process: with N processes an attacker gets up to N x ``limit``
attempts per window, which still makes guessing a 256-bit secret hopeless; a restart forgets
them. A client_id named by an attacker can be locked out this way for at most one window.
"""

from __future__ import annotations

import math
import time
from collections import deque

MAX_TRACKED = 100_000
"""Most addresses/clients remembered at once (memory bound under a spray of addresses)."""


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
