"""A real loopback HTTP server whose answers a test scripts in advance.

Used for API faults that the emulator does not model on purpose (a cut connection, a
slow answer, odd bodies). Each queued answer is consumed by one request; requests are
recorded with their headers and bodies.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Answer:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    cut: bool = False  # close the socket without answering


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class StubServer:
    def __init__(self) -> None:
        self.answers: deque[Answer] = deque()
        self.default = Answer(404, {"detail": "no answer queued"})
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                with stub._lock:
                    stub.seen.append(Seen(self.command, self.path, dict(self.headers), body))
                    answer = stub.answers.popleft() if stub.answers else stub.default
                if answer.delay:
                    time.sleep(answer.delay)
                if answer.cut:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                payload = b""
                if answer.body is not None:
                    payload = (
                        answer.body.encode()
                        if isinstance(answer.body, str)
                        else json.dumps(answer.body).encode()
                    )
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in answer.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def queue(self, *answers: Answer) -> None:
        with self._lock:
            self.answers.extend(answers)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
