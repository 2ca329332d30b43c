"""Events: the change feed every committed write records, and what consumes it."""
