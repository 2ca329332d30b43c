"""Task status transitions (FHIR R4 task.html#statemachine; SDOHCC referral workflow).

Referral Tasks (``intent`` order, ``code`` task-code#fulfill, ``focus`` a ServiceRequest)
follow the SDOH Clinical Care IG's table (SDOHCC-TaskForReferralManagement and its state
diagram): ``received`` and ``ready`` are never used; only the owner (the referral target)
accepts, rejects, starts, holds, completes or fails; the requester or the owner cancels; only
the requester marks the Task entered-in-error; a patient app never changes the status.
Other Tasks follow the base R4 state machine. An illegal change is a 422 ``business-rule``
OperationOutcome and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.fhir.errors import BusinessRule
from app.fhir.indexing import split_reference

TASK_CODE_SYSTEM = "http://hl7.org/fhir/CodeSystem/task-code"

REQUESTER = "requester"
OWNER = "owner"

# (from, to) -> who may make the change (SDOHCC table, standards.md 1.1).
_SDOHCC: dict[tuple[str | None, str], frozenset[str]] = {}


def _allow(sources: tuple[str | None, ...], targets: tuple[str, ...], *roles: str) -> None:
    for source in sources:
        for target in targets:
            _SDOHCC[(source, target)] = frozenset(roles)


_allow((None,), ("draft", "requested"), REQUESTER)
_allow(("draft",), ("requested",), REQUESTER)
_allow(("draft",), ("cancelled",), REQUESTER)
_allow(("requested",), ("accepted", "rejected"), OWNER)
_allow(("accepted",), ("in-progress", "on-hold", "completed", "failed"), OWNER)
_allow(("in-progress",), ("on-hold", "completed", "failed"), OWNER)
_allow(("on-hold",), ("in-progress", "completed", "failed"), OWNER)
_allow(("requested", "accepted", "in-progress", "on-hold"), ("cancelled",), REQUESTER, OWNER)

REFERRAL_STATUSES = frozenset(
    {
        "draft",
        "requested",
        "accepted",
        "rejected",
        "cancelled",
        "in-progress",
        "on-hold",
        "failed",
        "completed",
        "entered-in-error",
    }
)
"""SDOHCC-ValueSetReferralTaskStatus: task-status without ``received`` and ``ready``."""

TERMINAL = frozenset({"completed", "failed", "rejected", "cancelled", "entered-in-error"})


def owner_can_reach(old_status: str | None, status: str) -> bool:
    """Whether the referral's owner could take its Task from ``old_status`` to ``status`` by
    the SDOHCC table (in any number of steps): what a partner's status may become here when
    carecoord mirrors the partner's copy (an unchanged status is always fine)."""
    if status == old_status:
        return True
    seen: set[str | None] = {old_status}
    frontier: list[str | None] = [old_status]
    while frontier:
        current = frontier.pop()
        for (source, target), parties in _SDOHCC.items():
            if source == current and OWNER in parties and target not in seen:
                if target == status:
                    return True
                seen.add(target)
                frontier.append(target)
    return False


# The base R4 graph (task.html#statemachine), for every other Task.
_BASE: dict[str, frozenset[str]] = {
    "draft": frozenset({"requested", "ready", "cancelled"}),
    "requested": frozenset({"received", "accepted", "rejected", "cancelled"}),
    "received": frozenset({"accepted", "rejected", "cancelled"}),
    "ready": frozenset({"in-progress", "cancelled"}),
    "accepted": frozenset({"in-progress", "cancelled"}),
    "in-progress": frozenset({"on-hold", "completed", "failed", "ready", "cancelled"}),
    "on-hold": frozenset({"in-progress", "cancelled"}),
}


@dataclass(frozen=True)
class Actor:
    """Who changes the Task: the organisation a partner client acts for (``Organization/ID``),
    or None for the server's own organisation's clients; ``patient`` is the Patient id of a
    client that holds patient scopes only (a patient app)."""

    organization: str | None
    patient: str | None = None

    @property
    def patient_app(self) -> bool:
        return self.patient is not None


def is_referral(task: dict[str, Any]) -> bool:
    """A referral Task (SDOHCC-TaskForReferralManagement): order to fulfil a ServiceRequest."""
    if task.get("intent") != "order":
        return False
    codings = (task.get("code") or {}).get("coding") or []
    fulfil = any(c.get("system") == TASK_CODE_SYSTEM and c.get("code") == "fulfill" for c in codings)
    focus = (task.get("focus") or {}).get("reference")
    return fulfil and isinstance(focus, str) and "ServiceRequest/" in focus


def reference_of(task: dict[str, Any], element: str) -> str | None:
    value = (task.get(element) or {}).get("reference")
    return value if isinstance(value, str) else None


def local_reference(reference: str | None, fhir_base: str) -> str | None:
    """``Type/id`` of a reference to this server (relative, or absolute under its FHIR base);
    any other reference as it is."""
    if not reference:
        return reference
    target_type, target_id, _ = split_reference(reference, fhir_base)
    return f"{target_type}/{target_id}" if target_type and target_id else reference


def roles(task: dict[str, Any], actor: Actor, home_organization: str | None, fhir_base: str) -> set[str]:
    """The roles ``actor`` holds on ``task``: requester and/or owner."""
    if actor.patient is not None:
        # A patient app acts for its patient only: the owner of a Task assigned to the patient
        # (SDOHCC TaskForPatient), the requester of one the patient asked for.
        me = f"Patient/{actor.patient}"
        return {
            role
            for role, element in ((REQUESTER, "requester"), (OWNER, "owner"))
            if local_reference(reference_of(task, element), fhir_base) == me
        }
    organization = actor.organization or home_organization
    if organization is None:
        return {REQUESTER, OWNER}  # the server's own clients, with no home organisation configured
    held = set()
    if local_reference(reference_of(task, "requester"), fhir_base) == organization:
        held.add(REQUESTER)
    if local_reference(reference_of(task, "owner"), fhir_base) == organization:
        held.add(OWNER)
    if actor.organization is None and not held:
        # The home organisation's clients may act for its practitioners (requester
        # PractitionerRole) when the Task's requester is not an Organization.
        requester = local_reference(reference_of(task, "requester"), fhir_base) or ""
        if not requester.startswith("Organization/"):
            held.add(REQUESTER)
    return held


def check_transition(
    previous: dict[str, Any] | None,
    new: dict[str, Any],
    actor: Actor,
    *,
    home_organization: str | None,
    fhir_base: str,
) -> None:
    """Refuse (422 business-rule) a change the Task's state machine does not allow.

    For every Task, what it is and between whom (PARTIES) only its requester changes, and a
    referral stays a referral: otherwise changing ``intent`` would take a referral out of the
    SDOHCC rules and let anyone move its status (issue 15). Status changes follow the SDOHCC
    table for referrals and the base R4 graph for other Tasks, made by one of their parties.
    """
    old_status = previous.get("status") if previous else None
    status = new.get("status")
    referral = is_referral(new) or (previous is not None and is_referral(previous))
    if previous is not None:
        _check_parties(previous, new, actor, home_organization, fhir_base)
        if is_referral(previous) and not is_referral(new):
            raise BusinessRule(
                "a referral Task stays a referral (intent order, code fulfill, focus a ServiceRequest)",
                expression=("Task.intent", "Task.code", "Task.focus"),
            )
    if not isinstance(status, str) or old_status == status:
        return
    if not referral:
        if previous is not None and not roles(previous, actor, home_organization, fhir_base):
            raise BusinessRule(
                "only the Task's requester or owner may change its status", expression=("Task.status",)
            )
        _check_base(old_status, status)
        return
    if status not in REFERRAL_STATUSES:
        raise BusinessRule(
            f"a referral Task never takes status '{status}' (SDOHCC referral Task status value set)",
            expression=("Task.status",),
        )
    if actor.patient_app:
        raise BusinessRule("a patient application may not change a referral Task's status")
    # Roles are judged on the Task as it was (an owner cannot hand itself the role by the same write).
    held = roles(previous or new, actor, home_organization, fhir_base)
    if status == "entered-in-error":
        if REQUESTER not in held:
            raise BusinessRule("only the referral's requester may mark it entered-in-error")
        return
    allowed = _SDOHCC.get((old_status, status))
    if allowed is None:
        raise BusinessRule(
            f"a referral Task cannot go from '{old_status or '(new)'}' to '{status}'",
            expression=("Task.status",),
        )
    if not allowed & held:
        who = " or ".join(sorted(allowed))
        raise BusinessRule(
            f"only the referral's {who} may set status '{status}'", expression=("Task.status",)
        )


def check_deletion(
    previous: dict[str, Any], actor: Actor, *, home_organization: str | None, fhir_base: str
) -> None:
    """A partner deletes only Tasks it requested, a patient app none (422 otherwise): an owner
    would otherwise delete the requester's Task and write a new one at the same id, with
    parties of its choosing. The server's own clients may delete any Task."""
    if actor.patient_app:
        raise BusinessRule("a patient application may not delete a Task")
    if actor.organization is not None and REQUESTER not in roles(
        previous, actor, home_organization, fhir_base
    ):
        raise BusinessRule("only the Task's requester may delete it")


PARTIES = ("intent", "code", "focus", "for", "requester", "owner")
"""What a Task is and between whom: only its requester changes them (every Task)."""


def _check_parties(
    previous: dict[str, Any], new: dict[str, Any], actor: Actor, home_organization: str | None, fhir_base: str
) -> None:
    changed = [element for element in PARTIES if previous.get(element) != new.get(element)]
    if not changed:
        return
    if actor.patient_app or REQUESTER not in roles(previous, actor, home_organization, fhir_base):
        raise BusinessRule(
            f"only the Task's requester may change {', '.join(changed)}",
            expression=tuple(f"Task.{element}" for element in changed),
        )


def _check_base(old_status: str | None, status: str) -> None:
    if old_status is None or status == "entered-in-error":
        return
    if status not in _BASE.get(old_status, frozenset()):
        raise BusinessRule(
            f"a Task cannot go from '{old_status}' to '{status}' (R4 Task state machine)",
            expression=("Task.status",),
        )
