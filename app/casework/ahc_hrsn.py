"""The CMS Accountable Health Communities (AHC) Health-Related Social Needs (HRSN) screening
tool, core questions (LOINC panel 96777-8), as an SDC Questionnaire with extraction rules.

The tool is a work of the US government (CMS, 2017) and in the public domain; the LOINC codes
are used under the LOINC licence (Regenstrief Institute). Item codes and answer codes are
those of LOINC panel 96777-8 (the same the LHC-Forms rendition and the SHIN-NY HRSN IG use);
answer lists: LL5876-9-style housing answers, the Hunger Vital Sign answers the SDOH Clinical
Care IG's HVS Questionnaire uses, yes/no, and the HITS frequency answers.

Extraction rules (app/casework/extract.py):

- every question carries ``sdc-questionnaire-observationExtract`` (SDC observation-based
  extraction, http://hl7.org/fhir/uv/sdc/extraction.html#observation-based-extraction) and
  ``sdc-questionnaire-observation-extract-category`` with the categories the SDOH Clinical
  Care IG gives screening-response Observations: ``social-history``, ``survey``, US Core
  ``sdoh`` and the SDOHCC domain (SDOHCC-CodeSystemTemporaryCodes);
- the answers that indicate a need carry carecoord's ``questionnaire-conditionExtract``
  (:data:`CONDITION_EXTRACT`): a candidate Condition (``verificationStatus`` unconfirmed,
  category ``health-concern`` and ``sdoh``) with SNOMED CT / ICD-10-CM codes of the Gravity
  Project's diagnosis value sets that the SDOH Clinical Care IG binds SDOHCC-Condition to: food
  insecurity 733423003 / Z59.41, homelessness 32911000 / Z59.00, housing instability
  1156191002 / Z59.811 and transportation insecurity 713458007 / Z59.82. (The IG's older
  examples and maps, SDOHCC-ConditionFoodInsecurityExample and -HomelessExample, code Z59.4 and
  Z59.0: since ICD-10-CM FY2022 and FY2024 those are categories, not billable codes, and the
  value sets list their children instead.) The IG expresses the same rules as StructureMaps
  (sdc-questionnaire-targetStructureMap); carecoord declares them as data on the item instead
  of running FHIR Mapping Language.

Housing quality (96778-6), utilities (96779-4) and safety (95615-1 ... 95618-5) answers become
Observations only: the IG publishes no Condition example for them, and a safety concern is for
the person doing the screening to take up, not for a rule.
"""

from __future__ import annotations

from typing import Any

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
SDOHCC_CODES = "http://hl7.org/fhir/us/sdoh-clinicalcare/CodeSystem/SDOHCC-CodeSystemTemporaryCodes"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
US_CORE_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-category"

OBSERVATION_EXTRACT = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-observationExtract"
OBSERVATION_EXTRACT_CATEGORY = (
    "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-observation-extract-category"
)
CONDITION_EXTRACT = "http://carecoord.org/fhir/StructureDefinition/questionnaire-conditionExtract"
"""carecoord's extension on a Questionnaire item: when an answer is one of its ``answer``
codings, extraction proposes a Condition with its ``code`` (and the SDOH domain ``category``)
for a person to confirm. Sub-extensions: ``answer`` (Coding, 1..*), ``code`` (CodeableConcept,
1..1), ``category`` (Coding, 0..*)."""

URL = "http://carecoord.org/fhir/Questionnaire/ahc-hrsn-screening"
VERSION = "1.1.0"
"""1.1.0: the food insecurity and homelessness Conditions carry ICD-10-CM Z59.41 and Z59.00."""

_HOUSING = [
    ("LA31993-1", "I have a steady place to live"),
    ("LA31994-9", "I have a place to live today, but I am worried about losing it in the future"),
    (
        "LA31995-6",
        "I do not have a steady place to live (I am temporarily staying with others, in a hotel, in a"
        " shelter, living outside on the street, on a beach, in a car, abandoned building, bus or train"
        " station, or in a park)",
    ),
]
_HOUSING_PROBLEMS = [
    ("LA31996-4", "Pests such as bugs, ants, or mice"),
    ("LA28580-1", "Mold"),
    ("LA31997-2", "Lead paint or pipes"),
    ("LA31998-0", "Lack of heat"),
    ("LA31999-8", "Oven or stove not working"),
    ("LA32000-4", "Smoke detectors missing or not working"),
    ("LA32001-2", "Water leaks"),
    ("LA9-3", "None of the above"),
]
_HUNGER = [("LA28397-0", "Often true"), ("LA6729-3", "Sometimes true"), ("LA28398-8", "Never true")]
_YES_NO = [("LA33-6", "Yes"), ("LA32-8", "No")]
_UTILITIES = [*_YES_NO, ("LA32002-0", "Already shut off")]
_FREQUENCY = [
    ("LA6270-8", "Never"),
    ("LA10066-1", "Rarely"),
    ("LA10082-8", "Sometimes"),
    ("LA16644-9", "Fairly often"),
    ("LA6482-9", "Frequently"),
]
_ORDINAL = "http://hl7.org/fhir/StructureDefinition/ordinalValue"

_DOMAINS = {
    "food-insecurity": "Food Insecurity",
    "housing-instability": "Housing Instability",
    "homelessness": "Homelessness",
    "inadequate-housing": "Inadequate Housing",
    "transportation-insecurity": "Transportation Insecurity",
    "utility-insecurity": "Utility Insecurity",
    "sdoh-category-unspecified": "SDOH Category Unspecified",
}

FOOD_INSECURITY = (
    (SNOMED, "733423003", "Food insecurity"),
    (ICD10CM, "Z59.41", "Food insecurity"),
)
HOMELESSNESS = ((SNOMED, "32911000", "Homeless"), (ICD10CM, "Z59.00", "Homelessness, unspecified"))
HOUSING_INSTABILITY = (
    (SNOMED, "1156191002", "Housing instability"),
    (ICD10CM, "Z59.811", "Housing instability, housed, with risk of homelessness"),
)
TRANSPORTATION_INSECURITY = (
    (SNOMED, "713458007", "Lack of access to transportation"),
    (ICD10CM, "Z59.82", "Transportation insecurity"),
)


def _coding(system: str, code: str, display: str) -> dict[str, str]:
    return {"system": system, "code": code, "display": display}


def _domain(code: str) -> dict[str, str]:
    return _coding(SDOHCC_CODES, code, _DOMAINS[code])


def _categories(domains: tuple[str, ...]) -> list[dict[str, Any]]:
    codings = [
        _coding(OBSERVATION_CATEGORY, "social-history", "Social History"),
        _coding(OBSERVATION_CATEGORY, "survey", "Survey"),
        _coding(US_CORE_CATEGORY, "sdoh", "SDOH"),
        *(_domain(d) for d in domains),
    ]
    return [{"url": OBSERVATION_EXTRACT_CATEGORY, "valueCodeableConcept": {"coding": [c]}} for c in codings]


def _condition_rule(
    answers: tuple[str, ...], code: tuple[tuple[str, str, str], ...], domain: str
) -> dict[str, Any]:
    return {
        "url": CONDITION_EXTRACT,
        "extension": [
            *({"url": "answer", "valueCoding": {"system": LOINC, "code": a}} for a in answers),
            {"url": "code", "valueCodeableConcept": {"coding": [_coding(*c) for c in code]}},
            {"url": "category", "valueCoding": _domain(domain)},
        ],
    }


def _item(
    code: str,
    display: str,
    text: str,
    answers: list[tuple[str, str]],
    domains: tuple[str, ...],
    *,
    repeats: bool = False,
    conditions: tuple[dict[str, Any], ...] = (),
    ordinal: bool = False,
) -> dict[str, Any]:
    options = []
    for position, (answer, label) in enumerate(answers, start=1):
        coding: dict[str, Any] = _coding(LOINC, answer, label)
        if ordinal:
            coding["extension"] = [{"url": _ORDINAL, "valueDecimal": position}]
        options.append({"valueCoding": coding})
    item: dict[str, Any] = {
        "extension": [
            {"url": OBSERVATION_EXTRACT, "valueBoolean": True},
            *_categories(domains),
            *conditions,
        ],
        "linkId": f"/{code}",
        "code": [_coding(LOINC, code, display)],
        "text": text,
        "type": "choice",
        "required": False,
        "answerOption": options,
    }
    if repeats:
        item["repeats"] = True
    return item


def questionnaire() -> dict[str, Any]:
    """The Questionnaire carecoord loads at start-up (app/casework/loader.py)."""
    safety = "sdoh-category-unspecified"
    return {
        "resourceType": "Questionnaire",
        "meta": {"profile": ["http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-extr-obsn"]},
        "url": URL,
        "version": VERSION,
        "name": "AHCHRSNScreening",
        "title": "AHC HRSN screening tool: core questions",
        "status": "active",
        "subjectType": ["Patient"],
        "publisher": "carecoord",
        "description": (
            "The CMS Accountable Health Communities Health-Related Social Needs screening tool"
            " (LOINC 96777-8), core questions: living situation, food, transportation, utilities and"
            " safety, with SDC observation-based extraction and candidate SDOH Conditions."
        ),
        "copyright": (
            "The AHC HRSN screening tool is a work of the Centers for Medicare & Medicaid Services and"
            " in the public domain. LOINC codes are copyright Regenstrief Institute, Inc. and used under"
            " the LOINC licence (https://loinc.org/license/)."
        ),
        "code": [
            _coding(
                LOINC,
                "96777-8",
                "Accountable health communities (AHC) health-related social needs screening (HRSN) tool",
            )
        ],
        "item": [
            _item(
                "71802-3",
                "Housing status",
                "What is your living situation today?",
                _HOUSING,
                ("housing-instability", "homelessness"),
                conditions=(
                    _condition_rule(("LA31994-9",), HOUSING_INSTABILITY, "housing-instability"),
                    _condition_rule(("LA31995-6",), HOMELESSNESS, "homelessness"),
                ),
            ),
            _item(
                "96778-6",
                "Problems with place where you live",
                "Think about the place you live. Do you have problems with any of the following?",
                _HOUSING_PROBLEMS,
                ("inadequate-housing",),
                repeats=True,
            ),
            _item(
                "88122-7",
                "Within the past 12 months we worried whether our food would run out before we got money"
                " to buy more",
                "Within the past 12 months, you worried that your food would run out before you got money"
                " to buy more.",
                _HUNGER,
                ("food-insecurity",),
                conditions=(_condition_rule(("LA28397-0", "LA6729-3"), FOOD_INSECURITY, "food-insecurity"),),
            ),
            _item(
                "88123-5",
                "Within the past 12 months the food we bought just didn't last and we didn't have money"
                " to get more",
                "Within the past 12 months, the food you bought just didn't last and you didn't have money"
                " to get more.",
                _HUNGER,
                ("food-insecurity",),
                conditions=(_condition_rule(("LA28397-0", "LA6729-3"), FOOD_INSECURITY, "food-insecurity"),),
            ),
            _item(
                "93030-5",
                "Has lack of transportation kept you from medical appointments, meetings, work, or from"
                " getting things needed for daily living",
                "In the past 12 months, has lack of reliable transportation kept you from medical"
                " appointments, meetings, work or from getting things needed for daily living?",
                _YES_NO,
                ("transportation-insecurity",),
                conditions=(
                    _condition_rule(("LA33-6",), TRANSPORTATION_INSECURITY, "transportation-insecurity"),
                ),
            ),
            _item(
                "96779-4",
                "Has the electric, gas, oil, or water company threatened to shut off services in your"
                " home in past 12 months",
                "In the past 12 months has the electric, gas, oil, or water company threatened to shut off"
                " services in your home?",
                _UTILITIES,
                ("utility-insecurity",),
            ),
            _item(
                "95618-5",
                "Physically hurt you [HITS]",
                "How often does anyone, including family and friends, physically hurt you?",
                _FREQUENCY,
                (safety,),
                ordinal=True,
            ),
            _item(
                "95617-7",
                "Insult you or talk down to you [HITS]",
                "How often does anyone, including family and friends, insult or talk down to you?",
                _FREQUENCY,
                (safety,),
                ordinal=True,
            ),
            _item(
                "95616-9",
                "Threaten you with physical harm [HITS]",
                "How often does anyone, including family and friends, threaten you with harm?",
                _FREQUENCY,
                (safety,),
                ordinal=True,
            ),
            _item(
                "95615-1",
                "Scream or curse at you [HITS]",
                "How often does anyone, including family and friends, scream or curse at you?",
                _FREQUENCY,
                (safety,),
                ordinal=True,
            ),
        ],
    }


BUILT_IN = {(URL, VERSION): questionnaire}
"""The Questionnaires carecoord ships, by (url, version)."""
