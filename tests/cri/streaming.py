"""The client side of containerd's CRI streaming server, as kubectl exec/attach speak it: the
URL from a CRI Exec or Attach upgraded to a WebSocket with the `v4.channel.k8s.io` subprotocol.

Every binary message starts with its channel: 0 stdin, 1 stdout, 2 stderr (to and from the
process), 3 error (a JSON metav1.Status written once the command ended; v4 puts a non-zero
exit code in its causes), 4 resize (JSON `{"Width": w, "Height": h}`). The server closes the
connection after the status. v4 has no half-close of stdin: the process's stdin ends only
when the connection does (v5, which adds it, is newer than containerd 1.6 and 1.7).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any

import websocket

PROTOCOL = "v4.channel.k8s.io"
STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)


class StreamError(Exception):
    pass


class Stream:
    """One exec or attach stream; a thread collects what the server sends, per channel."""

    def __init__(self, url: str, timeout: float = 60) -> None:
        self.timeout = timeout
        self.ws = websocket.create_connection(
            "ws" + url.removeprefix("http"), subprotocols=[PROTOCOL], timeout=timeout
        )
        if self.ws.subprotocol != PROTOCOL:
            raise StreamError(f"server chose subprotocol {self.ws.subprotocol!r}")
        self.received: dict[int, bytearray] = {STDOUT: bytearray(), STDERR: bytearray()}
        self.received[ERROR] = bytearray()
        self.closed = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _read(self) -> None:
        try:
            while True:
                opcode, data = self.ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
                with self._changed:
                    self.received[data[0]] += data[1:]
                    self._changed.notify_all()
        except (websocket.WebSocketException, OSError):
            pass  # the server went away without a close frame: closed all the same
        finally:
            with self._changed:
                self.closed = True
                self._changed.notify_all()

    def _send(self, channel: int, data: bytes) -> None:
        self.ws.send_bytes(bytes([channel]) + data)

    def write(self, data: bytes) -> None:
        self._send(STDIN, data)

    def resize(self, width: int, height: int) -> None:
        self._send(RESIZE, json.dumps({"Width": width, "Height": height}).encode())

    def output(self, channel: int = STDOUT) -> bytes:
        with self._changed:
            return bytes(self.received[channel])

    def wait_for(self, text: bytes, channel: int = STDOUT, retype: bytes = b"") -> bytes:
        """All of `channel` so far once it contains `text`; `retype` is written to stdin
        first and again every half second until then (for a terminal that is still being
        resized). StreamError if the stream closes or the timeout passes without it."""
        deadline = time.monotonic() + self.timeout
        with self._changed:
            while text not in self.received[channel]:
                if self.closed or time.monotonic() > deadline:
                    raise StreamError(f"no {text!r} on channel {channel}: {self.received}")
                if retype:
                    self.write(retype)
                self._changed.wait(0.5 if retype else 1)
            return bytes(self.received[channel])

    def wait(self) -> int:
        """The exit code in the status, once the server has closed the stream."""
        self._reader.join(self.timeout)
        if self._reader.is_alive():
            raise StreamError(f"the stream is still open after {self.timeout}s: {self.received}")
        return exit_code(bytes(self.received[ERROR]))

    def close(self) -> None:
        """Detach: a close frame (the server then ends the process's stdin), then the socket."""
        if not self.closed:
            with contextlib.suppress(websocket.WebSocketException, OSError):  # already gone
                self.ws.send_close()
            self._reader.join(self.timeout)
        self.ws.shutdown()


def exit_code(status_json: bytes) -> int:
    """The exit code that a v4 status reports: 0 for Success, the ExitCode cause's for
    NonZeroExitCode; StreamError for any other status (the command could not run)."""
    if not status_json:
        raise StreamError("the server closed the stream without a status")
    status: dict[str, Any] = json.loads(status_json)
    if status.get("status") == "Success":
        return 0
    if status.get("reason") == "NonZeroExitCode":
        for cause in status["details"]["causes"]:
            if cause.get("reason") == "ExitCode":
                return int(cause["message"])
    raise StreamError(f"the command failed: {status}")
