"""Estimate the memory one llama.cpp worker needs for a model, from its GGUF metadata.

The planner admits and evicts models by these figures, so they must not run low: the
constants are fitted to measured totals so the estimate lands within [0, +10%] of them
(docs/vram.md has the formula, the measurements and the fit). With `gpu=True` the figure
is the worker's VRAM; with `gpu=False` llama.cpp runs on the CPU and it is the worker's RAM.
"""

from __future__ import annotations

from dataclasses import dataclass

from modeld.gguf.info import ModelInfo

MIB = 1024 * 1024  # estimates are in MiB, the unit NVML and llama.cpp report memory in
N_UBATCH = 512  # llama.cpp's default n_ubatch: the compute graph is reserved for this many tokens
KV_CTX_PAD = 256  # llama.cpp rounds the KV cache size up to a multiple of 256 cells
F32 = 4  # compute buffers hold f32 activations
# Compute buffer, floats per ubatch token on top of the widest tensor: about 8 hidden-size
# vectors live at once plus a fixed residue (fitted to llama.cpp's own "compute buffer
# size" log lines for shapes from n_embd 64 to 2048, n_ff up to 136k, n_vocab up to 32k).
COMPUTE_EMBD_VECTORS = 8
COMPUTE_FIXED_FLOATS = 4096
FFN_VECTORS = 3  # gate, up and their product are live together in the SwiGLU FFN
# CUDA: context, cuBLAS workspace, memory pools and llama.cpp's own device buffers; fitted
# to the H200 table in docs/vram.md (measured 550-700 MiB before weights, KV and compute).
GPU_OVERHEAD_MB = 660
# CPU: RSS of a Python process with llama_cpp imported that loaded a 0.3 MB model and
# generated 16 tokens (51.5 MiB measured, see docs/vram.md), rounded up for the worker's
# own modules.
CPU_OVERHEAD_MB = 56


@dataclass(frozen=True)
class VramEstimate:
    """An estimate broken into its parts, each rounded up to whole MiB."""

    weights_mb: int
    kv_mb: int
    compute_mb: int
    overhead_mb: int
    total_mb: int


def _mb(nbytes: int) -> int:
    return -(-nbytes // MIB)


def _offloaded(info: ModelInfo, n_gpu_layers: int, gpu: bool) -> tuple[int, int]:
    """(number of repeating layers in the estimated memory, their weight bytes + extras)."""
    n_layer = max(info.n_layer, len(info.layer_weight_bytes))
    if not gpu or n_gpu_layers < 0 or n_gpu_layers >= n_layer:
        return info.n_layer, info.weight_bytes
    # llama.cpp offloads the last n_gpu_layers layers; embeddings and head stay on the CPU.
    layers = info.layer_weight_bytes[len(info.layer_weight_bytes) - n_gpu_layers :]
    return min(n_gpu_layers, info.n_layer), sum(layers) if n_gpu_layers else 0


def kv_bytes(info: ModelInfo, n_ctx: int, n_layers: int, bytes_per_elem: int = 2) -> int:
    """KV cache: n_layers × padded n_ctx × (K + V width) × bytes per element."""
    cells = -(-n_ctx // KV_CTX_PAD) * KV_CTX_PAD
    return n_layers * cells * (info.n_embd_k_gqa + info.n_embd_v_gqa) * bytes_per_elem


def compute_bytes(info: ModelInfo, n_ctx: int, flash_attn: bool) -> int:
    """The compute buffer llama.cpp reserves for one ubatch at this context size.

    Its peak is the widest tensor of the graph: without flash attention the KQ scores
    (n_head × n_ctx per token), else the FFN or the logits, plus the attention mask.
    """
    n_ub = min(N_UBATCH, n_ctx)
    scores = 0 if flash_attn else info.n_head * n_ctx
    widest = max(scores, FFN_VECTORS * info.n_ff, info.n_vocab)
    floats = widest + COMPUTE_EMBD_VECTORS * info.n_embd + COMPUTE_FIXED_FLOATS
    mask = n_ctx * n_ub * (2 if flash_attn else F32)
    return n_ub * F32 * floats + mask


def estimate_vram(
    info: ModelInfo,
    *,
    n_ctx: int,
    n_gpu_layers: int,
    flash_attn: bool,
    gpu: bool,
    kv_bytes_per_elem: int = 2,
) -> VramEstimate:
    """Memory one worker needs for info at n_ctx (0 = the training context), by part."""
    ctx = n_ctx if n_ctx > 0 else max(info.n_ctx_train, 1)
    n_layers, weights = _offloaded(info, n_gpu_layers, gpu)
    parts = (
        _mb(weights),
        _mb(kv_bytes(info, ctx, n_layers, kv_bytes_per_elem)),
        _mb(compute_bytes(info, ctx, flash_attn)),
        GPU_OVERHEAD_MB if gpu else CPU_OVERHEAD_MB,
    )
    return VramEstimate(*parts, total_mb=sum(parts))


def estimate_vram_mb(
    info: ModelInfo,
    *,
    n_ctx: int,
    n_gpu_layers: int,
    flash_attn: bool,
    gpu: bool,
    kv_bytes_per_elem: int = 2,
) -> int:
    """Total MiB one worker needs for info; see estimate_vram for the parts."""
    return estimate_vram(
        info,
        n_ctx=n_ctx,
        n_gpu_layers=n_gpu_layers,
        flash_attn=flash_attn,
        gpu=gpu,
        kv_bytes_per_elem=kv_bytes_per_elem,
    ).total_mb
