"""Trainer throughput: phase 1 against the memory server vs in-process, phase 2 with 1 and 2 processes.

    python benchmarks/trainer.py [--quick] [--config configs/pokemon_every10_cpu.yaml]

Every number comes from real `launch/train.py` runs (stats.jsonl), interleaved A/B/A/B so machine
drift hits both sides alike:
- phase 1 steps/s with the embedded memory server process (tcp loopback), its updates pipelined
  (`memory.pipeline: true`, the default) and not, its queries answered by the trainer's replica
  (`memory.local_queries: true`, the default) and sent to the server, against `memory.address: inproc`
  (the same store code inside the trainer process): target >= 0.97x on the CPU, >= 0.95x on a GPU
  (issue 13); past one pass over the data, the default's ratio also by pass;
- phase 2 images/s with 1 and 2 processes (torchrun, gloo), and the share of step time spent waiting
  for data and for the memory (target: data <= 2 %).
Uses the Pokemon shards from `make shards` when present, else synthetic shards.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this folder comes first on sys.path and this very file would shadow the trainer package.
sys.path.insert(0, str(REPO))


def synthetic_shards(folder: Path, n: int = 256, size: int = 96) -> str:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    per = 64
    for s in range((n + per - 1) // per):
        with tarfile.open(folder / f"train-{s:06d}.tar", "w") as tar:
            for i in range(per):
                img = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                info = tarfile.TarInfo(f"{s:03d}_{i:04d}.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
    return str(folder / f"train-{{000000..{(n + per - 1) // per - 1:06d}}}.tar")


def train(config: str, out: Path, overrides: list[str], nproc: int = 1) -> list[dict]:
    """Run launch/train.py and return its stats.jsonl rows."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
               GLOO_SOCKET_IFNAME="lo")
    if nproc == 1:
        cmd = [sys.executable, "launch/train.py"]
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={nproc}",
               "launch/train.py"]
    cmd += ["--config", config, "--resume", "none", f"run.out_dir={out}", *overrides]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    from trainer.stats import read_jsonl

    return read_jsonl(out / "stats.jsonl")


def steady(rows: list[dict], key: str, phase: int) -> float:
    """Median of `key` over the log rows of a phase, skipping the first (warm-up) interval."""
    values = [r[key] for r in rows if r.get("phase") == phase and r.get(key) is not None]
    values = values[1:] if len(values) > 1 else values
    return statistics.median(values) if values else float("nan")


MODES = {"server": ["memory.address=null", "memory.pipeline=true"],
         "server-remote": ["memory.address=null", "memory.local_queries=false"],
         "server-sync": ["memory.address=null", "memory.pipeline=false"],
         "inproc": ["memory.address=inproc"]}


def split_by_pass(rows: list[dict], first_pass: int) -> dict[str, list[dict]]:
    """Phase-1 log rows whose interval ends within the first pass over the data, and the rest."""
    return {"first": [r for r in rows if r.get("step", 0) <= first_pass],
            "later": [r for r in rows if r.get("step", 0) > first_pass]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pokemon_every10_cpu.yaml")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--phase1-steps", type=int, default=None,
                        help="phase-1 steps per run (default 150, --quick 40); past one pass over the data the "
                             "table also splits the ratio into the first pass and the rest")
    parser.add_argument("--procs", default="1,2", help="process counts for phase 2 (default 1,2)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"phase-1 runs, from {', '.join(MODES)} (default all; inproc and server always run)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 2)
    p1_steps, p2_steps = (40, 12) if args.quick else (150, 40)
    if args.phase1_steps is not None:
        if args.phase1_steps < 20:
            parser.error(f"--phase1-steps must be >= 20 (two log intervals), got {args.phase1_steps}")
        p1_steps = args.phase1_steps
    tmp = Path(tempfile.mkdtemp(prefix="pccnet-bench-trainer-"))
    from trainer.config import load_config

    cfg = load_config(args.config, args.overrides)
    data = []
    try:
        from trainer.data import expand_pattern

        expand_pattern(cfg.data.train)
        source = cfg.data.train
    except Exception:  # shards not built: fall back to synthetic ones
        source = synthetic_shards(tmp / "shards")
        data = [f"data.train={source}", "data.val=null", "memory.capacity=307"]
    common = [*data, *args.overrides, "data.val=null", "run.checkpoint_every=100000", "run.sample_every=100000",
              "run.log_every=10"]
    print(f"data: {source}", file=sys.stderr)
    from trainer.data import count_samples

    # The first pass decodes every image; later passes hit the data worker's cache (data.cache_mb), so the
    # machine's spare CPU, which the server process needs, differs between the two.
    first_pass = -(-count_samples(source) // cfg.data.batch_size)

    chosen = {m.strip() for m in args.modes.split(",") if m.strip()} | {"inproc", "server"}
    if chosen - set(MODES):
        parser.error(f"--modes: unknown mode(s) {', '.join(sorted(chosen - set(MODES)))}; choose from {', '.join(MODES)}")
    modes = {m: extra for m, extra in MODES.items() if m in chosen}
    p1 = {mode: [] for mode in modes}
    p1_rpc = {mode: [] for mode in modes}
    p1_split = {mode: {"first": [], "later": []} for mode in modes}
    for r in range(repeats):
        for mode, extra in modes.items():
            rows = train(args.config, tmp / f"p1-{mode}-{r}", [*common, f"phase1.steps={p1_steps}", "phase2.steps=0",
                                                               *extra])
            p1[mode].append(1.0 / steady(rows, "time/step_s", 1))
            p1_rpc[mode].append(steady(rows, "time/memory_share", 1))
            for window, part in split_by_pass(rows, first_pass).items():
                if part:
                    p1_split[mode][window].append(1.0 / steady(part, "time/step_s", 1))
            print(f"  phase 1 {mode}: {p1[mode][-1]:.2f} steps/s", file=sys.stderr)
    p2 = {}
    procs = [int(p) for p in args.procs.split(",") if p.strip() and int(p) > 0]  # "0": phase 1 only
    for nproc in procs:
        rows = train(args.config, tmp / f"p2-{nproc}", [*common, "phase1.steps=0", f"phase2.steps={p2_steps}"],
                     nproc=nproc)
        p2[nproc] = {k: steady(rows, k, 2) for k in ("images_per_s", "time/data_share", "time/step_s")}
        print(f"  phase 2 x{nproc}: {p2[nproc]['images_per_s']:.2f} img/s", file=sys.stderr)

    server, inproc = statistics.median(p1["server"]), statistics.median(p1["inproc"])
    sync = statistics.median(p1["server-sync"]) if p1.get("server-sync") else float("nan")
    remote = statistics.median(p1["server-remote"]) if p1.get("server-remote") else float("nan")
    print(f"\nTrainer benchmark ({args.config}: {cfg.data.image_size} px, batch {cfg.data.batch_size} per process, "
          f"width {cfg.model.generator.width}, extractor {cfg.model.extractor.backbone}, k {cfg.phase1.k})")
    print("| phase 1 | steps / s | memory share of step | ratio |\n| --- | ---: | ---: | ---: |")
    print(f"| in-process store (inproc) | {inproc:.2f} | {statistics.median(p1_rpc['inproc']):.1%} | 1.00 |")
    if "server-sync" in modes:
        print(f"| memory server process (tcp), updates awaited (memory.pipeline: false) | {sync:.2f} | "
              f"{statistics.median(p1_rpc['server-sync']):.1%} | {sync / inproc:.2f}x |")
    if "server-remote" in modes:
        print(f"| memory server process (tcp), updates pipelined, queries sent to it (memory.local_queries: false) "
              f"| {remote:.2f} | {statistics.median(p1_rpc['server-remote']):.1%} | {remote / inproc:.2f}x |")
    print(f"| memory server process (tcp), updates pipelined, queries answered by the trainer's replica (default) | "
          f"{server:.2f} | "
          f"{statistics.median(p1_rpc['server']):.1%} | {server / inproc:.2f}x (target >= 0.97x CPU, 0.95x GPU) |")
    if all(p1_split[m]["later"] and p1_split[m]["first"] for m in ("server", "inproc")):
        print(f"\n| phase 1 window (a pass = {first_pass} steps) | in-process steps / s | server (default) | ratio |"
              "\n| --- | ---: | ---: | ---: |")
        for window, label in (("first", "first pass (images decoded)"), ("later", "later passes (data cache warm)")):
            a, b = (statistics.median(p1_split[m][window]) for m in ("inproc", "server"))
            print(f"| {label} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
    print("\n| phase 2 | images / s | s / step | data wait share (target <= 2 %) |\n| --- | ---: | ---: | ---: |")
    for nproc, r in p2.items():
        print(f"| {nproc} process{'es' if nproc > 1 else ''} | {r['images_per_s']:.2f} | {r['time/step_s']:.3f} | "
              f"{r['time/data_share']:.2%} |")
    if 1 in p2 and 2 in p2:
        print(f"\n2-process scaling: {p2[2]['images_per_s'] / p2[1]['images_per_s']:.2f}x the 1-process rate "
              "(both share this machine's cores)")
    result = {"phase1": p1, "phase1_by_pass": p1_split, "phase1_first_pass_steps": first_pass, "phase2": p2,
              "phase1_ratio": server / inproc, "phase1_sync_ratio": sync / inproc if "server-sync" in modes else None,
              "phase1_remote_ratio": remote / inproc if "server-remote" in modes else None}
    (tmp / "result.json").write_text(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
