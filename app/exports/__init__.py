"""Bulk Data Access IG v2.0.0 export (issue 12): ``$export`` at the system, Patient and Group
level, asynchronous with status polling, NDJSON files read from a consistent snapshot."""
