"""containerd's main config: whether its ``imports`` reach the drop-in, and adding one entry
with a minimal text edit (the rest of the file stays byte-for-byte)."""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from shim.install.dropin import toml_string
from shim.install.errors import InstallError

_IMPORTS_KEY = re.compile(r"""^[ \t]*(?:imports|"imports"|'imports')[ \t]*=[ \t]*""", re.M)
_TABLE_HEADER = re.compile(r"^[ \t]*\[", re.M)


def read(path: Path) -> tuple[str, dict[str, Any]] | None:
    """The config's text and parsed content, or None if there is no such file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise InstallError(f"cannot read {path}: {exc}") from exc
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InstallError(f"{path} is not valid TOML: {exc}") from exc


def imports_of(doc: dict[str, Any], path: Path) -> list[str]:
    imports = doc.get("imports", [])
    if not (isinstance(imports, list) and all(isinstance(i, str) for i in imports)):
        raise InstallError(f"{path}: imports must be a list of paths")
    return imports


def _resolve(entry: str, config: Path) -> str:
    """An import entry as containerd resolves it: cleaned, relative to the config's directory."""
    return os.path.normpath(os.path.join(config.absolute().parent, entry))


def import_matches(entry: str, config: Path, target: Path) -> bool:
    """Whether containerd, reading ``config``, loads ``target`` for this import entry.
    containerd globs only entries containing ``*``, with Go's filepath.Match, whose wildcards
    stop at ``/``: hence one fnmatch per path component."""
    pattern = _resolve(entry, config)
    path = os.path.normpath(target.absolute())
    if "*" not in pattern:
        return pattern == path
    parts, names = pattern.split("/"), path.split("/")
    return len(parts) == len(names) and all(map(fnmatch.fnmatchcase, names, parts))


def imported_files(imports: list[str], config: Path) -> list[Path]:
    """The files containerd loads for these entries, in its order."""
    found: list[Path] = []
    for entry in imports:
        pattern = _resolve(entry, config)
        paths = sorted(glob.glob(pattern)) if "*" in pattern else [pattern]
        found += [Path(p) for p in paths if os.path.isfile(p)]
    return found


def minimal_config(version: int, entry: str) -> str:
    return f"version = {version}\nimports = [{toml_string(entry)}]\n"


def add_import(text: str, entry: str) -> str:
    """``text`` with ``entry`` appended to its top-level ``imports`` array, or with an
    ``imports`` line inserted before the first table (and the comments just above it).
    Raises ValueError when the result would not parse to the same config plus the entry."""
    newline = "\r\n" if "\r\n" in text else "\n"
    header = _TABLE_HEADER.search(text)
    top_end = header.start() if header else len(text)
    key = _IMPORTS_KEY.search(text, 0, top_end)
    if key is not None:
        at, has_values = _array_end(text, key.end())
        edited = text[:at] + (", " if has_values else "") + toml_string(entry) + text[at:]
    else:
        at = _before_comments(text, top_end) if header else len(text)
        line = f"imports = [{toml_string(entry)}]{newline}"
        if at and not text[:at].endswith(("\n", "\r")):
            line = newline + line
        if header:
            line += newline
        edited = text[:at] + line + text[at:]
    _check_added(text, edited, entry)
    return edited


def _array_end(text: str, start: int) -> tuple[int, bool]:
    """For the array opening at ``start``: the offset just after its last value (or after
    ``[`` when empty) and whether it has values. Only strings, commas and comments can be in
    it: tomllib already read the array as a list of strings."""
    if text[start : start + 1] != "[":
        raise ValueError("imports is not written as an array")
    i, end = start + 1, start + 1
    has_values = False
    while i < len(text):
        c = text[i]
        if c == "]":
            return end, has_values
        if c == "#":
            newline = text.find("\n", i)
            i = len(text) if newline < 0 else newline
        elif c in "\"'":
            i = _string_end(text, i + 1, c)
            end, has_values = i, True
        else:
            i += 1  # whitespace and commas
    raise ValueError("imports array is not closed")


def _string_end(text: str, i: int, quote: str) -> int:
    """The offset after the closing quote of a string whose body starts at ``i``. A
    multi-line string scans as a run of one-line ones ending at the same place."""
    while i < len(text):
        if text[i] == quote:
            return i + 1
        i += 2 if quote == '"' and text[i] == "\\" else 1
    raise ValueError("unterminated string in imports")


def _before_comments(text: str, at: int) -> int:
    """Moves ``at`` (a line start) up over the comment lines directly above it."""
    while at:
        previous = text.rfind("\n", 0, at - 1) + 1
        if not text[previous:at].lstrip().startswith("#"):
            break
        at = previous
    return at


def _check_added(text: str, edited: str, entry: str) -> None:
    before = tomllib.loads(text)
    try:
        after = tomllib.loads(edited)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"the edit would not parse: {exc}") from exc
    expected = {**before, "imports": [*before.get("imports", []), entry]}
    if after != expected:
        raise ValueError("the edit would change more than imports")
