"""Phase 1's update keys: recomputed after the optimizer step (post_step) or the step's own queries (pre_step).

    python benchmarks/update_query.py [--quick] [--config configs/pokemon_every10_cpu.yaml] [--seeds 0,1]

For each choice of `phase1.update_query`, real `launch/train.py` runs of phase 1 (in-process memory,
so the transport is not what is compared), interleaved per seed: steps/s, the second extractor
forward's share of the step, and the retrieval accuracy on data.val at the end of phase 1 (the share
of held-out images whose retrieved colour feature is within the KL threshold of their own).
Needs the shards of `make shards` (the retrieval accuracy needs data.val).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_trainer", HERE / "trainer.py")
bench_trainer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_trainer)  # its train() and steady(); also puts the repo on sys.path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pokemon_every10_cpu.yaml")
    parser.add_argument("--quick", action="store_true", help="100 phase-1 steps, one seed")
    parser.add_argument("--steps", type=int, default=None, help="phase-1 steps (default: the config's)")
    parser.add_argument("--seeds", default=None, help="comma-separated run seeds (default 0,1; --quick: 0)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from trainer.config import load_config
    from trainer.data import expand_pattern

    cfg = load_config(args.config, args.overrides)
    try:
        expand_pattern(cfg.data.train)
        expand_pattern(cfg.data.val or "")
    except Exception as exc:  # noqa: BLE001
        print(f"update_query: needs the shards of `make shards` ({exc}); skipped", file=sys.stderr)
        return 0
    steps = args.steps or (100 if args.quick else cfg.phase1.steps)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1")).split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="pccnet-bench-update-query-"))
    common = [*args.overrides, "memory.address=inproc", f"phase1.steps={steps}", "phase2.steps=0",
              "phase1.val_every=0", "run.checkpoint_every=100000", "run.sample_every=100000", "run.log_every=10"]
    runs: dict[str, list[dict]] = {"post_step": [], "pre_step": []}
    for seed in seeds:
        for choice in runs:
            rows = bench_trainer.train(args.config, tmp / f"{choice}-{seed}",
                                       [*common, f"run.seed={seed}", f"phase1.update_query={choice}"])
            step_s = bench_trainer.steady(rows, "time/step_s", 1)
            acc = [r["val/retrieval_acc"] for r in rows if "val/retrieval_acc" in r]
            runs[choice].append({
                "seed": seed, "steps_per_s": 1.0 / step_s,
                "update_forward_share": bench_trainer.steady(rows, "time/update_forward_s", 1) / step_s,
                "retrieval_acc": acc[-1] if acc else float("nan"),
                "hit_rate": [r["mem/hit_rate"] for r in rows if "mem/hit_rate" in r][-1],
            })
            r = runs[choice][-1]
            print(f"  {choice} seed {seed}: {r['steps_per_s']:.2f} steps/s, retrieval acc {r['retrieval_acc']:.3f}",
                  file=sys.stderr)
    post = statistics.median(r["steps_per_s"] for r in runs["post_step"])
    print(f"\nPhase-1 update keys ({args.config}: {steps} phase-1 steps, {cfg.data.image_size} px, batch "
          f"{cfg.data.batch_size}, extractor {cfg.model.extractor.backbone}, seeds {seeds}, in-process memory)")
    print("| phase1.update_query | steps / s | ratio | 2nd forward share of step | val retrieval acc (per seed) "
          "| last hit rate |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for choice, rs in runs.items():
        sps = statistics.median(r["steps_per_s"] for r in rs)
        accs = ", ".join(f"{r['retrieval_acc']:.3f}" for r in rs)
        print(f"| {choice} | {sps:.2f} | {sps / post:.2f}x | "
              f"{statistics.median(r['update_forward_share'] for r in rs):.1%} | "
              f"{accs} "
              f"(mean {statistics.mean(r['retrieval_acc'] for r in rs):.3f}) | "
              f"{statistics.mean(r['hit_rate'] for r in rs):.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
