"""Add few-shot colour memories to a live memory server, without retraining.

    python launch/memorize.py --checkpoint runs/x --memory tcp://127.0.0.1:5555 --name flowers \
        --input few_shot_flowers/ [--capacity 1024]
    python launch/colorize.py --checkpoint runs/x --memory tcp://127.0.0.1:5555 --memory-name flowers ...

Each colour image gets a slot of its own: its key from the checkpoint's extractor (on the gray
version), its value its 313-bin colour distribution. The memory is created if absent.
"""

from __future__ import annotations

import argparse
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402


def item_id_for(path: Path) -> int:
    """A stable non-negative id from the file name (the memory's item_ids are diagnostics)."""
    return zlib.crc32(str(path).encode()) & 0x7FFFFFFF


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or a run's out_dir (latest)")
    parser.add_argument("--memory", required=True, help="endpoint of a running memory server")
    parser.add_argument("--name", required=True, help="memory to create or extend on that server")
    parser.add_argument("--input", nargs="+", required=True, help="colour images, folders or globs")
    parser.add_argument("--capacity", type=int, default=1024, help="slots, when the memory is created (default 1024)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when present)")
    args = parser.parse_args(argv)
    if args.capacity < 1:
        parser.error(f"--capacity must be >= 1, got {args.capacity}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")

    from memory_server.client import MemoryClient
    from pccnet.color import NUM_BINS
    from trainer.checkpoint import load_for_inference
    from trainer.images import center_crop_resize, image_to_sample, load_rgb
    from trainer.inference import expand_inputs, pick_device
    from trainer.models import build_extractor, load_trainable_state

    try:
        paths = expand_inputs(args.input)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = load_for_inference(args.checkpoint)
    cfg = state["config"]
    device = pick_device(args.device)
    extractor = build_extractor(cfg.model)
    load_trainable_state(extractor, state["models"]["extractor"], "extractor")
    extractor.to(device).eval()
    size, dk = cfg.data.image_size, cfg.model.extractor_dim

    with MemoryClient(args.memory, memory=args.name) as client:
        info = client.info(memory=args.name)
        if "capacity" in info:
            if (info["key_dim"], info["value_dim"]) != (dk, NUM_BINS):
                print(f"error: memory {args.name!r} on {args.memory} has key_dim {info['key_dim']} and value_dim "
                      f"{info['value_dim']}; this checkpoint needs {dk} and {NUM_BINS}", file=sys.stderr)
                return 2
            capacity = int(info["capacity"])
        else:
            client.create(capacity=args.capacity, key_dim=dk, value_dim=NUM_BINS, memory=args.name)
            capacity = args.capacity
            print(f"created memory {args.name!r} on {args.memory}: {capacity} slots")
        if len(paths) > capacity:
            print(f"warning: {len(paths)} images into {capacity} slots: the oldest writes are replaced",
                  file=sys.stderr)
        batch = min(args.batch_size, capacity)
        written, failed = [], []
        for start in tqdm(range(0, len(paths), batch), desc="memorize", unit="batch"):
            lights, feats, ids, names = [], [], [], []
            for p in paths[start:start + batch]:
                try:
                    img = center_crop_resize(load_rgb(p, background=cfg.data.background), size)
                except Exception as e:  # report unreadable files by name, keep going
                    failed.append((p, str(e)))
                    continue
                sample = image_to_sample(img, size)
                lights.append(sample["light"])
                feats.append(sample["color_feature"])
                ids.append(item_id_for(p))
                names.append(p)
            if not lights:
                continue
            with torch.no_grad():
                keys = extractor(torch.stack(lights).to(device)).float().cpu().numpy()
            # Threshold 0: no KL is below it, so every row is a miss and takes a slot of its own.
            reply = client.update(keys, torch.stack(feats).numpy(), threshold=0.0, age_noise=0.0,
                                  item_ids=np.asarray(ids, dtype=np.int64), memory=args.name)
            written.extend(zip(names, reply["slots"].tolist()))
    for p, why in failed:
        print(f"skipped {p}: {why}", file=sys.stderr)
    for p, slot in written:
        print(f"slot {slot:6d}  {p}")
    print(f"memorized {len(written)} of {len(paths)} images into memory {args.name!r} on {args.memory}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
