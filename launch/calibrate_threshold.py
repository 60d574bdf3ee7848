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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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

    import torch
    from tqdm import tqdm

    from pccnet.color import NUM_BINS
    from pccnet.losses import kl_divergence
    from trainer.config import ConfigError, load_config
    from trainer.data import DataError, make_eval_loader

    try:
        cfg = load_config(args.config, args.overrides)
        cfg.data.batch_size = 64
        # Every training image is read and a random subset paired: shards are often in class order.
        feats = [b["color_feature"].double() for b in tqdm(make_eval_loader(cfg.data.train, cfg.data, 0, 1),
                                                            desc="colour features", unit="batch")]
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    v = torch.cat(feats) if feats else torch.zeros(0, NUM_BINS, dtype=torch.float64)
    if v.shape[0] < 2:
        print(f"error: {cfg.data.train} holds {v.shape[0]} image(s); pairs need at least 2", file=sys.stderr)
        return 2
    n_all = v.shape[0]
    v = v[torch.randperm(n_all, generator=torch.Generator().manual_seed(0))[: args.images]]
    kl = kl_divergence(v[None], v[:, None])  # [n, n]: stored value j against query i
    pairs = kl[~torch.eye(v.shape[0], dtype=torch.bool)]
    threshold = float(pairs.quantile(args.positive_rate))
    print(f"{v.shape[0]} of {n_all} training images, {pairs.numel()} ordered pairs, KL in nats")
    print("| quantile | " + " | ".join(f"{q:g}" for q in (0.05, 0.1, 0.15, 0.2, 0.5)) + " |")
    print("| --- " * 6 + "|")
    print("| KL | " + " | ".join(f"{float(pairs.quantile(q)):.3f}" for q in (0.05, 0.1, 0.15, 0.2, 0.5)) + " |")
    print(f"configured phase1.threshold {cfg.phase1.threshold:g}: "
          f"{float((pairs < cfg.phase1.threshold).double().mean()):.1%} of pairs positive")
    print(f"phase1.threshold for {args.positive_rate:.0%} positive pairs: {threshold:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
