"""The caller's access context, carried from the request into storage (issue 4).

A request's bearer token becomes an :class:`AccessContext`: its SMART permissions, its
patient context and the partner organisation of its client. Storage asks it for conditions
(``condition``: a tree of app/fhir/conditions.py, rendered to SQL there) and adds them to the
statements of read, vread, history, search, includes, chains, ``_has`` and every write, so a
page, a total or an include can never contain what the token may not see; nothing is filtered
after the fact. The same tree judges older versions (vread, history): of their own content
where it looks at a row's references and values, of the current row where it looks at its id
or at other resources (a referral's grants).

Rules (SMART App Launch 2.x scopes-and-launch-context.html; FHIR R4 security.html):

- a type/interaction no permission covers is a 403 (``Forbidden``);
- a ``patient/`` permission limits the types of the R4 Patient compartment to the token's
  patient (CompartmentDefinition/patient); types outside the compartment (Organization,
  Practitioner, Endpoint, Questionnaire...) are directory data and are not limited;
- a permission's ``?param=value`` restrictions become search conditions; only plain
  parameters of the scoped type are honoured (app/auth/scopes.py ``restriction_problem``), so
  a restriction never looks at rows of another type (no chains, ``_has``);
- a client registered for a partner organisation (issue 15, "partners get only what their
  referrals need"):
    * reads and searches the ServiceRequests whose performer is the organisation, the Tasks
      whose owner or requester it is, the ServiceRequests those Tasks are about, what those
      referrals grant through the elements of indexing.REFERRAL_GRANTS (Patient, Consent,
      Conditions, requester; nothing else a referral happens to mention), the organisation
      itself, and what its clients wrote last;
    * updates and deletes only what its clients wrote last and its own Tasks (owner or
      requester; the Task state machine decides what may change);
  that holds under every permission it has;
- a person's token (SMART ``fhirUser``, :attr:`AccessContext.user`) sees what that person may
  see (issue 11), under every permission it has, on the types of the Patient compartment
  (directory types stay readable as for ``patient/`` permissions):
    * a Patient user: their own compartment;
    * a RelatedPerson user: the compartment of the Patient they are linked to
      (``RelatedPerson.patient``) while the RelatedPerson is ``active`` (true);
    * a Practitioner user: their caseload, the Patients of whom they (or one of their
      PractitionerRoles not marked inactive) are a participant of an ``active`` CareTeam about
      the Patient or the careManager of an ``active`` EpisodeOfCare of the Patient; the
      compartments of those Patients; and the Tasks they own or requested and the
      ServiceRequests they requested or perform;
    * any other kind of user: nothing of those types;
  on directory types a person writes only its own resource (its Practitioner, say);
  Membership is evaluated in the SQL of every request, so a change of CareTeam takes effect
  on the next one. Writes are judged the same way (the version written must lie inside).
  A ``user/`` permission on a token without a person grants nothing (``matching``): it is
  what a user may see, not a ``system/`` permission;
- a resource the token may use the type of but that lies outside these limits is a 404, so
  that its existence is not revealed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from app.auth.scopes import Permission
from app.fhir.conditions import (
    FALSE,
    Identity,
    Index,
    Node,
    Or,
    RowsIn,
    Select,
    Sql,
    all_of,
    any_of,
)
from app.fhir.errors import FHIRError, Forbidden
from app.fhir.indexing import GRANT_PARAM
from app.fhir.search_params import registry

INTERACTION_NAMES = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}

SUBJECT_PARAMS = frozenset({"patient", "subject"})
"""Patient-compartment parameters that name whom a record resource is about (its subject); the
others (performer, participant, author...) name who else took part."""

OWNED_TYPES = frozenset({"Subscription"})
"""Types whose resources belong to the client that created them: only that client reads,
searches, changes or deletes one (a Subscription's channel carries its owner's secrets and its
notifications carry what its owner may read; Subscriptions Backport IG, "Security")."""

OWN_WORK = {"Task": ("owner", "requester"), "ServiceRequest": ("requester", "performer")}
"""Where a Practitioner user is named by the work it owns, asked for or performs (issue 11)."""

REFERRAL_ROOTS = (
    ("ServiceRequest", ("performer",)),
    ("Task", ("owner", "requester")),
)
"""Where a partner organisation is named by the referrals it is part of."""


class ConditionCompiler(Protocol):
    """What access needs from the search compiler of a store (app/fhir/search.py SearchCompiler,
    app/audit/fhir.py AuditCompiler)."""

    patient_column: str | None
    """A store whose rows list the Patients they are about in a ``text[]`` column of their own
    (the audit store) rather than in index rows: a person's limits are over that column."""

    def bind(self, value: object) -> str: ...

    def compartment(self, alias: str, resource_type: str, patient_id: str) -> Node: ...

    def in_patient_compartment(self, resource_type: str) -> bool: ...

    def bind_mark(self) -> int: ...

    def bind_rollback(self, mark: int) -> None: ...

    def restriction(self, alias: str, resource_type: str, name: str, raw: str) -> Node | None: ...


@dataclass(frozen=True)
class AccessContext:
    """Who is calling and what their token allows. ``unrestricted`` = authorization is off."""

    client_id: str | None = None
    organization: str | None = None
    """``Organization/ID`` of a partner client, or None."""
    patient: str | None = None
    """Patient id of the token's patient context, or None."""
    user: str | None = None
    """``Practitioner/ID``, ``Patient/ID`` or ``RelatedPerson/ID`` of a person's token (SMART
    ``fhirUser``), or None for a machine client."""
    permissions: tuple[Permission, ...] = ()
    unrestricted: bool = True
    external: bool = False
    """A token of a trusted external issuer: its ``client_id`` names no client registered here,
    so it owns nothing of the OWNED_TYPES (another issuer's, or another user's, client id could
    be the same string)."""
    _cache: dict[tuple[str, str], tuple[Permission, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def organization_id(self) -> str | None:
        return self.organization.split("/", 1)[1] if self.organization else None

    def matching(self, resource_type: str, letter: str) -> tuple[Permission, ...]:
        """The usable permissions covering ``letter`` on ``resource_type``."""
        key = (resource_type, letter)
        found = self._cache.get(key)
        if found is None:
            found = tuple(
                p
                for p in self.permissions
                if p.covers(resource_type, letter)
                # A patient/ permission needs the token's patient, a user/ one its person
                # (SMART scopes-and-launch-context: user/ is what the user may see, so a token
                # that acts for nobody gets nothing from it; it is not a system/ permission).
                and (p.context != "patient" or self.patient is not None)
                and (p.context != "user" or self.user is not None)
            )
            self._cache[key] = found
        return found

    def allows(self, resource_type: str, letter: str) -> bool:
        return self.unrestricted or bool(self.matching(resource_type, letter))

    @property
    def limited_writer(self) -> bool:
        """A token whose writes are judged against its limits (a patient, an organisation or a
        person): what it points at, and whether it may choose ids (repository.py)."""
        return not self.unrestricted and (
            self.organization is not None or self.patient is not None or self.user is not None
        )

    @property
    def user_reference(self) -> tuple[str, str] | None:
        """The person's ``(type, id)``, or None for a machine client."""
        if self.user is None:
            return None
        kind, _, ident = self.user.partition("/")
        return kind, ident

    def user_limits(self, resource_type: str, letter: str) -> bool:
        """Whether the person's limits apply to ``letter`` on ``resource_type``: always on the
        types of the Patient compartment; on directory types only to writes (they are readable
        as for ``patient/`` permissions, but a person changes only its own resource there: a
        practitioner re-pointing another's PractitionerRole at itself would take over that
        role's CareTeams). OWNED_TYPES have their own owner limit."""
        if self.user is None or resource_type in OWNED_TYPES:
            return False
        if resource_type == "Patient" or resource_type in registry().patient_compartment:
            return True
        return letter in ("c", "u", "d")

    def system_level(self, resource_type: str, letter: str) -> bool:
        """A backend service acting for the server's own organisation: a ``system/`` permission
        covers the interaction and the token is limited to no patient and no partner
        organisation (partner endpoints are changed only by such clients, issue 15)."""
        if self.unrestricted:
            return True
        if self.organization is not None or self.patient is not None or self.user is not None:
            return False
        return any(p.context == "system" for p in self.matching(resource_type, letter))

    def require(self, resource_type: str, letter: str) -> None:
        """403 unless some permission covers the interaction (SMART scopes)."""
        if not self.allows(resource_type, letter):
            raise Forbidden(
                f"the access token does not allow {INTERACTION_NAMES[letter]} on {resource_type}",
            )

    def is_limited(self, resource_type: str, letter: str) -> bool:
        """Whether ``condition`` would return a condition (cheap test for the fast paths)."""
        if self.unrestricted:
            return False
        if self.organization is not None or resource_type in OWNED_TYPES:
            return True
        if self.user_limits(resource_type, letter):
            return True
        return not any(_is_open(resource_type, p) for p in self.matching(resource_type, letter))

    def condition(
        self, compiler: ConditionCompiler, alias: str, resource_type: str, letter: str
    ) -> Node | None:
        """The rows ``alias`` of ``resource_type`` that the token may use with ``letter``, as a
        condition tree (app/fhir/conditions.py); None when every row is allowed. 403 when no
        permission covers it. The same tree judges current rows and, rendered for older
        versions (conditions.py ``Older``), the older versions of a resource (history, vread)."""
        parts = self.condition_parts(compiler, alias, resource_type, letter)
        return all_of(parts) if parts else None

    def condition_parts(
        self, compiler: ConditionCompiler, alias: str, resource_type: str, letter: str
    ) -> list[Node]:
        """``condition`` as the parts it is the conjunction of (a search can drive its page from
        those that are sets of row ids, conditions.py ``rid_set``)."""
        if self.unrestricted:
            return []
        self.require(resource_type, letter)
        permissions = self.matching(resource_type, letter)
        open_permission = any(_is_open(resource_type, p) for p in permissions)
        alternatives: list[Node] = []
        if not open_permission:
            mark = compiler.bind_mark()
            for permission in permissions:
                parts = self._permission_parts(compiler, alias, resource_type, permission)
                if parts == []:  # implied by the person's limits, added below
                    compiler.bind_rollback(mark)  # the other alternatives' values
                    open_permission = True
                    alternatives = []
                    break
                if parts is not None:  # None: a restriction this type cannot express
                    alternatives.append(all_of(parts))
            if not alternatives and not open_permission:
                return [FALSE]
        clauses: list[Node] = [] if open_permission else [any_of(alternatives)]
        if resource_type in OWNED_TYPES:
            if letter != "c":  # a new one is its writer's (the write hook records the owner)
                clauses.append(self._owner_condition(compiler, alias))
        elif self.organization is not None:
            clauses.append(self._organization_condition(compiler, alias, resource_type, letter))
        if self.user_limits(resource_type, letter):
            if compiler.patient_column is not None:
                # A store without index rows names its rows' Patients itself (the audit store).
                patients = self.person_patients(compiler)
                clauses.append(Sql(f"{alias}.{compiler.patient_column} && {patients}"))
            else:
                clauses.append(self._user_condition(compiler, alias, resource_type, letter))
        return clauses

    # -- a person's limits (issue 11) ---------------------------------------------------------

    def _user_patients(self, compiler: ConditionCompiler, column: str) -> str:
        """``column`` (a Patient id) is one of the Patients whose compartment the person sees.

        A RelatedPerson's Patient and a Practitioner's caseload come from the database function
        ``carecoord_person_patients`` (migration 0018: RelatedPerson.patient while active; the
        subjects of the active CareTeams the practitioner or one of its roles is a participant
        of, and the patients of the active EpisodeOfCares it manages), called in a scalar
        subquery: PostgreSQL evaluates it once per statement, on every request, and looks the
        ids up in the indexes; the statement stays small to plan."""
        kind, ident = self.user_reference or ("", "")
        if kind == "Patient":
            return f"{column} = {compiler.bind(ident)}"
        if kind in ("RelatedPerson", "Practitioner"):
            return (
                f"{column} = ANY(CAST((SELECT carecoord_person_patients("
                f"{compiler.bind(kind)}, {compiler.bind(ident)})) AS text[]))"
            )
        return "FALSE"

    def person_patients(self, compiler: ConditionCompiler) -> str:
        """SQL ``text[]`` of the ids of the Patients whose compartment the person sees (for
        stores without index rows: the audit store's ``patient`` column, app/audit/fhir.py)."""
        kind, ident = self.user_reference or ("", "")
        if kind == "Patient":
            return f"CAST(ARRAY[{compiler.bind(ident)}] AS text[])"
        if kind in ("RelatedPerson", "Practitioner"):
            return (
                f"CAST((SELECT carecoord_person_patients({compiler.bind(kind)}, {compiler.bind(ident)}))"
                " AS text[])"
            )
        return "CAST(ARRAY[] AS text[])"

    @staticmethod
    def _names_practitioner(compiler: ConditionCompiler, alias: str, practitioner: str) -> str:
        """Reference row ``alias`` names the practitioner: itself, or one of its PractitionerRoles
        (``carecoord_practitioner_roles``, migration 0018: PractitionerRole.practitioner, not
        marked inactive)."""
        return (
            f"(({alias}.target_type = 'Practitioner' AND {alias}.target_id = {compiler.bind(practitioner)})"
            f" OR ({alias}.target_type = 'PractitionerRole' AND {alias}.target_id"
            f" = ANY(CAST((SELECT carecoord_practitioner_roles({compiler.bind(practitioner)})) AS text[]))))"
        )

    def _user_condition(
        self, compiler: ConditionCompiler, alias: str, resource_type: str, letter: str = "r"
    ) -> Node:
        """Rows ``alias`` of ``resource_type`` (a type of the Patient compartment) the person may
        see, as ``alias.rid IN (<rids>)``: a set of row ids, so that a search can cut its page
        from it like from any index condition (conditions.py ``rid_set``). Every subquery is
        uncorrelated and yields live rows of the type only; an older version is judged by its
        own references (a Patient: by its id). On a directory type (a write): the person's own
        resource only."""
        kind, ident = self.user_reference or ("", "")
        if resource_type != "Patient" and resource_type not in registry().patient_compartment:
            if resource_type != kind:
                return FALSE
            return Sql(f"{alias}.fhir_id = {compiler.bind(ident)}")
        sources: list[Identity | Index | Select] = []
        if resource_type == "Patient":
            sources.append(Identity("up", "'Patient'", self._user_patients(compiler, "up.fhir_id")))
        params = registry().patient_compartment.get(resource_type, ())
        if letter in ("u", "d"):
            # A person changes a record resource only when it is about one of its Patients (its
            # subject), not because it merely mentions one (a performer, a participant, a linked
            # Patient): otherwise a practitioner could add itself to the CareTeam of a Patient
            # outside its caseload that lists one of its Patients as a participant.
            params = tuple(p for p in params if p in SUBJECT_PARAMS) or params
        if params and resource_type != "Patient":
            # A Patient is a person's own by its id (above), not by a link from another Patient.
            where = (
                f"uk.resource_type = {compiler.bind(resource_type)}"
                f" AND uk.param = ANY({compiler.bind(list(params))}) AND uk.target_type = 'Patient'"
                f" AND {self._user_patients(compiler, 'uk.target_id')}"
            )
            sources.append(Index(alias, "search_reference", "uk", where))
        if kind == "Practitioner" and resource_type in OWN_WORK:
            where = (
                f"uw.resource_type = {compiler.bind(resource_type)}"
                f" AND uw.param = ANY({compiler.bind(list(OWN_WORK[resource_type]))})"
                f" AND {self._names_practitioner(compiler, 'uw', ident)}"
            )
            sources.append(Index(alias, "search_reference", "uw", where))
        return RowsIn(alias, tuple(sources)) if sources else FALSE

    def _owner_condition(self, compiler: ConditionCompiler, alias: str) -> Node:
        """Rows of an OWNED_TYPES type that this token's client created (app/subscriptions)."""
        if self.client_id is None or self.external:
            return FALSE
        client = compiler.bind(self.client_id)
        # Two people signed in to one app share its client id: a Subscription is its person's.
        user = (
            "own.owner_user IS NULL" if self.user is None else f"own.owner_user = {compiler.bind(self.user)}"
        )
        return Sql(
            f"EXISTS (SELECT 1 FROM subscription own WHERE own.fhir_id = {alias}.fhir_id"
            f" AND own.owner_client = {client} AND {user})"
        )

    def _permission_parts(
        self, compiler: ConditionCompiler, alias: str, resource_type: str, permission: Permission
    ) -> list[Node] | None:
        parts: list[Node] = []
        mark = compiler.bind_mark()
        if (
            permission.context == "patient"
            and self.patient is not None
            and compiler.in_patient_compartment(resource_type)
            # A Patient user's own compartment: the same rows as the person's limits.
            and self.user_reference != ("Patient", self.patient)
        ):
            parts.append(compiler.compartment(alias, resource_type, self.patient))
        for name, value in permission.restriction:
            try:
                clause = compiler.restriction(alias, resource_type, name, value)
            except FHIRError:
                clause = None
            if clause is None:
                compiler.bind_rollback(mark)  # drop the values bound for the discarded parts
                return None
            parts.append(clause)
        return parts

    def _organization_condition(
        self, compiler: ConditionCompiler, alias: str, resource_type: str, letter: str
    ) -> Node:
        """Rows a partner organisation's client may use with ``letter`` (module docstring).

        What grants read access is what others asked of the organisation: a Task it owns and
        did not request itself (while it is not cancelled, rejected or entered in error), the
        ServiceRequest that Task is about, and a ServiceRequest naming it as performer that
        someone else wrote (while it is not revoked or entered in error). Its own Tasks and
        ServiceRequests are visible to it but grant nothing: otherwise a partner could keep a patient's record
        open for itself, after the referral was cancelled or handed to someone else, by
        writing a ServiceRequest of its own that points at it (issue 15).

        Older versions (history, vread): a Task's or ServiceRequest's are the organisation's
        where they name it themselves (not because it wrote the current one: a reassigned
        Task's earlier owner's notes); what a referral grants, the ServiceRequest an asked Task
        is about included, is granted with its history (the grant concerns the resource)."""
        org = compiler.bind(self.organization)
        # Parts that cannot match the type are left out (the planner need not rule them out).
        own = Sql(f"{alias}.writer_org = {org}", older=resource_type not in dict(REFERRAL_ROOTS))
        if letter == "c":
            return own  # a new row carries its writer's organisation
        org_id = compiler.bind(self.organization_id)  # bound only when used: asyncpg types every one
        named = "o.target_type = 'Organization' AND o.target_id = " + org_id
        # Its Tasks: the organisation is their owner or requester.
        task_rows = f"{named} AND o.resource_type = 'Task' AND o.param IN ('owner', 'requester')"
        tasks = Index(alias, "search_reference", "o", task_rows)
        if letter in ("u", "d"):
            return Or((own, all_of([Sql(f"{alias}.resource_type = 'Task'"), RowsIn(alias, (tasks,))])))
        performing_rows = f"{named} AND o.resource_type = 'ServiceRequest' AND o.param = 'performer'"
        performing = Index(alias, "search_reference", "o", performing_rows)
        # A Task ended before the work (cancelled, rejected, entered in error) grants nothing more.
        asked_tasks = (
            f"SELECT o.rid FROM search_reference o WHERE {named} AND o.resource_type = 'Task'"
            " AND o.param = 'owner' AND NOT EXISTS (SELECT 1 FROM search_reference q"
            " WHERE q.rid = o.rid AND q.param = 'requester' AND q.target_type = 'Organization'"
            f" AND q.target_id = {org_id}) AND NOT EXISTS (SELECT 1 FROM search_token z"
            " WHERE z.rid = o.rid AND z.param = 'status'"
            " AND z.code IN ('cancelled', 'rejected', 'entered-in-error'))"
        )
        # The ServiceRequests those Tasks are about (Task.focus).
        focused = (
            "SELECT fs.rid FROM search_reference f JOIN resource fs"
            " ON fs.resource_type = f.target_type AND fs.fhir_id = f.target_id"
            " WHERE f.resource_type = 'Task' AND f.param = 'focus' AND f.target_type = 'ServiceRequest'"
            f" AND f.rid IN ({asked_tasks})"
        )
        asked_requests = (
            f"SELECT ps.rid FROM resource ps WHERE ps.rid IN ({performing.rows})"
            f" AND ps.writer_org IS DISTINCT FROM {org} AND NOT EXISTS (SELECT 1 FROM search_token z"
            " WHERE z.rid = ps.rid AND z.param = 'status' AND z.code IN ('revoked', 'entered-in-error'))"
        )
        granted = (
            "SELECT p.target_type, p.target_id FROM search_reference p"
            f" WHERE p.param = '{GRANT_PARAM}' AND (p.rid IN ({asked_tasks}) OR p.rid IN ({focused})"
            f" OR p.rid IN ({asked_requests}))"
        )
        parts: list[Node] = [own]
        if resource_type == "Organization":
            parts.append(Sql(f"{alias}.fhir_id = {org_id}"))
        # Its referral roots: named by the row's own references.
        if resource_type == "Task":
            parts.append(RowsIn(alias, (tasks,), per_row=True))
        if resource_type == "ServiceRequest":
            parts.append(RowsIn(alias, (performing,), per_row=True))
            # What its referrals grant: other rows' state.
            parts.append(RowsIn(alias, (Select(focused),)))
        parts.append(Sql(f"({alias}.resource_type, {alias}.fhir_id) IN ({granted})"))
        return Or(tuple(parts))

    def row_filter(
        self, compiler: ConditionCompiler, alias: str, letter: str, resource_types: tuple[str, ...]
    ) -> Node | None:
        """Rows of any of ``resource_types`` the token may use with ``letter`` (types it may
        not use at all are left out rather than refused: includes, system history)."""
        if self.unrestricted:
            return None
        allowed = [t for t in resource_types if self.allows(t, letter)]
        limited = [t for t in allowed if self.is_limited(t, letter)]
        if len(allowed) == len(resource_types) and not limited:
            return None
        open_types = [t for t in allowed if t not in limited]
        alternatives: list[Node] = []
        if open_types:
            alternatives.append(Sql(f"{alias}.resource_type = ANY({compiler.bind(open_types)})"))
        for resource_type in limited:
            parts = self.condition_parts(compiler, alias, resource_type, letter)
            of_type = Sql(f"{alias}.resource_type = {compiler.bind(resource_type)}")
            alternatives.append(all_of([of_type, *parts]))
        return any_of(alternatives)


def _is_open(resource_type: str, permission: Permission) -> bool:
    """A permission that allows every row of the type (no compartment, no restriction)."""
    compartment = permission.context == "patient" and (
        resource_type == "Patient" or resource_type in registry().patient_compartment
    )
    return not compartment and not permission.restriction


OPEN_ACCESS = AccessContext()
