"""Unit tests for the worker's incremental UTF-8 decoding and stop-string holding."""

from __future__ import annotations

import random

import pytest

from modeld.worker.textstream import StopMatcher, TextStream


def run(pieces: list[bytes], stops: list[str]) -> tuple[list[str], bool]:
    """Feed pieces until stopped; return the non-empty texts emitted and whether it stopped."""
    ts = TextStream(stops)
    out: list[str] = []
    for piece in pieces:
        text = ts.push(piece)
        if text:
            out.append(text)
        if ts.stopped:
            break
    tail = ts.finish()
    if tail:
        out.append(tail)
    return out, ts.stopped


def joined(pieces: list[bytes], stops: list[str]) -> str:
    return "".join(run(pieces, stops)[0])


# --- plain text and UTF-8 -------------------------------------------------------------


def test_no_stops_passes_text_through_immediately() -> None:
    ts = TextStream()
    assert ts.push(b"Hello") == "Hello"
    assert ts.push(b" world") == " world"
    assert ts.finish() == ""
    assert not ts.stopped


def test_multibyte_split_across_tokens_is_held_until_complete() -> None:
    euro = "€".encode()  # 3 bytes
    ts = TextStream()
    assert ts.push(b"a" + euro[:1]) == "a"
    assert ts.push(euro[1:2]) == ""
    assert ts.push(euro[2:] + b"b") == "€b"
    assert ts.finish() == ""


def test_four_byte_emoji_one_byte_per_token() -> None:
    emoji = "🙂".encode()
    pieces = [bytes([b]) for b in emoji]
    out, stopped = run(pieces, [])
    assert out == ["🙂"]
    assert not stopped


def test_invalid_bytes_become_replacement_character() -> None:
    assert joined([b"a\xffb"], []) == "a\ufffdb"


def test_a_character_cut_off_at_the_end_is_dropped() -> None:
    out, _ = run([b"ok", "€".encode()[:2]], [])
    assert "".join(out) == "ok"


def test_empty_piece_yields_nothing() -> None:
    ts = TextStream(["x"])
    assert ts.push(b"") == ""
    assert ts.finish() == ""


# --- stop strings ---------------------------------------------------------------------


def test_stop_inside_one_token_cuts_before_it() -> None:
    out, stopped = run([b"Hello", b" wor", b"ld\n\nBye"], ["\n\n"])
    assert "".join(out) == "Hello world"
    assert stopped


def test_stop_split_across_tokens_is_never_sent() -> None:
    ts = TextStream(["</s>"])
    assert ts.push(b"answer<") == "answer"
    assert ts.push(b"/") == ""
    assert ts.push(b"s") == ""
    assert ts.push(b">trailing") == ""
    assert ts.stopped
    assert ts.finish() == ""


def test_false_alarm_prefix_is_released_when_it_diverges() -> None:
    ts = TextStream(["</s>"])
    assert ts.push(b"a<") == "a"
    assert ts.push(b"/") == ""
    assert ts.push(b"b") == "</b"
    assert not ts.stopped


def test_held_prefix_is_released_at_the_end() -> None:
    out, stopped = run([b"x", b"END"], ["ENDING"])
    assert "".join(out) == "xEND"
    assert not stopped


def test_overlapping_prefix_restarts_match() -> None:
    # "aab": the first "a" starts a candidate that fails, the second one succeeds.
    out, stopped = run([b"a", b"a", b"b", b"c"], ["ab"])
    assert "".join(out) == "a"
    assert stopped


def test_self_overlapping_stop() -> None:
    # Stop "abab" in "ababab...": the match starts at 0.
    out, stopped = run([b"ab", b"ab", b"ab"], ["abab"])
    assert out == []
    assert stopped


def test_self_overlapping_stop_after_false_start() -> None:
    out, stopped = run([b"aba", b"bab"], ["abab"])
    # "ababab": "abab" starts at 0.
    assert out == []
    assert stopped
    out, stopped = run([b"x", b"aba", b"c", b"abab"], ["abab"])
    assert "".join(out) == "xabac"
    assert stopped


def test_several_stops_earliest_start_wins() -> None:
    out, stopped = run([b"one two three"], ["three", "two"])
    assert "".join(out) == "one "
    assert stopped


def test_several_stops_first_completed_ends_generation() -> None:
    # "abcd" started earlier, but "c" completes first, so generation stops at "c".
    ts = TextStream(["abcd", "c"])
    assert ts.push(b"ab") == ""
    assert ts.push(b"c") == "ab"
    assert ts.stopped


def test_first_completed_wins_even_inside_one_token() -> None:
    # Same text in one piece: the answer does not depend on the token split.
    out, stopped = run([b"abcd"], ["abcd", "c"])
    assert out == ["ab"]
    assert stopped


def test_stops_completing_together_cut_at_earliest_start() -> None:
    out, stopped = run([b"hi Us", b"\n"], ["Us\n", "\n"])
    assert out == ["hi "]
    assert stopped


def test_longest_partial_across_several_stops_is_held() -> None:
    ts = TextStream(["abc", "bcd"])
    # "xab": "ab" could begin "abc", "b" could begin "bcd" -> hold "ab".
    assert ts.push(b"xab") == "x"
    assert ts.push(b"cz") == ""
    assert ts.stopped


def test_stop_with_multibyte_characters_split_across_tokens() -> None:
    stop = "。終"
    raw = ("答え" + stop + "余分").encode()
    pieces = [bytes([b]) for b in raw]
    out, stopped = run(pieces, [stop])
    assert "".join(out) == "答え"
    assert stopped


def test_stop_at_very_start() -> None:
    out, stopped = run([b"STOP", b"more"], ["STOP"])
    assert out == []
    assert stopped


def test_empty_and_duplicate_stops_are_ignored() -> None:
    out, stopped = run([b"abc"], ["", "", "zz", "zz"])
    assert "".join(out) == "abc"
    assert not stopped


def test_push_after_stop_returns_nothing() -> None:
    ts = TextStream(["."])
    assert ts.push(b"end.") == "end"
    assert ts.push(b"more") == ""
    assert ts.finish() == ""


def test_matcher_reports_held_text() -> None:
    m = StopMatcher(["\nUser:"])
    assert m.push("ok\nUs") == "ok"
    assert m.held == "\nUs"
    assert m.flush() == "\nUs"
    assert m.held == ""


# --- property: streamed output equals the one-shot answer ------------------------------


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut text at the earliest start of a stop that completes first (whole-text view)."""
    stops = [s for s in stops if s]
    # Find the smallest end position at which some stop is complete.
    best_end = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best_end is None or i + len(s) < best_end):
            best_end = i + len(s)
    if best_end is None:
        return text, False
    prefix = text[:best_end]
    cut = min(prefix.find(s) for s in stops if s in prefix)
    return text[:cut], True


@pytest.mark.parametrize("seed", range(200))
def test_random_splits_match_reference(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab€\n"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(2)]
    raw = text.encode()
    cuts = sorted(rng.sample(range(1, len(raw)), max(0, min(len(raw) - 1, rng.randint(0, 10)))))
    pieces = [raw[i:j] for i, j in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    out, stopped = run(pieces, stops)
    assert ("".join(out), stopped) == reference(text, stops)
    assert all(t for t in out)
