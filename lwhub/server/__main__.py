"""``python -m lwhub.server DATA_DIR [--host H] [--port P] [--workers N] [--upload-idle S]``: run the registry."""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from .run import run_server

parser = argparse.ArgumentParser(prog="python -m lwhub.server", description=__doc__)
parser.add_argument("data_dir")
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8700)
parser.add_argument("--workers", type=int, default=1)
parser.add_argument("--instance", default="")
parser.add_argument("--upload-idle", type=float, default=None, help="seconds a request body (an upload or JSON) may send nothing (default 60)")
args = parser.parse_args()
try:
    run_server(args.data_dir, host=args.host, port=args.port, workers=args.workers, instance=args.instance,
               upload_idle=args.upload_idle)  # fmt: skip
except UsageError as exc:
    sys.exit(f"python -m lwhub.server: {exc}")
