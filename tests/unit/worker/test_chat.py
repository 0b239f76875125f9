"""The worker's chat rendering: the model's template, under a deadline that really stops it."""

from __future__ import annotations

import signal
import time

import pytest

from modeld.errors import InvalidRequest, TemplateError
from modeld.worker.chat import ChatTemplate, parse_messages, render

HI = ({"role": "user", "content": "hi"},)
SPIN = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"


def test_renders_with_the_template_and_drops_a_leading_bos() -> None:
    tpl = ChatTemplate("{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}", "<s>")
    assert render(tpl, HI) == "[hi]"


def test_no_template_means_chatml() -> None:
    assert render(ChatTemplate(None), HI).startswith("<|im_start|>user\nhi<|im_end|>")


def test_a_runaway_template_is_stopped_at_the_deadline() -> None:
    before = signal.getsignal(signal.SIGALRM)
    started = time.monotonic()
    with pytest.raises(TemplateError, match=r"longer than 0\.2 s"):
        render(ChatTemplate(SPIN), HI, timeout_s=0.2)
    assert time.monotonic() - started < 2.0
    assert signal.getsignal(signal.SIGALRM) == before  # the handler is put back
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # and no timer is left
    assert render(ChatTemplate(None), HI)  # the next render is unaffected


def test_a_template_that_refuses_the_messages_names_them() -> None:
    with pytest.raises(InvalidRequest) as err:
        render(ChatTemplate("{{ raise_exception('no system role') }}"), HI)
    assert err.value.param == "messages" and "no system role" in err.value.message


@pytest.mark.parametrize(
    "bad",
    [
        [],
        "hi",
        [{"role": "user"}],
        [{"role": 1, "content": "x"}],
        [{"role": "u", "content": "x", "name": 2}],
    ],
)
def test_bad_messages_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_messages(bad)


def test_messages_keep_only_role_content_and_name() -> None:
    got = parse_messages([{"role": "user", "content": "x", "name": "n", "extra": 1}])
    assert got == ({"role": "user", "content": "x", "name": "n"},)
