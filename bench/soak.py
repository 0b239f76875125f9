"""Soak: thousands of mixed requests against a real modeld; memory, fds and queues must come back.

Theory of operation: `run()` writes two tiny models, starts `python -m modeld` on a temporary
Unix socket and a loopback port, and drives it from two threads, one per model, in rounds of
ten requests (`Driver.round`): a long stream holds the model, two more requests fill its
queue, an eleventh-hour one gets 429, two malformed ones get their 4xx, the first waiter
gives up while queued, the holder is cancelled mid-stream, the second waiter is served, and
four normal requests follow on a keep-alive connection. Rounds alternate between the Unix
socket and TCP. A sampler thread reads /status, the daemon's RSS and its open fds throughout.
The first rounds are a warm-up that sets the baselines; at the end, with every connection
closed, the pass criteria in `judge()` are checked. Every socket operation, every wait and
the run as a whole have a deadline, and the daemon is always stopped.

`make soak` runs 10,000 requests; `python -m bench.soak --requests N` any multiple of ten.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.wire import Conn, Endpoint, Head, WireError, encode_request, get_json, lines
from modeld.devtools.tiny_gguf import write_tiny_llama

ROUND = 10  # requests per round (see the module docstring)
KINDS = ("normal", "cancel_stream", "cancel_queued", "rejected", "malformed")
PER_ROUND = {"normal": 5, "cancel_stream": 1, "cancel_queued": 1, "rejected": 1, "malformed": 2}
MODELS = {"soak-a.gguf": 101, "soak-b.gguf": 102}  # file name -> seed of its tiny model
QUEUE_DEPTH = 2  # --max-queue-depth: one waiter that gives up, one that is served
HOLD_TOKENS = 2000  # the holder's stream: seconds of tokens, cancelled after milliseconds
SHORT = {"max_tokens": 8, "temperature": 0.0}  # a normal request: a few greedy tokens
SOCKET_TIMEOUT_S = 30.0  # any single read or write; a healthy one takes milliseconds
START_TIMEOUT_S = 60.0  # daemon start-up (a second or two when the machine is idle)
WAIT_S = 10.0  # longest wait for the daemon to reach a queue state or settle
POLL_S = 0.002  # how often a queue state is looked at
SAMPLE_S = 0.25  # how often the sampler reads RSS, fds and /status
WARMUP_FRACTION = 0.05  # the first 5% of rounds (at least MIN_WARMUP_ROUNDS) warm up
MIN_WARMUP_ROUNDS = 4  # each thread loads its model and runs each kind of request twice
RSS_TOLERANCE = 0.10  # the daemon's RSS may never be more than 10% above the warm-up level
STOP_GRACE_S = 20.0  # SIGTERM to exit; SIGKILL after this
DAEMON_ARGS = (
    "--threads",
    "1",
    "--max-queue-depth",
    str(QUEUE_DEPTH),
    "--max-wait-ms",
    "60000",
    "--keepalive-timeout-s",
    "30",  # the keep-alive connections of a round are never idle this long
    "--send-timeout-s",
    "10",
    "--log-format",
    "json",
)
# Malformed requests: (raw bytes with {model} to fill in, expected status, expected code).
MALFORMED: list[tuple[bytes, int, str]] = [
    (b"{not json", 400, "invalid_request"),
    (b'{"model": "{model}", "prompt": 5}', 400, "invalid_request"),
    (b'{"model": "{model}", "prompt": "hi", "max_tokens": 0}', 400, "invalid_request"),
    (b"\x00\xffGARBAGE\r\n\r\n", 400, "bad_request"),
    (
        b"POST /infer HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    (
        b"POST /infer HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip\r\n\r\n",
        501,
        "not_implemented",
    ),
]


class SoakError(RuntimeError):
    """A request did not end as expected."""


@dataclass(frozen=True)
class SoakConfig:
    requests: int = 10_000  # rounded down to a multiple of ROUND
    max_seconds: float = 1800.0  # the whole run stops after this, passed or not
    workdir: Path | None = None  # where models, socket and log go (a temp dir by default)
    keep: bool = False  # keep the workdir even when the run passes


@dataclass
class Tally:
    """Requests sent and requests that ended as expected, by kind; thread-safe."""

    sent: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, error: str | None = None) -> None:
        with self.lock:
            self.sent[kind] += 1
            if error is None:
                self.ok[kind] += 1
            elif len(self.failures) < 50:
                self.failures.append(f"{kind}: {error}")

    def note(self, failure: str) -> None:
        """A failure that is no single request's (a round cut short, the time bound)."""
        with self.lock:
            self.failures.append(failure)

    @property
    def done(self) -> int:
        return sum(self.sent.values())


@dataclass(frozen=True)
class Sample:
    t: float
    done: int
    rss_kb: int
    fds: int
    inflight: int
    queued: int
    workers: int


# ---- the daemon process --------------------------------------------------------------------------


class Daemon:
    """`python -m modeld` on a temp Unix socket and a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.models_dir = workdir / "models"
        self.log_path = workdir / "daemon.log"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.unix = Endpoint(unix=str(workdir / "d.sock"))
        self.tcp = Endpoint(port=self.port)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        for name, seed in MODELS.items():
            write_tiny_llama(self.models_dir / name, seed=seed)
        cmd = [sys.executable, "-m", "modeld", "--models-dir", str(self.models_dir)]
        cmd += ["--socket", str(self.unix.unix), "--listen", f"127.0.0.1:{self.port}"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([*cmd, *DAEMON_ARGS], stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SoakError(f"modeld exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if get_json(self.unix, "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise SoakError("modeld did not start")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_GRACE_S; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: state is [0], ppid [1]."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def children(pid: int) -> tuple[list[int], list[int]]:
    """(live worker children, zombie children) of pid."""
    workers, zombies = [], []
    for name in os.listdir("/proc"):
        fields = _stat(int(name)) if name.isdigit() else None
        if fields is None or int(fields[1]) != pid:
            continue
        if fields[0] == "Z":
            zombies.append(int(name))
        elif b"modeld.worker" in Path(f"/proc/{name}/cmdline").read_bytes():
            workers.append(int(name))
    return workers, zombies


def maps_file(pid: int, path: Path) -> bool:
    """True when pid has path mapped (a worker mmaps its model)."""
    inode = str(path.stat().st_ino)
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return any(len(f) >= 6 and f[4] == inode for f in map(str.split, maps))
    except OSError:
        return False


# ---- the requests --------------------------------------------------------------------------------


def expect_error(conn: Conn, head: Head, status: int, code: str) -> None:
    body = conn.read_body(head)
    if head.status != status:
        raise SoakError(f"expected {status} {code}, got {head.status}: {body[:200]!r}")
    got = json.loads(body)["error"]["code"]
    if got != code:
        raise SoakError(f"expected {code}, got {got}")


def expect_done(conn: Conn, head: Head, stream: bool) -> None:
    body = conn.read_body(head)
    if head.status != 200:
        raise SoakError(f"expected 200, got {head.status}: {body[:200]!r}")
    last = json.loads(body.strip().rsplit(b"\n", 1)[-1]) if stream else json.loads(body)
    if (last.get("type") if stream else "done") != "done" or "finish_reason" not in last:
        raise SoakError(f"the request did not finish: {last}")


class Driver:
    """Runs rounds against one daemon and tallies what happened."""

    def __init__(self, daemon: Daemon, tally: Tally) -> None:
        self.daemon = daemon
        self.tally = tally
        self._malformed = 0

    def queue_depth(self, model: str) -> int:
        _, status = get_json(self.daemon.unix, "/status")
        for inst in status["instances"]:
            if inst["model_id"] == model:
                return int(inst["queue_depth"])
        return 0

    def wait_queue(self, model: str, depth: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while self.queue_depth(model) != depth:
            if time.monotonic() > deadline:
                raise SoakError(f"{model}'s queue never reached {depth}")
            time.sleep(POLL_S)

    def step(self, kind: str, fn: Callable[[], None]) -> None:
        """Run one request's check; record how it ended."""
        try:
            fn()
        except (SoakError, WireError, OSError, ValueError, KeyError) as exc:
            self.tally.record(kind, f"{type(exc).__name__}: {exc}")
        else:
            self.tally.record(kind)

    def round(self, model: str, ep: Endpoint, keep: Conn) -> None:
        """Ten requests on one model: see the module docstring."""
        hold = {"model": model, "prompt": "hold", "max_tokens": HOLD_TOKENS, "temperature": 0}
        short = {"model": model, "prompt": "hi", **SHORT}
        with (
            Conn(ep, SOCKET_TIMEOUT_S) as holder,
            Conn(ep, SOCKET_TIMEOUT_S) as quitter,
            Conn(ep, SOCKET_TIMEOUT_S) as waiter,
        ):
            holder.send(encode_request("POST", "/infer", hold))
            head = holder.read_head()
            if head.status != 200 or not next(lines(holder.body(head)), None):
                raise SoakError(f"the holder got {head.status}")
            quitter.send(encode_request("POST", "/infer", short))
            waiter.send(encode_request("POST", "/infer", short))
            self.wait_queue(model, QUEUE_DEPTH)
            self.step("rejected", lambda: self.rejected(ep, short))
            self.step("malformed", lambda: self.malformed(ep, model))
            self.step("malformed", lambda: self.malformed(ep, model))
            quitter.close()
            self.step("cancel_queued", lambda: self.wait_queue(model, QUEUE_DEPTH - 1))
            holder.close()
            self.tally.record("cancel_stream")  # the daemon's counter is checked at the end
            self.step("normal", lambda: expect_done(waiter, waiter.read_head(), True))
        for i in range(PER_ROUND["normal"] - 1):
            body = {**short, "stream": i % 2 == 0}
            self.step("normal", functools.partial(self.normal, keep, body))

    def rejected(self, ep: Endpoint, body: dict[str, Any]) -> None:
        with Conn(ep, SOCKET_TIMEOUT_S) as conn:
            _, head = conn.request("POST", "/infer", body)
            if "retry-after" not in head.headers:
                raise SoakError("a 429 without Retry-After")
            expect_error(conn, head, 429, "queue_full")

    def malformed(self, ep: Endpoint, model: str) -> None:
        raw, status, code = MALFORMED[self._malformed % len(MALFORMED)]
        self._malformed += 1
        raw = raw.replace(b"{model}", model.encode())
        data = raw if raw.endswith(b"\r\n\r\n") else encode_request("POST", "/infer", raw)
        with Conn(ep, SOCKET_TIMEOUT_S) as conn:
            conn.send(data)
            expect_error(conn, conn.read_head(), status, code)

    def normal(self, conn: Conn, body: dict[str, Any]) -> None:
        _, head = conn.request("POST", "/infer", body)
        expect_done(conn, head, bool(body["stream"]))


def drive(driver: Driver, model: str, rounds: range, deadline: float) -> None:
    """One thread's rounds on one model, alternating listeners, keep-alive normal requests."""
    eps = (driver.daemon.unix, driver.daemon.tcp)
    keep: dict[int, Conn] = {}
    try:
        for n in rounds:
            if time.monotonic() > deadline:
                driver.tally.note(f"{model}: stopped by --max-seconds")
                return
            which = n % 2
            if which not in keep:
                keep[which] = Conn(eps[which], SOCKET_TIMEOUT_S)
            before = driver.tally.done
            try:
                driver.round(model, eps[which], keep[which])
            except (SoakError, WireError, OSError, ValueError) as exc:
                missing = ROUND - (driver.tally.done - before)
                driver.tally.note(f"{model} round {n} aborted, {missing} requests lost: {exc}")
                keep.pop(which).close()
    finally:
        for conn in keep.values():
            conn.close()


def run_phase(driver: Driver, rounds: range, deadline: float) -> None:
    """Rounds split between one thread per model; returns when all are done."""
    models = list(MODELS)
    threads = [
        threading.Thread(target=drive, args=(driver, m, rounds[i :: len(models)], deadline))
        for i, m in enumerate(models)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ---- sampling and settling -----------------------------------------------------------------------


class Sampler(threading.Thread):
    """Reads RSS, open fds, workers and /status every SAMPLE_S until stopped."""

    def __init__(self, daemon: Daemon, tally: Tally) -> None:
        super().__init__(daemon=True)
        self.d = daemon
        self.tally = tally
        self.samples: list[Sample] = []
        self.halt = threading.Event()
        self.started_at = time.monotonic()

    def run(self) -> None:
        while not self.halt.wait(SAMPLE_S):
            try:
                self.samples.append(self.sample())
            except (OSError, ValueError, KeyError, WireError):
                continue  # a sample lost to a busy moment; the next one counts

    def sample(self) -> Sample:
        pid = self.d.pid
        fds, rss, workers = fd_count(pid), rss_kb(pid), len(children(pid)[0])
        _, status = get_json(self.d.unix, "/status")
        queued = sum(int(i["queue_depth"]) for i in status["instances"])
        t = round(time.monotonic() - self.started_at, 2)
        return Sample(t, self.tally.done, rss, fds, int(status["inflight"]), queued, workers)


def settle(daemon: Daemon) -> dict[str, Any]:
    """Wait until nothing runs or waits; the /status of that moment."""
    deadline = time.monotonic() + WAIT_S
    while True:
        _, status = get_json(daemon.unix, "/status")
        busy = status["inflight"] or any(i["queue_depth"] for i in status["instances"])
        if not busy or time.monotonic() > deadline:
            return status  # type: ignore[no-any-return]
        time.sleep(0.05)


def spare_back(daemon: Daemon) -> None:
    """Wait until the spare worker is back beside the loaded ones (it is replaced about a
    second after a load), so the baseline counts its pipes as the end will."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        _, status = get_json(daemon.unix, "/status")
        loaded = sum(1 for i in status["instances"] if i["state"] == "ready")
        if len(children(daemon.pid)[0]) > loaded:
            return
        time.sleep(0.05)


def steady_fds(pid: int, target: int | None = None) -> int:
    """The daemon's fd count once it stops changing (or reaches target), within WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    seen: list[int] = []
    while time.monotonic() < deadline:
        seen.append(fd_count(pid))
        if target is not None and seen[-1] <= target:
            return seen[-1]
        if target is None and len(seen) >= 5 and len(set(seen[-5:])) == 1:
            return seen[-1]
        time.sleep(0.1)
    return seen[-1]


# ---- the run -------------------------------------------------------------------------------------


@dataclass
class Report:
    requests: int
    seconds: float
    sent: dict[str, int]
    ok: dict[str, int]
    failures: list[str]
    rss_warm_kb: int = 0
    rss_end_kb: int = 0
    rss_peak_kb: int = 0
    fds_base: int = 0
    fds_end: int = 0
    fds_peak: int = 0
    status_end: dict[str, Any] = field(default_factory=dict)
    workers_end: int = 0
    zombies_end: int = 0
    models_mapped: dict[str, int] = field(default_factory=dict)
    exit_code: int | None = None
    kept: str | None = None  # the workdir (models, socket, daemon.log), when it was kept
    criteria: list[tuple[str, bool, str]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.criteria) and all(ok for _, ok, _ in self.criteria)

    def summary(self) -> str:
        done = sum(self.sent.values())
        rate = done / self.seconds if self.seconds else 0.0
        out = [f"soak: {done} requests in {self.seconds:.1f} s ({rate:.0f}/s)"]
        out += [f"  {k}: {self.ok.get(k, 0)}/{self.sent.get(k, 0)} as expected" for k in KINDS]
        out.append(
            f"  RSS: {self.rss_warm_kb} KiB after warm-up, {self.rss_end_kb} KiB at the end, "
            f"peak {self.rss_peak_kb} KiB; fds: {self.fds_base} -> {self.fds_end} "
            f"(peak {self.fds_peak}); workers at the end: {self.workers_end}"
        )
        out += [f"  [{'PASS' if ok else 'FAIL'}] {name}: {why}" for name, ok, why in self.criteria]
        out += [f"  failure: {f}" for f in self.failures[:20]]
        if self.kept:
            out.append(f"  kept: {self.kept} (daemon.log is there)")
        out.append("PASSED" if self.passed else "FAILED")
        return "\n".join(out)


def judge(r: Report, planned: int) -> list[tuple[str, bool, str]]:
    """The pass criteria, each with the figures behind it."""
    st = r.status_end
    insts = st.get("instances", [])
    cancels = r.sent.get("cancel_stream", 0) + r.sent.get("cancel_queued", 0)
    queue_full = st.get("rejected", {}).get("queue_full")
    rss_limit = int(r.rss_warm_kb * (1 + RSS_TOLERANCE))
    loads = {i["model_id"]: i["loads"] for i in insts}
    return [
        (
            "every request ended as expected",
            sum(r.ok.values()) == planned and not r.failures,
            f"{sum(r.ok.values())} of {planned}",
        ),
        (
            "daemon counters match",
            st.get("cancelled") == cancels and queue_full == r.sent.get("rejected", 0),
            f"cancelled {st.get('cancelled')} (sent {cancels}), queue_full {queue_full}",
        ),
        (
            "queues back to 0",
            st.get("inflight") == 0 and all(not i["queue_depth"] for i in insts),
            f"inflight {st.get('inflight')}, depths {[i['queue_depth'] for i in insts]}",
        ),
        (
            "RSS within +10% of warm-up",
            max(r.rss_end_kb, r.rss_peak_kb) <= rss_limit,
            f"{r.rss_end_kb} KiB at the end, peak {r.rss_peak_kb} KiB, limit {rss_limit} KiB",
        ),
        ("fd count back to baseline", r.fds_end <= r.fds_base, f"{r.fds_end} vs {r.fds_base}"),
        (
            "no stray workers",
            r.zombies_end == 0
            and r.workers_end <= len(MODELS) + 1
            and all(n == 1 for n in r.models_mapped.values()),
            f"{r.workers_end} workers, {r.zombies_end} zombies, per model {r.models_mapped}",
        ),
        (
            "no reloads",
            all(n == 1 for n in loads.values()) and len(loads) == len(MODELS),
            f"loads {loads}",
        ),
        ("clean exit", r.exit_code == 0, f"exit status {r.exit_code}"),
    ]


def finish(r: Report, daemon: Daemon, warm_at: float) -> None:
    """Fill in the end-of-run figures, with every connection of the driver closed."""
    r.status_end = settle(daemon)
    r.fds_end = steady_fds(daemon.pid, target=r.fds_base)
    r.rss_end_kb = rss_kb(daemon.pid)
    workers, zombies = children(daemon.pid)
    r.workers_end, r.zombies_end = len(workers), len(zombies)
    r.models_mapped = {m: sum(maps_file(p, daemon.models_dir / m) for p in workers) for m in MODELS}
    after = [s for s in r.samples if s.t >= warm_at] or r.samples
    r.rss_peak_kb = max((s.rss_kb for s in after), default=r.rss_end_kb)
    r.fds_peak = max((s.fds for s in after), default=r.fds_end)


def run(config: SoakConfig) -> Report:
    """Start a daemon, soak it, stop it; the report says whether it passed and why."""
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="modeld-soak-"))
    rounds = max(1, config.requests // ROUND)
    warm = min(rounds, max(MIN_WARMUP_ROUNDS, round(rounds * WARMUP_FRACTION)))
    daemon, tally = Daemon(workdir), Tally()
    sampler = Sampler(daemon, tally)
    started = time.monotonic()
    deadline = started + config.max_seconds
    r = Report(rounds * ROUND, 0.0, {}, {}, tally.failures)
    try:
        daemon.start()
        sampler.start()
        driver = Driver(daemon, tally)
        run_phase(driver, range(warm), deadline)
        settle(daemon)
        spare_back(daemon)
        r.fds_base, r.rss_warm_kb = steady_fds(daemon.pid), rss_kb(daemon.pid)
        warm_at = time.monotonic() - sampler.started_at
        run_phase(driver, range(warm, rounds), deadline)
        r.samples = sampler.samples
        finish(r, daemon, warm_at)
    except (SoakError, OSError, WireError) as exc:
        tally.note(f"run aborted: {type(exc).__name__}: {exc}")
    finally:
        sampler.halt.set()
        r.exit_code = daemon.stop()
    r.seconds = round(time.monotonic() - started, 1)
    r.sent, r.ok, r.samples = dict(tally.sent), dict(tally.ok), sampler.samples
    r.criteria = judge(r, rounds * ROUND)
    if r.passed and not config.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        r.kept = str(workdir)
    return r


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=10_000, help="total requests (x10)")
    ap.add_argument("--max-seconds", type=float, default=1800.0, help="stop after this long")
    ap.add_argument("--json", type=Path, default=None, help="write the full report here")
    ap.add_argument("--keep", action="store_true", help="keep models, socket and log")
    args = ap.parse_args(argv)
    report = run(SoakConfig(args.requests, args.max_seconds, keep=args.keep))
    print(report.summary())
    if args.json is not None:
        data = asdict(report)
        data["passed"] = report.passed
        args.json.write_text(json.dumps(data, indent=1))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
