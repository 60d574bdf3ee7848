"""Shared pieces of the trainer and entry-point tests: tiny shards, configs, launching runs."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = str(Path(PYTHON).with_name("torchrun"))


def write_tiny_shards(folder: Path, n_shards: int = 2, per_shard: int = 8, size: int = 40, seed: int = 0) -> str:
    """Shards of smooth random colour images (plain tarfile, standard WebDataset layout); returns the pattern."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(folder / f"train-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                # Blocky colour fields: enough structure for every loss to have something to see.
                small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                key = f"s{s}_{i:03d}"
                for ext, data in (("png", buf.getvalue()), ("json", json.dumps({"id": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"train-{{000000..{n_shards - 1:06d}}}.tar")


def write_config(path: Path, shards: str, out_dir: Path, **overrides) -> Path:
    """configs/debug_cpu.yaml with the data and out_dir filled in and nested overrides applied."""
    cfg = yaml.safe_load((REPO / "configs" / "debug_cpu.yaml").read_text())
    cfg["data"]["train"] = shards
    cfg["run"]["out_dir"] = str(out_dir)
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(PYTHONPATH=str(REPO), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e


def torchrun_cmd(config: Path, *args: str, nproc: int = 2) -> list[str]:
    return [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", str(REPO / "launch" / "train.py"),
            "--config", str(config), *args]


def run_cmd(cmd: list[str], timeout: float = 420, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout the whole group is killed (no strays)."""
    proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"{cmd[:4]} timed out after {timeout}s; output:\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process, its process group and every descendant (torchrun puts ranks in new sessions)."""
    import psutil

    try:
        victims = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        victims = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in victims:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(victims, timeout=30)


kill_group = kill_tree


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, poll_s: float = 0.2):
    """Poll predicate() until true; fail early if `proc` exits, or after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{out[-4000:]}")
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class FixedQuery(nn.Module):
    """Stands in for the memory extractor: retrieval only needs a query per image, not a trained network."""

    def __init__(self, q: np.ndarray) -> None:
        super().__init__()
        self.q = torch.from_numpy(q)

    def forward(self, light: torch.Tensor) -> torch.Tensor:
        return self.q[: light.shape[0]]
