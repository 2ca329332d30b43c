"""The audit store (issue 14): AuditEvents in a table of their own, append-only and partitioned
by month, apart from the clinical resource tables.

- store.py: the table's rows (typed columns + the compact JSON body), the in-transaction insert,
  the COPY of buffered events, partition maintenance (created ahead, dropped after the retention);
- fhir.py: the read-only FHIR adapter (read, vread, search with the R4 AuditEvent parameters),
  with the caller's access rendered as SQL over the table;
- jobs.py: the periodic partition-maintenance job on the job runner (app/jobs);
- metrics.py: buffer depth, written, waiting and dropped counters.

The AuditTrail that builds and buffers events stays in app/auth/audit.py.
"""
