"""Few-shot colour memories on a live server: the README's example, end to end, with numbers.

    python launch/fewshot_example.py --checkpoint runs/results/pokemon_every10_cpu/full \
        --shots '../shared/data/flowers102/test_udacity/73/*.jpg' --out runs/fewshot_example

Starts a memory server, adds the first --n-shots images to a new named memory with launch/memorize.py,
then colorizes the next --n-test images of the same kind twice with launch/colorize.py: with the
checkpoint's own memory (what the model was trained with) and with the new few-shot memory, and
scores both against the originals (PSNR, LPIPS, colourfulness at 128 px) into a table and a sheet.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

from launch.common import module_command, run_step


def load_128(path: Path):
    import numpy as np
    import torch
    from PIL import Image

    img = Image.open(path).convert("RGB").resize((128, 128), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)


def score(tests: list[Path], out: Path) -> tuple[dict, list]:
    """PSNR, LPIPS and colourfulness at 128 px of both colorizations against the originals; sheet columns."""
    import torch

    from pccnet import metrics

    real = torch.stack([load_128(f) for f in tests])
    rows, columns = {}, [("gray", real.mean(1, keepdim=True).expand(-1, 3, -1, -1))]
    for label, folder in (("checkpoint's own memory", "own_memory"), ("few-shot memory", "fewshot_memory")):
        pred = torch.stack([load_128(out / folder / f"{f.stem}.png") for f in tests])
        rows[label] = {"psnr": float(metrics.psnr(pred, real).mean()), "lpips": float(metrics.lpips(pred, real).mean()),
                       "colorfulness": float(metrics.colorfulness(pred).mean())}
        columns.append((label, pred))
    rows["original"] = {"colorfulness": float(metrics.colorfulness(real).mean())}
    columns.append(("original", real))
    return rows, columns


def save_sheet(columns: list, n: int, path: Path) -> None:
    """One 128-px tile per test image (rows) and column, 4 px apart."""
    import numpy as np
    import torch
    from PIL import Image

    tiles = [(c.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy() for _, c in columns]
    sheet = np.full((n * 132, len(tiles) * 132, 3), 255, np.uint8)
    for j, t in enumerate(tiles):
        for i in range(n):
            sheet[i * 132:i * 132 + 128, j * 132:j * 132 + 128] = t[i]
    Image.fromarray(sheet).save(path)


def run_example(checkpoint: str, shots_glob: str, out: Path, name: str, n_shots: int, n_test: int) -> int:
    """Memorize the shots on a fresh server, colorize the tests with both memories, score, print a table."""
    from memory_server.launcher import start_server

    files = sorted(Path(p) for p in glob.glob(shots_glob))
    if len(files) < n_shots + n_test:
        raise SystemExit(f"{shots_glob!r} matches {len(files)} images; need {n_shots + n_test}")
    shots, tests = files[:n_shots], files[n_shots:n_shots + n_test]
    for folder, chosen in (("shots", shots), ("test", tests)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for f in chosen:
            (out / folder / f.name).write_bytes(f.read_bytes())
    with start_server(out / "memory", bind="tcp://127.0.0.1:0") as server:
        run_step(module_command("memorize", "--checkpoint", checkpoint, "--memory", server.endpoint, "--name", name,
                                "--input", out / "shots"), "memorize")
        run_step(module_command("colorize", "--checkpoint", checkpoint, "--input", out / "test", "--output",
                                out / "own_memory"), "colorize with the checkpoint's memory")
        run_step(module_command("colorize", "--checkpoint", checkpoint, "--input", out / "test", "--output",
                                out / "fewshot_memory", "--memory", server.endpoint, "--memory-name", name),
                 "colorize with the few-shot memory")
    rows, columns = score(tests, out)
    (out / "scores.json").write_text(json.dumps(rows, indent=2) + "\n")
    save_sheet(columns, len(tests), out / "sheet.png")
    print("\n| memory used | PSNR | LPIPS | colourfulness |\n| --- | --- | --- | --- |")
    for label, r in rows.items():
        print(f"| {label} | {r.get('psnr', float('nan')):.2f} | {r.get('lpips', float('nan')):.4f} | "
              f"{r['colorfulness']:.2f} |")
    print(f"\nsheet (gray | own memory | few-shot memory | original): {out / 'sheet.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--shots", required=True, help="glob of images of one kind (sorted; first N memorized)")
    parser.add_argument("--out", default="runs/fewshot_example")
    parser.add_argument("--name", default="fewshot")
    parser.add_argument("--n-shots", type=int, default=8)
    parser.add_argument("--n-test", type=int, default=6)
    args = parser.parse_args(argv)
    return run_example(args.checkpoint, args.shots, Path(args.out), args.name, args.n_shots, args.n_test)


if __name__ == "__main__":
    sys.exit(main())
