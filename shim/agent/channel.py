"""Serving the host over a character device: the guest's end of a virtio-serial port.

The port is one long-lived byte stream, not a listening socket, so each time a host is
connected to its other end the agent bridges it to one ttrpc connection over a socket pair.
When the host goes away (its chardev connection closes: the port reads EOF) the connection
ends, and the next host that connects gets a fresh one; what the agent holds is unaffected.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket

from shim.io.pump import Copy, Pump
from shim.ttrpc.server import Server

log = logging.getLogger(__name__)

HOST_POLL_INTERVAL = 0.1  # while no host is connected the port only reports POLLHUP
BRIDGE_BUFFER = 256 * 1024


async def serve_device(server: Server, path: str) -> None:
    """Serve every host that connects to the port at `path`, one after the other; runs until
    cancelled."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            await _host_connected(fd)
            log.debug("host connected on %s", path)
            await _bridge(server, fd)
            log.debug("host left %s", path)
        finally:
            os.close(fd)


async def _host_connected(fd: int) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLIN)  # POLLHUP is reported whether asked for or not
    while any(events & select.POLLHUP for _, events in poller.poll(0)):
        await asyncio.sleep(HOST_POLL_INTERVAL)


async def _bridge(server: Server, fd: int) -> None:
    """One ttrpc connection over the port, until either side ends it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    pumps = [
        Pump("from host", fd, ours.fileno(), Copy(BRIDGE_BUFFER), discard_on_error=False),
        Pump("to host", ours.fileno(), fd, Copy(BRIDGE_BUFFER), discard_on_error=False),
    ]
    serving = asyncio.ensure_future(server.serve_connection(theirs))
    try:
        for pump in pumps:
            pump.start()
        await asyncio.wait([pump.done for pump in pumps], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.stop()
        ours.close()  # the server's connection reads EOF and ends
        await serving
