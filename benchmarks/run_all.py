"""`make bench`: every benchmark in turn, each printing its own table (pass --quick for a short run).

    python benchmarks/run_all.py [--quick] [--only model_step,step_options,data_pipeline,memory_server,trainer,
                                                  update_query,onnx_serving,memory_scale,memory_load]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("model_step", "step_options", "data_pipeline", "memory_server", "trainer", "update_query",
              "onnx_serving", "memory_scale", "memory_load")
# Benchmarks that are another script with arguments (issue 13: the phase-2 step's `train` options as
# ratios to the default on this CPU, with the batch sweep, at a size the CPU finishes in minutes).
SCRIPTS = {"step_options": ("model_step", ["--options", "channels_last,fused,foreach,channels_last+fused",
                                           "--sizes", "128", "--batches", "4", "--width", "32", "--sweep", "2,4,8"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=",".join(BENCHMARKS))
    args = parser.parse_args(argv)
    failed = []
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        if name not in BENCHMARKS:
            parser.error(f"unknown benchmark {name!r}; choose from {BENCHMARKS}")
        print(f"\n=== {name} {'(quick)' if args.quick else ''} ===", flush=True)
        t0 = time.perf_counter()
        script, extra = SCRIPTS.get(name, (name, []))
        res = subprocess.run([sys.executable, str(HERE / f"{script}.py"), *extra, *(["--quick"] if args.quick else [])],
                             check=False)
        print(f"=== {name}: {'ok' if res.returncode == 0 else f'FAILED ({res.returncode})'} "
              f"in {time.perf_counter() - t0:.0f} s ===", flush=True)
        if res.returncode != 0:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
