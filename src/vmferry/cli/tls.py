"""``vmferry tls make-creds``, and the TLS flags of ``vmferry run`` (docs/tls.md)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from vmferry.controller import VmController
from vmferry.errors import ConfigError
from vmferry.migration import tls
from vmferry.migration.params import MigrationParameters
from vmferry.migration.tlscerts import DEFAULT_DAYS, make_creds


def add_parser(sub: Any) -> None:
    p = sub.add_parser("tls", help="TLS credentials for migration (test CA and certificates)")
    which = p.add_subparsers(dest="tls", required=True)
    mk = which.add_parser(
        "make-creds",
        help="make a test CA (if new) and a host's server and client certificates",
        description="Write QEMU's credential files (ca-cert.pem, server-cert.pem, "
        "server-key.pem, client-cert.pem, client-key.pem) into DIR, signed by the CA in "
        "--ca (made there on first use, kept for the next host). For labs and tests; see "
        "docs/tls.md for certificates from a real CA.",
    )
    mk.add_argument("dir", metavar="DIR", help="the credentials directory to write")
    mk.add_argument(
        "--ca", required=True, metavar="CA_DIR", help="the CA's directory (made if absent)"
    )
    mk.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME",
        help="a name or address sources use to reach this host (the server certificate's "
        "subjectAltName; the first is its CN); repeat for more",
    )
    mk.add_argument(
        "--client-name",
        default="",
        metavar="CN",
        help="this host's identity as a migration source: the client certificate's CN, "
        "which a destination's tls-authz lists (default: the first --host)",
    )
    mk.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})"
    )
    mk.add_argument(
        "--expired",
        action="store_true",
        help="make certificates that expired yesterday (to see a refusal)",
    )
    mk.add_argument(
        "--force",
        action="store_true",
        help="replace the credentials already in DIR (refused without it)",
    )
    mk.set_defaults(func=cmd_make_creds)


def cmd_make_creds(args: argparse.Namespace) -> int:
    paths = make_creds(
        Path(args.dir),
        Path(args.ca),
        list(args.host),
        args.client_name,
        days=args.days,
        expired=args.expired,
        force=args.force,
    )
    for path in paths:
        print(path)
    print(
        f"vmferry: credentials for {', '.join(args.host)} in {args.dir}, signed by the CA "
        f"in {args.ca}",
        file=sys.stderr,
    )
    return 0


# ---- vmferry run


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tls-creds",
        metavar="DIR",
        help="migrate over TLS with these x509 credentials (QEMU's file names): as a "
        "destination (--incoming tcp: or defer) refuse anything else; as a source, "
        "the migration parameter tls-creds",
    )
    p.add_argument(
        "--tls-authz",
        metavar="CN[,CN…]",
        help="with --incoming and --tls-creds: admit only sources whose client "
        "certificate has one of these common names",
    )


def apply_run_flags(args: argparse.Namespace, controller: VmController) -> tls.TlsServer | None:
    """Check the TLS flags now (files, key modes), set them as migration parameters, and
    return the destination's TLS for a direct ``--incoming tcp:``."""
    creds = os.path.abspath(args.tls_creds) if args.tls_creds else ""
    authz = args.tls_authz or ""
    if authz and not args.incoming:
        raise ConfigError("--tls-authz is for a destination (--incoming): it lists the sources")
    if not creds:
        if authz:
            raise ConfigError("--tls-authz needs --tls-creds: only a TLS client has an identity")
        return None
    controller.params = controller.params.updated({"tls-creds": creds, "tls-authz": authz})
    if not args.incoming:
        tls.TlsClient(creds, "")  # refused now, not when the migration starts
        return None
    if args.incoming.startswith("file:"):
        raise ConfigError("--tls-creds applies to --incoming tcp: (or defer), not to a file")
    return tls.server_for(creds, authz)


def incoming_tls(params: MigrationParameters) -> tls.TlsServer | None:
    """The destination's TLS for ``migrate-incoming`` (tls-creds set on the QMP socket)."""
    return tls.server_for(params.tls_creds, params.tls_authz)
