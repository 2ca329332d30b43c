"""A minimal valid R4 instance of every served type (required elements only, plus a name)."""

from __future__ import annotations

from typing import Any

PATIENT_REF = {"reference": "Patient/example"}

SAMPLES: dict[str, dict[str, Any]] = {
    "Patient": {
        "resourceType": "Patient",
        "name": [{"family": "Rivera", "given": ["Ana"]}],
        "gender": "female",
    },
    "RelatedPerson": {"resourceType": "RelatedPerson", "patient": PATIENT_REF},
    "Practitioner": {"resourceType": "Practitioner", "name": [{"family": "Okafor"}]},
    "PractitionerRole": {"resourceType": "PractitionerRole", "active": True},
    "Organization": {"resourceType": "Organization", "name": "Eastside Housing Partners"},
    "Endpoint": {
        "resourceType": "Endpoint",
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "hl7-fhir-rest",
        },
        "payloadType": [{"text": "FHIR"}],
        "address": "https://partner.example.org/fhir",
    },
    "CareTeam": {"resourceType": "CareTeam", "status": "active", "subject": PATIENT_REF},
    "EpisodeOfCare": {"resourceType": "EpisodeOfCare", "status": "active", "patient": PATIENT_REF},
    "CarePlan": {"resourceType": "CarePlan", "status": "active", "intent": "plan", "subject": PATIENT_REF},
    "Goal": {
        "resourceType": "Goal",
        "lifecycleStatus": "active",
        "description": {"text": "Stable housing"},
        "subject": PATIENT_REF,
    },
    "ServiceRequest": {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "subject": PATIENT_REF,
        "code": {"text": "Housing assistance"},
    },
    "Task": {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]},
        "for": PATIENT_REF,
    },
    "Condition": {"resourceType": "Condition", "subject": PATIENT_REF, "code": {"text": "Homelessness"}},
    "Observation": {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "Food insecurity risk"},
        "subject": PATIENT_REF,
    },
    "Procedure": {"resourceType": "Procedure", "status": "completed", "subject": PATIENT_REF},
    "Consent": {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
            ]
        },
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IDSCL"}]}
        ],
        "patient": PATIENT_REF,
    },
    "Communication": {"resourceType": "Communication", "status": "completed", "subject": PATIENT_REF},
    "Appointment": {
        "resourceType": "Appointment",
        "status": "booked",
        "participant": [{"actor": PATIENT_REF, "status": "accepted"}],
    },
    "Questionnaire": {"resourceType": "Questionnaire", "status": "active", "title": "Housing screening"},
    "QuestionnaireResponse": {
        "resourceType": "QuestionnaireResponse",
        "status": "completed",
        "subject": PATIENT_REF,
    },
    "Provenance": {
        "resourceType": "Provenance",
        "target": [PATIENT_REF],
        "recorded": "2026-01-01T10:00:00Z",
        "agent": [{"who": {"reference": "Practitioner/p1"}}],
    },
    "AuditEvent": {
        "resourceType": "AuditEvent",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
        "recorded": "2026-01-01T10:00:00Z",
        "agent": [{"requestor": True, "who": {"reference": "Practitioner/p1"}}],
        "source": {"observer": {"reference": "Organization/o1"}},
    },
    # Subscriptions R5 Backport IG (R4): a topic, a filter, a rest-hook channel. Nothing listens
    # on the endpoint (port 9, discard): its handshake would fail, if a job runner ran here.
    "Subscription": {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "Follow referral Tasks of Organization/o1",
        "criteria": "http://hl7.org/fhir/us/sdoh-clinicalcare/SubscriptionTopic/Task",
        "_criteria": {
            "extension": [
                {
                    "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria",
                    "valueString": "Task?requester=Organization/o1",
                }
            ]
        },
        "channel": {
            "type": "rest-hook",
            "endpoint": "http://127.0.0.1:9/notify",
            "payload": "application/fhir+json",
            "_payload": {
                "extension": [
                    {
                        "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content",
                        "valueCode": "id-only",
                    }
                ]
            },
        },
    },
    # Issue 12: a caseload or programme roster.
    "Group": {
        "resourceType": "Group",
        "type": "person",
        "actual": True,
        "name": "Eastside caseload",
        "member": [{"entity": PATIENT_REF}],
    },
    # Issue 13: the human-services directory and documents.
    "HealthcareService": {"resourceType": "HealthcareService", "name": "Emergency shelter intake"},
    "Location": {
        "resourceType": "Location",
        "name": "Eastside shelter",
        "position": {"longitude": -72.5, "latitude": 42.1},
    },
    "OrganizationAffiliation": {"resourceType": "OrganizationAffiliation", "active": True},
    "DocumentReference": {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": PATIENT_REF,
        "content": [{"attachment": {"contentType": "text/plain", "data": "aGVsbG8=", "title": "Note"}}],
    },
    "Basic": {"resourceType": "Basic", "code": {"text": "housing-application"}, "subject": PATIENT_REF},
}
