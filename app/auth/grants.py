"""Which requested scopes a client may be granted (SMART App Launch 2.x, scopes-and-launch-context).

Only "does the registered scope set cover this requested scope"; the scope grammar, and
turning granted scopes into permissions on /fhir, are app/auth/scopes.py's.
"""

from __future__ import annotations

from collections import Counter

from app.auth.scopes import (
    EXPLICIT_ONLY_TYPES,
    looks_like_resource_scope,
    parse_resource_scope,
    parse_scope,
    restriction_problem,
)


def covers(registered: str, requested: str) -> bool:
    """Whether one registered scope allows everything the requested scope asks for.

    Same context; registered type ``*`` or the same type, except that ``*`` never covers the
    explicit-only types (AuditEvent: scopes.EXPLICIT_ONLY_TYPES); the requested letters a
    subset of the registered ones (v1 and v2 forms compare by letters).

    Restrictions (``?param=value``) only ever narrow: a requested restriction must be plain
    (scopes.restriction_problem: no chains, ``_has``, result parameters...) and, under a
    restricted registered scope, hold every registered ``param=value`` pair (as a multiset, in
    any order) plus possibly more; under an unrestricted registered scope any plain restriction
    is narrower. A requested scope that is not plain, or malformed, is never covered, even when
    it is exactly the registered one. Non-resource scopes (``launch``...) match exactly.
    """
    if not looks_like_resource_scope(requested):
        return registered == requested
    have = parse_resource_scope(registered)
    want = parse_resource_scope(requested)
    wanted = parse_scope(requested)
    if have is None or want is None or wanted is None:
        return False  # malformed, or a v1 scope with a restriction
    if wanted.restriction and restriction_problem(want.resource_type, wanted.restriction) is not None:
        return False
    if have.context != want.context or have.resource_type not in ("*", want.resource_type):
        return False
    if have.resource_type == "*" and want.resource_type in EXPLICIT_ONLY_TYPES:
        return False
    if not want.letters <= have.letters:
        return False
    if have.query is None:
        return True
    held = parse_scope(registered)
    if held is None or not held.restriction:
        return False
    return Counter(held.restriction) <= Counter(wanted.restriction)


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
