"""Load the Questionnaires carecoord ships (app/casework/ahc_hrsn.py) at start-up.

Each is a conditional create on ``url`` and ``version`` (http.html#ccreate) through a system
repository: idempotent, and safe when several processes start at once (the conditional
create's advisory lock serialises them). A Questionnaire an operator changed or retired under
the same url and version is left as it is.
"""

from __future__ import annotations

import logging
from urllib.parse import urlencode

from asyncpg import Pool

from app.casework.ahc_hrsn import BUILT_IN
from app.fhir.conditional import conditional_create
from app.fhir.repository import RepositoryFactory

logger = logging.getLogger(__name__)


async def load_questionnaires(pool: Pool, repositories: RepositoryFactory) -> int:
    """Create the shipped Questionnaires that are missing; how many were created."""
    created = 0
    async with pool.acquire() as connection, connection.transaction():
        repo = repositories.for_system(connection)
        for (url, version), build in BUILT_IN.items():
            condition = urlencode({"url": url, "version": version})
            stored, new = await conditional_create(repo, "Questionnaire", build(), condition)
            if new:
                created += 1
                logger.info("loaded Questionnaire/%s (%s|%s)", stored.fhir_id, url, version)
    return created
