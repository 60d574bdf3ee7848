"""Colorize photos with an exported bundle's ONNX graphs: numpy, onnxruntime, Pillow and safetensors only.

    python launch/export.py --checkpoint runs/x --output model/ --onnx
    python launch/onnx_colorize.py --model model/ --input gray.jpg more/*.png --output out/ [--memory other.pack]

What a server without torch needs: the photo goes into extractor.onnx (-> a unit query), the query
picks the most similar written slot of a memory pack (its `keys`, `values`, `item_ids`), and that
slot's colour distribution goes with the photo into generator.onnx (-> the colour photo at the photo's
own resolution). This file imports no torch and nothing of this project; trainer/onnx_export.py says
what each graph computes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


class OnnxColorizer:
    """A bundle's onnx/extractor.onnx and onnx/generator.onnx plus a memory pack (default: the bundle's own)."""

    def __init__(self, model: str | Path, memory: str | Path | None = None) -> None:
        import onnxruntime as ort
        from safetensors.numpy import load_file

        model = Path(model)
        info = json.loads((model / "bundle.json").read_text())
        self.background = info.get("background", "white")
        self.extractor = ort.InferenceSession(str(model / "onnx" / "extractor.onnx"))
        self.generator = ort.InferenceSession(str(model / "onnx" / "generator.onnx"))
        pack = load_file(str(memory or model / "memory.pack"))
        self.keys, self.values, self.item_ids = pack["keys"], pack["values"], pack["item_ids"]

    def retrieve(self, key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Queries [B, dim] -> (colour distributions [B, 313], slots [B], cosine similarities [B]).

        The most similar written slot (item id >= 0); the most similar slot when none is written.
        """
        sims = key @ self.keys.T  # keys and queries are unit vectors: cosine similarity
        written = self.item_ids >= 0
        slots = np.where(written, sims, -np.inf).argmax(1) if written.any() else sims.argmax(1)
        return self.values[slots], slots, sims[np.arange(len(slots)), slots]

    def colorize_array(self, rgb: np.ndarray) -> tuple[np.ndarray, int, float]:
        """RGB float32 [H, W, 3] in [0, 1] -> (colour RGB float32 [H, W, 3] in [0, 1], slot, similarity)."""
        x = np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], dtype=np.float32)
        key = self.extractor.run(None, {"rgb": x})[0]
        color, slots, sims = self.retrieve(key)
        out = self.generator.run(None, {"rgb": x, "color": color.astype(np.float32)})[0]
        return out[0].transpose(1, 2, 0), int(slots[0]), float(sims[0])

    def colorize(self, img: Image.Image) -> Image.Image:
        """A PIL image (colour or gray; transparency composited onto the training background) -> colour image."""
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            flat = Image.new("RGB", rgba.size, self.background)
            flat.paste(rgba, mask=rgba.getchannel("A"))
            img = flat
        out, _, _ = self.colorize_array(np.asarray(img.convert("RGB"), np.float32) / 255.0)
        return Image.fromarray((out * 255.0).round().astype(np.uint8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a bundle exported with --onnx")
    parser.add_argument("--input", nargs="+", required=True, help="image files")
    parser.add_argument("--output", required=True, help="folder for the colour PNGs")
    parser.add_argument("--memory", help="a memory pack (default: the bundle's memory.pack)")
    args = parser.parse_args(argv)
    graphs = Path(args.model) / "onnx"
    if not (graphs / "generator.onnx").is_file():
        print(f"error: {graphs} holds no generator.onnx: export with `launch/export.py --onnx`", file=sys.stderr)
        return 2
    col = OnnxColorizer(args.model, args.memory)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in map(Path, args.input):
        try:
            with Image.open(path) as img:
                result = col.colorize(img)
        except OSError as e:  # an unreadable file is reported by name; the others go on
            print(f"skipped {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        result.save(out / f"{path.stem}.png")
        print(f"{path} -> {out / (path.stem + '.png')}")
    return 1 if failed == len(args.input) else 0


if __name__ == "__main__":
    sys.exit(main())
