"""A web page for http Corpus sources, served on loopback, that a test can make fail and recover."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cartridges.process import free_port


@dataclass
class WebPage:
    """Answers ``status`` with ``body``: set it to an error (a 503 while the site is down) and back to 200."""

    url: str
    body: bytes = b"Fetched over HTTP. " * 10
    status: int = 200


@contextmanager
def serve_page() -> Iterator[WebPage]:
    page: WebPage

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(page.status)
            self.end_headers()
            self.wfile.write(page.body if page.status == 200 else b"unavailable")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    page = WebPage(f"http://127.0.0.1:{server.server_port}/page")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield page
    server.shutdown()
