#!/usr/bin/env python3
"""Unary ttrpc round trips: our client against our server (started here in a child process), or
against any Task server given with --address (e.g. a Go shim: State on --id). Prints JSON.

    .venv/bin/python scripts/bench_ttrpc.py [--calls N] [--concurrency C]
    .venv/bin/python scripts/bench_ttrpc.py --address unix:///run/containerd/s/<hash> --id <ctr>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shim.api.task.v2 import shim_pb2  # noqa: E402
from shim.ttrpc.errors import TtrpcError  # noqa: E402
from shim.ttrpc.testing import connect_when_ready  # noqa: E402

TASK = "containerd.task.v2.Task"


async def serve(path: str) -> None:
    from google.protobuf import timestamp_pb2

    from shim.ttrpc.server import Server
    from shim.ttrpc.service import service_from_descriptor
    from shim.ttrpc.testing import bind_unix

    class Task:
        async def State(self, request: Any, ctx: Any) -> Any:
            return shim_pb2.StateResponse(
                id=request.id,
                bundle="/run/containerd/io.containerd.runtime.v2.task/default/" + request.id,
                pid=4242,
                status=2,
                stdout="/run/containerd/fifo/1234/" + request.id + "-stdout",
                stderr="/run/containerd/fifo/1234/" + request.id + "-stderr",
                exited_at=timestamp_pb2.Timestamp(seconds=-62135596800),
            )

    server = Server()
    server.register(service_from_descriptor(shim_pb2.DESCRIPTOR.services_by_name["Task"]), Task())
    await server.serve(bind_unix(path))


async def bench(address: str, container_id: str, calls: int, concurrency: int) -> dict[str, Any]:
    client = await connect_when_ready(address)
    request = shim_pb2.StateRequest(id=container_id)
    errors = 0

    async def one() -> None:
        nonlocal errors
        try:
            await client.call(TASK, "State", request, shim_pb2.StateResponse, timeout=5)
        except TtrpcError as exc:
            if exc.code == 4:  # a timeout is a failure of the benchmark, not a reply
                raise
            errors += 1  # e.g. NotFound from a shim without that container: still a round trip

    for _ in range(min(1000, calls)):  # warm up
        await one()
    errors = 0

    latencies = []
    started = time.perf_counter()
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        await one()
        latencies.append(time.perf_counter_ns() - t0)
    serial_s = time.perf_counter() - started

    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    started = time.perf_counter()
    share = calls // concurrency
    await asyncio.gather(*(worker(share) for _ in range(concurrency)))
    concurrent_s = time.perf_counter() - started
    await client.close()

    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    return {
        "calls": calls,
        "error_replies": errors,
        "serial_calls_per_s": round(calls / serial_s),
        "p50_us": round(q[49] / 1000, 1),
        "p99_us": round(q[98] / 1000, 1),
        "concurrency": concurrency,
        "concurrent_calls_per_s": round(share * concurrency / concurrent_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", help="benchmark this server instead of starting ours")
    parser.add_argument("--id", default="bench", help="container id for State")
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--serve", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        asyncio.run(serve(args.serve))
        return

    result: dict[str, Any] = {"python": sys.version.split()[0]}
    if args.address:
        result["server"] = args.address
        result.update(asyncio.run(bench(args.address, args.id, args.calls, args.concurrency)))
    else:
        directory = tempfile.mkdtemp(prefix="bench-ttrpc-")
        path = os.path.join(directory, "s")
        child = subprocess.Popen([sys.executable, __file__, "--serve", path])
        try:
            result["server"] = "pyshim ttrpc (child process)"
            result.update(asyncio.run(bench(path, args.id, args.calls, args.concurrency)))
        finally:
            child.terminate()
            child.wait()
            shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
