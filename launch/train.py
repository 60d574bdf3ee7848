"""Train PCCNet: phase 1 (colour memory) then phase 2 (generator + patch sampler + discriminator).

    accelerate launch --config_file configs/accelerate_ddp.yaml launch/train.py --config configs/X.yaml [key.path=value ...]
    torchrun --standalone --nproc_per_node 2 launch/train.py --config configs/X.yaml
    python launch/train.py --config configs/X.yaml --resume auto        # or: pccnet-train --config ...

With `memory.address: null` rank 0 starts an embedded memory server inside run.out_dir.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from launch.common import report_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (defaults: the paper's settings)")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (default: the run's latest checkpoint, if any), 'none', or a checkpoint path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.image_size=64 model.generator.width=32")
    args = parser.parse_args(argv)

    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError
    from trainer.data import DataError
    from trainer.loop import train

    return report_errors(lambda: train(args.config, args.overrides, args.resume),
                         (ConfigError, DataError, CheckpointError))


def _exit(code: int) -> None:
    """Leave a multi-process run without C++ static teardown: gloo threads still alive there abort the
    process (SIGABRT, "terminate called without an active exception") after the run finished and saved."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
