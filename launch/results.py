"""Reproduce docs/RESULTS.md: PCCNet, its ablations and two baselines at equal budget, on one data set.

    python launch/results.py --config configs/pokemon_every10_cpu.yaml            # every row
    python launch/results.py --config configs/pokemon_every10_cpu.yaml --rows full,gray
    python launch/results.py --config configs/pokemon_every10_cpu.yaml --backbones  # phase-1 retrieval
    python launch/results.py --config configs/flowers64_cpu.yaml --rows full,no_memory --seeds 0,1,2

Phase 1 (the colour memory) is trained once per data set; every row's phase 2 then starts from that
same checkpoint (`launch/train.py --resume <phase-1 checkpoint>`) with the row's overrides, so rows
differ only in what they ablate. Each row is evaluated on data.val with launch/evaluate.py. Finished
steps are skipped, so the command can be re-run after an interruption. Every command it runs is
printed and recorded in <root>/commands.txt. With --seeds, each trained row's phase 2 runs once per
seed (run.seed; <row>-seed<N>, the config's own seed in <row>) and a second table gives every row over
the seeds: at CPU scale two trainings of one recipe differ by far more than one model's bootstrap
spread, so only several seeds order two recipes (trainer.seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from launch.common import module_command, run_step
from pccnet.config import BACKBONES
from trainer import seeds as seeds_mod

REPO = Path(__file__).resolve().parents[1]

# Row name -> (label in the tables, train.py overrides). None: evaluated from "full", not trained.
ROWS = {
    "full": ("PCCNet (full)", []),
    "no_memory": ("without M", ["model.use_memory=false"]),
    "no_pc": ("without L_PC", ["loss.pc=0"]),
    "no_ic": ("without L_IC", ["loss.ic=0"]),
    "pix2pix": ("cGAN + smooth L1 (Pix2Pix-like)", ["model.use_memory=false", "loss.pc=0", "loss.ic=0"]),
    "gray": ("gray output (ab = 0)", None),
    "oracle": ("PCCNet, own colour feature (perfect memory)", None),
}
# evaluate.py arguments of the rows that are evaluated from the full model rather than trained.
EVAL_ONLY = {"gray": ["--baseline", "gray"], "oracle": ["--color-feature", "own"]}
RETRIEVING_ROWS = ("full", "no_pc", "no_ic")


def run(script: str, args: list[str], log: Path) -> None:
    run_step(module_command(script, *args), script, log, cwd=REPO)


def latest_checkpoint(run_dir: Path) -> Path | None:
    from trainer.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def phase1_name(cfg, extractor: str) -> str:
    """The memory depends on the backbone and on delta_1; a changed threshold trains a new one."""
    t = cfg.phase1.threshold
    return f"phase1-{extractor}-t{t if isinstance(t, str) else format(t, 'g')}"


def train_phase1(cfg_path: str, cfg, root: Path, name: str, extra: list[str], log: Path) -> Path:
    out = root / name
    ckpt = latest_checkpoint(out)
    if ckpt is None or int(ckpt.name.split("-")[1]) < cfg.phase1.steps:
        # The phase-1 settings come last: an override of phase2.steps must not make this run train phase 2.
        run("train", ["--config", cfg_path, f"run.out_dir={out}", *extra, "phase2.steps=0",
                      f"run.checkpoint_every={cfg.phase1.steps}"], log)
        ckpt = latest_checkpoint(out)
    return ckpt


def sample_sheet(cfg, root: Path, out: Path, n_images: int) -> int:
    """One row per test image: gray | each trained row's colorization | ground truth (PNG)."""
    from pccnet.color import gray_rgb, lab_from_network, lab_to_rgb
    from trainer.data import make_eval_loader
    from trainer.inference import Colorizer

    batch = next(iter(make_eval_loader(cfg.data.val, dataclasses.replace(cfg.data, batch_size=n_images), 0, 1)))
    light, real_ab = batch["light"][:n_images], batch["ab"][:n_images]
    short = {"full": "PCCNet", "no_memory": "w/o M", "no_pc": "w/o L_PC", "no_ic": "w/o L_IC", "pix2pix": "cGAN+L1"}
    columns = [("gray input", gray_rgb(light))]
    phase1 = latest_checkpoint(root / phase1_name(cfg, cfg.model.extractor.backbone))
    for row, (_, overrides) in ROWS.items():
        if overrides is None or latest_checkpoint(root / row) is None:
            continue
        # As in the tables: rows that retrieve use the shared phase-1 memory.
        memory_from = phase1 if row in RETRIEVING_ROWS else None
        with Colorizer(root / row, device="cpu", memory_from=memory_from) as col:
            columns.append((short[row], lab_to_rgb(lab_from_network(light, col.predict_ab(light)))))
            if row == "full":
                own = col.predict_ab(light, batch["color_feature"][:n_images])
                columns.append(("PCCNet, own c", lab_to_rgb(lab_from_network(light, own))))
    columns.append(("ground truth", lab_to_rgb(lab_from_network(light, real_ab))))
    write_sheet(columns, out)
    print(f"written {out} ({len(columns) - 2} colorized columns, {n_images} test images)")
    return 0


def write_sheet(columns: list, out: Path) -> None:
    """(label, RGB images [N,3,S,S] in [0,1]) columns -> one PNG, a labelled column each, tiles at 2x."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    n_images, side = columns[0][1].shape[0], columns[0][1].shape[-1]
    size, pad, head = side * 2, 4, 28
    sheet = Image.new("RGB", (len(columns) * (size + pad) + pad, head + n_images * (size + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, (label, rgb) in enumerate(columns):
        x = pad + j * (size + pad)
        draw.text((x, 4), label, fill=(0, 0, 0))
        tiles = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i, tile in enumerate(tiles):
            img = Image.fromarray(np.ascontiguousarray(tile)).resize((size, size), Image.NEAREST)
            sheet.paste(img, (x, head + i * (size + pad)))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def backbone_table(cfg_path: str, cfg, root: Path, overrides: list[str], log: Path) -> int:
    """Phase 1 with each backbone, its retrieval scored on data.val; backbones.json and a Markdown table."""
    table = {}
    for backbone in BACKBONES:
        name = phase1_name(cfg, backbone)
        ckpt = train_phase1(cfg_path, cfg, root, name, [*overrides, f"model.extractor.backbone={backbone}"], log)
        out = root / f"retrieval-{name[len('phase1-'):]}.json"
        if not out.is_file():
            run("evaluate", ["--checkpoint", str(ckpt), "--data", cfg.data.val, "--output", str(out), "--retrieval"],
                log)
        table[backbone] = json.loads(out.read_text())
    (root / "backbones.json").write_text(json.dumps(table, indent=2) + "\n")
    accs = sorted({k for r in table.values() for k in r if k.startswith("acc@")}, key=lambda k: float(k[4:]))
    print("\n| backbone | KL(retrieved, own) | chance | oracle | " + " | ".join(accs)
          + " | written slots | distinct answers |")
    print("| --- " * (6 + len(accs)) + "|")
    for k, r in table.items():
        print(f"| {k} | {r['retrieval_kl']:.3f} | {r['chance_kl']:.3f} | {r['oracle_kl']:.3f} | "
              + " | ".join(f"{r[a]:.3f}" for a in accs)
              + f" | {r['written_slots']} | {r.get('distinct_answers', '?')} |")
    return 0


def train_row(row: str, cfg_path: str, cfg, root: Path, phase1: Path, overrides: list[str], log: Path,
              seed: int | None = None) -> Path:
    """A trained row's phase 2 from the shared phase-1 checkpoint (skipped when done); its latest checkpoint.

    `seed` other than the config's run.seed: trained with run.seed=<seed> in <row>-seed<seed> (trainer.seeds)."""
    seed = cfg.run.seed if seed is None else seed
    out = root / seeds_mod.run_name(row, seed, cfg.run.seed)
    ckpt = latest_checkpoint(out)
    if ckpt is None or int(ckpt.name.split("-")[1]) < cfg.phase1.steps + cfg.phase2.steps:
        # Start from the shared phase-1 checkpoint, or go on from this row's own latest one.
        start = ["--resume", str(phase1)] if ckpt is None else ["--resume", "auto"]
        run("train", ["--config", cfg_path, *start, f"run.out_dir={out}", *overrides, *ROWS[row][1],
                      *seeds_mod.seed_overrides(seed, cfg.run.seed)], log)
        ckpt = latest_checkpoint(out)
    return ckpt


def score_row(row: str, cfg_path: str, cfg, root: Path, phase1: Path, overrides: list[str], log: Path,
              seed: int | None = None) -> dict:
    """Train a row (unless done or evaluated from 'full') and score it on data.val; its eval JSON."""
    label, row_overrides = ROWS[row]
    seed = cfg.run.seed if seed is None else seed
    eval_json = root / f"eval-{seeds_mod.run_name(row, seed, cfg.run.seed)}.json"
    if row_overrides is not None:
        train_row(row, cfg_path, cfg, root, phase1, overrides, log, seed)
    # Rows that retrieve are scored with the shared phase-1 memory: phase 2 does not read the memory (unless
    # phase2.feature_blend_towards is 'retrieved'), so a row trained before delta_1 was recalibrated is
    # re-scored, not retrained, when phase 1 changes.
    retrieves = row in RETRIEVING_ROWS
    if eval_json.is_file():
        old = json.loads(eval_json.read_text())
        # Scored with another memory, or before FID carried its bootstrap resamplings: score again.
        if (retrieves and old.get("memory_from") != str(phase1)) or not old.get("fid_bootstrap"):
            eval_json.unlink()
    if not eval_json.is_file():
        source = root / seeds_mod.run_name("full" if row in EVAL_ONLY else row, seed, cfg.run.seed)
        extra = EVAL_ONLY.get(row, []) + (["--memory-from", str(phase1)] if retrieves else [])
        run("evaluate", ["--checkpoint", str(source), "--data", cfg.data.val, "--output", str(eval_json), *extra], log)
    return dict(json.loads(eval_json.read_text()), label=label)


def results_table(cfg_path: str, cfg, root: Path, rows: list[str], overrides: list[str], log: Path,
                  seeds: list[int] | None = None) -> int:
    """Every requested row trained and scored; results.json and the Markdown table (earlier rows kept).

    With `seeds`, every trained row is trained once per seed (trainer.seeds); results.json and the first
    table stay the config seed's (or the first seed's), and seeds.json and a second table give every row
    over the seeds, its FID difference to full's taken seed by seed."""
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {list(ROWS)}")
    seeds = seeds or [cfg.run.seed]
    phase1 = train_phase1(cfg_path, cfg, root, phase1_name(cfg, cfg.model.extractor.backbone), overrides, log)
    per_seed = {seed: {row: score_row(row, cfg_path, cfg, root, phase1, overrides, log, seed) for row in rows}
                for seed in seeds}
    main_seed = seeds_mod.main_seed(seeds, cfg.run.seed)
    results = dict(per_seed[main_seed])  # (the table below may add rows of earlier calls)
    # Rows scored by an earlier call (--rows subset) stay in the table rather than being dropped.
    for row, (label, _) in ROWS.items():
        old = root / f"eval-{seeds_mod.run_name(row, main_seed, cfg.run.seed)}.json"
        if row not in results and old.is_file():
            results[row] = dict(json.loads(old.read_text()), label=label)
    results = {row: results[row] for row in ROWS if row in results}
    if main_seed == cfg.run.seed:
        (root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{Path(cfg_path).stem}: {cfg.data.image_size} px, {cfg.phase2.steps} phase-2 steps of batch "
          f"{cfg.data.batch_size}" + (f"; seed {main_seed}" if len(seeds) > 1 else ""))
    from trainer.evaluation import paired_fid_delta

    print("| method | FID (n) | FID - full's (± paired std) | LPIPS | PSNR | colourfulness |\n"
          "| --- | --- | --- | --- | --- | --- |")
    full = results.get("full")
    for row, r in results.items():
        spread = f" ± {r['fid_bootstrap_std']:.1f}" if r.get("fid_bootstrap_std") is not None else ""
        # The same resamplings of the same images for both rows: the spread of the difference itself.
        paired = paired_fid_delta(r, full) if full is not None and row != "full" else None
        delta = f"{paired[0]:+.2f} ± {paired[1]:.2f}" if paired else ""
        print(f"| {r['label']} | {r['fid']:.2f}{spread} ({r['n_images']}) | {delta} | {r['lpips']:.4f} | "
              f"{r['psnr']:.2f} | {r['colorfulness']:.2f} |")
    if len(seeds) > 1:
        summary = seeds_mod.summarize(per_seed, "full")
        (root / "seeds.json").write_text(json.dumps({"seeds": seeds, "rows": summary}, indent=2) + "\n")
        print(f"\nOver seeds {', '.join(map(str, seeds))} (± is the sd over seeds: training variance)")
        print(seeds_mod.table(summary, {row: label for row, (label, _) in ROWS.items()}, "full"))
    return 0


def reproduce(cfg_path: str, overrides: list[str], root: str | None, rows: str, backbones: bool,
              figure: str | None, images: int, seeds: list[int] | None = None) -> int:
    """The command's one job, as chosen: a sample sheet, the backbone table, or the results table."""
    from trainer.config import load_config

    cfg = load_config(cfg_path, overrides)
    out = Path(root or REPO / "runs" / "results" / Path(cfg_path).stem)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.data.val:
        raise SystemExit(f"{cfg_path}: data.val must name the test split")
    if figure:
        return sample_sheet(cfg, out, Path(figure), images)
    if backbones:
        return backbone_table(cfg_path, cfg, out, overrides, out / "commands.txt")
    return results_table(cfg_path, cfg, out, [r.strip() for r in rows.split(",") if r.strip()], overrides,
                         out / "commands.txt", seeds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--root", help="output folder (default runs/results/<config name>)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {list(ROWS)}")
    parser.add_argument("--backbones", action="store_true", help="phase-1 retrieval accuracy of each backbone")
    parser.add_argument("--figure", metavar="PNG", help="write a sample sheet of the trained rows instead")
    parser.add_argument("--images", type=int, default=6, help="test images in the sample sheet")
    parser.add_argument("--seeds", type=seeds_mod.seeds_arg,
                        help="train every row once per seed, e.g. 0,1,2, and add the table over seeds "
                             "(default: the config's run.seed only)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    args = parser.parse_args(argv)
    return reproduce(args.config, args.overrides, args.root, args.rows, args.backbones, args.figure, args.images,
                     args.seeds)


if __name__ == "__main__":
    sys.exit(main())
