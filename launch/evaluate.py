"""Score a checkpoint on a test split: FID (with the number of images), LPIPS, PSNR, colourfulness.

    python launch/evaluate.py --checkpoint runs/x --data 'data/shards/pokemon/test-{000000..000000}.tar' \
        --output runs/x/eval_test.json [--baseline gray]                 # or: pccnet-evaluate ...

Images are prepared exactly as in training (composited, centre-cropped, resized to the model's size);
the colour feature is retrieved from the checkpoint's memory (or --memory). Writes JSON with keys fid,
lpips, psnr, colorfulness, n_images and prints a Markdown table. `--baseline gray` scores the trivial
ab = 0 output instead of the model; `--retrieval` scores the colour memory alone (trainer.evaluation).
"""

from __future__ import annotations

import argparse
import sys

from launch.common import report_errors, user_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, a run's out_dir (latest) or an exported model")
    parser.add_argument("--data", required=True, help="shard pattern of the test split")
    parser.add_argument("--output", required=True, help="JSON file to write")
    parser.add_argument("--memory", help="endpoint of a running memory server (default: the checkpoint's memory)")
    parser.add_argument("--memory-name", help="memory on that server")
    parser.add_argument("--memory-from", metavar="CHECKPOINT",
                        help="retrieve with the extractor and memory saved in this (e.g. phase-1) checkpoint")
    parser.add_argument("--baseline", choices=("none", "gray"), default="none",
                        help="'gray': score the ab = 0 output (the trivial baseline) instead of the model")
    parser.add_argument("--color-feature", choices=("memory", "own"), default="memory",
                        help="'own': condition on each test image's own colour distribution instead of the "
                             "memory's answer (a perfect memory: the upper bound retrieval could reach)")
    parser.add_argument("--retrieval", action="store_true",
                        help="score the colour memory instead: KL of the retrieved distribution to each image's own")
    parser.add_argument("--retrieval-option", action="append", default=[], metavar="KEY=VALUE",
                        help="override the checkpoint's retrieval settings (k=8, mix=geometric, temperature=0.05, "
                             "flip=true; k=1 is the paper's top-1); repeatable")
    parser.add_argument("--bootstrap", type=int, default=100, metavar="N",
                        help="resample the test images N times for the spread of FID (0: off; default 100)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when present)")
    args = parser.parse_args(argv)
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.color_feature == "own" and args.baseline == "gray":
        parser.error("--color-feature own has no effect with --baseline gray")

    from trainer.evaluation import evaluate_checkpoint

    return report_errors(lambda: evaluate_checkpoint(
        args.checkpoint, args.data, args.output, retrieval=args.retrieval, memory=args.memory,
        memory_name=args.memory_name, memory_from=args.memory_from, device=args.device, batch_size=args.batch_size,
        baseline=args.baseline, color_feature=args.color_feature, bootstrap=args.bootstrap,
        retrieval_options=args.retrieval_option), user_errors())


if __name__ == "__main__":
    sys.exit(main())
