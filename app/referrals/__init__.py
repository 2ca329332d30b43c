"""Closed-loop referrals: Task state machine, outbox, partner delivery and status tracking."""
