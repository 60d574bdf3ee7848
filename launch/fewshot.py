"""The few-shot scoreboard: train on base classes, memorize K exemplars of each novel class on a live
memory server (no gradient step), colorize the novel classes' other images, and print the table.

    python launch/fewshot.py --config configs/flowers64_fewshot_cpu.yaml
    python launch/fewshot.py --config my.yaml --base base.txt --novel novel.tsv --images photos/ \
        --shots 1,5,10 --phase1-steps 500 --phase2-steps 300          # your own labelled images, quicker

Data (flowers102/MANIFEST.md "Few-shot split" is the model): a base list (one image name a line) and a
`label<TAB>image` file of novel-class images in exemplar order, names relative to --images; each also
settable in the config's `fewshot:` section. Each novel class's first K images are its exemplars; its
images after the largest K are the test images of every row. Rows (trainer.fewshot): the trained memory
alone, the trained memory plus the exemplars in one memory, the exemplars alone, without M, the
cGAN + smooth L1 baseline and the own-colour-feature ceiling, each scored with FID (bootstrap spread),
LPIPS, PSNR, colourfulness and the retrieval KL. Training is launch/results.py's (phase 1 once, then
each row's phase 2, in the same folder), so finished steps are skipped and a re-run only re-scores what
changed. Writes <root>/fewshot.md, <root>/fewshot.json and, with --figure, gray | K ... | truth. With
--seeds 0,1,2 every trained row's phase 2 runs once per seed from the same phase 1 and the table over
seeds is added (trainer.seeds): one training's FID spread does not cover training variance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from launch.common import report_errors, user_errors

REPO = Path(__file__).resolve().parents[1]


def scoreboard(args, overrides: list[str]) -> int:
    from launch.results import phase1_name, train_phase1, train_row
    from trainer import seeds as seeds_mod
    from trainer.config import load_config
    from trainer.fewshot import (
        TRAINED_ROWS,
        Memories,
        figure,
        load_data,
        make_shards,
        row_key,
        row_label,
        score,
        table,
    )
    from trainer.inference import pick_device
    from trainer.retrieval import RetrievalOptions

    if args.phase1_steps is not None:
        overrides = [*overrides, f"phase1.steps={args.phase1_steps}"]
    if args.phase2_steps is not None:
        overrides = [*overrides, f"phase2.steps={args.phase2_steps}"]
    for key in ("base", "novel", "images"):
        if getattr(args, key):
            overrides = [*overrides, f"fewshot.{key}={getattr(args, key)}"]
    if args.shots:
        overrides = [*overrides, f"fewshot.shots=[{args.shots}]"]
    cfg = load_config(args.config, overrides)
    root = Path(args.root or REPO / "runs" / "results" / Path(args.config).stem)
    root.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.fewshot)
    print(f"{len(data.base)} base images; {len(data.classes)} novel classes, K = {list(data.shots)}, "
          f"{len(data.test())} test images")
    patterns = make_shards(data, cfg.fewshot, root)
    overrides = [*overrides, f"data.train={patterns['train']}",
                 f"data.val={patterns['val']}" if "val" in patterns else "data.val=null"]
    cfg = load_config(args.config, overrides)
    log = root / "commands.txt"
    phase1 = train_phase1(args.config, cfg, root, phase1_name(cfg, cfg.model.extractor.backbone), overrides, log)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in TRAINED_ROWS]
    if unknown or "full" not in rows:
        raise ValueError(f"--rows must include 'full' and be among {list(TRAINED_ROWS)}, got {args.rows!r}")
    seeds = args.seeds or [cfg.run.seed]
    main_seed = seeds_mod.main_seed(seeds, cfg.run.seed)
    ckpts = {}
    for seed in seeds:
        trained = {row: train_row(row, args.config, cfg, root, phase1, overrides, log, seed) for row in rows}
        ckpts[seed] = {row: c for row, c in trained.items() if c is not None}
    options = RetrievalOptions.of(cfg.retrieval)
    device = str(pick_device(args.device))
    images = Path(cfg.fewshot.images)
    with Memories(phase1, device, flip=options.flip) as memories:
        names = memories.build(data, images)
        per_seed = {seed: score(root / "fewshot", ckpts[seed], phase1, memories, names, patterns["test"], options,
                                args.bootstrap, args.batch_size) for seed in seeds}
        if args.figure:
            figure(Path(args.figure), data, images, ckpts[main_seed]["full"], phase1, memories, options, args.images_n)
            print(f"written {args.figure}")
    results = per_seed[main_seed]
    title = (f"{Path(args.config).stem}: {cfg.data.image_size} px, phase 1 {cfg.phase1.steps} steps, phase 2 "
             f"{cfg.phase2.steps} steps of batch {cfg.data.batch_size}; retrieval {dataclasses.asdict(options)}"
             + (f"; seed {main_seed}" if len(seeds) > 1 else ""))
    text = table(results, title)
    report = {"config": args.config, "overrides": overrides, "rows": results}
    if len(seeds) > 1:
        keyed = {seed: {row_key(r): r for r in rows_} for seed, rows_ in per_seed.items()}
        summary = seeds_mod.summarize(keyed, "base")
        labels = {row_key(r): row_label(r) for r in results}
        text += (f"\n\nOver seeds {', '.join(map(str, seeds))} (phase 2 trained once per seed from the same phase 1; "
                 "± is the sd over seeds: training variance)\n\n" + seeds_mod.table(summary, labels, "base"))
        report.update(seeds={str(seed): rows_ for seed, rows_ in per_seed.items()}, over_seeds=summary)
    (root / "fewshot.md").write_text(text + "\n")
    (root / "fewshot.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + text + f"\n\nwritten {root / 'fewshot.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from trainer.seeds import seeds_arg

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--base", help="base-class image list (default: the config's fewshot.base)")
    parser.add_argument("--novel", help="label<TAB>image file of novel-class images (default: fewshot.novel)")
    parser.add_argument("--images", help="folder the names are relative to (default: fewshot.images)")
    parser.add_argument("--shots", help="comma-separated K values, e.g. 1,5,10 (default: fewshot.shots)")
    parser.add_argument("--phase1-steps", type=int, help="override phase1.steps (trade time for quality)")
    parser.add_argument("--phase2-steps", type=int, help="override phase2.steps")
    parser.add_argument("--rows", default="full,no_memory,pix2pix",
                        help="trained rows: full (required), no_memory, pix2pix")
    parser.add_argument("--root", help="output folder (default runs/results/<config name>, shared with results.py)")
    parser.add_argument("--figure", metavar="PNG", help="also write gray | K ... | truth for a few test images")
    parser.add_argument("--figure-images", dest="images_n", type=int, default=8, help="rows of the figure")
    parser.add_argument("--bootstrap", type=int, default=100, help="FID bootstrap resamplings (default 100)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when present)")
    parser.add_argument("--seeds", type=seeds_arg,
                        help="train the rows once per seed, e.g. 0,1,2, and add the table over seeds "
                             "(default: the config's run.seed only)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides (retrieval.k=8 phase2.steps=200 ...)")
    args = parser.parse_args(argv)
    args.images_n = max(1, args.images_n)
    for name in ("phase1_steps", "phase2_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.shots is not None:
        try:
            shots = [int(k) for k in args.shots.split(",") if k.strip()]
        except ValueError:
            parser.error(f"--shots must be comma-separated integers, got {args.shots!r}")
        if not shots or min(shots) < 1:
            parser.error(f"--shots must be integers >= 1, got {args.shots!r}")
        args.shots = ",".join(map(str, shots))
    from trainer.data import DataError
    from trainer.shards import ShardError

    return report_errors(lambda: scoreboard(args, args.overrides), (*user_errors(), DataError, ShardError))


if __name__ == "__main__":
    sys.exit(main())
