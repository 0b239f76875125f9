"""The daemon process stays small: llama.cpp and Jinja live in the workers only."""

from __future__ import annotations

import subprocess
import sys

PROBE = "import sys, modeld.cli, modeld.daemon; print(sorted(m for m in {M} if m in sys.modules))"


def test_the_daemon_imports_neither_llama_cpp_nor_jinja() -> None:
    code = PROBE.replace("{M}", repr(("llama_cpp", "jinja2")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
