"""The daemon's configuration: one frozen value built from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from modeld.http.protocol import Limits
from modeld.worker import STREAM_INTERVAL_MS

DEFAULT_LISTEN = "127.0.0.1:8484"  # loopback only: modeld serves this machine


@dataclass(frozen=True)
class Config:
    models_dir: Path
    socket_path: Path | None
    listen: tuple[str, int] | None
    default_model: str | None = None
    socket_mode: int = 0o600
    vram_budget_mb: int | None = None
    vram_margin_mb: int = 512
    n_ctx: int = 2048
    n_gpu_layers: int = -1
    threads: int = 0
    flash_attn: str = "auto"
    n_batch: int = 512
    stream_interval_ms: int = STREAM_INTERVAL_MS
    stream_handoff: bool = True  # workers write streams onto the client socket themselves
    max_queue_depth: int = 32
    max_wait_ms: int = 30_000
    max_inflight: int = 0
    preload: tuple[str, ...] = ()
    pin: tuple[str, ...] = ()
    idle_unload_s: float = 0.0
    load_timeout_s: float = 120.0
    shutdown_grace_s: float = 5.0
    follow_symlinks: bool = False
    spare_worker: bool = True
    log_level: str = "info"
    log_format: str = "auto"
    limits: Limits = field(default_factory=Limits)


def parse_listen(value: str) -> tuple[str, int] | None:
    """`HOST:PORT` or `[v6]:PORT`; '' or 'none' turns TCP off."""
    value = value.strip()
    if value.lower() in ("", "none", "off"):
        return None
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)
