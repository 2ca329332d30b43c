"""audit_event: the audit store of its own (issue 14)

AuditEvents leave the clinical tables for ``audit_event``, an append-only table partitioned by
month on ``recorded`` (app/audit/store.py). The existing AuditEvents move here with their stored
JSON unchanged (same id, same body) and the typed columns derived from it; then they, their
history, their change-feed rows and their search-index rows are deleted from the clinical
tables. Partitions are created for every month that holds an event, and for this month and the
three after it (the server keeps creating them ahead, app/audit/jobs.py).

Downgrade drops the table: events recorded after the upgrade are not moved back.

Revision ID: 0019
Revises: 0014
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

INDEX_TABLES = ("token", "string", "date", "reference", "quantity", "uri")

# The last Type/id of a reference (relative, absolute to this server, or versioned).
SHORT_REFERENCE = r"([A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64})(/_history/[^/]+)?$"


def _short(expression: str) -> str:
    return f"COALESCE(substring({expression} from '{SHORT_REFERENCE}'), {expression})"


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE audit_event (
            id text NOT NULL,
            recorded timestamptz NOT NULL,
            type_system text,
            type_code text,
            subtype text[] NOT NULL DEFAULT '{}',
            subtype_token text[] NOT NULL DEFAULT '{}',
            action text,
            outcome text,
            agent_client text,
            agent_user text,
            agent_organization text,
            patient text[] NOT NULL DEFAULT '{}',
            entity text[] NOT NULL DEFAULT '{}',
            query text,
            address text,
            site text,
            source text,
            body text NOT NULL
        ) PARTITION BY RANGE (recorded)
        """
    )
    op.execute("CREATE INDEX ix_audit_event_id ON audit_event (id)")
    op.execute("CREATE INDEX ix_audit_event_recorded ON audit_event (recorded, id)")
    # fastupdate off: a write's own AuditEvent pays a small fixed cost, never a pending-list merge.
    op.execute("CREATE INDEX ix_audit_event_patient ON audit_event USING gin (patient) WITH (fastupdate = off)")
    op.execute("CREATE INDEX ix_audit_event_entity ON audit_event USING gin (entity) WITH (fastupdate = off)")
    op.execute("CREATE INDEX ix_audit_event_client ON audit_event (agent_client, recorded)")
    op.execute(
        "CREATE INDEX ix_audit_event_user ON audit_event (agent_user, recorded) WHERE agent_user IS NOT NULL"
    )
    op.execute(
        "CREATE INDEX ix_audit_event_organization ON audit_event (agent_organization, recorded)"
        " WHERE agent_organization IS NOT NULL"
    )
    op.execute(
        """
        CREATE TEMPORARY TABLE audit_move ON COMMIT DROP AS
        SELECT r.fhir_id, r.body, b,
               CASE WHEN b->>'recorded' ~ '^\\d{4}-\\d{2}-\\d{2}T.*(Z|[+-]\\d{2}:\\d{2})$'
                    THEN (b->>'recorded')::timestamptz ELSE r.last_updated END AS recorded,
               CASE jsonb_typeof(b->'agent') WHEN 'array' THEN b->'agent' ELSE '[]'::jsonb END AS agents,
               CASE jsonb_typeof(b->'entity') WHEN 'array' THEN b->'entity' ELSE '[]'::jsonb END AS entities,
               CASE jsonb_typeof(b->'subtype') WHEN 'array' THEN b->'subtype' ELSE '[]'::jsonb END AS subtypes
        FROM resource r CROSS JOIN LATERAL (SELECT r.body::jsonb AS b) j
        WHERE r.resource_type = 'AuditEvent' AND NOT r.deleted AND r.body IS NOT NULL
        """
    )
    op.execute(
        """
        DO $$
        DECLARE month date;
        BEGIN
            FOR month IN
                SELECT DISTINCT date_trunc('month', recorded AT TIME ZONE 'UTC')::date FROM audit_move
                UNION
                SELECT date_trunc('month', (now() AT TIME ZONE 'UTC') + make_interval(months => n))::date
                FROM generate_series(0, 3) AS n
            LOOP
                EXECUTE format(
                    'CREATE TABLE IF NOT EXISTS %I PARTITION OF audit_event FOR VALUES FROM (%L) TO (%L)',
                    'audit_event_p' || to_char(month, 'YYYYMM'), month, (month + interval '1 month')::date
                );
            END LOOP;
        END $$
        """
    )
    agent_ref = "a->'who'->>'reference'"
    entity_ref = "e->'what'->>'reference'"
    op.execute(
        f"""
        INSERT INTO audit_event (id, recorded, type_system, type_code, subtype, subtype_token, action,
            outcome, agent_client, agent_user, agent_organization, patient, entity, query, address,
            site, source, body)
        SELECT m.fhir_id, m.recorded, m.b->'type'->>'system', m.b->'type'->>'code',
            ARRAY(SELECT COALESCE(s->>'code', '') FROM jsonb_array_elements(m.subtypes) s),
            ARRAY(SELECT COALESCE(s->>'system', '') || '|' || COALESCE(s->>'code', '')
                  FROM jsonb_array_elements(m.subtypes) s),
            m.b->>'action', m.b->>'outcome',
            (SELECT a->'who'->'identifier'->>'value' FROM jsonb_array_elements(m.agents) a
             WHERE a->'who'->'identifier'->>'system' = 'urn:carecoord:oauth-client' LIMIT 1),
            (SELECT {_short(agent_ref)} FROM jsonb_array_elements(m.agents) a
             WHERE {agent_ref} IS NOT NULL AND {_short(agent_ref)} NOT LIKE 'Organization/%' LIMIT 1),
            (SELECT {_short(agent_ref)} FROM jsonb_array_elements(m.agents) a
             WHERE {_short(agent_ref)} LIKE 'Organization/%' LIMIT 1),
            ARRAY(SELECT DISTINCT split_part(x.ref, '/', 2) FROM (
                    SELECT {_short(agent_ref)} AS ref FROM jsonb_array_elements(m.agents) a
                    UNION ALL
                    SELECT {_short(entity_ref)} FROM jsonb_array_elements(m.entities) e
                  ) x WHERE x.ref LIKE 'Patient/%'),
            ARRAY(SELECT DISTINCT {_short(entity_ref)} FROM jsonb_array_elements(m.entities) e
                  WHERE {entity_ref} IS NOT NULL),
            (SELECT convert_from(decode(e->>'query', 'base64'), 'UTF8') FROM jsonb_array_elements(m.entities) e
             WHERE e->>'query' IS NOT NULL LIMIT 1),
            (SELECT a->'network'->>'address' FROM jsonb_array_elements(m.agents) a
             WHERE a->'network'->>'address' IS NOT NULL LIMIT 1),
            m.b->'source'->>'site',
            COALESCE(m.b->'source'->'observer'->>'display', m.b->'source'->'observer'->>'reference'),
            m.body
        FROM audit_move m
        """
    )
    for table in INDEX_TABLES:
        op.execute(f"DELETE FROM search_{table} WHERE resource_type = 'AuditEvent'")
    op.execute("DELETE FROM resource_history WHERE resource_type = 'AuditEvent'")
    op.execute("DELETE FROM resource_change WHERE resource_type = 'AuditEvent'")
    op.execute("DELETE FROM resource WHERE resource_type = 'AuditEvent'")


def downgrade() -> None:
    op.execute("DROP TABLE audit_event")
