"""Entry point: `python -m modeld.worker` (spawned by the daemon, one per loaded model)."""

from __future__ import annotations

from modeld.worker.main import main

raise SystemExit(main())
