"""FHIR Subscriptions (R5 Backport IG 1.1 for R4): topics, filters, events and deliveries."""
