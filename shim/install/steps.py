"""A plan of steps: every step is planned (and every refusal raised) before the first change,
then carried out or, for --dry-run, only printed."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from shim.install import files
from shim.install.errors import InstallError


@dataclass(frozen=True)
class Step:
    """A change (``run`` set), or a note that something is as wanted or left alone."""

    todo: str  # "create symlink ..." or, without run, the note
    done: str = ""  # printed after run, unless run returns what it did (known only then)
    run: Callable[[], str | None] | None = None
    writes: tuple[Path, ...] = ()  # what run creates, replaces or removes
    content: str = ""  # shown by --dry-run


@dataclass
class Plan:
    steps: list[Step]
    closing: str  # what the administrator does next when something changed


def carry_out(plan: Plan, out: TextIO, dry_run: bool) -> None:
    changes = [step for step in plan.steps if step.run is not None]
    if not dry_run:
        for path in (path for step in changes for path in step.writes):
            files.check_writable(path)
    for step in plan.steps:
        if step.run is None:
            print(step.todo, file=out)
        elif dry_run:
            print(f"would {step.todo}", file=out)
            print(textwrap.indent(step.content, "    ", lambda _: True), end="", file=out)
        else:
            try:
                done = step.run()
            except OSError as exc:
                raise InstallError(f"could not {step.todo}: {exc}") from exc
            print(done or step.done, file=out, flush=True)  # steps may take a minute each
    if dry_run:
        print("dry run: nothing changed", file=out)
    elif changes:
        print(plan.closing, file=out)
    else:
        print("nothing changed", file=out)
