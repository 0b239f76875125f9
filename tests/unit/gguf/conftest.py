"""Tiny GGUF files for the gguf unit tests, written with gguf.GGUFWriter (a few KB each)."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

N_EMBD = 32
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 64
TOKENS = ["<unk>", "<s>", "</s>", *(f"\u2581t{i}" for i in range(13))]
DROP = object()  # pass as a key's value to leave the key out

ModelWriter = Callable[..., Path]


def model_tensors(arch: str, n_layer: int, dtype: Any = np.float32) -> dict[str, Any]:
    """Zero llama-shaped tensors: embeddings, head, and n_layer blocks."""
    kv = N_EMBD // N_HEAD * N_HEAD_KV
    t: dict[str, Any] = {
        "token_embd.weight": np.zeros((len(TOKENS), N_EMBD), dtype),
        "output_norm.weight": np.ones(N_EMBD, np.float32),
        "output.weight": np.zeros((len(TOKENS), N_EMBD), dtype),
    }
    for i in range(n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = np.ones(N_EMBD, np.float32)
        t[p + "attn_q.weight"] = np.zeros((N_EMBD, N_EMBD), dtype)
        t[p + "attn_k.weight"] = np.zeros((kv, N_EMBD), dtype)
        t[p + "attn_v.weight"] = np.zeros((kv, N_EMBD), dtype)
        t[p + "attn_output.weight"] = np.zeros((N_EMBD, N_EMBD), dtype)
        t[p + "ffn_norm.weight"] = np.ones(N_EMBD, np.float32)
        t[p + "ffn_gate.weight"] = np.zeros((N_FF, N_EMBD), dtype)
        t[p + "ffn_up.weight"] = np.zeros((N_FF, N_EMBD), dtype)
        t[p + "ffn_down.weight"] = np.zeros((N_EMBD, N_FF), dtype)
    return t


def write_model(
    path: Path,
    *,
    arch: str = "llama",
    n_layer: int = 2,
    kv: dict[str, Any] | None = None,
    tensors: dict[str, Any] | None = None,
    split_max_tensors: int = 0,
    dtype: Any = np.float32,
) -> Path:
    """Write a llama-like model; kv entries override keys (DROP removes one)."""
    V = gguf.GGUFValueType
    keys: dict[str, Any] = {
        "general.name": ("tiny", V.STRING),
        "general.file_type": (0, V.UINT32),
        f"{arch}.block_count": (n_layer, V.UINT32),
        f"{arch}.context_length": (2048, V.UINT32),
        f"{arch}.embedding_length": (N_EMBD, V.UINT32),
        f"{arch}.feed_forward_length": (N_FF, V.UINT32),
        f"{arch}.attention.head_count": (N_HEAD, V.UINT32),
        f"{arch}.attention.head_count_kv": (N_HEAD_KV, V.UINT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32),
        "tokenizer.ggml.model": ("llama", V.STRING),
        "tokenizer.ggml.tokens": (TOKENS, V.ARRAY),
        "tokenizer.ggml.scores": ([0.0] * len(TOKENS), V.ARRAY),
        "tokenizer.ggml.token_type": ([1] * len(TOKENS), V.ARRAY),
    }
    for key, value in (kv or {}).items():
        if value is DROP:
            keys.pop(key, None)
        else:
            keys[key] = value
    writer = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    if "general.alignment" in keys and keys["general.alignment"][0] > 0:
        writer.data_alignment = keys["general.alignment"][0]
    for key, (value, vtype) in keys.items():
        if key == "general.architecture":
            continue
        writer.add_key_value(key, value, vtype)
    if "general.architecture" in (kv or {}):
        value = keys.get("general.architecture")
        writer.kv_data[0].pop("general.architecture", None)
        if value is not None:
            writer.add_key_value("general.architecture", value[0], value[1])
    for name, arr in (model_tensors(arch, n_layer, dtype) if tensors is None else tensors).items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def make_model(tmp_path: Path) -> ModelWriter:
    """Factory: make_model(name="m.gguf", **write_model kwargs) -> path."""

    def make(name: str = "model.gguf", **kwargs: Any) -> Path:
        return write_model(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def tiny_model(make_model: ModelWriter) -> Path:
    return make_model()


def tensor_info_pos(data: bytes, name: str) -> int:
    """Byte position of the n_dims field that follows a tensor's name in its info."""
    raw = name.encode()
    needle = struct.pack("<Q", len(raw)) + raw
    pos = data.rfind(needle)
    assert pos >= 0, name
    return pos + len(needle)


def patch(data: bytes, pos: int, fmt: str, *values: int) -> bytes:
    """Overwrite struct-packed values at pos."""
    packed = struct.pack("<" + fmt, *values)
    return data[:pos] + packed + data[pos + len(packed) :]


def with_bytes(path: Path, data: bytes | Iterable[int]) -> Path:
    path.write_bytes(bytes(data))
    return path
