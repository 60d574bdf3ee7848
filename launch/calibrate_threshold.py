"""Calibrate delta_1, the KL threshold of the colour memory, on a config's training images.

    python launch/calibrate_threshold.py --config configs/pokemon_every10_cpu.yaml [--positive-rate 0.15]

METHOD.md 3.2: a threshold that makes 10-20 % of (query, neighbour) pairs positive. Too loose a
threshold (Pokemon on white at 1.5 nats: 54 % of random pairs) turns every update into a hit on the
top-1 slot, whose key drifts to the mean of all queries; that one slot then answers every test image.
Prints the quantiles of KL(v_j || v_i) over pairs of training images and the threshold for the rate.
"""

from __future__ import annotations

import argparse
import sys

from launch.common import report_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--images", type=int, default=512, help="training images to pair up (default 512)")
    parser.add_argument("--positive-rate", type=float, default=0.15, help="wanted fraction of positive pairs")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args(argv)
    if not 0.0 < args.positive_rate < 1.0:
        parser.error(f"--positive-rate must be in (0, 1), got {args.positive_rate}")
    if args.images < 2:
        parser.error(f"--images must be at least 2, got {args.images}")

    from trainer.calibrate import calibrate_threshold, calibration_report
    from trainer.config import load_config

    return report_errors(lambda: print(calibration_report(calibrate_threshold(
        load_config(args.config, args.overrides), args.images, args.positive_rate))), (ValueError,))


if __name__ == "__main__":
    sys.exit(main())
