"""carecoord: a FHIR R4 care-coordination API service."""
