"""GGUF model files: validation, metadata and memory estimates, all in Python.

The daemon inspects every model file here before a llama.cpp worker ever opens it.
"""

from __future__ import annotations

from modeld.gguf.validate import InvalidModelFile, validate_gguf

__all__ = ["InvalidModelFile", "validate_gguf"]
