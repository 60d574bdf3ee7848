"""Colorize grayscale (or colour, converted to gray first) images with a trained checkpoint.

    python launch/colorize.py --checkpoint runs/x --input photos/ 'more/*.jpg' --output out/
    python launch/colorize.py --checkpoint runs/x --input gray/ --output out/ \
        --memory tcp://127.0.0.1:5555 --memory-name flowers
    python launch/colorize.py --checkpoint runs/x --input gray/ --output out/ --memory flowers.pack

Outputs are PNGs at each input's own resolution. Without --memory the checkpoint's own memory is
served by a temporary embedded server; with it, the named memory on that running server is used, or a
pack file (pccnet-memory pack export) served by an embedded server after its extractor identity is checked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402


def output_names(paths: list[Path]) -> list[str]:
    """<stem>.png per input; inputs sharing a stem get _1, _2, ... so nothing is overwritten."""
    used: dict[str, int] = {}
    names = []
    for p in paths:
        stem = p.stem
        n = used.get(stem, 0)
        used[stem] = n + 1
        names.append(f"{stem}.png" if n == 0 else f"{stem}_{n}.png")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or a run's out_dir (latest)")
    parser.add_argument("--input", nargs="+", required=True, help="images, folders or globs")
    parser.add_argument("--output", required=True, help="folder for the colour PNGs")
    parser.add_argument("--memory", help="endpoint of a running memory server, or a memory pack file (served by "
                        "an embedded server; default: the checkpoint's own memory)")
    parser.add_argument("--memory-name", help="memory on that server (default: the checkpoint's, usually 'default')")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.memory_name and not args.memory:
        parser.error("--memory-name needs --memory (the checkpoint's own memory has a single name)")

    from trainer.images import load_rgb
    from trainer.inference import USER_ERRORS, Colorizer, expand_inputs

    try:
        paths = expand_inputs(args.input)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_names(paths)
    failed = []
    try:
        col = Colorizer(args.checkpoint, device=args.device, memory=args.memory, memory_name=args.memory_name)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with col:
        bar = tqdm(total=len(paths), desc="colorize", unit="img")
        for start in range(0, len(paths), args.batch_size):
            chunk = list(range(start, min(len(paths), start + args.batch_size)))
            images, ok = [], []
            for i in chunk:
                try:
                    images.append(load_rgb(paths[i], background=col.background))
                    ok.append(i)
                except Exception as e:  # report unreadable inputs by name and go on with the rest
                    failed.append((paths[i], str(e)))
            for i, arr in zip(ok, col.colorize_images(images)):
                Image.fromarray(arr).save(out_dir / names[i])
            bar.update(len(chunk))
        bar.close()
    for path, why in failed:
        print(f"skipped {path}: {why}", file=sys.stderr)
    print(f"colorized {len(paths) - len(failed)} of {len(paths)} images into {out_dir}")
    return 1 if failed and len(failed) == len(paths) else 0


if __name__ == "__main__":
    sys.exit(main())
