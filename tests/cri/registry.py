"""A read-only OCI distribution registry on loopback, serving the image of an OCI image-layout
tar (scripts/build-image's) under one repository and tag.

For the tests whose containerd must pull: CRI's restore of a checkpoint archive pulls the
checkpoint's base image by digest (containerd 2.x, CRImportCheckpoint), and containerd talks
plain HTTP to a registry on localhost. Only what a pull asks is served: `GET /v2/`, and `HEAD`
/ `GET` of a manifest by tag or digest and of a blob by digest.
"""

from __future__ import annotations

import contextlib
import json
import re
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROUTE = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)$")


class Image:
    """The blobs of a layout tar and its one manifest (index.json's first)."""

    def __init__(self, layout_tar: Path) -> None:
        self.blobs: dict[str, bytes] = {}
        with tarfile.open(layout_tar) as tar:
            for member in tar.getmembers():
                directory, _, name = member.name.rpartition("/")
                data = tar.extractfile(member) if member.isfile() else None
                if directory == "blobs/sha256" and data is not None:
                    self.blobs[f"sha256:{name}"] = data.read()
            index_file = tar.extractfile("index.json")
            if index_file is None:
                raise ValueError(f"{layout_tar} has no index.json")
            manifest = json.load(index_file)["manifests"][0]
        self.manifest_digest: str = manifest["digest"]
        self.manifest_type: str = manifest["mediaType"]


@contextmanager
def serving(layout_tar: Path, repository: str, tag: str, hosts_dir: Path) -> Iterator[str]:
    """Serve the image as `localhost:<port>/<repository>:<tag>` (the reference yielded) while
    the block runs, with its hosts.toml in hosts_dir (containerd's registry config_path): CRI
    pulls over TLS unless a host's configuration says plain HTTP."""
    image = Image(layout_tar)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def _answer(self, body: bool) -> None:
            if self.path == "/v2/":
                self._send(200, "application/json", b"{}", body)
                return
            route = ROUTE.match(self.path)
            if route is None or route["name"] != repository:
                self._send(404, "application/json", b'{"errors":[]}', body)
                return
            reference = route["reference"]
            if route["kind"] == "manifests":
                digest = image.manifest_digest if reference == tag else reference
                media_type = image.manifest_type if digest == image.manifest_digest else ""
            else:
                digest, media_type = reference, "application/octet-stream"
            data = image.blobs.get(digest) if media_type else None
            if data is None:
                self._send(404, "application/json", b'{"errors":[]}', body)
                return
            self._send(200, media_type, data, body, digest)

        def _send(
            self, status: int, media_type: str, data: bytes, body: bool, digest: str = ""
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", media_type)
            self.send_header("Content-Length", str(len(data)))
            if digest:
                self.send_header("Docker-Content-Digest", digest)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass  # pytest shows a failed test's own output; a request log would bury it

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"localhost:{server.server_address[1]}"
    hosts_toml = hosts_dir / host / "hosts.toml"
    try:
        hosts_toml.parent.mkdir(parents=True)
        hosts_toml.write_text(f'server = "http://{host}"\n')
        yield f"{host}/{repository}:{tag}"
    finally:
        hosts_toml.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            hosts_toml.parent.rmdir()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
