"""A fault-injecting HTTP proxy for tests: a real HTTP server on 127.0.0.1 that forwards every
request to an upstream server (moto's S3 server, an `mlflow server`) and, on command, answers
the next N requests with an error (an outage that ends), holds a matching request until the
test lets it go (a pod killed in the middle of a request), or refuses every write as S3 refuses
a read-only credential (403 AccessDenied for PUT, POST and DELETE)."""

from __future__ import annotations

import http.client
import http.server
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
}
OUTAGE_BODY = b"<Error><Code>ServiceUnavailable</Code><Message>injected outage</Message></Error>"
DENIED_BODY = b"<Error><Code>AccessDenied</Code><Message>read-only credential</Message></Error>"
WRITES = {"PUT", "POST", "DELETE", "PATCH"}


class FaultProxy:
    """Forwards to `upstream` (http://host:port); see the module docstring."""

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.upstream_url = upstream
        self.writes_denied = False
        self.denied = 0
        self.lock = threading.Lock()
        self.failures_left = 0
        self.failed = 0
        self.forwarded = 0
        self.hold_when: Callable[[str, str], bool] | None = None
        self.held = threading.Event()
        self.released = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_one(self):
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_PATCH = handle_one

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail_next(self, count: int) -> None:
        """Answer the next `count` requests with 503 Service Unavailable."""
        with self.lock:
            self.failures_left = count

    def hold(self, when: Callable[[str, str], bool]) -> None:
        """Hold the first request for which `when(method, path)` is true until `release()`; then
        drop it unanswered (its client is expected to be gone by then)."""
        self.held.clear()
        self.released.clear()
        self.hold_when = when

    def deny_writes(self) -> None:
        """From now on, answer every write with 403 AccessDenied (counted in `denied`)."""
        self.writes_denied = True

    def release(self) -> None:
        self.hold_when = None
        self.released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        body = self._body(request)
        with self.lock:
            failing = self.failures_left > 0
            if failing:
                self.failures_left -= 1
                self.failed += 1
            holding = (
                self.hold_when is not None
                and not self.held.is_set()
                and self.hold_when(request.command, request.path)
            )
            if holding:
                self.held.set()
        if failing:
            self._answer(request, 503, {"Content-Type": "application/xml"}, OUTAGE_BODY)
            return
        if self.writes_denied and request.command in WRITES:
            with self.lock:
                self.denied += 1
            self._answer(request, 403, {"Content-Type": "application/xml"}, DENIED_BODY)
            return
        if holding:
            self.released.wait(timeout=600)
            request.close_connection = True
            return
        status, headers, payload = self._forward(request, body)
        with self.lock:
            self.forwarded += 1
        self._answer(request, status, headers, payload)

    @staticmethod
    def _body(request: http.server.BaseHTTPRequestHandler) -> bytes:
        if request.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(request.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    request.rfile.readline()
                    return b"".join(chunks)
                chunks.append(request.rfile.read(size))
                request.rfile.readline()
        return request.rfile.read(int(request.headers.get("Content-Length") or 0))

    def _forward(self, request, body: bytes) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(*self.upstream, timeout=300)
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            connection.request(request.command, request.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            kept = {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP}
            if request.command == "HEAD" and response.getheader("Content-Length"):
                kept["Content-Length"] = response.getheader("Content-Length")  # the object's size
            return response.status, kept, payload
        finally:
            connection.close()

    @staticmethod
    def _answer(request, status: int, headers: dict[str, str], payload: bytes) -> None:
        request.send_response(status)
        headers = {"Content-Length": str(len(payload)), **headers}
        for key, value in headers.items():
            request.send_header(key, value)
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(payload)
