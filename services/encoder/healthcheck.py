"""The encoder image's HEALTHCHECK: healthy once this container's model is loaded and ready.

Triton's /v2/health/ready answers 200 as soon as the server is up, before PyTriton has loaded any model (and while
it retries a failed load), and its repository index is a restricted endpoint. So this asks the model's own
readiness, ``/v2/models/<modality>_encoder/ready``, reading the modality from the container's command line (PID 1
is the image's entrypoint, `modalink serve encoder ... --modality M`). Standard library only: it runs every 30 s.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def modality(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg in ("--modality", "-m") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--modality="):
            return arg.split("=", 1)[1]
    return "image"  # the image's default CMD


def main() -> int:
    with open("/proc/1/cmdline", "rb") as f:
        argv = f.read().decode(errors="replace").split("\0")
    host = os.environ.get("MODALINK_HOST", "127.0.0.1")
    url = f"http://{host}:8000/v2/models/{modality(argv)}_encoder/ready"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return 0 if r.status == 200 else 1
    except OSError as e:  # refused, or 400: the model is not loaded (yet)
        print(f"{url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
