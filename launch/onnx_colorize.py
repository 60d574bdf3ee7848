"""Colorize photos with an exported bundle's ONNX graphs: numpy, onnxruntime, Pillow and safetensors only.

    python launch/export.py --checkpoint runs/x --output model/ --onnx
    python launch/onnx_colorize.py --model model/ --input gray.jpg more/*.png --output out/ [--memory other.pack]

What a server without torch needs: the photo goes into extractor.onnx (-> a unit query), the query
picks the most similar written slots of a memory pack (its `keys`, `values`, `item_ids`), their colour
distributions are mixed as the bundle's `retrieval` settings say (as trainer.retrieval does), and that
colour distribution goes with the photo into generator.onnx (-> the colour photo at the photo's
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
        # Bundles from before the setting existed retrieve as the paper does: the top-1 value.
        self.options = {"k": 1, "temperature": 0.1, "mix": "mean", "flip": False, "anneal": 1.0,
                        **info.get("retrieval", {})}

    def retrieve(self, key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Queries [B, dim] -> (colour distributions [B, 313], best slots [B], their cosine similarities [B]).

        The values of the options' k most similar written slots (item id >= 0), mixed with softmax weights
        of similarity / temperature; the most similar slot when none is written.
        """
        sims = key @ self.keys.T  # keys and queries are unit vectors: cosine similarity
        written = self.item_ids >= 0
        if not written.any():
            slots = sims.argmax(1)
            return self.values[slots], slots, sims[np.arange(len(slots)), slots]
        masked = np.where(written, sims, -np.inf)
        k = min(int(self.options["k"]), int(written.sum()))
        top = np.argsort(-masked, axis=1, kind="stable")[:, :k]  # [B, k], best first
        s = np.take_along_axis(sims, top, 1).astype(np.float64)
        w = np.exp((s - s[:, :1]) / float(self.options["temperature"]))
        w /= w.sum(1, keepdims=True)
        v = self.values[top].astype(np.float64)  # [B, k, 313]
        mix = self.options["mix"]
        if k == 1 or mix == "mean":
            color = np.einsum("bk,bkd->bd", w, v)
        elif mix == "geometric":
            color = np.exp(np.einsum("bk,bkd->bd", w, np.log(np.clip(v, 1e-8, None))))
        else:  # medoid: the neighbour value with the least weighted KL to the others
            p = np.clip(v, 1e-8, None)
            kl = (p[:, :, None] * (np.log(p[:, :, None]) - np.log(p[:, None]))).sum(-1)  # [B, k, k]
            color = v[np.arange(len(v)), np.einsum("bij,bj->bi", kl, w).argmin(1)]
        color /= color.sum(1, keepdims=True)
        anneal = float(self.options["anneal"])
        if anneal != 1.0:  # sharpened to color ** (1 / anneal), in the log domain (no underflow)
            logc = np.log(np.clip(color, 1e-30, None)) / anneal
            color = np.exp(logc - logc.max(1, keepdims=True))
            color /= color.sum(1, keepdims=True)
        return color.astype(np.float32), top[:, 0], s[:, 0].astype(np.float32)

    def colorize_array(self, rgb: np.ndarray) -> tuple[np.ndarray, int, float]:
        """RGB float32 [H, W, 3] in [0, 1] -> (colour RGB float32 [H, W, 3] in [0, 1], slot, similarity)."""
        x = np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], dtype=np.float32)
        key = self.extractor.run(None, {"rgb": x})[0]
        if self.options["flip"]:  # the mean of the image's and its mirror image's features, re-normalised
            key = key + self.extractor.run(None, {"rgb": np.ascontiguousarray(x[..., ::-1])})[0]
            key /= np.linalg.norm(key, axis=1, keepdims=True)
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
