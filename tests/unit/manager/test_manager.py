"""Manager behaviour with a fake backend on trio's MockClock: deterministic and fast."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest
import trio.testing

from modeld.errors import (
    Busy,
    InsufficientVram,
    ModelLoadFailed,
    Overloaded,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
)
from modeld.manager.backend import Finished, GenParams, Tokens
from modeld.manager.manager import Manager, ManagerConfig
from modeld.manager.states import State
from tests.unit.manager.fakes import FakeBackend, spec

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


@asynccontextmanager
async def running(backend: FakeBackend, **cfg: Any) -> AsyncIterator[Manager]:
    config = ManagerConfig(
        budget_mb=cfg.pop("budget_mb", 1000), margin_mb=cfg.pop("margin_mb", 0), **cfg
    )
    manager = Manager(backend, config)
    async with anyio.create_task_group() as tg:
        await tg.start(manager.run)
        yield manager
        await manager.shutdown()
        tg.cancel_scope.cancel()


async def generate(
    manager: Manager,
    model_id: str,
    tokens: int = 3,
    hold: anyio.Event | None = None,
    log: list[str] | None = None,
    tag: str = "",
    mb: int = 0,
) -> list[str]:
    out: list[str] = []
    mb = mb or manager.backend.sizes.get(model_id, 100)  # type: ignore[attr-defined]
    async with manager.acquire(spec(model_id, mb)) as lease:
        if log is not None:
            log.append(tag)
        if hold is not None:
            await hold.wait()
        async with lease.generate(GenParams("hi", max_tokens=tokens)) as gen:
            while True:
                ev = await gen.next()
                if isinstance(ev, Tokens):
                    out.extend(ev.texts)
                if isinstance(ev, Finished):
                    return out


async def settle() -> None:
    await anyio.sleep(0.001)
    await trio.testing.wait_all_tasks_blocked()


async def test_single_flight_load_and_fifo_order() -> None:
    backend = FakeBackend()
    order: list[str] = []
    async with running(backend) as m, anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(generate, m, "a", 2, None, order, str(i))
            await settle()  # so enqueue order is 0..19
    assert backend.loads == ["a"]
    assert order == [str(i) for i in range(20)]
    assert m.instances["a"].loads == 1


async def test_state_sequence_load_ready_unload() -> None:
    backend = FakeBackend()
    seen: list[State] = []
    async with running(backend) as m:
        async with anyio.create_task_group() as tg:
            tg.start_soon(generate, m, "a")
            for _ in range(200):
                inst = m.instances.get("a")
                if inst is not None and (not seen or seen[-1] != inst.state):
                    seen.append(inst.state)
                await anyio.sleep(0.01)
        await m.shutdown()
        seen.append(m.instances["a"].state)
    assert seen == [State.LOADING, State.READY, State.UNLOADED]


async def test_queue_depth_limit_answers_429_with_a_hint() -> None:
    backend = FakeBackend()
    hold = anyio.Event()
    async with running(backend, max_queue_depth=2) as m, anyio.create_task_group() as tg:
        tg.start_soon(generate, m, "a", 3, hold)
        await settle()
        await anyio.sleep(1)  # loaded, first one holds the instance
        tg.start_soon(generate, m, "a")
        tg.start_soon(generate, m, "a")
        await settle()
        with pytest.raises(QueueFull) as err:
            await generate(m, "a")
        assert err.value.retry_after_ms >= 1
        assert err.value.headers()[0][0] == "Retry-After"
        assert m.rejected["queue_full"] == 1
        hold.set()


async def test_the_retry_hint_counts_what_is_left_of_the_running_request() -> None:
    backend = FakeBackend()  # a token every 10 ms
    async with running(backend, max_queue_depth=1) as m, anyio.create_task_group() as tg:
        await generate(m, "a", tokens=100)  # the average generation: 1,000 ms
        tg.start_soon(generate, m, "a", 100)
        await anyio.sleep(0.4)  # 400 ms into the running one
        tg.start_soon(generate, m, "a")  # one waits
        await settle()
        with pytest.raises(QueueFull) as err:
            await generate(m, "a")
        # 600 ms left of the running one, then 1,000 ms for the one ahead
        assert 1_550 <= err.value.retry_after_ms <= 1_650, err.value.retry_after_ms
        assert err.value.headers() == [("Retry-After", "2")]


async def test_max_wait_expires_with_queue_timeout() -> None:
    backend = FakeBackend()
    hold = anyio.Event()
    async with running(backend, max_wait_ms=300) as m, anyio.create_task_group() as tg:
        tg.start_soon(generate, m, "a", 3, hold)
        await anyio.sleep(1)
        start = anyio.current_time()
        with pytest.raises(QueueTimeout):
            await generate(m, "a")
        assert anyio.current_time() - start == pytest.approx(0.3, abs=0.01)
        assert m.instances["a"].queue == type(m.instances["a"].queue)()
        hold.set()


async def test_global_inflight_cap_rejects_early() -> None:
    backend = FakeBackend()
    hold = anyio.Event()
    async with running(backend, max_inflight=1) as m, anyio.create_task_group() as tg:
        tg.start_soon(generate, m, "a", 3, hold)
        await anyio.sleep(1)
        with pytest.raises(Overloaded):
            await generate(m, "b")
        assert "b" not in backend.loads
        hold.set()


async def test_cancelled_waiter_leaves_the_queue_at_once() -> None:
    backend = FakeBackend()
    hold = anyio.Event()
    async with running(backend) as m, anyio.create_task_group() as tg:
        tg.start_soon(generate, m, "a", 3, hold)
        await anyio.sleep(1)
        with anyio.CancelScope() as scope:
            tg.start_soon(_cancel_later, scope, 0.2)
            await generate(m, "a")
        assert m.status()["instances"][0]["queue_depth"] == 0
        hold.set()


async def _cancel_later(scope: anyio.CancelScope, after: float) -> None:
    await anyio.sleep(after)
    scope.cancel()


async def test_cancellation_reaches_the_backend() -> None:
    backend = FakeBackend()
    backend.token_delay_s = 0.1
    async with running(backend) as m:
        with anyio.move_on_after(1.0):
            await generate(m, "a", tokens=1000)
        await settle()
        assert backend.cancelled == ["a"]
        assert m.instances["a"].inflight == 0
        assert await generate(m, "a", tokens=2) == ["t1", "t2"]  # the instance is free again


async def test_failed_load_then_retry_with_backoff() -> None:
    backend = FakeBackend()
    backend.fail_next = 1
    async with running(backend) as m:
        with pytest.raises(ModelLoadFailed, match="bad magic"):
            await generate(m, "a")
        assert m.instances["a"].state is State.ERROR
        assert m.instances["a"].error == "bad magic"
        with pytest.raises(ModelLoadFailed, match="next retry"):
            await generate(m, "a")  # inside the backoff: no second load
        assert backend.loads == ["a"]
        await anyio.sleep(1.1)
        assert await generate(m, "a", tokens=1) == ["t1"]
        assert backend.loads == ["a", "a"]
        assert m.instances["a"].error is None


async def test_load_backoff_doubles_per_failure() -> None:
    backend = FakeBackend()
    backend.fail_next = 2
    async with running(backend) as m:
        with pytest.raises(ModelLoadFailed, match="bad magic"):
            await generate(m, "a")
        await anyio.sleep(1.1)
        with pytest.raises(ModelLoadFailed, match="bad magic"):
            await generate(m, "a")
        with pytest.raises(ModelLoadFailed, match=r"next retry in 2\.0 s"):
            await generate(m, "a")
        assert m.instances["a"].failures == 2


async def test_a_load_that_ends_after_shutdown_is_unloaded_at_once() -> None:
    backend = FakeBackend()
    backend.gate = anyio.Event()
    async with running(backend) as m:
        async with anyio.create_task_group() as tg:

            async def request() -> None:
                with pytest.raises(ShuttingDown):
                    await generate(m, "a")

            tg.start_soon(request)
            await settle()
            assert m.instances["a"].state is State.LOADING
            await m.shutdown()
            backend.gate.set()
            await anyio.sleep(1)
        assert m.instances["a"].state is State.UNLOADED
        assert backend.loads == ["a"] and backend.closed == ["a"]


async def test_lru_eviction_of_idle_instances() -> None:
    backend = FakeBackend({"a": 400, "b": 400, "c": 400})
    async with running(backend, budget_mb=1000, margin_mb=100) as m:
        for model in ("a", "b", "c"):
            await generate(m, model)
            assert m.used_mb <= 900
        assert backend.closed == ["a"]
        states = {i.model_id: i.state for i in m.instances.values()}
        assert states == {"a": State.UNLOADED, "b": State.READY, "c": State.READY}


async def test_eviction_never_touches_busy_instances_and_the_load_waits() -> None:
    backend = FakeBackend({"a": 400, "b": 400, "c": 400})
    hold_a, hold_b = anyio.Event(), anyio.Event()
    async with (
        running(backend, budget_mb=1000, margin_mb=100) as m,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(generate, m, "a", 3, hold_a)
        tg.start_soon(generate, m, "b", 3, hold_b)
        await anyio.sleep(2)
        done: list[str] = []

        async def c() -> None:
            done.extend(await generate(m, "c", 1))

        tg.start_soon(c)
        await anyio.sleep(2)
        assert backend.closed == [] and "c" not in backend.loads
        assert m.status()["instances"][2]["queue_depth"] == 1
        hold_b.set()
        await anyio.sleep(2)
        assert backend.closed == ["b"]
        assert done == ["t1"]
        hold_a.set()


async def test_too_large_model_is_refused_at_once() -> None:
    backend = FakeBackend()
    async with running(backend, budget_mb=1000, margin_mb=100) as m:
        with pytest.raises(InsufficientVram, match="901 MB"):
            async with m.acquire(spec("huge", 901)):
                pass
        assert backend.loads == []
        assert all(i["model_id"] != "huge" for i in m.status()["instances"])  # no ghost


async def test_pinned_instance_is_not_evicted() -> None:
    backend = FakeBackend({"a": 500, "b": 500})
    async with running(
        backend, budget_mb=1000, margin_mb=100, pinned=frozenset({"a"}), max_wait_ms=2000
    ) as m:
        await generate(m, "a")
        with pytest.raises(InsufficientVram):  # it can never fit beside the pinned one
            await generate(m, "b")
        assert backend.closed == []


async def test_idle_unload() -> None:
    backend = FakeBackend()
    async with running(backend, idle_unload_s=10) as m:
        await generate(m, "a")
        await anyio.sleep(5)
        assert m.instances["a"].state is State.READY
        await anyio.sleep(7)
        assert str(m.instances["a"].state) == "unloaded"  # (mypy narrowed it to READY above)


async def test_an_unload_that_raises_does_not_kill_the_manager() -> None:
    backend = FakeBackend()
    backend.close_raises = True
    async with running(backend, idle_unload_s=10) as m:
        await generate(m, "a")
        await anyio.sleep(12)  # idle unload: close() raises
        assert str(m.instances["a"].state) == "unloaded"
        await generate(m, "a")  # the manager still serves, and reloads
        assert backend.loads == ["a", "a"]


async def test_worker_exit_unloads_and_the_next_request_reloads() -> None:
    backend = FakeBackend()
    async with running(backend) as m:
        await generate(m, "a")
        model = m.instances["a"].handle
        assert model is not None
        model.on_exit("worker killed by SIGKILL")  # type: ignore[attr-defined]
        await anyio.sleep(1)
        assert m.instances["a"].state is State.UNLOADED
        await generate(m, "a")
        assert backend.loads == ["a", "a"]


_ = (Awaitable, Callable)


async def test_depth_zero_still_serves_an_idle_instance_but_queues_nothing() -> None:
    backend = FakeBackend()
    hold = anyio.Event()
    async with running(backend, max_queue_depth=0) as m, anyio.create_task_group() as tg:
        assert await generate(m, "a", 1) == ["t1"]  # cold: loads, then runs
        tg.start_soon(generate, m, "a", 3, hold)
        await settle()
        with pytest.raises(QueueFull):
            await generate(m, "a")
        hold.set()


async def test_a_cold_model_is_not_starved_by_a_busy_queue_behind_it() -> None:
    backend = FakeBackend({"a": 800, "b": 400})
    backend.token_delay_s = 0.1
    order: list[str] = []
    async with (
        running(backend, budget_mb=1000, margin_mb=100) as m,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(generate, m, "a", 10, None, order, "a1")
        await anyio.sleep(1)  # a1 is generating
        tg.start_soon(generate, m, "b", 2, None, order, "b1")
        await settle()
        tg.start_soon(generate, m, "a", 2, None, order, "a2")  # queued after b1
        await settle()
    assert order == ["a1", "b1", "a2"]
    assert backend.closed[:2] == ["a", "b"]  # a made room for b, then b for a again


async def test_a_changed_file_unloads_an_idle_instance_and_reloads_on_demand() -> None:
    backend = FakeBackend()
    async with running(backend) as m:
        await generate(m, "a")
        changed = dataclasses.replace(spec("a"), stamp=(1, 2, 3))
        m.reconcile({"a": changed})
        await anyio.sleep(1)
        assert backend.closed == ["a"]
        assert m.instances["a"].spec == changed  # the next load uses the file on disk
        await generate(m, "a")
        assert backend.loads == ["a", "a"]


async def test_a_removed_file_unloads_a_busy_instance_once_its_request_ends() -> None:
    backend = FakeBackend()
    hold = anyio.Event()
    async with running(backend) as m, anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(generate, m, "a", hold=hold))
        await anyio.sleep(1)  # loaded, and the request holds its turn
        m.reconcile({})
        await settle()
        assert m.instances["a"].state is State.READY and backend.closed == []
        hold.set()
        await anyio.sleep(1)
        assert backend.closed == ["a"]
        assert str(m.instances["a"].state) == "unloaded"


async def test_a_file_changed_during_a_failed_load_is_used_next_time() -> None:
    backend = FakeBackend()
    backend.gate = anyio.Event()
    backend.fail_next = 1
    async with running(backend) as m, anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(_expect_failure, m, "a"))
        await settle()  # loading, held at the gate
        changed = dataclasses.replace(spec("a"), stamp=(1, 2, 3))
        m.reconcile({"a": changed})
        backend.gate.set()
        await anyio.sleep(1)  # the load fails
        inst = m.instances["a"]
        assert inst.spec == changed and inst.stale is None and inst.next_spec is None
        await anyio.sleep(2)  # past the first backoff (1 s)
        await generate(m, "a")
        assert backend.loads == ["a", "a"] and backend.closed == []


async def refused_behind(
    m: Manager,
    tg: anyio.abc.TaskGroup,
    *,
    average: int,
    running: int,
    after_s: float,
    expect: type[Busy],
    model_id: str = "a",
) -> Busy:
    """One request of `average` tokens (10 ms each) sets the average; one of `running`
    tokens then runs; `after_s` into it, a request for model_id is refused with `expect`."""
    await generate(m, "a", tokens=average)
    tg.start_soon(generate, m, "a", running)
    await anyio.sleep(after_s)
    with pytest.raises(expect) as err:
        await generate(m, model_id)
    return err.value


async def _expect_failure(m: Manager, model_id: str) -> None:
    with pytest.raises(ModelLoadFailed):
        await generate(m, model_id)


async def test_a_queue_timeout_hint_counts_only_the_requests_ahead() -> None:
    backend = FakeBackend()  # a token every 10 ms
    async with running(backend, max_wait_ms=200) as m, anyio.create_task_group() as tg:
        # Average 1,000 ms; first in line: only the running one is ahead of it.
        error = await refused_behind(
            m, tg, average=100, running=100, after_s=0.1, expect=QueueTimeout
        )
        # 100 ms in when it queued, 200 ms of waiting: ~700 ms left of the running one
        assert 650 <= error.retry_after_ms <= 750, error.retry_after_ms


async def test_a_cold_model_runs_one_and_queues_the_full_depth() -> None:
    backend = FakeBackend()
    backend.load_s = 1.0
    hold = anyio.Event()
    async with running(backend, max_queue_depth=2) as m, anyio.create_task_group() as tg:
        for _ in range(3):  # while it loads: the one that runs first, then two queued
            tg.start_soon(generate, m, "a", 3, hold)
            await settle()
        assert m.instances["a"].state is State.LOADING
        with pytest.raises(QueueFull) as err:
            await generate(m, "a")
        assert "2 requests already queued" in err.value.message
        hold.set()


async def test_a_hint_behind_a_request_past_the_average_grows_with_its_age() -> None:
    backend = FakeBackend()  # a token every 10 ms
    async with running(backend, max_queue_depth=0) as m, anyio.create_task_group() as tg:
        # Average 100 ms; 4 s in, far past the average: a long one.
        error = await refused_behind(m, tg, average=10, running=1000, after_s=4.0, expect=QueueFull)
        assert error.retry_after_ms >= 1_900, error.retry_after_ms  # half its age


async def test_the_overloaded_hint_is_when_the_first_running_request_ends() -> None:
    backend = FakeBackend()  # a token every 10 ms
    async with running(backend, max_inflight=1) as m, anyio.create_task_group() as tg:
        error = await refused_behind(  # average 1,000 ms
            m, tg, average=100, running=100, after_s=0.7, expect=Overloaded, model_id="b"
        )
        assert 250 <= error.retry_after_ms <= 350, error.retry_after_ms


async def test_a_request_that_gives_up_on_a_model_never_loaded_leaves_no_instance() -> None:
    backend = FakeBackend(sizes={"a": 600, "b": 600})
    hold = anyio.Event()
    async with running(backend, max_wait_ms=300) as m, anyio.create_task_group() as tg:
        tg.start_soon(generate, m, "a", 3, hold)
        await anyio.sleep(1)
        with pytest.raises(QueueTimeout):
            await generate(m, "b")  # no room while a runs
        assert "b" not in m.instances and "b" not in backend.loads
        hold.set()


async def test_concurrent_generations_share_the_cores() -> None:
    backend = FakeBackend()
    backend.threads = 4
    hold_a, hold_b, hold_c = anyio.Event(), anyio.Event(), anyio.Event()
    async with running(backend) as m, anyio.create_task_group() as tg:
        tg.start_soon(generate, m, "a", 3, hold_a)
        await anyio.sleep(1)
        assert backend.threads_set == []  # alone: all its threads
        tg.start_soon(generate, m, "b", 3, hold_b)
        await anyio.sleep(1)
        assert sorted(backend.threads_set) == [("a", 2), ("b", 2)]
        tg.start_soon(generate, m, "c", 3, hold_c)
        await anyio.sleep(1)
        assert sorted(backend.threads_set[2:]) == [("a", 1), ("b", 1), ("c", 1)]
        assert [i["threads"] for i in m.status()["instances"]] == [1, 1, 1]
        hold_a.set()
        hold_b.set()
        await anyio.sleep(1)
        assert [n for model, n in backend.threads_set if model == "c"][-1] == 4  # alone again
        # The idle ones have all of theirs again too (for /status, and their next turn).
        assert [i["threads"] for i in m.status()["instances"]] == [4, 4, 4]
        hold_c.set()
