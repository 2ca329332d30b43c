"""Case work on top of the FHIR store (issue 13 items 3-5): SDC extraction of screenings
(``QuestionnaireResponse/$extract``, the AHC HRSN screening shipped and loaded at start-up),
goal progress (``Goal/$progress``, ``CarePlan/$progress``, automatic ``achievementStatus``) and
referral metrics (``Task/$referral-metrics``)."""
