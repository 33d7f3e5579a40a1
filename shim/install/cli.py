"""``pyshim install | uninstall | assets | templates``: argv, the root check, and errors as
messages."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from shim.install.errors import InstallError
from shim.install.plan import Settings, plan_install, plan_uninstall
from shim.install.steps import Plan, carry_out
from shim.install.templates import list_templates, remove_templates
from shim.install.vmassets import plan_assets
from shim.vm.assets import VmAssets
from shim.vm.templates import TemplateStore


def _parser() -> argparse.ArgumentParser:
    dry_run = argparse.ArgumentParser(add_help=False)
    dry_run.add_argument("--dry-run", action="store_true", help="print the actions, change nothing")
    assets_dir = argparse.ArgumentParser(add_help=False)
    assets_dir.add_argument(
        "--assets-dir",
        metavar="DIR",
        type=Path,
        default=VmAssets.DEFAULT_ROOT,
        help=f"the VM backend's kernel, images and templates (default: {VmAssets.DEFAULT_ROOT})",
    )
    paths = argparse.ArgumentParser(add_help=False, parents=[dry_run, assets_dir])
    paths.add_argument(
        "--containerd", metavar="PATH", help="containerd binary (default: the one on PATH)"
    )
    for option, metavar, default in (
        ("--config", "PATH", "/etc/containerd/config.toml"),
        ("--drop-in-dir", "DIR", "/etc/containerd/conf.d"),
        ("--bin-dir", "DIR", "/usr/local/bin"),
        ("--runsc-config", "PATH", "/etc/containerd/runsc.toml"),
        ("--pykata-config", "PATH", "/etc/containerd/pykata.toml"),
    ):
        paths.add_argument(
            option, metavar=metavar, type=Path, default=Path(default), help=f"default: {default}"
        )
    parser = argparse.ArgumentParser(
        prog="pyshim", description="Register pyshim's shims with this node's containerd."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser(
        "install",
        parents=[paths],
        help="link the shims, write the CRI handlers' drop-in, set up the VM's assets",
    )
    install.add_argument(
        "--add-import",
        action="store_true",
        help="add DROP_IN_DIR/*.toml to the main config's imports (after a backup)",
    )
    install.add_argument(
        "--no-vm-assets", action="store_true", help="leave the VM's assets to `pyshim assets`"
    )
    uninstall = commands.add_parser(
        "uninstall",
        parents=[paths],
        help="remove the symlinks and the drop-in (ignores --containerd)",
    )
    uninstall.add_argument(
        "--purge-vm-assets", action="store_true", help="remove the VM's assets too"
    )
    commands.add_parser(
        "assets",
        parents=[dry_run, assets_dir],
        help="fetch the VM's kernel and build its guest image (what install does last)",
    )
    templates = commands.add_parser("templates", help="the saved VMs that new VMs start from")
    actions = templates.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[assets_dir], help="key, size, accel, created, disk use")
    remove = actions.add_parser("remove", parents=[assets_dir], help="remove templates")
    which = remove.add_mutually_exclusive_group(required=True)
    which.add_argument("keys", metavar="KEY", nargs="*", default=[], help="a template's key")
    which.add_argument("--all", action="store_true", help="every template")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    assets = VmAssets(args.assets_dir.absolute())
    name = " ".join(filter(None, [args.command, getattr(args, "action", None)]))
    try:
        if args.command == "templates":
            store = TemplateStore(assets.templates_dir)
            if args.action == "list":
                list_templates(store, sys.stdout)
                return 0
            _require_root()
            remove_templates(store, [] if args.all else args.keys, sys.stdout)
            return 0
        if not args.dry_run:
            _require_root("(--dry-run shows what it would do)")
        carry_out(_plan(args, assets), sys.stdout, args.dry_run)
    except InstallError as exc:
        print(f"pyshim {name}: {exc}", file=sys.stderr)
        return 1
    return 0


def _plan(args: argparse.Namespace, assets: VmAssets) -> Plan:
    if args.command == "assets":
        return Plan(plan_assets(assets), f"the VM's assets are ready in {assets.root}")
    settings = Settings(
        config=args.config.absolute(),
        drop_in_dir=args.drop_in_dir.absolute(),
        bin_dir=args.bin_dir.absolute(),
        runsc_config=args.runsc_config.absolute(),
        pykata_config=args.pykata_config.absolute(),
        assets_dir=assets.root,
        containerd=args.containerd,
        add_import=getattr(args, "add_import", False),
        vm_assets=not getattr(args, "no_vm_assets", False),
        purge_vm_assets=getattr(args, "purge_vm_assets", False),
    )
    return plan_install(settings) if args.command == "install" else plan_uninstall(settings)


def _require_root(hint: str = "") -> None:
    if os.geteuid() != 0:
        raise InstallError(" ".join(filter(None, ["run it as root", hint])))
