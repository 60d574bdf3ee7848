"""Config values taken from the training data: `phase1.threshold: auto` and `memory.capacity: auto`.

delta_1 from the KL quantiles of pairs of training images (METHOD.md 3.2), shared by
launch/calibrate_threshold.py (prints the quantiles) and the trainer, which resolves "auto" before any
step: the threshold that makes POSITIVE_RATE of random pairs positive. The capacity is CAPACITY_PER_IMAGE
slots per training image (the paper's 1.2). Both are logged and stored in the run's config as numbers
(so every checkpoint carries what it trained with). Imports no model code.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch
from tqdm import tqdm

from pccnet.color import NUM_BINS
from pccnet.losses import kl_divergence
from trainer.config import TrainConfig, load_config
from trainer.data import count_samples, expand_pattern, make_eval_loader

log = logging.getLogger(__name__)

QUANTILES = (0.05, 0.1, 0.15, 0.2, 0.5)
POSITIVE_RATE = 0.15  # METHOD.md 3.2 asks for 10-20 % positive pairs
AUTO_IMAGES = 512
CAPACITY_PER_IMAGE = 1.2  # the paper: a memory of 1.2 x the training set
MAX_SHARDS = 16


def calibrate_threshold(cfg: TrainConfig, n_images: int = 512, positive_rate: float = 0.15) -> dict:
    """KL(v_j || v_i) over ordered pairs of up to n_images random training images of cfg.data.train.

    Every image of up to MAX_SHARDS evenly spread shards is read and a random subset paired (shards are
    often in class order). Returns the pair count, the QUANTILES, the configured threshold's positive
    share and the threshold for `positive_rate`. ValueError with fewer than 2 images.
    """
    data = dataclasses.replace(cfg.data, batch_size=64)
    # At most MAX_SHARDS shards spread evenly over the list: every run with `auto` (on every rank) pays
    # this read before its first step, which must not grow with a data set of thousands of shards.
    stride = -(-len(expand_pattern(data.train)) // MAX_SHARDS)
    feats = [b["color_feature"].double() for b in tqdm(make_eval_loader(data.train, data, 0, stride),
                                                        desc="colour features", unit="batch")]
    v = torch.cat(feats) if feats else torch.zeros(0, NUM_BINS, dtype=torch.float64)
    if v.shape[0] < 2:
        raise ValueError(f"{data.train} holds {v.shape[0]} image(s); pairs need at least 2")
    n_all = v.shape[0]
    v = v[torch.randperm(n_all, generator=torch.Generator().manual_seed(0))[:n_images]]
    kl = kl_divergence(v[None], v[:, None])  # [n, n]: stored value j against query i
    pairs = kl[~torch.eye(v.shape[0], dtype=torch.bool)]
    return {"images": v.shape[0], "images_all": n_all, "pairs": pairs.numel(),
            "quantiles": {q: float(pairs.quantile(q)) for q in QUANTILES},
            "configured": cfg.phase1.threshold,
            "configured_positive": (None if isinstance(cfg.phase1.threshold, str)
                                    else float((pairs < cfg.phase1.threshold).double().mean())),
            "positive_rate": positive_rate, "threshold": float(pairs.quantile(positive_rate))}


def calibration_report(r: dict) -> str:
    """calibrate_threshold's result as the lines launch/calibrate_threshold.py prints."""
    qs = r["quantiles"]
    return "\n".join([
        f"{r['images']} of {r['images_all']} training images, {r['pairs']} ordered pairs, KL in nats",
        "| quantile | " + " | ".join(f"{q:g}" for q in qs) + " |",
        "| --- " * (len(qs) + 1) + "|",
        "| KL | " + " | ".join(f"{v:.3f}" for v in qs.values()) + " |",
        (f"configured phase1.threshold {r['configured']}: calibrated when a run starts"
         if r["configured_positive"] is None else
         f"configured phase1.threshold {r['configured']:g}: {r['configured_positive']:.1%} of pairs positive"),
        f"phase1.threshold for {r['positive_rate']:.0%} positive pairs: {r['threshold']:.3f}",
    ])


def _with(cfg: TrainConfig, section: str, key: str, value) -> TrainConfig:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{key: value})})


def _resumed_value(cfg: TrainConfig, section: str, key: str, unit: str, resume_from: str | Path | None
                   ) -> TrainConfig | None:
    """cfg with the number an 'auto' key was resolved to in the checkpoint resumed from, or None."""
    if resume_from is None:
        return None
    saved = getattr(getattr(load_config(Path(resume_from) / "config.yaml"), section), key)
    if isinstance(saved, str):
        return None
    log.info("%s.%s auto: %g %s, as in %s", section, key, saved, unit, resume_from)
    return _with(cfg, section, key, saved)


def resolve_threshold(cfg: TrainConfig, resume_from: str | Path | None = None) -> TrainConfig:
    """cfg with a numeric phase1.threshold: unchanged when it is a number; when 'auto', the value of the
    checkpoint resumed from (a resumed run keeps its delta_1), else calibrated now on cfg.data.train."""
    if not isinstance(cfg.phase1.threshold, str):
        return cfg
    resumed = _resumed_value(cfg, "phase1", "threshold", "nats", resume_from)
    if resumed is not None:
        return resumed
    r = calibrate_threshold(cfg, AUTO_IMAGES, POSITIVE_RATE)
    value = round(r["threshold"], 4)
    log.info("phase1.threshold auto: %.4f nats (%.0f %% of %d pairs of %d training images positive; "
             "quantiles %s)", value, 100 * POSITIVE_RATE, r["pairs"], r["images"],
             ", ".join(f"{q:g}: {v:.3f}" for q, v in r["quantiles"].items()))
    if value <= 0:
        raise ValueError(f"phase1.threshold auto: the {POSITIVE_RATE:.0%} quantile of the pair KL of "
                         f"{cfg.data.train} is {value}; the training images have (nearly) identical colours")
    return _with(cfg, "phase1", "threshold", value)


def resolve_capacity(cfg: TrainConfig, resume_from: str | Path | None = None) -> TrainConfig:
    """cfg with a numeric memory.capacity: unchanged when it is a number; when 'auto', the checkpoint's
    (a resumed run keeps its memory's shape), else ceil(CAPACITY_PER_IMAGE x the images of data.train)."""
    if not isinstance(cfg.memory.capacity, str):
        return cfg
    resumed = _resumed_value(cfg, "memory", "capacity", "slots", resume_from)
    if resumed is not None:
        return resumed
    images = count_samples(cfg.data.train)
    if images < 1:
        raise ValueError(f"memory.capacity auto: data.train {cfg.data.train!r} holds no images to size the memory by")
    capacity = math.ceil(CAPACITY_PER_IMAGE * images - 1e-9)  # 1.2 * 5 is 6.000000000000001 in floats: 6, not 7
    log.info("memory.capacity auto: %d slots (%g x %d training images)", capacity, CAPACITY_PER_IMAGE, images)
    return _with(cfg, "memory", "capacity", capacity)
