"""AuditEvents of sign-in and token events (issue 11; FHIR R4 auditevent.html, DICOM PS3.15 A.5,
IHE BALP): logins (success and failure), consent decisions, tokens issued, refreshed, revoked.

``type`` is DICOM 110114 "User Authentication"; ``subtype`` is DICOM 110122 "Login" for a sign-in
and a code of ``urn:carecoord:auth-event`` (``login``, ``consent-approve``, ``consent-deny``,
``token-issue``, ``token-refresh``, ``token-revoke``) for every event. The agents are the user
(their FHIR resource, when known), the app (its client id) and the source address. Never a
password, a token, or a username that did not sign in (a mistyped username may be a password).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from app.auth.audit import CLIENT_SYSTEM
from app.fhir.repository import fhir_instant

DCM = "http://dicom.nema.org/resources/ontology/DCM"
EVENT_SYSTEM = "urn:carecoord:auth-event"
ACTIONS = {
    "login": "E",
    "consent-approve": "E",
    "consent-deny": "E",
    "token-issue": "C",
    "token-refresh": "C",
    "token-revoke": "D",
}


def auth_event(
    action: str,
    *,
    outcome: str,
    fhir_user: str | None,
    client_id: str | None,
    address: str | None,
    reason: str | None,
    fhir_base: str,
) -> dict[str, Any]:
    """One AuditEvent; ``outcome`` is R4 audit-event-outcome (0 success, 4 minor failure)."""
    subtypes = [{"system": EVENT_SYSTEM, "code": action}]
    if action == "login":
        subtypes.insert(0, {"system": DCM, "code": "110122", "display": "Login"})
    agents: list[dict[str, Any]] = []
    if fhir_user is not None:
        agents.append(
            {
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                            "code": "AUT",
                        }
                    ]
                },
                "who": {"reference": fhir_user},
                "requestor": True,
                **({"network": {"address": address, "type": "2"}} if address else {}),
            }
        )
    if client_id is not None:
        agents.append(
            {
                "type": {"coding": [{"system": DCM, "code": "110150", "display": "Application"}]},
                "who": {"identifier": {"system": CLIENT_SYSTEM, "value": client_id}},
                "requestor": fhir_user is None,
                **({"network": {"address": address, "type": "2"}} if address and fhir_user is None else {}),
            }
        )
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": {"system": DCM, "code": "110114", "display": "User Authentication"},
        "subtype": subtypes,
        "action": ACTIONS.get(action, "E"),
        "recorded": fhir_instant(datetime.now(UTC)),
        "outcome": outcome,
        "agent": agents or [{"who": {"display": "unknown user"}, "requestor": True}],
        "source": {
            "observer": {"display": f"carecoord {fhir_base}"},
            "type": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "code": "4",
                    "display": "Application Server",
                }
            ],
        },
    }
    if reason:
        event["outcomeDesc"] = reason
    return event
