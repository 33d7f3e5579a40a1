"""The VM backend's guest image: a read-only erofs filesystem that becomes the guest's /usr.

It holds what the guest agent runs on and nothing of the host beyond that: the CPython binary
this package runs on with only the stdlib modules the agent imports, the agent's modules and
the third-party ones they need (under lib/pyshim, a PYTHONPATH root), the OCI runtimes the
agent can run containers with (crun and runc, those the host has; pykata's [vm] guest_runtime
picks one), a static busybox with its applets as symlinks, the shared libraries of each of
those ELF files, and the guest kernel's whole module tree with busybox modprobe's index.
Layout, relative to the guest's /usr:

    bin/python3, lib/python3.11/ (os.py is CPython's prefix landmark), lib/pyshim/
    sbin/crun, sbin/runc, bin/busybox, bin/<applet> -> busybox, sbin/modprobe -> ../bin/busybox
    sbin/criu, bin/ip, bin/tar, sbin/xtables-nft-multi (+ iptables links, lib/.../xtables/)
    lib/x86_64-linux-gnu/*.so*, lib64/ld-linux-x86-64.so.2 (as ldd found them on the host)
    lib/modules/<release>/ with modules.dep, modules.alias, modules.symbols
    share/pyshim/manifest.json

The guest runs ``/usr/bin/python3 -S -m shim.agent`` with PYTHONPATH=/usr/lib/pyshim. Every .py
has an unchecked-hash .pyc beside it: the image's mtimes are not the sources', and checked
pycs would be recompiled in memory at every start. No ld.so.cache: Debian's ld.so searches
lib/x86_64-linux-gnu (and /usr/lib/x86_64-linux-gnu) without one.

Why erofs with lz4 (measured on the 393 MB module tree): erofs lz4 1.0 s -> 184 MB; lz4hc
10.9 s -> 159 MB; squashfs zstd 25.9 s -> 88 MB. Building is on the path of `pyshim install`
and lz4 is the cheapest to read in a guest without spare CPU.

The image is keyed by its content (`image_key`): a changed package, interpreter, library, OCI
runtime, busybox or kernel gives a new guest-<key>.erofs. The module tree is keyed by the
kernel's vmlinuz (path, size, mtime) and its modules.order: hashing 393 MB at each install is
too slow.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim.sys.files import replace_file
from shim.vm.guest import SYSTEM_PATH
from shim.vm.kernel import INDEX_FILES, Kernel, write_module_index_to

IMAGE_FORMAT = "erofs"
# Bump when the layout or anything derived from the inputs (pycs, index, options) changes.
BUILDER_VERSION = "1"
# A fixed timestamp and a UUID from the key: the same inputs give the same image bytes.
MKFS_OPTIONS = ("-zlz4", "--all-root", "-T0", "--ignore-mtime", "--quiet")
DEFAULT_CACHE_DIR = Path("/var/cache/pyshim")
CURRENT_FILE = "current.json"
CLOSURE_CACHE = "guest-closure.json"
# The OCI runtimes (runc's CLI) a guest can run containers with, each named as its binary and
# its Debian package. Both go in when the host has them (runc for checkpoints: Debian's crun
# is built without CRIU), so that the setting needs no other image.
GUEST_RUNTIMES = ("crun", "runc")

PYTHON_DIR = f"python{sys.version_info.major}.{sys.version_info.minor}"
STDLIB = f"lib/{PYTHON_DIR}"
PYTHONPATH = "lib/pyshim"
MANIFEST = "share/pyshim/manifest.json"
_PATH_DIRS = ("lib-dynload", "site-packages", "dist-packages")

# What the agent never reaches: debuggers and docs (breakpoint(), help()), tests, GUIs,
# installers. ssl: shim.agent.__main__ sets it to None (the agent speaks no TLS); _hashlib:
# hashlib falls back to its built-in digests, so OpenSSL's libcrypto stays out.
EXCLUDED = (
    "tkinter", "turtle", "turtledemo", "test", "idlelib", "ensurepip", "lib2to3", "pydoc",
    "pydoc_data", "doctest", "pdb", "distutils", "venv", "ssl", "_ssl", "_hashlib",
)  # fmt: skip
# The agent's own imports, done for real too: modulefinder cannot see what an extension
# module imports (a cffi module imports _cffi_backend), nor what CPython loads at startup.
EXTRA_IMPORTS = ("shim.runtimes.runc",)
# Checkpoints: CRIU (run by the OCI runtime's checkpoint and restore) and what it runs: ip and
# iptables over nftables to save, lock and restore a network namespace (`ip addr save`, and
# iptables-restore with its plug-ins), GNU tar for a tmpfs's content (busybox's lacks its
# options). Taken where the host has them; a guest without criu fails a checkpoint saying so.
CRIU_TOOLS = {
    "sbin/criu": "criu",
    "bin/ip": "ip",
    "sbin/xtables-nft-multi": "xtables-nft-multi",
    "bin/tar": "tar",
}
XTABLES_NAMES = tuple(f"{f}tables{s}" for f in ("ip", "ip6") for s in ("", "-save", "-restore"))


class MissingTool(FileNotFoundError):
    """A program the build needs is not installed; the message names its Debian package."""


@dataclass(frozen=True)
class GuestImage:
    path: Path  # <images_dir>/guest-<key>.erofs
    key: str  # hex digest of every input's content and this builder's version
    release: str  # kernel release whose modules it holds
    runtimes: tuple[str, ...] = GUEST_RUNTIMES  # the OCI runtimes it holds in sbin/


@dataclass(frozen=True)
class _Plan:
    files: dict[str, Path]  # image path -> host file whose content goes there
    symlinks: dict[str, str]  # image path -> link target
    kernel: Kernel


def image_key(
    kernel: Kernel,
    busybox: Path = Path("/bin/busybox"),
    runtimes: Mapping[str, Path] | None = None,
    *,
    cache_dir: Path | None = None,
) -> str:
    """The key of the image these inputs make (`runtimes`: name -> binary, default those of
    GUEST_RUNTIMES on PATH). The agent's import closure is cached in `cache_dir` (default
    /var/cache/pyshim; build_image uses its images_dir)."""
    return _key(_plan(kernel, busybox, runtimes, cache_dir or DEFAULT_CACHE_DIR))


def build_image(
    images_dir: Path,
    kernel: Kernel,
    busybox: Path = Path("/bin/busybox"),
    runtimes: Mapping[str, Path] | None = None,
) -> GuestImage:
    """guest-<key>.erofs in `images_dir`, built unless it is there, and recorded as current."""
    images_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan(kernel, busybox, runtimes, images_dir)
    key = _key(plan)
    held = tuple(name for name in GUEST_RUNTIMES if f"sbin/{name}" in plan.files)
    image = GuestImage(images_dir / f"guest-{key}.erofs", key, kernel.release, held)
    if not image.path.exists():
        mkfs = shutil.which("mkfs.erofs")
        if mkfs is None:
            raise MissingTool("mkfs.erofs not found: apt-get install erofs-utils")
        staging = Path(tempfile.mkdtemp(dir=images_dir, prefix=f".staging-{key[:16]}-"))
        temporary = images_dir / f".guest-{key}.erofs.{os.getpid()}.tmp"
        try:
            _stage(plan, key, busybox, staging)
            subprocess.run(
                [mkfs, *MKFS_OPTIONS, f"-U{uuid.UUID(key[:32])}", str(temporary), str(staging)],
                check=True,
                capture_output=True,
            )
            os.chmod(temporary, 0o644)
            os.rename(temporary, image.path)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"mkfs.erofs failed: {exc.stderr.decode(errors='replace')}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
    replace_file(
        images_dir / CURRENT_FILE,
        json.dumps(
            {"path": image.path.name, "key": key, "release": image.release, "runtimes": held}
        ).encode(),
        0o644,
    )
    return image


def current_image(images_dir: Path) -> GuestImage | None:
    """What the last build_image recorded, if that image is still there."""
    try:
        record = json.loads((images_dir / CURRENT_FILE).read_text())
        # Images recorded before the guest runtime was a choice held runc alone.
        runtimes = tuple(record.get("runtimes", ["runc"]))
        image = GuestImage(images_dir / record["path"], record["key"], record["release"], runtimes)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return image if image.path.is_file() else None


def remove_stale_images(images_dir: Path, keep: GuestImage) -> list[Path]:
    """Every other guest-*.erofs in `images_dir`, removed (a VM booted from one keeps its open
    file: the unlinked inode lives until QEMU exits)."""
    removed = []
    for path in sorted(images_dir.glob("guest-*.erofs")):
        if path.name != keep.path.name:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


# -- what goes in -------------------------------------------------------------------------------


def _plan(
    kernel: Kernel, busybox: Path, runtimes: Mapping[str, Path] | None, cache_dir: Path
) -> _Plan:
    if not busybox.is_file():
        raise MissingTool(f"{busybox} not found: apt-get install busybox-static")
    runtime_files = _runtime_files(runtimes)
    python = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
    files: dict[str, Path] = {
        "bin/python3": python,
        **{f"sbin/{name}": binary for name, binary in runtime_files.items()},
        "bin/busybox": Path(os.path.realpath(busybox)),
    }
    tools = {dest: shutil.which(name, path=SYSTEM_PATH) for dest, name in CRIU_TOOLS.items()}
    files.update({dest: Path(os.path.realpath(f)) for dest, f in tools.items() if f})
    needs: dict[Path, list[Path]] = {}
    if "sbin/xtables-nft-multi" in files:
        # ldd-ed first, and only here: its plug-ins are beside one of its libraries.
        xtables = files["sbin/xtables-nft-multi"]
        needs = ldd([xtables])
        files.update(_xtables_extensions(needs[xtables]))
    closure = _closure(python, cache_dir)
    files.update(_module_files(closure))
    roots = [Path(p) for p in closure["path"] if p]
    elves = [files["bin/python3"], *runtime_files.values(), files["bin/busybox"]]
    elves += [files[dest] for dest in CRIU_TOOLS if dest in files and files[dest] not in needs]
    elves += sorted(source for dest, source in files.items() if dest.endswith(".so"))
    needs.update(ldd(elves))
    for dependency in sorted({d for deps in needs.values() for d in deps}):
        files.setdefault(library_destination(dependency, roots), Path(os.path.realpath(dependency)))
    applets = subprocess.run(
        [str(busybox), "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    symlinks = {"sbin/modprobe": "../bin/busybox"}
    if "sbin/xtables-nft-multi" in files:
        symlinks.update({f"sbin/{name}": "xtables-nft-multi" for name in XTABLES_NAMES})
    symlinks.update(applet_links(applets, files))
    return _Plan(files, symlinks, kernel)


def _xtables_extensions(libraries: Iterable[Path]) -> dict[str, Path]:
    """iptables' match and target plug-ins (CRIU locks a network namespace with `-m mark`),
    from the directory beside the libxtables among xtables-nft-multi's `libraries`."""
    found = [lib for lib in libraries if lib.name.startswith("libxtables.")]
    if not found:
        return {}
    directory = Path(os.path.realpath(found[0])).parent / "xtables"
    return {library_destination(so): so for so in sorted(directory.glob("*.so"))}


def _runtime_files(given: Mapping[str, Path] | None) -> dict[str, Path]:
    """name -> real path of each guest runtime: `given`, else those on this host's PATH. One
    at least; which one a VM runs is pykata's setting, checked when the VM starts."""
    if given is None:
        found = {name: shutil.which(name) for name in GUEST_RUNTIMES}
        given = {name: Path(path) for name, path in found.items() if path}
    for name, binary in given.items():
        if name not in GUEST_RUNTIMES:
            raise ValueError(f"no guest runtime {name!r}: one of {', '.join(GUEST_RUNTIMES)}")
        if not binary.is_file():
            raise MissingTool(f"{binary} not found: apt-get install {name}")
    if not given:
        names = " or ".join(GUEST_RUNTIMES)
        raise MissingTool(f"no {names} found (the guest's OCI runtime): apt-get install crun")
    return {name: Path(os.path.realpath(binary)) for name, binary in given.items()}


def applet_links(applets: Iterable[str], placed: Mapping[str, object]) -> dict[str, str]:
    """bin/<applet> -> busybox for each applet whose name no placed file has."""
    return {
        f"bin/{name}": "busybox"
        for name in applets
        if "/" not in name and f"bin/{name}" not in placed and name != "busybox"
    }


def _key(plan: _Plan) -> str:
    digest = hashlib.sha256(f"pyshim guest image {BUILDER_VERSION}\0".encode())
    for dest in sorted(plan.files):
        with open(plan.files[dest], "rb") as f:
            content = hashlib.file_digest(f, "sha256").hexdigest()
        digest.update(f"file {dest} {content}\0".encode())
    for dest in sorted(plan.symlinks):
        digest.update(f"link {dest} {plan.symlinks[dest]}\0".encode())
    vmlinuz = plan.kernel.vmlinuz.stat()
    digest.update(
        f"kernel {plan.kernel.vmlinuz} {vmlinuz.st_size} {vmlinuz.st_mtime_ns}\0".encode()
    )
    digest.update((plan.kernel.modules_dir / "modules.order").read_bytes())
    return digest.hexdigest()


# -- the agent's import closure -----------------------------------------------------------------

# Run by the target interpreter with -S: the agent's modules imported for real first (what
# startup and extension modules load), then modulefinder over shim/agent/__main__.py (imports
# inside functions too). Prints JSON: the search path and [name, file, is_package] per module.
_CLOSURE_SCRIPT = """
import sys
path, entry, imports, excluded = sys.argv[1].split("\\n"), sys.argv[2], sys.argv[3], sys.argv[4]
sys.path[:] = path
excluded = set(excluded.split(","))
for name in imports.split(","):
    __import__(name)
def kept(name):
    return name.partition(".")[0] not in excluded and name != "__main__"
found = {}
for name, module in list(sys.modules.items()):
    file = getattr(module, "__file__", None)
    if kept(name) and isinstance(file, str):
        found[name] = [file, hasattr(module, "__path__")]
import importlib.machinery, json, modulefinder, os
class Finder(modulefinder.ModuleFinder):
    # modulefinder takes a namespace package (google) for a missing module's spec and fails.
    def import_module(self, partname, fqname, parent):
        if fqname not in self.modules and (parent is None or parent.__path__):
            where = parent.__path__ if parent is not None else self.path
            spec = importlib.machinery.PathFinder.find_spec(partname, where)
            if spec and spec.loader is None and spec.submodule_search_locations is not None:
                module = self.add_module(fqname)
                module.__path__ = list(spec.submodule_search_locations)
                if parent is not None:
                    setattr(parent, partname, module)
                return module
        return super().import_module(partname, fqname, parent)
finder = Finder(path=path, excludes=sorted(excluded))
finder.run_script(entry)
finder.import_hook("encodings", None, ["*"])  # codecs are looked up by name at run time
for name, module in finder.modules.items():
    if kept(name) and module.__file__:
        found.setdefault(name, [module.__file__, module.__path__ is not None])
modules = sorted(
    [name, os.path.abspath(f), p] for name, (f, p) in found.items() if os.path.isfile(f)
)
stdlib = os.path.dirname(os.__file__)
dynloads = [p for p in path if os.path.basename(p) == "lib-dynload"]
dynload = dynloads[0] if dynloads else os.path.join(stdlib, "lib-dynload")
print(json.dumps({"path": path, "stdlib": stdlib, "dynload": dynload, "modules": modules}))
"""


def _closure(python: Path, cache_dir: Path) -> dict[str, Any]:
    """The modules the agent imports, from the cache when no file they came from (nor a
    search path directory, nor the interpreter) changed since: modulefinder takes ~1.5 s."""
    import shim.agent

    agent_dir = Path(shim.agent.__file__).parent
    package_root = agent_dir.parent.parent  # the installed package's parent: site-packages
    # The stdlib's and site-packages directories of this interpreter, not whatever else is on
    # sys.path (a test runner's directories): the cache serves every caller.
    stdlib = os.path.dirname(os.__file__)
    path = [str(package_root)]
    for entry in sys.path:
        searched = entry == stdlib or os.path.basename(entry) in _PATH_DIRS
        if searched and entry not in path and os.path.isdir(entry):
            path.append(entry)
    imports = ["shim.agent.__main__", *EXTRA_IMPORTS]
    imports += sorted(f"shim.agent.{p.stem}" for p in agent_dir.glob("*.py") if p.stem[0] != "_")
    request = {
        "python": str(python),
        "path": path,
        "imports": imports,
        "excluded": list(EXCLUDED),
        "script": hashlib.sha256(_CLOSURE_SCRIPT.encode()).hexdigest(),
    }
    cache = cache_dir / CLOSURE_CACHE
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        cached = json.loads(cache.read_text())
        stamp = _stamp([python, *path, *(m[1] for m in cached["modules"])])
        if (cached["version"], cached["request"], cached["stamp"]) == (
            BUILDER_VERSION,
            request,
            stamp,
        ):
            return dict(cached)
    out = subprocess.run(
        [
            str(python),
            "-S",
            "-c",
            _CLOSURE_SCRIPT,
            "\n".join(path),
            str(agent_dir / "__main__.py"),
            ",".join(imports),
            ",".join(EXCLUDED),
        ],
        check=True,
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1"},
    ).stdout
    closure: dict[str, Any] = json.loads(out)
    closure.update(version=BUILDER_VERSION, request=request)
    closure["stamp"] = _stamp([python, *path, *(m[1] for m in closure["modules"])])
    with contextlib.suppress(OSError):
        cache_dir.mkdir(parents=True, exist_ok=True)
        replace_file(cache, json.dumps(closure).encode(), 0o644)
    return closure


def _stamp(paths: Iterable[str | Path]) -> list[list[Any]]:
    stamp: list[list[Any]] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamp.append([str(path), None, None])
        else:
            stamp.append([str(path), st.st_size, st.st_mtime_ns])
    return stamp


def _module_files(closure: Mapping[str, Any]) -> dict[str, Path]:
    """Image path -> source of each module in the closure (with the whole encodings package),
    and os.py, CPython's prefix landmark, whether or not the closure has it."""
    stdlib, dynload = Path(closure["stdlib"]), Path(closure["dynload"])
    files: dict[str, Path] = {}
    for name, file, is_package in closure["modules"]:
        source = Path(file)
        if source.is_relative_to(dynload):
            files[f"{STDLIB}/lib-dynload/{source.name}"] = source
        elif source.is_relative_to(stdlib):
            files[f"{STDLIB}/{source.relative_to(stdlib)}"] = source
        else:  # third-party and ours: laid out by module name under the PYTHONPATH root
            parts = name.split(".") if is_package else name.split(".")[:-1]
            files["/".join([PYTHONPATH, *parts, source.name])] = source
    files[f"{STDLIB}/os.py"] = stdlib / "os.py"
    return files


# -- shared libraries ---------------------------------------------------------------------------


def ldd(elves: Iterable[Path]) -> dict[Path, list[Path]]:
    """The shared libraries (and loader) each ELF file needs, by one `ldd` run."""
    paths = list(elves)
    result = subprocess.run(
        ["ldd", *map(str, paths)], capture_output=True, text=True, env={"LC_ALL": "C"}
    )
    if not result.stdout:
        raise RuntimeError(f"ldd failed: {result.stderr.strip()}")
    return parse_ldd(result.stdout, paths)


def parse_ldd(output: str, paths: list[Path]) -> dict[Path, list[Path]]:
    """ldd's listing per file: with one file it prints no "<file>:" header line. The vdso has
    no file; a library not found is an error (the guest would fail the same way)."""
    found: dict[Path, list[Path]] = {path: [] for path in paths}
    current = paths[0] if len(paths) == 1 else None
    for line in output.splitlines():
        if not line.startswith(("\t", " ")):
            header = Path(line.rstrip().removesuffix(":"))
            current = header if header in found else None
            continue
        entry = line.strip()
        if current is None or not entry or "not a dynamic executable" in entry:
            continue
        name, arrow, rest = entry.partition(" => ")
        target = rest if arrow else name
        target = target.rsplit(" (0x", 1)[0].strip()
        if target == "not found":
            raise FileNotFoundError(f"{current} needs {name}, which ldd does not find")
        if target.startswith("/"):  # else the vdso (linux-vdso.so.1), which is no file
            found[current].append(Path(target))
    return found


def library_destination(library: Path, python_roots: Iterable[Path] = ()) -> str:
    """Where a library goes in the image, under the name ldd found it by (the soname): a
    wheel's bundled one (found by $ORIGIN) beside its package under the PYTHONPATH root; a
    system one at its real directory relative to /usr (/lib is usr/lib on a merged /usr);
    any other (pyenv's libpython) in lib, which ld.so searches without a cache."""
    directory = Path(os.path.realpath(library.parent))
    for root in python_roots:
        resolved = Path(os.path.realpath(root))
        if directory.is_relative_to(resolved) and resolved != Path("/"):
            return f"{PYTHONPATH}/{directory.relative_to(resolved) / library.name}"
    relative = directory.relative_to("/")
    if relative.parts[:1] == ("usr",):
        relative = relative.relative_to("usr")
    if relative.parts[:1] not in (("lib",), ("lib64",)):
        relative = Path("lib")
    return str(relative / library.name)


# -- staging and writing ------------------------------------------------------------------------


def _stage(plan: _Plan, key: str, busybox: Path, staging: Path) -> None:
    sources = []
    for dest, source in sorted(plan.files.items()):
        target = staging / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        os.chmod(target, 0o755 if os.access(source, os.X_OK) else 0o644)
        if dest.endswith(".py"):
            sources.append(dest)
    _compile(plan.files["bin/python3"], staging, sources)
    for dest, link_target in plan.symlinks.items():
        (staging / dest).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(link_target, staging / dest)
    modules = staging / "lib" / "modules" / plan.kernel.release
    _link_tree(plan.kernel.modules_dir, modules, skip=set(INDEX_FILES))
    write_module_index_to(modules, plan.kernel, busybox)
    manifest = {
        "key": key,
        "format": IMAGE_FORMAT,
        "builder": BUILDER_VERSION,
        "pyshim": _version(),
        "release": plan.kernel.release,
        "kernel": str(plan.kernel.vmlinuz),
        "inputs": {
            dest: hashlib.sha256(plan.files[dest].read_bytes()).hexdigest()
            for dest in sorted(plan.files)
        },
    }
    (staging / MANIFEST).parent.mkdir(parents=True, exist_ok=True)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    for directory, _, _ in os.walk(staging):  # mkdtemp's 0700 and umask-made modes
        os.chmod(directory, 0o755)


# py_compile by the target interpreter, with a fixed hash seed: marshal writes a frozenset
# constant in its (string hash) iteration order, so a random seed gives other bytes each build.
_COMPILE_SCRIPT = """
import py_compile, sys
staging, tag = sys.argv[1], sys.implementation.cache_tag
for dest in sys.stdin.read().split("\\n"):
    directory, _, name = dest.rpartition("/")
    py_compile.compile(
        f"{staging}/{dest}",
        cfile=f"{staging}/{directory}/__pycache__/{name[:-3]}.{tag}.pyc",
        dfile=f"/usr/{dest}",  # tracebacks name the guest's path
        doraise=True,
        optimize=0,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
"""


def _compile(python: Path, staging: Path, sources: list[str]) -> None:
    """An unchecked-hash .pyc beside each of `sources` (paths in the image)."""
    subprocess.run(
        [str(python), "-S", "-c", _COMPILE_SCRIPT, str(staging)],
        input="\n".join(sources),
        check=True,
        text=True,
        env={"PYTHONHASHSEED": "0", "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )


def _link_tree(source: Path, target: Path, skip: set[str]) -> None:
    """`source` as hard links under `target` (copies across filesystems): the module tree is
    393 MB, and mkfs only reads it. Index files and our temporaries at the top are left out."""
    for directory, dirs, names in os.walk(source):
        here = Path(directory)
        relative = here.relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        dirs.sort()
        for name in sorted(names):
            if relative == Path(".") and (name in skip or name.startswith(".")):
                continue
            try:
                os.link(here / name, target / relative / name)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EROFS, errno.EMLINK):
                    raise
                shutil.copyfile(here / name, target / relative / name)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("pyshim")
    except metadata.PackageNotFoundError:
        return "unknown"
