"""The `/status` document: a read-only view of the manager, built in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from modeld.manager.instance import Instance

if TYPE_CHECKING:
    from modeld.manager.manager import Manager


def status_document(manager: Manager) -> dict[str, Any]:
    config = manager.config
    used = manager.used_mb
    now = anyio.current_time()
    return {
        "vram": {
            "budget_mb": config.budget_mb,
            "margin_mb": config.margin_mb,
            "used_mb": used,
            "available_mb": config.budget_mb - config.margin_mb - used,
            "source": config.budget_source,
        },
        "inflight": manager.inflight,
        "max_inflight": config.max_inflight,
        "rejected": dict(manager.rejected),
        "cancelled": manager.cancelled,
        "instances": [instance_status(i, now) for i in manager.instances.values()],
    }


def instance_status(inst: Instance, now: float) -> dict[str, Any]:
    oldest = (now - inst.queue[0].enqueued_at) * 1000 if inst.queue else 0.0
    return {
        "model_id": inst.model_id,
        "state": str(inst.state),
        "last_used": inst.last_used_wall,
        "est_vram_mb": inst.spec.public_estimate_mb,
        "vram_mb": inst.vram_mb,
        "inflight": inst.inflight,
        "queue_depth": len(inst.queue),
        "oldest_wait_ms": round(oldest, 1),
        "loads": inst.loads,
        "pinned": inst.pinned,
        "threads": inst.threads,
        "error": inst.error,
    }
