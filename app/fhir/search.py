"""The FHIR R4 search engine: query parameters -> one SQL statement (R4 search.html).

``parse_search`` turns the parameters of a search interaction into a :class:`SearchRequest`:
typed SQL conditions over the search-index tables (see indexing.py), sort keys, include
directives and result options. Only values travel as bind parameters; every identifier in
the SQL comes from the generated parameter table, never from the request. A malformed value
is a 400 OperationOutcome naming the parameter; an unknown parameter is reported (or, with
``Prefer: handling=strict``, refused).

Paging is keyset paging over the sort keys plus the row id (search.html#paging): the cursor
carries the last row's sort values, signed, so writes between page requests neither
duplicate nor skip entries for a fixed sort.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from app.auth.scopes import restriction_problem
from app.fhir.access import OPEN_ACCESS, AccessContext
from app.fhir.conditions import (
    FALSE,
    TRUE,
    And,
    Index,
    Instant,
    LastUpdated,
    Node,
    Not,
    Sql,
    any_of,
    render,
    rid_set,
)
from app.fhir.errors import BadRequest, Issue
from app.fhir.fhirdate import HIGHEST, LOWEST, date_range
from app.fhir.indexing import normalize, split_reference
from app.fhir.params import parse_count
from app.fhir.search_params import SearchParam, SearchRegistry
from app.fhir.types import SERVED_TYPE_SET
from app.fhir.validation import FORBIDDEN_CHARACTERS

if TYPE_CHECKING:
    from app.settings import Settings

DEFAULT_COUNT = 20
MAX_COUNT = 1000
MAX_INCLUDES = 1000
MAX_ITERATE = 3

RESULT_PARAMETERS = frozenset(
    {
        "_count",
        "_sort",
        "_include",
        "_revinclude",
        "_total",
        "_summary",
        "_elements",
        "_cursor",
        "_format",
        "_pretty",
        "_type",
        "_contained",
        "_containedType",
    }
)
UNSUPPORTED_PARAMETERS = frozenset({"_text", "_content", "_query", "_filter", "_list", "_has_not"})
_PREFIX = re.compile(r"^(eq|ne|gt|lt|ge|le|sa|eb|ap)?(.*)$", re.DOTALL)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")


@dataclass(frozen=True)
class SearchLimits:
    """The complexity budget of one search (issue 15: one search must not exhaust the database).

    PostgreSQL plans every condition of a search together: 150 repeated ``name=`` parameters
    grew one backend past 2.5 GB, 5,000 killed the server. Each dimension has a setting
    (``CARECOORD_SEARCH_MAX_*``); a search over budget is a 400 ``too-costly`` naming the
    limit before anything is compiled or sent to the database.
    """

    parameters: int = 30
    """Search parameters (each repetition counts) and _sort keys."""
    values: int = 1000
    """Values over all parameters (comma-separated OR values count one each)."""
    chain_depth: int = 3
    """Hops of one chain or ``_has`` nesting (``subject:Patient.organization.name``: 2)."""
    has: int = 3
    """``_has`` conditions (nested ones included)."""
    includes: int = 10
    """``_include`` and ``_revinclude`` directives."""
    bind_values: int = 5000
    """Bind parameters of the compiled statement (what the other limits let through, as a backstop)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> SearchLimits:
        return cls(
            parameters=settings.search_max_parameters,
            values=settings.search_max_values,
            chain_depth=settings.search_max_chain_depth,
            has=settings.search_max_has,
            includes=settings.search_max_includes,
            bind_values=settings.search_max_bind_values,
        )


SETTING_NAMES = {
    "parameters": "CARECOORD_SEARCH_MAX_PARAMETERS",
    "values": "CARECOORD_SEARCH_MAX_VALUES",
    "chain_depth": "CARECOORD_SEARCH_MAX_CHAIN_DEPTH",
    "has": "CARECOORD_SEARCH_MAX_HAS",
    "includes": "CARECOORD_SEARCH_MAX_INCLUDES",
    "bind_values": "CARECOORD_SEARCH_MAX_BIND_VALUES",
}


def too_costly(
    limits: SearchLimits, dimension: str, found: int, what: str, name: str | None = None
) -> BadRequest:
    """The 400 for a search over one dimension of its budget."""
    limit = getattr(limits, dimension)
    return BadRequest(
        f"{name + ': ' if name else ''}this search has {found} {what}; the limit is {limit}"
        f" ({SETTING_NAMES[dimension]})",
        expression=(name,) if name else (),
        code="too-costly",
    )


def _check_budget(
    limits: SearchLimits, pairs: list[tuple[str, str]], sort_keys: int, include_directives: int
) -> None:
    """The parts of the budget that the parameters alone tell (before any compiling)."""
    filters = [(n, v) for n, v in pairs if n.split(":", 1)[0].split(".", 1)[0] not in RESULT_PARAMETERS]
    if len(filters) + sort_keys > limits.parameters:
        raise too_costly(limits, "parameters", len(filters) + sort_keys, "parameters and sort keys")
    values = sum(len(split_values(raw)) for _, raw in filters)
    if values > limits.values:
        raise too_costly(limits, "values", values, "values")
    has = sum(name.count("_has:") for name, _ in filters)
    if has > limits.has:
        raise too_costly(limits, "has", has, "_has conditions")
    if include_directives > limits.includes:
        raise too_costly(limits, "includes", include_directives, "_include/_revinclude directives")


class Binder:
    """Collects bind parameters; every value in the SQL goes through here."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


@dataclass(frozen=True)
class SortKey:
    name: str
    descending: bool
    expression: str  # SQL over alias r, never NULL
    sql_type: str


@dataclass(frozen=True)
class Include:
    source_type: str  # a type or "*"
    param: str  # a reference parameter or "*"
    target_type: str | None
    iterate: bool
    reverse: bool

    def render(self) -> str:
        text = f"{self.source_type}:{self.param}" + (f":{self.target_type}" if self.target_type else "")
        name = "_revinclude" if self.reverse else "_include"
        return f"{name}{':iterate' if self.iterate else ''}={text}"


@dataclass
class SearchRequest:
    """A parsed search: WHERE conditions, sort, paging and result options."""

    resource_types: tuple[str, ...]
    conditions: list[Node]
    """Conditions over the rows searched, all of which hold (app/fhir/conditions.py)."""
    binder: Binder
    applied: list[tuple[str, str]]  # the parameters actually used, for link.self
    sort: list[SortKey]
    count: int
    includes: list[Include] = field(default_factory=list)
    total: str = "none"
    summary: str | None = None
    elements: tuple[str, ...] = ()
    cursor: str | None = None
    issues: list[Issue] = field(default_factory=list)
    type_placeholder: str = ""
    """The bind placeholder of the (single) resource type searched."""
    access: AccessContext = OPEN_ACCESS
    """The caller's limits; included resources are filtered by them too."""
    where_count: int = 0
    """How many of the binder's values the WHERE clause uses (they come first)."""
    store: str = "resource"
    """The table the conditions are over: ``resource`` (alias r) or ``audit_event`` (alias a,
    app/audit/fhir.py)."""
    driven_limits: frozenset[int] = frozenset()
    """Positions in ``conditions`` of access limits that are sets of rids: a page cut from the
    index by the driver (repository.py ``_driver``) is within them already."""
    worklist_filter: str = ""
    """Conditions on ``search_worklist w`` rows whose index order drives the page (:class:`Worklist`)."""

    @property
    def rid_sets(self) -> list[str | None]:
        """Per condition, the same condition as a set of matching rids, when it is one
        (conditions.py ``rid_set``)."""
        return [rid_set(condition, self.type_placeholder) for condition in self.conditions]

    def where(self, skipped: frozenset[int] = frozenset()) -> list[str]:
        """The conditions as SQL, but for the positions ``skipped``; a worklist's page judges
        its rows one by one as its index yields them (conditions.py ``RowsIn.per_row``)."""
        per_row = bool(self.worklist_filter)
        return [render(c, per_row=per_row) for n, c in enumerate(self.conditions) if n not in skipped]

    @property
    def drivable(self) -> bool:
        """All conditions are rid sets, so a page can be cut from their intersection before any
        resource row is read (index rows exist only for live resources of their type)."""
        return (
            len(self.resource_types) == 1
            and bool(self.rid_sets)
            and all(s is not None for s in self.rid_sets)
        )

    @property
    def fingerprint(self) -> str:
        """Identifies the query a cursor belongs to (a cursor is valid only for its query)."""
        # _count is left out: the server caps it, and its links carry the capped value.
        text = "&".join(f"{k}={v}" for k, v in sorted(self.applied) if k not in ("_cursor", "_count"))
        return hashlib.sha256(f"{','.join(self.resource_types)}?{text}".encode()).hexdigest()[:16]


def _split_escaped(value: str, separator: str, limit: int = -1) -> list[str]:
    """Split on unescaped ``separator``; escape sequences are kept for the next level."""
    parts, current, escaped = [], "", False
    for char in value:
        if escaped:
            current += "\\" + char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator and limit != 0:
            parts.append(current)
            current = ""
            limit -= 1
        else:
            current += char
    parts.append(current + ("\\" if escaped else ""))
    return parts


def split_values(raw: str) -> list[str]:
    """Comma separates OR values; ``\\,`` is a literal comma (search.html#escaping)."""
    return _split_escaped(raw, ",")


def _split_unescaped(value: str, separator: str, limit: int = -1) -> list[str]:
    """Split on ``|`` or ``$`` and resolve the escapes of each part."""
    return [unescape(part) for part in _split_escaped(value, separator, limit)]


def unescape(value: str) -> str:
    """``\\,`` ``\\|`` ``\\$`` ``\\\\`` -> the literal character (search.html#escaping)."""
    return re.sub(r"\\([\\,|$])", r"\1", value)


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class SearchCompiler:
    """Compiles search parameters of one or more types into condition trees (conditions.py)."""

    patient_column: str | None = None
    """Resource rows name their Patients in index rows (access.py ``ConditionCompiler``)."""

    def __init__(
        self,
        registry: SearchRegistry,
        fhir_base: str,
        binder: Binder,
        access: AccessContext = OPEN_ACCESS,
        limits: SearchLimits = SearchLimits(),
    ) -> None:
        self.registry = registry
        self.fhir_base = fhir_base
        self.bind = binder
        self.access = access
        self.limits = limits
        """Chained and ``_has`` subqueries see only what the caller may search (issue 4)."""
        self._aliases = 0

    def restriction(self, alias: str, resource_type: str, name: str, raw: str) -> Node | None:
        """A scope's ``?param=value`` restriction as SQL; None when it is not a plain search
        parameter of the type (app/auth/scopes.py ``restriction_problem``: no chain, no ``_has``),
        so that it only ever looks at the row itself: compiled with open access, a chain or
        ``_has`` in a restriction was an oracle over rows the caller may not see (issue 15)."""
        if restriction_problem(resource_type, [(name, raw)]) is not None:
            return None
        return self.condition(alias, resource_type, name, raw)

    def bind_mark(self) -> int:
        return len(self.bind.values)

    def bind_rollback(self, mark: int) -> None:
        """Forget values bound after ``mark`` (their SQL was discarded; PostgreSQL refuses
        parameters it cannot type because no statement text uses them)."""
        del self.bind.values[mark:]

    def in_patient_compartment(self, resource_type: str) -> bool:
        return resource_type == "Patient" or resource_type in self.registry.patient_compartment

    def _visible(self, alias: str, resource_type: str) -> str:
        """`` AND <access condition>`` for rows of another type reached by a chain or _has."""
        condition = self.access.condition(self, alias, resource_type, "s")
        return f" AND {render(condition)}" if condition is not None else ""

    def _alias(self, prefix: str) -> str:
        self._aliases += 1
        return f"{prefix}{self._aliases}"

    # -- entry point -----------------------------------------------------------------------

    def condition(self, alias: str, resource_type: str, name: str, raw: str, depth: int = 0) -> Node | None:
        """The condition of one ``name=raw`` on rows ``alias`` of ``resource_type``; None if unknown."""
        if depth > self.limits.chain_depth:
            raise too_costly(self.limits, "chain_depth", depth, "levels of chaining and _has", name)
        if name.startswith("_has:"):
            return self._has(alias, resource_type, name, raw, depth)
        head, dot, chain = name.partition(".")
        base, _, modifier = head.partition(":")
        if base == "_id":
            return self._id(alias, name, modifier, raw) if not dot else None
        param = self.registry.get(resource_type, base)
        if param is None:
            return None
        if dot:
            if param.type != "reference":
                raise BadRequest(
                    f"{name}: '{base}' is not a reference parameter and cannot be chained", expression=(name,)
                )
            return self._chain(alias, resource_type, param, modifier, chain, raw, name, depth)
        if modifier == "missing":
            return self._missing(alias, resource_type, param, raw, name)
        if param.name == "_lastUpdated":
            if modifier:
                raise BadRequest(f"{name}: modifier ':{modifier}' is not supported", expression=(name,))
            return LastUpdated(alias, tuple(self._instant(v, name) for v in split_values(raw)))
        if param.type == "composite":
            return self._composite(alias, resource_type, param, modifier, raw, name)
        if param.kind == "position":
            self._no_modifier(modifier, name)
            index = self._alias("i")
            predicate = self._any(self._near(index, value, name) for value in split_values(raw))
            return self._exists(alias, resource_type, param, predicate, index)
        return self._indexed(alias, resource_type, param, modifier, raw, name)

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _any(parts: Any) -> str:
        items = list(parts)
        return items[0] if len(items) == 1 else "(" + " OR ".join(items) + ")"

    def _exists(
        self, alias: str, resource_type: str, param: SearchParam, predicate: str, index: str
    ) -> Index:
        where = (
            f"{index}.resource_type = {self.bind(resource_type)}"
            f" AND {index}.param = {self.bind(param.name)} AND {predicate}"
        )
        return Index(alias, f"search_{param.kind}", index, where)

    def _id(self, alias: str, name: str, modifier: str, raw: str) -> Node:
        values = [unescape(v) for v in split_values(raw) if v]
        if modifier == "missing":
            return TRUE if raw == "false" else FALSE
        if modifier not in ("", "not"):
            raise BadRequest(f"{name}: modifier ':{modifier}' is not supported on _id", expression=(name,))
        if not values:
            raise BadRequest(f"{name}: a value is required", expression=(name,))
        clause = Sql(f"{alias}.fhir_id = ANY({self.bind(values)})")
        return Not(clause) if modifier == "not" else clause

    def _missing(self, alias: str, resource_type: str, param: SearchParam, raw: str, name: str) -> Node:
        if raw not in ("true", "false"):
            raise BadRequest(f"{name}: :missing takes true or false", expression=(name,))
        if param.type == "composite" or param.column:
            raise BadRequest(f"{name}: :missing is not supported on this parameter", expression=(name,))
        exists = self._exists(alias, resource_type, param, "TRUE", self._alias("m"))
        return Not(exists) if raw == "true" else exists

    def _indexed(
        self, alias: str, resource_type: str, param: SearchParam, modifier: str, raw: str, name: str
    ) -> Node:
        index = self._alias("i")
        values = split_values(raw)
        if param.type == "token":
            if modifier == "not":
                predicate = self._any(self._token(index, v, "", name) for v in values)
                return Not(self._exists(alias, resource_type, param, predicate, index))
            predicate = self._any(self._token(index, v, modifier, name) for v in values)
        elif param.type == "string":
            predicate = self._any(self._string(index, v, modifier, name) for v in values)
        elif param.type == "date":
            self._no_modifier(modifier, name)
            predicate = self._any(self._date(f"{index}.low", f"{index}.high", v, name) for v in values)
        elif param.type in ("number", "quantity"):
            self._no_modifier(modifier, name)
            predicate = self._any(self._quantity(index, v, name, param.type == "quantity") for v in values)
        elif param.type == "reference":
            predicate = self._any(self._reference(index, param, v, modifier, name) for v in values)
        elif param.type == "uri":
            predicate = self._any(self._uri(index, v, modifier, name) for v in values)
        else:
            raise BadRequest(f"{name}: parameter type {param.type} is not supported", expression=(name,))
        return self._exists(alias, resource_type, param, predicate, index)

    @staticmethod
    def _no_modifier(modifier: str, name: str) -> None:
        if modifier:
            raise BadRequest(f"{name}: modifier ':{modifier}' is not supported here", expression=(name,))

    # -- parameter types -------------------------------------------------------------------

    def _token(self, index: str, value: str, modifier: str, name: str) -> str:
        if modifier == "text":
            return f"{index}.display LIKE {self.bind(_like_prefix(normalize(unescape(value))) + '%')}"
        if modifier == "of-type":
            parts = _split_unescaped(value, "|")
            if len(parts) != 3 or not all(parts[1:]):
                raise BadRequest(f"{name}: :of-type takes system|code|value", expression=(name,))
            return (
                f"({index}.type_system = {self.bind(parts[0])} AND {index}.type_code = {self.bind(parts[1])}"
                f" AND {index}.code = {self.bind(parts[2])})"
            )
        if modifier:
            raise BadRequest(
                f"{name}: modifier ':{modifier}' is not supported on token parameters", expression=(name,)
            )
        if not value:
            raise BadRequest(f"{name}: empty value", expression=(name,))
        parts = _split_unescaped(value, "|", 1)
        if len(parts) == 1:
            return f"{index}.code = {self.bind(parts[0])}"
        system, code = parts
        if not system:
            return f"({index}.system IS NULL AND {index}.code = {self.bind(code)})"
        if not code:
            return f"{index}.system = {self.bind(system)}"
        return f"({index}.system = {self.bind(system)} AND {index}.code = {self.bind(code)})"

    def _string(self, index: str, value: str, modifier: str, name: str) -> str:
        value = unescape(value)
        if not value:
            raise BadRequest(f"{name}: empty value", expression=(name,))
        if modifier == "exact":
            return f"{index}.value_exact = {self.bind(value)}"
        pattern = _like_prefix(normalize(value))
        if modifier == "contains":
            return f"{index}.value_norm LIKE {self.bind('%' + pattern + '%')}"
        if modifier:
            raise BadRequest(
                f"{name}: modifier ':{modifier}' is not supported on string parameters", expression=(name,)
            )
        return f"{index}.value_norm LIKE {self.bind(pattern + '%')}"

    def _date(self, low: str, high: str, value: str, name: str) -> str:
        prefix, text = _prefix(unescape(value))
        span = date_range(text)
        if span is None:
            raise BadRequest(
                f"{name}: '{value[:40]}' is not a valid date (0001-01-01 to 9999-12-31 in UTC)",
                expression=(name,),
            )
        if prefix == "ap":
            below, above = self._approximately(span, value, name)
            return f"({low} < {below} AND {high} > {above})"
        # Bind only what the prefix uses: asyncpg cannot type an unused parameter.
        if prefix in ("eq", "ne", "ge", "le"):
            start, end = self.bind(span[0]), self.bind(span[1])
            contained = f"({low} >= {start} AND {high} <= {end})"
            if prefix == "eq":
                return contained
            if prefix == "ne":
                return f"NOT {contained}"
            if prefix == "ge":
                return f"({high} > {end} OR {contained})"
            return f"({low} < {start} OR {contained})"
        if prefix == "gt":
            return f"{high} > {self.bind(span[1])}"
        if prefix == "lt":
            return f"{low} < {self.bind(span[0])}"
        if prefix == "sa":
            return f"{low} >= {self.bind(span[1])}"
        return f"{high} <= {self.bind(span[0])}"  # eb

    def _approximately(self, span: tuple[datetime, datetime], value: str, name: str) -> tuple[str, str]:
        """``ap``: the search range widened by 10% of its distance from now (search.html#prefix),
        as the bound placeholders of its end and its start."""
        now = datetime.now(UTC)
        gap = max(abs(now - span[0]), abs(now - span[1]), timedelta(days=10)) / 10
        if HIGHEST - span[1] < gap or span[0] - LOWEST < gap:
            raise BadRequest(
                f"{name}: the approximate range of '{value[:40]}' leaves the supported dates"
                " (0001-01-01 to 9999-12-31)",
                expression=(name,),
            )
        return self.bind(span[1] + gap), self.bind(span[0] - gap)

    def _instant(self, value: str, name: str) -> Instant:
        """A date prefix against a single instant (``meta.lastUpdated``), compared with the bare
        column (conditions.py ``LastUpdated``).

        The same semantics as :meth:`_date` with the instant as its own range, written so
        that the (type, last_updated) index applies.
        """
        prefix, text = _prefix(unescape(value))
        span = date_range(text)
        if span is None:
            raise BadRequest(
                f"{name}: '{value[:40]}' is not a valid date (0001-01-01 to 9999-12-31 in UTC)",
                expression=(name,),
            )
        if prefix == "ap":
            below, above = self._approximately(span, value, name)
            return Instant((("<", below), (">", above)))
        start, end = span
        if prefix in ("gt", "sa"):
            return Instant(((">=", self.bind(end)),))
        if prefix in ("lt", "eb"):
            return Instant((("<", self.bind(start)),))
        if prefix == "ge":
            return Instant(((">=", self.bind(start)),))
        if prefix == "le":
            return Instant((("<", self.bind(end)),))
        return Instant(((">=", self.bind(start)), ("<", self.bind(end))), negated=prefix == "ne")

    def _quantity(self, index: str, value: str, name: str, with_units: bool) -> str:
        prefix, text = _prefix(value)
        pieces = _split_unescaped(text, "|", 2) if with_units else [unescape(text)]
        number_text = pieces[0]
        system = pieces[1] if len(pieces) == 3 else ""
        code = pieces[-1] if len(pieces) > 1 else ""
        if not _NUMBER.match(number_text):
            raise BadRequest(f"{name}: '{value[:40]}' is not a number", expression=(name,))
        try:
            number = Decimal(number_text)
        except InvalidOperation as exc:
            raise BadRequest(f"{name}: '{value[:40]}' is not a number", expression=(name,)) from exc
        exponent = number.as_tuple().exponent
        if not isinstance(exponent, int) or abs(exponent) > 64 or number.adjusted() > 64:
            raise BadRequest(f"{name}: '{value[:40]}' is out of range", expression=(name,))
        half = Decimal(5).scaleb((exponent if isinstance(exponent, int) else 0) - 1)
        column = f"{index}.value"
        if prefix == "eq":
            clause = f"({column} >= {self.bind(number - half)} AND {column} < {self.bind(number + half)})"
        elif prefix == "ne":
            clause = f"NOT ({column} >= {self.bind(number - half)} AND {column} < {self.bind(number + half)})"
        elif prefix in ("gt", "sa"):
            clause = f"{column} > {self.bind(number)}"
        elif prefix in ("lt", "eb"):
            clause = f"{column} < {self.bind(number)}"
        elif prefix == "ge":
            clause = f"{column} >= {self.bind(number)}"
        elif prefix == "le":
            clause = f"{column} <= {self.bind(number)}"
        else:
            spread = abs(number) / 10
            clause = (
                f"({column} >= {self.bind(number - spread)} AND {column} <= {self.bind(number + spread)})"
            )
        if system or code:
            if system:
                clause += f" AND {index}.system = {self.bind(system)}"
            if code:
                clause += f" AND ({index}.code = {self.bind(code)} OR {index}.unit = {self.bind(code)})"
            clause = f"({clause})"
        return clause

    def _reference(self, index: str, param: SearchParam, value: str, modifier: str, name: str) -> str:
        if not value:
            raise BadRequest(f"{name}: empty value", expression=(name,))
        if modifier == "identifier":
            parts = _split_unescaped(value, "|", 1)
            if len(parts) == 1:
                return f"{index}.ident_value = {self.bind(parts[0])}"
            system, code = parts
            clause = (
                f"{index}.ident_system = {self.bind(system)}" if system else f"{index}.ident_system IS NULL"
            )
            return f"({clause} AND {index}.ident_value = {self.bind(code)})" if code else clause
        if modifier and not (_TYPE_NAME.match(modifier) and modifier in SERVED_TYPE_SET):
            if _TYPE_NAME.match(modifier):
                return "FALSE"  # a type this server does not store: nothing can match
            raise BadRequest(
                f"{name}: modifier ':{modifier}' is not supported on reference parameters", expression=(name,)
            )
        target_type, target_id, url = split_reference(_split_unescaped(value, "|", 1)[0], self.fhir_base)
        if url is not None:
            if "/" not in url and ":" not in url:
                target_id = url  # a bare id
            else:
                return f"{index}.url = {self.bind(url)}"
        if target_type is None and target_id is None:
            raise BadRequest(f"{name}: '{value[:60]}' is not a reference", expression=(name,))
        if modifier:
            if target_type and target_type != modifier:
                return "FALSE"
            target_type = modifier
        clause = f"{index}.target_id = {self.bind(target_id)}"
        if target_type:
            clause = f"({clause} AND {index}.target_type = {self.bind(target_type)})"
        return clause

    def _uri(self, index: str, value: str, modifier: str, name: str) -> str:
        value = unescape(value)
        if not value:
            raise BadRequest(f"{name}: empty value", expression=(name,))
        if modifier == "below":
            return f"{index}.uri LIKE {self.bind(_like_prefix(value) + '%')}"
        if modifier == "above":
            return f"{self.bind(value)} LIKE replace(replace({index}.uri, '%', '\\%'), '_', '\\_') || '%'"
        if modifier:
            raise BadRequest(
                f"{name}: modifier ':{modifier}' is not supported on uri parameters", expression=(name,)
            )
        return f"{index}.uri = {self.bind(value)}"

    def _near(self, index: str, value: str, name: str) -> str:
        """``near=latitude|longitude|distance|units`` (R4 location.html#search): positions within
        ``distance`` great-circle (haversine) of the point. A latitude band and a longitude band
        (split where it crosses the antimeridian, dropped when it reaches a pole) bound the
        index range scan; the exact distance is checked on what remains."""
        latitude, longitude, distance_km = parse_near(value, name)
        box = bounding_box(latitude, longitude, distance_km)
        clauses = [f"{index}.latitude BETWEEN {self.bind(box.south)} AND {self.bind(box.north)}"]
        if box.longitude_bands:
            bands = [
                f"{index}.longitude BETWEEN {self.bind(west)} AND {self.bind(east)}"
                for west, east in box.longitude_bands
            ]
            clauses.append(self._any(bands))
        lat, lon = self.bind(latitude), self.bind(longitude)
        clauses.append(
            f"{EARTH_RADIUS_KM} * 2 * asin(LEAST(1.0, sqrt("
            f"power(sin(radians({index}.latitude - {lat}) / 2), 2)"
            f" + cos(radians({lat})) * cos(radians({index}.latitude))"
            f" * power(sin(radians({index}.longitude - {lon}) / 2), 2))))"
            f" <= {self.bind(distance_km)}"
        )
        return "(" + " AND ".join(clauses) + ")"

    def _composite(
        self, alias: str, resource_type: str, param: SearchParam, modifier: str, raw: str, name: str
    ) -> Node:
        """Composite parameters: every component must match (search.html#composite).

        Components are matched per resource, not per repeating element: for the
        ``component-*`` parameters of Observation this can match values from two
        different components.
        """
        self._no_modifier(modifier, name)
        clauses: list[Node] = []
        for value in split_values(raw):
            parts = _split_escaped(value, "$")
            if len(parts) != len(param.components):
                raise BadRequest(
                    f"{name}: expected {len(param.components)} values separated by $", expression=(name,)
                )
            component_clauses: list[Node] = []
            for component, part in zip(param.components, parts, strict=True):
                component_param = self.registry.get(resource_type, component)
                if component_param is None:
                    raise BadRequest(f"{name}: component {component} is not supported", expression=(name,))
                component_clauses.append(self._indexed(alias, resource_type, component_param, "", part, name))
            clauses.append(And(tuple(component_clauses)))
        return any_of(clauses)

    # -- chaining --------------------------------------------------------------------------

    def _chain(
        self,
        alias: str,
        resource_type: str,
        param: SearchParam,
        type_modifier: str,
        chain: str,
        raw: str,
        name: str,
        depth: int,
    ) -> Index:
        """``subject:Patient.name=smith`` (search.html#chaining)."""
        if type_modifier and type_modifier not in SERVED_TYPE_SET:
            raise BadRequest(
                f"{name}: '{type_modifier}' is not a resource type served here", expression=(name,)
            )
        chained_base = chain.split(".", 1)[0].split(":", 1)[0]
        candidates = [type_modifier] if type_modifier else [t for t in param.targets if t in SERVED_TYPE_SET]
        targets = [
            t
            for t in candidates
            if chained_base == "_id" or chained_base.startswith("_has") or self.registry.get(t, chained_base)
        ]
        if not targets:
            raise BadRequest(
                f"{name}: no target type of '{param.name}' has a parameter '{chained_base}'",
                expression=(name,),
            )
        index = self._alias("c")
        alternatives = []
        for target in targets:
            target_alias = self._alias("t")
            inner = self.condition(target_alias, target, chain, raw, depth + 1)
            if inner is None:
                raise BadRequest(f"{name}: unknown chained parameter '{chain}'", expression=(name,))
            visible = self._visible(target_alias, target)
            alternatives.append(
                f"({index}.target_type = {self.bind(target)}"
                f" AND {index}.target_id IN (SELECT {target_alias}.fhir_id"
                f" FROM resource {target_alias} WHERE {target_alias}.resource_type = {self.bind(target)}"
                f" AND NOT {target_alias}.deleted AND {render(inner)}{visible}))"
            )
        return self._exists(alias, resource_type, param, self._any(alternatives), index)

    def _has(self, alias: str, resource_type: str, name: str, raw: str, depth: int) -> Sql:
        """``_has:Task:patient:owner=Organization/x`` (search.html#has)."""
        parts = name.split(":", 3)
        if len(parts) != 4 or not all(parts[1:]):
            raise BadRequest(f"{name}: _has takes _has:Type:reference:parameter", expression=(name,))
        _, source_type, reference_name, rest = parts
        if source_type not in SERVED_TYPE_SET:
            raise BadRequest(
                f"{name}: '{source_type[:64]}' is not a resource type served here", expression=(name,)
            )
        reference = self.registry.get(source_type, reference_name)
        if reference is None or reference.type != "reference":
            raise BadRequest(
                f"{name}: '{reference_name}' is not a reference parameter of {source_type}",
                expression=(name,),
            )
        source_alias = self._alias("h")
        link = self._alias("l")
        inner = self.condition(source_alias, source_type, rest, raw, depth + 1)
        if inner is None:
            raise BadRequest(f"{name}: unknown parameter '{rest}' of {source_type}", expression=(name,))
        where = render(inner) + self._visible(source_alias, source_type)
        return Sql(
            f"EXISTS (SELECT 1 FROM search_reference {link} JOIN resource {source_alias}"
            f" ON {source_alias}.rid = {link}.rid"
            f" WHERE {link}.target_id = {alias}.fhir_id AND {link}.target_type = {self.bind(resource_type)}"
            f" AND {link}.param = {self.bind(reference_name)}"
            f" AND {link}.resource_type = {self.bind(source_type)}"
            f" AND NOT {source_alias}.deleted AND {where})"
        )

    # -- compartments ----------------------------------------------------------------------

    def compartment(self, alias: str, resource_type: str, patient_id: str) -> Node:
        """Membership of the Patient compartment (R4 CompartmentDefinition/patient)."""
        params = self.registry.patient_compartment.get(resource_type, ())
        clauses: list[Node] = []
        if resource_type == "Patient":
            clauses.append(Sql(f"{alias}.fhir_id = {self.bind(patient_id)}"))
        for name in params:
            param = self.registry.get(resource_type, name)
            if param is None:
                continue
            index = self._alias("k")
            predicate = (
                f"({index}.target_type = {self.bind('Patient')}"
                f" AND {index}.target_id = {self.bind(patient_id)})"
            )
            clauses.append(self._exists(alias, resource_type, param, predicate, index))
        return any_of(clauses)

    # -- sorting ---------------------------------------------------------------------------

    def sort_key(self, alias: str, resource_type: str, spec: str) -> SortKey:
        descending = spec.startswith("-")
        name = spec[1:] if descending else spec
        if name == "_id":
            return SortKey(name, descending, f"{alias}.fhir_id", "text")
        if name == "_lastUpdated":
            return SortKey(name, descending, f"{alias}.last_updated", "timestamptz")
        param = self.registry.get(resource_type, name)
        if param is None or param.column or param.type in ("composite", "special"):
            raise BadRequest(
                f"_sort: '{name[:64]}' is not a sortable parameter of {resource_type}", expression=("_sort",)
            )
        column, sql_type, missing = {
            "string": ("value_norm", "text", "''"),
            "token": ("code", "text", "''"),
            "reference": ("target_id", "text", "''"),
            "uri": ("uri", "text", "''"),
            "quantity": ("value", "numeric", "0"),
            "number": ("value", "numeric", "0"),
            # A finite stand-in for "no value": it must survive the round trip through the cursor.
            "date": ("high" if descending else "low", "timestamptz", "'0001-01-02T00:00:00+00'::timestamptz"),
        }[param.type]
        aggregate = "max" if descending else "min"
        index = self._alias("s")
        if param.order:
            # An ordered code system (request-priority: routine < urgent < asap < stat) sorts by
            # its order; codes outside it, and no value, sort below its lowest.
            rank = f"array_position(CAST({self.bind(list(param.order))} AS text[]), {index}.code)"
            expression = (
                f"COALESCE((SELECT {aggregate}({rank}) FROM search_token {index}"
                f" WHERE {index}.rid = {alias}.rid AND {index}.param = {self.bind(param.name)}), 0)"
            )
            return SortKey(name, descending, expression, "integer")
        expression = (
            f"COALESCE((SELECT {aggregate}({index}.{column}) FROM search_{param.kind} {index}"
            f" WHERE {index}.rid = {alias}.rid AND {index}.param = {self.bind(param.name)}), {missing})"
        )
        return SortKey(name, descending, expression, sql_type)


EARTH_RADIUS_KM = 6371.0088
"""The mean earth radius (IUGG) of the great-circle distance ``near`` measures."""
DEFAULT_NEAR_KM = 50.0
"""``near`` without a distance: R4 leaves "near" to the server; 50 km is a service area."""
NEAR_UNITS_KM = {
    "km": 1.0,
    "m": 0.001,
    "[mi_i]": 1.609344,
    "[mi_us]": 1.6093472186944373,
    "mi": 1.609344,
}
"""``near`` units: UCUM codes (unitsofmeasure.org) of lengths, km assumed when omitted."""
_UCUM = "http://unitsofmeasure.org"


def parse_near(value: str, name: str) -> tuple[float, float, float]:
    """``latitude|longitude[|distance[|units]]`` -> (latitude, longitude, distance in km);
    a 400 naming the parameter when a part is missing, not a number or out of range."""
    parts = _split_unescaped(value, "|")
    if len(parts) == 5 and parts[3] in ("", _UCUM):
        parts = [*parts[:3], parts[4]]  # distance given as value|system|code (a quantity)
    if not 2 <= len(parts) <= 4:
        raise BadRequest(
            f"{name}: use latitude|longitude|distance|units (e.g. 42.25|-83.69|10|km)", expression=(name,)
        )
    numbers: list[float] = []
    for label, text in zip(("latitude", "longitude", "distance"), parts[:3], strict=False):
        if not text and label == "distance":
            continue
        if not _NUMBER.match(text):
            raise BadRequest(f"{name}: the {label} '{text[:40]}' is not a number", expression=(name,))
        numbers.append(float(text))
    latitude, longitude = numbers[0], numbers[1]
    if not -90 <= latitude <= 90:
        raise BadRequest(f"{name}: latitude must lie between -90 and 90", expression=(name,))
    if not -180 <= longitude <= 180:
        raise BadRequest(f"{name}: longitude must lie between -180 and 180", expression=(name,))
    units = parts[3] if len(parts) == 4 and parts[3] else "km"
    if units not in NEAR_UNITS_KM:
        raise BadRequest(
            f"{name}: unknown distance unit '{units[:20]}' (use km, m or [mi_i])", expression=(name,)
        )
    distance = numbers[2] * NEAR_UNITS_KM[units] if len(numbers) == 3 else DEFAULT_NEAR_KM
    if not 0 <= distance <= math.pi * EARTH_RADIUS_KM:
        raise BadRequest(f"{name}: the distance must be between 0 and half the earth", expression=(name,))
    return latitude, longitude, distance


@dataclass(frozen=True)
class BoundingBox:
    south: float
    north: float
    longitude_bands: tuple[tuple[float, float], ...]
    """West-east ranges of longitude; empty when every longitude is within reach."""


def bounding_box(latitude: float, longitude: float, distance_km: float) -> BoundingBox:
    """The smallest latitude/longitude box holding every point within ``distance_km`` of the
    point on a sphere (the bounding coordinates of J. P. Matuschek, "Finding Points Within a
    Distance of a Latitude/Longitude Using Bounding Coordinates"), widened by a hair for rounding."""
    angular = distance_km / EARTH_RADIUS_KM
    margin = 1e-9
    south = math.degrees(math.radians(latitude) - angular) - margin
    north = math.degrees(math.radians(latitude) + angular) + margin
    if south <= -90 or north >= 90:
        return BoundingBox(max(south, -90.0), min(north, 90.0), ())
    spread = math.degrees(math.asin(min(1.0, math.sin(angular) / math.cos(math.radians(latitude))))) + margin
    west, east = longitude - spread, longitude + spread
    if spread >= 180:
        return BoundingBox(south, north, ())
    if west < -180:
        return BoundingBox(south, north, ((west + 360, 180.0), (-180.0, east)))
    if east > 180:
        return BoundingBox(south, north, ((west, 180.0), (-180.0, east - 360)))
    return BoundingBox(south, north, ((west, east),))


WORKLIST_SORTS = {
    # name: (ascending column, descending column, SQL type) of search_worklist
    "priority": ("priority", "priority", "integer"),
    "authored-on": ("authored_low", "authored_high", "timestamptz"),
    "period": ("period_low", "period_high", "timestamptz"),
}


@dataclass(frozen=True)
class Worklist:
    """A Task search for one owner sorted by priority, authored-on and/or period (a worklist).

    Its page is read from the owner's ``search_worklist`` rows (app/fhir/storage.py) in the
    order of an index and stops when full, whatever the number of the owner's Tasks and for any
    token: the join carries the owner condition (and the status one, for plain codes), which
    match exactly what the ``owner`` and ``status`` parameters match, and the WHERE clause
    everything else (other parameters, the caller's access limits)."""

    owner_type: str | None
    owner_id: str
    statuses: tuple[str, ...] | None
    consumed: frozenset[int]
    """Positions in the search's parameters that the join carries."""

    def filter(self, bind: Binder) -> str:
        """The conditions on the worklist rows ``w``."""
        clauses = [f"w.owner_id = {bind(self.owner_id)}"]
        if self.owner_type is not None:
            clauses.append(f"w.owner_type = {bind(self.owner_type)}")
        if self.statuses is not None:
            clauses.append(f"w.status = ANY(CAST({bind(list(self.statuses))} AS text[]))")
        return " AND ".join(clauses)

    @staticmethod
    def sort_keys(specs: list[str], compiler: SearchCompiler) -> list[SortKey]:
        keys = []
        for spec in specs:
            descending = spec.startswith("-")
            name = spec.lstrip("-")
            if name in WORKLIST_SORTS:
                ascending_column, descending_column, sql_type = WORKLIST_SORTS[name]
                column = descending_column if descending else ascending_column
                keys.append(SortKey(name, descending, f"w.{column}", sql_type))
            else:
                keys.append(compiler.sort_key("r", "Task", spec))
        return keys


def plan_worklist(
    resource_types: tuple[str, ...], pairs: list[tuple[str, str]], fhir_base: str
) -> Worklist | None:
    """The :class:`Worklist` of a search, or None when it is not one (its sort keys are then
    computed from the index rows of every match, which are sorted before the page is cut)."""
    specs = [v for name, raw in pairs if name == "_sort" for v in raw.split(",") if v]
    if resource_types != ("Task",) or not specs:
        return None
    if not all(spec.lstrip("-") in (*WORKLIST_SORTS, "_lastUpdated", "_id") for spec in specs):
        return None
    owners = [(n, raw) for n, (name, raw) in enumerate(pairs) if name == "owner"]
    if not owners or len(split_values(owners[0][1])) != 1:
        return None
    position, raw = owners[0]
    owner_type, owner_id, url = split_reference(unescape(raw), fhir_base)
    if url is not None and "/" not in url and ":" not in url:
        owner_id = url  # a bare id
    if owner_id is None or (owner_type is not None and owner_type not in SERVED_TYPE_SET):
        return None
    consumed = {position}
    statuses = None
    status = [(n, raw) for n, (name, raw) in enumerate(pairs) if name == "status"]
    if status:
        codes = [unescape(v) for v in split_values(status[0][1])]
        if all(codes) and not any("|" in v for v in split_values(status[0][1])):
            statuses = tuple(codes)
            consumed.add(status[0][0])
    return Worklist(owner_type, owner_id, statuses, frozenset(consumed))


def _prefix(value: str) -> tuple[str, str]:
    match = _PREFIX.match(value)
    assert match is not None
    prefix, rest = match.group(1) or "eq", match.group(2)
    return prefix, rest


def _parse_includes(
    values: list[tuple[str, str]], types: tuple[str, ...], registry: SearchRegistry
) -> list[Include]:
    includes = []
    for name, raw in values:
        reverse = name.startswith("_revinclude")
        modifier = name.partition(":")[2]
        if modifier not in ("", "iterate", "recurse"):
            raise BadRequest(f"{name}: unknown modifier ':{modifier}'", expression=(name,))
        for value in split_values(raw):
            if value == "*":
                includes.append(Include("*", "*", None, modifier != "", reverse))
                continue
            parts = value.split(":")
            if len(parts) not in (2, 3) or not all(parts):
                raise BadRequest(
                    f"{name}: '{value[:64]}' is not Type:parameter[:targetType]", expression=(name,)
                )
            source, param_name = parts[0], parts[1]
            target = parts[2] if len(parts) == 3 else None
            if source not in SERVED_TYPE_SET or (target is not None and target not in SERVED_TYPE_SET):
                raise BadRequest(f"{name}: '{value[:64]}' names a type not served here", expression=(name,))
            if param_name != "*":
                param = registry.get(source, param_name)
                if param is None or param.type != "reference":
                    raise BadRequest(
                        f"{name}: '{param_name}' is not a reference parameter of {source}", expression=(name,)
                    )
            if not reverse and not modifier and source not in types:
                raise BadRequest(
                    f"{name}: '{source}' is not a type being searched; use :iterate", expression=(name,)
                )
            includes.append(Include(source, param_name, target, modifier != "", reverse))
    return includes


def parse_search(
    resource_types: tuple[str, ...],
    pairs: list[tuple[str, str]],
    *,
    registry: SearchRegistry,
    fhir_base: str,
    strict: bool,
    compartment: tuple[str, str] | None = None,
    access: AccessContext = OPEN_ACCESS,
    letters: tuple[str, ...] = ("s",),
    limits: SearchLimits = SearchLimits(),
) -> SearchRequest:
    """Parse a search interaction's parameters (search.html#Summary) into a SearchRequest.

    ``access`` adds the caller's limits for each of ``letters`` (``s`` for a search; a
    conditional write searches with ``s`` and its own letter) as conditions (app/fhir/access.py).
    A search over ``limits`` is a 400 ``too-costly``.
    """
    _check_budget(
        limits,
        pairs,
        sort_keys=sum(len([v for v in raw.split(",") if v]) for name, raw in pairs if name == "_sort"),
        include_directives=sum(
            len(split_values(raw)) for name, raw in pairs if name.startswith(("_include", "_revinclude"))
        ),
    )
    binder = Binder()
    compiler = SearchCompiler(registry, fhir_base, binder, access, limits)
    conditions: list[Node] = []
    applied: list[tuple[str, str]] = []
    unknown: list[str] = []
    include_values: list[tuple[str, str]] = []
    sort_specs: list[str] = []
    options: dict[str, str] = {}
    if compartment is not None:
        conditions.append(compiler.compartment("r", resource_types[0], compartment[1]))
    worklist = plan_worklist(resource_types, pairs, fhir_base)
    worklist_filter = worklist.filter(binder) if worklist else ""  # bound first: the count uses it
    for position, (name, raw) in enumerate(pairs):
        if FORBIDDEN_CHARACTERS.search(raw) or FORBIDDEN_CHARACTERS.search(name):
            raise BadRequest(
                f"{name[:64]!r}: contains a control character or invalid Unicode", expression=(name[:64],)
            )
        if not _PARAM_NAME.match(name.split(":", 1)[0].split(".", 1)[0]):
            unknown.append(name)
            continue
        base = name.split(":", 1)[0].split(".", 1)[0]
        if base in ("_include", "_revinclude"):
            include_values.append((name, raw))
            applied.append((name, raw))
            continue
        if base in RESULT_PARAMETERS:
            if base == "_sort":
                sort_specs.extend(v for v in raw.split(",") if v)
            elif base not in ("_format", "_pretty", "_type"):
                options[base] = raw
            if base not in ("_format", "_cursor"):
                applied.append((name, raw))
            continue
        if base in UNSUPPORTED_PARAMETERS:
            unknown.append(name)
            continue
        if worklist is not None and position in worklist.consumed:
            applied.append((name, raw))  # the worklist join is this condition
            continue
        per_type: list[Node] = []
        mark = compiler.bind_mark()
        for resource_type in resource_types:
            clause = compiler.condition("r", resource_type, name, raw)
            if clause is None:
                compiler.bind_rollback(mark)  # values bound for the other types' clauses
                per_type = []
                break
            per_type.append(
                clause
                if len(resource_types) == 1
                else And((Sql(f"r.resource_type = {binder(resource_type)}"), clause))
            )
        if not per_type:
            unknown.append(name)
            continue
        conditions.append(any_of(per_type))
        applied.append((name, raw))
    issues, count, total, summary, elements = result_options(options, unknown, strict)
    if len(resource_types) != 1 and sort_specs:
        sort_specs = [s for s in sort_specs if s.lstrip("-") in ("_id", "_lastUpdated")]
    type_placeholder = binder(resource_types[0] if len(resource_types) == 1 else list(resource_types))
    limited = False
    driven_limits: set[int] = set()
    for letter in letters:
        if len(resource_types) == 1:
            limits_of_type = access.condition_parts(compiler, "r", resource_types[0], letter)
        else:
            limit = access.row_filter(compiler, "r", letter, resource_types)
            limits_of_type = [] if limit is None else [limit]
        for limit in limits_of_type:
            limited = True
            # A set of rids (a person's limits) drives the page like an index condition; any
            # other limit keeps the page from being cut from the index.
            if rid_set(limit, type_placeholder) is not None:
                driven_limits.add(len(conditions))
            conditions.append(limit)
    # The WHERE clause's values are bound first: the count and estimate statements send only them
    # (PostgreSQL cannot type a parameter no statement text uses, such as a sort key's).
    where_count = len(binder.values)
    if worklist is not None:
        sort = worklist.sort_keys(sort_specs, compiler)
    else:
        sort = [compiler.sort_key("r", resource_types[0], spec) for spec in sort_specs]
    if len(binder.values) > limits.bind_values:
        raise too_costly(limits, "bind_values", len(binder.values), "values to bind")
    if total == "estimate" and limited:
        # The planner's estimate counts rows the caller may not see: database-wide statistics
        # are not for a limited token (issue 15). It gets the accurate count of its own rows.
        total = "accurate"
    return SearchRequest(
        where_count=where_count,
        worklist_filter=worklist_filter,
        resource_types=resource_types,
        conditions=conditions,
        binder=binder,
        applied=applied,
        sort=sort,
        count=count,
        includes=_parse_includes(include_values, resource_types, registry),
        total=total,
        summary=summary,
        elements=elements,
        cursor=options.get("_cursor"),
        issues=issues,
        type_placeholder=type_placeholder,
        driven_limits=frozenset(driven_limits),
        access=access,
    )


def result_options(
    options: dict[str, str], unknown: list[str], strict: bool, where: str = ""
) -> tuple[list[Issue], int, str, str | None, tuple[str, ...]]:
    """The warnings for ``unknown`` parameters (a 400 under ``Prefer: handling=strict``,
    search.html#errors) and the result parameters ``_count``, ``_total``, ``_summary`` and
    ``_elements`` of one search, checked; ``where`` names the type in the warnings."""
    issues = [
        Issue(
            "not-supported",
            f"parameter '{name[:80]}' is not supported{where} and was ignored",
            severity="warning",
            expression=(name[:80],),
        )
        for name in unknown
    ]
    if unknown and strict:
        raise BadRequest(
            "unknown or unsupported search parameters (Prefer: handling=strict)",
            issues=[Issue("not-supported", i.diagnostics, expression=i.expression) for i in issues],
        )
    count = parse_count(options.get("_count"), default=DEFAULT_COUNT, maximum=MAX_COUNT)
    total = options.get("_total", "none")
    if total not in ("none", "estimate", "accurate"):
        raise BadRequest("_total: use none, estimate or accurate", expression=("_total",))
    summary = options.get("_summary")
    if count == 0:
        summary = "count"  # search.html#count: _count=0 is treated as _summary=count
    if summary is not None and summary not in ("true", "false", "text", "data", "count"):
        raise BadRequest("_summary: use true, false, text, data or count", expression=("_summary",))
    elements = tuple(e.strip() for e in options.get("_elements", "").split(",") if e.strip())
    return issues, count, total, summary, elements
