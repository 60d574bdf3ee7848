"""Several trainings of one recipe: where each seed's runs live, and what the rows score across seeds.

A row's FID spread (the bootstrap over test images) says how sure the FID is for one trained model. Two
trainings of the same recipe differ far more at CPU scale (flowers every-10th, phase 2 with seed 0 and
1: FID 55.7 and 44.0, docs/RESULTS.md), so ordering two recipes needs several seeds per arm. The
commands of launch/results.py and launch/fewshot.py take `--seeds`; each seed's phase 2 starts from the
one shared phase-1 checkpoint with `run.seed=<seed>` (data order, blend draws, patch draws), and this
module summarises the rows over the seeds. Imports numpy only at import time (the launch scripts
import it before torch).
"""

from __future__ import annotations

import argparse

import numpy as np

METRICS = ("fid", "lpips", "psnr", "colorfulness")


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; ValueError naming the text for anything else (negative, repeated, empty)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers >= 0, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct integers >= 0, got {text!r}")
    return seeds


def seeds_arg(text: str) -> list[int]:
    """parse_seeds as an argparse `type`: the error is reported as the option's own usage error."""
    try:
        return parse_seeds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main_seed(seeds: list[int], config_seed: int) -> int:
    """The seed whose rows make the single-seed table (and results.json): the config's when asked for."""
    return config_seed if config_seed in seeds else seeds[0]


def run_name(row: str, seed: int, config_seed: int) -> str:
    """The folder (and eval-file stem) of a row trained with `seed`: the plain row name for the config's
    own seed, so single-seed results stay where they always were, else '<row>-seed<seed>'."""
    return row if seed == config_seed else f"{row}-seed{seed}"


def seed_overrides(seed: int, config_seed: int) -> list[str]:
    return [] if seed == config_seed else [f"run.seed={seed}"]


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample sd; the sd of one value is None (JSON null, where NaN would not be valid JSON)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else None


def summarize(per_seed: dict[int, dict[str, dict]], reference: str) -> dict[str, dict]:
    """{seed: {row: scores}} -> {row: summary}, rows in the order of the first seed that has them.

    Each summary: the seeds it was scored for, mean and sample sd over seeds of every metric, the
    per-seed FIDs, and against the `reference` row *of the same seed* (when both were scored on the same
    resampled images): the per-seed FID differences with their paired bootstrap spreads, their mean
    and sd over seeds, and in how many seeds the row is lower by more than two paired spreads.
    """
    from trainer.evaluation import paired_fid_delta

    order: list[str] = []
    for rows in per_seed.values():
        order += [r for r in rows if r not in order]
    out: dict[str, dict] = {}
    for row in order:
        seeds = [s for s, rows in per_seed.items() if row in rows]
        scores = [per_seed[s][row] for s in seeds]
        summary: dict = {"seeds": seeds, "fid_per_seed": [float(r["fid"]) for r in scores]}
        for m in METRICS:
            summary[m], summary[f"{m}_sd"] = _mean_sd([float(r[m]) for r in scores])
        if row != reference:
            deltas = []
            for s in seeds:
                ref = per_seed[s].get(reference)
                paired = paired_fid_delta(per_seed[s][row], ref) if ref is not None else None
                if paired is not None:
                    deltas.append((s, *paired))
            if deltas:
                d = [x[1] for x in deltas]
                summary["delta_fid"], summary["delta_fid_sd"] = _mean_sd(d)
                summary["delta_per_seed"] = [{"seed": s, "delta": dv, "paired_std": sd} for s, dv, sd in deltas]
                summary["lower_by_two_spreads"] = sum(dv < -2 * sd for _, dv, sd in deltas)
        out[row] = summary
    return out


def _pm(mean: float, sd: float | None, digits: int, sign: str = "") -> str:
    text = f"{mean:{sign}.{digits}f}"
    return text if sd is None else f"{text} ± {sd:.{digits}f}"


def table(summary: dict[str, dict], labels: dict[str, str], reference: str) -> str:
    """The across-seed Markdown table; ± is the sample sd over seeds (training variance), not a bootstrap."""
    ref = labels.get(reference, reference)
    lines = [f"| row | seeds | FID (mean ± sd over seeds) | FID per seed | ΔFID vs {ref}, mean ± sd over seeds "
             "| seeds lower by > 2 paired spreads | LPIPS | PSNR | colourful |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row, s in summary.items():
        delta = _pm(s["delta_fid"], s["delta_fid_sd"], 2, "+") if "delta_fid" in s else ""
        wins = f"{s['lower_by_two_spreads']} of {len(s['delta_per_seed'])}" if "delta_fid" in s else ""
        lines.append(f"| {labels.get(row, row)} | {','.join(map(str, s['seeds']))} | {_pm(s['fid'], s['fid_sd'], 2)} "
                     f"| {' / '.join(f'{f:.2f}' for f in s['fid_per_seed'])} | {delta} | {wins} "
                     f"| {_pm(s['lpips'], s['lpips_sd'], 4)} | {_pm(s['psnr'], s['psnr_sd'], 2)} "
                     f"| {_pm(s['colorfulness'], s['colorfulness_sd'], 1)} |")
    return "\n".join(lines)
