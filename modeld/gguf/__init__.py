"""GGUF model files: validation, metadata and memory estimates, all in Python.

The daemon inspects every model file here before a llama.cpp worker ever opens it.
"""

from __future__ import annotations


class InvalidModelFile(ValueError):
    """A model file the daemon will not hand to a worker; str() is the short reason."""


__all__ = ["InvalidModelFile"]
