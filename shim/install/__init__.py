"""The node installer: ``pyshim install`` puts the shims where containerd finds them,
registers one CRI runtime handler per backend in a drop-in and sets up the VM backend's
assets; ``pyshim uninstall`` undoes it. ``pyshim assets`` sets up the assets alone,
``pyshim templates`` lists and removes the VM templates.

Modules: cli (argv), steps (a plan's steps, carried out or printed), plan (install's and
uninstall's steps), vmassets (the assets' steps), templates, dropin (the files' text),
mainconfig (containerd's config and its imports), containerd (version and config syntax),
runsc, files, errors.
"""

from shim.install.cli import main

__all__ = ["main"]
