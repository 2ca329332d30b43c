"""Prometheus metrics of the audit buffer (issue 14), on the registry /metrics exposes
(app/referrals/metrics.py)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from app.referrals.metrics import REGISTRY

BUFFERED = Gauge(
    "carecoord_audit_buffered", "AuditEvents buffered or being written (reads, refusals)", registry=REGISTRY
)
WAITING = Gauge(
    "carecoord_audit_requests_waiting",
    "Requests held back because the audit buffer is full (back-pressure)",
    registry=REGISTRY,
)
WRITTEN = Counter(
    "carecoord_audit_events_written", "Buffered AuditEvents written to the audit store", registry=REGISTRY
)
DROPPED = Counter(
    "carecoord_audit_events_dropped",
    "AuditEvents lost: recorded past twice the buffer bound, or unwritable at shutdown",
    registry=REGISTRY,
)
FLUSH_FAILURES = Counter(
    "carecoord_audit_flush_failures", "Failed COPYs of the audit buffer (retried)", registry=REGISTRY
)
