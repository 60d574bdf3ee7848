"""The few-shot scoreboard (launch/fewshot.py): does a live few-shot memory colour a new domain at once?

Protocol (flowers102/MANIFEST.md, "Few-shot split"): train on the base classes only; for each novel
class its first K images (in the novel file's order) are exemplars, memorized with `memorize` (no
gradient step) into named memories on a live memory server; the novel images after the largest K are
the test images of every row, so all rows and all K are scored on the same images. Memories:

- `base`: the trained (phase-1) memory alone: zero-shot;
- `base-K<K>`: the trained memory plus every novel class's K exemplars in one memory (a shared server);
- `novel-K<K>`: the novel exemplars alone (a per-domain memory).

Data files: a base list (one image name a line) and a `label<TAB>image` novel file, names relative
to an images folder. Everything the command makes lives under its root folder and finished steps are
skipped, so a second call only re-prints the table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from memory_server.client import MemoryClient
from memory_server.launcher import start_server
from pccnet.color import NUM_BINS, gray_rgb, lab_from_network, lab_to_rgb
from trainer.checkpoint import load_for_inference, restore_memory
from trainer.config import FewshotConfig, TrainConfig
from trainer.evaluation import evaluate_images, evaluate_retrieval, paired_fid_delta
from trainer.exemplars import free_slots, memorize_images
from trainer.images import image_to_sample, load_rgb
from trainer.inference import Colorizer, load_extractor
from trainer.retrieval import RetrievalOptions
from trainer.shards import write_shards

log = logging.getLogger(__name__)

TRAINED_ROWS = ("full", "no_memory", "pix2pix")  # launch/results.py rows the scoreboard needs
# Part of every cached score's stamp: 2 added the per-resampling FIDs the paired spread needs.
SCORES_VERSION = 2


@dataclasses.dataclass(frozen=True)
class FewshotData:
    """The scoreboard's split of the novel file: exemplars per K and the shared test images."""

    base: list[str]  # base-class image names
    classes: dict[str, list[str]]  # label -> image names, in file order
    shots: tuple[int, ...]

    def exemplars(self, k: int) -> list[tuple[str, str]]:
        """(label, name) of every class's first k images."""
        return [(label, n) for label, names in self.classes.items() for n in names[:k]]

    def test(self) -> list[tuple[str, str]]:
        """(label, name) of every class's images after the largest K: the test images of every row."""
        first = max(self.shots)
        return [(label, n) for label, names in self.classes.items() for n in names[first:]]


def read_base_list(path: str | Path) -> list[str]:
    """One image name a line (blank lines and `#` comments skipped); ValueError when it names none."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"fewshot.base: list file {str(p)!r} does not exist")
    names = [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not names:
        raise ValueError(f"fewshot.base: {str(p)!r} lists no image")
    return names


def parse_novel(text: str, where: str = "novel file") -> dict[str, list[str]]:
    """`label<TAB>image` lines -> {label: [image, ...]} in file order; a `label<TAB>image` header is skipped.

    ValueError naming the line for a line without exactly one tab or with an empty field, and for an
    image listed twice.
    """
    classes: dict[str, list[str]] = {}
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ValueError(f"{where} line {number}: expected 'label<TAB>image', got {line!r}")
        label, name = parts[0].strip(), parts[1].strip()
        if number == 1 and (label, name) == ("label", "image"):
            continue
        if name in seen:
            raise ValueError(f"{where} line {number}: image {name!r} is listed twice")
        seen.add(name)
        classes.setdefault(label, []).append(name)
    if not classes:
        raise ValueError(f"{where} lists no image")
    return classes


def load_data(fs: FewshotConfig) -> FewshotData:
    """The base list and the novel file of the config; every novel class needs a test image after the largest K."""
    for key in ("base", "novel", "images"):
        if not getattr(fs, key):
            raise ValueError(f"fewshot.{key} is not set (in the config or on the command line)")
    if not Path(fs.images).is_dir():
        raise FileNotFoundError(f"fewshot.images: folder {fs.images!r} does not exist")
    novel = Path(fs.novel)
    if not novel.is_file():
        raise FileNotFoundError(f"fewshot.novel: file {str(novel)!r} does not exist")
    classes = parse_novel(novel.read_text(), f"fewshot.novel {str(novel)!r}")
    short = [f"{label} ({len(names)})" for label, names in classes.items() if len(names) <= max(fs.shots)]
    if short:
        raise ValueError(f"fewshot.novel: these classes have no image left to test after {max(fs.shots)} "
                         f"exemplars: {', '.join(short)}; lower fewshot.shots")
    return FewshotData(read_base_list(fs.base), classes, tuple(sorted(set(fs.shots))))


def _shards(names: list[str], images: Path, out: Path, prefix: str, per_shard: int) -> str:
    """Shards of these images under out/ (kept when the same list made them before); their pattern."""
    out.mkdir(parents=True, exist_ok=True)
    listing = "".join(f"{(images / n).resolve()}\n" for n in names)
    list_file, manifest = out / f"{prefix}-list.txt", out / f"{prefix}-manifest.json"
    if not (manifest.is_file() and list_file.is_file() and list_file.read_text() == listing):
        list_file.write_text(listing)
        write_shards([str(list_file)], out, prefix, per_shard, 1 << 30, 0, progress=False)
    found = json.loads(manifest.read_text())
    if found["skipped"]:
        log.warning("%s: %d image(s) could not be read and are left out: %s", prefix, len(found["skipped"]),
                    found["skipped"][:3])
    return str(out / found["pattern"])


def make_shards(data: FewshotData, fs: FewshotConfig, root: Path) -> dict[str, str]:
    """train / val (every val_every-th base image) / test (the novel test images) shard patterns."""
    images = Path(fs.images)
    every = fs.val_every
    val = [n for i, n in enumerate(data.base) if every and i % every == every - 1]
    train = [n for i, n in enumerate(data.base) if not (every and i % every == every - 1)]
    out = {"train": _shards(train, images, root / "shards", "train", 512),
           "test": _shards([n for _, n in data.test()], images, root / "shards", "test", 256)}
    if val:
        out["val"] = _shards(val, images, root / "shards", "val", 256)
    return out


class Memories:
    """A live memory server (a throwaway one in a temporary folder) holding the scoreboard's memories."""

    def __init__(self, phase1: Path, device: torch.device | str = "cpu", flip: bool = False) -> None:
        state = load_for_inference(phase1, map_location="cpu")
        if state["memory"] is None:
            raise ValueError(f"{phase1} holds no memory")
        self.saved = state["memory"]
        self.cfg: TrainConfig = state["config"]
        self.extractor = load_extractor(state, device)
        self.device = device
        self.flip = flip  # exemplar keys formed as the scoreboard's queries (retrieval.flip)
        self.tmp = tempfile.mkdtemp(prefix="pccnet-fewshot-")
        self.server = start_server(self.tmp, bind="tcp://127.0.0.1:0", durability="none")
        self.endpoint = self.server.endpoint
        self.client = MemoryClient(self.endpoint, timeout_ms=60000)

    def __enter__(self) -> Memories:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.client.close()
        finally:
            self.server.stop()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _create(self, name: str, capacity: int) -> None:
        self.client.create(capacity=capacity, key_dim=self.saved["keys"].shape[1], value_dim=NUM_BINS, memory=name)

    def base(self, name: str = "base", extra: int = 0) -> str:
        """The trained memory (plus `extra` free slots, taken first by memorize)."""
        n = self.saved["keys"].shape[0]
        self._create(name, n + extra)
        restore_memory(self.client, self.saved, name)
        if extra:
            free_slots(self.client, name, np.arange(n, n + extra), self.saved["keys"].shape[1])
        return name

    def memorize(self, name: str, paths: list[Path]) -> np.ndarray:
        """Exemplars written as memorize.py writes them: a slot each, no gradient step."""
        images = [load_rgb(p, self.cfg.data.background) for p in paths]
        slots = []
        for start in range(0, len(images), 256):  # the server takes at most a memory's capacity per update
            slots.append(memorize_images(self.extractor, self.client, name, images[start:start + 256],
                                         self.cfg.data.image_size, device=self.device, flip=self.flip))
        return np.concatenate(slots)

    def build(self, data: FewshotData, images: Path) -> dict[str, dict]:
        """Every memory of the scoreboard: name -> {'k': K or 0, 'kind': 'base'|'base+novel'|'novel'}."""
        out = {self.base(): {"k": 0, "kind": "base"}}
        for k in data.shots:
            paths = [images / n for _, n in data.exemplars(k)]
            name = self.base(f"base-K{k}", extra=len(paths))
            self.memorize(name, paths)
            out[name] = {"k": k, "kind": "base+novel"}
            name = f"novel-K{k}"
            self._create(name, len(paths))
            self.memorize(name, paths)
            out[name] = {"k": k, "kind": "novel"}
        return out


ROW_LABELS = {
    "base": "base memory only (zero-shot)",
    "base+novel": "base memory + novel exemplars (one shared memory)",
    "novel": "novel exemplars alone (per-domain memory)",
    "no_memory": "without M",
    "pix2pix": "cGAN + smooth L1 (Pix2Pix-like)",
    "oracle": "PCCNet, own colour feature (perfect memory)",
}


def row_key(row: dict) -> str:
    """A scored row's name across seeds: its memory's name for the memory rows, else the row."""
    return row["memory"] or row["row"]


def row_label(row: dict) -> str:
    return ROW_LABELS[row["row"]] + (f", K = {row['k']}" if row["k"] else "")


def _cached(path: Path, stamp: dict) -> dict | None:
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("stamp") == stamp:
            return old
    return None


def score(root: Path, ckpts: dict[str, Path], phase1: Path, memories: Memories | None, names: dict[str, dict],
          test: str, options: RetrievalOptions, bootstrap: int, batch_size: int = 32) -> list[dict]:
    """Every row of the scoreboard scored on the test shards (cached by what made it); the rows in table order."""
    rows = []
    reals: dict = {}  # the test images' FID features, computed once for every row
    out = root / "scores"
    out.mkdir(parents=True, exist_ok=True)
    opts = dataclasses.asdict(options)

    def one(key: str, stamp: dict, make) -> dict:
        # One file per row and what made it: scoring with other retrieval options keeps both.
        digest = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:10]
        path = out / f"{key}-{digest}.json"
        found = _cached(path, stamp)
        if found is None:
            found = dict(make(), stamp=stamp)
            path.write_text(json.dumps(found, indent=2) + "\n")
        return found

    for name, what in names.items():
        stamp = {"checkpoint": str(ckpts["full"]), "memory_from": str(phase1), "memory": name, "retrieval": opts,
                 "data": test, "bootstrap": bootstrap, "scores": SCORES_VERSION,
                 "exemplar_keys": "flip" if memories.flip else "plain"}

        def run_memory(name=name):
            with Colorizer(ckpts["full"], memory=memories.endpoint, memory_name=name, memory_from=phase1,
                           retrieval=options, device=memories.device) as col:
                result = evaluate_images(col, test, batch_size, bootstrap=bootstrap, real_cache=reals)
                result["retrieval_scores"] = evaluate_retrieval(col, test, batch_size)
            return result

        rows.append(dict(one(name, stamp, run_memory), row=what["kind"], k=what["k"], memory=name))
    for row, extra in (("no_memory", {}), ("pix2pix", {}), ("oracle", {"color_feature": "own"})):
        ckpt = ckpts["full" if row == "oracle" else row] if (row == "oracle" or row in ckpts) else None
        if ckpt is None:
            continue
        stamp = {"checkpoint": str(ckpt), "data": test, "bootstrap": bootstrap, "scores": SCORES_VERSION, **extra}

        def run_plain(ckpt=ckpt, extra=extra):
            with Colorizer(ckpt, device=memories.device if memories else None, memory_from=phase1) as col:
                return evaluate_images(col, test, batch_size, bootstrap=bootstrap, real_cache=reals, **extra)

        rows.append(dict(one(row, stamp, run_plain), row=row, k=None, memory=None))
    return rows


def table(rows: list[dict], title: str) -> str:
    """The scoreboard as Markdown: one line per row, K and the retrieval KL where a memory answers."""
    base = next((r for r in rows if r["row"] == "base"), None)
    lines = [title, "",
             "| row | K | FID ↓ (± bootstrap std) | ΔFID vs base only (± paired std) | LPIPS ↓ | PSNR ↑ | colourful ↑ "
             "| KL(retrieved, own) / random / best slot | JS retrieved / random / best |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        spread = f" ± {r['fid_bootstrap_std']:.2f}" if r.get("fid_bootstrap_std") is not None else ""
        paired = paired_fid_delta(r, base) if base is not None and r is not base else None
        delta = f"{paired[0]:+.2f} ± {paired[1]:.2f}" if paired else ""
        ret = r.get("retrieval_scores")
        kl = (f"{ret['retrieval_kl']:.3f} / {ret['chance_kl']:.3f} / {ret['oracle_kl']:.3f}" if ret else "")
        js = (f"{ret['retrieval_kl_js']:.3f} / {ret['chance_kl_js']:.3f} / {ret['oracle_kl_js']:.3f}" if ret else "")
        k = "" if r["k"] is None else str(r["k"])
        lines.append(f"| {ROW_LABELS[r['row']]} | {k} | {r['fid']:.2f}{spread} | {delta} | {r['lpips']:.4f} | "
                     f"{r['psnr']:.2f} | {r['colorfulness']:.2f} | {kl} | {js} |")
    n = rows[0]["n_images"] if rows else 0
    truth = rows[0].get("colorfulness_real") if rows else None
    lines.append("")
    lines.append(f"{n} novel-class test images" + (f"; ground-truth colourfulness {truth:.2f}." if truth else ".")
                 + " ΔFID: the row's FID minus base only's on the same images; its spread is the standard deviation"
                 " of that difference over the same bootstrap resamplings (paired), so it shows whether the"
                 " two rows differ beyond the choice of test images.")
    return "\n".join(lines)


@torch.no_grad()
def figure(out: Path, data: FewshotData, images: Path, full: Path, phase1: Path, memories: Memories,
           options: RetrievalOptions, n_images: int = 8, kind: str = "base+novel") -> None:
    """gray | one column per K (memory of `kind`) | truth, for the first test image of n_images classes
    spread evenly over the novel classes."""
    from launch.results import write_sheet

    labels = list(data.classes)
    pick = [labels[i * len(labels) // min(n_images, len(labels))] for i in range(min(n_images, len(labels)))]
    first = max(data.shots)
    samples = [image_to_sample(load_rgb(images / data.classes[label][first], memories.cfg.data.background),
                               memories.cfg.data.image_size) for label in pick]
    light = torch.stack([s["light"] for s in samples])
    ab = torch.stack([s["ab"] for s in samples])
    columns = [("gray input", gray_rgb(light))]
    for k in data.shots:
        name = "base" if kind == "base" else (f"base-K{k}" if kind == "base+novel" else f"novel-K{k}")
        with Colorizer(full, memory=memories.endpoint, memory_name=name, memory_from=phase1, retrieval=options,
                       device="cpu") as col:
            columns.append((f"K = {k}", lab_to_rgb(lab_from_network(light, col.predict_ab(light).cpu()))))
    columns.append(("ground truth", lab_to_rgb(lab_from_network(light, ab))))
    write_sheet(columns, out)
