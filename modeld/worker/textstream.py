"""Turn a stream of token byte pieces into text a client may see: whole UTF-8, no stop text.

Pure (no llama.cpp): the worker feeds each sampled token's bytes to `TextStream.push` and
sends whatever text comes back. Two things are held back until they are settled:

- bytes that end in the middle of a multi-byte UTF-8 sequence (an incremental decoder
  keeps them; invalid bytes become U+FFFD). A character still unfinished when generation
  ends (cut by max_tokens) is dropped: half a character is no text;
- a tail of text that could be the beginning of a stop string. When a stop string is
  complete, everything from its first character on is dropped and `stopped` turns true.

Generation stops at the first moment any stop string is complete; the text is cut where
the earliest stop complete at that moment starts.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

__all__ = ["StopMatcher", "TextStream"]


class StopMatcher:
    """Finds stop strings in streamed text and holds back what might begin one."""

    __slots__ = ("_held", "_stops", "stopped")

    def __init__(self, stops: Iterable[str]) -> None:
        # Empty stop strings would match everywhere; they mean nothing, so drop them.
        self._stops: tuple[str, ...] = tuple(sorted({s for s in stops if s}, key=len))
        self._held = ""
        self.stopped = False

    @property
    def held(self) -> str:
        """Text kept back because it could be the start of a stop string."""
        return self._held

    def push(self, text: str) -> str:
        """Add text; return what is now safe to emit (never any stop text)."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        cut = self._first_stop(buf)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        keep = self._partial_tail(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """Release the held-back tail (generation ended without completing a stop)."""
        out, self._held = self._held, ""
        return "" if self.stopped else out

    def _first_stop(self, buf: str) -> int:
        """Where to cut buf for the stop that completes first, or -1 when none is complete.

        Among the stops complete by the earliest end position, the earliest start wins, so
        the answer does not depend on how the text was split into tokens.
        """
        found = [(i, i + len(s)) for s in self._stops if (i := buf.find(s)) >= 0]
        if not found:
            return -1
        first_end = min(end for _, end in found)
        return min(start for start, end in found if end <= first_end)

    def _partial_tail(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop."""
        longest = 0
        n = len(buf)
        for stop in self._stops:
            # Candidate starts, longest suffix first; most tokens have none (one C-level find).
            i = buf.find(stop[0], max(0, n - len(stop) + 1))
            while i >= 0 and n - i > longest:
                if stop.startswith(buf[i:]):
                    longest = n - i
                    break
                i = buf.find(stop[0], i + 1)
        return longest


class TextStream:
    """Token bytes in, emittable text out: incremental UTF-8 decoding plus stop strings."""

    __slots__ = ("_decode", "_matcher")

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        self._matcher = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        """True once a stop string has appeared; no more text will be returned."""
        return self._matcher.stopped

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that is now settled (may be empty)."""
        text = self._decode(piece)
        if not text:
            return ""
        return self._matcher.push(text)

    def finish(self) -> str:
        """End of generation: release held-back text; an unfinished character is dropped."""
        return self._matcher.flush()
