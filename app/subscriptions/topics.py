"""The subscription topics carecoord offers (Subscriptions R5 Backport IG 1.1, for R4).

R4 has no SubscriptionTopic resource: a topic is a canonical URL that a Subscription names in
``criteria``, and the server lists the topics it supports in its CapabilityStatement
(extension ``capabilitystatement-subscriptiontopic-canonical``). Each topic here says which
resource type and interactions trigger it, which resource states qualify (``queryCriteria``),
and which search parameters a subscriber may filter on (``canFilterBy``).

The two SDOH Clinical Care IG topics are defined by that IG (checking_task_status.md, "Task
topic" and "ServiceRequest topic"); the others are carecoord's own, under its own namespace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CARECOORD_TOPICS = "http://carecoord.org/fhir/SubscriptionTopic"
"""Namespace of carecoord's own topic canonicals (stable across deployments)."""

Resource = dict[str, Any]
Qualifies = Callable[[Resource | None, Resource | None], bool]
"""Whether a change qualifies, from the (previous, current) versions; None = absent/deleted."""


@dataclass(frozen=True)
class Topic:
    url: str
    resource_type: str
    interactions: frozenset[str]
    """``create``, ``update`` and/or ``delete`` (R5 resourceTrigger.supportedInteraction)."""
    can_filter_by: tuple[str, ...]
    description: str
    qualifies: Qualifies


def _always(previous: Resource | None, current: Resource | None) -> bool:
    return True


def _sdoh_task(previous: Resource | None, current: Resource | None) -> bool:
    """queryCriteria.current ``status:not=draft&intent=order``; resultForDelete test-passes."""
    if current is None:
        return True
    return current.get("status") != "draft" and current.get("intent") == "order"


def _goal_progress(previous: Resource | None, current: Resource | None) -> bool:
    """A Goal's ``lifecycleStatus`` or ``achievementStatus`` changed (or the Goal came or went)."""
    if previous is None or current is None:
        return True
    return previous.get("lifecycleStatus") != current.get("lifecycleStatus") or previous.get(
        "achievementStatus"
    ) != current.get("achievementStatus")


TOPICS: tuple[Topic, ...] = (
    Topic(
        "http://hl7.org/fhir/us/sdoh-clinicalcare/SubscriptionTopic/Task",
        "Task",
        frozenset({"create", "update", "delete"}),
        ("_lastUpdated", "code", "owner", "requester", "status"),
        "SDOH Clinical Care IG: Tasks created or updated (status not draft, intent order)",
        _sdoh_task,
    ),
    Topic(
        "http://hl7.org/fhir/us/sdoh-clinicalcare/SubscriptionTopic/Servicerequest",
        "ServiceRequest",
        frozenset({"update", "delete"}),
        ("_lastUpdated", "_id"),
        "SDOH Clinical Care IG: a ServiceRequest being fulfilled is changed or deleted",
        _always,
    ),
    Topic(
        f"{CARECOORD_TOPICS}/CarePlan",
        "CarePlan",
        frozenset({"create", "update", "delete"}),
        ("_id", "_lastUpdated", "patient", "subject", "status", "category", "care-team"),
        "A care plan is created, changed or deleted",
        _always,
    ),
    Topic(
        f"{CARECOORD_TOPICS}/Goal",
        "Goal",
        frozenset({"create", "update", "delete"}),
        ("_id", "patient", "subject", "lifecycle-status", "achievement-status", "category"),
        "A goal is set or removed, or its lifecycle or achievement status changes",
        _goal_progress,
    ),
    Topic(
        f"{CARECOORD_TOPICS}/Appointment",
        "Appointment",
        frozenset({"create", "update", "delete"}),
        ("_id", "_lastUpdated", "patient", "actor", "practitioner", "location", "status", "service-type"),
        "An appointment is booked, changed or cancelled",
        _always,
    ),
)

BY_URL: dict[str, Topic] = {topic.url: topic for topic in TOPICS}
BY_TYPE: dict[str, tuple[Topic, ...]] = {
    resource_type: tuple(t for t in TOPICS if t.resource_type == resource_type)
    for resource_type in {t.resource_type for t in TOPICS}
}


def topic_of(canonical: str) -> Topic | None:
    """The topic a Subscription names (a ``|version`` suffix is ignored)."""
    return BY_URL.get(canonical.split("|", 1)[0])


TOPIC_CANONICAL_EXTENSION = (
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
    "capabilitystatement-subscriptiontopic-canonical"
)
BACKPORT_SUBSCRIPTION_PROFILE = (
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription"
)


def subscription_capabilities() -> dict[str, Any]:
    """What the CapabilityStatement says of Subscription (Backport IG 1.1, "Conformance"): the
    supported topics, one ``capabilitystatement-subscriptiontopic-canonical`` extension each, and
    the backport profile."""
    return {
        "extension": [{"url": TOPIC_CANONICAL_EXTENSION, "valueCanonical": topic.url} for topic in TOPICS],
        "supportedProfile": [BACKPORT_SUBSCRIPTION_PROFILE],
    }
