"""An HTTP proxy in front of a real tiled server that answers chosen requests with 503, the way a
server busy with other sessions does: before the request reaches tiled ("refused") or after tiled
carried it out ("reply lost", the ambiguous case a retry must not duplicate)."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-encoding",
               "content-length", "accept-encoding"}


@dataclass
class Fault:
    method: str
    path_part: str          # the request path contains this
    times: int              # how many matching requests fail
    reply_lost: bool        # True: tiled carries the request out, the client gets 503 anyway
    done: int = 0


class FaultyProxy:
    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []      # (method, path) of every request
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=60)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                fault = proxy._fault_for(self.command, self.path)
                if fault is None or fault.reply_lost:
                    # Host stays the proxy's: tiled builds the links it returns from it
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in _HOP_BY_HOP}
                    up = proxy._client.request(self.command, proxy.upstream + self.path,
                                               content=body, headers=headers)
                if fault is not None:
                    self._reply(503, b'{"detail": "busy (injected by the test proxy)"}',
                                {"content-type": "application/json"})
                    return
                self._reply(up.status_code, up.content,
                            {k: v for k, v in up.headers.items() if k.lower() not in _HOP_BY_HOP})

            def _reply(self, status: int, content: bytes, headers: dict) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail(self, method: str, path_part: str, times: int, *, reply_lost: bool = False) -> Fault:
        fault = Fault(method, path_part, times, reply_lost)
        self.faults.append(fault)
        return fault

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.requests.append((method, path))
            for fault in self.faults:
                if fault.method == method and fault.path_part in path and fault.done < fault.times:
                    fault.done += 1
                    return fault
        return None

    def __enter__(self) -> "FaultyProxy":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()
