"""The Alembic migrations create exactly the schema the SQLModel tables describe."""

from __future__ import annotations

from alembic.config import Config

from alembic import command
from app.db import REPO_ROOT


def test_models_and_migrations_agree(database_url: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(REPO_ROOT / "alembic"))
    config.attributes["database_url"] = database_url
    command.check(config)  # raises when an autogenerate diff exists
