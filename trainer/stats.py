"""Training statistics: report scalars anywhere, reduce across ranks at log time, stats.jsonl, Prometheus.

`Stats.report(name, value)` accumulates on the local rank; `Stats.collect()` averages every series over
the interval and over all ranks (one all_gather_object per log interval, not per step). Prometheus
metrics are served per rank on `metrics.port + rank`, named as in SYSTEMS.md section 7.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class Stats:
    """Interval accumulator of named scalars, reduced over ranks by the caller's gather function."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def report(self, name: str, value: float | torch.Tensor) -> None:
        """Add one observation of `name` (a float or a 0-d tensor)."""
        if isinstance(value, torch.Tensor):
            value = float(value.detach().float().item())
        self._sums[name] += float(value)
        self._counts[name] += 1

    def local(self) -> dict[str, tuple[float, int]]:
        return {k: (self._sums[k], self._counts[k]) for k in self._sums}

    def collect(self, gather_object=None) -> dict[str, float]:
        """Means over the interval and over ranks (gather_object: list -> list of all ranks' items)."""
        parts = [self.local()]
        if gather_object is not None:
            parts = gather_object(parts)
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for part in parts:
            for k, (s, n) in part.items():
                sums[k] += s
                counts[k] += n
        self._sums.clear()
        self._counts.clear()
        return {k: sums[k] / counts[k] for k in sorted(sums) if counts[k]}


class JsonlWriter:
    """Appends one JSON object per line and flushes, so a crash loses at most the line in hand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)

    def write(self, row: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._f.write(json.dumps(clean, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """All complete rows of a stats.jsonl (a torn last line is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class TrainerMetrics:
    """Prometheus metrics of one rank (SYSTEMS.md section 7), served on 127.0.0.1:port when given."""

    def __init__(self, rank: int, port: int | None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.rank = str(rank)
        self.registry = CollectorRegistry()
        r = self.registry
        self.steps = Counter("trainer_steps", "Training steps taken", ["rank"], registry=r)
        self.images = Counter("trainer_images", "Training images consumed", ["rank"], registry=r)
        self.step_seconds = Histogram(
            "trainer_step_duration_seconds", "Time per step and part of a step", ["rank", "phase"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r,
        )
        self.loss = Gauge("trainer_loss", "Latest loss values", ["rank", "loss"], registry=r)
        self.data_wait = Counter("trainer_data_wait_seconds", "Time spent waiting for batches", ["rank"],
                                 registry=r)
        self.ckpt_seconds = Histogram("trainer_checkpoint_duration_seconds", "Checkpoint write time", ["rank"],
                                      registry=r)
        self.last_ckpt = Gauge("trainer_last_checkpoint_timestamp_seconds", "Unix time of the last checkpoint",
                               ["rank"], registry=r)
        self.corrupt = Gauge("trainer_corrupt_samples", "Corrupt samples skipped by the loader", ["rank"],
                             registry=r)
        self.gpu_memory = Gauge("trainer_gpu_memory_bytes", "Peak CUDA memory allocated", ["rank"], registry=r)
        self.server = None
        self.port = None
        if port is not None:
            from prometheus_client import start_http_server

            self.server, _ = start_http_server(port, addr="127.0.0.1", registry=r)
            self.port = self.server.server_port
            log.info("rank %s: Prometheus metrics on http://127.0.0.1:%d/metrics", self.rank, self.port)

    def observe_step(self, images: int, timings: dict[str, float], losses: dict[str, float]) -> None:
        self.steps.labels(self.rank).inc()
        self.images.labels(self.rank).inc(images)
        for phase, seconds in timings.items():
            self.step_seconds.labels(self.rank, phase).observe(seconds)
        if "data" in timings:
            self.data_wait.labels(self.rank).inc(timings["data"])
        for name, value in losses.items():
            if math.isfinite(value):
                self.loss.labels(self.rank, name).set(value)
        if torch.cuda.is_available():
            self.gpu_memory.labels(self.rank).set(torch.cuda.max_memory_allocated())

    def observe_checkpoint(self, seconds: float) -> None:
        self.ckpt_seconds.labels(self.rank).observe(seconds)
        self.last_ckpt.labels(self.rank).set(time.time())

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
