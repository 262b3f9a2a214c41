"""A loopback HTTP server (127.0.0.1 only) for the tests of remote shards: it serves a folder, counts the bytes it
sends per file, and misbehaves on request: it cuts a file's response in half and drops the connection, or sends
more bytes than the dataset's manifest declares for the file."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path


class Loopback(http.server.ThreadingHTTPServer):
    """Serves ``root``. ``truncate[name]``: how many more responses for that file to cut in half (the client sees
    the connection drop mid-shard); ``padding[name]``: zero bytes (whole MiB) sent after the file, counted in
    its Content-Length. ``sent[name]``: the bytes that went out."""

    def __init__(self, root: Path):
        self.root = root
        self.sent: Counter[str] = Counter()
        self.truncate: dict[str, float] = {}
        self.padding: dict[str, int] = {}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def shard_bytes(self) -> int:
        return sum(n for name, n in self.sent.items() if name.endswith(".tar"))


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Loopback

    def do_GET(self) -> None:  # noqa: N802 (the base class's name)
        path = self.server.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        with self.server.lock:
            cut = self.server.truncate.get(path.name, 0) > 0
            if cut:
                self.server.truncate[path.name] -= 1
        padding = self.server.padding.get(path.name, 0)
        self.send_response(200)  # Range requests are ignored, as by many simple servers
        self.send_header("Content-Length", str(len(data) + padding))
        self.end_headers()
        chunks = [data[: len(data) // 2]] if cut else [data] + [bytes(1 << 20)] * (padding >> 20)
        try:
            for chunk in chunks:
                self.wfile.write(chunk)
                with self.server.lock:
                    self.server.sent[path.name] += len(chunk)
        except OSError:  # the client hung up: what a reader that stops early does
            self.close_connection = True
        if cut:
            self.close_connection = True

    def log_message(self, format: str, *args) -> None:  # the base class's signature
        pass


@contextlib.contextmanager
def serving(root: Path) -> Iterator[Loopback]:
    """A :class:`Loopback` on ``root``, serving from a daemon thread until the block ends (a test may stop it
    earlier with ``shutdown()``)."""
    server = Loopback(root)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
