"""One typed condition tree for search conditions and access limits (issue 14, "one access model").

The search compiler (app/fhir/search.py) and the access rules (app/fhir/access.py) build
:data:`Node` trees; :func:`render` turns a tree into SQL in one place, and :func:`rid_set`
tells, from the tree's types rather than from the generated text, whether a condition is a
set of row ids a search can cut its page from (repository.py ``SearchExecutor._driver``).

Values are bound when a tree is built (the compiler's ``bind`` returns ``$n``), so leaves
carry SQL fragments with their placeholders; rendering binds nothing, and every form a node
renders to uses the same placeholders.

The same tree judges the older versions of a resource (history, vread; R4 http.html#history):
rendered with :class:`Older`, what a node says about the row's own content (its index rows,
its ``meta.lastUpdated``) is evaluated on the older version's extracted index rows, while
what it says about the row's identity or about other rows (a Task focusing it, a referral's
grants, a CareTeam) is evaluated on the current row, joined as the same alias.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sql:
    """A leaf: SQL over the row alias, its identity (type, id) or other rows' state.

    ``older`` False: it speaks of the current version only (which organisation wrote it), so
    that it admits no older version."""

    text: str
    older: bool = True


TRUE = Sql("TRUE")
FALSE = Sql("FALSE")


@dataclass(frozen=True)
class Index:
    """The row ``outer`` has a row in the index table ``table`` (alias ``alias``) that matches
    ``where``; ``where`` looks at that alias's columns only (and at uncorrelated subqueries), so
    the rows it matches are a set of rids and an older version's own index rows can answer it."""

    outer: str
    table: str
    alias: str
    where: str

    @property
    def rows(self) -> str:
        return f"SELECT {self.alias}.rid FROM {self.table} {self.alias} WHERE {self.where}"


@dataclass(frozen=True)
class Identity:
    """Live resource rows ``alias`` of one type (``type_sql``) chosen by ``where`` over their id
    only (a Patient user's own Patient): the same for every version of a resource."""

    alias: str
    type_sql: str
    where: str

    @property
    def rows(self) -> str:
        return (
            f"SELECT {self.alias}.rid FROM resource {self.alias} WHERE {self.alias}.resource_type"
            f" = {self.type_sql} AND NOT {self.alias}.deleted AND {self.where}"
        )


@dataclass(frozen=True)
class Select:
    """An uncorrelated ``SELECT <rid> ...`` of rows chosen by the state of other rows (the
    ServiceRequests an asked Task focuses): it concerns the resource, not one of its versions."""

    text: str

    @property
    def rows(self) -> str:
        return self.text


Source = Index | Identity | Select


@dataclass(frozen=True)
class RowsIn:
    """``outer.rid IN (<the union of sources>)``: uncorrelated, computed once per statement.

    ``per_row``: a statement that judges a few rows as an ordered index yields them (a
    worklist page, app/fhir/search.py Worklist) looks each row up in the index instead
    (correlated ``EXISTS``), rather than collecting the whole set first (all of a busy
    owner's Tasks); only a set made of :class:`Index` sources can."""

    outer: str
    sources: tuple[Source, ...]
    per_row: bool = False


@dataclass(frozen=True)
class Instant:
    """One ``_lastUpdated`` value: comparisons ``(operator, placeholder)`` of the instant, all
    of which hold (or, ``negated``, not all)."""

    comparisons: tuple[tuple[str, str], ...]
    negated: bool = False


@dataclass(frozen=True)
class LastUpdated:
    """``_lastUpdated`` of the row ``outer`` (R4 search.html#lastUpdated): any of the values."""

    outer: str
    values: tuple[Instant, ...]


@dataclass(frozen=True)
class And:
    parts: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    parts: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    part: Node


Node = Sql | Index | RowsIn | LastUpdated | And | Or | Not


def all_of(parts: Sequence[Node]) -> Node:
    """The conjunction (a single part is itself; none is TRUE)."""
    return TRUE if not parts else parts[0] if len(parts) == 1 else And(tuple(parts))


def any_of(parts: Sequence[Node]) -> Node:
    """The disjunction (a single part is itself; none is FALSE)."""
    return FALSE if not parts else parts[0] if len(parts) == 1 else Or(tuple(parts))


@dataclass
class Older:
    """Rendering for older versions: the statement provides ``v`` (one row per version: ``n``,
    ``last_updated``), the current row under the tree's alias, and per index table a relation
    ``older_<kind>`` of the versions' extracted index rows (``n``, ``resource_type``, ``param``
    and the table's value columns); ``tables`` collects the kinds the rendering used."""

    tables: set[str] = field(default_factory=set)


def render(node: Node, *, per_row: bool = False, older: Older | None = None) -> str:
    """The SQL of a tree. ``per_row``: see :class:`RowsIn`; ``older``: see :class:`Older`."""
    if isinstance(node, Sql):
        # FALSE AND <text>: the leaf's placeholders stay in the statement (PostgreSQL must type them).
        return node.text if older is None or node.older else f"(FALSE AND {node.text})"
    if isinstance(node, Index):
        return _exists(node, older)
    if isinstance(node, LastUpdated):
        return _instants(node, "v.last_updated" if older is not None else f"{node.outer}.last_updated")
    if isinstance(node, RowsIn):
        if older is not None:
            return _join([_older_source(node.outer, s, older) for s in node.sources], " OR ")
        if per_row and node.per_row and all(isinstance(s, Index) for s in node.sources):
            return _join([_exists(s, None) for s in node.sources if isinstance(s, Index)], " OR ")
        return f"{node.outer}.rid IN ({' UNION ALL '.join(s.rows for s in node.sources)})"
    if isinstance(node, Not):
        return "NOT " + render(node.part, per_row=per_row, older=older)
    joiner = " AND " if isinstance(node, And) else " OR "
    return "(" + joiner.join(render(p, per_row=per_row, older=older) for p in node.parts) + ")"


def rid_set(node: Node, type_placeholder: str) -> str | None:
    """The condition as ``SELECT rid ...`` of the live rows of the searched type it matches, or
    None when it needs other columns of the resource row (negations, ``_has``, ``_id``, a
    partner's limits). ``type_placeholder`` binds the type. Conjunctions and disjunctions of
    such sets are sets too (a patient permission's compartment and restrictions)."""
    if isinstance(node, Index):
        return node.rows
    if isinstance(node, RowsIn):
        if any(isinstance(s, Select) for s in node.sources):
            return None  # other rows' state: not necessarily live rows of the searched type
        return " UNION ALL ".join(s.rows for s in node.sources)
    if isinstance(node, LastUpdated):
        return (
            f"SELECT lu.rid FROM resource lu WHERE lu.resource_type = {type_placeholder}"
            f" AND NOT lu.deleted AND {_instants(node, 'lu.last_updated')}"
        )
    if isinstance(node, And | Or):
        # A patient permission's compartment (any of its parameters) and restrictions (all).
        sets = [rid_set(part, type_placeholder) for part in node.parts]
        if not all(sets):
            return None
        first, *others = [s for s in sets if s]
        if isinstance(node, Or) or not others:
            return " UNION ALL ".join([first, *others])
        return f"SELECT a.rid FROM ({first}) a WHERE " + " AND ".join(f"a.rid IN ({s})" for s in others)
    return None


def _join(parts: list[str], joiner: str) -> str:
    return parts[0] if len(parts) == 1 else "(" + joiner.join(parts) + ")"


def _exists(node: Index, older: Older | None) -> str:
    if older is None:
        return (
            f"EXISTS (SELECT 1 FROM {node.table} {node.alias} WHERE {node.alias}.rid = {node.outer}.rid"
            f" AND {node.where})"
        )
    kind = node.table.removeprefix("search_")
    older.tables.add(kind)
    return f"EXISTS (SELECT 1 FROM older_{kind} {node.alias} WHERE {node.alias}.n = v.n AND {node.where})"


def _older_source(outer: str, source: Source, older: Older) -> str:
    if isinstance(source, Index):
        return _exists(source, older)
    if isinstance(source, Identity):
        # The id is every version's; the row may be deleted now (its history is still read).
        return (
            f"EXISTS (SELECT 1 FROM resource {source.alias} WHERE {source.alias}.rid = {outer}.rid"
            f" AND {source.where})"
        )
    return f"{outer}.rid IN ({source.text})"


def _instants(node: LastUpdated, column: str) -> str:
    values = []
    for value in node.values:
        text = " AND ".join(f"{column} {operator} {bound}" for operator, bound in value.comparisons)
        if len(value.comparisons) > 1 or value.negated:
            text = f"({text})"
        values.append(f"NOT {text}" if value.negated else text)
    return _join(values, " OR ")
