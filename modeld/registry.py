"""The models dir as a registry: which GGUF files are servable, under which ids.

Ids are file names; a request's model id is only ever looked up here, never joined into
a filesystem path. Files are inspected (validated, metadata read) once per (mtime, size),
so rescanning on every miss and every `GET /models` stays cheap. While the daemon runs,
rescans (`refresh`) go to a worker thread, one at a time, so a slow disk or a directory
full of new files never holds up the event loop; lookups only read the last result.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import anyio
import anyio.to_thread

from modeld.errors import ModelNotFound
from modeld.gguf.info import ModelInfo, read_model_info
from modeld.gguf.validate import InvalidModelFile, validate_gguf

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
# Split models: name-00001-of-00003.gguf; only the first shard is offered.
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

Estimator = Callable[[ModelInfo | None, int], int]
OUTSIDE_LINK = "symlink that leads outside the models dir (modeld serves it with --follow-symlinks)"


@dataclass(frozen=True)
class ModelSpec:
    """One servable (or broken) model file."""

    id: str
    path: Path
    size_bytes: int
    est_vram_mb: int
    info: ModelInfo | None = None
    invalid: str | None = None  # why the file cannot be served, when it cannot
    stamp: tuple[int, int, int] = (0, 0, 0)  # (mtime_ns, size, inode): a new file, a new spec

    @property
    def public_estimate_mb(self) -> int | None:
        """The estimate as shown to clients: none for a file that cannot be served."""
        return None if self.invalid else self.est_vram_mb

    def public(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.id,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "est_vram_mb": self.public_estimate_mb,
            "estimate_mb": self.public_estimate_mb,
        }


def size_only_estimate(info: ModelInfo | None, size_bytes: int) -> int:
    """Fallback estimate: the file size in MB, rounded up."""
    return -(-size_bytes // (1024 * 1024))


class Registry:
    """The set of models in `models_dir`, refreshed by `scan()`."""

    def __init__(
        self,
        models_dir: Path,
        *,
        estimator: Estimator = size_only_estimate,
        follow_symlinks: bool = False,
    ) -> None:
        self.models_dir = models_dir.expanduser().absolute()
        self._estimator = estimator
        self._follow_symlinks = follow_symlinks
        self._cache: dict[Path, tuple[tuple[int, int, int], ModelSpec | None]] = {}
        self._specs: dict[str, ModelSpec] = {}
        self._scan_lock: anyio.Lock | None = None  # made on first use, inside the event loop
        # Told the result of every `refresh` (the manager unloads instances of changed files).
        self.on_refresh: Callable[[dict[str, ModelSpec]], None] | None = None
        self._scans_started = 0

    async def refresh(self) -> dict[str, ModelSpec]:
        """`scan()` in a worker thread, one at a time; waiting callers share the next scan.

        Only a scan that started after the call counts (one already under way may have
        missed a file created just before it), so what existed at the call is always seen.
        """
        if self._scan_lock is None:
            self._scan_lock = anyio.Lock()
        ticket = self._scans_started
        async with self._scan_lock:
            if self._scans_started > ticket:  # one started after we asked, and has finished
                return self._specs
            self._scans_started += 1
            specs = await anyio.to_thread.run_sync(self.scan)
        if self.on_refresh is not None:
            self.on_refresh(specs)
        return specs

    def scan(self) -> dict[str, ModelSpec]:
        """Re-read the directory now, on this thread; returns the models by id."""
        specs: dict[str, ModelSpec] = {}
        try:
            names = sorted(os.listdir(self.models_dir))
        except OSError as exc:
            log.error("cannot list models dir %s: %s", self.models_dir, exc.strerror)
            names = []
        for name in names:
            if not name.endswith(GGUF_SUFFIX):
                continue
            split = SPLIT_RE.match(name)
            if split and int(split["no"]) != 1:
                continue
            spec = self._inspect(name, split)
            if spec is not None:
                specs[spec.id] = spec
        self._specs = specs
        return specs

    def models(self) -> list[ModelSpec]:
        return list(self._specs.values())

    def get(self, model_id: str) -> ModelSpec | None:
        return self._specs.get(model_id)

    async def resolve(self, name: str) -> ModelSpec:
        """Find a model by id (with or without `.gguf`), rescanning once on a miss, and
        when the file is not the one scanned, so what reaches llama.cpp was checked."""
        spec = self.lookup(name)
        if spec is None or spec.invalid or _stamp(spec.path) != spec.stamp:  # new/fixed/changed
            await self.refresh()
            spec = self.lookup(name)
        if spec is None:
            raise ModelNotFound(f"no model {name!r} in the models dir", param="model")
        if spec.invalid == OUTSIDE_LINK:  # never served: it is not a model of this dir
            raise ModelNotFound(f"model {spec.id!r} is a {OUTSIDE_LINK}", param="model")
        return spec

    def lookup(self, name: str) -> ModelSpec | None:
        """Find a model by id (with or without `.gguf`) among those last scanned."""
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            return None
        spec = self._specs.get(name)
        if spec is None and not name.endswith(GGUF_SUFFIX):
            spec = self._specs.get(name + GGUF_SUFFIX)
        return spec

    def _inspect(self, name: str, split: re.Match[str] | None) -> ModelSpec | None:
        path = self.models_dir / name
        try:
            lst = os.lstat(path)
        except OSError:
            return None  # gone since the listing
        try:
            st = os.stat(path)
        except OSError:
            if stat.S_ISLNK(lst.st_mode):
                return ModelSpec(name, path, 0, 0, invalid="symlink to a missing file")
            return None
        if stat.S_ISLNK(lst.st_mode) and not self._follow_symlinks:
            target = path.resolve()
            if not target.is_relative_to(self.models_dir.resolve()):
                return ModelSpec(name, path, 0, 0, invalid=OUTSIDE_LINK)
        key = _stamp_of(path, st)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        spec = self._read_spec(name, path, st, split)
        if spec is not None:
            spec = replace(spec, stamp=key)
        self._cache[path] = (key, spec)
        return spec

    def _read_spec(
        self, name: str, path: Path, st: os.stat_result, split: re.Match[str] | None
    ) -> ModelSpec | None:
        size = st.st_size
        if not stat.S_ISREG(st.st_mode):
            return ModelSpec(name, path, 0, 0, invalid="not a regular file")
        if split is not None:
            total = self._split_size(path, split)
            if total is None:
                return ModelSpec(
                    name, path, st.st_size, 0, invalid="split model with missing parts"
                )
            size = total
        within = Path("/") if self._follow_symlinks else self.models_dir.resolve()
        try:
            info = read_model_info(path, follow_symlinks_within=within)
        except InvalidModelFile as exc:
            return ModelSpec(name, path, size, self._estimator(None, size), invalid=str(exc))
        except OSError as exc:
            return ModelSpec(name, path, size, 0, invalid=f"cannot read: {exc.strerror}")
        if not info.is_language_model:
            log.info("not offering %s: %s", name, info.kind_reason or "not a language model")
            return None
        try:
            validate_gguf(path, follow_symlinks_within=within)
        except InvalidModelFile as exc:
            return ModelSpec(name, path, size, self._estimator(None, size), invalid=str(exc))
        except OSError as exc:
            return ModelSpec(name, path, size, 0, invalid=f"cannot read: {exc.strerror}")
        return ModelSpec(name, path, size, self._estimator(info, size), info=info)

    def _split_size(self, first: Path, split: re.Match[str]) -> int | None:
        total = 0
        count = int(split["count"])
        for no in range(1, count + 1):
            part = first.with_name(f"{split['stem']}-{no:05d}-of-{count:05d}.gguf")
            try:
                total += part.stat().st_size
            except OSError:
                return None
        return total


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """The stamp of the model file at path now, None when it is gone."""
    try:
        return _stamp_of(path, os.stat(path))
    except OSError:
        return None


def _stamp_of(path: Path, st: os.stat_result) -> tuple[int, int, int]:
    """(mtime_ns, size, inode) of the file at path (`st`, its stat).

    A split model's covers all its parts (the latest mtime, the total size present), so a
    part that appears, grows or is rewritten makes it a new file too.
    """
    mtime, size = st.st_mtime_ns, st.st_size
    split = SPLIT_RE.match(path.name)
    if split is not None:
        count = int(split["count"])
        for no in range(2, count + 1):
            try:
                part = os.stat(path.with_name(f"{split['stem']}-{no:05d}-of-{count:05d}.gguf"))
            except OSError:
                continue
            mtime, size = max(mtime, part.st_mtime_ns), size + part.st_size
    return (mtime, size, st.st_ino)
