"""ONNX serving against torch on the demo's photos: agreement, and onnxruntime's speed as a ratio to torch's.

    python benchmarks/onnx_serving.py [--model BUNDLE_WITH_ONNX | --checkpoint RUN] [--repeats 3] [--quick]

Without either flag: `make demo`'s model (demo/run) when it is there, else a debug-sized untrained model
with the demo's extractor backbone; exported with --onnx into a temporary folder. Per photo (the 7 demo
photos from the scikit-image wheel, at their own resolution): the largest difference of the keys and
of the RGB output (before 8-bit rounding) between onnxruntime and the same graph in torch, whether both
answer with the same memory slot (numpy retrieval over the pack vs the memory server), and the largest
8-bit difference of the whole colorization. Then images per second of both, one image at a time with
the same number of threads, and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # before benchmarks/ (run as a script, its folder comes first)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def _model(args, tmp: Path) -> Path:
    from launch.export import main as export_main

    if args.model:
        return Path(args.model)
    source = args.checkpoint or (REPO / "demo" / "run" if (REPO / "demo" / "run" / "checkpoints").is_dir() else None)
    if source is None:
        sys.path.insert(0, str(REPO / "tests"))
        from studiohelpers import make_checkpoint

        source = make_checkpoint(tmp / "run", overrides=("model.extractor.backbone=alexnet-imagenet",))
        print("model: a debug-sized untrained model (no demo/run: `make demo` trains one)")
    else:
        print(f"model: {source}")
    if export_main(["--checkpoint", str(source), "--output", str(tmp / "model"), "--onnx"]) != 0:
        raise SystemExit("export failed")
    return tmp / "model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a bundle exported with --onnx")
    parser.add_argument("--checkpoint", help="export this checkpoint (or run) first")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the photos (default 3)")
    parser.add_argument("--quick", action="store_true", help="2 photos, 1 timed pass")
    args = parser.parse_args(argv)

    from launch.demo import PHOTOS, skimage_photos
    from launch.onnx_colorize import OnnxColorizer
    from trainer.inference import Colorizer
    from trainer.onnx_export import ExtractorGraph, GeneratorGraph

    threads = torch.get_num_threads()
    names = list(PHOTOS)[:2] if args.quick else list(PHOTOS)
    repeats = 1 if args.quick else args.repeats
    found = skimage_photos()
    photos = {n: Image.open(found[n]).convert("RGB") for n in names}
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as tmp:
        model = _model(args, Path(tmp))
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        onnx = OnnxColorizer(model)
        for attr, name in (("extractor", "extractor.onnx"), ("generator", "generator.onnx")):
            setattr(onnx, attr, ort.InferenceSession(str(model / "onnx" / name), options))
        print("\n| photo | size | keys max diff | RGB max diff | same slot | 8-bit max diff |\n| --- | --- | --- | --- | --- | --- |")
        with Colorizer.from_pretrained(model, device="cpu") as col:
            ext, gen = ExtractorGraph(col.extractor, col.image_size), GeneratorGraph(col.generator, col.image_size)
            for name, img in photos.items():
                rgb = np.asarray(img, np.float32) / 255.0
                x = rgb.transpose(2, 0, 1)[None]
                [want], [answer] = col.colorize_images([img], with_answers=True)
                got, slot, _ = onnx.colorize_array(rgb)
                with torch.no_grad():
                    key = ext(torch.from_numpy(x)).numpy()
                    out = gen(torch.from_numpy(x), torch.from_numpy(onnx.values[[slot]])).numpy()
                dk = np.abs(onnx.extractor.run(None, {"rgb": x})[0] - key).max()
                dr = np.abs(got.transpose(2, 0, 1)[None] - out).max()
                d8 = np.abs((got * 255).round().astype(int) - want.astype(int)).max()
                print(f"| {name} | {img.width} x {img.height} | {dk:.1e} | {dr:.1e} | "
                      f"{'yes' if slot == answer['slot'] else 'NO'} | {d8} |")
            rates = {}
            for label, run in (("torch (Colorizer, memory server)", lambda im: col.colorize_images([im])),
                               ("onnxruntime (numpy retrieval)",
                                lambda im: onnx.colorize_array(np.asarray(im, np.float32) / 255.0))):
                run(photos[names[0]])  # warm-up
                t0 = time.perf_counter()
                for _ in range(repeats):
                    for im in photos.values():
                        run(im)
                rates[label] = repeats * len(photos) / (time.perf_counter() - t0)
        base = next(iter(rates.values()))
        print(f"\n{threads} thread(s), {repeats} pass(es) over {len(photos)} photos\n\n| runtime | images/s | ratio |\n"
              "| --- | --- | --- |")
        for label, rate in rates.items():
            print(f"| {label} | {rate:.2f} | {rate / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
