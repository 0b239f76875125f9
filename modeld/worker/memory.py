"""What a loaded model takes in memory, as the worker measures it (see docs/vram.md)."""

from __future__ import annotations

import re

MIB = 1024 * 1024
# llama.cpp logs each context buffer as "<dev> KV|compute|output|RS buffer size = X MiB".
CTX_BUFFER_RE = re.compile(rb"\b(?:KV|compute|output|RS) buffer size =\s*([0-9.]+) MiB")
# On the CPU, memory beyond llama.cpp's model and context buffers that a worker touches
# once a long prompt runs (thread pool work buffers, token buffers, allocator slack):
# 12-13 MiB measured on models from 0.5 to 92 MiB (docs/vram.md).
CPU_RUNTIME_MB = 16.0


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process (this one by default) in MiB, from /proc (0.0 where
    there is none, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def logged_ctx_bytes(ctx_log: list[bytes]) -> int:
    """The context buffers (KV, compute, output) llama.cpp logged while creating it."""
    return int(sum(float(m.group(1)) for m in CTX_BUFFER_RE.finditer(b"".join(ctx_log))) * MIB)


def accounted_mb(base_mb: float, rss_after_mb: float, model_bytes: int, ctx_bytes: int) -> float:
    """What a CPU worker is counted at: RSS right after the warm-up misses the KV cache and
    compute buffer pages a long prompt will touch; llama.cpp's own sizes do not."""
    return max(rss_after_mb, base_mb + (model_bytes + ctx_bytes) / MIB + CPU_RUNTIME_MB)
