"""ONNX graphs of a model's generator and extractor, for serving without torch (onnxruntime + numpy).

Each graph takes the photo itself, float32 RGB in [0, 1] as [B, 3, H, W] at any H, W, and does what
`trainer.inference.Colorizer` does around the network, so a server needs no colour science of its own:

    extractor.onnx   rgb [B,3,H,W]                    -> key [B, dim]     (unit rows: the memory query)
    generator.onnx   rgb [B,3,H,W], color [B,313]     -> rgb [B,3,H,W]    (the colorized photo, in [0, 1])

Between the two, the caller looks the key up in a memory (a pack's `keys`, `values`, `item_ids`: the
best-matching written slot's value is `color`), as launch/onnx_colorize.py shows. Exported with
torch's dynamo exporter (the `onnx` extra: onnx, onnxscript; onnxruntime to run them).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pccnet.color import NUM_BINS, denormalize_ab, lab_to_rgb, normalize_light, rgb_to_lab

OPSET = 18  # Resize with antialias (the model-size light is an antialiased downscale, as in Colorizer)
GRAPHS = ("extractor.onnx", "generator.onnx")


def light_at(rgb: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """RGB [B,3,H,W] in [0,1] -> (full-size L [B,1,H,W] in [0,100], network-scaled light [B,1,size,size])."""
    light_full = rgb_to_lab(rgb)[:, :1]
    small = F.interpolate(light_full, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return light_full, normalize_light(small)


def compose(light_full: Tensor, ab: Tensor) -> Tensor:
    """Full-size L [B,1,H,W] + predicted ab/110 at the model size -> RGB [B,3,H,W] in [0,1]."""
    ab = F.interpolate(ab, size=light_full.shape[-2:], mode="bilinear", align_corners=False)
    return lab_to_rgb(torch.cat((light_full, denormalize_ab(ab)), dim=1)).clamp(0, 1)


class ExtractorGraph(nn.Module):
    """What extractor.onnx computes: photo -> memory query."""

    def __init__(self, extractor: nn.Module, image_size: int) -> None:
        super().__init__()
        self.extractor, self.image_size = extractor, image_size

    def forward(self, rgb: Tensor) -> Tensor:
        return self.extractor(light_at(rgb, self.image_size)[1])


class GeneratorGraph(nn.Module):
    """What generator.onnx computes: photo + colour distribution -> colorized photo at the photo's size."""

    def __init__(self, generator: nn.Module, image_size: int) -> None:
        super().__init__()
        self.generator, self.image_size = generator, image_size

    def forward(self, rgb: Tensor, color: Tensor) -> Tensor:
        light_full, light = light_at(rgb, self.image_size)
        return compose(light_full, self.generator(light, color))


def export_onnx(generator: nn.Module, extractor: nn.Module, image_size: int, folder: str | Path) -> list[Path]:
    """Write extractor.onnx and generator.onnx (self-contained files) into `folder`; returns their paths."""
    try:
        import onnx  # noqa: F401  (the exporter needs onnx and onnxscript: the `onnx` extra)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ValueError(f"ONNX export needs the `onnx` extra (pip install -e '.[onnx]'): {e}") from e
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=1024)
    height, width = torch.export.Dim("height", min=2, max=16384), torch.export.Dim("width", min=2, max=16384)
    # An odd example size, so the exporter cannot specialise H or W to a value it sees.
    rgb = torch.rand(2, 3, image_size + 13, image_size + 7)
    color = torch.full((2, NUM_BINS), 1.0 / NUM_BINS)
    jobs = [
        (ExtractorGraph(extractor, image_size), (rgb,), ["rgb"], ["key"], {"rgb": {0: batch, 2: height, 3: width}}),
        (GeneratorGraph(generator, image_size), (rgb, color), ["rgb", "color"], ["rgb_out"],
         {"rgb": {0: batch, 2: height, 3: width}, "color": {0: batch}}),
    ]
    paths = []
    modes = [(m, m.training) for m in (generator, extractor)]
    # The exporter warns about every optional operator library it does not find (torchvision).
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for (module, args, inputs, outputs, shapes), name in zip(jobs, GRAPHS):
            path = folder / name
            module.eval()
            # The exporter prints its progress on stdout; a tool's output stays its own.
            with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # the exporter's own deprecations
                warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
                torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                                  dynamic_shapes=shapes, opset_version=OPSET, dynamo=True, external_data=False)
            paths.append(path)
    finally:
        quiet.setLevel(level)
        for module, mode in modes:
            module.train(mode)
    return paths
