"""One module per `modelctl` command; each parses its options, calls the client, renders."""

from __future__ import annotations
