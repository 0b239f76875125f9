"""Every endpoint and every request error of docs/api.md, over the Unix socket and over TCP.

The real daemon serves two tiny random llama models; the tests only read its state or add
instances to it, so one daemon serves the whole module (fresh ones where a test needs
a cold start or other options).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ModelStore
from tests.helpers.client import Response
from tests.helpers.daemon import Daemon
from tests.integration.conftest import (
    RawInfer,
    assert_one_done,
    log_events,
    running,
    stream_to_end,
    wait_for,
)

MODELS = {"tiny.gguf": "tiny", "tiny2.gguf": "tiny2"}
STATES = {"unloaded", "loading", "ready", "unloading", "error"}
TIMINGS = ("queue_ms", "load_ms", "ttft_ms", "total_ms")
N_TOKENS = 8  # a few greedy tokens: fast and repeatable
SHORT: dict[str, Any] = {"max_tokens": N_TOKENS, "temperature": 0.0}


@pytest.fixture(scope="module")
def shared(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    models = model_store.models_dir(tmp_path_factory.mktemp("endpoints"), MODELS)
    with running(models) as daemon:
        yield daemon


def error_of(resp: Response, status: int, code: str) -> dict[str, Any]:
    """Check an error answer's status, content type and shape; return its error object."""
    assert resp.status == status, (resp.status, resp.body)
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"], err
    return err  # type: ignore[no-any-return]


def check_done(done: dict[str, Any], model: str, completion_tokens: int) -> None:
    """The `done` event (or stream: false body) carries model, usage and timings."""
    assert done["model"] == model
    assert done["finish_reason"] in ("stop", "length")
    usage = done["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] == completion_tokens
    timings = done["timings"]
    assert set(timings) == {*TIMINGS, "decode_ms"}, timings
    assert all(isinstance(timings[k], int | float) and timings[k] >= 0 for k in timings)
    assert timings["ttft_ms"] <= timings["total_ms"]


# ---- health and listing --------------------------------------------------------------------


def test_healthz(shared: Daemon, via: str) -> None:
    resp = shared.client(via).get("/healthz")
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json() == {"status": "ok"}


def test_readyz_is_503_until_an_instance_is_ready(model_store: ModelStore, tmp_path: Path) -> None:
    models = model_store.models_dir(tmp_path / "models", {"tiny.gguf": "tiny"})
    with running(models) as daemon:
        for via in ("unix", "tcp"):
            resp = daemon.client(via).get("/readyz")
            assert (resp.status, resp.json()) == (503, {"ready": False}), via
        stream_to_end(daemon.client(), {"model": "tiny", "prompt": "hi", **SHORT})
        for via in ("unix", "tcp"):
            resp = daemon.client(via).get("/readyz")
            assert (resp.status, resp.json()) == (200, {"ready": True}), via


def test_models_lists_every_file_with_its_fields(shared: Daemon, via: str) -> None:
    resp = shared.client(via).get("/models")
    assert resp.status == 200
    models = resp.json()["models"]
    assert sorted(m["id"] for m in models) == sorted(MODELS)
    for m in models:
        assert {
            "id",
            "name",
            "path",
            "size_bytes",
            "est_vram_mb",
            "vram_mb",
            "state",
            "error",
        } <= set(m)
        path = Path(m["path"])
        assert path.is_absolute() and path.resolve() == (shared.models_dir / m["id"]).resolve()
        assert m["name"] == m["id"]
        assert m["size_bytes"] == path.stat().st_size
        assert isinstance(m["est_vram_mb"], int) and m["est_vram_mb"] > 0
        assert m["state"] in STATES
        assert m["vram_mb"] is None or isinstance(m["vram_mb"], int)
        assert m["error"] is None


def test_models_shows_the_measured_figure_after_a_load(shared: Daemon, via: str) -> None:
    stream_to_end(shared.client(via), {"model": "tiny2.gguf", "prompt": "hi", **SHORT})
    entry = next(
        m for m in shared.client(via).get("/models").json()["models"] if m["id"] == "tiny2.gguf"
    )
    assert entry["state"] == "ready"
    assert isinstance(entry["vram_mb"], int) and entry["vram_mb"] > 0


# ---- /infer --------------------------------------------------------------------------------


def test_infer_streams_ndjson_tokens_then_one_done(shared: Daemon, via: str) -> None:
    resp = shared.client(via).infer(model="tiny.gguf", prompt="hello world", **SHORT)
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/x-ndjson"
    assert resp.headers.get("transfer-encoding") == "chunked"
    events = resp.events()
    done = assert_one_done(events)
    check_done(done, "tiny.gguf", N_TOKENS)
    assert done["finish_reason"] == "length"  # the tiny models never emit EOS
    assert len(events) >= 2


def test_infer_arrives_incrementally(shared: Daemon, via: str) -> None:
    """Tokens are readable while the generation still runs (the stream is not buffered)."""
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2000}
    with RawInfer(shared.client(via), body) as stream:
        assert stream.status == 200
        first = stream.next_event()
        assert first is not None and first["type"] == "token"


def test_infer_speaks_sse_when_asked(shared: Daemon, via: str) -> None:
    resp = shared.client(via).request(
        "POST",
        "/infer",
        {"model": "tiny", "prompt": "hello", **SHORT},
        headers={"Accept": "text/event-stream"},
    )
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    text = resp.body.decode()
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert (
            len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: ")
        ), block
        event = json.loads(lines[1].removeprefix("data: "))
        assert event["type"] == lines[0].removeprefix("event: ")
        events.append(event)
    check_done(assert_one_done(events), "tiny.gguf", N_TOKENS)


def test_infer_without_streaming_returns_one_json(shared: Daemon, via: str) -> None:
    body = {"model": "tiny", "prompt": "the capital of", "seed": 7, **SHORT}
    resp = shared.client(via).infer(**body, stream=False)
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("application/json")
    out = resp.json()
    assert set(out) == {"model", "text", "finish_reason", "usage", "timings"}
    check_done(out, "tiny.gguf", N_TOKENS)
    # Greedy decoding: the same request streamed gives the same text.
    events = stream_to_end(shared.client(via), body)
    assert out["text"] == "".join(e["text"] for e in events[:-1])
    assert out["text"]


def test_model_may_be_named_without_suffix(shared: Daemon, via: str) -> None:
    events = stream_to_end(shared.client(via), {"model": "tiny2", "prompt": "hi", **SHORT})
    assert events[-1]["model"] == "tiny2.gguf"


def test_no_model_and_no_default_is_400(shared: Daemon, via: str) -> None:
    resp = shared.client(via).infer(prompt="hi")
    err = error_of(resp, 400, "no_default_model")
    assert err.get("param") == "model"


def test_unknown_model_is_404(shared: Daemon, via: str) -> None:
    err = error_of(shared.client(via).infer(model="nope", prompt="hi"), 404, "model_not_found")
    assert err.get("param") == "model"
    assert "nope" in err["message"]
    assert shared.models_dir.as_posix() not in err["message"]  # no paths leak


def test_the_404_for_an_unknown_model_lists_the_models_there_are(shared: Daemon, via: str) -> None:
    err = error_of(shared.client(via).infer(model="nope", prompt="hi"), 404, "model_not_found")
    assert err["message"] == "no model 'nope' in the models dir; available: tiny.gguf, tiny2.gguf"


@pytest.mark.parametrize(
    ("extra", "status"),
    [({"temperature": -1}, 400), ({"stop": [1]}, 400), ({}, 404)],
    ids=["bad temperature", "bad stop", "unknown model"],
)
def test_a_refused_request_is_logged_with_the_model_it_named(
    shared: Daemon, extra: dict[str, Any], status: int
) -> None:
    name = f"named-{status}-{len(shared.log())}"  # unique in this daemon's log
    resp = shared.client().infer(model=name, prompt="hi", **extra)
    assert resp.status == status, resp.body

    def logged() -> list[dict[str, Any]]:
        return [e for e in log_events(shared, "request") if e.get("model") == name]

    records = wait_for(logged, "the request's log line")
    assert len(records) == 1 and records[0]["status"] == status, records


BAD_BODIES: list[tuple[str, bytes, str | None]] = [
    ("not json", b"{not json", None),
    ("not an object", b"[1, 2]", None),
    ("missing prompt", b'{"model": "tiny"}', "prompt"),
    ("prompt not a string", b'{"model": "tiny", "prompt": 5}', "prompt"),
    ("model not a string", b'{"model": 7, "prompt": "hi"}', "model"),
    ("stream not a bool", b'{"model": "tiny", "prompt": "hi", "stream": "yes"}', "stream"),
    (
        "max_tokens not an int",
        b'{"model": "tiny", "prompt": "hi", "max_tokens": "many"}',
        "max_tokens",
    ),
    ("max_tokens zero", b'{"model": "tiny", "prompt": "hi", "max_tokens": 0}', "max_tokens"),
    (
        "temperature negative",
        b'{"model": "tiny", "prompt": "hi", "temperature": -1}',
        "temperature",
    ),
    ("top_p zero", b'{"model": "tiny", "prompt": "hi", "top_p": 0}', "top_p"),
    ("top_k a string", b'{"model": "tiny", "prompt": "hi", "top_k": "x"}', "top_k"),
    ("seed negative", b'{"model": "tiny", "prompt": "hi", "seed": -3}', "seed"),
    ("stop not strings", b'{"model": "tiny", "prompt": "hi", "stop": [1]}', "stop"),
]


@pytest.mark.parametrize(
    ("raw", "param"), [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES]
)
def test_bad_request_bodies_are_400_naming_the_field(
    shared: Daemon, via: str, raw: bytes, param: str | None
) -> None:
    resp = shared.client(via).request("POST", "/infer", raw=raw)
    err = error_of(resp, 400, "invalid_request")
    if param is not None:
        assert err.get("param") == param, err
        assert param in err["message"], err


def test_unknown_path_is_404(shared: Daemon, via: str) -> None:
    error_of(shared.client(via).get("/nope"), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/infer", "POST"),
        ("HEAD", "/infer", "POST"),
        ("POST", "/healthz", "GET, HEAD"),
        ("DELETE", "/models", "GET, HEAD"),
    ],
)
def test_wrong_method_is_405_with_allow(
    shared: Daemon, via: str, method: str, path: str, allow: str
) -> None:
    resp = shared.client(via).request(method, path, raw=b"{}" if method == "POST" else None)
    assert resp.status == 405 and resp.headers["allow"] == allow
    if method != "HEAD":  # a HEAD answer has no body
        error_of(resp, 405, "method_not_allowed")


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/models", "/status", "/v1/models"])
def test_head_is_get_without_the_body(shared: Daemon, via: str, path: str) -> None:
    """Monitors and `curl -I` send HEAD: the same status and headers as GET, no body."""
    conn = shared.client(via).connection()
    try:
        conn.request("HEAD", path)
        head = conn.getresponse()
        assert head.read() == b""
        conn.request("GET", path)  # the connection is still good for the next request
        get = conn.getresponse()
        body = get.read()
    finally:
        conn.close()
    assert head.status == get.status
    assert head.getheader("Content-Type") == get.getheader("Content-Type")
    if path in ("/healthz", "/v1/models"):  # the same document both times
        assert int(head.getheader("Content-Length") or -1) == len(body)
    assert shared.client(via).get("/healthz").status == 200


def test_keep_alive_serves_several_requests_on_one_connection(shared: Daemon, via: str) -> None:
    conn = shared.client(via).connection()
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read()) == {"status": "ok"}
        sock = conn.sock
        assert sock is not None
        for stream in (False, True):
            body = json.dumps({"model": "tiny", "prompt": "hi", "stream": stream, **SHORT})
            conn.request("POST", "/infer", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200
            assert (resp.getheader("connection") or "").lower() != "close"
            resp.read()
            assert conn.sock is sock, "the daemon closed a keep-alive connection"
        conn.request("GET", "/nope")  # an error answer keeps the connection too
        resp = conn.getresponse()
        assert resp.status == 404
        resp.read()
        conn.request("GET", "/models")
        resp = conn.getresponse()
        assert resp.status == 200 and "models" in json.loads(resp.read())
        assert conn.sock is sock
    finally:
        conn.close()


# ---- the default model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def with_default(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    models = model_store.models_dir(tmp_path_factory.mktemp("default"), MODELS)
    with running(models, "--default-model", "tiny2") as daemon:
        yield daemon


def test_default_model_serves_requests_without_model(with_default: Daemon, via: str) -> None:
    client = with_default.client(via)
    wait_for(lambda: client.get("/readyz").status == 200, "the default model to be preloaded")
    events = stream_to_end(client, {"prompt": "hello", **SHORT})
    check_done(events[-1], "tiny2.gguf", N_TOKENS)
    out = client.infer(prompt="hello", stream=False, **SHORT)
    assert out.status == 200 and out.json()["model"] == "tiny2.gguf"
    # Another model can still be named explicitly.
    assert (
        stream_to_end(client, {"model": "tiny", "prompt": "hi", **SHORT})[-1]["model"]
        == "tiny.gguf"
    )
