"""/infer's helpers without a daemon: the 404 that lists models, the log line's fields."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from modeld.api.generation import Outcome, _naming, named_model
from modeld.api.infer import AVAILABLE_SHOWN, describe_available, resolve_model
from modeld.errors import GenerationFailed, ModelNotFound, PromptTooLong
from modeld.http.protocol import Request
from modeld.manager.backend import Finished
from modeld.registry import Registry
from tests.conftest import ModelStore


def registry_of(store: ModelStore, dest: Path, names: list[str]) -> Registry:
    store.models_dir(dest, dict.fromkeys(names, "tiny"))
    registry = Registry(dest)
    registry.scan()
    return registry


def not_found(registry: Registry, name: str) -> ModelNotFound:
    async def resolve() -> None:
        await resolve_model(registry, name, None)

    with pytest.raises(ModelNotFound) as info:
        anyio.run(resolve)
    return info.value


# ---- the 404 for an unknown model ---------------------------------------------------------------


def test_the_404_lists_the_models_there_are(model_store: ModelStore, tmp_path: Path) -> None:
    registry = registry_of(model_store, tmp_path, ["b.gguf", "a.gguf"])
    (tmp_path / "broken.gguf").write_bytes(b"not a model")  # invalid: never offered
    registry.scan()
    error = not_found(registry, "x")
    assert error.message == "no model 'x' in the models dir; available: a.gguf, b.gguf"
    assert error.param == "model"


def test_the_404_of_an_empty_models_dir_says_so(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.scan()
    assert not_found(registry, "x").message == "no model 'x' in the models dir; it holds no models"


def test_a_long_list_is_cut_short(model_store: ModelStore, tmp_path: Path) -> None:
    names = [f"m{i:02d}.gguf" for i in range(AVAILABLE_SHOWN + 5)]
    registry = registry_of(model_store, tmp_path, names)
    listed = describe_available(registry)
    assert listed == ", ".join(names[:AVAILABLE_SHOWN]) + f", … ({len(names)} in all)"


# ---- the request log line ---------------------------------------------------------------------


def request_with(body: bytes, received_at: float = 100.0) -> Request:
    return Request("POST", "/infer", "/infer", "", (), body, received_at=received_at)


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (b'{"model": "tiny", "temperature": -1}', "tiny"),
        (b'{"prompt": "hi"}', None),
        (b'{"model": 7}', None),
        (b"[1, 2]", None),
        (b"{not json", None),
        (b"\xff", None),
        (b"", None),
    ],
)
def test_the_model_a_refused_request_named(body: bytes, model: str | None) -> None:
    assert named_model(request_with(body)) == model


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    now = [100.0]
    monkeypatch.setattr("modeld.api.generation.time.monotonic", lambda: now[0])
    yield now


def test_decode_time_is_the_workers_for_a_finished_generation(clock: list[float]) -> None:
    outcome = Outcome(request_with(b"{}"))
    outcome.tokens_arrived(3)
    outcome.decode_ms = 12.5
    assert outcome.decode_time_ms() == 12.5


def test_decode_time_of_a_generation_cut_short_is_what_the_daemon_saw(
    clock: list[float],
) -> None:
    outcome = Outcome(request_with(b"{}"))
    assert outcome.decode_time_ms() is None  # no token: no decoding to speak of, not 0
    clock[0] = 100.5
    outcome.tokens_arrived(1)
    clock[0] = 102.0
    outcome.tokens_arrived(2000)
    assert outcome.tokens == 2001 and outcome.ttft_ms is not None
    assert outcome.decode_time_ms() == 1500.0


def test_a_handed_off_generation_is_timed_by_the_worker(clock: list[float]) -> None:
    """Its text went straight to the client: first token and decode time are the worker's."""
    outcome = Outcome(request_with(b"{}"))  # received at 100.0
    outcome.finished(Finished("length", 5, 64, decode_ms=630.0, first_at=100.25))
    assert (outcome.tokens, outcome.ttft_ms, outcome.decode_time_ms()) == (64, 250.0, 630.0)
    outcome.finished(Finished("length", 5, 1, decode_ms=1.0, first_at=101.0))  # once only
    assert outcome.tokens == 64


def test_a_handed_off_generation_cut_short_still_has_its_figures(clock: list[float]) -> None:
    outcome = Outcome(request_with(b"{}"))
    outcome.finished(Finished("cancelled", 5, 40, decode_ms=400.0, first_at=100.1, lost="gone"))
    assert outcome.tokens == 40 and outcome.ttft_ms == 100.0
    assert outcome.decode_time_ms() == 400.0  # first to last token, as the worker saw them


# ---- prompt_too_long names the field ---------------------------------------------------------


def test_a_chat_prompt_too_long_is_about_messages() -> None:
    error = PromptTooLong("prompt is 99 tokens, the context holds 64", param="prompt")
    assert _naming(error, "prompt") is error
    chat = _naming(error, "messages")
    assert isinstance(chat, PromptTooLong) and chat.param == "messages"
    assert chat.message == error.message
    other = GenerationFailed("llama_decode returned 1")
    assert _naming(other, "messages") is other
