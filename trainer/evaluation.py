"""Measuring: a checkpoint's colorizations on a test split, its memory's retrieval, a data set's KL pairs.

`evaluate_images` scores FID (with the number of images and a bootstrap spread), LPIPS, PSNR and
colourfulness; `evaluate_retrieval` the KL of the retrieved colour feature to each image's own against
chance and oracle; `calibrate_threshold` the KL quantiles that set phase1.threshold (METHOD.md 3.2).
Images are prepared exactly as in training (trainer.data's eval loader). The entry points
(launch/evaluate.py, launch/calibrate_threshold.py) parse arguments and call these.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pccnet import metrics
from pccnet.color import lab_from_network, lab_to_rgb
from pccnet.losses import kl_divergence
from trainer.calibrate import QUANTILES, calibrate_threshold, calibration_report  # noqa: F401 (re-exported)
from trainer.config import DataConfig, retrieval_with
from trainer.data import make_eval_loader
from trainer.inference import Colorizer
from trainer.retrieval import RetrievalOptions, js_divergence

# FID on fewer images than this is strongly biased (METHOD.md 8.3); flagged, never hidden.
SMALL_SET = 200
RETRIEVAL_THRESHOLDS = (0.5, 1.0, 1.5)


def _eval_data(col: Colorizer, batch_size: int) -> DataConfig:
    # The checkpoint's own data settings (size, background), at this batch size and at most 2 workers.
    data = col.cfg.data
    return dataclasses.replace(data, batch_size=batch_size, workers=min(data.workers, 2))


@torch.no_grad()
def evaluate_images(col: Colorizer, pattern: str, batch_size: int = 16, baseline: str = "none",
                    color_feature: str = "memory", bootstrap: int = 100, real_cache: dict | None = None) -> dict:
    """Scores of a checkpoint's colorizations of every image of `pattern`.

    baseline 'gray' scores the ab = 0 output instead; color_feature 'own' conditions G on each image's
    own colour distribution (a perfect memory). `real_cache`, a dict shared by calls on the same test
    images, keeps the real images' FID features (keyed by each batch's item ids and the image
    preparation), so that scoring several rows computes them once. ValueError with fewer than 2 images.
    """
    preds, reals, psnr, lp, colorful, colorful_real, order = [], [], [], [], [], [], hashlib.sha256()
    for batch in tqdm(make_eval_loader(pattern, _eval_data(col, batch_size), 0, 1), desc="evaluate", unit="batch"):
        light, real_ab = batch["light"].to(col.device), batch["ab"].to(col.device)
        ids = batch["item_id"].numpy().astype("<i8").tobytes()
        order.update(ids)
        if baseline == "gray":
            fake_ab = torch.zeros_like(real_ab)
        else:
            fake_ab = col.predict_ab(light, batch["color_feature"] if color_feature == "own" else None)
        pred = lab_to_rgb(lab_from_network(light, fake_ab)).cpu()
        real = lab_to_rgb(lab_from_network(light, real_ab)).cpu()
        psnr.append(metrics.psnr(pred, real))
        lp.append(metrics.lpips(pred, real))
        colorful.append(metrics.colorfulness(pred))
        colorful_real.append(metrics.colorfulness(real))
        # Features, not images, are kept: memory stays flat however large the test set.
        preds.append(metrics.fid_features(pred, device=col.device))
        key = (ids, col.image_size, col.background)
        feats = real_cache.get(key) if real_cache is not None else None
        if feats is None:
            feats = metrics.fid_features(real, device=col.device)
            if real_cache is not None:
                real_cache[key] = feats
        reals.append(feats)
    n = sum(p.shape[0] for p in preds)
    if n < 2:
        raise ValueError(f"{pattern} holds {n} image(s); every metric needs at least 2")
    preds, reals = np.concatenate(preds), np.concatenate(reals)
    boot = bootstrap_fid(preds, reals, bootstrap)
    return {
        "fid": metrics.fid_from_features(preds, reals),
        "lpips": float(torch.cat(lp).mean()),
        "psnr": float(torch.cat(psnr).mean()),
        "colorfulness": float(torch.cat(colorful).mean()),
        "colorfulness_real": float(torch.cat(colorful_real).mean()),
        "n_images": n,
        # Standard deviation of FID over resamplings of the test images: how far apart two rows
        # must be before the order means anything.
        "fid_bootstrap_std": float(np.std(boot)) if boot else None,
        "fid_bootstrap_n": len(boot),
        # Each resampling's FID, and the test images' order: two results with the same order digest
        # were resampled with the same indices, so their per-resample differences give a paired
        # spread of the FID difference (paired_fid_delta), far tighter than either row's own spread.
        "fid_bootstrap": [float(b) for b in boot],
        "image_order": order.hexdigest()[:16],
        "small_set": n < SMALL_SET,
        "image_size": col.image_size,
        "background": col.background,
        "checkpoint": str(col.path),
        "memory_from": str(col.memory_source),
        "data": pattern,
        "baseline": baseline,
        "color_feature": color_feature,
    }


def bootstrap_fid(preds: np.ndarray, reals: np.ndarray, n_resamples: int, seed: int = 0) -> list[float]:
    """FID of n_resamples resamplings (with replacement) of the test images; pairs stay together."""
    rng = np.random.default_rng(seed)
    n = preds.shape[0]
    return [metrics.fid_from_features(preds[idx], reals[idx])
            for idx in (rng.integers(0, n, n) for _ in range(n_resamples))]


def paired_fid_delta(result: dict, reference: dict) -> tuple[float, float] | None:
    """(FID(result) - FID(reference), std of that difference over the shared bootstrap resamplings), or
    None when the two were not scored on the same images in the same order with the same resamplings."""
    a, b = result.get("fid_bootstrap"), reference.get("fid_bootstrap")
    if not a or not b or len(a) != len(b) or result.get("image_order") is None \
            or result.get("image_order") != reference.get("image_order"):
        return None
    return result["fid"] - reference["fid"], float(np.std(np.asarray(a) - np.asarray(b)))


def _divergences(p: torch.Tensor, q: torch.Tensor) -> dict[str, torch.Tensor]:
    """KL(p || q), KL(q || p) and Jensen-Shannon of broadcastable distributions (float64), over the last dim."""
    return {"kl": kl_divergence(p, q), "kl_rev": kl_divergence(q, p), "js": js_divergence(p, q)}


@torch.no_grad()
def evaluate_retrieval(col: Colorizer, pattern: str, batch_size: int = 16) -> dict:
    """How far the retrieved colour feature is from each test image's own, against a random written slot
    (chance) and the best written slot (oracle): KL(retrieved || own) (the keys without a suffix),
    KL(own || retrieved) (`_rev`) and Jensen-Shannon (`_js`), in nats."""
    exported = col.client.export(memory=col.memory_name)
    written = torch.from_numpy(exported["values"][exported["item_ids"] >= 0]).double()  # [n, 313]
    if written.shape[0] == 0:
        raise ValueError(f"memory {col.memory_name!r} of {col.path} holds no written slot")
    got, chance, oracle, slots = {}, {}, {}, []
    for batch in tqdm(make_eval_loader(pattern, _eval_data(col, batch_size), 0, 1), desc="retrieval", unit="batch"):
        target = batch["color_feature"].double()  # [B, 313]
        retrieved, picked = col.retrieve(batch["light"], return_slots=True)
        slots.append(picked)
        for name, d in _divergences(retrieved.detach().cpu().double(), target).items():
            got.setdefault(name, []).append(d)
        for name, d in _divergences(written[None], target[:, None]).items():  # [B, n]: each written value
            chance.setdefault(name, []).append(d.mean(1))
            oracle.setdefault(name, []).append(d.min(1).values)
    got, chance, oracle = ({k: torch.cat(v).numpy() for k, v in x.items()} for x in (got, chance, oracle))
    result = {"n_images": int(got["kl"].shape[0]), "written_slots": int(written.shape[0]),
              # How many different slots answered (the best of each mix): 1 means every image got the same.
              "distinct_answers": int(np.unique(np.concatenate(slots)).size)}
    for name, suffix in (("kl", ""), ("kl_rev", "_rev"), ("js", "_js")):
        result[f"retrieval_kl{suffix}"] = float(got[name].mean())
        result[f"retrieval_kl{suffix}_median"] = float(np.median(got[name]))
        result[f"chance_kl{suffix}"] = float(chance[name].mean())
        result[f"oracle_kl{suffix}"] = float(oracle[name].mean())
    result.update({"threshold": col.cfg.phase1.threshold, "extractor": col.cfg.model.extractor.backbone,
                   "retrieval": dataclasses.asdict(col.retrieval), "checkpoint": str(col.path),
                   "memory_from": str(col.memory_source), "data": pattern})
    thresholds = set(RETRIEVAL_THRESHOLDS)
    if not isinstance(col.cfg.phase1.threshold, str):
        thresholds.add(col.cfg.phase1.threshold)
    for t in sorted(thresholds):
        result[f"acc@{t:g}"] = float((got["kl"] < t).mean())
    return result


def markdown_table(result: dict) -> str:
    """evaluate_images' result as a Markdown table (with a note on small sets)."""
    spread = result.get("fid_bootstrap_std")
    fid = f"{result['fid']:.3f}" + (f" ± {spread:.3f} (bootstrap std)" if spread is not None else "")
    rows = [("images", f"{result['n_images']}"), ("FID", fid),
            ("LPIPS", f"{result['lpips']:.4f}"), ("PSNR (dB)", f"{result['psnr']:.3f}"),
            ("colourfulness", f"{result['colorfulness']:.3f}"),
            ("colourfulness (ground truth)", f"{result['colorfulness_real']:.3f}")]
    lines = ["| metric | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
    if result["small_set"]:
        lines.append(f"\nNote: FID on {result['n_images']} images (< {SMALL_SET}) is biased upwards and noisy.")
    return "\n".join(lines)


def retrieval_table(r: dict) -> str:
    """evaluate_retrieval's result as a Markdown table."""
    accs = [k for k in r if k.startswith("acc@")]
    lines = ["| metric | value |", "| --- | --- |", f"| images | {r['n_images']} |",
             f"| written slots | {r['written_slots']} |",
             f"| distinct slots retrieved | {r['distinct_answers']} |",
             f"| KL(retrieved, own), mean / median (nats) | {r['retrieval_kl']:.3f} / {r['retrieval_kl_median']:.3f} |",
             f"| KL of a random written slot (chance) | {r['chance_kl']:.3f} |",
             f"| KL of the best written slot (oracle) | {r['oracle_kl']:.3f} |"]
    for suffix, label in (("_rev", "KL(own, retrieved)"), ("_js", "Jensen-Shannon")):
        if f"retrieval_kl{suffix}" in r:
            lines.append(f"| {label}: retrieved / random slot / best slot | {r[f'retrieval_kl{suffix}']:.3f} / "
                         f"{r[f'chance_kl{suffix}']:.3f} / {r[f'oracle_kl{suffix}']:.3f} |")
    lines += [f"| accuracy at KL < {k[4:]} | {r[k]:.3f} |" for k in accs]
    return "\n".join(lines)


def evaluate_checkpoint(checkpoint: str | Path, pattern: str, output: str | Path, *, retrieval: bool = False,
                        memory: str | None = None, memory_name: str | None = None,
                        memory_from: str | Path | None = None, device: str | None = None,
                        batch_size: int = 16, retrieval_options: list[str] | tuple[str, ...] = (),
                        **image_options) -> dict:
    """launch/evaluate.py: score a checkpoint (or with `retrieval` its memory), write JSON, print a table.

    retrieval_options: "key=value" overrides of the checkpoint's `retrieval:` section (k=8, mix=geometric).
    """
    options = retrieval_overrides(checkpoint, retrieval_options) if retrieval_options else None
    with Colorizer(checkpoint, device=device, memory=memory, memory_name=memory_name, need_memory=retrieval,
                   memory_from=memory_from, retrieval=options) as col:
        if retrieval:
            result, table = evaluate_retrieval(col, pattern, batch_size), retrieval_table
        else:
            result, table = evaluate_images(col, pattern, batch_size, **image_options), markdown_table
    result["retrieval"] = dataclasses.asdict(col.retrieval)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwritten {out}")
    return result


def retrieval_overrides(checkpoint: str | Path, overrides: list[str] | tuple[str, ...]) -> RetrievalOptions:
    """The checkpoint's retrieval settings with "key=value" overrides, validated as the config is."""
    from trainer.checkpoint import load_for_inference

    return RetrievalOptions.of(retrieval_with(load_for_inference(checkpoint)["config"], overrides))
