"""Tests for the memory estimate against measured llama.cpp figures (see docs/vram.md)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from modeld.gguf.estimate import (
    CPU_OVERHEAD_MB,
    GPU_OVERHEAD_MB,
    MIB,
    VramEstimate,
    compute_bytes,
    estimate_vram,
    estimate_vram_mb,
    kv_bytes,
)
from modeld.gguf.info import ModelInfo, read_model_info


def shaped(
    file_mb: float,
    *,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    n_ff: int,
    n_vocab: int,
) -> ModelInfo:
    """A llama-shaped ModelInfo whose weights fill a file of file_mb (decimal) megabytes."""
    weights = int(file_mb * 1e6)
    per_layer = weights * 9 // 10 // n_layer
    head = n_embd // n_head
    return ModelInfo(
        architecture="llama",
        name=None,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ctx_train=32768,
        n_vocab=n_vocab,
        n_embd_head_k=head,
        n_embd_head_v=head,
        n_ff=n_ff,
        weight_bytes=weights,
        layer_weight_bytes=(per_layer,) * n_layer,
        non_layer_weight_bytes=weights - per_layer * n_layer,
        chat_template=None,
        file_type=1,
        is_language_model=True,
        kind_reason=None,
    )


# The f16 random llama models measured on the H200. Their shapes were not recorded with the
# totals; these are the ones the context deltas imply (docs/vram.md, "Assumed shapes").
TINY = shaped(0.3, n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_vocab=510)
M298 = shaped(298, n_layer=8, n_embd=1024, n_head=8, n_head_kv=4, n_ff=4960, n_vocab=1000)
M1627 = shaped(1627, n_layer=16, n_embd=2048, n_head=16, n_head_kv=4, n_ff=6528, n_vocab=1000)
M3205 = shaped(3205, n_layer=16, n_embd=2048, n_head=16, n_head_kv=4, n_ff=14560, n_vocab=1000)

# (model, n_ctx, flash_attn, measured process VRAM in MiB after the first generation)
H200_TABLE = [
    (TINY, 512, False, 628),
    (M298, 4096, False, 1036),
    (M1627, 512, False, 2222),
    (M1627, 4096, False, 2408),
    (M1627, 16384, False, 3200),
    (M1627, 4096, True, 2382),
    (M3205, 4096, False, 4008),
    (M3205, 16384, True, 4260),
]


@pytest.mark.parametrize(("info", "n_ctx", "flash", "measured"), H200_TABLE)
def test_gpu_estimate_is_within_ten_percent_above_measured(
    info: ModelInfo, n_ctx: int, flash: bool, measured: int
) -> None:
    est = estimate_vram_mb(info, n_ctx=n_ctx, n_gpu_layers=-1, flash_attn=flash, gpu=True)
    assert measured <= est <= measured * 1.10, (est, measured)


# llama.cpp's own "CPU compute buffer size" lines (MiB) for llama shapes on this machine:
# (n_embd, n_head, n_head_kv, n_ff, n_vocab, n_ctx, flash_attn, measured)
CPU_COMPUTE_TABLE = [
    (2048, 16, 4, 512, 859, 512, False, 39.01),
    (2048, 16, 4, 512, 859, 512, True, 20.51),
    (2048, 16, 4, 512, 859, 4096, False, 158.01),
    (2048, 16, 4, 512, 859, 4096, True, 24.01),
    (2048, 16, 4, 512, 859, 16384, False, 566.01),
    (2048, 16, 4, 512, 859, 16384, True, 36.01),
    (2048, 16, 4, 8192, 859, 512, False, 67.01),
    (2048, 16, 4, 8192, 859, 512, True, 64.51),
    (2048, 16, 4, 8192, 859, 4096, True, 68.01),
    (2048, 16, 4, 512, 32000, 512, False, 77.51),
    (2048, 16, 4, 512, 32000, 512, True, 79.01),
    (2048, 16, 4, 512, 32000, 4096, True, 70.50),
    (64, 4, 2, 136672, 510, 4096, False, 809.32),
    (64, 4, 2, 128, 510, 512, False, 5.76),
    (64, 4, 2, 128, 510, 128, False, 0.81),
    (64, 4, 2, 128, 510, 4096, True, 5.01),
]


@pytest.mark.parametrize(
    ("n_embd", "n_head", "n_head_kv", "n_ff", "n_vocab", "n_ctx", "flash", "measured"),
    CPU_COMPUTE_TABLE,
)
def test_compute_buffer_never_below_llama_cpp(
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    n_ff: int,
    n_vocab: int,
    n_ctx: int,
    flash: bool,
    measured: float,
) -> None:
    info = shaped(
        1,
        n_layer=2,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        n_vocab=n_vocab,
    )
    est = compute_bytes(info, n_ctx, flash) / MIB
    assert measured <= est <= max(2 * measured, measured + 32), (est, measured)


def test_kv_cache_formula() -> None:
    # n_layer × n_ctx × (n_embd_k_gqa + n_embd_v_gqa) × 2 bytes: 16 × 4096 × 1024 × 2
    assert kv_bytes(M1627, 4096, 16) == 128 * MIB
    assert kv_bytes(M1627, 4000, 16) == 128 * MIB  # padded to 256 cells, as llama.cpp does
    assert kv_bytes(M1627, 4096, 16, bytes_per_elem=1) == 64 * MIB
    est = estimate_vram(M1627, n_ctx=4096, n_gpu_layers=-1, flash_attn=True, gpu=True)
    assert est.kv_mb == 128


def test_breakdown_adds_up() -> None:
    est = estimate_vram(M3205, n_ctx=8192, n_gpu_layers=-1, flash_attn=False, gpu=True)
    assert isinstance(est, VramEstimate)
    assert est.total_mb == est.weights_mb + est.kv_mb + est.compute_mb + est.overhead_mb
    assert est.overhead_mb == GPU_OVERHEAD_MB
    assert est.weights_mb == -(-M3205.weight_bytes // MIB)


def test_partial_offload_counts_only_offloaded_layers() -> None:
    full = estimate_vram(M1627, n_ctx=4096, n_gpu_layers=-1, flash_attn=True, gpu=True)
    half = estimate_vram(M1627, n_ctx=4096, n_gpu_layers=8, flash_attn=True, gpu=True)
    none = estimate_vram(M1627, n_ctx=4096, n_gpu_layers=0, flash_attn=True, gpu=True)
    assert half.weights_mb == -(-sum(M1627.layer_weight_bytes[8:]) // MIB)
    assert half.kv_mb == full.kv_mb // 2
    assert none.weights_mb == none.kv_mb == 0
    assert none.total_mb < half.total_mb < full.total_mb
    beyond = estimate_vram(M1627, n_ctx=4096, n_gpu_layers=99, flash_attn=True, gpu=True)
    assert beyond == full


def test_cpu_estimate_counts_all_weights_and_process_ram() -> None:
    cpu = estimate_vram(TINY, n_ctx=512, n_gpu_layers=0, flash_attn=False, gpu=False)
    assert cpu.overhead_mb == CPU_OVERHEAD_MB
    assert cpu.weights_mb == 1
    # measured: 51.5 MiB RSS after loading the 0.3 MB model at n_ctx 512 and generating
    assert 51.5 <= cpu.total_mb <= 51.5 * 1.5


def test_flash_attention_and_context_monotonicity() -> None:
    def total(n_ctx: int, flash: bool) -> int:
        return estimate_vram_mb(M1627, n_ctx=n_ctx, n_gpu_layers=-1, flash_attn=flash, gpu=True)

    for flash in (False, True):
        sizes = [total(n, flash) for n in (256, 512, 2048, 4096, 16384, 65536)]
        assert sizes == sorted(sizes)
    assert total(16384, True) < total(16384, False)
    # without flash attention the scores grow the compute buffer by ~400 MiB from 4k to 16k
    grow = estimate_vram(M1627, n_ctx=16384, n_gpu_layers=-1, flash_attn=False, gpu=True)
    base = estimate_vram(M1627, n_ctx=4096, n_gpu_layers=-1, flash_attn=False, gpu=True)
    assert 350 <= grow.compute_mb - base.compute_mb <= 450


def test_zero_context_means_training_context() -> None:
    info = replace(M298, n_ctx_train=8192)
    est = estimate_vram_mb(info, n_ctx=0, n_gpu_layers=-1, flash_attn=True, gpu=True)
    assert est == estimate_vram_mb(info, n_ctx=8192, n_gpu_layers=-1, flash_attn=True, gpu=True)


def test_estimate_from_a_real_file(tiny_model: Path) -> None:
    info = read_model_info(tiny_model)
    est = estimate_vram(info, n_ctx=2048, n_gpu_layers=-1, flash_attn=True, gpu=True)
    assert est.weights_mb == -(-info.weight_bytes // MIB)
    assert est.total_mb > GPU_OVERHEAD_MB
