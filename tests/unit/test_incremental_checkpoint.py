"""Incremental checkpoints: pyshim.checkpoint.v1.IncrementalCheckpoint appended to the
CheckpointOptions a client sends, read by the runc backend (runc's flags, bad input refused
before runc runs) and refused by the backends that cannot honour it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from google.protobuf.any_pb2 import Any

from shim.api.checkpoint.v1.checkpoint_pb2 import IncrementalCheckpoint
from shim.api.runc.options_pb2 import CheckpointOptions
from shim.runtimes import oci
from shim.runtimes.base import CheckpointRequest, ContainerConfig, ProcessStdio
from shim.runtimes.runc import RuncContainer
from shim.sys.spawn import CommandResult
from shim.ttrpc.errors import Code, TtrpcError


def request(
    path: str = "",
    type_url: str = oci.CHECKPOINT_OPTIONS_URL,
    incremental: IncrementalCheckpoint | None = None,
    **options: object,
) -> CheckpointRequest:
    value = CheckpointOptions(**options).SerializeToString()  # type: ignore[arg-type]
    if incremental is not None:
        value += incremental.SerializeToString()  # as a client sends it: the two concatenated
    return CheckpointRequest(path, Any(type_url=type_url, value=value))


def test_both_messages_read_from_one_checkpoint_options_any() -> None:
    sent = request(
        incremental=IncrementalCheckpoint(pre_dump=True, parent_path="../pre"),
        image_path="/ck",
        open_tcp=True,
    )
    options, incremental = oci.checkpoint_options(sent), oci.incremental_checkpoint(sent)
    assert (options.image_path, options.open_tcp) == ("/ck", True)
    assert (incremental.pre_dump, incremental.parent_path) == (True, "../pre")
    # Unknown to runc's message, yet kept: pykata re-encodes it for its guest.
    again = CheckpointOptions.FromString(options.SerializeToString()).SerializeToString()
    assert IncrementalCheckpoint.FromString(again).parent_path == "../pre"


def test_no_options_mean_a_full_dump() -> None:
    assert not oci.incremental_checkpoint(CheckpointRequest("/ck", None)).pre_dump
    assert oci.checkpoint_options(CheckpointRequest("/ck", Any())).image_path == ""
    oci.refuse_incremental_checkpoint(request(image_path="/ck"), "never")  # nothing to refuse


@pytest.mark.parametrize(
    ("sent", "message"),
    [
        (request(type_url="other.Options", exit=True), "of type other.Options: expected"),
        (
            CheckpointRequest("/ck", Any(type_url=oci.CHECKPOINT_OPTIONS_URL, value=b"\x0a")),
            "Error parsing",
        ),
    ],
)
def test_options_of_another_type_or_that_do_not_decode_are_refused(
    sent: CheckpointRequest, message: str
) -> None:
    """As containerd's runc shim refuses them, rather than a checkpoint other than asked for."""
    for read in (oci.checkpoint_options, oci.incremental_checkpoint):
        with pytest.raises(TtrpcError, match=message) as caught:
            read(sent)
        assert caught.value.code is Code.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "incremental", [IncrementalCheckpoint(pre_dump=True), IncrementalCheckpoint(parent_path="p")]
)
def test_backends_without_incremental_dumps_refuse_them(
    incremental: IncrementalCheckpoint,
) -> None:
    with pytest.raises(
        NotImplementedError, match=r"incremental checkpoint \(pre_dump, parent_path\): because"
    ):
        oci.refuse_incremental_checkpoint(request(incremental=incremental), "because")


class Runc:
    """A runc container whose runc only records its command lines."""

    def __init__(self, tmp_path: Path) -> None:
        bundle = tmp_path / "bundle"
        bundle.mkdir()
        runtime = SimpleNamespace(context=SimpleNamespace(namespace="ns", reaper=None))
        config = ContainerConfig("c1", str(bundle), ProcessStdio(None, None, None, False), None)
        self.container = RuncContainer(runtime, config)  # type: ignore[arg-type]
        self.calls: list[tuple[str, ...]] = []

        async def cli(*args: str, input: bytes | None = None, fds: object = None) -> CommandResult:
            self.calls.append(args)
            return CommandResult(0, b"", b"")

        self.container._cli = cli  # type: ignore[method-assign]

    def checkpoint(self, sent: CheckpointRequest) -> list[str]:
        asyncio.run(self.container.checkpoint(sent))
        (call,) = self.calls
        return list(call)


def criu_image(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "inventory.img").write_bytes(b"")
    return path


def test_a_pre_dump_then_a_dump_on_its_parent(tmp_path: Path) -> None:
    runc = Runc(tmp_path)
    pre = request(incremental=IncrementalCheckpoint(pre_dump=True), image_path=str(tmp_path / "1"))
    args = runc.checkpoint(pre)
    assert args[:3] == ["checkpoint", "--image-path", str(tmp_path / "1")]
    assert "--pre-dump" in args and "--leave-running" in args and "--parent-path" not in args

    criu_image(tmp_path / "1")
    for parent in ("../1", str(tmp_path / "1")):  # relative to the image dir, or absolute
        runc.calls.clear()
        final = request(
            incremental=IncrementalCheckpoint(parent_path=parent),
            image_path=str(tmp_path / "2"),
            exit=True,
        )
        args = runc.checkpoint(final)
        assert args[args.index("--parent-path") + 1] == "../1"  # runc takes relative ones only
        assert "--pre-dump" not in args and "--leave-running" not in args


def test_the_cgroups_mode_reaches_runc(tmp_path: Path) -> None:
    args = Runc(tmp_path).checkpoint(request(path="/tmp/ctd-checkpoint1", cgroups_mode="full"))
    assert args[args.index("--manage-cgroups-mode") + 1] == "full"


def test_the_client_s_image_path_wins_over_containerd_s_temporary_dir(tmp_path: Path) -> None:
    runc = Runc(tmp_path)
    args = runc.checkpoint(request(path="/tmp/ctd-checkpoint1", image_path=str(tmp_path / "i")))
    assert args[2] == str(tmp_path / "i")
    runc.calls.clear()
    assert runc.checkpoint(request(path="/tmp/ctd-checkpoint2"))[2] == "/tmp/ctd-checkpoint2"


@pytest.mark.parametrize(
    ("incremental", "options", "message"),
    [
        (
            IncrementalCheckpoint(pre_dump=True),
            {"exit": True},
            "a pre-dump leaves the container running, exit cannot be set",
        ),
        (IncrementalCheckpoint(parent_path="../none"), {}, "parent '../none' ("),
        (IncrementalCheckpoint(parent_path="../empty"), {}, "is no CRIU image"),
    ],
)
def test_contradictory_options_and_a_missing_parent_are_refused_before_runc(
    tmp_path: Path, incremental: IncrementalCheckpoint, options: dict[str, bool], message: str
) -> None:
    (tmp_path / "empty").mkdir()  # a directory, but no image in it
    runc = Runc(tmp_path)
    sent = request(incremental=incremental, image_path=str(tmp_path / "image"), **options)
    with pytest.raises(TtrpcError) as refused:
        asyncio.run(runc.container.checkpoint(sent))
    assert refused.value.code == Code.INVALID_ARGUMENT
    assert message in refused.value.message
    assert runc.calls == []
