"""FHIR operations (R4 operations.html): ``[base]/$name``, ``[base]/[type]/$name`` and
``[base]/[type]/[id]/$name``.

One registry holds every operation the server offers. An :class:`Operation` declares its name,
the levels and resource types it is invoked on, whether it changes state (then only POST; else
GET and POST), its input and output parameters (as its OperationDefinition does) and its
handler. From the registry come, so none of them can drift from the others:

- the routes (app/routers/fhir.py registers ``$name`` paths before the generic interaction and
  compartment routes, resolves the operation here and calls its handler),
- the OperationDefinition resources served at ``/fhir/OperationDefinition/{id}``
  (:func:`operation_definition`),
- the CapabilityStatement's ``rest.operation`` and ``rest.resource.operation``
  (app/fhir/capability.py),
- the OpenAPI paths (``docs_router``).

Registering an operation (a handler gets the request context, the type and id of the level it
was invoked on, None above, and the parsed in-parameters)::

    async def status(ctx: FhirContext, resource_type: str | None, fhir_id: str | None,
                     parameters: OperationParameters) -> Response:
        ...  # read through ctx.repo: it carries the caller's access

    SUBSCRIPTION_STATUS = Operation(
        name="status", title="Subscription status", description="...",
        levels=("type", "instance"), resource_types=("Subscription",), handler=status,
        parameters=(OperationParameter("ids", "in", "id", max="*"),
                    OperationParameter("return", "out", "Bundle", min=1)),
        base="http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status",
    )

and adding it to ``OPERATIONS`` in app/routers/fhir.py.

In-parameters (operations.html#request) come from the query string (GET, or primitives next to
a POST body) and from a POST body that is a ``Parameters`` resource, or, for an operation that
names a ``body_resource`` parameter, the resource itself. They are checked against the
declaration (names, types, cardinality, required codes) before the handler runs: an undeclared
or malformed parameter is a 400.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fastapi.responses import Response

from app.fhir.errors import BadRequest, MethodNotAllowed, NotSupported
from app.fhir.types import SERVED_TYPE_SET, SERVED_TYPES

if TYPE_CHECKING:
    from app.fhir.context import FhirContext

Level = Literal["system", "type", "instance"]
LEVELS: tuple[Level, ...] = ("system", "type", "instance")

PRIMITIVE_TYPES = frozenset(
    {
        "base64Binary",
        "boolean",
        "canonical",
        "code",
        "date",
        "dateTime",
        "decimal",
        "id",
        "instant",
        "integer",
        "markdown",
        "oid",
        "positiveInt",
        "string",
        "time",
        "unsignedInt",
        "uri",
        "url",
        "uuid",
    }
)
"""R4 datatypes.html primitive types (the only ones a URL can carry, operations.html#request)."""

DATA_TYPES = frozenset(
    {
        "Address",
        "Age",
        "Annotation",
        "Attachment",
        "CodeableConcept",
        "Coding",
        "ContactDetail",
        "ContactPoint",
        "Contributor",
        "Count",
        "DataRequirement",
        "Distance",
        "Dosage",
        "Duration",
        "Expression",
        "HumanName",
        "Identifier",
        "Meta",
        "Money",
        "ParameterDefinition",
        "Period",
        "Quantity",
        "Range",
        "Ratio",
        "Reference",
        "RelatedArtifact",
        "SampledData",
        "Signature",
        "Timing",
        "TriggerDefinition",
        "UsageContext",
    }
)
"""R4 complex data types a parameter may have (``value[x]``); other capitalised types are
resources (``resource``)."""

QUERY_ONLY = frozenset({"_format", "_pretty"})
"""http.html#parameters: accepted on every request, never operation parameters."""


@dataclass(frozen=True)
class OperationParameter:
    """One ``OperationDefinition.parameter``; an out-parameter made of ``parts`` has no type."""

    name: str
    use: Literal["in", "out"]
    type: str
    """A FHIR type: a primitive (``code``), a data type (``Meta``) or a resource type
    (``Resource`` for any)."""
    min: int = 0
    max: str = "1"
    documentation: str = ""
    value_set: str | None = None
    """Canonical of the required binding of a ``code`` parameter."""
    codes: tuple[str, ...] = ()
    """The codes of that binding: any other is refused with a 400."""
    parts: tuple[OperationParameter, ...] = ()
    """The parts of a composite out-parameter (``Parameters.parameter.part``)."""

    @property
    def kind(self) -> Literal["primitive", "datatype", "resource"]:
        if self.type in PRIMITIVE_TYPES:
            return "primitive"
        return "datatype" if self.type in DATA_TYPES else "resource"

    @property
    def value_key(self) -> str:
        """The ``Parameters.parameter`` element that carries it (``valueCode``, ``resource``)."""
        if self.kind == "resource":
            return "resource"
        return "value" + self.type[0].upper() + self.type[1:]

    def definition(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "use": self.use,
            "min": self.min,
            "max": self.max,
            "type": self.type,
        }
        if self.documentation:
            out["documentation"] = self.documentation
        if self.value_set:
            out["binding"] = {"strength": "required", "valueSet": self.value_set}
        if self.parts:
            del out["type"]  # operationdefinition.html: opd-1, a parameter has a type or parts
            out["part"] = [p.definition() for p in self.parts]
        return out


@dataclass(frozen=True)
class ParameterValue:
    """One in-parameter as given: a primitive's value (from a URL: its text), a data type's
    JSON object, or a resource."""

    name: str
    value: Any = None
    resource: dict[str, Any] | None = None

    def text(self) -> str | None:
        if isinstance(self.value, bool):
            return "true" if self.value else "false"
        return None if self.value is None or isinstance(self.value, dict) else str(self.value)


@dataclass(frozen=True)
class OperationParameters:
    """The in-parameters of one invocation, checked against the operation's declaration."""

    values: tuple[ParameterValue, ...] = ()

    def all(self, name: str) -> list[ParameterValue]:
        return [value for value in self.values if value.name == name]

    def first(self, name: str) -> ParameterValue | None:
        found = self.all(name)
        return found[0] if found else None

    def text(self, name: str) -> str | None:
        """A primitive parameter's value as text (None when absent)."""
        value = self.first(name)
        return value.text() if value else None

    def resource(self, name: str) -> dict[str, Any] | None:
        value = self.first(name)
        return value.resource if value else None


OperationHandler = Callable[["FhirContext", str | None, str | None, OperationParameters], Awaitable[Response]]


@dataclass(frozen=True)
class Operation:
    """One operation the server offers, and everything its OperationDefinition says."""

    name: str
    """The code, without ``$`` (``validate``)."""
    title: str
    description: str
    levels: tuple[Level, ...]
    handler: OperationHandler
    parameters: tuple[OperationParameter, ...] = ()
    resource_types: tuple[str, ...] = ()
    """The types of the type and instance levels; empty: every served type."""
    affects_state: bool = False
    """True: invoked with POST only (operations.html#request). False: also with GET, when
    every in-parameter is a primitive."""
    base: str | None = None
    """The canonical of the definition this one implements (the official HL7 one for a
    standard operation); the served definition has its own url under the server base, since
    it lists this server's resource types."""
    definition_id: str = ""
    """Id of the served OperationDefinition; default ``{name}`` (``Resource-validate`` style
    ids for standard operations)."""
    body_resource: str | None = None
    """The resource in-parameter that a POST body may be by itself instead of a Parameters
    resource (R4 Resource-validate: the resource to validate)."""
    ok_schema: str = "Parameters"
    """OpenAPI schema of a 200 answer: ``Parameters``, a resource type or ``{type}``."""
    errors: tuple[int, ...] = (400, 404, 405)
    """Statuses of the OperationOutcomes the OpenAPI document lists for it."""
    query_only: tuple[str, ...] = ()
    """Query-string parameters the server writes into its own links (a paging ``_cursor``):
    accepted in the URL and handed to the handler, but not parameters of the OperationDefinition
    (search.html#paging: the server chooses how its next links carry their state)."""
    get_allowed: bool = False
    """Offered with GET too although an in-parameter is not a primitive (that one then travels
    only in a POST body): Bulk Data ``$export`` is kicked off by GET, and ``patient`` (a
    Reference) is given by POST only (Bulk Data IG export.html)."""

    def __post_init__(self) -> None:
        if not self.levels or set(self.levels) - set(LEVELS):
            raise ValueError(f"${self.name}: levels must be some of {LEVELS}")
        unknown = set(self.resource_types) - SERVED_TYPE_SET
        if unknown:
            raise ValueError(f"${self.name}: {sorted(unknown)} are not served types (app/fhir/types.py)")
        if self.body_resource is not None and self.body_resource not in {
            p.name for p in self.inputs if p.kind == "resource"
        }:
            raise ValueError(f"${self.name}: body_resource must name a resource in-parameter")

    @property
    def id(self) -> str:
        return self.definition_id or self.name

    @property
    def types(self) -> tuple[str, ...]:
        """The resource types it is offered on (type and instance levels)."""
        if not ({"type", "instance"} & set(self.levels)):
            return ()
        return self.resource_types or SERVED_TYPES

    @property
    def inputs(self) -> tuple[OperationParameter, ...]:
        return tuple(p for p in self.parameters if p.use == "in")

    @property
    def methods(self) -> tuple[str, ...]:
        """operations.html#request: POST always; GET when it changes nothing and every
        in-parameter fits in a URL."""
        if self.affects_state or (
            not self.get_allowed and any(p.kind != "primitive" for p in self.inputs)
        ):
            return ("POST",)
        return ("GET", "POST")

    def offered(self, level: Level, resource_type: str | None) -> bool:
        return level in self.levels and (resource_type is None or resource_type in self.types)


class OperationRegistry:
    """The operations the server offers. One name may be offered by several operations at
    different levels or types, each with its own definition (Bulk Data ``$export``: system,
    ``Patient`` and ``Group/[id]``)."""

    def __init__(self, operations: Iterable[Operation] = ()) -> None:
        self.operations: list[Operation] = []
        for operation in operations:
            self.register(operation)

    def register(self, operation: Operation) -> Operation:
        for other in self.operations:
            if other.name == operation.name and _overlap(other, operation):
                raise ValueError(f"${operation.name} is registered twice at one level and type")
            if other.id == operation.id:
                raise ValueError(f"OperationDefinition/{operation.id} is used twice")
        self.operations.append(operation)
        return operation

    def __iter__(self) -> Iterator[Operation]:
        return iter(self.operations)

    def by_definition_id(self, definition_id: str) -> Operation | None:
        return next((o for o in self.operations if o.id == definition_id), None)

    def at(self, level: Level, resource_type: str | None = None) -> list[Operation]:
        """The operations offered at ``level`` (on ``resource_type``), by name."""
        return sorted((o for o in self.operations if o.offered(level, resource_type)), key=lambda o: o.name)

    def resolve(self, name: str, level: Level, resource_type: str | None, method: str) -> Operation:
        """The operation a request names: 404 not-supported when unknown or not offered at
        that level or on that type (as an unknown resource type is), 405 for another method."""
        named = [o for o in self.operations if o.name == name]
        shown = name[:64]
        if not named:
            raise NotSupported(f"unknown operation ${shown}")
        operation = next((o for o in named if o.offered(level, resource_type)), None)
        if operation is None:
            where = (
                f"on {resource_type}"
                if resource_type and any(level in o.levels for o in named)
                else f"at the {level} level"
            )
            raise NotSupported(f"${shown} is not offered {where}")
        allowed = operation.methods + (("HEAD",) if "GET" in operation.methods else ())
        if method not in allowed:
            raise MethodNotAllowed(
                f"${shown} is invoked with {' or '.join(operation.methods)}",
                headers={"Allow": ", ".join(allowed)},
            )
        return operation


def _overlap(one: Operation, other: Operation) -> bool:
    """Whether two operations are offered at some same level on some same type."""
    for level in set(one.levels) & set(other.levels):
        if level == "system" or set(one.types) & set(other.types):
            return True
    return False


# -- parameters ---------------------------------------------------------------------------------


def parse_parameters(
    operation: Operation, query: Sequence[tuple[str, str]], body: Any | None
) -> OperationParameters:
    """The in-parameters of an invocation (operations.html#request): primitives from the query
    string, and the parameters of a POST body (a Parameters resource, or the operation's
    ``body_resource`` by itself); ``body`` is the parsed JSON, None without a body."""
    declared = {p.name: p for p in operation.inputs}
    values: list[ParameterValue] = []
    for name, raw in query:
        if name in QUERY_ONLY:
            continue
        if name in operation.query_only:
            values.append(ParameterValue(name, raw))
            continue
        parameter = _declared(operation, declared, name)
        if parameter.kind != "primitive":
            raise BadRequest(
                f"${operation.name}: '{name}' is a {parameter.type}; send it in a POST Parameters body",
                expression=(name,),
            )
        values.append(ParameterValue(name, raw))
    if body is not None:
        values.extend(_body_values(operation, declared, body))
    for parameter in operation.inputs:
        given = [v for v in values if v.name == parameter.name]
        if parameter.max != "*" and len(given) > int(parameter.max):
            raise BadRequest(
                f"${operation.name}: '{parameter.name}' is given {len(given)} times"
                f" (at most {parameter.max})",
                expression=(parameter.name,),
            )
        if len(given) < parameter.min:
            raise BadRequest(
                f"${operation.name}: '{parameter.name}' is required",
                code="required",
                expression=(parameter.name,),
            )
        for value in given:
            if parameter.codes and value.text() not in parameter.codes:
                raise BadRequest(
                    f"${operation.name}: '{parameter.name}' must be one of {', '.join(parameter.codes)}",
                    code="code-invalid",
                    expression=(parameter.name,),
                )
    return OperationParameters(tuple(values))


def _declared(operation: Operation, declared: dict[str, OperationParameter], name: str) -> OperationParameter:
    parameter = declared.get(name)
    if parameter is None:
        known = ", ".join(declared) or "none"
        raise BadRequest(
            f"${operation.name} has no parameter '{name[:64]}' (its parameters: {known})",
            code="not-supported",
            expression=(name[:64],),
        )
    return parameter


def _body_values(
    operation: Operation, declared: dict[str, OperationParameter], body: Any
) -> list[ParameterValue]:
    if not isinstance(body, dict):
        raise BadRequest(f"the body of ${operation.name} must be a Parameters resource", code="structure")
    resource_type = body.get("resourceType")
    if resource_type != "Parameters":
        if operation.body_resource is not None and isinstance(resource_type, str):
            return [ParameterValue(operation.body_resource, resource=body)]
        raise BadRequest(f"the body of ${operation.name} must be a Parameters resource", code="structure")
    extra = set(body) - {"resourceType", "id", "meta", "implicitRules", "language", "parameter"}
    if extra:
        raise BadRequest(f"Parameters has no element {sorted(extra)[0][:64]}", code="structure")
    entries = body.get("parameter", [])
    if not isinstance(entries, list) or ("parameter" in body and not entries):
        raise BadRequest("Parameters.parameter must be a non-empty array", code="structure")
    values = []
    for position, entry in enumerate(entries):
        where = f"Parameters.parameter[{position}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadRequest(f"{where} must be an object with a name", code="structure", expression=(where,))
        parameter = _declared(operation, declared, entry["name"])
        carried = [key for key in entry if key not in ("name", "id", "extension", "modifierExtension")]
        if carried != [parameter.value_key]:
            raise BadRequest(
                f"{where} ('{parameter.name}', a {parameter.type}) must carry {parameter.value_key} only",
                code="structure",
                expression=(where,),
            )
        value = entry[parameter.value_key]
        if parameter.kind == "resource":
            if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
                raise BadRequest(
                    f"{where}.resource must be a resource", code="structure", expression=(where,)
                )
            values.append(ParameterValue(parameter.name, resource=value))
        else:
            expected = dict if parameter.kind == "datatype" else (str, bool, int, float)
            if not isinstance(value, expected) or value in ("", {}):
                raise BadRequest(
                    f"{where}.{parameter.value_key} is not a {parameter.type}", expression=(where,)
                )
            values.append(ParameterValue(parameter.name, value))
    return values


# -- OperationDefinition ------------------------------------------------------------------------


def _computable_name(code: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in code.replace("_", "-").split("-"))


def definition_url(operation: Operation, fhir_base: str) -> str:
    return f"{fhir_base}/OperationDefinition/{operation.id}"


def operation_definition(operation: Operation, fhir_base: str) -> dict[str, Any]:
    """The OperationDefinition (R4 operationdefinition.html) of a registered operation."""
    definition: dict[str, Any] = {
        "resourceType": "OperationDefinition",
        "id": operation.id,
        "url": definition_url(operation, fhir_base),
        "name": _computable_name(operation.name),
        "title": operation.title,
        "status": "active",
        "kind": "operation",
        "publisher": "carecoord",
        "description": operation.description,
        "affectsState": operation.affects_state,
        "code": operation.name,
    }
    if operation.types:
        definition["resource"] = list(operation.types)
    definition.update({level: level in operation.levels for level in LEVELS})
    if operation.base:
        definition["base"] = operation.base
    if operation.parameters:
        definition["parameter"] = [p.definition() for p in operation.parameters]
    return definition
