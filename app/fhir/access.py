"""The caller's access context, carried from the request into storage.

Authorization (SMART scopes, patient compartments, organisations) arrives with its
own issue; the repository already receives this object so that its filters can be
added to the SQL of every interaction rather than applied to pages afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AccessContext:
    """Who is calling. ``unrestricted`` is the open API (no authorization configured)."""

    client_id: str | None = None
    unrestricted: bool = True


OPEN_ACCESS = AccessContext()
