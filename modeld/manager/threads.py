"""How many decode threads each generation gets while several run at once.

On a CPU every worker is set up to use all the cores. Two models generating at once
would then run twice as many threads as there are cores, and llama.cpp's threads wait
for each other at every step of the graph by spinning: measured on 2 cores with two
SmolLM2 streams, 2 threads each gave 17-20 tok/s per stream, 1 thread each 68-74. So
while k generations run, each gets its share of the cores, and all of them again once
it runs alone. `thread_share` and `reshare` are pure; `push_threads` tells a worker.
"""

from __future__ import annotations

from collections.abc import Iterable

from modeld.manager.instance import Instance


def thread_share(alone: int, running: int) -> int:
    """Threads for one of `running` concurrent generations of a worker that uses `alone`
    threads by itself (0: unknown, left as it is)."""
    if alone <= 0 or running <= 1:
        return alone
    return max(1, alone // running)


def reshare(instances: Iterable[Instance]) -> list[Instance]:
    """Set `threads` of every loaded instance to its share now (an idle one: all of its
    own, until it runs beside others); return those whose worker must be told and has
    no `push_threads` under way."""
    loaded = [i for i in instances if i.handle is not None]
    running = sum(1 for i in loaded if i.inflight)
    out = []
    for inst in loaded:
        assert inst.handle is not None
        share = thread_share(inst.handle.info.threads, running if inst.inflight else 1)
        if inst.threads is not None and share != inst.threads:
            inst.threads = share
            if not inst.threads_pushing:
                out.append(inst)
    return out


async def push_threads(inst: Instance) -> None:
    """Tell inst's worker its share until it has the latest one (it may change while a
    message is on its way; one pusher per instance keeps them in order)."""
    try:
        sent: int | None = None
        while (handle := inst.handle) is not None and inst.threads not in (None, sent):
            sent = inst.threads
            assert sent is not None
            await handle.set_threads(sent)
    finally:
        inst.threads_pushing = False
