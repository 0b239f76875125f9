"""Tests for the bounded GGUF validator: accepts sound files, rejects the rest cleanly."""

from __future__ import annotations

import os
import re
import struct
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeld.gguf import InvalidModelFile as ExportedInvalidModelFile
from modeld.gguf.reader import ArrayValue, read_header
from modeld.gguf.validate import InvalidModelFile, split_parts, validate_gguf
from tests.unit.gguf.conftest import (
    DROP,
    ModelWriter,
    patch,
    tensor_info_pos,
    with_bytes,
    write_model,
)

V = gguf.GGUFValueType
INTERNAL = "unreadable GGUF ("  # the catch-all's reason: a parser bug, never expected


def reason(path: Path, **kwargs: object) -> str:
    """The InvalidModelFile reason for path (fails the test if it validates)."""
    with pytest.raises(InvalidModelFile) as exc:
        validate_gguf(path, **kwargs)  # type: ignore[arg-type]
    text = str(exc.value)
    assert INTERNAL not in text
    assert str(path) not in text
    return text


def test_error_is_a_value_error_not_a_modeld_error() -> None:
    from modeld.errors import ModeldError

    assert issubclass(InvalidModelFile, ValueError)
    assert not issubclass(InvalidModelFile, ModeldError)
    assert ExportedInvalidModelFile is InvalidModelFile


def test_tiny_model_validates(tiny_model: Path) -> None:
    validate_gguf(tiny_model)


def test_header_matches_gguf_reader(tiny_model: Path) -> None:
    header = read_header(tiny_model)
    reader = gguf.GGUFReader(tiny_model)
    assert header.data_offset == reader.data_offset
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    for mine, theirs in zip(header.tensors, reader.tensors, strict=True):
        assert mine.nbytes == theirs.n_bytes
        assert mine.shape == tuple(int(d) for d in theirs.shape)
        assert header.data_offset + mine.offset == theirs.data_offset
        assert mine.ggml_type == theirs.tensor_type
    assert set(header.fields) == set(reader.fields) - {
        "GGUF.version",
        "GGUF.tensor_count",
        "GGUF.kv_count",
    }
    assert header.get("llama.block_count") == 2
    assert header.get("general.architecture") == "llama"
    tokens = header.get("tokenizer.ggml.tokens")
    assert isinstance(tokens, ArrayValue) and tokens.count == 16


def test_all_value_types_round_trip(make_model: ModelWriter) -> None:
    values: dict[str, tuple[Any, Any]] = {
        "x.u8": (200, V.UINT8),
        "x.i8": (-100, V.INT8),
        "x.u16": (60000, V.UINT16),
        "x.i16": (-30000, V.INT16),
        "x.u32": (4_000_000_000, V.UINT32),
        "x.i32": (-2_000_000_000, V.INT32),
        "x.f32": (0.5, V.FLOAT32),
        "x.bool": (True, V.BOOL),
        "x.str": ("héllo", V.STRING),
        "x.u64": (1 << 60, V.UINT64),
        "x.i64": (-(1 << 60), V.INT64),
        "x.f64": (0.25, V.FLOAT64),
        "x.ints": ([1, 2, 3], V.ARRAY),
        "x.strs": (["a", "bc"], V.ARRAY),
        "x.nested": ([[1, 2], [3]], V.ARRAY),
        "x.bools": ([True, False], V.ARRAY),
    }
    path = make_model(kv=values)
    validate_gguf(path)
    header = read_header(path)
    for key, (value, vtype) in values.items():
        field = header.fields[key]
        assert field.type == vtype
        if vtype == V.ARRAY:
            assert isinstance(field.value, ArrayValue)
            assert field.value.count == len(value)
            if key != "x.nested":
                assert field.value.items == tuple(value)
        else:
            assert field.value == value


def test_tiny_gguf_helper_output_validates(tmp_path: Path) -> None:
    tiny = pytest.importorskip("modeld.devtools.tiny_gguf")
    path = tiny.write_tiny_llama(tmp_path / "t.gguf", chat_template="{{ x }}")
    validate_gguf(path)


def test_malformed_corpus_is_rejected_cleanly(tmp_path: Path) -> None:
    """The devtools corpus: all rejected, bar files llama.cpp itself loads or refuses cleanly."""
    bad_gguf = pytest.importorskip("modeld.devtools.bad_gguf")
    base = bad_gguf.write_small_base(tmp_path / "base.gguf.valid")
    validate_gguf(base)
    for path, why in bad_gguf.make_corpus(tmp_path / "corpus", base):
        try:
            validate_gguf(path)
        except InvalidModelFile as exc:
            assert INTERNAL not in str(exc), why
        else:
            assert "(loads)" in why or re.fullmatch(r"tensor \S+ missing", why), why


def test_every_truncation_is_rejected(tiny_model: Path) -> None:
    """Every cut inside the metadata and tensor infos, and every 251st one in the data."""
    data = tiny_model.read_bytes()
    metadata_end = read_header(tiny_model).data_offset
    sizes = [*range(len(data) - 1, metadata_end, -251), *range(metadata_end, -1, -1)]
    for size in sizes:
        os.truncate(tiny_model, size)
        with pytest.raises(InvalidModelFile) as exc:
            validate_gguf(tiny_model)
        assert INTERNAL not in str(exc.value), size


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=8))
def test_random_byte_flips_never_raise_anything_else(
    tiny_model: Path, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(tiny_model.read_bytes())
    metadata_end = read_header(tiny_model).data_offset  # flips in tensor data are undetectable
    for where, mask in flips:
        data[where % metadata_end] ^= mask
    target = with_bytes(tiny_model.with_name("flipped.gguf"), data)
    try:
        validate_gguf(target)
    except InvalidModelFile as exc:
        assert INTERNAL not in str(exc)


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=256))
def test_arbitrary_bytes_after_a_valid_prefix(
    blob: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("blob") / "x.gguf"
    prefix = b"GGUF" + struct.pack("<IQQ", 3, 1, 2)
    path.write_bytes(prefix + blob)
    with pytest.raises(InvalidModelFile) as exc:
        validate_gguf(path)
    assert INTERNAL not in str(exc.value)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GGML" + b"\0" * 20, "bad magic"),
        (b"GGUF" + struct.pack("<IQQ", 7, 0, 0), "unsupported GGUF version 7"),
        (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "unsupported GGUF version 1"),
        (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
        (b"GGUF" + struct.pack("<I", 3), "truncated in header"),
        (b"", "truncated in header"),
    ],
)
def test_header_errors(tmp_path: Path, head: bytes, expected: str) -> None:
    assert expected in reason(with_bytes(tmp_path / "h.gguf", head))


def test_limits(tiny_model: Path) -> None:
    assert "too many tensors" in reason(tiny_model, max_tensors=3)
    assert "too many metadata keys" in reason(tiny_model, max_kv=3)
    assert "string too long" in reason(tiny_model, max_string=4)
    assert "array too long" in reason(tiny_model, max_array=4)


def test_absurd_counts_are_bounded(tiny_model: Path) -> None:
    data = tiny_model.read_bytes()
    with_bytes(tiny_model, patch(data, 8, "Q", 1 << 62))
    assert "too many tensors" in reason(tiny_model)
    with_bytes(tiny_model, patch(data, 16, "Q", 1 << 62))
    assert "too many metadata keys" in reason(tiny_model)
    with_bytes(tiny_model, patch(data, 24, "Q", 1 << 62))
    assert "string too long in key 0" in reason(tiny_model)


def test_tensor_data_outside_the_file(tiny_model: Path) -> None:
    size = tiny_model.stat().st_size
    os.truncate(tiny_model, size - 1)
    assert reason(tiny_model) == "tensor 'blk.1.ffn_down.weight' data lies outside the file"


def test_tensor_info_errors(tiny_model: Path) -> None:
    data = tiny_model.read_bytes()
    name = "blk.0.attn_q.weight"
    at = tensor_info_pos(data, name)  # n_dims u32, 2 dims u64, type u32, offset u64
    (offset,) = struct.unpack_from("<Q", data, at + 4 + 16 + 4)
    cases = {
        patch(data, at, "I", 5): f"tensor {name!r} has 5 dimensions",
        patch(data, at + 4, "Q", 0): f"tensor {name!r} has an empty dimension",
        patch(data, at + 4, "Q", 1 << 62): f"tensor {name!r} is too large",
        patch(data, at + 20, "I", 4): f"tensor {name!r} has unknown ggml type 4",
        patch(data, at + 20, "I", 9999): f"tensor {name!r} has unknown ggml type 9999",
        patch(data, at + 24, "Q", offset + 1): f"tensor {name!r} offset is not aligned to 32",
        patch(data, at + 24, "Q", offset + 32): f"has offset {offset + 32}, expected {offset}",
        patch(data, at + 20, "I", int(gguf.GGMLQuantizationType.Q4_K)): "whole number of blocks",
    }
    for blob, expected in cases.items():
        assert expected in reason(with_bytes(tiny_model, blob))


def test_duplicates_and_empty_keys(tiny_model: Path) -> None:
    data = tiny_model.read_bytes()
    twin = data.replace(b"blk.0.attn_k.weight", b"blk.0.attn_v.weight", 1)
    assert reason(with_bytes(tiny_model, twin)) == "duplicate tensor name 'blk.0.attn_v.weight'"
    same_key = data.replace(b"general.file_type", b"llama.block_count", 1)
    assert reason(with_bytes(tiny_model, same_key)) == "duplicate key 'llama.block_count'"
    assert reason(with_bytes(tiny_model, patch(data, 24, "Q", 0))) == "key 0 is empty"


def test_repeated_token_is_rejected(make_model: ModelWriter) -> None:
    tokens = ["<unk>", "a", "b", "a"]
    path = make_model(kv={"tokenizer.ggml.tokens": (tokens, V.ARRAY)})
    assert "repeated string 3" in reason(path)


def test_non_utf8_key_is_rejected_but_value_is_tolerated(tiny_model: Path) -> None:
    data = tiny_model.read_bytes()
    bad_key = data.replace(b"general.file_type", b"general.file_typ\xff", 1)
    assert "not valid UTF-8" in reason(with_bytes(tiny_model, bad_key))
    bad_value = data.replace(b"tiny", b"ti\xffy", 1)
    validate_gguf(with_bytes(tiny_model, bad_value))
    assert read_header(tiny_model).get("general.name") == "ti\ufffdy"


def test_alignment(make_model: ModelWriter) -> None:
    validate_gguf(make_model("a64.gguf", kv={"general.alignment": (64, V.UINT32)}))
    assert "power of two" in reason(
        make_model("a48.gguf", kv={"general.alignment": (48, V.UINT32)})
    )
    assert "power of two" in reason(make_model("a0.gguf", kv={"general.alignment": (0, V.UINT32)}))
    assert "power of two" in reason(
        make_model("a64i.gguf", kv={"general.alignment": (64, V.INT32)})
    )


@pytest.mark.parametrize(
    ("kv", "expected"),
    [
        ({"general.architecture": DROP}, "no general.architecture"),
        ({"general.architecture": (7, V.UINT32)}, "general.architecture is not a string"),
        ({"llama.block_count": DROP}, "missing key 'llama.block_count'"),
        ({"llama.embedding_length": DROP}, "missing key 'llama.embedding_length'"),
        ({"llama.attention.head_count": DROP}, "missing key 'llama.attention.head_count'"),
        ({"llama.context_length": DROP}, "missing key 'llama.context_length'"),
        ({"llama.block_count": ("2", V.STRING)}, "'llama.block_count' must be an unsigned integer"),
        ({"llama.context_length": (-1, V.INT32)}, "'llama.context_length' must be an unsigned"),
        ({"llama.embedding_length": (0, V.UINT32)}, "'llama.embedding_length' must not be 0"),
        ({"tokenizer.ggml.tokens": DROP}, "no tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": ([1, 2], V.ARRAY)}, "no tokenizer.ggml.tokens"),
        (
            {"general.type": ("adapter", V.STRING), "adapter.type": ("lora", V.STRING)},
            "adapter (lora)",
        ),
    ],
)
def test_language_model_keys(make_model: ModelWriter, kv: dict[str, object], expected: str) -> None:
    text = reason(make_model(kv=kv))
    # A file of another kind is "not a language model"; a broken one is "not usable".
    other = expected.startswith("adapter")
    assert text.startswith("not a language model: " if other else "not a usable language model: ")
    assert expected in text


def test_per_layer_head_counts_are_accepted(make_model: ModelWriter) -> None:
    validate_gguf(make_model(kv={"llama.attention.head_count": ([4, 4], V.ARRAY)}))


def test_clip_and_vocab_only(make_model: ModelWriter) -> None:
    assert "multimodal projector (clip)" in reason(make_model("mmproj.gguf", arch="clip"))
    assert reason(make_model("vocab.gguf", tensors={})) == "not a language model: vocab only"


def test_not_regular_files(tmp_path: Path) -> None:
    assert reason(tmp_path) == "not a regular file"
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    assert reason(fifo) == "not a regular file"
    assert reason(Path("/dev/null")) == "not a regular file"
    assert reason(tmp_path / "missing.gguf").startswith("cannot open file")


def test_symlinks(tmp_path: Path, tiny_model: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    inside = models / "link.gguf"
    inside.symlink_to(tiny_model)
    assert reason(inside) == "is a symbolic link"
    assert "outside" in reason(inside, follow_symlinks_within=models)
    validate_gguf(inside, follow_symlinks_within=tmp_path)
    real = models / "real.gguf"
    real.write_bytes(tiny_model.read_bytes())
    rel = models / "rel.gguf"
    rel.symlink_to("real.gguf")
    validate_gguf(rel, follow_symlinks_within=models)
    dangling = models / "dangling.gguf"
    dangling.symlink_to("nowhere.gguf")
    assert reason(dangling, follow_symlinks_within=models).startswith("cannot open file")
    loop = models / "loop.gguf"
    loop.symlink_to("loop.gguf")
    assert reason(loop, follow_symlinks_within=models)


def test_split_model(tmp_path: Path) -> None:
    base = tmp_path / "split.gguf"
    write_model(base, split_max_tensors=10)
    parts = sorted(tmp_path.glob("split-*.gguf"))
    assert [p.name for p in parts] == [f"split-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert split_parts(parts[0]) == parts
    assert split_parts(parts[2]) == parts
    assert split_parts(base) == [base]
    validate_gguf(parts[0])
    assert reason(parts[1]) == "split part 2 of 3; load the first part"
    parts[2].unlink()
    assert reason(parts[0]) == "split part 3 of 3 is missing"


def test_split_part_corruption_is_reported(tmp_path: Path) -> None:
    write_model(tmp_path / "s.gguf", split_max_tensors=10)
    part = tmp_path / "s-00002-of-00003.gguf"
    os.truncate(part, 10)
    assert reason(tmp_path / "s-00001-of-00003.gguf") == "split part 2 of 3: truncated in header"


def test_validates_a_100mb_file_fast(tmp_path: Path) -> None:
    """100 MB with a 49k-token vocabulary and merges, as SmolLM2-135M: well under 100 ms."""
    path = tmp_path / "big.gguf"
    n_vocab, n_embd, n_layer = 49152, 576, 30
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in [("block_count", n_layer), ("context_length", 8192)]:
        writer.add_uint32(f"llama.{key}", value)
    writer.add_uint32("llama.embedding_length", n_embd)
    writer.add_uint32("llama.attention.head_count", 9)
    writer.add_token_list([f"t{i}" for i in range(n_vocab)])
    writer.add_token_merges([f"a{i} b{i}" for i in range(n_vocab)])
    writer.add_token_types([1] * n_vocab)
    f16 = np.dtype(np.float16)
    shapes = [("token_embd.weight", (n_vocab, n_embd))]
    shapes += [(f"blk.{i}.w{j}.weight", (n_embd, n_embd)) for i in range(n_layer) for j in range(4)]
    raw = gguf.GGMLQuantizationType.F16
    for name, shape in shapes:
        writer.add_tensor_info(name, shape, f16, shape[0] * shape[1] * 2, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    header_end = -(-path.stat().st_size // 32) * 32
    os.truncate(path, header_end + sum(-(-a * b * 2 // 32) * 32 for _, (a, b) in shapes))
    assert path.stat().st_size > 100_000_000
    with pytest.raises(InvalidModelFile):  # no feed-forward etc. is fine; tokens are the cost
        validate_gguf(path, max_tensors=10)
    best = min(_timed(path) for _ in range(3))
    assert best < 0.1, best


def _timed(path: Path) -> float:
    start = time.perf_counter()
    validate_gguf(path)
    return time.perf_counter() - start
