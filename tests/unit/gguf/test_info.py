"""Tests for ModelInfo: shape, sizes and kind read from GGUF metadata."""

from __future__ import annotations

import re
import time
from pathlib import Path

import gguf
import pytest

from modeld.gguf.info import ModelInfo, read_model_info, split_parts
from modeld.gguf.validate import InvalidModelFile, validate_gguf
from tests.unit.gguf.conftest import (
    DROP,
    N_EMBD,
    N_FF,
    N_HEAD,
    N_HEAD_KV,
    TOKENS,
    ModelWriter,
    write_model,
)

V = gguf.GGUFValueType


def _reader_bytes(path: Path) -> tuple[int, int]:
    """(all tensor bytes, blk.* tensor bytes) according to gguf.GGUFReader."""
    tensors = gguf.GGUFReader(path).tensors
    layers = sum(int(t.n_bytes) for t in tensors if t.name.startswith("blk."))
    return sum(int(t.n_bytes) for t in tensors), layers


def test_tiny_model_info(make_model: ModelWriter) -> None:
    path = make_model(kv={"tokenizer.chat_template": ("{{ messages }}", V.STRING)})
    info = read_model_info(path)
    assert info.architecture == "llama"
    assert info.name == "tiny"
    assert (info.n_layer, info.n_embd, info.n_head, info.n_head_kv) == (
        2,
        N_EMBD,
        N_HEAD,
        N_HEAD_KV,
    )
    assert info.n_ctx_train == 2048
    assert info.n_vocab == len(TOKENS)
    assert info.n_ff == N_FF
    assert info.n_embd_head_k == info.n_embd_head_v == N_EMBD // N_HEAD
    assert info.n_embd_k_gqa == info.n_embd_v_gqa == N_EMBD // N_HEAD * N_HEAD_KV
    assert info.chat_template == "{{ messages }}"
    assert info.file_type == 0
    assert info.is_language_model and info.kind_reason is None
    assert (info.split_count, info.split_no) == (1, 0)
    assert info.file_bytes == path.stat().st_size


def test_weight_bytes_match_gguf_reader(tiny_model: Path) -> None:
    info = read_model_info(tiny_model)
    total, layers = _reader_bytes(tiny_model)
    assert info.weight_bytes == total
    assert sum(info.layer_weight_bytes) == layers
    assert len(info.layer_weight_bytes) == 2
    assert info.layer_weight_bytes[0] == info.layer_weight_bytes[1] > 0
    assert info.non_layer_weight_bytes == total - layers


def test_head_sizes_from_key_and_value_length(make_model: ModelWriter) -> None:
    info = read_model_info(
        make_model(
            kv={
                "llama.attention.key_length": (16, V.UINT32),
                "llama.attention.value_length": (12, V.UINT32),
                "llama.attention.head_count_kv": (1, V.UINT32),
            }
        )
    )
    assert (info.n_embd_head_k, info.n_embd_head_v, info.n_head_kv) == (16, 12, 1)
    assert (info.n_embd_k_gqa, info.n_embd_v_gqa) == (16, 12)


def test_head_count_kv_defaults_to_head_count(make_model: ModelWriter) -> None:
    info = read_model_info(make_model(kv={"llama.attention.head_count_kv": DROP}))
    assert info.n_head_kv == N_HEAD


def test_per_layer_head_counts_use_the_largest(make_model: ModelWriter) -> None:
    path = make_model(kv={"llama.attention.head_count_kv": ([1, 2], V.ARRAY)})
    assert read_model_info(path).n_head_kv == 2


def test_no_chat_template_and_no_name(make_model: ModelWriter) -> None:
    info = read_model_info(make_model(kv={"general.name": DROP, "general.file_type": DROP}))
    assert info.chat_template is None
    assert info.name is None
    assert info.file_type is None


def test_clip_projector_is_not_a_language_model(make_model: ModelWriter) -> None:
    info = read_model_info(make_model(arch="clip"))
    assert not info.is_language_model
    assert info.kind_reason == "multimodal projector (clip)"


def test_vocab_only_is_not_a_language_model(make_model: ModelWriter) -> None:
    info = read_model_info(make_model(tensors={}))
    assert not info.is_language_model
    assert info.kind_reason == "vocab only"
    assert info.weight_bytes == 0


def test_a_broken_language_model_is_still_one(make_model: ModelWriter) -> None:
    """A missing key makes a language model unusable (validate_gguf says why), not a file
    of another kind: it must be listed with its error, not hidden."""
    path = make_model(kv={"llama.block_count": DROP})
    info = read_model_info(path)
    assert info.is_language_model and info.kind_reason is None
    assert info.n_layer == 0 and len(info.layer_weight_bytes) == 2  # blk.0, blk.1 still counted
    with pytest.raises(InvalidModelFile, match=r"missing key 'llama\.block_count'"):
        validate_gguf(path)


def test_structural_corruption_raises(tiny_model: Path) -> None:
    with tiny_model.open("r+b") as f:
        f.truncate(100)
    with pytest.raises(InvalidModelFile, match="truncated"):
        read_model_info(tiny_model)


def test_split_model_sums_all_parts(tmp_path: Path) -> None:
    whole = write_model(tmp_path / "whole.gguf")
    write_model(tmp_path / "split.gguf", split_max_tensors=10)
    first = tmp_path / "split-00001-of-00003.gguf"
    info = read_model_info(first)
    ref = read_model_info(whole)
    assert info.is_language_model, info.kind_reason
    assert (info.split_count, info.split_no) == (3, 0)
    assert info.weight_bytes == ref.weight_bytes
    assert info.layer_weight_bytes == ref.layer_weight_bytes
    assert info.file_bytes == sum(p.stat().st_size for p in split_parts(first))
    second = read_model_info(tmp_path / "split-00002-of-00003.gguf")
    assert not second.is_language_model
    assert (second.split_count, second.split_no) == (3, 1)
    (tmp_path / "split-00003-of-00003.gguf").unlink()
    with pytest.raises(InvalidModelFile, match="split part 3 of 3 is missing"):
        read_model_info(first)  # a broken model, listed with its error, not another kind


def test_a_broken_later_part_breaks_the_model(tmp_path: Path) -> None:
    write_model(tmp_path / "split.gguf", split_max_tensors=10)
    with (tmp_path / "split-00002-of-00003.gguf").open("r+b") as f:
        f.truncate(64)
    with pytest.raises(InvalidModelFile, match="truncated"):
        read_model_info(tmp_path / "split-00001-of-00003.gguf")


def test_split_parts_pattern(tmp_path: Path) -> None:
    first = tmp_path / "Qwen-7B-Q4_K_M-00001-of-00002.gguf"
    assert [p.name for p in split_parts(first)] == [
        "Qwen-7B-Q4_K_M-00001-of-00002.gguf",
        "Qwen-7B-Q4_K_M-00002-of-00002.gguf",
    ]
    plain = tmp_path / "model-1-of-2.gguf"
    assert split_parts(plain) == [plain]


def test_tiny_gguf_helper_info(tmp_path: Path) -> None:
    tiny = pytest.importorskip("modeld.devtools.tiny_gguf")
    path = tiny.write_tiny_llama(tmp_path / "t.gguf", n_layer=3, pad_mb=0.5, chat_template="T")
    info = read_model_info(path)
    validate_gguf(path)
    assert info.is_language_model
    assert info.n_layer == 3 == len(info.layer_weight_bytes)
    assert info.chat_template == "T"
    assert info.weight_bytes == _reader_bytes(path)[0]


def test_model_info_is_frozen(tiny_model: Path) -> None:
    info = read_model_info(tiny_model)
    with pytest.raises(AttributeError):
        info.n_layer = 3  # type: ignore[misc]
    assert isinstance(info, ModelInfo)
    assert re.match(r"ModelInfo\(architecture='llama'", repr(info))


def test_reading_metadata_takes_milliseconds(tiny_model: Path) -> None:
    read_model_info(tiny_model)
    start = time.perf_counter()
    for _ in range(10):
        read_model_info(tiny_model)
    assert (time.perf_counter() - start) / 10 < 0.01
