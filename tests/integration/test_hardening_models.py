"""Model files and model ids against the real daemon: nothing from a request becomes a path,
symlinks stay inside the models dir, and no file (malformed, crashing or hanging) takes the
daemon, or another model's stream, down with it.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modeld.devtools import bad_gguf
from tests.conftest import ModelStore, link
from tests.helpers.client import Client
from tests.helpers.daemon import Daemon
from tests.helpers.raw import daemon_alive, exchange
from tests.integration.conftest import (
    RawInfer,
    alive,
    assert_one_done,
    log_tail,
    maps_inode,
    running,
    stream_to_end,
    wait_for,
    worker_for,
    worker_pids,
)

SHORT = {"max_tokens": 8, "temperature": 0.0}  # a few greedy tokens
LONG = {"max_tokens": 1500, "temperature": 0.0}  # about a second of tokens: still running
BYSTANDER = {"max_tokens": 200, "temperature": 0.0}  # many short streams across the loads
LOADS = "(loads)"  # how bad_gguf marks the files llama.cpp accepts
LOAD_TIMEOUT_S = 2.0  # --load-timeout-s of the hang tests (1 s is the CLI's minimum)
SPARE_IDLE_S = 0.3  # a starting worker burns CPU; one that used none this long is waiting
CLK_TCK = os.sysconf("SC_CLK_TCK")  # /proc/<pid>/stat counts CPU time in these


def entry(client: Client, model_id: str) -> dict[str, Any] | None:
    """The /models entry of model_id, or None when it is not listed."""
    for model in client.get("/models").json()["models"]:
        if model["id"] == model_id:
            return model  # type: ignore[no-any-return]
    return None


def stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: state is [0], ppid [1], utime [11], stime [12]."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def zombies(pid: int) -> list[int]:
    """Children of pid that have exited but were never reaped."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = stat_fields(int(name))
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] == "Z":
                out.append(int(name))
    return out


def no_stray_workers(daemon: Daemon) -> None:
    """Every worker left serves a ready instance, but for one spare; none is a zombie."""
    assert daemon.proc is not None

    def settled() -> bool:
        ready = [i for i in daemon.status()["instances"] if i["state"] == "ready"]
        return len(worker_pids(daemon)) <= len(ready) + 1 and not zombies(daemon.proc.pid)  # type: ignore[union-attr]

    wait_for(settled, "stray workers to go")


class Bystander(threading.Thread):
    """Streams short generations from a good model until stopped; every one must finish."""

    def __init__(self, client: Client, model: str) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.model = model
        self.stop = threading.Event()
        self.done = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                events = list(
                    self.client.stream({"model": self.model, "prompt": "hi", **BYSTANDER})
                )
                assert_one_done(events)
                self.done += 1
            except Exception as exc:  # recorded, then asserted on in the test's thread
                self.failures.append(repr(exc))

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        assert not self.is_alive(), "the bystander stream hangs"
        assert not self.failures, self.failures
        assert self.done >= 1


# ---- model ids and symlinks --------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_root(model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/models holds tiny.gguf, alias.gguf -> tiny.gguf and out.gguf -> root/outside.gguf."""
    root = tmp_path_factory.mktemp("hardening-models")
    models = model_store.models_dir(root / "models", {"tiny.gguf": "tiny"})
    link(model_store.get("tiny2"), root / "outside.gguf")
    (models / "alias.gguf").symlink_to("tiny.gguf")
    (models / "out.gguf").symlink_to(root / "outside.gguf")
    (models / "notes.txt").write_text("not a model\n")
    return root


@pytest.fixture(scope="module")
def daemon(models_root: Path) -> Iterator[Daemon]:
    with running(models_root / "models", "--no-spare-worker") as d:
        yield d
        daemon_alive(d)


# Model ids that name files by path, by trick or not at all; {root} is the models dir's parent.
BAD_IDS = [
    "../outside.gguf",
    "../outside",
    "../models/tiny.gguf",
    "{root}/outside.gguf",
    "{root}/models/tiny.gguf",
    "/etc/passwd",
    "tiny.gguf\x00",
    "tiny.gguf\x00.txt",
    "%2e%2e%2foutside.gguf",
    "..%2foutside.gguf",
    "%2e%2e/outside.gguf",
    "%252e%252e%252foutside.gguf",
    "..\\outside.gguf",
    "..%5coutside.gguf",
    "\u2024\u2024/outside.gguf",  # one-dot leaders, not dots
    "./tiny.gguf",
    "models/../tiny.gguf",
    "tiny.gguf/",
    "tiny.gguf/.",
    "~/tiny.gguf",
    "..",
    ".",
    "",
    "notes.txt",
    "notes",
    "out.gguf",
    "out",
    "TINY.GGUF",
    "tiny.gguf ",
    "tiny.gguf\n",
    "file:///etc/passwd",
]


@pytest.mark.parametrize("bad_id", BAD_IDS, ids=[ascii(i) for i in BAD_IDS])
def test_model_ids_are_looked_up_never_joined_into_paths(
    daemon: Daemon, models_root: Path, via: str, bad_id: str
) -> None:
    model_id = bad_id.replace("{root}", str(models_root))
    client = daemon.client(via)
    resp = client.infer(model=model_id, prompt="hi", stream=False, **SHORT)
    assert resp.status == 404, (model_id, resp.status, resp.body)
    err = resp.json()["error"]
    assert err["code"] == "model_not_found" and err.get("param") == "model", err
    if "{root}" not in bad_id:
        assert str(models_root) not in err["message"], err  # no path in the answer
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for path, extra in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", chat)):
        resp = client.request("POST", path, {"model": model_id, "max_tokens": 4, **extra})
        assert resp.status == 404, (path, model_id, resp.status, resp.body)


TARGETS = [
    "/../status",
    "/%2e%2e/status",
    "/infer/../status",
    "//status",
    "/status/",
    "/status%00",
    "/STATUS",
    "/./status",
    "/models/../status",
    "/models/%2e%2e%2fstatus",
]


@pytest.mark.parametrize("target", TARGETS)
def test_request_targets_are_matched_exactly(daemon: Daemon, via: str, target: str) -> None:
    raw = f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
    responses, _ = exchange(daemon, via, raw)
    assert [r.status for r in responses] in ([404], [400]), (target, responses)


def test_a_symlink_leading_outside_is_listed_as_unservable_and_never_served(
    daemon: Daemon, via: str
) -> None:
    client = daemon.client(via)
    servable = {m["id"] for m in client.get("/models").json()["models"] if not m["error"]}
    assert servable == {"tiny.gguf", "alias.gguf"}, servable
    listed = entry(client, "out.gguf")
    assert listed is not None and "--follow-symlinks" in listed["error"], listed
    resp = client.infer(model="out.gguf", prompt="hi", **SHORT)
    assert resp.status == 404, resp.body
    error = resp.json()["error"]
    assert error["code"] == "model_not_found" and "--follow-symlinks" in error["message"]


def test_a_symlink_inside_the_models_dir_is_served(daemon: Daemon, via: str) -> None:
    events = stream_to_end(daemon.client(via), {"model": "alias", "prompt": "hi", **SHORT})
    assert events[-1]["model"] == "alias.gguf"


def test_follow_symlinks_serves_links_that_lead_outside(models_root: Path) -> None:
    with running(models_root / "models", "--follow-symlinks", "--no-spare-worker") as daemon:
        for via in ("unix", "tcp"):
            client = daemon.client(via)
            listed = entry(client, "out.gguf")
            assert listed is not None and listed["error"] is None, listed
            events = stream_to_end(client, {"model": "out", "prompt": "hi", **SHORT})
            assert events[-1]["model"] == "out.gguf"
        # Still nothing but registry ids: the link's target is no id of its own.
        assert daemon.client().infer(model="../outside.gguf", prompt="hi").status == 404


# ---- the malformed corpus ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, str]]:
    scratch = tmp_path_factory.mktemp("corpus")
    base = bad_gguf.write_small_base(scratch / "base.gguf.valid")
    return bad_gguf.make_corpus(scratch / "models", base)


def check_corpus_file(client: Client, daemon: Daemon, path: Path, why: str) -> str:
    """Request one corpus file; check the answer and its /models entry; return the outcome."""
    model_id = path.name
    before = entry(client, model_id)
    resp = client.infer(model=model_id, prompt="hi", stream=False, **SHORT)
    after = entry(client, model_id)
    context = (why, resp.status, resp.body[:300], before, after)
    if before is None:
        assert resp.status == 404 and after is None, context
        assert resp.json()["error"]["code"] == "model_not_found", context
        return "not listed"
    if resp.status == 200:
        assert LOADS in why, context  # only the files llama.cpp accepts may load
        assert after is not None and after["state"] == "ready", context
        return "loads"
    assert resp.status == 500, context
    err = resp.json()["error"]
    assert err["code"] == "model_load_failed", context
    assert model_id in err["message"] and str(daemon.models_dir) not in err["message"], context
    assert after is not None and after["state"] == "error", context
    assert isinstance(after["error"], str) and after["error"], context
    return "refused by Python" if before["state"] == "error" else "refused by llama.cpp"


def test_no_malformed_file_takes_the_daemon_down(
    corpus: list[tuple[Path, str]], model_store: ModelStore
) -> None:
    models = corpus[0][0].parent
    link(model_store.get("tiny"), models / "good.gguf")
    with running(models) as daemon:
        client = daemon.client()
        stream_to_end(client, {"model": "good", "prompt": "hi", **SHORT})
        good = worker_for(daemon, models / "good.gguf")
        bystander = Bystander(daemon.client("tcp"), "good.gguf")
        bystander.start()
        outcomes: dict[str, list[str]] = {}
        try:
            for path, why in corpus:
                outcome = check_corpus_file(client, daemon, path, why)
                outcomes.setdefault(outcome, []).append(f"{path.name}: {why}")
                assert daemon.proc is not None and daemon.proc.poll() is None, log_tail(daemon)
        finally:
            bystander.finish()
        print({k: len(v) for k, v in outcomes.items()}, f"bystander streams: {bystander.done}")
        # Only files of another kind are hidden; a broken language model (bad, missing or
        # wrong-typed keys, an unknown architecture) is listed with its error.
        hidden = outcomes.get("not listed", [])
        assert all("vocab only" in h for h in hidden), hidden
        assert len(outcomes.get("refused by Python", [])) >= len(corpus) // 2, outcomes
        assert alive(good) and worker_for(daemon, models / "good.gguf") == good
        daemon_alive(daemon)
        no_stray_workers(daemon)
        assert "unhandled error" not in daemon.log(), log_tail(daemon)


# ---- loads that hang or crash ------------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    fields = stat_fields(pid)
    return int(fields[11]) + int(fields[12])


def idle_spare(daemon: Daemon, busy: set[int]) -> int:
    """The pid of the spare worker once it has started (it then waits, using no CPU)."""

    def spare() -> int | None:
        pids = [p for p in worker_pids(daemon) if p not in busy]
        if len(pids) != 1:
            return None
        ticks = cpu_ticks(pids[0])
        time.sleep(SPARE_IDLE_S)
        return pids[0] if ticks > 0 and cpu_ticks(pids[0]) == ticks else None

    return wait_for(spare, "an idle spare worker", interval=0.05)


@pytest.fixture(scope="module")
def hang_daemon(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    files: dict[str, str | Path] = {
        "good.gguf": "tiny",
        "stuck.gguf": "tiny2",
        "crashy.gguf": model_store.get("tiny", seed=3),
    }
    models = model_store.models_dir(tmp_path_factory.mktemp("hang"), files)
    with running(models, "--load-timeout-s", str(LOAD_TIMEOUT_S)) as d:
        stream_to_end(d.client(), {"model": "good", "prompt": "hi", **SHORT})
        yield d


def test_a_load_that_hangs_fails_after_the_load_timeout(hang_daemon: Daemon) -> None:
    """A worker that never answers its load (here: stopped with SIGSTOP) is killed in time.

    A FIFO cannot be used for this: the registry never opens one (it is not a regular file).
    """
    daemon, client = hang_daemon, hang_daemon.client()
    good = worker_for(daemon, daemon.models_dir / "good.gguf")
    spare = idle_spare(daemon, {good})
    os.kill(spare, signal.SIGSTOP)  # the next load goes to it, and never finishes
    with RawInfer(client, {"model": "good", "prompt": "hi", **LONG}) as bystander:
        assert bystander.status == 200
        started = time.monotonic()
        resp = client.infer(model="stuck", prompt="hi", **SHORT)
        took = time.monotonic() - started
        assert resp.status == 500, (resp.status, resp.body, log_tail(daemon))
        err = resp.json()["error"]
        assert err["code"] == "model_load_failed", err
        assert f"{LOAD_TIMEOUT_S:g} s" in err["message"], err
        assert LOAD_TIMEOUT_S <= took <= LOAD_TIMEOUT_S + 5, took
        assert_one_done(bystander.events())
    wait_for(lambda: not alive(spare), "the stuck worker to be killed and reaped")
    listed = entry(client, "stuck.gguf")
    assert listed is not None and listed["state"] == "error", listed
    assert f"{LOAD_TIMEOUT_S:g} s" in listed["error"], listed
    no_stray_workers(daemon)
    # After the back-off the model loads with a fresh worker.
    wait_for(
        lambda: client.infer(model="stuck", prompt="hi", stream=False, **SHORT).status == 200,
        "stuck.gguf to load on a retry",
        interval=0.2,
    )


def test_a_worker_that_crashes_while_loading_fails_the_load(hang_daemon: Daemon) -> None:
    """A worker killed by a signal mid-load: the reason names the signal; all else goes on."""
    daemon, client = hang_daemon, hang_daemon.client()
    good = worker_for(daemon, daemon.models_dir / "good.gguf")
    inodes = [path.stat().st_ino for path in daemon.models_dir.iterdir()]
    busy = {p for p in worker_pids(daemon) if any(maps_inode(p, i) for i in inodes)}
    spare = idle_spare(daemon, busy)
    os.kill(spare, signal.SIGSTOP)
    with RawInfer(client, {"model": "crashy", "prompt": "hi", **SHORT}) as victim:
        wait_for(
            lambda: (daemon.instance("crashy.gguf") or {}).get("state") == "loading",
            "crashy.gguf to be loading",
        )
        os.kill(spare, signal.SIGSEGV)  # delivered when it runs again
        os.kill(spare, signal.SIGCONT)
        assert victim.status == 500, log_tail(daemon)
        err = victim.json()["error"]
        assert err["code"] == "model_load_failed", err
        assert "SIGSEGV" in err["message"], err
    listed = entry(client, "crashy.gguf")
    assert listed is not None and listed["state"] == "error", listed
    assert "SIGSEGV" in listed["error"], listed
    assert alive(good)
    stream_to_end(client, {"model": "good", "prompt": "hi", **SHORT})
    daemon_alive(daemon)
    no_stray_workers(daemon)


# ---- files that change while their model is loaded ---------------------------------------


def _greedy_text(client: Client, model: str) -> str:
    resp = client.infer(model=model, prompt="hi", stream=False, **SHORT)
    assert resp.status == 200, resp.body
    return str(resp.json()["text"])


def test_a_replaced_file_is_reloaded_and_a_removed_one_unloaded_after_sighup(
    model_store: ModelStore, tmp_path: Path
) -> None:
    old, new = model_store.get("tiny", seed=11), model_store.get("tiny", seed=12)
    models = model_store.models_dir(tmp_path / "models", {"m.gguf": old})
    shutil.copyfile(new, models / "ref.gguf")  # a copy: its own inode, its own worker
    with running(models, "--no-spare-worker") as daemon:
        client = daemon.client()
        before, expected = _greedy_text(client, "m"), _greedy_text(client, "ref")
        assert before != expected  # two different models
        pid = worker_for(daemon, models / "m.gguf")
        link(new, models / "m.gguf")  # replaced in place (a rename over the old file)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: not alive(pid), "the worker of the replaced file to exit")
        assert _greedy_text(client, "m") == expected  # served from the new file
        pid = worker_for(daemon, models / "m.gguf")
        os.unlink(models / "m.gguf")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: not alive(pid), "the worker of the removed file to exit")
        assert entry(client, "m.gguf") is None
        assert client.infer(model="m", prompt="hi", **SHORT).status == 404
