"""modeld: a local LLM control plane for llama.cpp models."""

from __future__ import annotations

__version__ = "0.1.0"
