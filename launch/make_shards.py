"""Image folders, image files or list files -> standard WebDataset tar shards plus a manifest.

Each sample is `<key>.<ext>` (the original image bytes) and `<key>.json` ({"source", "width", "height",
"mode"}). Output is deterministic for the same inputs (input order, sorted folders, fixed tar metadata).
Undecodable or missing images are reported by name and skipped; the command fails only if none is left.
The writer is trainer.shards.

  python launch/make_shards.py --input photos/ more.txt --output data/shards/mine --prefix train
  pccnet-make-shards --input photos/ --output data/shards/mine
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from launch.common import report_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", action="extend", required=True,
                        help="image folders (recursive), image files, or .txt files listing image paths")
    parser.add_argument("--output", required=True, help="folder for the shards and the manifest")
    parser.add_argument("--prefix", default="train", help="shard names: <prefix>-000000.tar ...")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--max-shard-bytes", type=float, default=float(1 << 30),
                        help="close a shard before it would exceed this size (default 1 GiB)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that read and check images (0 or 1: in this process)")
    parser.add_argument("--root", default=None,
                        help="folder that relative names in list files are resolved against first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from trainer.shards import ShardError, make_shards_command

    return report_errors(lambda: make_shards_command(args.input, args.output, args.prefix, args.samples_per_shard,
                                                     int(args.max_shard_bytes), args.workers, args.root),
                         (ShardError,), code=1, prefix="make_shards: error")


if __name__ == "__main__":
    sys.exit(main())
