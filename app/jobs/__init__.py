"""Background jobs (issue 10): one queue table (queue.py, the only module with its SQL) and
one runner (runner.py) with a handler registered per job kind."""

from app.jobs.queue import Job
from app.jobs.runner import Done, Failed, Handler, LeaseLost, Outcome, Paused, Retry, Runner, backoff, record

__all__ = [
    "Done",
    "Failed",
    "Handler",
    "Job",
    "LeaseLost",
    "Outcome",
    "Paused",
    "Retry",
    "Runner",
    "backoff",
    "record",
]
