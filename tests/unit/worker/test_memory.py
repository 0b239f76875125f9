"""What a loaded model is counted at: llama.cpp's own sizes, not the RSS after a warm-up."""

from __future__ import annotations

from modeld.worker.memory import CPU_RUNTIME_MB, MIB, accounted_mb, logged_ctx_bytes, rss_mb

LOG = [
    b"llama_kv_cache:        CPU KV buffer size =    48.00 MiB\n",
    b"llama_context:        CPU  output buffer size =     0.19 MiB\n",
    b"llama_context:        CPU compute buffer size =    96.50 MiB\n",
    b"something else = 3.00 MiB\n",
]


def test_the_context_buffers_llama_cpp_logged() -> None:
    assert logged_ctx_bytes(LOG) == int((48.0 + 0.19 + 96.5) * MIB)
    assert logged_ctx_bytes([]) == 0


def test_untouched_buffers_count_in_full() -> None:
    # A warm-up touched little: the sizes win.
    assert accounted_mb(40.0, 60.0, 92 * MIB, 145 * MIB) == 40 + 92 + 145 + CPU_RUNTIME_MB
    # The process already holds more than the sizes say: what it holds wins.
    assert accounted_mb(40.0, 500.0, 10 * MIB, 10 * MIB) == 500.0


def test_this_process_has_a_resident_size() -> None:
    assert rss_mb() > 1.0
