"""What the daemon needs to know about a model file, read from its GGUF metadata.

The registry calls `read_model_info` for every file in the models dir, so it reuses the
bounded parser of `validate` (a few ms for a 100 MB file: tensor data is never read).
Structural corruption (of any split part) raises `InvalidModelFile`; a sound file of
another kind than a language model (a clip projector, a vocab-only file, a later split
part) comes back with `is_language_model=False` and the reason in `kind_reason`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from modeld.gguf.reader import ArrayValue, GGUFHeader, Value, read_header
from modeld.gguf.validate import (
    other_kind,
    read_split_headers,
    split_info,
    split_parts,
)

__all__ = ["ModelInfo", "read_model_info", "split_parts"]

_LAYER_RE = re.compile(r"^blk\.(\d+)\.")  # llama.cpp's repeating (offloadable) layers


@dataclass(frozen=True)
class ModelInfo:
    """Shape, size and kind of a model, enough to estimate its memory and list it."""

    architecture: str
    name: str | None
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ctx_train: int
    n_vocab: int
    n_embd_head_k: int
    n_embd_head_v: int
    n_ff: int  # FFN width (max over layers); sizes the compute buffer
    weight_bytes: int  # all tensors of all split parts
    layer_weight_bytes: tuple[int, ...]  # per blk.N layer, index N
    non_layer_weight_bytes: int  # embeddings, output head, norms outside blk.N
    chat_template: str | None
    file_type: int | None
    is_language_model: bool
    kind_reason: str | None  # why not a language model; None when it is one
    split_count: int = 1
    split_no: int = 0
    file_bytes: int = 0  # size on disk of all parts that exist

    @property
    def n_embd_k_gqa(self) -> int:
        """K cache width per layer and token."""
        return self.n_embd_head_k * self.n_head_kv

    @property
    def n_embd_v_gqa(self) -> int:
        """V cache width per layer and token."""
        return self.n_embd_head_v * self.n_head_kv


def _as_int(value: Value | None, default: int = 0) -> int:
    """A metadata integer, or the largest of a per-layer array, or default."""
    if isinstance(value, bool) or value is None:
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, ArrayValue) and value.items:
        ints = [v for v in value.items if isinstance(v, int) and not isinstance(v, bool)]
        return max(ints) if ints else default
    return default


def _as_str(value: Value | None) -> str | None:
    return value if isinstance(value, str) else None


def _layer_bytes(headers: list[GGUFHeader], n_layer: int) -> tuple[tuple[int, ...], int, int]:
    """(bytes per blk.N layer, bytes outside them, total)."""
    layers = [0] * n_layer
    other = 0
    for header in headers:
        for t in header.tensors:
            m = _LAYER_RE.match(t.name)
            if m is None:
                other += t.nbytes
                continue
            index = int(m[1])
            if index >= len(layers):
                layers.extend([0] * (index + 1 - len(layers)))
            layers[index] += t.nbytes
    return tuple(layers), other, sum(layers) + other


def _file_bytes(headers: list[GGUFHeader]) -> int:
    return sum(h.file_size for h in headers)


def read_model_info(path: Path, *, follow_symlinks_within: Path | None = None) -> ModelInfo:
    """Read a model's metadata (and its split parts' tensor lists) without loading weights."""
    within = follow_symlinks_within
    first = read_header(path, follow_symlinks_within=within)
    # A first part reads the others: one missing or broken raises, as a broken first part
    # does. A later part is a file of another kind (see other_kind).
    later_part = split_info(first)[0] > 0
    rest = [] if later_part else read_split_headers(path, first, follow_symlinks_within=within)
    headers = [first, *rest]
    reason = other_kind(headers)
    get = first.get
    arch = _as_str(get("general.architecture")) or ""

    def key(suffix: str, default: int = 0) -> int:
        return _as_int(get(f"{arch}.{suffix}"), default)

    n_layer = key("block_count")
    n_embd = key("embedding_length")
    n_head = key("attention.head_count")
    n_head_kv = key("attention.head_count_kv", n_head)
    head_dim = n_embd // n_head if n_head else 0
    tokens = get("tokenizer.ggml.tokens")
    n_vocab = tokens.count if isinstance(tokens, ArrayValue) else key("vocab_size")
    layers, other, total = _layer_bytes(headers, n_layer)
    no, count = split_info(first)
    file_type = get("general.file_type")
    return ModelInfo(
        architecture=arch,
        name=_as_str(get("general.name")),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ctx_train=key("context_length"),
        n_vocab=n_vocab,
        n_embd_head_k=key("attention.key_length", head_dim),
        n_embd_head_v=key("attention.value_length", head_dim),
        n_ff=key("feed_forward_length"),
        weight_bytes=total,
        layer_weight_bytes=layers,
        non_layer_weight_bytes=other,
        chat_template=_as_str(get("tokenizer.chat_template")),
        file_type=None if file_type is None else _as_int(file_type, -1),
        is_language_model=reason is None,
        kind_reason=reason,
        split_count=count,
        split_no=no,
        file_bytes=_file_bytes(headers),
    )
