"""The loopback HTTP servers behind the front door (the health checker, the v2 gateway's REST side)."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing itself: the front door's access log has every request."""

    def log_message(self, format: str, *args) -> None:
        pass


def loopback_server(address: str, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """A threaded HTTP server on ``address`` (a URL), one daemon thread per request."""
    parsed = urlparse(address)
    server = ThreadingHTTPServer((parsed.hostname, parsed.port), handler)
    server.daemon_threads = True
    return server
