"""SMART App Launch 2.x scopes -> permissions (scopes-and-launch-context.html).

v2 grammar ``(patient|user|system)/(Type|*).[c][r][u][d][s][?param=value&...]`` and the v1
forms ``.read`` (= ``rs``), ``.write`` (= ``cud``) and ``.*`` (= ``cruds``). Scopes that are
not resource scopes (``launch``, ``openid``, ``fhirUser``, ``offline_access``...) grant no
resource access and are ignored here; so are malformed ones (the SMART text allows ignoring
undefined or out-of-order letter strings such as ``.dus``).

A restriction is acceptable only when it is *plain* (:func:`restriction_problem`): search
parameters of the scoped type itself, so that what a restricted scope lets through never depends
on rows of another type (no chains, no ``_has``) nor on result parameters. Registration, the
token endpoint and the compilation of restrictions into SQL (app/fhir/access.py) all apply it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

LETTERS = "cruds"
"""create, read (read, vread, instance history), update (and patch), delete, search (and
type and system history)."""

V1_ACTIONS = {"read": "rs", "write": "cud", "*": "cruds"}

EXPLICIT_ONLY_TYPES = frozenset({"AuditEvent"})
"""Types a ``*`` scope does not cover: the audit trail is readable with AuditEvent scopes only
(issue 4), so that ``patient/*.rs`` or ``system/*.rs`` never reveal who accessed what."""

COMMON_SEARCH_PARAMS = frozenset({"_id", "_lastUpdated", "_tag", "_profile", "_security", "_source"})
"""The search parameters of every type: the only ones a ``*`` scope may be restricted by."""

MODIFIERS = frozenset(
    {"missing", "exact", "contains", "text", "not", "above", "below", "in", "not-in", "of-type", "identifier"}
)
"""Search modifiers (R4 search.html#modifiers) a restriction may use; a resource type name is
allowed too, as the type modifier of a reference parameter (``subject:Patient=Patient/1``)."""

_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]{1,63}")

_RESOURCE_SCOPE = re.compile(
    r"^(?P<context>patient|user|system)/(?P<type>\*|[A-Z][A-Za-z]{1,63})\.(?P<action>[a-z*]+)"
    r"(?:\?(?P<query>\S+))?$"
)


@dataclass(frozen=True)
class ResourceScope:
    """The parts of a SMART resource scope, as written (the one grammar of this module)."""

    context: str
    resource_type: str
    letters: frozenset[str]
    query: str | None
    v1: bool
    """Written in the v1 form (``.read``, ``.write``, ``.*``)."""


@dataclass(frozen=True)
class Permission:
    """What one scope allows: a context, a type (or ``*``), letters, optional search restrictions."""

    context: str
    resource_type: str
    letters: frozenset[str]
    restriction: tuple[tuple[str, str], ...] = ()

    def covers(self, resource_type: str, letter: str) -> bool:
        if resource_type in EXPLICIT_ONLY_TYPES and self.resource_type == "*":
            return False
        return letter in self.letters and self.resource_type in ("*", resource_type)


def _letters(action: str) -> str | None:
    if action in V1_ACTIONS:
        return V1_ACTIONS[action]
    # v2: a non-empty, in-order subset of "cruds" (".rs", never ".sr")
    position = 0
    for char in action:
        found = LETTERS.find(char, position)
        if found < 0:
            return None
        position = found + 1
    return action


def parse_resource_scope(scope: str) -> ResourceScope | None:
    """The parts of a SMART resource scope, or None for any other scope (``launch``, ``openid``...)."""
    match = _RESOURCE_SCOPE.match(scope)
    if match is None:
        return None
    letters = _letters(match["action"])
    if not letters:
        return None
    return ResourceScope(
        match["context"], match["type"], frozenset(letters), match["query"], match["action"] in V1_ACTIONS
    )


def looks_like_resource_scope(scope: str) -> bool:
    """True for anything shaped ``patient/...``, ``user/...`` or ``system/...`` (valid or not)."""
    return scope.split("/", 1)[0] in ("patient", "user", "system") and "/" in scope


def parse_scope(scope: str) -> Permission | None:
    """One scope string as a Permission, or None when it grants no resource access."""
    parsed = parse_resource_scope(scope)
    if parsed is None:
        return None
    restriction: tuple[tuple[str, str], ...] = ()
    if parsed.query is not None:
        if parsed.v1:
            return None  # restrictions are v2 syntax only
        try:
            restriction = tuple(parse_qsl(parsed.query, keep_blank_values=False, strict_parsing=True))
        except ValueError:
            return None
        if not restriction:
            return None
    return Permission(parsed.context, parsed.resource_type, parsed.letters, restriction)


def restriction_problem(resource_type: str, pairs: Iterable[tuple[str, str]]) -> str | None:
    """Why the ``?param=value`` restriction ``pairs`` of a scope on ``resource_type`` (or ``*``)
    is not acceptable, or None when it is.

    Acceptable: every name is a search parameter of that type (app/fhir/search_params.py; for
    ``*`` only the common ``_id``, ``_lastUpdated``, ``_tag``, ``_profile``, ``_security``,
    ``_source``), optionally with one modifier from :data:`MODIFIERS` or, on a reference
    parameter, a resource type it may point to. Never a chain (a ``.`` in the name), ``_has``,
    ``_include``/``_revinclude`` or a result parameter (``_count``, ``_sort``...): those are not
    search parameters of the type, so they are refused by the same rule.
    """
    from app.fhir.search_params import registry  # lazily: app/fhir/access.py imports this module

    pairs = list(pairs)
    if not pairs:
        return "empty restriction"
    params = registry()
    for name, _value in pairs:
        base, colon, modifier = name.partition(":")
        shown = name[:80]
        if "." in name:
            return f"chained parameter {shown!r}: restrictions may not look at other types"
        if base == "_has":
            return f"{shown!r}: _has may not be used in a restriction"
        if resource_type == "*":
            known = base in COMMON_SEARCH_PARAMS
        else:
            known = params.get(resource_type, base) is not None
        if not known:
            where = "every type" if resource_type == "*" else resource_type
            return f"{base[:80]!r} is not a search parameter of {where}"
        if not colon:
            continue
        if modifier in MODIFIERS:
            continue
        param = params.get(resource_type, base) if resource_type != "*" else None
        if (
            param is not None
            and param.type == "reference"
            and _TYPE_NAME.fullmatch(modifier)
            and (not param.targets or modifier in param.targets)
        ):
            continue
        return f"modifier {modifier[:80]!r} of {base[:80]!r} may not be used in a restriction"
    return None


def parse_scopes(scope: str) -> tuple[Permission, ...]:
    """Every resource permission in a space-separated scope string."""
    permissions = (parse_scope(part) for part in scope.split())
    return tuple(p for p in permissions if p is not None)


def scope_text(permissions: Iterable[Permission]) -> str:
    """Permissions written back as SMART v2 scopes (``parse_scopes`` reads them again): how a
    token's access is kept with what outlives the token (a Subscription's notifications)."""
    parts = []
    for permission in permissions:
        letters = "".join(letter for letter in LETTERS if letter in permission.letters)
        text = f"{permission.context}/{permission.resource_type}.{letters}"
        if permission.restriction:
            text += "?" + urlencode(list(permission.restriction))
        parts.append(text)
    return " ".join(parts)
