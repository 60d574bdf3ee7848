"""`make shards`: the shared data sets (../shared/data) as train/test WebDataset shards under data/shards/.

Sets built: pokemon every-10th and alternate-form splits, flowers102 64-px every-10th split, and the
full-resolution Udacity flowers every-10th split (METHOD.md 8.4). A set whose manifest and shards are
already there is skipped, so a second run only checks. Prints one summary table.

  python launch/prepare_shared_data.py [--shared DIR] [--output DIR] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.shards import ShardError, write_shards

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Split:
    name: str  # output folder under data/shards/
    prefix: str  # "train" | "test"
    list_file: str  # relative to the shared data folder
    root: str  # folder the list's names are relative to
    samples_per_shard: int
    # Every VAL_EVERY-th name of the list ("val"), or all the others ("rest"): a validation split cut
    # from a training list (the few-shot base classes), so settings are chosen without the test images.
    take: str = "all"


VAL_EVERY = 20


def _select(names: list[str], take: str) -> list[str]:
    if take == "all":
        return names
    if take not in ("val", "rest"):
        raise ValueError(f"Split.take must be 'all', 'val' or 'rest', got {take!r}")
    return [n for i, n in enumerate(names) if (i % VAL_EVERY == VAL_EVERY - 1) == (take == "val")]


def _splits() -> list[Split]:
    # Shard sizes give every split several shards, so 2 ranks x 2 workers can all read in evaluation.
    out = []
    for split in ("train", "test"):
        per = 64 if split == "train" else 16
        out += [
            Split("pokemon_every10", split, f"pokemon/split_every10_{split}.txt", "pokemon/images", per),
            Split("pokemon_altform", split, f"pokemon/split_altform_{split}.txt", "pokemon/images", per),
            Split("flowers64_every10", split, f"flowers102/split_all_64px_every10_{split}.txt",
                  "flowers102/all_64px", 512 if split == "train" else 128),
            Split("flowers_udacity_every10", split, f"flowers102/split_test_udacity_every10_{split}.txt",
                  "flowers102/test_udacity", per),
        ]
    # Few-shot protocol (flowers102/MANIFEST.md): base classes only; 1 in 20 base images held out for validation.
    base = "flowers102/split_fewshot_base_train.txt"
    out += [Split("flowers64_fewshot_base", "train", base, "flowers102/all_64px", 512, "rest"),
            Split("flowers64_fewshot_base", "val", base, "flowers102/all_64px", 128, "val")]
    return sorted(out, key=lambda s: (s.name, s.prefix != "train"))


def shared_data_dir(explicit: str | None = None) -> Path:
    """The shared data folder: --shared, else $PCCNET_SHARED_DATA, else <repo>/../shared/data."""
    candidate = explicit or os.environ.get("PCCNET_SHARED_DATA") or str(REPO.parent / "shared" / "data")
    path = Path(candidate).expanduser()
    if not (path / "pokemon").is_dir() or not (path / "flowers102").is_dir():
        raise SystemExit(
            f"prepare_shared_data: shared data not found at {str(path)!r} (needs pokemon/ and flowers102/); "
            "pass --shared DIR or set PCCNET_SHARED_DATA"
        )
    return path


def _up_to_date(out: Path, prefix: str) -> dict | None:
    """The existing manifest if it and every shard it lists (with its recorded size) are present."""
    path = out / f"{prefix}-manifest.json"
    try:
        manifest = json.loads(path.read_text())
        for shard in manifest["shards"]:
            if (out / shard["name"]).stat().st_size != shard["bytes"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare(shared: Path, output: Path, workers: int, force: bool) -> int:
    """Build (or check) every split under `output`; print one summary table. 1 when a split fails."""
    rows = []
    for split in _splits():
        out = output / split.name
        manifest = None if force else _up_to_date(out, split.prefix)
        status = "exists"
        started = time.perf_counter()
        if manifest is None:
            try:
                list_file = shared / split.list_file
                if split.take != "all":  # the derived list is kept beside the shards it made
                    out.mkdir(parents=True, exist_ok=True)
                    names = [n.strip() for n in list_file.read_text().splitlines() if n.strip()]
                    derived = out / f"{split.prefix}-list.txt"
                    derived.write_text("".join(f"{shared / split.root / n}\n" for n in _select(names, split.take)))
                    list_file = derived
                manifest = write_shards([str(list_file)], out, split.prefix,
                                        split.samples_per_shard, 1 << 30, workers,
                                        root=str(shared / split.root), progress=sys.stderr.isatty())
            except ShardError as exn:
                print(f"prepare_shared_data: {split.name}/{split.prefix}: {exn}", file=sys.stderr)
                return 1
            status = f"built {time.perf_counter() - started:.1f}s"
        mb = sum(s["bytes"] for s in manifest["shards"]) / 1e6
        pattern = os.path.relpath(out / manifest["pattern"], REPO) if out.is_relative_to(REPO) else str(
            out / manifest["pattern"])
        rows.append((split.name, split.prefix, manifest["total"], len(manifest["skipped"]),
                     len(manifest["shards"]), f"{mb:.1f}", status, pattern))
    header = ("set", "split", "samples", "skipped", "shards", "MB", "status", "pattern")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=None, help="shared data folder (default: ../shared/data)")
    parser.add_argument("--output", default=str(REPO / "data" / "shards"), help="default: data/shards/")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--force", action="store_true", help="rebuild sets that already exist")
    args = parser.parse_args(argv)
    return prepare(shared_data_dir(args.shared), Path(args.output), args.workers, args.force)


if __name__ == "__main__":
    sys.exit(main())
