"""Named-parameter SQL for asyncpg.

The repository and search engine talk to asyncpg directly (SQLModel/SQLAlchemy define the
schema for the Alembic migrations). Statements are written
with ``:name`` parameters for readability and compiled once to asyncpg's ``$n`` form.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class Statement:
    """A SQL text with ``:name`` parameters, compiled to ``$1..$n``."""

    __slots__ = ("names", "sql")

    def __init__(self, sql: str) -> None:
        names: list[str] = []

        def positional(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        self.sql = _NAMED.sub(positional, sql)
        self.names = tuple(names)

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        return [params[name] for name in self.names]
