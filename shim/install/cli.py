"""``pyshim install`` / ``pyshim uninstall``: argv, the root check, and errors as messages."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from shim.install.errors import InstallError
from shim.install.plan import Settings, carry_out, plan_install, plan_uninstall


def _parser() -> argparse.ArgumentParser:
    paths = argparse.ArgumentParser(add_help=False)
    paths.add_argument("--dry-run", action="store_true", help="print the actions, change nothing")
    paths.add_argument(
        "--containerd", metavar="PATH", help="containerd binary (default: the one on PATH)"
    )
    for option, metavar, default in (
        ("--config", "PATH", "/etc/containerd/config.toml"),
        ("--drop-in-dir", "DIR", "/etc/containerd/conf.d"),
        ("--bin-dir", "DIR", "/usr/local/bin"),
        ("--runsc-config", "PATH", "/etc/containerd/runsc.toml"),
    ):
        paths.add_argument(
            option, metavar=metavar, type=Path, default=Path(default), help=f"default: {default}"
        )
    parser = argparse.ArgumentParser(
        prog="pyshim", description="Register pyshim's shims with this node's containerd."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser(
        "install", parents=[paths], help="link the shims, write the CRI handlers' drop-in"
    )
    install.add_argument(
        "--add-import",
        action="store_true",
        help="add DROP_IN_DIR/*.toml to the main config's imports (after a backup)",
    )
    commands.add_parser(
        "uninstall",
        parents=[paths],
        help="remove the symlinks and the drop-in (ignores --containerd)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings(
        config=args.config.absolute(),
        drop_in_dir=args.drop_in_dir.absolute(),
        bin_dir=args.bin_dir.absolute(),
        runsc_config=args.runsc_config.absolute(),
        containerd=args.containerd,
        add_import=getattr(args, "add_import", False),
    )
    try:
        if not args.dry_run and os.geteuid() != 0:
            raise InstallError("run it as root (--dry-run shows what it would do)")
        plan = plan_install(settings) if args.command == "install" else plan_uninstall(settings)
        carry_out(plan, sys.stdout, args.dry_run)
    except InstallError as exc:
        print(f"pyshim {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0
