"""Colorizing big folders: the input tree mirrored in the output, work already done skipped, a manifest.

Each input's PNG goes to the same place below the output folder as the input has below the inputs'
common folder, so equal names in different folders never collide (x.jpg beside x.png in one folder
become x.jpg.png and x.png.png). An output that exists is skipped unless `overwrite`; outputs are
written under a temporary name and renamed, so a killed run never leaves a half-written PNG that a
re-run would skip. manifest.csv lists input, output, memory, slot and similarity per output; rows are
appended as images finish (a killed run keeps them) and the file is rewritten sorted at the end.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from tqdm import tqdm

from trainer.images import load_rgb

if TYPE_CHECKING:
    from trainer.inference import Colorizer

MANIFEST = "manifest.csv"
FIELDS = ("input", "output", "memory", "slot", "similarity")


def output_paths(paths: list[Path]) -> list[Path]:
    """Where each input's PNG goes, relative to the output folder (the input tree mirrored)."""
    if not paths:
        return []
    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([r.parent for r in resolved]))
    stems = Counter((r.parent, r.stem.lower()) for r in resolved)
    out = []
    for r in resolved:
        name = f"{r.stem}.png" if stems[(r.parent, r.stem.lower())] == 1 else f"{r.name}.png"
        out.append(r.parent.relative_to(root) / name)
    return out


def read_manifest(path: Path) -> dict[str, dict[str, str]]:
    """{output: row} of an existing manifest (the last row per output wins); {} when there is none."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["output"]: row for row in csv.DictReader(f) if row.get("output")}


def _write_manifest(path: Path, rows: dict[str, dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows[k] for k in sorted(rows))
    os.replace(tmp, path)


def _save_png(arr, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, target)


def colorize_files(col: Colorizer, paths: list[Path], out_dir: str | Path, batch_size: int = 8,
                   overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Colour PNGs of `paths` below out_dir; returns {'written', 'skipped', 'failed': [(path, reason)],
    'manifest'}. A progress bar shows images per second."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rels = output_paths(paths)
    manifest_path = out_dir / MANIFEST
    rows = read_manifest(manifest_path)
    todo = [i for i, rel in enumerate(rels) if overwrite or not (out_dir / rel).is_file()]
    for i in set(range(len(paths))) - set(todo):  # written by an earlier run: keep (or start) its row
        rows.setdefault(rels[i].as_posix(), {"input": str(paths[i]), "output": rels[i].as_posix(), "memory": "",
                                             "slot": "", "similarity": ""})
    failed, written = [], 0
    fresh = not manifest_path.is_file()
    with open(manifest_path, "a", newline="") as mf, \
            tqdm(total=len(todo), desc="colorize", unit="img", disable=not progress) as bar:
        log = csv.DictWriter(mf, FIELDS)
        if fresh:
            log.writeheader()
        for start in range(0, len(todo), batch_size):
            chunk, images = [], []
            for i in todo[start:start + batch_size]:
                try:
                    images.append(load_rgb(paths[i], background=col.background))
                    chunk.append(i)
                except Exception as e:  # noqa: BLE001 - report unreadable inputs by name and go on
                    failed.append((paths[i], str(e)))
            arrays, answers = col.colorize_images(images, with_answers=True)
            for i, arr, answer in zip(chunk, arrays, answers):
                _save_png(arr, out_dir / rels[i])
                row = {"input": str(paths[i]), "output": rels[i].as_posix(), "memory": col.memory_label,
                       "slot": "" if answer["slot"] is None else answer["slot"],
                       "similarity": "" if answer["similarity"] is None else answer["similarity"]}
                rows[row["output"]] = row
                log.writerow(row)
                written += 1
            mf.flush()
            bar.update(len(todo[start:start + batch_size]))
    _write_manifest(manifest_path, rows)
    return {"written": written, "skipped": len(paths) - len(todo), "failed": failed, "manifest": manifest_path}
