"""Runtime options that name a TOML file: ``runtimeoptions.v1.Options{config_path}``, what
``ctr --runtime-config-path`` and CRI's ``ConfigPath`` send to any non-runc runtime type."""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Collection
from typing import Any

from shim.ttrpc.errors import Code, TtrpcError

log = logging.getLogger(__name__)

OPTIONS_URL = "runtimeoptions.v1.Options"


def read_toml_config(
    options: Any | None, config_types: Collection[str], what: str
) -> dict[str, Any]:
    """The TOML file that runtime options point to; {} without one. Other option types, and
    files declared of a type not in `config_types` ("" = undeclared), are ignored (a shim must
    tolerate them); a named file that cannot be read is an error naming `what`."""
    decoded = _decoded(options)
    if decoded is None or not decoded.config_path:
        return {}
    if decoded.type_url not in config_types:
        log.info("ignoring config file %s of type %s", decoded.config_path, decoded.type_url)
        return {}
    try:
        with open(decoded.config_path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TtrpcError(Code.INVALID_ARGUMENT, f"{what} {decoded.config_path}: {exc}") from exc


def config_path(options: Any | None) -> str:
    """The TOML file that runtime options name ("" for none)."""
    decoded = _decoded(options)
    return str(decoded.config_path) if decoded is not None else ""


def _decoded(options: Any | None) -> Any | None:
    """The runtimeoptions.v1.Options of `options`, None for none or another type (logged)."""
    if options is None or options.type_url != OPTIONS_URL:
        if options is not None and options.type_url:
            log.info("ignoring runtime options of type %s", options.type_url)
        return None
    from shim.api.runtimeoptions.v1.api_pb2 import Options

    return Options.FromString(options.value)
