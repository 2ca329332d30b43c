"""auth_request_failure: the failed /auth/token, /auth/revoke and /auth/introspect requests the
per-address and per-(client, address) limits count, shared by every process; and
carecoord_auth_attempt(), which checks those limits and counts an attempt in one statement

One row per key (``address:A``, ``client:C@A``) with the stamps of its recent failures (at most
the limit's worth) and the newest stamp (``last_at``, which pruning reads). See
app/auth/ratelimit.py for the semantics and why the check and the count are one function.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None

# keys: the request's keys; max_failures, window_secs: the limit; prune: also delete the rows
# whose failures have all left the window. Returns (wait, stamp): wait (seconds) when a key is
# at its limit (nothing counted, stamp NULL), else NULL and the stamp counted against every key.
ATTEMPT = """
CREATE OR REPLACE FUNCTION carecoord_auth_attempt(
    keys text[], max_failures integer, window_secs double precision, prune boolean
) RETURNS TABLE (wait double precision, stamp timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    sorted text[] := ARRAY(SELECT DISTINCT k FROM unnest(keys) AS k ORDER BY k);
    horizon timestamptz;
    longest double precision;
    counted timestamptz;
BEGIN
    -- Attempts on a key queue here until the previous one commits (each statement below then
    -- sees its count): the check and the count are one step across processes. Always in key
    -- order, so two attempts sharing keys cannot deadlock; the rows need not exist yet.
    PERFORM pg_advisory_xact_lock(hashtextextended(k, 22)) FROM unnest(sorted) AS k ORDER BY k;
    counted := clock_timestamp();
    horizon := counted - make_interval(secs => window_secs);
    -- A key is at its limit when its max_failures-th most recent failure is inside the window;
    -- it may be tried again once that failure leaves it.
    SELECT max(extract(epoch FROM nth.t + make_interval(secs => window_secs) - counted))
    INTO longest
    FROM auth_request_failure f
    CROSS JOIN LATERAL (
        SELECT s AS t FROM unnest(f.stamps) AS s WHERE s > horizon
        ORDER BY s DESC OFFSET max_failures - 1 LIMIT 1
    ) nth
    WHERE f.key = ANY(sorted);
    IF longest IS NOT NULL THEN
        RETURN QUERY SELECT longest, NULL::timestamptz;
        RETURN;
    END IF;
    -- Count this attempt: the key's recent failures, at most max_failures with this one.
    INSERT INTO auth_request_failure AS f (key, stamps, last_at)
    SELECT k, ARRAY[counted], counted FROM unnest(sorted) AS k ORDER BY k
    ON CONFLICT (key) DO UPDATE SET
        stamps = ARRAY(
            SELECT s FROM unnest(f.stamps) AS s WHERE s > horizon ORDER BY s DESC LIMIT max_failures - 1
        ) || counted,
        last_at = counted;
    IF prune THEN
        -- Rows whose failures have all left the window; rows another statement holds are left
        -- for the next pruning (never waited for: no lock order to get wrong).
        DELETE FROM auth_request_failure WHERE key IN (
            SELECT key FROM auth_request_failure WHERE last_at <= horizon FOR UPDATE SKIP LOCKED
        );
    END IF;
    RETURN QUERY SELECT NULL::double precision, counted;
END $$
"""


def upgrade() -> None:
    op.create_table(
        "auth_request_failure",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("stamps", postgresql.ARRAY(sa.DateTime(timezone=True)), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_auth_request_failure"),
    )
    op.create_index("ix_auth_request_failure_last_at", "auth_request_failure", ["last_at"])
    op.execute(ATTEMPT)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS carecoord_auth_attempt(text[], integer, double precision, boolean)")
    op.drop_table("auth_request_failure")
