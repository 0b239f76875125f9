"""modelctl: the command-line client of modeld."""

from __future__ import annotations
