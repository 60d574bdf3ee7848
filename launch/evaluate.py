"""Score a checkpoint on a test split: FID (with the number of images), LPIPS, PSNR, colourfulness.

    python launch/evaluate.py --checkpoint runs/x --data 'data/shards/pokemon/test-{000000..000000}.tar' \
        --output runs/x/eval_test.json [--baseline gray]

Images are prepared exactly as in training (composited, centre-cropped, resized to the model's size);
the colour feature is retrieved from the checkpoint's memory (or --memory). Writes JSON with keys fid,
lpips, psnr, colorfulness, n_images and prints a Markdown table. `--baseline gray` scores the trivial
ab = 0 output instead of the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# FID on fewer images than this is strongly biased (METHOD.md 8.3); flagged, never hidden.
SMALL_SET = 200


def markdown_table(result: dict) -> str:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or a run's out_dir (latest)")
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
    parser.add_argument("--bootstrap", type=int, default=100, metavar="N",
                        help="resample the test images N times for the spread of FID (0: off; default 100)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when present)")
    args = parser.parse_args(argv)
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.color_feature == "own" and args.baseline == "gray":
        parser.error("--color-feature own has no effect with --baseline gray")

    import torch
    from tqdm import tqdm

    from pccnet import metrics
    from pccnet.color import lab_from_network, lab_to_rgb
    from trainer.data import DataError, make_eval_loader
    from trainer.inference import USER_ERRORS, Colorizer

    try:
        col = Colorizer(args.checkpoint, device=args.device, memory=args.memory, memory_name=args.memory_name,
                        need_memory=args.retrieval, memory_from=args.memory_from)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.retrieval:
        try:
            result = evaluate_retrieval(col, args.data, args.batch_size)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            col.close()
        return write_result(result, Path(args.output), retrieval_table(result))
    try:
        data_cfg = col.cfg.data
        data_cfg.batch_size = args.batch_size
        data_cfg.workers = min(data_cfg.workers, 2)
        preds, reals = [], []
        psnr, lp, colorful, colorful_real = [], [], [], []
        try:
            loader = make_eval_loader(args.data, data_cfg, 0, 1)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for batch in tqdm(loader, desc="evaluate", unit="batch"):
            light = batch["light"].to(col.device)
            real_ab = batch["ab"].to(col.device)
            if args.baseline == "gray":
                fake_ab = torch.zeros_like(real_ab)
            else:
                own = batch["color_feature"] if args.color_feature == "own" else None
                fake_ab = col.predict_ab(light, own)
            pred = lab_to_rgb(lab_from_network(light, fake_ab)).cpu()
            real = lab_to_rgb(lab_from_network(light, real_ab)).cpu()
            psnr.append(metrics.psnr(pred, real))
            lp.append(metrics.lpips(pred, real))
            colorful.append(metrics.colorfulness(pred))
            colorful_real.append(metrics.colorfulness(real))
            # Features, not images, are kept: memory stays flat however large the test set.
            preds.append(metrics.fid_features(pred, device=col.device))
            reals.append(metrics.fid_features(real, device=col.device))
        n = sum(p.shape[0] for p in preds)
        if n < 2:
            print(f"error: {args.data} holds {n} image(s); every metric needs at least 2", file=sys.stderr)
            return 2
        import numpy as np

        preds, reals = np.concatenate(preds), np.concatenate(reals)
        fid = metrics.fid_from_features(preds, reals)
        boot = bootstrap_fid(preds, reals, args.bootstrap)
        result = {
            "fid": fid,
            "lpips": float(torch.cat(lp).mean()),
            "psnr": float(torch.cat(psnr).mean()),
            "colorfulness": float(torch.cat(colorful).mean()),
            "colorfulness_real": float(torch.cat(colorful_real).mean()),
            "n_images": n,
            # Standard deviation of FID over resamplings of the test images: how far apart two rows
            # must be before the order means anything.
            "fid_bootstrap_std": float(np.std(boot)) if boot else None,
            "fid_bootstrap_n": len(boot),
            "small_set": n < SMALL_SET,
            "image_size": col.image_size,
            "background": col.background,
            "checkpoint": str(col.path),
            "memory_from": str(col.memory_source),
            "data": args.data,
            "baseline": args.baseline,
            "color_feature": args.color_feature,
        }
    finally:
        col.close()
    return write_result(result, Path(args.output), markdown_table(result))


def bootstrap_fid(preds, reals, n_resamples: int, seed: int = 0) -> list[float]:
    """FID of n_resamples resamplings (with replacement) of the test images; pairs stay together."""
    import numpy as np

    from pccnet import metrics

    rng = np.random.default_rng(seed)
    n = preds.shape[0]
    return [metrics.fid_from_features(preds[idx], reals[idx])
            for idx in (rng.integers(0, n, n) for _ in range(n_resamples))]


def write_result(result: dict, out: Path, table: str) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    print(f"\nwritten {out}")
    return 0


RETRIEVAL_THRESHOLDS = (0.5, 1.0, 1.5)


def evaluate_retrieval(col, pattern: str, batch_size: int) -> dict:
    """KL(retrieved || own) per test image, against a random written slot (chance) and the best one (oracle)."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from pccnet.losses import kl_divergence
    from trainer.data import make_eval_loader

    exported = col.client.export(memory=col.memory_name)
    written = torch.from_numpy(exported["values"][exported["item_ids"] >= 0]).double()  # [n, 313]
    if written.shape[0] == 0:
        raise ValueError(f"memory {col.memory_name!r} of {col.path} holds no written slot")
    data_cfg = col.cfg.data
    data_cfg.batch_size = batch_size
    got, chance, oracle, slots = [], [], [], []
    for batch in tqdm(make_eval_loader(pattern, data_cfg, 0, 1), desc="retrieval", unit="batch"):
        target = batch["color_feature"].double()  # [B, 313]
        retrieved, picked = col.retrieve(batch["light"], return_slots=True)
        retrieved = retrieved.cpu().double()
        slots.append(picked)
        got.append(kl_divergence(retrieved, target))
        every = kl_divergence(written[None], target[:, None])  # [B, n]: each written value vs each image
        chance.append(every.mean(1))
        oracle.append(every.min(1).values)
    got, chance, oracle = (torch.cat(x).numpy() for x in (got, chance, oracle))
    result = {
        "retrieval_kl": float(got.mean()), "retrieval_kl_median": float(np.median(got)),
        "chance_kl": float(chance.mean()), "oracle_kl": float(oracle.mean()),
        "n_images": int(got.shape[0]), "written_slots": int(written.shape[0]),
        # How many different slots answered: 1 means every image got the same colours.
        "distinct_answers": int(np.unique(np.concatenate(slots)).size),
        "threshold": col.cfg.phase1.threshold, "extractor": col.cfg.model.extractor,
        "checkpoint": str(col.path), "data": pattern,
    }
    for t in sorted(set(RETRIEVAL_THRESHOLDS) | {col.cfg.phase1.threshold}):
        result[f"acc@{t:g}"] = float((got < t).mean())
    return result


def retrieval_table(r: dict) -> str:
    accs = [k for k in r if k.startswith("acc@")]
    lines = ["| metric | value |", "| --- | --- |", f"| images | {r['n_images']} |",
             f"| written slots | {r['written_slots']} |",
             f"| distinct slots retrieved | {r['distinct_answers']} |",
             f"| KL(retrieved, own), mean / median (nats) | {r['retrieval_kl']:.3f} / {r['retrieval_kl_median']:.3f} |",
             f"| KL of a random written slot (chance) | {r['chance_kl']:.3f} |",
             f"| KL of the best written slot (oracle) | {r['oracle_kl']:.3f} |"]
    lines += [f"| accuracy at KL < {k[4:]} | {r[k]:.3f} |" for k in accs]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
