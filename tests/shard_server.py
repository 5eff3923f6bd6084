"""An HTTP server for the tests of remote data: serves a directory, counts requests, injects faults."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FAULTS = ("500", "404", "drop", "corrupt")


class _Handler(SimpleHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        name = self.path.lstrip("/")
        with self.server.mutex:
            self.server.gets[name] += 1
            queue = self.server.faults.get(name)
            fault = queue.pop(0) if queue else None
        if fault in ("500", "404"):
            self.send_error(int(fault))
            return
        path = self.server.root / name
        if fault is None or not path.is_file():
            super().do_GET()
            return
        body = bytearray(path.read_bytes())
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault == "drop":  # the connection closes halfway through the promised bytes
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        body[len(body) // 2] ^= 0xFF  # "corrupt": right length, one byte flipped
        self.wfile.write(bytes(body))

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    root: Path
    gets: Counter
    faults: dict[str, list[str]]
    mutex: threading.Lock


class ShardServer:
    """Serve ``root`` on ``http://127.0.0.1:<free port>`` while in a ``with`` block.

    ``gets[name]`` counts GET requests per file; ``fail(name, "500", "drop", ...)`` makes
    the next requests of ``name`` fail in those ways, in order (``drop``: the connection
    closes after half the bytes; ``corrupt``: one byte flipped, full length).
    """

    def __init__(self, root: Path) -> None:
        self._server = _Server(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
        self._server.root, self._server.gets = Path(root), Counter()
        self._server.faults, self._server.mutex = defaultdict(list), threading.Lock()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def gets(self) -> Counter:
        return self._server.gets

    def fail(self, name: str, *faults: str) -> None:
        assert set(faults) <= set(FAULTS), faults
        with self._server.mutex:
            self._server.faults[name].extend(faults)

    def __enter__(self) -> ShardServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
