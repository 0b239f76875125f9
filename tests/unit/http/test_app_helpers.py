"""Small pure pieces of the API layer: Host checks and field validation."""

from __future__ import annotations

import pytest

from modeld.api.app import is_loopback_host
from modeld.api.infer import parse_infer
from modeld.errors import InvalidRequest


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:8484",
        "127.0.0.1",
        "127.0.0.1:1",
        "[::1]:8484",
        "::1",
        "LOCALHOST",
        "a.localhost",
        "localhost.",  # fully qualified
        "localhost:",  # an empty port (RFC 3986 allows it)
        "[::ffff:127.0.0.1]:8484",  # IPv4-mapped loopback
    ],
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize(
    "host",
    [
        "",
        "evil.com",
        "evil.com:8484",
        "10.0.0.1",
        "127.0.0.1.evil.com",
        "[::1]evil.com",  # junk after the address
        "127.0.0.1:abc",  # a port that is no number
        "127.0.0.1:\u00b2",  # a superscript two is a digit to str.isdigit(), not a port
        "localhost:80:80",
        "[::1",
    ],
)
def test_other_hosts_are_refused(host: str) -> None:
    assert not is_loopback_host(host)


def test_defaults() -> None:
    req = parse_infer({"prompt": "hi"})
    assert req.model is None and req.stream is True
    assert req.params.max_tokens == 128 and req.params.stop == ()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "a\u0000b"}, "prompt"),
        ({"prompt": "x", "model": 1}, "model"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 10**30}, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "top_k": -1}, "top_k"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "seed": 2**40}, "seed"),
        ({"prompt": "x", "stop": [1]}, "stop"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "stop": ["a"] * 17}, "stop"),
    ],
)
def test_bad_fields_are_named(body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_infer(body)
    assert err.value.param == param
    assert param in err.value.message


def test_body_must_be_an_object() -> None:
    with pytest.raises(InvalidRequest):
        parse_infer(["prompt"])


def test_stop_accepts_a_single_string() -> None:
    assert parse_infer({"prompt": "x", "stop": "\n"}).params.stop == ("\n",)


@pytest.mark.parametrize("sse", [False, True])
def test_fast_token_framing_matches_the_general_encoder(sse: bool) -> None:
    from modeld.api.infer import Framer
    from modeld.manager.backend import text_events

    framer = Framer(sse)
    texts = ("a", ' "q"\n', "é\u2028", "\\", "\x00", "")
    expected = b"".join(framer.event({"type": "token", "text": t}) for t in texts)
    assert text_events(*framer.token_frame, False, texts) == expected
