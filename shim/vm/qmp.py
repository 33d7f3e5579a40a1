"""A QMP client (QEMU's JSON control protocol on a unix socket), for what a VM's command line
cannot say: saving a template's state and restoring it into a clone.

QMP is one JSON object per line: a greeting, then per command one reply ("return" or
"error"), with asynchronous "event" objects in between, which we have no use for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

CONNECT_POLL = 0.02  # QEMU creates its socket early in its start, but not at once
REPLY_LIMIT = 1 << 20


class QmpError(Exception):
    pass


class Qmp:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, path: Path, timeout: float) -> Qmp:
        """Connected and in command mode; TimeoutError if QEMU does not listen in time."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    reader, writer = await asyncio.open_unix_connection(
                        str(path), limit=REPLY_LIMIT
                    )
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await asyncio.sleep(CONNECT_POLL)
            qmp = cls(reader, writer)
            await qmp._message()  # the greeting
            await qmp.execute("qmp_capabilities")
        return qmp

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """The command's "return" value; QmpError with QEMU's description if it failed."""
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self._writer.write(json.dumps(message).encode() + b"\n")
        await self._writer.drain()
        while True:
            reply = await self._message()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")

    async def _message(self) -> dict[str, Any]:
        line = await self._reader.readline()
        if not line:
            raise QmpError("QEMU closed its control socket")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise QmpError(f"not a QMP message: {line[:200]!r}")
        return message

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
