"""Which requested scopes a client may be granted (SMART App Launch 2.x, scopes-and-launch-context).

Only "does the registered scope set cover this requested scope"; turning granted scopes into
permissions on /fhir is app/auth/scopes.py's job.

A resource scope is ``context/Type.letters[?query]``: context ``patient``, ``user`` or
``system``; ``Type`` a resource type or ``*``; letters an in-order subset of ``cruds`` (v2)
or the v1 forms ``read`` (= ``rs``), ``write`` (= ``cud``) and ``*`` (= ``cruds``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LETTERS = "cruds"
V1_LETTERS = {"read": "rs", "write": "cud", "*": "cruds"}

_RESOURCE_SCOPE = re.compile(
    r"^(?P<context>patient|user|system)/(?P<type>\*|[A-Z][A-Za-z]{1,63})\.(?P<action>[a-z*]+)"
    r"(?:\?(?P<query>\S+))?$"
)


@dataclass(frozen=True)
class ResourceScope:
    context: str
    resource_type: str
    letters: frozenset[str]
    query: str | None


def _letters(action: str) -> frozenset[str] | None:
    if action in V1_LETTERS:
        return frozenset(V1_LETTERS[action])
    # v2: a non-empty, in-order subset of "cruds" (".rs", never ".sr").
    position = 0
    for char in action:
        found = LETTERS.find(char, position)
        if found < 0:
            return None
        position = found + 1
    return frozenset(action)


def parse_resource_scope(scope: str) -> ResourceScope | None:
    """The parts of a SMART resource scope, or None for any other scope (``launch``, ``openid``...)."""
    match = _RESOURCE_SCOPE.match(scope)
    if match is None:
        return None
    letters = _letters(match["action"])
    if not letters:
        return None
    return ResourceScope(match["context"], match["type"], letters, match["query"])


def looks_like_resource_scope(scope: str) -> bool:
    """True for anything shaped ``patient/...``, ``user/...`` or ``system/...`` (valid or not)."""
    return scope.split("/", 1)[0] in ("patient", "user", "system") and "/" in scope


def covers(registered: str, requested: str) -> bool:
    """Whether one registered scope allows everything the requested scope asks for.

    Same context; registered type ``*`` or the same type; the requested letters a subset of the
    registered ones (v1 and v2 forms compare by letters). A registered scope restricted by a
    query (``?category=...``) covers only the same restriction; a requested restriction under an
    unrestricted registered scope is narrower, so it is covered. Non-resource scopes match exactly.
    """
    if registered == requested:
        return True
    have = parse_resource_scope(registered)
    want = parse_resource_scope(requested)
    if have is None or want is None:
        return False
    if have.context != want.context or have.resource_type not in ("*", want.resource_type):
        return False
    if not want.letters <= have.letters:
        return False
    return have.query is None or have.query == want.query


def narrow_scopes(registered: str, requested: str | None, *, patient_context: bool) -> list[str]:
    """The scopes to grant: each requested scope the registered set covers, in the requested form.

    No requested scope grants the registered ones. A client registered with a patient gets only
    ``patient/`` resource scopes (and non-resource scopes): its tokens carry that patient context,
    and a ``system/`` or ``user/`` scope would reach past it.
    """
    registered_set = registered.split()
    wanted = requested.split() if requested is not None else list(registered_set)
    granted: list[str] = []
    for scope in dict.fromkeys(wanted):  # keeps order, drops duplicates
        if patient_context and looks_like_resource_scope(scope) and not scope.startswith("patient/"):
            continue
        if any(covers(have, scope) for have in registered_set):
            granted.append(scope)
    return granted
