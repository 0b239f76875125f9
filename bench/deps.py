"""Build llama-server once from the llama.cpp source vendored in the llama-cpp-python sdist.

The benchmark compares modeld with the C++ server built from exactly the llama.cpp that
llama-cpp-python (and so modeld's workers) runs. The sdist is fetched with the ordinary
``pip download`` (the user's index and proxy settings), unpacked under the cache dir and
built with CMake for the host CPU. Every step is skipped when its output already exists,
so running this again costs nothing. Bench only: tests and CI never call it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # the version pyproject pins for the workers
SDIST_DIR = "llama_cpp_python-0.3.36"  # the sdist's top-level directory
DEFAULT_CACHE = Path(".cache/bench")  # relative to the repo root, like the demo model's cache
BUILD_JOBS = 2  # the reference machine has 2 cores; more jobs only add memory pressure
PIP_TIMEOUT_S = 900.0  # a 77 MB sdist over a slow proxy; beyond that something is stuck
BUILD_TIMEOUT_S = 3600.0  # about 8 minutes on 2 cores; an hour means it is stuck
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # tuned for this CPU, as llama-cpp-python's own build is by default
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",  # the server lives under tools/
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",  # no npm build of the web UI
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # and no download of it: the bench never opens the UI
    "-DLLAMA_OPENSSL=OFF",  # loopback HTTP only
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary in the cache
)


class DepsError(RuntimeError):
    """A bench dependency could not be fetched or built."""


def server_binary(cache: Path | str = DEFAULT_CACHE) -> Path:
    """Where the built llama-server lives (it may not exist yet)."""
    return Path(cache) / "llama-server"


def _run(cmd: Sequence[str], *, cwd: Path | None, timeout: float, what: str) -> None:
    """Run a build step, echoing its output tail on failure."""
    print(f"bench.deps: {what}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(
            list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DepsError(f"{what} failed: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise DepsError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def _sdist(cache: Path) -> Path:
    """The sdist tarball in cache, downloaded with pip if missing."""
    found = sorted(cache.glob(f"{SDIST_DIR}.tar.gz"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    cmd += ["--quiet", "--dest", str(cache), LLAMA_CPP_PYTHON]
    _run(cmd, cwd=None, timeout=PIP_TIMEOUT_S, what=f"pip download {LLAMA_CPP_PYTHON} (sdist)")
    found = sorted(cache.glob(f"{SDIST_DIR}.tar.gz"))
    if not found:
        raise DepsError(f"pip download left no {SDIST_DIR}.tar.gz in {cache}")
    return found[0]


def _source(cache: Path) -> Path:
    """The vendored llama.cpp source tree, unpacked from the sdist if missing."""
    src = cache / SDIST_DIR / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    tarball = _sdist(cache)
    print(f"bench.deps: unpacking {tarball.name}", file=sys.stderr, flush=True)
    prefix = f"{SDIST_DIR}/vendor/llama.cpp/"
    with tarfile.open(tarball) as tf:
        members = [m for m in tf.getmembers() if m.name.startswith(prefix)]
        tf.extractall(cache, members=members, filter="data")
    if not (src / "CMakeLists.txt").is_file():
        raise DepsError(f"{tarball.name} has no vendor/llama.cpp")
    return src


def build_llama_server(cache: Path | str = DEFAULT_CACHE, jobs: int = BUILD_JOBS) -> Path:
    """Return the llama-server binary, building it first if the cache lacks it."""
    cache = Path(cache)
    target = server_binary(cache)
    if target.is_file() and os.access(target, os.X_OK):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    src = _source(cache)
    build = cache / "build-llama-server"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    t0 = time.monotonic()
    configure = ["cmake", "-S", str(src), "-B", str(build), *generator, *CMAKE_FLAGS]
    _run(configure, cwd=None, timeout=BUILD_TIMEOUT_S, what="cmake configure")
    compile_cmd = ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)]
    _run(compile_cmd, cwd=None, timeout=BUILD_TIMEOUT_S, what=f"building llama-server (-j{jobs})")
    built = build / "bin" / "llama-server"
    if not built.is_file():
        raise DepsError(f"the build finished but {built} is missing")
    tmp = target.with_name(target.name + ".part")
    shutil.copy2(built, tmp)
    os.replace(tmp, target)
    print(f"bench.deps: built in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build (or find) llama-server and print its path."""
    ap = argparse.ArgumentParser(prog="python -m bench.deps", description=__doc__)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache directory")
    ap.add_argument("--jobs", type=int, default=BUILD_JOBS, help="parallel compile jobs")
    args = ap.parse_args(argv)
    try:
        path = build_llama_server(args.cache, args.jobs)
    except DepsError as exc:
        print(f"bench.deps: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
