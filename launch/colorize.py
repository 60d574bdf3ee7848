"""Colorize grayscale (or colour, converted to gray first) images with a trained checkpoint.

    python launch/colorize.py --checkpoint runs/x --input photos/ 'more/*.jpg' --output out/
    python launch/colorize.py --checkpoint runs/x --input gray/ --output out/ \
        --memory tcp://127.0.0.1:5555 --memory-name flowers          # or: pccnet-colorize ...
    python launch/colorize.py --checkpoint runs/x --input gray/ --output out/ --memory flowers.pack

Outputs are PNGs at each input's own resolution, the input tree mirrored below --output, with a
manifest.csv (input, output, memory, slot, similarity); outputs already there are skipped unless
--overwrite. Without --memory the checkpoint's own memory is
served by a temporary embedded server; with it, the named memory on that running server is used, or a
pack file (pccnet-memory pack export) served by an embedded server after its extractor identity is checked.
"""

from __future__ import annotations

import argparse
import sys

from launch.common import report_errors, user_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, a run's out_dir (latest) or an exported model")
    parser.add_argument("--input", nargs="+", required=True, help="images, folders or globs")
    parser.add_argument("--output", required=True, help="folder for the colour PNGs")
    parser.add_argument("--memory", help="endpoint of a running memory server, or a memory pack file (served by "
                        "an embedded server; default: the checkpoint's own memory)")
    parser.add_argument("--memory-name", help="memory on that server (default: the checkpoint's, usually 'default')")
    parser.add_argument("--overwrite", action="store_true", help="redo outputs that exist (default: skip them)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument("--retrieval-option", action="append", default=[], metavar="KEY=VALUE",
                        help="override the checkpoint's retrieval settings (k=1 for a small per-domain memory, "
                        "flip=false, mix=geometric ...); repeatable")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.memory_name and not args.memory:
        parser.error("--memory-name needs --memory (the checkpoint's own memory has a single name)")

    from trainer.inference import colorize_command

    return report_errors(lambda: colorize_command(args.checkpoint, args.input, args.output, args.memory,
                                                  args.memory_name, args.batch_size, args.device,
                                                  args.overwrite, args.retrieval_option), user_errors())


if __name__ == "__main__":
    sys.exit(main())
