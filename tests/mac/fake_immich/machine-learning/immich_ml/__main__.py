"""
``python -m immich_ml``: start the server as a child, as Immich starts
gunicorn, and wait for it.

FAKE_IMMICH_CRASH=N: say so on stderr and exit with code N at once.
"""

import os
import subprocess
import sys

print(f"fake immich_ml starting, pid {os.getpid()}", flush=True)
if crash := os.environ.get("FAKE_IMMICH_CRASH"):
    print(f"fake immich_ml crashing with exit code {crash}", file=sys.stderr, flush=True)
    sys.exit(int(crash))

with subprocess.Popen(["python", "-m", "immich_ml.server"]) as server:
    server.wait()
sys.exit(server.returncode)
