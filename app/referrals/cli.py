"""``carecoord partners ...``: partner credentials and delivery health on the command line.

Registered into app/cli.py's parser by :func:`add_partner_commands`. Every handler takes the
parsed ``args``, resolves (and migrates) the database as the other commands do, and returns
the exit status. Nothing printed or logged holds a secret.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from app.referrals.credentials import (
    ASSERTION_ALGS,
    CredentialsError,
    confirm_address,
    delete_credentials,
    endpoint_id_of,
    list_partners,
    set_credentials,
)

_ENDPOINT_EXISTS = "SELECT 1 FROM resource WHERE resource_type = 'Endpoint' AND fhir_id = $1 AND NOT deleted"


def add_partner_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``partners set-credentials | remove-credentials | list`` to the console script."""
    partners = commands.add_parser("partners", help="partner FHIR servers that receive referrals")
    partner_commands = partners.add_subparsers(dest="partners_command", required=True)

    credentials = partner_commands.add_parser(
        "set-credentials",
        help="store how carecoord authenticates to a partner Endpoint (replaces what was stored)",
    )
    credentials.add_argument("--endpoint", required=True, help="Endpoint/ID of the partner's FHIR endpoint")
    credentials.add_argument("--token-url", required=True, help="the partner's OAuth token endpoint")
    credentials.add_argument("--client-id", required=True, help="carecoord's client id at the partner")
    method = credentials.add_mutually_exclusive_group(required=True)
    method.add_argument(
        "--client-secret", help="client secret (client_secret_basic); '-' reads it from standard input"
    )
    method.add_argument("--private-key-file", help="PEM private key (SMART Backend Services private_key_jwt)")
    credentials.add_argument("--kid", help="the key id the partner registered the public key under")
    credentials.add_argument("--alg", choices=ASSERTION_ALGS, default="ES384", help="assertion algorithm")
    credentials.set_defaults(func=cmd_partners_set_credentials)

    remove = partner_commands.add_parser("remove-credentials", help="forget a partner Endpoint's credentials")
    remove.add_argument("--endpoint", required=True, help="Endpoint/ID")
    remove.set_defaults(func=cmd_partners_remove_credentials)

    confirm = partner_commands.add_parser(
        "confirm",
        help="bind a partner Endpoint's credentials to its current address (after checking the change)"
        " and resume the deliveries that wait for it",
    )
    confirm.add_argument("--endpoint", required=True, help="Endpoint/ID")
    confirm.set_defaults(func=cmd_partners_confirm)

    listing = partner_commands.add_parser(
        "list", help="partner Organizations with a FHIR endpoint, credentials and delivery health"
    )
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_partners_list)


def cmd_partners_set_credentials(args: argparse.Namespace) -> int:
    # app.cli imports this module to register the commands: import it here, not at the top.
    from app.cli import _settings_with_database, _with_connection, read_input_file
    from app.settings import get_settings

    secret: str | None = args.client_secret
    if secret == "-":  # noqa: S105  ("-" = read the secret from standard input)
        secret = sys.stdin.readline().rstrip("\r\n")
    pem = read_input_file(args.private_key_file, "private key file") if args.private_key_file else None
    settings = _settings_with_database(get_settings(), args)
    try:
        endpoint_id = endpoint_id_of(args.endpoint)

        async def store(conn: Any) -> str:
            if await conn.fetchval(_ENDPOINT_EXISTS, endpoint_id) is None:
                raise CredentialsError(f"no Endpoint/{endpoint_id} here: create the Endpoint first")
            stored = await set_credentials(
                conn,
                settings,
                endpoint_id=endpoint_id,
                token_url=args.token_url,
                client_id=args.client_id,
                client_secret=secret,
                private_key_pem=pem,
                kid=args.kid,
                alg=args.alg,
            )
            return stored.auth_method

        method = _with_connection(settings, store)
    except CredentialsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"credentials set for Endpoint/{endpoint_id} ({method})")
    return 0


def cmd_partners_remove_credentials(args: argparse.Namespace) -> int:
    from app.cli import _settings_with_database, _with_connection
    from app.settings import get_settings

    settings = _settings_with_database(get_settings(), args)
    endpoint_id = args.endpoint.removeprefix("Endpoint/")
    if not _with_connection(settings, lambda conn: delete_credentials(conn, endpoint_id)):
        print(f"error: no credentials for Endpoint/{endpoint_id}", file=sys.stderr)
        return 1
    print(f"removed the credentials of Endpoint/{endpoint_id}")
    return 0


def cmd_partners_confirm(args: argparse.Namespace) -> int:
    from app.cli import _settings_with_database, _with_connection
    from app.settings import get_settings

    settings = _settings_with_database(get_settings(), args)
    try:
        endpoint_id = endpoint_id_of(args.endpoint)
    except CredentialsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    address = _with_connection(settings, lambda conn: confirm_address(conn, endpoint_id))
    if address is None:
        print(f"error: Endpoint/{endpoint_id} has no credentials (or no address)", file=sys.stderr)
        return 1
    print(f"credentials of Endpoint/{endpoint_id} now bound to {address}; paused deliveries resumed")
    return 0


def cmd_partners_list(args: argparse.Namespace) -> int:
    from app.cli import _settings_with_database, _with_connection
    from app.settings import get_settings

    settings = _settings_with_database(get_settings(), args)
    partners = _with_connection(settings, list_partners)
    if args.json:
        print(json.dumps([partner.summary() for partner in partners]))
        return 0
    for partner in partners:
        health = (
            "deliveries: -"
            if partner.pending is None
            else f"deliveries: pending={partner.pending} paused={partner.paused} failed={partner.failed}"
            f" delivered={partner.delivered}"
        )
        changed = (
            f"  ADDRESS CHANGED (credentials are for {partner.confirmed_address or 'no address'};"
            f" check it, then: carecoord partners confirm --endpoint Endpoint/{partner.endpoint_id})"
            if partner.address_changed
            else ""
        )
        print(
            f"Organization/{partner.organization_id}  {partner.name or '-'!r}  Endpoint/{partner.endpoint_id}"
            f"  {partner.address}  credentials={partner.credentials or 'none'}  {health}{changed}"
        )
    return 0
