"""The one place the environment is read.

Every setting is a field of :class:`Settings`; nothing else in the code base
looks at ``os.environ``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """carecoord configuration, from environment variables (prefix ``CARECOORD_``)."""

    model_config = SettingsConfigDict(env_prefix="CARECOORD_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "CARECOORD_DATABASE_URL"),
        description="postgresql+asyncpg://user:pass@host:port/db; unset = embedded PostgreSQL",
    )
    base_url: str = Field(
        default="http://localhost:8000",
        description="Public URL of the server root; the FHIR base is {base_url}/fhir",
    )
    data_dir: Path = Field(default=Path("./.carecoord"), description="Embedded database and keys")
    max_body_bytes: int = Field(default=5 * 1024 * 1024, ge=1024, description="Largest request body")
    history_default_count: int = Field(default=50, ge=1)
    history_max_count: int = Field(default=1000, ge=1)
    db_pool_size: int = Field(default=10, ge=1)
    conditional_delete_max: int = Field(
        default=10, ge=1, description="Most resources one conditional delete may remove (1 = single only)"
    )
    max_bundle_entries: int = Field(default=1000, ge=1, description="Most entries in a batch or transaction")
    log_level: str = "info"
    auth_enabled: bool = Field(
        default=True,
        description="Require SMART bearer tokens on /fhir (false only for local development and benchmarks)",
    )
    audit_enabled: bool = Field(default=True, description="Record an AuditEvent for every FHIR interaction")

    @field_validator("base_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str | None) -> str | None:
        """Accept plain ``postgresql://`` URLs too; carecoord always talks asyncpg."""
        if not value:
            return None
        for prefix in ("postgresql://", "postgres://"):
            if value.startswith(prefix):
                return "postgresql+asyncpg://" + value[len(prefix) :]
        return value

    @property
    def fhir_base(self) -> str:
        return f"{self.base_url}/fhir"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
