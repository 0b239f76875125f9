"""Write tiny random llama-architecture GGUF files that real llama.cpp loads and runs.

Theory of operation: the files are ordinary llama models (SPM tokenizer, RMSNorm, GQA attention,
SwiGLU FFN) with random weights, so llama.cpp loads them through exactly the code path it uses
for real models, and generation produces real (meaningless) tokens at thousands of tokens/s.

Two knobs shape them for tests:

* ``eos_never``: the output-projection row of EOS is all zeros, and the rows of the normal text
  pieces include ``+s*e_k`` and ``-s*e_k`` for every axis ``e_k`` of the hidden space. Whatever
  the final (RMS-normalised, so non-zero) hidden vector ``x`` is, some text piece scores
  ``s*max|x_k| >= s > 0`` while EOS, the control tokens and the byte tokens score exactly 0. So
  greedy decoding never ends a stream, and even sampling at temperature 1 picks one of those
  tokens with probability below ``e**-s`` per step; the text is readable ASCII word pieces.
* ``pad_mb``: llama.cpp rejects tensors it does not expect ("wrong number of tensors"), so the
  padding is a real tensor it loads and counts: the FFN hidden size ``n_ff`` grows (in steps of
  32 so every dtype stays valid) until gate/up/down of all layers are ``pad_mb`` MiB bigger.
  The extra ``ffn_down`` columns are zero, so a padded file generates the same tokens as the
  unpadded one with the same seed; only its size (and the VRAM estimate) changes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

UNK_ID = 0  # SPM convention, also llama.cpp's default for tokenizer.ggml.model == "llama"
BOS_ID = 1  # idem
EOS_ID = 2  # idem
_BYTE_BASE = 3  # id of <0x00>; the 256 byte-fallback tokens follow the three specials
_SPACE = "\u2581"  # SentencePiece's visible space "▁", which llama.cpp maps to " " on output
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;\"()"
# Common English words: with their "▁"-prefixed prefixes they give readable output pieces.
_WORD_TEXT = (
    "the and of to in is it that was for on are with as be at this from or by not but what all "
    "were when we there can an your which if do will about how up out then she so more her two "
    "like see time no make first been who now my over did way use may long very just most know "
    "hello world capital France Paris model token"
)
_WORDS = _WORD_TEXT.split()
_LOGIT_SCALE = 8.0  # s above: EOS loses to the best text piece by >= 8 nats, so P(EOS) < 3.4e-4
_RMS_EPS = 1e-5  # the usual llama RMSNorm epsilon
_ROPE_BASE = 10000.0  # the llama-2 RoPE base; any value works for random weights
_FF_STEP = 32  # n_ff padding granularity: Q8_0 rows must be a whole number of 32-wide blocks
_MIB = 1024 * 1024  # pad_mb is in MiB, the unit VRAM estimates are reported in


@dataclass(frozen=True)
class _DType:
    """How one --dtype choice stores the 2-D weights."""

    qtype: gguf.GGMLQuantizationType
    file_type: int
    bytes_per_weight: float


_DTYPES = {
    "f32": _DType(gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32, 4.0),
    "f16": _DType(gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16, 2.0),
    "q8_0": _DType(gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0, 34 / 32),
}


@dataclass(frozen=True)
class TinyVocab:
    """An SPM vocabulary: pieces, merge scores and llama.cpp token types, index = token id."""

    tokens: tuple[str, ...]
    scores: tuple[float, ...]
    types: tuple[int, ...]

    def text_ids(self) -> list[int]:
        """Ids of the normal (word-piece) tokens, the only ones eos_never lets win."""
        return [i for i, t in enumerate(self.types) if t == gguf.TokenType.NORMAL]


def build_vocab(min_text: int = 0) -> TinyVocab:
    """Build the vocabulary: specials, 256 byte tokens, then at least min_text word pieces."""
    pieces: dict[str, None] = dict.fromkeys([_SPACE, *_CHARS])
    pieces.update(dict.fromkeys(_SPACE + c for c in _CHARS[:26]))
    for word in _WORDS:
        # Prefix-closed, so SPM's pairwise merges can always reach the whole word.
        pieces.update(dict.fromkeys(_SPACE + word[:n] for n in range(1, len(word) + 1)))
    letters = _CHARS[:26]
    extra = (_SPACE + a + b for a in letters for b in letters)
    while len(pieces) < min_text:
        pieces[next(extra)] = None
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(pieces)
    # SPM merges the highest-scoring adjacent pair first; longer pieces win.
    scores = [0.0] * _BYTE_BASE + [0.0] * 256 + [float(len(p)) for p in pieces]
    return TinyVocab(tuple(tokens), tuple(scores), tuple(int(t) for t in types))


def pad_ff(pad_mb: float, *, n_layer: int, n_embd: int, dtype: str = "f32") -> int:
    """Extra FFN width that makes gate/up/down of all layers about pad_mb MiB bigger."""
    if pad_mb <= 0:
        return 0
    per_unit = 3 * n_layer * n_embd * _DTYPES[dtype].bytes_per_weight
    return math.ceil(pad_mb * _MIB / per_unit / _FF_STEP) * _FF_STEP


def _output_rows(rng: np.random.Generator, vocab: TinyVocab, n_embd: int, eos_never: bool) -> Any:
    """The lm_head: ±s·e_k and random norm-s rows for text pieces, zeros for the rest."""
    text = vocab.text_ids()
    if len(text) < 2 * n_embd:
        raise ValueError(f"vocab has {len(text)} text pieces, eos_never needs {2 * n_embd}")
    eye = np.eye(n_embd, dtype=np.float32)
    rest = rng.standard_normal((len(text) - 2 * n_embd, n_embd)).astype(np.float32)
    rest /= np.linalg.norm(rest, axis=1, keepdims=True)
    rows = np.concatenate([eye, -eye, rest])[rng.permutation(len(text))] * _LOGIT_SCALE
    out = np.zeros((len(vocab.tokens), n_embd), dtype=np.float32)
    out[text] = rows
    if not eos_never:
        eos = rng.standard_normal(n_embd).astype(np.float32)
        out[EOS_ID] = eos / np.linalg.norm(eos) * _LOGIT_SCALE
    return out


def _dense(rng: np.random.Generator, rows: int, cols: int) -> Any:
    """A random (rows, cols) matrix scaled so activations stay O(1)."""
    return (rng.standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)


def _layer_tensors(
    rng: np.random.Generator,
    pad_rng: np.random.Generator,
    i: int,
    dims: tuple[int, int, int, int],
) -> dict[str, Any]:
    """Tensors of block i; dims = (n_embd, n_embd_kv, n_ff, n_ff_pad)."""
    n_embd, n_kv, n_ff, n_pad = dims
    p = f"blk.{i}."
    t = {
        p + "attn_norm.weight": np.ones(n_embd, dtype=np.float32),
        p + "attn_q.weight": _dense(rng, n_embd, n_embd),
        p + "attn_k.weight": _dense(rng, n_kv, n_embd),
        p + "attn_v.weight": _dense(rng, n_kv, n_embd),
        p + "attn_output.weight": _dense(rng, n_embd, n_embd),
        p + "ffn_norm.weight": np.ones(n_embd, dtype=np.float32),
        p + "ffn_gate.weight": _dense(rng, n_ff, n_embd),
        p + "ffn_up.weight": _dense(rng, n_ff, n_embd),
        p + "ffn_down.weight": _dense(rng, n_embd, n_ff),
    }
    if n_pad:
        # Padding units read the input but write nothing back: same tokens, bigger file.
        for name in ("ffn_gate.weight", "ffn_up.weight"):
            t[p + name] = np.concatenate([t[p + name], _dense(pad_rng, n_pad, n_embd)])
        zeros = np.zeros((n_embd, n_pad), dtype=np.float32)
        t[p + "ffn_down.weight"] = np.concatenate([t[p + "ffn_down.weight"], zeros], axis=1)
    return t


def _encode(arr: Any, dtype: _DType) -> Any:
    """Store 1-D tensors as F32 (as llama.cpp's converters do) and 2-D ones as dtype."""
    if arr.ndim == 1 or dtype.qtype == gguf.GGMLQuantizationType.F32:
        return arr
    return gguf.quants.quantize(arr, dtype.qtype)


def _check_shape(n_embd: int, n_head: int, n_head_kv: int, n_ff: int, dtype: str) -> None:
    """Reject shapes llama.cpp would refuse, with a readable message instead of an abort."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    if n_embd % n_head or n_head % n_head_kv or (n_embd // n_head) % 2:
        raise ValueError("need n_embd % n_head == 0, n_head % n_head_kv == 0, even head size")
    if dtype == "q8_0" and (n_embd % _FF_STEP or n_ff % _FF_STEP):
        raise ValueError(f"q8_0 needs n_embd and n_ff to be multiples of {_FF_STEP}")


@dataclass(frozen=True)
class _Shape:
    """The llama hyper-parameters of one file; n_ff includes the padding units."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int


def write_tiny_llama(
    path: Path | str,
    *,
    seed: int = 0,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 4096,
    pad_mb: float = 0.0,
    chat_template: str | None = None,
    eos_never: bool = True,
    name: str | None = None,
    dtype: str = "f32",
) -> Path:
    """Write a tiny random llama GGUF to path (atomically) and return the path."""
    _check_shape(n_embd, n_head, n_head_kv, n_ff, dtype)
    vocab = build_vocab(min_text=2 * n_embd)
    n_pad = pad_ff(pad_mb, n_layer=n_layer, n_embd=n_embd, dtype=dtype)
    rng = np.random.default_rng(seed)
    pad_rng = np.random.default_rng([seed, 1])  # separate stream: padding leaves weights alone
    tensors: dict[str, Any] = {
        "token_embd.weight": rng.standard_normal((len(vocab.tokens), n_embd)).astype(np.float32),
        "output_norm.weight": np.ones(n_embd, dtype=np.float32),
        "output.weight": _output_rows(rng, vocab, n_embd, eos_never),
    }
    n_kv = n_embd // n_head * n_head_kv
    for i in range(n_layer):
        tensors.update(_layer_tensors(rng, pad_rng, i, (n_embd, n_kv, n_ff, n_pad)))
    shape = _Shape(n_layer, n_embd, n_head, n_head_kv, n_ff + n_pad, n_ctx_train)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(name or f"tiny-llama-s{seed}")
    _add_hparams(writer, shape, _DTYPES[dtype], len(vocab.tokens))
    _add_tokenizer(writer, vocab, chat_template)
    for tname, arr in tensors.items():
        data = _encode(arr, _DTYPES[dtype])
        writer.add_tensor(tname, data, raw_dtype=None if data is arr else _DTYPES[dtype].qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _add_hparams(writer: Any, shape: _Shape, dt: _DType, n_vocab: int) -> None:
    """Write the llama.* hyper-parameter keys llama.cpp reads for this architecture."""
    writer.add_file_type(dt.file_type)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.n_embd // shape.n_head)
    writer.add_rope_freq_base(_ROPE_BASE)
    writer.add_layer_norm_rms_eps(_RMS_EPS)
    writer.add_vocab_size(n_vocab)


def _add_tokenizer(writer: Any, vocab: TinyVocab, chat_template: str | None) -> None:
    """Write the tokenizer.* keys: SPM model, pieces, scores, types, special ids."""
    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_scores(list(vocab.scores))
    writer.add_token_types(list(vocab.types))
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write one tiny model and print its path."""
    ap = argparse.ArgumentParser(prog="python -m modeld.devtools.tiny_gguf", description=__doc__)
    ap.add_argument("out", type=Path, help="output .gguf path")
    ap.add_argument("--pad-mb", type=float, default=0.0, help="grow the weights by this many MiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat-template", default=None, help="Jinja chat template to embed")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-ctx-train", type=int, default=4096)
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="f32")
    ap.add_argument("--name", default=None, help="general.name (default tiny-llama-s<seed>)")
    ap.add_argument("--allow-eos", action="store_true", help="let the model emit EOS")
    args = ap.parse_args(argv)
    path = write_tiny_llama(
        args.out,
        seed=args.seed,
        n_layer=args.n_layer,
        n_ctx_train=args.n_ctx_train,
        pad_mb=args.pad_mb,
        chat_template=args.chat_template,
        eos_never=not args.allow_eos,
        name=args.name,
        dtype=args.dtype,
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
