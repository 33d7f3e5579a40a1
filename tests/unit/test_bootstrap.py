"""`start` as each containerd version runs it (docs PROTOCOL.md B.1-B.3, containerd 2.3's
bootstrap protocol), `-info`, and reading containerd's Go build info."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from google.protobuf.any_pb2 import Any
from google.protobuf.empty_pb2 import Empty

from shim.api.runc.options_pb2 import Options as RuncOptions
from shim.api.runtime.bootstrap.v1 import bootstrap_pb2 as bootstrap
from shim.api.task.v2 import shim_pb2 as api
from shim.api.types.introspection_pb2 import RuntimeInfo
from shim.bootstrap import StartRequest, answer, containerd_is_v2, read_request
from shim.flags import Flags
from shim.manager import SOCKET_DIR, socket_path
from shim.sys.gobuildinfo import MAGIC, go_module_info
from shim.ttrpc.client import Client

SHIM = str(Path(sys.executable).with_name("containerd-shim-pyrunc-v1"))
TASK_V3 = "containerd.task.v3.Task"
NAMESPACE = "pyshim-unit"
# runtimeoptions.v1.Options{config_path: "/etc/foo.toml"} as ctr --runtime-config-path sends it.
RUNTIMEOPTIONS_ANY = bytes.fromhex(
    "0a1972756e74696d656f7074696f6e732e76312e4f7074696f6e73120f120d"
) + (b"/etc/foo.toml")
CONTAINERD_1X_MODULES = "path\tgithub.com/containerd/containerd/cmd/containerd\n"
CONTAINERD_2X_MODULES = "path\tgithub.com/containerd/containerd/v2/cmd/containerd\n"
K3S_MODULES = "path\tgithub.com/k3s-io/k3s\ndep\tgithub.com/containerd/containerd/v2\tv2.0.5\n"

pytestmark = pytest.mark.timeout(60)


# -- helpers -------------------------------------------------------------------------------------


def _uvarint(value: int) -> bytes:
    out = b""
    while value >= 0x80:
        out += bytes([value & 0x7F | 0x80])
        value >>= 7
    return out + bytes([value])


def write_go_binary(path: Path, modules: str, inline_strings: bool = True) -> Path:
    """A minimal little-endian ELF64 file with a Go 1.18+ style .go.buildinfo section."""
    text = bytes(16) + modules.encode() + bytes(16)  # the linker's sentinels around the text
    flags = 0x2 if inline_strings else 0x0
    buildinfo = MAGIC + bytes([8, flags]) + bytes(16)
    buildinfo += _uvarint(6) + b"go1.24" + _uvarint(len(text)) + text
    names = b"\0.shstrtab\0.go.buildinfo\0"
    names_offset = 64
    buildinfo_offset = names_offset + len(names)
    table_offset = buildinfo_offset + len(buildinfo)
    section = struct.Struct("<IIQQQQIIQQ")
    table = bytes(64)  # section 0 is the null section
    table += section.pack(1, 3, 0, 0, names_offset, len(names), 0, 0, 1, 0)
    table += section.pack(11, 1, 3, 0, buildinfo_offset, len(buildinfo), 0, 0, 16, 0)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, 0, 0, table_offset, 0, 64, 0, 0, 64, 3, 1
    )
    path.write_bytes(header + names + buildinfo + table)
    return path


def shim_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAX_SHIM_VERSION", "TTRPC_ADDRESS")}
    return {**env, **extra}


def run_start(
    bundle: Path, argv: list[str], env: Mapping[str, str], stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [SHIM, *argv, "start"], cwd=bundle, input=stdin, capture_output=True, timeout=30, env=env
    )


def shut_down(socket: str, task_id: str, daemon: int) -> int:
    """Connect (the shim's pid) and Shutdown over the Task API v3; waits for the daemon to end."""

    async def talk() -> int:
        client = await Client.connect(socket)
        try:
            request = api.ConnectRequest(id=task_id)
            connected = await client.call(
                TASK_V3, "Connect", request, api.ConnectResponse, timeout=5
            )
            await client.call(
                TASK_V3, "Shutdown", api.ShutdownRequest(id=task_id), Empty, timeout=5
            )
            return int(connected.shim_pid)
        finally:
            await client.close()

    try:
        return asyncio.run(talk())
    finally:
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{daemon}") and time.monotonic() < deadline:
            time.sleep(0.05)
        if os.path.exists(f"/proc/{daemon}"):
            os.kill(daemon, 9)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short: a unix socket path (here dir + 64 hex digits) must stay under 108 bytes.
    with tempfile.TemporaryDirectory(prefix="pyshim-s-", dir="/tmp") as directory:
        yield Path(directory)


# -- containerd 2.3: BootstrapParams in, BootstrapResult out -------------------------------------


def test_start_answers_bootstrap_params_with_a_bootstrap_result(
    bundle: Path, socket_dir: Path
) -> None:
    grpc_address = f"/pyshim-unit-{os.getpid()}.sock"
    ttrpc_address = str(bundle / "no-containerd.sock.ttrpc")
    params = bootstrap.BootstrapParams(
        instance_id="t23",
        namespace=NAMESPACE,
        log_level=bootstrap.LOG_LEVEL_INFO,
        containerd_version="2.3.0",
        containerd_ttrpc_address=ttrpc_address,
        containerd_grpc_address=grpc_address,
        containerd_binary="/usr/bin/containerd",
        extensions=[bootstrap.Extension(value=Any.FromString(RUNTIMEOPTIONS_ANY))],
        socket_dir=str(socket_dir),
    )

    # No legacy flags at all: everything comes from the params.
    started = run_start(bundle, [], shim_env(), params.SerializeToString())

    assert started.returncode == 0, started.stdout + started.stderr
    result = bootstrap.BootstrapResult.FromString(started.stdout)
    digest = hashlib.sha256(f"{grpc_address}/{NAMESPACE}/t23".encode()).hexdigest()
    assert (result.version, result.protocol) == (3, "ttrpc")
    assert result.address == f"unix://{socket_dir}/{digest}"
    daemon = int((bundle / "shim.pid").read_text())

    assert shut_down(result.address.removeprefix("unix://"), "t23", daemon) == daemon
    assert not os.path.exists(f"/proc/{daemon}")
    assert not (socket_dir / digest).exists()


def test_runtime_options_on_stdin_are_not_taken_for_bootstrap_params() -> None:
    flags = Flags(namespace="ns", id="t1", address="/run/c.sock", action="start")
    runc = Any(
        type_url="containerd.runc.v1.Options", value=RuncOptions(root="/r").SerializeToString()
    )

    for stdin in (b"", RUNTIMEOPTIONS_ANY, runc.SerializeToString(), b"\xff\xff not protobuf"):
        assert read_request(flags, stdin) == StartRequest(flags)


def test_bootstrap_params_override_the_flags() -> None:
    flags = Flags(namespace="old", id="old", address="/old.sock", action="start")
    params = bootstrap.BootstrapParams(
        instance_id="new",
        namespace="ns",
        log_level=bootstrap.LOG_LEVEL_TRACE,
        containerd_version="2.3.0",
        containerd_grpc_address="/run/containerd/containerd.sock",
        containerd_ttrpc_address="unix:///run/containerd/containerd.sock.ttrpc",
    )

    request = read_request(flags, params.SerializeToString())

    assert (request.flags.id, request.flags.namespace, request.flags.debug) == ("new", "ns", True)
    assert request.flags.address == "/run/containerd/containerd.sock"
    assert request.ttrpc_address == "/run/containerd/containerd.sock.ttrpc"
    assert (request.socket_dir, request.bootstrap_params) == ("", True)


# -- the legacy answers: 1.6 plain, 1.7 JSON v2, 2.0-2.2 JSON v3 ---------------------------------


@pytest.mark.parametrize(
    ("modules", "environment", "expected"),
    [
        (CONTAINERD_1X_MODULES, {}, None),  # 1.6: no MAX_SHIM_VERSION, only a plain address works
        (CONTAINERD_1X_MODULES, {"MAX_SHIM_VERSION": "2"}, 2),  # 1.7 refuses version 3
        (CONTAINERD_2X_MODULES, {"MAX_SHIM_VERSION": "2"}, 3),  # 2.x sets 2 too, yet reads 3
    ],
    ids=["1.6", "1.7", "2.x"],
)
def test_start_answers_in_the_form_the_containerd_version_reads(
    bundle: Path, tmp_path_factory: pytest.TempPathFactory, modules: str,
    environment: dict[str, str], expected: int | None,
) -> None:  # fmt: skip
    if os.geteuid() != 0:
        pytest.skip(f"start binds under {SOCKET_DIR}, which needs root")
    containerd = write_go_binary(tmp_path_factory.mktemp("bin") / "containerd", modules)
    address = f"/pyshim-unit-{os.getpid()}.sock"
    if environment:  # what 1.7 and 2.x add
        environment = {**environment, "GRPC_ADDRESS": address, "NAMESPACE": NAMESPACE}
    env = shim_env(TTRPC_ADDRESS=str(bundle / "no-containerd.sock.ttrpc"), **environment)
    argv = ["-namespace", NAMESPACE, "-address", address, "-publish-binary", str(containerd)]
    argv += ["-id", "legacy"]

    started = run_start(bundle, argv, env)

    assert started.returncode == 0, started.stdout + started.stderr
    address_printed = "unix://" + socket_path(address, NAMESPACE, "legacy")
    if expected is None:
        assert started.stdout.decode() == address_printed
    else:
        bootstrap_json = {"version": expected, "address": address_printed, "protocol": "ttrpc"}
        assert json.loads(started.stdout) == bootstrap_json
    assert (bundle / "address").read_text() == address_printed  # what 1.6/1.7 reload reads
    daemon = int((bundle / "shim.pid").read_text())
    assert shut_down(address_printed.removeprefix("unix://"), "legacy", daemon) == daemon


def test_answer_trusts_a_max_shim_version_of_3_and_falls_back_to_2(tmp_path: Path) -> None:
    request = StartRequest(Flags(publish_binary=str(tmp_path / "missing")))
    address = "unix:///run/containerd/s/x"

    def version(max_version: str) -> int:
        return int(
            json.loads(answer(request, address, {"MAX_SHIM_VERSION": max_version}))["version"]
        )

    assert (version("3"), version("2"), version("junk")) == (3, 2, 2)


# -- reading containerd's Go build info ----------------------------------------------------------


def test_containerd_major_version_from_its_go_build_info(tmp_path: Path) -> None:
    assert not containerd_is_v2(str(write_go_binary(tmp_path / "c1", CONTAINERD_1X_MODULES)))
    assert containerd_is_v2(str(write_go_binary(tmp_path / "c2", CONTAINERD_2X_MODULES)))
    assert containerd_is_v2(str(write_go_binary(tmp_path / "k3s", K3S_MODULES)))  # embedded
    assert not containerd_is_v2("")


def test_go_build_info_of_files_that_are_not_go_1_18_binaries(tmp_path: Path) -> None:
    text = tmp_path / "text"
    text.write_text("#!/bin/sh\n")
    old = write_go_binary(tmp_path / "old", CONTAINERD_2X_MODULES, inline_strings=False)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(
        write_go_binary(tmp_path / "whole", CONTAINERD_2X_MODULES).read_bytes()[:80]
    )

    assert go_module_info(str(write_go_binary(tmp_path / "go", "path\tx\n"))) == "path\tx\n"
    for path in (text, old, truncated, tmp_path / "missing"):
        assert go_module_info(str(path)) is None, path


# -- -info ---------------------------------------------------------------------------------------


def run_info(stdin: bytes) -> RuntimeInfo:
    result = subprocess.run([SHIM, "-info"], input=stdin, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return RuntimeInfo.FromString(result.stdout)


def test_info_reports_the_runtime_and_runc_features() -> None:
    options = Any(type_url="containerd.runc.v1.Options", value=RuncOptions().SerializeToString())

    for stdin in (b"", options.SerializeToString()):
        info = run_info(stdin)

        assert info.name == "io.containerd.pyrunc.v1"
        assert info.version.version
        assert info.features.type_url == (
            "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
        )
        features = json.loads(info.features.value)
        assert features["ociVersionMin"] and "mountOptions" in features
    assert info.options == options  # echoed


def test_info_without_a_features_command_still_answers() -> None:
    missing = RuncOptions(binary_name="/nonexistent/runc").SerializeToString()
    options = Any(type_url="containerd.runc.v1.Options", value=missing)

    info = run_info(options.SerializeToString())

    assert info.name == "io.containerd.pyrunc.v1"
    assert not info.HasField("features")
    assert run_info(RUNTIMEOPTIONS_ANY).HasField("features")  # unknown options are ignored
