"""The runsc backend's pure parts: runsc.toml through runtime options, stats conversion, and
the OCI-CLI error reader it shares with runc."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.any_pb2 import Any

from shim.api.cgroups.v1 import metrics_pb2 as v1
from shim.api.cgroups.v2 import metrics_pb2 as v2
from shim.api.runtimeoptions.v1.api_pb2 import Options
from shim.runtimes.oci import last_runtime_error
from shim.runtimes.runsc import RunscOptions, metrics_from_runsc
from shim.ttrpc.errors import Code, TtrpcError

NO_NETNS_SPEC = {"linux": {"namespaces": [{"type": "pid"}, {"type": "network"}]}}
CNI_SPEC = {"linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/x"}]}}


def runtime_options(config_path: Path, type_url: str = "") -> Any:
    value = Options(type_url=type_url, config_path=str(config_path)).SerializeToString()
    return Any(type_url="runtimeoptions.v1.Options", value=value)


def test_runsc_toml_flags_become_global_flags_with_the_id_expanded(tmp_path: Path) -> None:
    config = tmp_path / "runsc.toml"
    config.write_text(
        'binary_name = "/opt/runsc"\nroot = "/r"\n'
        '[runsc_config]\ndebug = true\ndebug-log = "/logs/%ID%/"\nplatform = "ptrace"\n'
    )

    options = RunscOptions.for_container(runtime_options(config), "c1", NO_NETNS_SPEC)

    args = options.global_args("ns", "/bundle")
    assert args[:3] == ["/opt/runsc", "--root", "/r/ns"]
    assert args[-4:] == [
        "--debug=true",
        "--debug-log=/logs/c1/",
        "--platform=ptrace",
        "--network=none",
    ]


def test_a_network_namespace_to_join_keeps_the_sandbox_network() -> None:
    assert "network" not in RunscOptions.for_container(None, "c1", CNI_SPEC).flags
    assert RunscOptions.for_container(None, "c1", NO_NETNS_SPEC).flags == {"network": "none"}


def test_configured_network_wins(tmp_path: Path) -> None:
    config = tmp_path / "runsc.toml"
    config.write_text('[runsc_config]\nnetwork = "host"\n')

    options = RunscOptions.for_container(runtime_options(config), "c1", NO_NETNS_SPEC)

    assert options.flags == {"network": "host"}


def test_foreign_option_types_are_ignored(tmp_path: Path) -> None:
    config = tmp_path / "other.toml"
    config.write_text("[runsc_config]\ndebug = true\n")
    runc_options = Any(type_url="containerd.runc.v1.Options", value=b"")

    assert RunscOptions.for_container(runc_options, "c1", CNI_SPEC) == RunscOptions()
    other = runtime_options(config, type_url="io.containerd.kata.v2.options")
    assert RunscOptions.for_container(other, "c1", CNI_SPEC) == RunscOptions()


def test_a_missing_or_broken_config_file_is_invalid_argument(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[runsc_config\n")
    for path in (tmp_path / "missing.toml", broken):
        with pytest.raises(TtrpcError) as raised:
            RunscOptions.for_container(runtime_options(path), "c1", CNI_SPEC)
        assert raised.value.code == Code.INVALID_ARGUMENT
        assert str(path) in str(raised.value)


def test_saved_options_load_back(tmp_path: Path) -> None:
    options = RunscOptions(binary_name="/opt/runsc", flags={"network": "none"})
    options.save(str(tmp_path))

    assert RunscOptions.load(str(tmp_path)) == options
    assert RunscOptions.load(str(tmp_path / "gone")) == RunscOptions()


STATS = {
    "cpu": {"usage": {"total": 5_000_000, "kernel": 1_000_000, "user": 4_000_000}},
    "memory": {"usage": {"usage": 2457600, "limit": 0}, "swap": {"usage": 7}},
    "pids": {"current": 2},
}


def test_stats_as_cgroup_v1_metrics() -> None:
    converted = metrics_from_runsc(STATS, 1)

    assert converted.type_url == "io.containerd.cgroups.v1.Metrics"
    metrics = v1.Metrics.FromString(converted.value)
    assert metrics.cpu.usage.total == 5_000_000
    assert metrics.memory.usage.usage == 2457600
    assert metrics.memory.swap.usage == 7
    assert metrics.pids.current == 2


def test_stats_as_cgroup_v2_metrics() -> None:
    converted = metrics_from_runsc(STATS, 2)

    assert converted.type_url == "io.containerd.cgroups.v2.Metrics"
    metrics = v2.Metrics.FromString(converted.value)
    assert (metrics.cpu.usage_usec, metrics.cpu.system_usec) == (5000, 1000)
    assert metrics.memory.usage == 2457600
    assert metrics.pids.current == 2


def test_runtime_error_from_back_to_back_json_log(tmp_path: Path) -> None:
    # runsc writes its JSON log entries without newlines between them; runc one per line.
    (tmp_path / "log.json").write_text(
        '{"msg":"first","level":"error"}{"msg":"noise","level":"info"}'
        '{"msg":"last one","level":"error"}\n{"msg":"torn'
    )

    assert last_runtime_error(str(tmp_path)) == "last one"
