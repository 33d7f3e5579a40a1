"""The node installer: ``pyshim install`` puts the shims where containerd finds them and
registers one CRI runtime handler per backend in a drop-in; ``pyshim uninstall`` undoes it.

Modules: cli (argv), plan (the steps), dropin (the files' text), mainconfig (containerd's
config and its imports), containerd (version and config syntax), errors.
"""

from shim.install.cli import main

__all__ = ["main"]
