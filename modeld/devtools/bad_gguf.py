"""Generate a corpus of malformed GGUF files from a valid one, for robustness tests.

Theory of operation: ``_Layout`` walks a valid GGUF and records where each part sits (header
fields, every key/value pair, every tensor info and its fields, the data section). Mutations are
either in-place byte patches at those offsets (same length, so everything else stays put) or a
re-assembly of the parsed parts with one part replaced (the data section is re-aligned, so only
the intended defect is present). Every file is meant to be rejected cleanly by a loader: none
should crash or hang the process that scans or loads it. Some make llama.cpp itself abort, so
only ever hand them to llama.cpp in a child process.

Careful: the corpus holds a FIFO, ``fifo.gguf``; opening it for reading blocks until a writer
appears. Check ``stat.S_ISREG`` before opening anything.
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from modeld.devtools.tiny_gguf import write_tiny_llama

FLIP_SEED = 20240601  # fixed: the byte-flip files are the same on every run
ALIGN = 32  # GGUF's default data alignment (the base file sets no general.alignment)
HUGE = 1 << 62  # a count/length no file can hold, yet positive as int64
_STRING, _ARRAY, _UINT32 = 8, 9, 4  # GGUF value-type codes used below
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # by type
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class _KV:
    """One key/value pair: its key and the offsets of its start, type, value and end."""

    key: str
    start: int
    type_at: int
    value_at: int
    end: int


@dataclass(frozen=True)
class _TI:
    """One tensor info: its name and the offsets of its fields."""

    name: str
    start: int
    ndims_at: int
    type_at: int
    offset_at: int
    end: int


class _Layout:
    """Where everything sits in a valid little-endian GGUF v2/v3 file."""

    def __init__(self, buf: bytes) -> None:
        if buf[:4] != b"GGUF":
            raise ValueError("base is not a GGUF file")
        self.buf = buf
        self.n_tensors, self.n_kv = struct.unpack_from("<QQ", buf, 8)
        pos = 24
        self.kvs: list[_KV] = []
        for _ in range(self.n_kv):
            key, type_at = self.read_string(pos)
            (vtype,) = _U32.unpack_from(buf, type_at)
            end = self._skip_value(vtype, type_at + 4)
            self.kvs.append(_KV(key, pos, type_at, type_at + 4, end))
            pos = end
        self.tis: list[_TI] = []
        for _ in range(self.n_tensors):
            name, ndims_at = self.read_string(pos)
            (ndims,) = _U32.unpack_from(buf, ndims_at)
            type_at = ndims_at + 4 + 8 * ndims
            self.tis.append(_TI(name, pos, ndims_at, type_at, type_at + 4, type_at + 12))
            pos = type_at + 12
        self.ti_end = pos
        self.data_start = -(-pos // ALIGN) * ALIGN

    def read_string(self, pos: int) -> tuple[str, int]:
        """Decode the GGUF string at pos; return it and the offset just after it."""
        (n,) = _U64.unpack_from(self.buf, pos)
        return self.buf[pos + 8 : pos + 8 + n].decode("utf-8"), pos + 8 + n

    def _skip_value(self, vtype: int, pos: int) -> int:
        """Offset just after a value of type vtype starting at pos."""
        if vtype == _STRING:
            return self.read_string(pos)[1]
        if vtype == _ARRAY:
            (etype,) = _U32.unpack_from(self.buf, pos)
            (count,) = _U64.unpack_from(self.buf, pos + 4)
            pos += 12
            for _ in range(count):
                pos = self._skip_value(etype, pos)
            return pos
        return pos + _SCALAR_SIZE[vtype]

    def kv(self, key: str) -> _KV:
        """The pair with this key."""
        return next(kv for kv in self.kvs if kv.key == key)

    def kv_blob(self, kv: _KV) -> bytes:
        """The raw bytes of one pair."""
        return self.buf[kv.start : kv.end]

    def assemble(
        self,
        kv_blobs: Sequence[bytes] | None = None,
        ti_blobs: Sequence[bytes] | None = None,
        data: bytes | None = None,
    ) -> bytes:
        """Re-serialise with some parts replaced; counts follow the parts, data is re-aligned."""
        kvs = [self.kv_blob(kv) for kv in self.kvs] if kv_blobs is None else list(kv_blobs)
        tis = [self.buf[t.start : t.end] for t in self.tis] if ti_blobs is None else list(ti_blobs)
        body = self.buf[self.data_start :] if data is None else data
        head = b"GGUF" + self.buf[4:8] + struct.pack("<QQ", len(tis), len(kvs))
        meta = head + b"".join(kvs) + b"".join(tis)
        return meta + b"\0" * (-len(meta) % ALIGN) + body


def _gstr(s: str | bytes) -> bytes:
    """A GGUF string: u64 length then the bytes."""
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return _U64.pack(len(raw)) + raw


def _patch(buf: bytes, at: int, new: bytes) -> bytes:
    """buf with new written over it at offset at (same length)."""
    return buf[:at] + new + buf[at + len(new) :]


def _splice(items: Sequence[bytes], i: int, new: bytes | None) -> list[bytes]:
    """items with item i replaced by new, or removed when new is None."""
    return [*items[:i], *([] if new is None else [new]), *items[i + 1 :]]


def _flip(buf: bytes, rng: random.Random, lo: int, hi: int, n: int) -> bytes:
    """buf with n random bytes in [lo, hi) XOR-ed with a random non-zero mask."""
    out = bytearray(buf)
    for at in rng.sample(range(lo, hi), n):
        out[at] ^= rng.randrange(1, 256)
    return bytes(out)


def _truncations(lay: _Layout) -> list[tuple[int, str]]:
    """(length, description) pairs that cut the file inside each of its sections."""
    tokens = lay.kv("tokenizer.ggml.tokens")
    mid_ti = lay.tis[len(lay.tis) // 2]
    size = len(lay.buf)
    return [
        (3, "truncated inside the magic"),
        (10, "truncated inside the version/tensor count"),
        (24, "truncated right after the header (no key/value pairs)"),
        (28, "truncated inside the first key's length"),
        (lay.kvs[0].end - 3, "truncated inside the first value"),
        (tokens.value_at + 8, "truncated inside the token array header"),
        ((tokens.value_at + tokens.end) // 2, "truncated in the middle of the token array"),
        (lay.kvs[-1].end, "truncated after the last key/value pair (no tensor infos)"),
        (mid_ti.start + 5, "truncated inside a tensor name"),
        (mid_ti.ndims_at + 8, "truncated inside tensor dims"),
        (lay.ti_end, "truncated after the tensor infos (no data)"),
        (lay.data_start + 100, "truncated just into the tensor data"),
        ((lay.data_start + size) // 2, "truncated in the middle of the tensor data"),
        (size - 1, "last byte of tensor data missing"),
    ]


def _header_mutants(lay: _Layout) -> list[tuple[bytes, str]]:
    """Mutations of the header and of the key/value section."""
    b, first = lay.buf, lay.kvs[0]
    arch = lay.kv("general.architecture")
    tokens = lay.kv("tokenizer.ggml.tokens")
    kvs = [lay.kv_blob(kv) for kv in lay.kvs]
    i_arch, i_tok = lay.kvs.index(arch), lay.kvs.index(tokens)
    i_name = lay.kvs.index(lay.kv("general.name"))
    arch_u32 = _gstr(arch.key) + _U32.pack(_UINT32) + _U32.pack(7)
    align_kv = _gstr("general.alignment") + _U32.pack(_UINT32) + _U32.pack(48)
    nope = _gstr(arch.key) + _U32.pack(_STRING) + _gstr("nope")
    name_kv = _gstr("general.name") + _U32.pack(_STRING) + _gstr(b"\xff\xfe bad utf-8 \xc3")
    return [
        (b"GGUX" + b[4:], "wrong magic"),
        (_patch(b, 4, _U32.pack(1)), "GGUF version 1 (no longer supported)"),
        (_patch(b, 4, _U32.pack(99)), "unsupported GGUF version 99"),
        (_patch(b, 8, _U64.pack(HUGE)), "absurd tensor count 2**62"),
        (_patch(b, 16, _U64.pack(HUGE)), "absurd key/value count 2**62"),
        (_patch(b, 16, _U64.pack(lay.n_kv + 1)), "key/value count one too many"),
        (_patch(b, 8, _U64.pack(lay.n_tensors + 1)), "tensor count one too many"),
        (_patch(b, first.start, _U64.pack(HUGE)), "absurd key length 2**62"),
        (_patch(b, first.start, _U64.pack(0)), "empty key"),
        (_patch(b, first.type_at, _U32.pack(99)), "invalid value type 99"),
        (_patch(b, arch.value_at, _U64.pack(1 << 40)), "absurd string length 2**40"),
        (_patch(b, tokens.value_at + 4, _U64.pack(HUGE)), "absurd token array length 2**62"),
        (_patch(b, tokens.value_at, _U32.pack(99)), "token array of invalid element type"),
        (lay.assemble(_splice(kvs, i_arch, arch_u32)), "architecture is a uint32"),
        (lay.assemble(_splice(kvs, i_arch, None)), "general.architecture missing"),
        (lay.assemble(_splice(kvs, i_arch, nope)), "unknown architecture 'nope'"),
        (lay.assemble([*kvs, kvs[i_arch]]), "duplicate key general.architecture"),
        (lay.assemble([*kvs, align_kv]), "general.alignment 48 (not a power of two)"),
        (
            lay.assemble(_splice(kvs, i_name, name_kv)),
            "general.name not UTF-8 (loads)",
        ),
        (lay.assemble(_splice(kvs, i_tok, _dup_tokens(lay))), "duplicate vocab (llama.cpp aborts)"),
    ]


def _dup_tokens(lay: _Layout) -> bytes:
    """The token-array pair with the last ten pieces replaced by copies of earlier ones."""
    kv = lay.kv("tokenizer.ggml.tokens")
    (count,) = _U64.unpack_from(lay.buf, kv.value_at + 4)
    pos, pieces = kv.value_at + 12, []
    for _ in range(count):
        piece, pos = lay.read_string(pos)
        pieces.append(piece)
    pieces[-10:] = pieces[-20:-10]
    head = _gstr(kv.key) + _U32.pack(_ARRAY) + _U32.pack(_STRING) + _U64.pack(count)
    return head + b"".join(_gstr(p) for p in pieces)


def _tensor_mutants(lay: _Layout) -> list[tuple[bytes, str]]:
    """Mutations of the tensor infos."""
    b, first, last = lay.buf, lay.tis[0], lay.tis[-1]
    (last_offset,) = _U64.unpack_from(b, last.offset_at)
    head, gone = b[lay.data_start : lay.data_start + last_offset], f"tensor {last.name} missing"
    a, twin = next(
        (a, t) for a in lay.tis for t in lay.tis if a != t and len(a.name) == len(t.name)
    )
    return [
        (_patch(b, last.ndims_at + 4, _U64.pack(0)), "a tensor with a zero-sized dim"),
        (_patch(b, first.ndims_at, _U32.pack(9)), "a tensor with 9 dims"),
        (_patch(b, first.ndims_at + 4, _U64.pack(HUGE)), "a tensor with a 2**62 dim"),
        (_patch(b, first.type_at, _U32.pack(9999)), "a tensor of invalid ggml type"),
        (_patch(b, last.offset_at, _U64.pack(1 << 40)), "a tensor offset far beyond EOF"),
        (_patch(b, last.offset_at, _U64.pack(len(b))), "a tensor offset just beyond EOF"),
        (_patch(b, first.offset_at, _U64.pack(ALIGN + 1)), "a misaligned tensor offset"),
        (_patch(b, twin.start + 8, a.name.encode()), f"duplicate tensor name {a.name}"),
        (_patch(b, first.start, _U64.pack(HUGE)), "absurd tensor name length"),
        (lay.assemble(ti_blobs=[], data=b""), "vocab only: no tensors at all"),
        (lay.assemble(ti_blobs=[b[t.start : t.end] for t in lay.tis[:-1]], data=head), gone),
    ]


def _flips(lay: _Layout) -> list[tuple[bytes, str]]:
    """Seeded random byte flips, a few per region."""
    rng = random.Random(FLIP_SEED)
    b, ti0, size = lay.buf, lay.tis[0].start, len(lay.buf)
    regions = [("header and key/values", 0, ti0), ("tensor infos", ti0, lay.ti_end)]
    regions.append(("tensor data", lay.data_start, size))
    out = []
    for label, lo, hi in regions:
        for n in (8, 64):
            why = f"{n} random byte flips in the {label}"
            out.append((_flip(b, rng, lo, hi, n), why + " (loads)" * (label == "tensor data")))
    out.append((_flip(b, rng, 0, size, 256), "256 random byte flips anywhere"))
    return out


def _special(directory: Path) -> list[tuple[Path, str]]:
    """Files that are not regular files, or not there at all."""
    made: list[tuple[Path, str, Callable[[Path], object]]] = [
        (directory / "empty.gguf", "an empty file", lambda p: p.write_bytes(b"")),
        (directory / "directory.gguf", "a directory named *.gguf", lambda p: p.mkdir()),
        (directory / "fifo.gguf", "a FIFO named *.gguf (opening it blocks)", os.mkfifo),
        (
            directory / "dangling.gguf",
            "a symlink to a missing file",
            lambda p: p.symlink_to("does-not-exist.gguf"),
        ),
    ]
    for path, _, make in made:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        elif os.path.lexists(path):
            path.unlink()
        make(path)
    return [(path, desc) for path, desc, _ in made]


def make_corpus(dir: Path, base: Path) -> list[tuple[Path, str]]:
    """Write malformed GGUF files derived from the valid base into dir; return (path, why).

    Descriptions say "(loads)" for the few files llama.cpp accepts (a loader must still cope)
    and "(llama.cpp aborts)" for the one that kills the process through GGML_ASSERT.
    """
    dir.mkdir(parents=True, exist_ok=True)
    lay = _Layout(base.read_bytes())
    blobs = [(lay.buf[:n], why) for n, why in _truncations(lay)]
    blobs += _header_mutants(lay) + _tensor_mutants(lay) + _flips(lay)
    out = []
    for i, (data, why) in enumerate(blobs):
        path = dir / f"bad-{i:02d}.gguf"
        path.write_bytes(data)
        out.append((path, why))
    return out + _special(dir)


def write_small_base(path: Path | str) -> Path:
    """A valid tiny model (about 100 KB) that keeps the corpus a few MB in all."""
    return write_tiny_llama(
        path, n_layer=1, n_embd=32, n_head=2, n_head_kv=1, n_ff=64, dtype="f16", name="bad-base"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the corpus into a directory and list it."""
    ap = argparse.ArgumentParser(prog="python -m modeld.devtools.bad_gguf", description=__doc__)
    ap.add_argument("out", type=Path, help="directory to fill")
    ap.add_argument("--base", type=Path, default=None, help="valid GGUF to start from")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.base or write_small_base(args.out / "base.gguf.valid")
    for path, why in make_corpus(args.out, base):
        print(f"{path}\t{why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
