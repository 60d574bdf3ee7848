"""Add few-shot colour memories to a live memory server, without retraining.

    python launch/memorize.py --checkpoint runs/x --memory tcp://127.0.0.1:5555 --name flowers \
        --input few_shot_flowers/ [--capacity 1024]                  # or: pccnet-memorize ...
    python launch/colorize.py --checkpoint runs/x --memory tcp://127.0.0.1:5555 --memory-name flowers ...

Each colour image gets a slot of its own: its key from the checkpoint's extractor (on the gray
version), its value its 313-bin colour distribution. The memory is created if absent.
"""

from __future__ import annotations

import argparse
import sys

from launch.common import report_errors, user_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, a run's out_dir (latest) or an exported model")
    parser.add_argument("--memory", required=True, help="endpoint of a running memory server")
    parser.add_argument("--name", required=True, help="memory to create or extend on that server")
    parser.add_argument("--input", nargs="+", required=True, help="colour images, folders or globs")
    parser.add_argument("--capacity", type=int, default=1024, help="slots, when the memory is created (default 1024)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when present)")
    args = parser.parse_args(argv)
    if args.capacity < 1:
        parser.error(f"--capacity must be >= 1, got {args.capacity}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")

    from trainer.inference import memorize_command

    return report_errors(lambda: memorize_command(args.checkpoint, args.memory, args.name, args.input,
                                                  args.capacity, args.batch_size, args.device), user_errors())


if __name__ == "__main__":
    sys.exit(main())
