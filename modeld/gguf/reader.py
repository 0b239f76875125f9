"""A bounded GGUF parser: header, metadata and tensor infos, never the tensor data.

Theory of operation: `read_header` parses the header, every metadata key/value and every
tensor info with its own reader (struct over `os.pread`, never mmap, so a file that
shrinks underneath cannot SIGBUS the daemon), checks each count and length against the
limits and the file size, and the tensor layout the way llama.cpp's gguf.cpp does.
Anything wrong is `InvalidModelFile` with a short reason that names no path; no other
exception escapes.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES

from modeld.gguf import InvalidModelFile

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit lengths and is long gone; llama.cpp reads 2 and 3
DEFAULT_ALIGNMENT = 32  # GGUF's default when general.alignment is absent
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME = 63  # GGML_MAX_NAME is 64 bytes including the NUL
MAX_ELEMENTS = 1 << 50  # far above any real tensor, low enough that sizes stay sane
MAX_ARRAY_DEPTH = 4  # nested arrays are legal but no real file nests deeper than 2
KEEP_ITEMS = 1024  # numeric arrays up to this long are decoded (per-layer head counts)
TOKENS_KEY = "tokenizer.ggml.tokens"  # must hold no repeats: llama.cpp asserts on one
READ_CHUNK = 1 << 20  # metadata is read in 1 MiB preads: few syscalls, bounded memory

# GGUF value type ids (gguf.GGUFValueType), and the struct format of each scalar one.
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL = range(8)
T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = range(8, 13)
SCALAR_FORMATS = {
    T_UINT8: "B",
    T_INT8: "b",
    T_UINT16: "H",
    T_INT16: "h",
    T_UINT32: "I",
    T_INT32: "i",
    T_FLOAT32: "f",
    T_BOOL: "B",
    T_UINT64: "Q",
    T_INT64: "q",
    T_FLOAT64: "d",
}
UNSIGNED_TYPES = frozenset({T_UINT8, T_UINT16, T_UINT32, T_UINT64})
INTEGER_TYPES = UNSIGNED_TYPES | {T_INT8, T_INT16, T_INT32, T_INT64}
_SCALARS = {t: struct.Struct("<" + f) for t, f in SCALAR_FORMATS.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_TYPE_SIZES = {int(t): (int(b), int(s)) for t, (b, s) in GGML_QUANT_SIZES.items()}


Scalar = int | float | bool | str


@dataclass(frozen=True)
class ArrayValue:
    """A metadata array: element type, length, and the items when small and not strings."""

    elem_type: int
    count: int
    items: tuple[Scalar, ...] | None = None


Value = Scalar | ArrayValue


@dataclass(frozen=True)
class Field:
    """One metadata value with its GGUF type id."""

    type: int
    value: Value


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's descriptor; offset is relative to the data section."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """Everything in a GGUF file except the tensor data."""

    version: int
    fields: dict[str, Field]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_offset: int
    file_size: int

    def get(self, key: str) -> Value | None:
        field = self.fields.get(key)
        return None if field is None else field.value


@dataclass(frozen=True)
class Limits:
    """Upper bounds on counts and lengths, so a hostile header cannot exhaust memory or CPU."""

    max_kv: int = 1 << 16
    max_tensors: int = 1 << 16
    max_string: int = 1 << 24
    max_array: int = 1 << 24


class _Reader:
    """Sequential little-endian reads over a file descriptor with a sliding buffer."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0  # read position inside buf (may run past its end after a skip)

    def tell(self) -> int:
        return self.base + self.pos

    def fill(self, n: int, what: str) -> None:
        """Make n bytes available at pos, or fail as truncated."""
        if self.pos + n <= len(self.buf):
            return
        start = self.base + self.pos
        if n > self.size - start:
            raise InvalidModelFile(f"truncated in {what}")
        keep = self.buf[self.pos :]
        want = min(self.size - start, max(n, READ_CHUNK)) - len(keep)
        chunks = [keep]
        at = start + len(keep)
        while want > 0:
            try:
                got = os.pread(self.fd, want, at)
            except OSError as exc:
                raise InvalidModelFile(f"cannot read file: {exc.strerror}") from None
            if not got:
                break
            chunks.append(got)
            at += len(got)
            want -= len(got)
        self.buf = b"".join(chunks)
        self.base, self.pos = start, 0
        if len(self.buf) < n:
            raise InvalidModelFile(f"truncated in {what}")

    def scalar(self, st: struct.Struct, what: str) -> Scalar:
        if self.pos + st.size > len(self.buf):
            self.fill(st.size, what)
        (value,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return value  # type: ignore[no-any-return]

    def u32(self, what: str) -> int:
        return int(self.scalar(_U32, what))

    def u64(self, what: str) -> int:
        return int(self.scalar(_U64, what))

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.tell():
            raise InvalidModelFile(f"truncated in {what}")
        self.pos += n

    def string(self, limit: int, what: str, *, strict: bool = True) -> str:
        """A length-prefixed UTF-8 string; values decode leniently, as llama.cpp reads them."""
        n = self.u64(what)
        if n > limit:
            raise InvalidModelFile(f"string too long in {what} ({n} bytes)")
        self.fill(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8", "strict" if strict else "replace")
        except UnicodeDecodeError:
            raise InvalidModelFile(f"{what} is not valid UTF-8") from None

    def skip_strings(self, count: int, limit: int, what: str) -> None:
        """Walk count length-prefixed strings without decoding them (the hot loop)."""
        unpack = _U64.unpack_from
        buf, pos, done = self.buf, self.pos, 0
        while done < count:
            last = len(buf) - 8  # walk what the buffer holds, then refill
            while done < count and pos <= last:
                n = unpack(buf, pos)[0]
                if n > limit:
                    raise InvalidModelFile(f"string too long in {what} ({n} bytes)")
                pos += 8 + n
                done += 1
            if done < count:
                self.pos = pos
                self.fill(8, what)
                buf, pos = self.buf, self.pos
        self.pos = pos
        if self.tell() > self.size:
            raise InvalidModelFile(f"truncated in {what}")

    def raw_strings(self, count: int, limit: int, what: str) -> list[bytes]:
        """count length-prefixed strings as raw bytes (for the repeat check on tokens)."""
        unpack = _U64.unpack_from
        out: list[bytes] = []
        append = out.append
        buf, pos = self.buf, self.pos
        while len(out) < count:
            last = len(buf) - 8
            while len(out) < count and pos <= last:
                n = unpack(buf, pos)[0]
                end = pos + 8 + n
                if n > limit or end > len(buf):
                    break
                append(buf[pos + 8 : end])
                pos = end
            if len(out) < count:
                self.pos = pos
                self.fill(8, what)
                n = unpack(self.buf, self.pos)[0]
                if n > limit:
                    raise InvalidModelFile(f"string too long in {what} ({n} bytes)")
                self.fill(8 + n, what)
                buf, pos = self.buf, self.pos
        self.pos = pos
        return out


def _first_repeat(items: list[bytes]) -> int:
    """Index of the first item equal to an earlier one, or -1."""
    if len(set(items)) == len(items):
        return -1
    seen: set[bytes] = set()
    for i, item in enumerate(items):
        if item in seen:
            return i
        seen.add(item)
    return -1  # pragma: no cover - the set sizes said there is one


def _read_array(
    r: _Reader, lim: Limits, what: str, depth: int, *, unique: bool = False
) -> ArrayValue:
    elem_type = r.u32(what)
    count = r.u64(what)
    if count > lim.max_array:
        raise InvalidModelFile(f"array too long in {what} ({count} items)")
    if elem_type == T_STRING:
        if unique:
            repeat = _first_repeat(r.raw_strings(count, lim.max_string, what))
            if repeat >= 0:
                raise InvalidModelFile(f"repeated string {repeat} in {what}")
            return ArrayValue(elem_type, count)
        if count <= 16:
            items = tuple(r.string(lim.max_string, what, strict=False) for _ in range(count))
            return ArrayValue(elem_type, count, items)
        r.skip_strings(count, lim.max_string, what)
        return ArrayValue(elem_type, count)
    if elem_type == T_ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise InvalidModelFile(f"arrays nested too deep in {what}")
        for _ in range(count):
            _read_array(r, lim, what, depth + 1)
        return ArrayValue(elem_type, count)
    fmt = SCALAR_FORMATS.get(elem_type)
    if fmt is None:
        raise InvalidModelFile(f"unknown value type {elem_type} in {what}")
    nbytes = count * _SCALARS[elem_type].size
    if count > KEEP_ITEMS:
        r.skip(nbytes, what)
        return ArrayValue(elem_type, count)
    r.fill(nbytes, what)
    values = struct.unpack_from(f"<{count}{fmt}", r.buf, r.pos)
    r.pos += nbytes
    if elem_type == T_BOOL:
        values = tuple(bool(v) for v in values)
    return ArrayValue(elem_type, count, values)


def _read_value(r: _Reader, vtype: int, lim: Limits, key: str) -> Value:
    what = f"value of {key!r}"
    if vtype == T_STRING:
        return r.string(lim.max_string, what, strict=False)
    if vtype == T_ARRAY:
        return _read_array(r, lim, what, 1, unique=key == TOKENS_KEY)
    st = _SCALARS.get(vtype)
    if st is None:
        raise InvalidModelFile(f"unknown value type {vtype} in {what}")
    value = r.scalar(st, what)
    return bool(value) if vtype == T_BOOL else value


def _read_fields(r: _Reader, count: int, lim: Limits) -> dict[str, Field]:
    fields: dict[str, Field] = {}
    for i in range(count):
        key = r.string(lim.max_string, f"key {i}")
        if not key:
            raise InvalidModelFile(f"key {i} is empty")
        if key in fields:
            raise InvalidModelFile(f"duplicate key {key!r}")
        vtype = r.u32(f"value of {key!r}")
        fields[key] = Field(vtype, _read_value(r, vtype, lim, key))
    return fields


def _alignment(fields: dict[str, Field]) -> int:
    field = fields.get("general.alignment")
    if field is None:
        return DEFAULT_ALIGNMENT
    value = field.value
    if field.type != T_UINT32 or not isinstance(value, int) or value <= 0 or value & (value - 1):
        raise InvalidModelFile("general.alignment must be a uint32 power of two")
    return value


def _tensor_nbytes(name: str, shape: Sequence[int], ggml_type: int) -> int:
    sizes = _TYPE_SIZES.get(ggml_type)
    if sizes is None:
        raise InvalidModelFile(f"tensor {name!r} has unknown ggml type {ggml_type}")
    block, type_size = sizes
    elements = 1
    for dim in shape:
        if dim <= 0:
            raise InvalidModelFile(f"tensor {name!r} has an empty dimension")
        elements *= dim
        if elements > MAX_ELEMENTS:
            raise InvalidModelFile(f"tensor {name!r} is too large")
    if shape and shape[0] % block:
        raise InvalidModelFile(f"tensor {name!r} rows are not a whole number of blocks")
    return elements // block * type_size


def _read_tensors(r: _Reader, count: int, lim: Limits, alignment: int) -> list[TensorInfo]:
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    expected = 0
    for i in range(count):
        what = f"tensor info {i}"
        name = r.string(lim.max_string, what)
        if len(name.encode()) > MAX_TENSOR_NAME:
            raise InvalidModelFile(f"tensor {i} name is too long")
        if name in names:
            raise InvalidModelFile(f"duplicate tensor name {name!r}")
        names.add(name)
        n_dims = r.u32(what)
        if n_dims > MAX_DIMS:
            raise InvalidModelFile(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(r.u64(what) for _ in range(n_dims))
        ggml_type = r.u32(what)
        offset = r.u64(what)
        nbytes = _tensor_nbytes(name, shape, ggml_type)
        if offset % alignment:
            raise InvalidModelFile(f"tensor {name!r} offset is not aligned to {alignment}")
        if offset != expected:
            raise InvalidModelFile(f"tensor {name!r} has offset {offset}, expected {expected}")
        expected = offset + -(-nbytes // alignment) * alignment
        tensors.append(TensorInfo(name, shape, ggml_type, offset, nbytes))
    return tensors


def _parse(r: _Reader, lim: Limits) -> GGUFHeader:
    r.fill(4, "header")
    if r.buf[:4] != GGUF_MAGIC:
        raise InvalidModelFile("bad magic (not a GGUF file)")
    r.pos = 4
    version = r.u32("header")
    if version not in SUPPORTED_VERSIONS:
        if struct.unpack("<I", struct.pack(">I", version))[0] in SUPPORTED_VERSIONS:
            raise InvalidModelFile("big-endian GGUF is not supported")
        raise InvalidModelFile(f"unsupported GGUF version {version}")
    n_tensors = r.u64("header")
    n_kv = r.u64("header")
    if n_tensors > lim.max_tensors:
        raise InvalidModelFile(f"too many tensors ({n_tensors})")
    if n_kv > lim.max_kv:
        raise InvalidModelFile(f"too many metadata keys ({n_kv})")
    fields = _read_fields(r, n_kv, lim)
    alignment = _alignment(fields)
    tensors = _read_tensors(r, n_tensors, lim, alignment)
    data_offset = -(-r.tell() // alignment) * alignment
    for t in tensors:
        if data_offset + t.offset + t.nbytes > r.size:
            raise InvalidModelFile(f"tensor {t.name!r} data lies outside the file")
    return GGUFHeader(version, fields, tuple(tensors), alignment, data_offset, r.size)


def _open(path: Path, follow_symlinks_within: Path | None) -> int:
    """Open for reading without following a symlink, unless it stays inside the given dir."""
    try:
        if os.path.islink(path):
            if follow_symlinks_within is None:
                raise InvalidModelFile("is a symbolic link")
            target = path.resolve(strict=True)
            if not target.is_relative_to(follow_symlinks_within.resolve(strict=True)):
                raise InvalidModelFile("symbolic link leads outside the models dir")
            path = target
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidModelFile(f"cannot open file: {exc.strerror or exc}") from None
    except RuntimeError:  # symlink loop on older Pythons
        raise InvalidModelFile("symbolic link loop") from None
    return fd


def read_header(
    path: Path,
    *,
    limits: Limits | None = None,
    follow_symlinks_within: Path | None = None,
) -> GGUFHeader:
    """Parse and bound-check one GGUF file's header, metadata and tensor infos."""
    fd = _open(path, follow_symlinks_within)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidModelFile("not a regular file")
        return _parse(_Reader(fd, st.st_size), limits or Limits())
    except InvalidModelFile:
        raise
    except Exception as exc:  # a parser bug must not escape as anything else; tests fuzz for it
        raise InvalidModelFile(f"unreadable GGUF ({type(exc).__name__})") from None
    finally:
        os.close(fd)
