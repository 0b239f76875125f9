"""Session-wide test data: tiny random llama GGUF files, written once and linked where needed.

Writing a tiny model takes tens of milliseconds, but many modules want the same few files
in models dirs of their own; `ModelStore` writes each distinct file once per session and
hard-links it into each models dir (a copy where links are not possible).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from modeld.devtools.tiny_gguf import write_tiny_llama

# The standard shapes, by name; each is a keyword set for write_tiny_llama.
TINY_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"seed": 1},  # 0.6 MB, thousands of tokens/s: the default test model
    "tiny2": {"seed": 2},  # a second, different model of the same size
    "padded-a": {"seed": 11, "pad_mb": 4},  # padded to ~5 MB: the budget tests' A, B and C
    "padded-b": {"seed": 12, "pad_mb": 4},
    "padded-c": {"seed": 13, "pad_mb": 4},
}


class ModelStore:
    """Tiny GGUF files written once per session, linked into per-test models dirs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._written: dict[str, Path] = {}

    def get(self, shape: str, **overrides: Any) -> Path:
        """The file for a named shape (see TINY_SHAPES) or a custom one; written once."""
        kwargs = {**TINY_SHAPES.get(shape, {}), **overrides}
        key = shape + "".join(f"-{k}={v}" for k, v in sorted(overrides.items()))
        path = self._written.get(key)
        if path is None:
            path = write_tiny_llama(self.root / f"{len(self._written):03d}.gguf", **kwargs)
            self._written[key] = path
        return path

    def models_dir(self, dest: Path, files: Mapping[str, str | Path]) -> Path:
        """Fill dest with files: {file name in dest: shape name or source path}."""
        dest.mkdir(parents=True, exist_ok=True)
        for name, source in files.items():
            src = self.get(source) if isinstance(source, str) else source
            link(src, dest / name)
        return dest


def link(src: Path, dest: Path) -> None:
    """Hard-link src at dest (copy across file systems); replaces dest."""
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("gguf-store"))


@pytest.fixture(scope="session")
def tiny_model(model_store: ModelStore) -> Path:
    """The default tiny model file (do not write to it: it is linked into models dirs)."""
    return model_store.get("tiny")
