"""Train PCCNet: phase 1 (colour memory) then phase 2 (generator + patch sampler + discriminator).

    accelerate launch --config_file configs/accelerate_ddp.yaml launch/train.py --config configs/X.yaml [key.path=value ...]
    torchrun --standalone --nproc_per_node 2 launch/train.py --config configs/X.yaml
    python launch/train.py --config configs/X.yaml --resume auto

With `memory.address: null` rank 0 starts an embedded memory server inside run.out_dir.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trainer.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (defaults: the paper's settings)")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (default: the run's latest checkpoint, if any), 'none', or a checkpoint path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.image_size=64 model.width=32")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if not cfg.data.train:
        print("config error: data.train must name the training shards (e.g. data/shards/x/train-{000000..000003}.tar)",
              file=sys.stderr)
        return 2
    from trainer.loop import run

    result = run(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":
        print(f"done: step {result['step']}, outputs in {result['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
