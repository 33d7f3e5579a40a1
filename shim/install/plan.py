"""What install and uninstall do to the node, as a plan of steps (shim.install.steps)."""

from __future__ import annotations

import difflib
import os
import sysconfig
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shim.install import dropin, files, mainconfig
from shim.install.containerd import containerd_version, drop_in_version, find_containerd
from shim.install.errors import InstallError
from shim.install.runsc import runsc_flags
from shim.install.steps import Plan, Step
from shim.install.vmassets import plan_assets, plan_removal
from shim.kata.config import KataConfig
from shim.runtimes.registry import builtin_runtime_names
from shim.ttrpc.errors import TtrpcError
from shim.vm.assets import VmAssets

DROP_IN_NAME = "pyshim.toml"
RESTART = "systemctl restart containerd"


@dataclass(frozen=True)
class Settings:
    config: Path
    drop_in_dir: Path
    bin_dir: Path
    runsc_config: Path
    pykata_config: Path
    assets_dir: Path
    containerd: str | None = None  # None: the one on PATH
    add_import: bool = False
    vm_assets: bool = True  # install: fetch and build the VM's assets
    purge_vm_assets: bool = False  # uninstall: remove them
    scripts_dir: Path = field(default_factory=lambda: Path(sysconfig.get_path("scripts")))
    backends: tuple[str, ...] = field(default_factory=builtin_runtime_names)

    @property
    def drop_in(self) -> Path:
        return self.drop_in_dir / DROP_IN_NAME

    @property
    def import_entry(self) -> str:
        return str(self.drop_in_dir / "*.toml")

    def links(self) -> list[tuple[Path, Path]]:
        """(link in bin_dir, the console script it points to) per backend."""
        names = [f"containerd-shim-{backend}-v1" for backend in self.backends]
        return [(self.bin_dir / name, self.scripts_dir / name) for name in names]


def plan_install(settings: Settings) -> Plan:
    binary = find_containerd(settings.containerd)
    major, minor = containerd_version(binary)
    config = mainconfig.read(settings.config)
    doc = config[1] if config else {}
    # A file without a `version` line is version 1 to containerd; no file at all is none.
    declared = doc.get("version", 1) if config else None
    version = drop_in_version(major, declared, str(settings.config))
    steps = []
    if major == 2 and version == 2:
        steps.append(Step(f"note: {settings.config} is config version 2, so the drop-in is too"))
    steps += [_link(link, script) for link, script in settings.links()]
    config_files = {"pyrunsc": settings.runsc_config}
    if "pyrunsc" in settings.backends:
        steps += _runsc_config(settings.runsc_config)
    if "pykata" in settings.backends:
        pykata_steps = _pykata_config(settings.pykata_config, settings.assets_dir)
        if pykata_steps:  # the file is there, or will be
            config_files["pykata"] = settings.pykata_config
        steps += pykata_steps
    cri_base = None
    if major == 1:  # 1.x replaces a plugin's section whole per file (containerd issue #5837)
        _refuse_other_cri_files(settings, mainconfig.imports_of(doc, settings.config))
        cri_base = _table(doc, "plugins", dropin.CRI_PLUGIN_V2, where=settings.config)
    text = dropin.render_dropin(settings.backends, version, config_files, cri_base)
    steps.append(_write_drop_in(settings.drop_in, text))
    steps.append(_import(settings, config, version))
    if "pykata" in settings.backends and settings.vm_assets:
        try:
            steps += plan_assets(VmAssets(settings.assets_dir))
        except InstallError as exc:
            raise InstallError(f"{exc} (--no-vm-assets leaves them to `pyshim assets`)") from exc
    return Plan(steps, f"restart containerd {major}.{minor} to load the handlers: {RESTART}")


def plan_uninstall(settings: Settings) -> Plan:
    drop_in = settings.drop_in
    if not drop_in.exists():
        steps = [Step(f"unchanged: no {drop_in}")]
    elif dropin.is_ours(files.read_text(drop_in)):
        steps = [Step(f"remove {drop_in}", f"removed {drop_in}", drop_in.unlink, (drop_in,))]
    else:
        steps = [Step(f"left in place: {drop_in} (pyshim did not write it)")]
    for link, script in settings.links():
        if _points_to(link, script):
            steps.append(Step(f"remove symlink {link}", f"removed {link}", link.unlink, (link,)))
        elif os.path.lexists(link):
            steps.append(Step(f"left in place: {link} (not a symlink to {script})"))
        else:
            steps.append(Step(f"unchanged: no {link}"))
    for config_file in (settings.runsc_config, settings.pykata_config):
        if config_file.exists():
            steps.append(Step(f"left in place: {config_file} (it may hold your settings)"))
    if _imports_drop_in(settings):
        steps.append(Step(f"left in place: the imports entry in {settings.config}"))
    steps += plan_removal(VmAssets(settings.assets_dir), settings.purge_vm_assets)
    return Plan(steps, f"restart containerd to unload the handlers: {RESTART}")


def _link(link: Path, script: Path) -> Step:
    if not script.is_file():
        raise InstallError(f"{script} is missing: pyshim is not installed in this environment")
    if _points_to(link, script):
        return Step(f"unchanged: symlink {link} -> {script}")
    if os.path.lexists(link):
        what = f"a symlink to {os.readlink(link)}" if link.is_symlink() else "not a symlink"
        raise InstallError(
            f"{link} exists and is {what}; pyshim never replaces a file it did not make: "
            "remove it yourself if it is stale, or choose another --bin-dir"
        )

    def create() -> None:
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(script)

    arrow = f"{link} -> {script}"
    return Step(f"create symlink {arrow}", f"created symlink {arrow}", create, (link,))


def _points_to(link: Path, script: Path) -> bool:
    return link.is_symlink() and (
        os.readlink(link) == str(script) or link.resolve() == script.resolve()
    )


def _runsc_config(path: Path) -> list[Step]:
    if path.exists():
        return [Step(f"unchanged: {path} exists (left as it is)")]
    # No runsc yet: one installed later is taken to have --oci-seccomp (Debian 12's has it).
    flags = runsc_flags()
    if flags is None or "oci-seccomp" in flags:
        return [_write(path, dropin.runsc_toml())]
    note = "note: runsc has no --oci-seccomp: gVisor pods' seccomp profiles are not enforced"
    return [_write(path, dropin.runsc_toml(oci_seccomp=False)), Step(note)]


def _pykata_config(path: Path, assets_dir: Path) -> list[Step]:
    """pykata.toml, for assets where pykata does not look by default. An existing one is only
    read, as pykata reads it: its assets directory must be the install's."""
    if path.exists():
        try:
            configured = KataConfig.from_table(tomllib.loads(files.read_text(path)).get("vm", {}))
        except (tomllib.TOMLDecodeError, TtrpcError) as exc:
            raise InstallError(f"{path}: {exc}") from exc
        if configured.assets().root != assets_dir:
            raise InstallError(
                f"{path} has pykata look for its assets in {configured.assets_dir}, not in "
                f"{assets_dir}: edit it, or run again with --assets-dir={configured.assets_dir}"
            )
        return [Step(f"unchanged: {path} exists (left as it is)")]
    if assets_dir == VmAssets.DEFAULT_ROOT:
        return []
    return [_write(path, dropin.pykata_toml(assets_dir))]


def _write_drop_in(path: Path, text: str) -> Step:
    if not path.exists():
        return _write(path, text)
    current = files.read_text(path)
    if current == text:
        return Step(f"unchanged: {path}")
    if not dropin.is_ours(current):
        raise InstallError(
            f"{path} exists and pyshim did not write it (its first line is not {dropin.MARKER!r});"
            " move it away or choose another --drop-in-dir"
        )
    return _write(path, text, "update", "updated")


def _write(path: Path, text: str, verb: str = "write", past: str = "wrote") -> Step:
    return Step(
        f"{verb} {path}", f"{past} {path}", lambda: files.write_atomic(path, text), (path,), text
    )


def _import(settings: Settings, config: tuple[str, dict[str, Any]] | None, version: int) -> Step:
    path, entry = settings.config, settings.import_entry
    if config is None:
        text = mainconfig.minimal_config(version, entry)
        if not settings.add_import:
            raise InstallError(
                f"{path} does not exist; create it with these lines, or run again with "
                f"--add-import:\n{textwrap.indent(text, '    ')}".rstrip()
            )
        return _write(path, text)
    old, doc = config
    imports = mainconfig.imports_of(doc, path)
    for existing in imports:
        if mainconfig.import_matches(existing, path, settings.drop_in):
            return Step(f"unchanged: {path} imports {settings.drop_in} (entry {existing})")
    line = "imports = [" + ", ".join(map(dropin.toml_string, [*imports, entry])) + "]"
    where = "as its imports line" if imports else "above its first [table]"
    manual = f"put this line in {path} {where}:\n    {line}"
    if not settings.add_import:
        raise InstallError(
            f"{path} does not import {settings.drop_in}, so containerd would not read the "
            f"handlers. To fix, {manual}\nor run again with --add-import (it backs the file up)"
        )
    try:
        new = mainconfig.add_import(old, entry)
    except ValueError as exc:
        raise InstallError(f"cannot add the import to {path} safely ({exc}); {manual}") from exc
    backup = files.backup_path(path)
    diff = difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(path), str(path))
    return Step(
        f"back up {path} to {backup} and add {entry} to its imports",
        f"backed up {path} to {backup}; added {entry} to its imports",
        lambda: files.back_up_and_replace(path, backup, new),
        (backup, path.resolve()),
        "".join(diff),
    )


def _imports_drop_in(settings: Settings) -> bool:
    """Whether the main config imports the drop-in; False when it cannot be read (uninstall
    does not need it)."""
    try:
        config = mainconfig.read(settings.config)
        imports = mainconfig.imports_of(config[1], settings.config) if config else []
    except InstallError:
        return False
    return any(mainconfig.import_matches(i, settings.config, settings.drop_in) for i in imports)


def _refuse_other_cri_files(settings: Settings, imports: list[str]) -> None:
    ours = Path(os.path.normpath(settings.drop_in.absolute()))
    for other in mainconfig.imported_files(imports, settings.config):
        if other == ours:
            continue
        parsed = mainconfig.read(other)
        if parsed and dropin.CRI_PLUGIN_V2 in parsed[1].get("plugins", {}):
            raise InstallError(
                f"{other} also configures the CRI plugin; containerd 1.x keeps only the last "
                "file's CRI section, so it or pyshim's handlers would be lost. Move its "
                f"settings into {settings.config}, remove it, and run again"
            )


def _table(doc: dict[str, Any], *keys: str, where: Path) -> dict[str, Any]:
    table = doc
    for key in keys:
        value = table.get(key, {})
        if not isinstance(value, dict):
            raise InstallError(f"{where}: {'.'.join(keys)} is not a table")
        table = value
    return table
