"""Whose notifications they are: the access a subscription's events are judged with.

A Subscription belongs to the client that created it (its token's scopes, organisation,
patient and person, kept with the subscription). Its notifications carry only what that client may read
when they are sent: read permissions of the kept scopes that the client's registration still
covers (a client removed or narrowed by ``carecoord clients`` loses them), with the same
organisation, patient and person limits as its requests (app/fhir/access.py).
"""

from __future__ import annotations

from dataclasses import replace

from asyncpg import Connection, Record

from app.auth.grants import covers
from app.auth.scopes import parse_scopes, scope_text
from app.fhir.access import OPEN_ACCESS, AccessContext


async def owner_access(conn: Connection, subscription: Record) -> AccessContext | None:
    """The owner's read access now; None when its client is no longer registered."""
    if subscription["owner_unrestricted"]:
        return OPEN_ACCESS
    client_id = subscription["owner_client"]
    registered = await conn.fetchval("SELECT scopes FROM oauth_client WHERE client_id = $1", client_id)
    if registered is None:
        return None
    held = registered.split()
    readable = []
    for permission in parse_scopes(subscription["owner_scope"]):
        if "r" not in permission.letters:
            continue
        reading = replace(permission, letters=frozenset("r"))
        if any(covers(scope, scope_text([reading])) for scope in held):
            readable.append(reading)
    return AccessContext(
        client_id=client_id,
        organization=subscription["owner_organization"],
        patient=subscription["owner_patient"],
        user=subscription["owner_user"],
        permissions=tuple(readable),
        unrestricted=False,
    )
