"""KVM or TCG: KVM only once a real guest has booted under it, since on some hosts /dev/kvm
opens and runs a bare vCPU while a Linux guest hangs (PROTOCOL U). The answer is cached in a
file per kernel; a setting (PYSHIM_VM_ACCEL=kvm|tcg for scripts) forces either."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from shim.vm.guest import GuestSetup, init_script
from shim.vm.initramfs import initramfs
from shim.vm.kernel import Kernel
from shim.vm.qemu import Accel, Qemu, VmConfig, kernel_append

FORCE_VARIABLE = "PYSHIM_VM_ACCEL"
PROBE_TIMEOUT = 20.0  # a KVM guest boots in ~1 s; a hung one never does
_BOOTED = "pyshim-probe-booted"
_CONSOLE_POLL = 0.1


def choose_accel(
    kernel: Kernel, cache: Path, forced: str = "", busybox: Path = Path("/bin/busybox")
) -> Accel:
    """`forced` if given (the caller's setting: the VM backend's `accel`, scripts/vm-test's
    PYSHIM_VM_ACCEL), else the cached or probed answer."""
    if forced in ("kvm", "tcg"):
        return forced  # type: ignore[return-value]  # narrowed by the test above
    if forced:
        raise ValueError(f"accelerator {forced!r}: expected kvm or tcg")
    key = str(kernel.vmlinuz.resolve())
    try:
        cached = json.loads(cache.read_text())
        if cached.get("kernel") == key and cached.get("accel") in ("kvm", "tcg"):
            return cached["accel"]  # type: ignore[no-any-return]
    except (OSError, ValueError):
        pass
    accel: Accel = "kvm" if kvm_usable() and boots_under_kvm(kernel, busybox) else "tcg"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"kernel": key, "accel": accel}) + "\n")
    return accel


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def boots_under_kvm(kernel: Kernel, busybox: Path) -> bool:
    """Boot a guest whose init prints a marker and powers off; True if the marker shows in
    the console within PROBE_TIMEOUT seconds."""
    init = init_script(GuestSetup(modules=(), mounts=(), command=f"echo {_BOOTED}"))
    with tempfile.TemporaryDirectory(prefix="pyshim-accel-") as scratch:
        work = Path(scratch)
        (work / "initrd").write_bytes(initramfs(busybox.read_bytes(), (), init))
        config = VmConfig(
            kernel=kernel.vmlinuz,
            initrd=work / "initrd",
            append=kernel_append(),
            console_log=work / "console",
            accel="kvm",
        )
        with Qemu(config, work / "qemu.log") as qemu:
            deadline = time.monotonic() + PROBE_TIMEOUT
            while time.monotonic() < deadline:
                console = (work / "console").read_bytes() if (work / "console").exists() else b""
                if _BOOTED.encode() in console:
                    return True
                if qemu.wait(_CONSOLE_POLL) is not None:  # QEMU refused the CPU, or crashed
                    return _BOOTED.encode() in (work / "console").read_bytes()
        return False
