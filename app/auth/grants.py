"""Which requested scopes a client may be granted (SMART App Launch 2.x, scopes-and-launch-context).

Only "does the registered scope set cover this requested scope"; the scope grammar, and
turning granted scopes into permissions on /fhir, are app/auth/scopes.py's.
"""

from __future__ import annotations

from app.auth.scopes import looks_like_resource_scope, parse_resource_scope


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
