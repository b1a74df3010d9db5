"""Wall time and peak memory of a stage: CUDA peak allocation on a GPU, process RSS on a CPU.

On a CPU the peak is sampled (every ``interval`` seconds) by a background thread, so very short
spikes can be missed; ``peak_delta_mb`` is the peak above the memory held when the stage began.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

import psutil
import torch


def _rss() -> int:
    return psutil.Process().memory_info().rss


@contextmanager
def track(device: str | torch.device = "cpu", interval: float = 0.005) -> Iterator[dict]:
    """Measure the enclosed code; the yielded dict is filled on exit.

    Keys: ``wall_s``, ``peak_mb`` (absolute peak), ``peak_delta_mb`` (peak minus the start), ``memory_kind``,
    ``threads`` (torch's intra-op threads: results near a cliff can depend on them, NOTES.md session 5).
    """
    dev = torch.device(device)
    out: dict = {}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start_mem = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        try:
            yield out
        finally:
            torch.cuda.synchronize(dev)
            peak = torch.cuda.max_memory_allocated(dev)
            out.update(wall_s=time.perf_counter() - t0, peak_mb=peak / 2**20,
                       peak_delta_mb=(peak - start_mem) / 2**20, memory_kind="cuda_max_allocated",
                       threads=torch.get_num_threads())
        return
    start = _rss()
    peak = [start]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            stop.wait(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
        peak[0] = max(peak[0], _rss())
        out.update(wall_s=wall, peak_mb=peak[0] / 2**20, peak_delta_mb=(peak[0] - start) / 2**20,
                   memory_kind="process_rss", threads=torch.get_num_threads())


class Resources:
    """Collects ``track`` results by stage name: ``with res.stage("fine"): ...``; ``res.as_dict()``."""

    def __init__(self, device="cpu"):
        self.device = device
        self.stages: dict[str, dict] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        with track(self.device) as out:
            yield out
        self.stages[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}

    def as_dict(self) -> dict:
        total = sum(s["wall_s"] for s in self.stages.values())
        peak = max((s["peak_mb"] for s in self.stages.values()), default=0.0)
        return {"stages": self.stages, "total_wall_s": round(total, 4), "peak_mb": round(peak, 2)}
