"""The registry of served resource types: adding a type is a one-line change here.

Everything else (routes, CapabilityStatement, OpenAPI, generated tables) is
derived from :data:`SERVED_TYPES`.
"""

from __future__ import annotations

SERVED_TYPES: tuple[str, ...] = (
    "Patient",
    "RelatedPerson",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Endpoint",
    "CareTeam",
    "EpisodeOfCare",
    "CarePlan",
    "Goal",
    "ServiceRequest",
    "Task",
    "Condition",
    "Observation",
    "Procedure",
    "Consent",
    "Communication",
    "Appointment",
    "Questionnaire",
    "QuestionnaireResponse",
    "Provenance",
    "AuditEvent",
    "Subscription",
    "Group",
    "HealthcareService",
    "Location",
    "OrganizationAffiliation",
    "DocumentReference",
    "Basic",
)

SERVED_TYPE_SET: frozenset[str] = frozenset(SERVED_TYPES)
