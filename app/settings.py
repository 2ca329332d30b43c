"""The one place the environment is read.

Every setting is a field of :class:`Settings`; nothing else in the code base
looks at ``os.environ``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.outbound import parse_allowlist


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
    max_bundle_resources: int = Field(
        default=10000,
        ge=1,
        description="Most resources one batch or transaction response carries (reads and search results"
        " together); entries beyond it are refused with 400 too-costly",
    )
    search_max_parameters: int = Field(
        default=30, ge=1, description="Most search parameters (each repetition counts) and _sort keys"
    )
    search_max_values: int = Field(
        default=1000, ge=1, description="Most values (comma-separated OR values count one each) per search"
    )
    search_max_chain_depth: int = Field(default=3, ge=1, description="Most hops of one chain or _has nesting")
    search_max_has: int = Field(default=3, ge=0, description="Most _has conditions per search")
    search_max_includes: int = Field(
        default=10, ge=0, description="Most _include/_revinclude directives per search"
    )
    search_max_bind_values: int = Field(
        default=5000, ge=100, le=30000, description="Most bind values of one compiled search statement"
    )
    db_statement_timeout: float = Field(
        default=30,
        gt=0,
        description="Seconds one SQL statement may run before PostgreSQL cancels it (statement_timeout)",
    )
    db_idle_in_transaction_timeout: float = Field(
        default=60,
        gt=0,
        description="Seconds a connection may sit idle inside a transaction before PostgreSQL ends it",
    )
    log_level: str = Field(default="info", description="Level of every logger (uvicorn's included)")
    log_format: Literal["json", "text"] = Field(
        default="json",
        description="Log lines on stderr: one JSON object each (json) or plain text for local development",
    )
    cors_origins: str = Field(
        default="*",
        description="Browser origins allowed to call the API (CORS): comma-separated origins, * for any,"
        " empty for none. Tokens travel in the Authorization header, never in cookies, so an origin"
        " gains nothing a token does not give it",
    )
    auth_enabled: bool = Field(
        default=True,
        description="Require SMART bearer tokens on /fhir (false only for local development and benchmarks)",
    )
    audit_enabled: bool = Field(default=True, description="Record an AuditEvent for every FHIR interaction")
    audit_retention: int = Field(
        default=2190,
        ge=1,
        description="Days AuditEvents are kept (the audit store drops a month's partition once all of it"
        " is older; default six years)",
    )
    audit_buffer_size: int = Field(
        default=10_000,
        ge=10,
        description="AuditEvents of reads and refusals held in memory before they are written; when"
        " full, requests wait (back-pressure) until the database has caught up",
    )
    audit_flush_interval: float = Field(
        default=0.25,
        gt=0,
        le=60,
        description="Seconds a buffered AuditEvent may wait before it is written (sooner when 500 are"
        " waiting; all are written at shutdown)",
    )
    token_ttl: int = Field(
        default=300, ge=30, le=86400, description="Lifetime of the access tokens /auth/token issues, seconds"
    )
    signing_key_max_age: int = Field(
        default=30 * 86400,
        ge=300,
        description="Age (seconds) after which the token signing key gets a successor (key rotation)",
    )
    trusted_issuers: list[dict[str, str]] = Field(
        default_factory=list,
        description=(
            'JSON list of external token issuers, each {"issuer": ..., "jwks_url": ..., "audience": ...}'
            " (audience defaults to the FHIR base)"
        ),
    )
    auth_failure_limit: int = Field(
        default=10,
        ge=1,
        description="Failed /auth/token, /auth/revoke and /auth/introspect requests per address, and"
        " per client at an address, within auth_failure_window before 429 (counted in the database:"
        " all processes)",
    )
    auth_failure_window: int = Field(default=60, ge=1, description="Window of auth_failure_limit, seconds")
    login_failure_limit: int = Field(
        default=5,
        ge=1,
        description="Failed sign-ins at /auth/authorize per username, and per source address, within"
        " login_failure_window before sign-in is refused (counted in the database: all processes)",
    )
    login_failure_window: int = Field(
        default=900, ge=1, description="Window of login_failure_limit, seconds"
    )
    refresh_token_ttl: int = Field(
        default=30 * 86400,
        ge=60,
        description="Lifetime of an offline_access refresh token, seconds (each refresh issues a new one)",
    )
    oidc_issuer: str | None = Field(
        default=None,
        description="Issuer URL of a trusted upstream OpenID Connect provider people may sign in with at"
        " /auth/authorize instead of a password (its discovery document is {issuer}/.well-known/"
        "openid-configuration); unset: password sign-in only",
    )
    oidc_client_id: str | None = Field(
        default=None, description="carecoord's client id at the upstream provider"
    )
    oidc_client_secret: str | None = Field(
        default=None, description="carecoord's client secret at the upstream provider (client_secret_basic)"
    )
    oidc_user_claim: str = Field(
        default="fhirUser",
        description="id_token claim naming the person's FHIR resource (Practitioner/ID, Patient/ID or"
        " RelatedPerson/ID, or an absolute URL ending so)",
    )
    oidc_scope: str = Field(default="openid", description="Scopes asked of the upstream provider")
    oidc_display_name: str = Field(
        default="your organisation's sign-in", description="Shown on the button: 'Sign in with ...'"
    )
    online_refresh_token_ttl: int = Field(
        default=12 * 3600,
        ge=60,
        description="Lifetime of an online_access refresh token, seconds (each refresh issues a new one)",
    )
    organization: str | None = Field(
        default=None,
        description="Organization/ID of the case-management organisation running this server: the role"
        " that clients without a partner organisation act in (referral Task state machine)",
    )
    secret_key: str | None = Field(
        default=None,
        description="Key for partner secrets at rest; unset = a key file in the data directory",
    )
    referral_poll_interval: float = Field(
        default=300, gt=0, description="Seconds between status polls of a partner's referral Task"
    )
    delivery_timeout: float = Field(default=30, gt=0, description="Seconds per partner request")
    delivery_backoff: float = Field(
        default=5, gt=0, description="First retry delay of a failed delivery, seconds (doubling)"
    )
    delivery_deadline: float = Field(
        default=259200, gt=0, description="Seconds after which an undelivered referral is marked failed"
    )
    worker_lease: float = Field(default=60, gt=0, description="Seconds a claimed job stays leased")
    worker_concurrency: int = Field(default=8, ge=1, description="Jobs one runner runs at once")
    reindex_batch: int = Field(
        default=500, ge=1, le=10000, description="Resources the reindex job re-indexes per transaction"
    )
    attachment_max_bytes: int = Field(
        default=1024 * 1024,
        ge=0,
        description="Largest decoded size of an inline attachment (Attachment.data) in a resource;"
        " larger ones are refused (413). Larger documents go by URL (Attachment.url)",
    )
    run_worker: bool = Field(
        default=True, description="Run the job runner inside each API process (serve --no-worker: false)"
    )
    goal_auto_status: bool = Field(
        default=False,
        description="Set Goal.achievementStatus to what Goal/$progress suggests whenever an Observation"
        " of one of its measures is written (a job; each change recorded with a Provenance)",
    )
    subscription_event_retention: float = Field(
        default=7 * 86400,
        gt=0,
        description="Seconds a subscription's events are kept for $events replay after they happened",
    )
    subscription_max_failures: int = Field(
        default=10,
        ge=1,
        description="Consecutive failed deliveries after which a Subscription goes to status error",
    )
    subscription_max_per_client: int = Field(
        default=50,
        ge=1,
        description="Subscriptions one client may have (each costs every write some matching work)",
    )
    subscription_poll_interval: float = Field(
        default=0.05,
        gt=0,
        description="Seconds between looks at the change feed for subscription events when it was empty",
    )
    subscription_ws_token_lifetime: float = Field(
        default=300,
        gt=0,
        le=86400,
        description="Seconds a websocket binding token ($get-ws-binding-token) stays valid; a socket"
        " bound with it is unbound when it expires unless the client binds again with a new one",
    )
    subscription_ws_send_timeout: float = Field(
        default=30,
        gt=0,
        description="Seconds a websocket's full send queue may wait for the client to read before the"
        " socket is closed (it recovers missed events with $events)",
    )
    export_file_max_resources: int = Field(
        default=100_000, ge=1, description="Most resources in one Bulk Data export NDJSON file"
    )
    export_chunk_resources: int = Field(
        default=5_000,
        ge=1,
        description="Resources an export job writes per checkpoint (one transaction; a killed worker"
        " resumes after the last one)",
    )
    export_dir: Path | None = Field(
        default=None,
        description="Directory, shared by every carecoord process, for Bulk Data export files;"
        " unset = the files are stored in PostgreSQL",
    )
    export_retention: float = Field(
        default=86400, gt=0, description="Seconds a Bulk Data export and its files are kept after kick-off"
    )
    export_concurrency: int = Field(
        default=2, ge=1, description="Bulk Data exports of one client that run at once (others queue)"
    )
    export_poll_interval: float = Field(
        default=2,
        ge=0,
        description="Seconds a client should wait between status polls of an export (Retry-After);"
        " polling faster is answered 429",
    )
    outbound_allowlist: str = Field(
        default="",
        description="Comma list of what outgoing requests may reach besides global addresses:"
        " host names (any port), host:port ([v6]:port) or CIDR networks (app/outbound.py)",
    )

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

    @field_validator("trusted_issuers")
    @classmethod
    def _issuer_entries(cls, value: list[dict[str, str]]) -> list[dict[str, str]]:
        for entry in value:
            if not entry.get("issuer") or not entry.get("jwks_url"):
                raise ValueError('each trusted issuer needs "issuer" and "jwks_url"')
            if not entry["jwks_url"].startswith(("https://", "http://")):
                raise ValueError("a trusted issuer's jwks_url must be an http(s) URL")
        return value

    @field_validator("outbound_allowlist")
    @classmethod
    def _outbound_entries(cls, value: str) -> str:
        """Refuse a malformed allowlist at startup, not at the first outgoing request."""
        parse_allowlist(value)
        return value.strip()

    @property
    def fhir_base(self) -> str:
        return f"{self.base_url}/fhir"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
