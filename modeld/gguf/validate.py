"""Validate a GGUF model file in Python before any llama.cpp worker opens it.

`reader.read_header` checks the structure of each file; this module adds the split parts
(all must be there and numbered right) and the keys llama.cpp needs to build a language
model. Anything wrong is `InvalidModelFile` with a short reason that names no path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from modeld.gguf import InvalidModelFile
from modeld.gguf.reader import (
    INTEGER_TYPES,
    T_STRING,
    UNSIGNED_TYPES,
    ArrayValue,
    GGUFHeader,
    Limits,
    read_header,
)

__all__ = [
    "InvalidModelFile",
    "language_model_problem",
    "other_kind",
    "read_split_headers",
    "split_info",
    "split_parts",
    "validate_gguf",
]

# Split models: name-00001-of-00003.gguf, as llama.cpp's llama_split_path writes them.
SPLIT_NAME_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_parts(path: Path) -> list[Path]:
    """All parts of a split model named like path (`x-00001-of-00003.gguf`), else [path]."""
    m = SPLIT_NAME_RE.match(path.name)
    if m is None:
        return [path]
    count = int(m["count"])
    return [
        path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)
    ]


def split_info(header: GGUFHeader) -> tuple[int, int]:
    """(split.no, split.count) of a file; (0, 1) for an unsplit model."""
    no, count = header.get("split.no"), header.get("split.count")
    if no is None and count is None:
        return 0, 1
    if not isinstance(no, int) or not isinstance(count, int) or isinstance(no, bool):
        raise InvalidModelFile("split.no and split.count must be integers")
    if not 0 <= no < count:
        raise InvalidModelFile(f"bad split numbering ({no} of {count})")
    return no, count


def read_split_headers(
    path: Path,
    first: GGUFHeader,
    *,
    limits: Limits | None = None,
    follow_symlinks_within: Path | None = None,
) -> list[GGUFHeader]:
    """Headers of the other parts of a split model whose first part is path."""
    no, count = split_info(first)
    if count == 1:
        return []
    if no != 0:
        raise InvalidModelFile(f"split part {no + 1} of {count}; load the first part")
    parts = split_parts(path)
    if len(parts) != count:
        raise InvalidModelFile(f"split model file name must end in -00001-of-{count:05d}.gguf")
    headers = []
    for i, part in enumerate(parts[1:], start=1):
        if not os.path.lexists(part):
            raise InvalidModelFile(f"split part {i + 1} of {count} is missing")
        try:
            header = read_header(part, limits=limits, follow_symlinks_within=follow_symlinks_within)
        except InvalidModelFile as exc:
            raise InvalidModelFile(f"split part {i + 1} of {count}: {exc}") from None
        if split_info(header) != (i, count):
            raise InvalidModelFile(f"split part {i + 1} of {count} has the wrong split.no")
        headers.append(header)
    return headers


def _uint_key(header: GGUFHeader, key: str, *, allow_zero: bool = False) -> str | None:
    """Why key is not a usable unsigned integer (or per-layer array of them), else None."""
    field = header.fields.get(key)
    if field is None:
        return f"missing key {key!r}"
    value = field.value
    if isinstance(value, ArrayValue) and value.elem_type in INTEGER_TYPES and value.count:
        return None  # per-layer values (e.g. head counts of OpenELM), written as int32
    if field.type not in UNSIGNED_TYPES or not isinstance(value, int):
        return f"{key!r} must be an unsigned integer"
    return None if allow_zero or value > 0 else f"{key!r} must not be 0"


def other_kind(headers: Sequence[GGUFHeader]) -> str | None:
    """What these headers are when they are a sound GGUF of another kind than a language
    model (a later split part, an adapter, a projector, a vocab-only file), else None.

    Such files are not offered as models at all; a file that claims to be a language
    model and is broken is not one of them (see `language_model_problem`).
    """
    first = headers[0]
    no, count = split_info(first)
    if no:
        return f"split part {no + 1} of {count}"
    arch = first.get("general.architecture")
    gtype = first.get("general.type")
    if gtype == "adapter" or first.get("adapter.type") is not None:
        return f"adapter ({first.get('adapter.type') or 'lora'})"
    if arch in ("clip", "mmproj") or gtype in ("mmproj", "imatrix"):
        return "multimodal projector (clip)" if gtype != "imatrix" else "importance matrix"
    has_tokens = first.get("tokenizer.ggml.tokens") is not None
    if has_tokens and not any(h.tensors for h in headers):
        return "vocab only"
    return None


def language_model_problem(headers: Sequence[GGUFHeader]) -> str | None:
    """Why these headers (first part first), which are no other kind of file, are not a
    loadable language model (missing, zero or wrong-typed keys), or None."""
    first = headers[0]
    arch = first.get("general.architecture")
    if arch is None:
        return "no general.architecture"
    if not isinstance(arch, str) or not arch:
        return "general.architecture is not a string"
    if not any(h.tensors for h in headers):
        return "no tensors"
    for suffix in ("block_count", "embedding_length", "context_length"):
        problem = _uint_key(first, f"{arch}.{suffix}")
        if problem:
            return problem
    problem = _uint_key(first, f"{arch}.attention.head_count", allow_zero=True)
    if problem:
        return problem
    tokens = first.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, ArrayValue) or tokens.elem_type != T_STRING or not tokens.count:
        return "no tokenizer.ggml.tokens string array"
    return None


def validate_gguf(
    path: Path,
    *,
    max_kv: int = 1 << 16,
    max_tensors: int = 1 << 16,
    max_string: int = 1 << 24,
    max_array: int = 1 << 24,
    follow_symlinks_within: Path | None = None,
) -> None:
    """Raise InvalidModelFile unless path (and its split parts) is a sound GGUF language model.

    A symlink is refused unless follow_symlinks_within is given and the link resolves
    inside that directory.
    """
    limits = Limits(max_kv, max_tensors, max_string, max_array)
    first = read_header(path, limits=limits, follow_symlinks_within=follow_symlinks_within)
    rest = read_split_headers(
        path, first, limits=limits, follow_symlinks_within=follow_symlinks_within
    )
    kind = other_kind([first, *rest])
    if kind is not None:
        raise InvalidModelFile(f"not a language model: {kind}")
    problem = language_model_problem([first, *rest])
    if problem is not None:
        raise InvalidModelFile(f"not a usable language model: {problem}")
