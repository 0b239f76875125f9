"""Where the memory budget comes from, and how much memory a worker really uses.

With no `--vram-budget-mb`, the budget is the GPUs' total memory read through NVML
(`nvidia-ml-py`) when a GPU and its driver are present, else the machine's RAM (llama.cpp
then runs on the CPU and "VRAM" is the workers' memory).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass(frozen=True)
class BudgetSource:
    budget_mb: int
    source: str  # config | nvml | system
    gpu: bool  # a GPU is there to measure worker memory with NVML


def _nvml() -> Any | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no package, no driver, no GPU: all mean "no NVML"
        return None


def gpu_total_mb() -> int | None:
    """Total memory of all GPUs NVML sees, or None without a GPU."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        count = nvml.nvmlDeviceGetCount()
        total = 0
        for index in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            total += int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
        return total // MIB if count else None
    except Exception:
        return None


def system_total_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MIB


def detect_budget(configured_mb: int | None) -> BudgetSource:
    """The budget to plan with, and where it came from."""
    gpu_mb = gpu_total_mb()
    if configured_mb is not None:
        return BudgetSource(configured_mb, "config", gpu_mb is not None)
    if gpu_mb is not None:
        return BudgetSource(gpu_mb, "nvml", True)
    return BudgetSource(system_total_mb(), "system", False)


def process_vram_mb(pid: int) -> int | None:
    """GPU memory NVML attributes to `pid` on all GPUs, or None when unknown."""
    nvml = _nvml()
    if nvml is None:
        return None
    total = 0
    found = False
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    total += int(proc.usedGpuMemory)
                    found = True
    except Exception:
        return None
    return total // MIB if found else None
