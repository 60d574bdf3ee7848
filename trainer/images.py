"""Image helpers shared by the data pipeline and the tools: decode, composite, crop, resize, Lab tensors.

Owns the per-image transform of the data contract (METHOD.md sections 0 and 8.4): any mode -> RGB with
transparency composited onto a background, centre square crop, antialiased resize, then network-scaled
Lab and the 313-d colour feature via `pccnet.color`. No shards, no processes here.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from pccnet.color import color_distribution, normalize_ab, normalize_light, rgb_to_lab

# Pillow's fast path for large downscales: a box reduction to within this factor of the target, then
# the Lanczos filter. Pillow documents 3.0 as indistinguishable from a full Lanczos resize; measured on
# 100 flower photos 500-900 px -> 64 px: PSNR >= 53.6 dB against the full filter (docs/sections/data.md).
REDUCING_GAP = 3.0
# JPEG draft decoding (DCT-domain downscale by 1/2, 1/4, 1/8) keeps at least this multiple of the target
# size, so Lanczos still does the final antialiased step. Measured on 100 flower photos at 64 px: PSNR
# >= 49.6 dB (median 54) against a full decode + Lanczos of the same region; the centre crop may sit
# up to (scale - 1) source pixels off the full-resolution centre.
DRAFT_MARGIN = 2
# The colour feature is the pixel average of a soft encoding; it is estimated on a regular grid of at
# most FEATURE_GRID x FEATURE_GRID pixels. At 256 px (stride 4) the KL to the all-pixel feature was
# <= 0.002 nats on 200 real images, against a memory threshold of 1.5 nats; at <= 64 px it is exact.
FEATURE_GRID = 64
LAB_CHUNK_PIXELS = 1 << 16

_NAMED_BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
_HEX = re.compile(r"^#([0-9a-fA-F]{6})$")
_OBJECT_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")


class ImageDecodeError(ValueError):
    """An image could not be decoded; the message names the source."""


def parse_background(spec: str) -> tuple[int, int, int]:
    """'white' | 'black' | '#rrggbb' -> an (r, g, b) tuple of ints in 0..255."""
    if not isinstance(spec, str):
        raise ValueError(f"background must be 'white', 'black' or '#rrggbb', got {spec!r}")
    key = spec.strip().lower()
    if key in _NAMED_BACKGROUNDS:
        return _NAMED_BACKGROUNDS[key]
    match = _HEX.match(key)
    if match is None:
        raise ValueError(f"background must be 'white', 'black' or '#rrggbb', got {spec!r}")
    value = int(match.group(1), 16)
    return (value >> 16) & 255, (value >> 8) & 255, value & 255


def check_image_size(image_size: int) -> int:
    """Return image_size if it is a positive int, else raise ValueError naming it."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return image_size


def _has_transparency(img: Image.Image) -> bool:
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return True
    return img.mode in ("P", "L", "RGB") and "transparency" in img.info


def load_rgb(
    source: str | Path | bytes, background: str = "white", draft_size: int | None = None
) -> Image.Image:
    """Decode an image (path or bytes) to RGB, compositing any transparency onto `background`.

    draft_size: the final square size this image will be resized to; JPEGs are then decoded at a
    reduced DCT scale that keeps at least DRAFT_MARGIN x that size on the short side.
    """
    bg = parse_background(background)
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    name = f"<{len(source)} bytes>" if is_bytes else repr(str(source))
    try:
        fp = io.BytesIO(source) if is_bytes else source
        img = Image.open(fp)
        if draft_size is not None and img.format == "JPEG":
            short = min(img.size)
            keep = check_image_size(draft_size) * DRAFT_MARGIN
            if short >= 2 * keep:
                scale = keep / short
                img.draft("RGB", (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
        img.load()  # Pillow closes a file it opened itself once a single-frame image is loaded
        return _to_rgb(img, bg)
    # Pillow's decoders raise a zoo of types for bad data (OSError, SyntaxError, struct.error,
    # zlib.error, EOFError, DecompressionBombError, ...): all mean "this image is unusable".
    except Exception as exn:  # noqa: BLE001
        detail = _OBJECT_REPR.sub("it", str(exn))
        raise ImageDecodeError(f"cannot decode image {name}: {type(exn).__name__}: {detail}") from exn


def to_rgb(img: Image.Image, background: str = "white") -> Image.Image:
    """Any PIL image -> RGB, transparency composited onto `background` (as load_rgb does for files)."""
    return _to_rgb(img, parse_background(background))


def _to_rgb(img: Image.Image, bg: tuple[int, int, int]) -> Image.Image:
    if _has_transparency(img):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, bg)
        out.paste(rgba, mask=rgba.getchannel("A"))  # alpha blend: out = a*fg + (1-a)*bg
        return out
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: Pillow's convert('RGB') clips instead of scaling; scale to 8 bit ourselves.
        arr = np.asarray(img, dtype=np.float64)
        # 'I' (32-bit) carries no bit depth: values above 255 mean a 16-bit source.
        peak = 65535.0 if img.mode != "I" or arr.max(initial=0) > 255 else 255.0
        grey = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Centre square crop (side = min(w, h)), then an antialiased Lanczos resize to size x size."""
    check_image_size(size)
    w, h = img.size
    side = min(w, h)
    if side < 1:
        raise ValueError(f"image has no pixels: size {img.size}")
    if w != h:
        # A real crop, not resize(box=...): the filter must not reach into the cut-off margins.
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side == size:
        return img
    gap = REDUCING_GAP if side >= REDUCING_GAP * size else None
    return img.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=gap)


def color_feature(ab: Tensor) -> Tensor:
    """Raw ab [B,2,H,W] -> colour feature [B,313], on a grid of at most FEATURE_GRID^2 pixels."""
    stride_h = max(1, -(-ab.shape[2] // FEATURE_GRID))
    stride_w = max(1, -(-ab.shape[3] // FEATURE_GRID))
    if stride_h > 1 or stride_w > 1:
        ab = ab[:, :, stride_h // 2 :: stride_h, stride_w // 2 :: stride_w]
    return color_distribution(ab.contiguous())


def lab_batch(
    rgb: np.ndarray | Tensor, flip: Tensor | None = None, features: list[Tensor | None] | None = None
) -> dict[str, Tensor]:
    """uint8 RGB [B,H,W,3] -> {light [B,1,H,W] in [-1,1], ab [B,2,H,W] = ab/110, color_feature [B,313]}.

    flip: optional bool [B]; flipped samples are mirrored left-right. The colour feature is computed
    before the flip, so it is the same whether or not a sample is flipped.
    features: optional known colour features ([313] each, None where unknown) that are not recomputed.
    """
    x = torch.as_tensor(rgb)
    if x.dim() != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"rgb must be uint8 [B,H,W,3], got {x.dtype} {tuple(x.shape)}")
    rgb01 = x.permute(0, 3, 1, 2).float().div_(255.0)  # [B,3,H,W]
    # Chunks of <= LAB_CHUNK_PIXELS keep the temporaries in cache: at 256 px one image per call was 10-15%
    # faster than a batch of 8; at 64 px the whole batch goes in one call.
    chunk = max(1, LAB_CHUNK_PIXELS // (x.shape[1] * x.shape[2]))
    lab = torch.cat([rgb_to_lab(rgb01[i : i + chunk]) for i in range(0, rgb01.shape[0], chunk)])
    # The colour feature one image at a time, for the same reason (a batch of 2 took twice as long per
    # image at 64 px, a batch of 8 no less than one image).
    known = features if features is not None else [None] * lab.shape[0]
    feature = torch.cat([
        color_feature(lab[i : i + 1, 1:]) if f is None else f.view(1, -1) for i, f in enumerate(known)
    ])
    if flip is not None and bool(flip.any()):
        lab[flip] = lab[flip].flip(-1)
    return {
        "light": normalize_light(lab[:, :1]).contiguous(),
        "ab": normalize_ab(lab[:, 1:]).contiguous(),
        "color_feature": feature,
    }


def image_to_sample(img: Image.Image, image_size: int, flip: bool = False) -> dict[str, Tensor]:
    """RGB PIL image -> {light [1,H,W] in [-1,1], ab [2,H,W] = ab/110, color_feature [313]}.

    The image is centre-cropped and resized first unless it is already image_size x image_size.
    """
    check_image_size(image_size)
    if img.mode != "RGB":
        raise ValueError(f"image_to_sample needs an RGB image (use load_rgb), got mode {img.mode!r}")
    img = center_crop_resize(img, image_size)
    batch = lab_batch(np.array(img)[None], torch.tensor([flip]))
    return {k: v[0] for k, v in batch.items()}
