"""The sandboxed chat-template renderer: formats, fallback, and templates that misbehave."""

from __future__ import annotations

import pytest

from modeld import chat_template as ct
from modeld.chat_template import ChatMessage, ChatTemplateError, render_chat
from modeld.errors import InvalidRequest

HI = (ChatMessage("user", "hi"),)
CONVO = (
    ChatMessage("system", "Be brief."),
    ChatMessage("user", "hi"),
    ChatMessage("assistant", "hello"),
    ChatMessage("user", "bye"),
)
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Shaped like Llama 3's: namespace, loop controls, trim/lstrip blocks, eos-less turn ends.
LLAMA3_LIKE = """{{- bos_token }}
{%- set ns = namespace(n=0) %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}{% continue %}{% endif %}
    {%- set ns.n = ns.n + 1 %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}
{{- '' if ns.n == 3 else raise_exception('counted ' ~ ns.n) }}"""
# Shaped like Gemma's: refuses a conversation whose roles do not alternate.
ALTERNATING = (
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
)


def test_fallback_is_chatml_with_a_generation_prompt() -> None:
    out = render_chat(None, CONVO)
    assert out.fallback
    assert out.prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n"
        "<|im_start|>user\nbye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert out.stop == ("<|im_end|>",)


def test_an_empty_template_also_gets_the_fallback() -> None:
    assert render_chat("", HI).fallback


def test_model_template_with_its_bos_and_eos() -> None:
    out = render_chat(CHATML, HI, bos="<s>", eos="</s>")
    assert not out.fallback
    # The leading BOS is dropped: the worker's tokenizer adds it.
    assert out.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert out.stop == ("<|im_end|>",)


def test_an_end_of_turn_marker_that_is_the_eos_is_not_a_stop() -> None:
    assert render_chat(CHATML, HI, eos="<|im_end|>").stop == ()


def test_only_one_leading_bos_is_dropped() -> None:
    out = render_chat("{{ bos_token }}{{ bos_token }}x{{ bos_token }}", HI, bos="<s>")
    assert out.prompt == "<s>x<s>"


def test_without_generation_prompt() -> None:
    out = render_chat(CHATML, HI, add_generation_prompt=False)
    assert out.prompt.endswith("<|im_end|>\n")


def test_namespace_loop_controls_and_block_trimming() -> None:
    out = render_chat(LLAMA3_LIKE, CONVO, bos="<|begin_of_text|>", eos="<|end_of_text|>")
    assert out.prompt == (
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nbye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert out.stop == ("<|eot_id|>",)


def test_raise_exception_is_a_400_with_the_templates_message() -> None:
    ok = render_chat(ALTERNATING, (ChatMessage("user", "a"), ChatMessage("assistant", "b")))
    assert ok.stop == ("<end_of_turn>",)
    with pytest.raises(InvalidRequest, match="roles must alternate") as info:
        render_chat(ALTERNATING, (ChatMessage("user", "a"), ChatMessage("user", "b")))
    assert info.value.param == "messages" and info.value.http_status == 400


def test_helpers_strftime_now_and_unescaped_tojson() -> None:
    tpl = "{{ strftime_now('%Y') }}|{{ messages[0] | tojson }}|{{ {'a': 1} | tojson(indent=2) }}"
    out = render_chat(tpl, (ChatMessage("user", "<b>&'é"),)).prompt
    year, msg, indented = out.split("|")
    assert len(year) == 4 and year.isdigit()
    assert msg == '{"role": "user", "content": "<b>&\'é"}'
    assert indented == '{\n  "a": 1\n}'


def test_name_is_passed_when_given() -> None:
    tpl = "{% for m in messages %}{{ m.name or '-' }}:{{ m.content }};{% endfor %}"
    msgs = (ChatMessage("user", "a", name="ann"), ChatMessage("user", "b"))
    assert render_chat(tpl, msgs).prompt == "ann:a;-:b;"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__base__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ lipsum.__globals__['os'] }}",
        "{{ raise_exception.__globals__ }}",
        "{{ namespace.__init__ }}",
        "{% set x = messages.append(1) %}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{{ messages[0].__class__.__subclasses__() }}",
        "{{ '{0.__class__.__mro__}'.format('') }}x{{ ''.__class__.__mro__ }}",
    ],
)
def test_escapes_from_the_sandbox_fail_with_a_clear_error(source: str) -> None:
    with pytest.raises(ChatTemplateError, match="unsafe") as info:
        render_chat(source, HI)
    assert info.value.code == "template_error" and info.value.http_status == 500
    assert "Traceback" not in info.value.message


def test_a_syntax_error_names_the_line() -> None:
    with pytest.raises(ChatTemplateError, match=r"does not compile: .* \(line 2\)"):
        render_chat("ok\n{% for %}", HI)


@pytest.mark.parametrize(
    "source",
    ["{{ 1 // 0 }}", "{{ range(10 ** 9) | list }}", "{{ messages[5]['content'] }}", "{{ x() }}"],
)
def test_runtime_failures_are_template_errors(source: str) -> None:
    with pytest.raises(ChatTemplateError, match="chat template failed"):
        render_chat(source, HI)


def test_runaway_output_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ct, "MAX_RENDERED_CHARS", 10_000)
    with pytest.raises(ChatTemplateError, match="more than 10000 characters"):
        render_chat("{% for i in range(100000) %}{{ messages }}{% endfor %}", HI)


def test_compiled_templates_are_cached_per_source() -> None:
    assert ct.compile_template(CHATML) is ct.compile_template(CHATML)
    assert ct.compile_template(CHATML) is not ct.compile_template(CHATML + " ")
