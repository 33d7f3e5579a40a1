"""The QEMU command line, as a pure function of a small config, and a launcher that owns the
QEMU process: started in its own session, killed by pid on every exit path.

The launcher uses subprocess: it is for scripts and the accelerator probe. The shim daemon
starts QEMU through shim.sys.spawn with the same command line (one reaper).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Accel = Literal["kvm", "tcg"]
QEMU_BINARY = "qemu-system-x86_64"


@dataclass(frozen=True)
class Share:
    """A host directory exported to the guest by 9p under a mount tag."""

    tag: str
    host_path: Path
    readonly: bool = True


@dataclass(frozen=True)
class SerialPort:
    """A virtio-serial port (the guest's /dev/vport*, named `name`) on a unix socket QEMU
    listens on. `name` is its chardev's id too: a letter, then letters, digits, -, . or _."""

    name: str
    socket: Path


@dataclass(frozen=True)
class Nic:
    """A virtio-net NIC on a tap device QEMU gets open, as fd `fd` (its fd number in QEMU), or
    with fd None on a hub port of its own (a NIC that carries nothing: a VM's device set stays
    the same with or without a network, as a template's clones need)."""

    fd: int | None
    mac: str
    mtu: int = 0  # told to the guest's driver (VIRTIO_NET_F_MTU); 0: not told


@dataclass(frozen=True)
class Memory:
    """Guest RAM in a file: shared (the guest's writes reach the file: a template being made)
    or private (the file's pages mapped copy-on-write: a template's clone)."""

    path: Path
    shared: bool


@dataclass(frozen=True)
class VmConfig:
    kernel: Path
    initrd: Path
    append: str  # the kernel command line
    console_log: Path  # the serial console (ttyS0) goes to this file
    accel: Accel = "tcg"
    memory_mb: int = 1024
    vcpus: int = 1
    shares: Sequence[Share] = ()
    serial_ports: Sequence[SerialPort] = ()
    tcg_cache_mb: int = 0  # TCG's translation cache; 0: QEMU's default, 1 GiB (mapped lazily)
    nics: Sequence[Nic] = ()
    disks: Sequence[Path] = ()  # read-only raw images, virtio-blk: the guest's vda, vdb...
    memory: Memory | None = None  # None: anonymous RAM
    qmp_socket: Path | None = None  # QEMU's control socket (it listens)
    incoming: bool = False  # wait for the state to restore, given later by QMP


def command_line(config: VmConfig, binary: str = QEMU_BINARY) -> list[str]:
    argv = [binary, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]
    if config.accel == "kvm":
        # The host CPU minus what this machine's KVM rejects ("failed to set MSR 0x10a").
        argv += ["-accel", "kvm", "-cpu", "host,-arch-capabilities"]
    else:
        cache = f",tb-size={config.tcg_cache_mb}" if config.tcg_cache_mb else ""
        argv += ["-accel", f"tcg,thread=multi{cache}", "-cpu", "max"]
    machine = "q35"
    if config.memory is not None:
        sharing = "on" if config.memory.shared else "off"
        backend = f"memory-backend-file,id=ram0,size={config.memory_mb}M,share={sharing}"
        argv += ["-object", f"{backend},mem-path={config.memory.path}"]
        machine += ",memory-backend=ram0"
    argv += ["-machine", machine, "-m", f"{config.memory_mb}M", "-smp", str(config.vcpus)]
    argv += ["-kernel", str(config.kernel), "-initrd", str(config.initrd)]
    argv += ["-append", config.append]
    for index, nic in enumerate(config.nics):
        netdev = f"net{index}"
        backend = f"hubport,hubid={index}" if nic.fd is None else f"tap,fd={nic.fd}"
        argv += ["-netdev", f"{backend},id={netdev}"]
        # romfile=: no PXE option ROM (a direct kernel boot never runs it; QEMU needs no file).
        device = f"virtio-net-pci,netdev={netdev},mac={nic.mac},romfile="
        argv += ["-device", device + (f",host_mtu={nic.mtu}" if nic.mtu else "")]
    if not config.nics:
        argv += ["-nic", "none"]
    argv += ["-serial", f"file:{config.console_log}", "-monitor", "none"]
    argv += ["-device", "virtio-rng-pci"]  # entropy: Python's start blocks on it otherwise
    for index, share in enumerate(config.shares):
        fsdev = f"fsdev{index}"
        options = f"local,id={fsdev},path={share.host_path},security_model=none,multidevs=remap"
        argv += ["-fsdev", options + (",readonly=on" if share.readonly else "")]
        argv += ["-device", f"virtio-9p-pci,fsdev={fsdev},mount_tag={share.tag}"]
    for index, disk in enumerate(config.disks):
        drive = f"file={disk},if=none,id=disk{index},format=raw,readonly=on"
        argv += ["-drive", drive, "-device", f"virtio-blk-pci,drive=disk{index}"]
    if config.serial_ports:
        argv += ["-device", "virtio-serial-pci"]
    for port in config.serial_ports:
        # The chardev is the port's name: query-chardev tells by it whether the guest has the
        # port open ("frontend-open").
        chardev = f"socket,id={port.name},path={port.socket},server=on,wait=off"
        argv += ["-chardev", chardev]
        argv += ["-device", f"virtserialport,chardev={port.name},name={port.name}"]
    if config.qmp_socket is not None:
        argv += ["-qmp", f"unix:{config.qmp_socket},server=on,wait=off"]
    if config.incoming:
        argv += ["-incoming", "defer"]
    return argv


class Qemu:
    """A running QEMU; use as a context manager so that it is killed however the block ends."""

    def __init__(self, config: VmConfig, log: Path, binary: str = QEMU_BINARY) -> None:
        """Start QEMU; its own stdout and stderr go to `log`."""
        with log.open("ab") as out:
            self._process = subprocess.Popen(
                command_line(config, binary),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,  # a ^C of the caller reaches us, not QEMU
            )
        self.pid = self._process.pid

    def __enter__(self) -> Qemu:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def wait(self, timeout: float) -> int | None:
        """QEMU's exit status, or None if it still runs after `timeout` seconds."""
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL QEMU (a hung guest ignores anything gentler) and reap it."""
        if self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self._process.wait()


def kernel_append(*extra: str) -> str:
    """Kernel arguments for a headless guest: console on ttyS0, panic = power off at once."""
    return " ".join(["console=ttyS0", "panic=-1", "quiet", "loglevel=3", *extra])
