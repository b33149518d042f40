"""
The stand-in for gunicorn + Immich ML: ``/ping``, ``/predict`` and
``/env`` (what the process sees: its pids, environment and providers).

FAKE_IMMICH_HANG_AFTER=N: answer N pings, then never answer /ping again.
FAKE_IMMICH_IGNORE_TERM=1: ignore SIGTERM (only SIGKILL stops it).
FAKE_IMMICH_PIDS=FILE: append "main-pid server-pid" to FILE once listening.
"""

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from immich_ml.sessions.ort import default_providers

HANG_AFTER = int(os.environ.get("FAKE_IMMICH_HANG_AFTER", "-1"))
pings = 0
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def _send(self, code, body, kind="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        global pings
        if self.path == "/ping":
            with lock:
                pings += 1
                hang = 0 <= HANG_AFTER < pings
            if hang:
                time.sleep(3600)
            self._send(200, b"pong", "text/plain")
        elif self.path == "/":
            self._send(200, {"message": "Immich ML"})
        elif self.path == "/env":
            self._send(
                200,
                {
                    "pid": os.getpid(),
                    "ppid": os.getppid(),
                    "pgid": os.getpgid(0),
                    "executable": sys.executable,
                    "providers": default_providers(),
                    "env": {
                        k: v
                        for k, v in os.environ.items()
                        if k.startswith(("IMMICH_", "MACHINE_LEARNING_", "IMML_")) or k in ("PATH", "PYTHONPATH")
                    },
                },
            )
        else:
            self._send(404, {"detail": "Not Found"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(length)
        if self.path == "/predict":
            self._send(200, {"clip": "[0.1,0.2,0.3]"})
        else:
            self._send(404, {"detail": "Not Found"})

    def log_message(self, format, *args):
        sys.stderr.write("fake immich_ml: " + (format % args) + "\n")


def main():
    if os.environ.get("FAKE_IMMICH_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    host = os.environ.get("IMMICH_HOST", "[::]").strip("[]")
    port = int(os.environ.get("IMMICH_PORT", "3003"))
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    if path := os.environ.get("FAKE_IMMICH_PIDS"):
        with open(path, "a") as f:
            f.write(f"{os.getppid()} {os.getpid()}\n")
    print(f"fake immich_ml listening on {host}:{port}", flush=True)
    print("fake immich_ml: a line on stderr", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
