"""Entry point: `python -m modeld.worker` (spawned by the daemon, one per loaded model)."""

from __future__ import annotations

import os
import time

# Before anything (C or Python) can print: the protocol gets a private copy of stdout,
# and fd 1 becomes stderr, so stray output lands in the daemon's debug log instead.
_PROTO_FD = os.dup(1)
os.dup2(2, 1)
_STARTED = time.perf_counter()

from modeld.worker.main import main  # noqa: E402  (loads llama.cpp: only after the fd swap)

raise SystemExit(main(_PROTO_FD, _STARTED))
