"""The guest agent: ``python -m shim.agent --listen PATH | --device /dev/vportNpM``.

Serves the Agent API (proto/pyshim/agent/v1) with our ttrpc on a unix socket (host tests) or
on a virtio-serial port (in the VM); runs containers under an OCI runtime with runc's CLI (crun
or runc) as a child subreaper that reaps every process through the one reaper. SIGTERM/SIGINT:
the containers are killed and removed.
"""

from __future__ import annotations

import sys

# asyncio imports ssl, and with it OpenSSL (libssl and libcrypto, read over 9p in the VM),
# though the agent speaks no TLS; asyncio takes the failed import as no TLS.
sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402

from shim.agent import guest, network  # noqa: E402, F401  (see serve)
from shim.agent.channel import serve_device  # noqa: E402
from shim.agent.service import AgentService  # noqa: E402
from shim.agent.specversion import SpecLimitedRuntime, declared_spec_version  # noqa: E402
from shim.api.agent.v1 import agent_pb2 as api  # noqa: E402
from shim.api.runc.options_pb2 import Options as RuncOptions  # noqa: E402
from shim.runtimes.base import ShimContext  # noqa: E402
from shim.sys.reaper import Reaper  # noqa: E402
from shim.sys.spawn import run_command  # noqa: E402
from shim.ttrpc.server import Server  # noqa: E402
from shim.ttrpc.service import service_from_descriptor  # noqa: E402

log = logging.getLogger("shim.agent")

NAMESPACE = "agent"  # the runtime keeps its state in <runtime root>/agent/<container id>
RUNTIME_NAME = "io.containerd.pykata.v1"
SHUTDOWN_GRACE = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m shim.agent", description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", metavar="PATH", help="serve on a unix socket at PATH")
    where.add_argument("--device", metavar="PATH", help="serve on a virtio-serial port")
    parser.add_argument("--state-dir", default="/run/pyshim-agent", help="bundles go here")
    parser.add_argument(
        "--runtime", default="runc", help="the OCI runtime binary, one with runc's CLI (crun, runc)"
    )
    parser.add_argument(
        "--runtime-root", help="the runtime's state root (default: /run/<the binary's name>)"
    )
    parser.add_argument(
        "--no-pivot", action="store_true", help="--no-pivot to create (a rootfs on an initramfs)"
    )
    parser.add_argument("--debug", action="store_true")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    reaper = Reaper.install(loop)
    os.makedirs(args.state_dir, mode=0o700, exist_ok=True)
    # In a VM template, the runtime's binary read here stays in its RAM: no clone reads or
    # decompresses it from the image again.
    version = ""
    with contextlib.suppress(OSError):  # no such binary: CreateContainer says so
        version = (await run_command(reaper, [args.runtime, "--version"])).stdout.decode()
    context = ShimContext(NAMESPACE, RUNTIME_NAME, reaper, args.debug)
    runtime = SpecLimitedRuntime(context, declared_spec_version(version))
    root = args.runtime_root or os.path.join("/run", os.path.basename(args.runtime))
    options = RuncOptions(binary_name=args.runtime, root=root, no_pivot_root=args.no_pivot)
    service = AgentService(runtime, args.state_dir, options)
    server = Server()
    server.register(service_from_descriptor(api.DESCRIPTOR.services_by_name["Agent"]), service)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if args.listen:
        from shim.manager import bind_socket  # host tests only: hashlib and OpenSSL otherwise

        sock = bind_socket(args.listen)
        if sock is None:
            raise SystemExit(f"an agent already serves {args.listen}")
        serving = loop.create_task(server.serve(sock))
    else:
        # A VM template is saved once the agent opens its port: what the agent has imported
        # (guest and network, above, though only some calls need them) is in its RAM.
        serving = loop.create_task(serve_device(server, args.device))
    log.info("agent serving on %s", args.listen or args.device)
    await stop.wait()
    await server.shutdown(SHUTDOWN_GRACE)
    if args.device:
        serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    await service.close()
    if args.listen:
        with contextlib.suppress(OSError):
            os.unlink(args.listen)
    reaper.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s agent %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
