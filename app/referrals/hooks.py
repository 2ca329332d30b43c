"""The referral workflow inside every Task write's transaction (issue 6).

``before_write`` enforces the Task state machine (state_machine.py). ``after_write`` is the
transactional outbox: a referral Task that becomes ``requested`` with an owner that is a
partner with a FHIR endpoint gets a ``deliver`` job in the same transaction; a delivered
referral that the source cancels gets a ``cancel`` job; a partner's own update of a Task it
owns makes its status tracking poll at once. The jobs are the job runner's (app/jobs,
app/referrals/jobs.py); ``NOTIFY`` wakes the runners when the transaction commits.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from app.fhir.access import REFERRAL_ROOTS, AccessContext
from app.fhir.errors import Forbidden
from app.fhir.repository import FhirRepository, StoredVersion
from app.jobs import queue
from app.referrals.directory import find_partner
from app.referrals.jobs import CANCEL, DELIVER, TRACK, schedule
from app.referrals.state_machine import (
    Actor,
    check_deletion,
    check_transition,
    is_referral,
    local_reference,
    reference_of,
)
from app.settings import Settings

PARTNER_POLL_FLOOR = 10.0
"""Seconds between a partner's update of its Task on carecoord and the poll of its copy it causes."""


def _patient_app(access: AccessContext) -> str | None:
    """The Patient id a patient app acts for (a token with patient scopes only), else None."""
    if access.patient is not None and all(p.context == "patient" for p in access.permissions):
        return access.patient
    return None


def _named_organizations(
    resource_type: str, resource: dict[str, Any] | None, fhir_base: str
) -> set[tuple[str, str]]:
    """(element, ``Organization/ID``) of the organisations a Task or ServiceRequest gives a role."""
    named: set[tuple[str, str]] = set()
    for element in dict(REFERRAL_ROOTS).get(resource_type, ()):
        value = (resource or {}).get(element)
        for item in value if isinstance(value, list) else [value]:
            reference = item.get("reference") if isinstance(item, dict) else None
            local = local_reference(reference if isinstance(reference, str) else None, fhir_base)
            if local and local.startswith("Organization/"):
                named.add((element, local))
    return named


def _local_organization(reference: str | None, fhir_base: str) -> str | None:
    """The id of the Organization on this server that ``reference`` names, or None."""
    local = local_reference(reference, fhir_base)
    return local.split("/", 1)[1] if local and local.startswith("Organization/") else None


class ReferralHooks:
    types = frozenset({"Task", "ServiceRequest"})

    def __init__(self, settings: Settings) -> None:
        self.home_organization = settings.organization
        self.deadline = timedelta(seconds=settings.delivery_deadline)

    async def before_write(
        self,
        repo: FhirRepository,
        resource_type: str,
        previous: dict[str, Any] | None,
        data: dict[str, Any] | None,
    ) -> None:
        if repo.system:
            return
        if data is not None:
            self._check_named_organizations(repo, resource_type, previous, data)
        if resource_type != "Task":
            return
        actor = Actor(repo.access.organization, patient=_patient_app(repo.access))
        if data is None:
            if previous is not None:
                check_deletion(
                    previous, actor, home_organization=self.home_organization, fhir_base=repo.fhir_base
                )
            return
        check_transition(
            previous, data, actor, home_organization=self.home_organization, fhir_base=repo.fhir_base
        )

    def _check_named_organizations(
        self, repo: FhirRepository, resource_type: str, previous: dict[str, Any] | None, data: dict[str, Any]
    ) -> None:
        """Which organisations a partner's client may give a role (403 otherwise).

        A Task's owner and requester and a ServiceRequest's performer decide who reads a
        referral's record and where it is delivered (app/fhir/access.py REFERRAL_ROOTS):
        naming another partner would hand the patient's record on, with that partner's
        credentials. So a partner names as owner or performer only itself or the server's own
        organisation (CARECOORD_ORGANIZATION: it refers clients back, never onward), and as
        requester only itself, which is also what every Task it creates names: a Task it owns
        but did not request is what grants it access, so it may not write one (issue 15).
        """
        organization = repo.access.organization
        if organization is None:
            return
        if resource_type == "Task" and previous is None:
            requester = local_reference(reference_of(data, "requester"), repo.fhir_base)
            if requester != organization:
                raise Forbidden(
                    "a partner organisation's client creates Tasks as their requester",
                    expression=("Task.requester",),
                )
        added = _named_organizations(resource_type, data, repo.fhir_base) - _named_organizations(
            resource_type, previous, repo.fhir_base
        )
        for element, named in sorted(added):
            allowed = {organization} if element == "requester" else {organization, self.home_organization}
            if named not in allowed:
                raise Forbidden(
                    f"a partner organisation's client may not name {named} as {resource_type}.{element}",
                    expression=(f"{resource_type}.{element}",),
                )

    async def after_write(
        self,
        repo: FhirRepository,
        version: StoredVersion,
        previous: dict[str, Any] | None,
        data: dict[str, Any] | None,
    ) -> None:
        if data is None or repo.system or version.resource_type != "Task" or not is_referral(data):
            return
        conn = await repo.db()
        status = data.get("status")
        old_status = previous.get("status") if previous else None
        task_id = version.fhir_id
        owner_changed = previous is not None and reference_of(previous, "owner") != reference_of(
            data, "owner"
        )
        if status == "requested" and (old_status != "requested" or owner_changed):
            owner = _local_organization(reference_of(data, "owner"), repo.fhir_base)
            partner = await find_partner(conn, owner) if owner else None
            if owner_changed:
                # Handed to another organisation before it went out: the old delivery is void.
                await queue.close(
                    conn, DELIVER, task_id, error="not delivered: the Task was handed to another owner"
                )
            if partner is not None:
                deadline = datetime.now(UTC) + self.deadline
                await schedule(conn, DELIVER, task_id, partner.organization_id, partner.endpoint_id, deadline)
        elif status in ("cancelled", "entered-in-error") and old_status not in (
            "cancelled",
            "entered-in-error",
        ):
            delivery = await queue.latest(conn, DELIVER, task_id)
            if delivery is not None:
                deadline = datetime.now(UTC) + self.deadline
                await schedule(
                    conn,
                    CANCEL,
                    task_id,
                    delivery.payload["partner_org"],
                    delivery.payload["partner_endpoint"],
                    deadline,
                )
        elif repo.access.organization is not None:
            # The partner updated the Task on carecoord itself: look at its copy soon, but not
            # more often than every PARTNER_POLL_FLOOR seconds, however often it writes.
            await queue.reschedule(conn, TRACK, task_id, PARTNER_POLL_FLOOR, sooner_only=True)


class DirectoryHooks:
    """Partner endpoints are changed by the server's operators only (issue 15).

    Referrals are delivered, with the partner's access token and the patient's data, to the
    ``address`` of the Endpoint that the owner Organization's ``endpoint`` names
    (directory.py). Whoever can change either chooses where that goes, so creating, changing
    or deleting an Endpoint, and changing an Organization's ``endpoint`` list, needs a
    system-level client (AccessContext.system_level): never a partner organisation's client
    or a patient app, whatever its scopes.
    """

    types = frozenset({"Endpoint", "Organization"})

    async def before_write(
        self,
        repo: FhirRepository,
        resource_type: str,
        previous: dict[str, Any] | None,
        data: dict[str, Any] | None,
    ) -> None:
        letter = "c" if previous is None else "d" if data is None else "u"
        if repo.system or repo.access.system_level(resource_type, letter):
            return
        if resource_type == "Endpoint":
            raise Forbidden("Endpoints are created and changed by system-level clients only")
        if (previous or {}).get("endpoint") != (data or {}).get("endpoint"):
            raise Forbidden(
                "Organization.endpoint is changed by system-level clients only",
                expression=("Organization.endpoint",),
            )

    async def after_write(
        self,
        repo: FhirRepository,
        version: StoredVersion,
        previous: dict[str, Any] | None,
        data: dict[str, Any] | None,
    ) -> None:
        return None
