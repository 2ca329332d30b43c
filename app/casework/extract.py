"""``QuestionnaireResponse/$extract`` (SDC extraction.html, observation-based extraction).

A completed QuestionnaireResponse becomes a transaction Bundle:

- one Observation per answer of every item whose Questionnaire item (or an ancestor, or the
  Questionnaire) carries ``sdc-questionnaire-observationExtract`` = true and a ``code``
  (extraction.html#observation-based-extraction): ``code`` from the item, ``value[x]`` from the
  answer (Coding -> CodeableConcept, decimal -> Quantity, date -> dateTime, the others as they
  are), ``category`` from the nearest ``sdc-questionnaire-observation-extract-category``,
  ``subject``/``encounter``/``basedOn`` from the response, ``effectiveDateTime`` and
  ``issued`` its ``authored``, ``performer`` its ``author`` and ``source``, ``derivedFrom``
  the response (the SDOH Clinical Care IG's screening-response Observations);
- one candidate Condition per distinct code of carecoord's ``questionnaire-conditionExtract``
  rules an answer triggered (app/casework/ahc_hrsn.py): ``verificationStatus`` unconfirmed for
  a person to confirm, category ``health-concern`` + ``sdoh`` + the SDOH domain, ``evidence``
  the Observations that triggered it (SDOHCC-Condition, as the IG's HungerVitalSign map does).

The Bundle runs through the transaction machinery (app/fhir/bundles.py) on the request's
repository: the caller's access applies to every write and one failing entry writes nothing.
carecoord returns the ``transaction-response`` Bundle (the ids the Observations and
Conditions got). SDC's $extract only returns the extracted Bundle for the client to post;
``persist=false`` does exactly that (nothing is written). At the type level the response is
posted in a Parameters resource (``questionnaire-response``) and is stored in the same
transaction, so ``derivedFrom`` points at a stored resource.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi.responses import Response

from app.casework.ahc_hrsn import (
    BUILT_IN,
    CONDITION_EXTRACT,
    OBSERVATION_EXTRACT,
    OBSERVATION_EXTRACT_CATEGORY,
    US_CORE_CATEGORY,
)
from app.fhir import jsonio
from app.fhir.bundles import process_bundle
from app.fhir.conditional import find_ids
from app.fhir.context import FhirContext
from app.fhir.errors import BadRequest, BusinessRule
from app.fhir.operations import Operation, OperationParameter, OperationParameters
from app.fhir.responses import json_response
from app.fhir.validation import validate_resource

CONDITION_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/condition-category"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
EXTRACTABLE_STATUSES = ("completed", "amended")
EXTRACT_SYSTEM = "urn:carecoord:extract"
"""Identifier system of what ``$extract`` writes from a stored response: ``<response id>.<version>.<n>``."""
PERFORMER_TYPES = ("Practitioner", "PractitionerRole", "Organization", "CareTeam", "Patient", "RelatedPerson")


def _flag(node: dict[str, Any], url: str) -> bool | None:
    for extension in node.get("extension") or []:
        if isinstance(extension, dict) and extension.get("url") == url:
            return extension.get("valueBoolean") is True
    return None


def _categories(node: dict[str, Any]) -> list[dict[str, Any]] | None:
    found = [
        e["valueCodeableConcept"]
        for e in node.get("extension") or []
        if isinstance(e, dict)
        and e.get("url") == OBSERVATION_EXTRACT_CATEGORY
        and "valueCodeableConcept" in e
    ]
    return found or None


class _QuestionnaireItem:
    """A Questionnaire item with what it inherits from its ancestors (SDC: lower levels win)."""

    def __init__(self, item: dict[str, Any], extract: bool, categories: list[dict[str, Any]]) -> None:
        self.item = item
        own = _flag(item, OBSERVATION_EXTRACT)
        self.extract = extract if own is None else own
        self.categories = _categories(item) or categories
        self.options = {
            (o["valueCoding"].get("system"), o["valueCoding"].get("code"))
            for o in item.get("answerOption") or []
            if isinstance(o, dict) and isinstance(o.get("valueCoding"), dict)
        }
        self.condition_rules = [
            e
            for e in item.get("extension") or []
            if isinstance(e, dict) and e.get("url") == CONDITION_EXTRACT
        ]


def _index(questionnaire: dict[str, Any]) -> dict[str, _QuestionnaireItem]:
    found: dict[str, _QuestionnaireItem] = {}

    def walk(items: list[Any], extract: bool, categories: list[dict[str, Any]]) -> None:
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("linkId"), str):
                continue
            entry = _QuestionnaireItem(item, extract, categories)
            found[item["linkId"]] = entry
            walk(item.get("item") or [], entry.extract, entry.categories)

    walk(
        questionnaire.get("item") or [],
        bool(_flag(questionnaire, OBSERVATION_EXTRACT)),
        _categories(questionnaire) or [],
    )
    return found


def _answered(items: list[Any], path: str) -> Iterator[tuple[str, dict[str, Any], int, dict[str, Any]]]:
    """(FHIRPath, item, answer position, answer) of every answer, nested ones included."""
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        where = f"{path}.item[{position}]"
        for number, answer in enumerate(item.get("answer") or []):
            if isinstance(answer, dict):
                yield where, item, number, answer
                yield from _answered(answer.get("item") or [], f"{where}.answer[{number}]")
        yield from _answered(item.get("item") or [], where)


def _value(answer: dict[str, Any]) -> tuple[str, Any] | None:
    """Observation.value[x] of an answer (SDC extraction: answer types to Observation types)."""
    for key, value in answer.items():
        if not key.startswith("value"):
            continue
        kind = key[5:]
        if kind == "Coding":
            return "valueCodeableConcept", {"coding": [value]}
        if kind == "Decimal":
            return "valueQuantity", {"value": value}
        if kind in ("Date", "DateTime"):
            return "valueDateTime", value
        if kind in ("String", "Integer", "Boolean", "Time", "Quantity"):
            return key, value
        return None  # Attachment, Reference, Uri: not an Observation value
    return None


def _rule_parts(
    rule: dict[str, Any],
) -> tuple[set[tuple[Any, Any]], dict[str, Any] | None, list[dict[str, Any]]]:
    answers: set[tuple[Any, Any]] = set()
    code = None
    categories = []
    for part in rule.get("extension") or []:
        if not isinstance(part, dict):
            continue
        if part.get("url") == "answer" and isinstance(part.get("valueCoding"), dict):
            answers.add((part["valueCoding"].get("system"), part["valueCoding"].get("code")))
        elif part.get("url") == "code" and isinstance(part.get("valueCodeableConcept"), dict):
            code = part["valueCodeableConcept"]
        elif part.get("url") == "category" and isinstance(part.get("valueCoding"), dict):
            categories.append({"coding": [part["valueCoding"]]})
    return answers, code, categories


def _urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _reference_type(reference: Any) -> str | None:
    if not isinstance(reference, dict) or not isinstance(reference.get("reference"), str):
        return None
    parts = reference["reference"].split("/")
    return parts[-2] if len(parts) >= 2 else None


def extract_bundle(
    response: dict[str, Any],
    questionnaire: dict[str, Any],
    response_reference: str,
    source_key: str | None = None,
) -> dict[str, Any]:
    """The transaction Bundle (without the response itself) that ``response`` extracts to.

    Refuses (400) an answer to an item the Questionnaire does not have, or a coded answer that
    is not one of the item's answerOptions: nothing of a response that does not fit its
    Questionnaire is extracted.

    ``source_key`` (a stored response: ``ID.VERSION``) makes the extraction idempotent: each
    resource gets an identifier ``EXTRACT_SYSTEM|<source_key>.<n>`` (``n`` its place in the
    extraction) and is a conditional create on it (http.html#ccreate), so extracting one
    version of a response again creates nothing new and answers with the resources the first
    extraction wrote. An amended response (a new version) extracts anew."""
    numbering = itertools.count()

    def entry_of(resource: dict[str, Any], full_url: str) -> dict[str, Any]:
        request: dict[str, Any] = {"method": "POST", "url": resource["resourceType"]}
        if source_key is not None:
            value = f"{source_key}.{next(numbering)}"
            resource["identifier"] = [{"system": EXTRACT_SYSTEM, "value": value}]
            request["ifNoneExist"] = f"identifier={EXTRACT_SYSTEM}|{value}"
        return {"fullUrl": full_url, "resource": resource, "request": request}

    items = _index(questionnaire)
    if not isinstance(response.get("subject"), dict):
        raise BadRequest(
            "the QuestionnaireResponse has no subject",
            code="required",
            expression=("QuestionnaireResponse.subject",),
        )
    authored = response.get("authored")
    derived = {"reference": response_reference}
    performers = []
    for element in ("author", "source"):
        reference = response.get(element)
        if _reference_type(reference) in PERFORMER_TYPES and reference not in performers:
            performers.append(reference)
    entries: list[dict[str, Any]] = []
    conditions: dict[str, dict[str, Any]] = {}
    for where, item, number, answer in _answered(response.get("item") or [], "QuestionnaireResponse"):
        link_id = item.get("linkId")
        definition = items.get(link_id) if isinstance(link_id, str) else None
        if definition is None:
            raise BadRequest(
                f"{where}: linkId '{str(link_id)[:64]}' is not an item of the Questionnaire",
                expression=(f"{where}.linkId",),
            )
        coding = answer.get("valueCoding")
        if (
            definition.options
            and isinstance(coding, dict)
            and (coding.get("system"), coding.get("code")) not in definition.options
        ):
            raise BadRequest(
                f"{where}.answer[{number}]: {str(coding.get('code'))[:32]} is not an answer option"
                f" of item '{link_id}'",
                code="code-invalid",
                expression=(f"{where}.answer[{number}]",),
            )
        value = _value(answer)
        codes = definition.item.get("code")
        if not (definition.extract and codes and value):
            continue
        full_url = _urn()
        observation: dict[str, Any] = {"resourceType": "Observation", "status": "final"}
        if definition.categories:
            observation["category"] = definition.categories
        observation["code"] = {"coding": codes}
        if definition.item.get("text"):
            observation["code"]["text"] = definition.item["text"]
        for element in ("subject", "encounter", "basedOn"):
            if response.get(element):
                observation[element] = response[element]
        if authored:
            observation["effectiveDateTime"] = authored
            if "T" in authored:
                observation["issued"] = authored
        if performers:
            observation["performer"] = performers
        observation[value[0]] = value[1]
        observation["derivedFrom"] = [derived]
        entries.append(entry_of(observation, full_url))
        for rule in definition.condition_rules:
            answers, code, domain = _rule_parts(rule)
            if code is None or not isinstance(coding, dict):
                continue
            if (coding.get("system"), coding.get("code")) not in answers:
                continue
            key = jsonio.dumps(code).decode("utf-8")
            condition = conditions.get(key)
            if condition is None:
                condition = _condition(response, code, domain, authored)
                conditions[key] = condition
            condition["evidence"][0]["detail"].append({"reference": full_url})
    for condition in conditions.values():
        entries.append(entry_of(condition, _urn()))
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _condition(
    response: dict[str, Any], code: dict[str, Any], domain: list[dict[str, Any]], authored: str | None
) -> dict[str, Any]:
    condition: dict[str, Any] = {
        "resourceType": "Condition",
        "clinicalStatus": {"coding": [{"system": CONDITION_CLINICAL, "code": "active", "display": "Active"}]},
        "verificationStatus": {
            "coding": [{"system": CONDITION_VERIFICATION, "code": "unconfirmed", "display": "Unconfirmed"}]
        },
        "category": [
            {
                "coding": [
                    {"system": CONDITION_CATEGORY, "code": "health-concern", "display": "Health Concern"}
                ]
            },
            {"coding": [{"system": US_CORE_CATEGORY, "code": "sdoh", "display": "SDOH"}]},
            *domain,
        ],
        "code": code,
        "subject": response["subject"],
    }
    if response.get("encounter"):
        condition["encounter"] = response["encounter"]
    if authored:
        condition["onsetPeriod"] = {"start": authored}
        condition["recordedDate"] = authored
    condition["evidence"] = [{"detail": []}]
    return condition


async def _questionnaire(ctx: FhirContext, canonical: Any) -> dict[str, Any]:
    """The Questionnaire a response answers: a stored one the caller may read (by url and
    version), else one carecoord ships (app/casework/ahc_hrsn.py)."""
    if not isinstance(canonical, str) or not canonical:
        raise BadRequest(
            "the QuestionnaireResponse names no questionnaire",
            code="required",
            expression=("QuestionnaireResponse.questionnaire",),
        )
    url, _, version = canonical.partition("|")
    pairs = [("url", url)] + ([("version", version)] if version else [])
    if ctx.repo.access.allows("Questionnaire", "s"):
        ids = await find_ids(ctx.repo, "Questionnaire", pairs, 2, "r")
        if ids:
            body = (await ctx.repo.read("Questionnaire", ids[0])).body
            assert body is not None
            found: dict[str, Any] = jsonio.loads(body)
            return found
    for (built_url, built_version), build in BUILT_IN.items():
        if built_url == url and version in ("", built_version):
            return build()
    raise BusinessRule(
        f"the Questionnaire {canonical[:120]} is not known here",
        expression=("QuestionnaireResponse.questionnaire",),
    )


async def extract(
    ctx: FhirContext, resource_type: str | None, fhir_id: str | None, parameters: OperationParameters
) -> Response:
    """SDC QuestionnaireResponse-extract, observation-based (see the module docstring)."""
    given = parameters.resource("questionnaire-response")
    persist = parameters.text("persist") != "false"
    stored = None
    if fhir_id is not None:
        if given is not None:
            raise BadRequest(
                "QuestionnaireResponse/[id]/$extract extracts the stored response: do not send one",
                expression=("questionnaire-response",),
            )
        version = await ctx.repo.read("QuestionnaireResponse", fhir_id)
        assert version.body is not None
        response: dict[str, Any] = jsonio.loads(version.body)
        reference = f"QuestionnaireResponse/{fhir_id}"
        source_key = f"{fhir_id}.{version.version_id}"
    else:
        if given is None:
            raise BadRequest(
                "the QuestionnaireResponse to extract is missing",
                code="required",
                expression=("questionnaire-response",),
            )
        response = validate_resource(given, "QuestionnaireResponse")
        reference = _urn()
        source_key = None  # a new response each time: nothing extracted from it yet
        stored = {k: v for k, v in response.items() if k not in ("id", "meta")}
    if response.get("status") not in EXTRACTABLE_STATUSES:
        raise BusinessRule(
            "only a completed (or amended) QuestionnaireResponse is extracted",
            expression=("QuestionnaireResponse.status",),
        )
    questionnaire = await _questionnaire(ctx, response.get("questionnaire"))
    bundle = extract_bundle(response, questionnaire, reference, source_key)
    if stored is not None:
        entry = {
            "fullUrl": reference,
            "resource": stored,
            "request": {"method": "POST", "url": "QuestionnaireResponse"},
        }
        bundle["entry"].insert(0, entry)
    if not persist:
        return json_response(bundle, ctx.fmt)
    result = await process_bundle(
        ctx.repo,
        bundle,
        max_entries=ctx.settings.max_bundle_entries,
        conditional_delete_max=ctx.settings.conditional_delete_max,
        prefer=ctx.prefer,
        cursors=ctx.cursors,
        max_resources=ctx.settings.max_bundle_resources,
    )
    return json_response(result, ctx.fmt)


EXTRACT = Operation(
    name="extract",
    definition_id="QuestionnaireResponse-extract",
    base="http://hl7.org/fhir/uv/sdc/OperationDefinition/QuestionnaireResponse-extract",
    title="Extract Observations and candidate Conditions from a QuestionnaireResponse",
    description=(
        "SDC observation-based extraction (http://hl7.org/fhir/uv/sdc/extraction.html): every answer to"
        " an item marked sdc-questionnaire-observationExtract becomes an Observation (derivedFrom the"
        " response; subject, encounter, effective and performer from it; category from"
        " sdc-questionnaire-observation-extract-category), and answers matching a carecoord"
        " questionnaire-conditionExtract rule become Conditions with verificationStatus unconfirmed"
        " (health-concern, SDOH) for a person to confirm. The result is written as one transaction"
        " (all or nothing, with the caller's access) and the transaction-response Bundle is returned;"
        " persist=false returns the extracted transaction Bundle instead and writes nothing (SDC's"
        " behaviour). At the type level the response is posted in a Parameters resource and stored in"
        " the same transaction."
    ),
    levels=("type", "instance"),
    resource_types=("QuestionnaireResponse",),
    handler=extract,
    affects_state=True,
    ok_schema="Bundle",
    errors=(400, 403, 404, 405, 410, 413, 415, 422),
    parameters=(
        OperationParameter(
            "questionnaire-response",
            "in",
            "QuestionnaireResponse",
            documentation="The QuestionnaireResponse to extract (type level); the instance level extracts"
            " the stored one",
        ),
        OperationParameter(
            "persist",
            "in",
            "boolean",
            documentation="carecoord: false returns the extracted transaction Bundle without writing it"
            " (default true: written, transaction-response returned)",
        ),
        OperationParameter(
            "return",
            "out",
            "Bundle",
            min=1,
            documentation="The transaction-response Bundle (persist=false: the transaction Bundle)",
        ),
    ),
)
