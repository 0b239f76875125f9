"""The OpenAI-compatible API through the official `openai` client, against the real daemon.

Tiny random GGUFs (greedy, so their text is deterministic) check that `/v1/*` takes the
very same path as `/infer`; SmolLM2 checks that a real chat template gives a real answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletionMessageParam

import modeld
from modeld.devtools.demo_model import DemoModelError, demo_model_path
from modeld.devtools.tiny_gguf import write_tiny_llama
from tests.helpers.daemon import Daemon

try:  # the HTTP library the installed openai release is built on
    import httpx2 as httpx
except ImportError:  # pragma: no cover - openai releases before httpx2
    import httpx  # type: ignore[no-redef, import-not-found, unused-ignore]

REPO_ROOT = Path(modeld.__file__).resolve().parent.parent
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
HI_CHATML = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
# One thread per worker: on a small shared machine more threads only spin against each other.
# A context far beyond the tiny model's training length keeps a long generation running for
# seconds, which the queue test needs; for a 2-layer, 64-wide model it costs a few MB.
DAEMON_ARGS = ("--threads", "1", "--n-ctx", "16384", "--max-queue-depth", "1")
WAIT_S = 30.0  # for a state the daemon reaches in milliseconds
# A template that would loop for days: 10^10 iterations, each within Jinja's range cap.
SPIN = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    write_tiny_llama(d / "tiny.gguf")  # no chat template: chat uses the ChatML fallback
    write_tiny_llama(d / "chat.gguf", seed=1, chat_template=CHATML)
    write_tiny_llama(d / "evil.gguf", seed=2, chat_template="{{ ''.__class__.__mro__ }}")
    write_tiny_llama(d / "spin.gguf", seed=3, chat_template=SPIN)
    return d


@pytest.fixture(scope="module")
def daemon(models: Path) -> Iterator[Daemon]:
    d = Daemon(models, *DAEMON_ARGS).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(
        base_url=f"http://127.0.0.1:{daemon.port}/v1",
        api_key="unused",
        max_retries=0,
        timeout=60.0,
    )
    with c:
        yield c


def wait_until(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, "timed out waiting for the daemon"
        time.sleep(0.01)


def infer_text(daemon: Daemon, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The same generation through /infer, greedy."""
    res = daemon.client(via="tcp").infer(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=False,
    )
    assert res.status == 200, res.body
    return res.json()  # type: ignore[no-any-return]


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert sorted(m.id for m in models.data) == ["chat.gguf", "evil.gguf", "spin.gguf", "tiny.gguf"]
    assert all(m.object == "model" and m.owned_by == "modeld" for m in models.data)
    assert all(m.created > 0 for m in models.data)


def test_one_model_is_retrieved_by_id(client: openai.OpenAI) -> None:
    listed = {m.id: m for m in client.models.list().data}
    for name in ("tiny.gguf", "tiny"):  # the id as listed, or without .gguf as elsewhere
        got = client.models.retrieve(name)
        assert got == listed["tiny.gguf"]
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nope")
    error = info.value.response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"


def test_completion_is_the_same_generation_as_infer(client: openai.OpenAI, daemon: Daemon) -> None:
    out = client.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0)
    assert out.model == "tiny.gguf" and out.object == "text_completion"
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + 6
    ref = infer_text(daemon, "tiny", "hello", 6)
    assert choice.text == ref["text"] and ref["text"]
    assert out.usage.prompt_tokens == ref["usage"]["prompt_tokens"]


def test_completion_stream(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model="tiny.gguf", prompt="hello", max_tokens=6, temperature=0
    )
    chunks = list(
        client.completions.create(
            model="tiny.gguf",
            prompt="hello",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


def test_chat_uses_the_models_template(client: openai.OpenAI, daemon: Daemon) -> None:
    out = client.chat.completions.create(
        model="chat",
        messages=HI,
        max_tokens=5,
        temperature=0,
    )
    assert out.object == "chat.completion" and out.model == "chat.gguf"
    msg = out.choices[0].message
    assert msg.role == "assistant" and out.choices[0].finish_reason == "length"
    # The template's leading {{ bos_token }} is dropped: the tokenizer adds BOS itself.
    ref = infer_text(daemon, "chat", HI_CHATML, 5)
    assert msg.content == ref["text"]
    assert out.usage is not None and out.usage.prompt_tokens == ref["usage"]["prompt_tokens"]


def test_chat_stream(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="chat",
        messages=HI,
        max_tokens=5,
        temperature=0,
    )
    chunks = list(
        client.chat.completions.create(
            model="chat",
            messages=HI,
            max_tokens=5,
            temperature=0,
            stream=True,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks)
        == whole.choices[0].message.content
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


def test_chat_without_a_template_uses_chatml(client: openai.OpenAI, daemon: Daemon) -> None:
    out = client.chat.completions.create(
        model="tiny",
        messages=HI,
        max_tokens=5,
        temperature=0,
    )
    assert out.choices[0].message.content == infer_text(daemon, "tiny", HI_CHATML, 5)["text"]


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=HI)
    assert info.value.response.json() == {
        "error": {
            "message": (
                "no model 'nope' in the models dir; "
                "available: chat.gguf, evil.gguf, spin.gguf, tiny.gguf"
            ),
            "type": "not_found_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/nope", 404, "not_found"),
        ("POST", "/v1/models", 405, "method_not_allowed"),
        ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
    ],
)
def test_routing_errors_under_v1_use_openais_shape(
    daemon: Daemon, method: str, path: str, status: int, code: str
) -> None:
    res = daemon.client().request(method, path)
    assert res.status == status
    error = res.json()["error"]
    assert error["code"] == code and error["message"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_errors_outside_v1_keep_modelds_shape(daemon: Daemon) -> None:
    res = daemon.client().request("GET", "/nope")
    assert res.status == 404
    assert res.json() == {"error": {"code": "not_found", "message": "no such endpoint: /nope"}}


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"n": 2}, "n"), ({"temperature": "hot"}, "temperature"), ({"stop": 3}, "stop")],
)
def test_bad_fields_are_400s(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", extra_body=extra)
    error = info.value.response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["code"] == "invalid_request"


def test_unknown_fields_are_ignored(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="tiny", prompt="x", max_tokens=1, user="u", extra_body={"whatever": [1, 2]}
    )
    assert out.choices[0].finish_reason == "length"


def test_an_unsafe_template_fails_safely(client: openai.OpenAI, daemon: Daemon) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="evil", messages=HI)
    error = info.value.response.json()["error"]
    assert error["code"] == "template_error" and error["type"] == "server_error"
    assert "unsafe" in error["message"] and "__class__" in error["message"]
    assert "Traceback" not in daemon.log()
    # The daemon and the model are fine: both answer the next request.
    assert daemon.client().get("/healthz").status == 200
    ok = client.completions.create(model="evil", prompt="x", max_tokens=1)
    assert ok.choices[0].finish_reason == "length"


def test_a_runaway_template_is_stopped_in_the_worker(client: openai.OpenAI, daemon: Daemon) -> None:
    """The template loops for days: the daemon stays quick meanwhile, the render is stopped
    at its deadline, and the model's worker serves the next request (it was not stuck)."""
    probes: list[tuple[int, float]] = []  # (status, seconds) of each /healthz meanwhile

    def probe_health() -> None:
        for _ in range(20):
            t0 = time.monotonic()
            status = daemon.client().get("/healthz").status
            probes.append((status, time.monotonic() - t0))
            time.sleep(0.1)

    prober = threading.Thread(target=probe_health)
    started = time.monotonic()
    prober.start()
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="spin", messages=HI, max_tokens=1)
    elapsed = time.monotonic() - started
    prober.join()
    error = info.value.response.json()["error"]
    assert error["code"] == "template_error" and "longer than 5 s" in error["message"], error
    assert 4.5 < elapsed < 15, elapsed
    assert len(probes) == 20 and all(status == 200 for status, _ in probes), probes
    assert max(t for _, t in probes) < 0.5, probes  # the event loop never ran the template
    ok = client.completions.create(model="spin", prompt="x", max_tokens=1)
    assert ok.choices[0].finish_reason == "length"
    spin = daemon.instance("spin.gguf")
    assert spin is not None and spin["loads"] == 1  # the same worker, not a reload


def test_a_full_queue_is_a_rate_limit_error(client: openai.OpenAI, daemon: Daemon) -> None:
    before = daemon.status()
    # A long generation holds the model; one request waits behind it (--max-queue-depth 1).
    running = client.completions.create(model="tiny", prompt="x", max_tokens=100_000, stream=True)
    assert next(iter(running)).choices[0].text is not None

    def queued() -> Completion:
        return client.completions.create(model="tiny", prompt="y", max_tokens=2)

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(queued)
        wait_until(lambda: (daemon.instance("tiny.gguf") or {}).get("queue_depth") == 1)
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model="tiny", prompt="z", max_tokens=2)
        running.close()  # the client goes away: its generation is cancelled, the next runs
        assert waiting.result(timeout=WAIT_S).choices[0].finish_reason == "length"
    response = info.value.response
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "queue_full" and error["type"] == "rate_limit_error"
    after = daemon.status()
    assert after["rejected"]["queue_full"] == before["rejected"]["queue_full"] + 1
    wait_until(lambda: daemon.status()["cancelled"] == before["cancelled"] + 1)


def test_over_the_unix_socket(daemon: Daemon) -> None:
    transport = httpx.HTTPTransport(uds=daemon.socket_path)
    with openai.OpenAI(
        base_url="http://localhost/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(transport=transport),
    ) as c:
        assert "tiny.gguf" in [m.id for m in c.models.list().data]
        out = c.completions.create(model="tiny", prompt="hello", max_tokens=2)
        assert out.usage is not None and out.usage.completion_tokens == 2


@pytest.fixture(scope="module")
def smollm2() -> Iterator[Daemon]:
    try:
        path = demo_model_path(REPO_ROOT / ".cache" / "demo")
    except DemoModelError as exc:
        pytest.skip(f"the demo model is not available: {exc}")
    d = Daemon(path.parent, "--threads", "1", "--n-ctx", "1024").start()
    try:
        yield d
    finally:
        d.stop()


@pytest.mark.e2e
def test_smollm2_knows_the_capital_of_france(smollm2: Daemon) -> None:
    with openai.OpenAI(
        base_url=f"http://127.0.0.1:{smollm2.port}/v1", api_key="unused", max_retries=0
    ) as c:
        question: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": "What is the capital of France?"}
        ]
        out = c.chat.completions.create(
            model="SmolLM2-135M-Instruct.Q4_1",
            messages=question,
            max_tokens=40,
            temperature=0,
        )
        answer = out.choices[0].message.content or ""
        assert "Paris" in answer, answer
        # It ended its turn by itself, on the template's end-of-turn token.
        assert out.choices[0].finish_reason == "stop", answer
