"""What a person's token sees (issue 11): the patients of a person, and the subscription's person

``carecoord_person_patients(type, id)`` answers, from the search index, the ids of the Patients
whose compartment a RelatedPerson or a Practitioner user sees (app/fhir/access.py adds it to
the SQL of every interaction of such a token; it is evaluated on every request, so a change of
CareTeam takes effect on the next one):

- RelatedPerson: its ``patient`` while it is ``active`` (true);
- Practitioner: the subjects of the ``active`` CareTeams whose participant is the practitioner
  or one of its PractitionerRoles, and the patients of the ``active`` EpisodeOfCares whose
  careManager is the practitioner (R4 ``care-manager`` indexes Practitioner targets only).

``carecoord_practitioner_roles(id)`` answers the ids of the practitioner's PractitionerRoles
that are not marked inactive. Index rows exist only for live resources, so deleted CareTeams,
episodes, roles and RelatedPersons grant nothing. Both are plpgsql: opaque to the planner, so
the statements that use them stay cheap to plan, and their own plans are cached per session.

``subscription.owner_user``: the person of the token that created a Subscription; its
notifications are judged with that person's limits.

Revision ID: 0018
Revises: 0014
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

ROLES = """
CREATE OR REPLACE FUNCTION carecoord_practitioner_roles(practitioner text) RETURNS text[]
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    RETURN ARRAY(
        SELECT r.fhir_id FROM search_reference p JOIN resource r ON r.rid = p.rid
        WHERE p.resource_type = 'PractitionerRole' AND p.param = 'practitioner'
          AND p.target_type = 'Practitioner' AND p.target_id = practitioner
          AND NOT EXISTS (SELECT 1 FROM search_token a WHERE a.rid = p.rid
                          AND a.resource_type = 'PractitionerRole' AND a.param = 'active'
                          AND a.code = 'false'));
END $$
"""

PATIENTS = """
CREATE OR REPLACE FUNCTION carecoord_person_patients(person_type text, person_id text) RETURNS text[]
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    roles text[];
BEGIN
    IF person_type = 'Patient' THEN
        RETURN ARRAY[person_id];
    ELSIF person_type = 'RelatedPerson' THEN
        RETURN ARRAY(
            SELECT l.target_id FROM resource r JOIN search_reference l ON l.rid = r.rid
                AND l.resource_type = 'RelatedPerson' AND l.param = 'patient' AND l.target_type = 'Patient'
            WHERE r.resource_type = 'RelatedPerson' AND r.fhir_id = person_id AND NOT r.deleted
              AND EXISTS (SELECT 1 FROM search_token a WHERE a.rid = r.rid
                          AND a.resource_type = 'RelatedPerson' AND a.param = 'active' AND a.code = 'true'));
    ELSIF person_type = 'Practitioner' THEN
        roles := carecoord_practitioner_roles(person_id);
        RETURN ARRAY(
            SELECT s.target_id FROM search_reference m JOIN search_reference s ON s.rid = m.rid
                AND s.resource_type = 'CareTeam' AND s.param = 'subject' AND s.target_type = 'Patient'
            WHERE m.resource_type = 'CareTeam' AND m.param = 'participant'
              AND ((m.target_type = 'Practitioner' AND m.target_id = person_id)
                   OR (m.target_type = 'PractitionerRole' AND m.target_id = ANY(roles)))
              AND EXISTS (SELECT 1 FROM search_token a WHERE a.rid = m.rid
                          AND a.resource_type = 'CareTeam' AND a.param = 'status' AND a.code = 'active')
            UNION
            SELECT s.target_id FROM search_reference m JOIN search_reference s ON s.rid = m.rid
                AND s.resource_type = 'EpisodeOfCare' AND s.param = 'patient' AND s.target_type = 'Patient'
            WHERE m.resource_type = 'EpisodeOfCare' AND m.param = 'care-manager'
              AND m.target_type = 'Practitioner' AND m.target_id = person_id
              AND EXISTS (SELECT 1 FROM search_token a WHERE a.rid = m.rid
                          AND a.resource_type = 'EpisodeOfCare' AND a.param = 'status' AND a.code = 'active'));
    END IF;
    RETURN '{}'::text[];
END $$
"""


def upgrade() -> None:
    op.add_column("subscription", sa.Column("owner_user", sa.Text(), nullable=True))
    op.execute(ROLES)
    op.execute(PATIENTS)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS carecoord_person_patients(text, text)")
    op.execute("DROP FUNCTION IF EXISTS carecoord_practitioner_roles(text)")
    op.drop_column("subscription", "owner_user")
