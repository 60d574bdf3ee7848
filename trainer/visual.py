"""PNG outputs for people watching a run: sample grids (gray | result | ground truth) and loss curves.

Drawn with Pillow only (no matplotlib dependency): a line chart per loss with min/max labels.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from pccnet.color import gray_rgb, lab_from_network, lab_to_rgb
from trainer.stats import read_jsonl


def to_uint8(rgb: Tensor) -> np.ndarray:
    """[B,3,H,W] in [0,1] -> [B,H,W,3] uint8 (rounded)."""
    return (rgb.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def colorized_rgb(light: Tensor, ab: Tensor) -> Tensor:
    """Network-scaled light and ab -> sRGB [B,3,H,W] in [0,1]."""
    return lab_to_rgb(lab_from_network(light.float(), ab.float()))


def save_sample_grid(path: str | Path, light: Tensor, fake_ab: Tensor, real_ab: Tensor | None) -> Path:
    """One row per image: gray input | result | ground truth (when given)."""
    columns = [gray_rgb(light.float()), colorized_rgb(light, fake_ab)]
    if real_ab is not None:
        columns.append(colorized_rgb(light, real_ab))
    tiles = [to_uint8(c) for c in columns]  # each [B,H,W,3]
    b, h, w, _ = tiles[0].shape
    pad = 2
    canvas = np.full((b * (h + pad) + pad, len(tiles) * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(b):
        for j, t in enumerate(tiles):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = t[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def plot_curves(series: dict[str, list[tuple[float, float]]], path: str | Path, width: int = 360,
                height: int = 180) -> Path | None:
    """Small multiples: one panel per series of (step, value); returns None when nothing to draw."""
    series = {k: [(x, y) for x, y in v if y is not None and math.isfinite(y)] for k, v in series.items()}
    series = {k: v for k, v in series.items() if len(v) >= 2}
    if not series:
        return None
    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    img = Image.new("RGB", (cols * width, rows * height), "white")
    draw = ImageDraw.Draw(img)
    margin_l, margin_r, margin_t, margin_b = 48, 10, 18, 20
    for idx, (name, pts) in enumerate(sorted(series.items())):
        ox, oy = (idx % cols) * width, (idx // cols) * height
        xs = np.array([p[0] for p in pts], dtype=np.float64)
        ys = np.array([p[1] for p in pts], dtype=np.float64)
        x0, x1 = xs.min(), xs.max() if xs.max() > xs.min() else xs.min() + 1
        y0, y1 = ys.min(), ys.max() if ys.max() > ys.min() else ys.min() + 1
        left, right = ox + margin_l, ox + width - margin_r
        top, bottom = oy + margin_t, oy + height - margin_b
        draw.rectangle([left, top, right, bottom], outline=(180, 180, 180))
        px = left + (xs - x0) / (x1 - x0) * (right - left)
        py = bottom - (ys - y0) / (y1 - y0) * (bottom - top)
        draw.line(list(zip(px.tolist(), py.tolist())), fill=(31, 119, 180), width=2)
        draw.text((ox + 4, oy + 2), name, fill=(0, 0, 0))
        draw.text((ox + 2, top), f"{y1:.3g}", fill=(90, 90, 90))
        draw.text((ox + 2, bottom - 10), f"{y0:.3g}", fill=(90, 90, 90))
        draw.text((left, bottom + 4), f"{x0:.0f}", fill=(90, 90, 90))
        draw.text((right - 40, bottom + 4), f"{x1:.0f}", fill=(90, 90, 90))
    path = Path(path)
    img.save(path)
    return path


def plot_run_curves(stats_jsonl: str | Path, path: str | Path) -> Path | None:
    """loss_curves.png of a run: every loss/, mem/ and val/ series of its stats.jsonl against the step."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for row in read_jsonl(stats_jsonl) if Path(stats_jsonl).is_file() else []:
        for k, v in row.items():
            if k.startswith(("loss/", "mem/", "val/")) and isinstance(v, (int, float)):
                curves.setdefault(k, []).append((row["step"], v))
    return plot_curves(curves, path)
