"""Worker isolation: a worker that dies, a file that is no model, a file that aborts llama.cpp.

Each loaded model runs in its own worker process, so none of these may take the daemon or
another model's stream down with it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest

from modeld.devtools import bad_gguf
from modeld.worker.memory import rss_mb
from tests.conftest import ModelStore, link
from tests.helpers.daemon import Daemon
from tests.integration.conftest import (
    RawInfer,
    alive,
    assert_one_done,
    instance,
    log_events,
    log_tail,
    running,
    stream_to_end,
    wait_for,
    worker_for,
)

LONG = {"max_tokens": 2000, "temperature": 0.0}  # about 2 s of tokens: still running when killed
SHORT = {"max_tokens": 8, "temperature": 0.0}
BYSTANDER = {"max_tokens": 500, "temperature": 0.0}  # a stream running while a load fails
ABORTS = "(llama.cpp aborts)"  # how bad_gguf marks the file that kills llama.cpp's process


def aborting_gguf(scratch: Path) -> Path:
    """The corpus file that makes llama.cpp abort (duplicate vocabulary entries)."""
    base = bad_gguf.write_small_base(scratch / "base.gguf.valid")
    found = [path for path, why in bad_gguf.make_corpus(scratch, base) if ABORTS in why]
    assert len(found) == 1, found
    return found[0]


def with_key(src: Path, dest: Path, key: str, value: str) -> Path:
    """Copy the GGUF src to dest with one string key set to value (all else unchanged)."""
    reader = gguf.GGUFReader(src)
    arch = reader.get_field("general.architecture")
    assert arch is not None
    writer = gguf.GGUFWriter(dest, arch.contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the reader's own header fields; the writer adds the architecture
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value if name == key else field.contents(), vtype, sub_type=sub)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


@pytest.fixture(scope="module")
def daemon(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    models = model_store.models_dir(
        tmp_path_factory.mktemp("workers"), {"tiny.gguf": "tiny", "tiny2.gguf": "tiny2"}
    )
    (models / "junk.gguf").write_bytes(b"this is not a GGUF file, just text\n" * 100)
    link(aborting_gguf(tmp_path_factory.mktemp("corpus")), models / "dupvocab.gguf")
    # A valid file whose SPM vocabulary is declared WPM ("bert"): it passes every check in
    # Python, and llama.cpp hits GGML_ABORT in llama-vocab.cpp while loading it.
    with_key(model_store.get("tiny"), models / "wpm-vocab.gguf", "tokenizer.ggml.model", "bert")
    with running(models) as d:
        yield d


def test_worker_killed_mid_stream_ends_it_with_an_error_event(daemon: Daemon) -> None:
    client = daemon.client()
    stream_to_end(client, {"model": "tiny2", "prompt": "hi", **SHORT})  # a bystander
    bystander = worker_for(daemon, daemon.models_dir / "tiny2.gguf")
    loads_before = instance(daemon, "tiny.gguf").get("loads", 0)
    with RawInfer(client, {"model": "tiny", "prompt": "hello", **LONG}) as victim:
        assert victim.status == 200
        first = victim.next_event()
        assert first is not None and first["type"] == "token"
        pid = worker_for(daemon, daemon.models_dir / "tiny.gguf")
        os.kill(pid, signal.SIGKILL)
        rest = victim.events()
    assert rest, "the stream ended without a terminal event"
    *tokens, last = rest
    assert all(e["type"] == "token" for e in tokens)
    assert last["type"] == "error", last
    assert last["error"]["code"] == "worker_crashed", last
    assert "SIGKILL" in last["error"]["message"]
    assert len(tokens) < LONG["max_tokens"]
    # The daemon serves on; the model loads again on the next request; the bystander is untouched.
    assert client.get("/healthz").status == 200
    wait_for(lambda: instance(daemon, "tiny.gguf").get("state") != "ready", "tiny to be unloaded")
    stream_to_end(client, {"model": "tiny", "prompt": "hello", **SHORT})
    assert instance(daemon, "tiny.gguf")["loads"] == loads_before + 2
    assert alive(bystander) and worker_for(daemon, daemon.models_dir / "tiny2.gguf") == bystander
    stream_to_end(client, {"model": "tiny2", "prompt": "hi", **SHORT})


def test_a_file_that_is_no_model_fails_cleanly(daemon: Daemon, via: str) -> None:
    client = daemon.client(via)
    entry = next(m for m in client.get("/models").json()["models"] if m["id"] == "junk.gguf")
    assert entry["state"] == "error" and entry["error"], entry
    resp = client.infer(model="junk", prompt="hi")
    assert resp.status == 500, resp.body
    err = resp.json()["error"]
    assert err["code"] == "model_load_failed"
    assert "junk.gguf" in err["message"]
    assert str(daemon.models_dir) not in err["message"]  # the model id, never the path
    assert client.get("/healthz").status == 200
    stream_to_end(client, {"model": "tiny2", "prompt": "hi", **SHORT})


@pytest.mark.parametrize("bad", ["dupvocab.gguf", "wpm-vocab.gguf"])
def test_a_file_that_aborts_llama_cpp_kills_only_its_worker(daemon: Daemon, bad: str) -> None:
    """Neither file may take the daemon or another model's running stream down.

    dupvocab.gguf is bad_gguf's file that aborts llama.cpp (the registry's validator may
    refuse it before any worker sees it); wpm-vocab.gguf really reaches a worker and
    aborts it.
    """
    client = daemon.client()
    started = time.monotonic()
    with RawInfer(client, {"model": "tiny2", "prompt": "hi", **BYSTANDER}) as bystander:
        assert bystander.status == 200
        resp = client.infer(model=bad, prompt="hi")
        assert resp.status == 500, (resp.status, resp.body, log_tail(daemon))
        err = resp.json()["error"]
        assert err["code"] == "model_load_failed", err
        assert bad in err["message"]
        if bad == "wpm-vocab.gguf":
            assert "SIGABRT" in err["message"], err
        print(f"{bad}: load answered in {time.monotonic() - started:.2f} s: {err['message']}")
        assert client.get("/healthz").status == 200
        assert_one_done(bystander.events())  # the other model's stream went on to its end
    failed = [e for e in log_events(daemon, "load_failed") if e.get("model") == bad]
    assert failed, log_tail(daemon)
    entry = next(m for m in client.get("/models").json()["models"] if m["id"] == bad)
    assert entry["state"] == "error" and entry["error"], entry
    stream_to_end(client, {"model": "tiny2", "prompt": "hi", **SHORT})


def test_the_accounted_memory_covers_a_long_prompt(daemon: Daemon) -> None:
    """On the CPU the figure the budget counts is not the RSS right after the warm-up:
    a long prompt touches the KV cache and compute buffer, and the figure covers them."""
    client = daemon.client()
    stream_to_end(client, {"model": "tiny", "prompt": "hi", **SHORT})
    pid = worker_for(daemon, daemon.models_dir / "tiny.gguf")
    accounted = instance(daemon, "tiny.gguf")["vram_mb"]
    before = rss_mb(pid)
    stream_to_end(client, {"model": "tiny", "prompt": "the cat sat on the mat " * 150, **SHORT})
    after = rss_mb(pid)
    print(f"RSS {before:.0f} -> {after:.0f} MiB after a long prompt; accounted {accounted} MiB")
    assert after > before  # the prompt really touched more memory ...
    assert accounted >= after  # ... and the budget already counted it
    entry = next(m for m in client.get("/models").json()["models"] if m["id"] == "tiny.gguf")
    assert entry["est_vram_mb"] == entry["vram_mb"] == accounted  # /models: measured once loaded
    assert entry["estimate_mb"] >= accounted  # the estimate did not run low either
