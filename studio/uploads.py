"""Decoding what a browser uploads: bounded in bytes and pixels, only image formats, clear messages.

The pixel count is read from the file's header and checked before anything is decoded, so a
decompression bomb (a small file declaring a huge image) costs nothing; Pillow's own bomb check
(Image.MAX_IMAGE_PIXELS, raised by the studio's command line when --max-pixels is larger) stays on as a
second line. A client's file name is only ever shown, never used as a path.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from trainer.images import load_rgb

# Decoders a browser upload may reach (Pillow has many more; each is attack surface we do not need).
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


class UploadError(ValueError):
    """An uploaded file cannot be used; the message names the file and says why."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what a client may send."""

    request_bytes: int = 512 << 20  # one HTTP request body
    file_bytes: int = 64 << 20  # one uploaded file
    pixels: int = 40_000_000  # width x height of one image
    files_per_request: int = 500
    pack_bytes: int = 512 << 20  # an uploaded memory pack


def display_name(name: str | None) -> str:
    """A client's file name fit for messages and Content-Disposition: its last path part, printable, short."""
    base = (name or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    clean = "".join(ch for ch in base if ch.isprintable() and ch not in "\"'<>;") or "upload"
    return clean[:120]


def decode_image(data: bytes, name: str, limits: Limits, background: str = "white") -> Image.Image:
    """Uploaded bytes -> an RGB image (transparency composited onto `background`); UploadError otherwise."""
    shown = display_name(name)
    if len(data) > limits.file_bytes:
        raise UploadError(f"{shown} is {len(data) / 2**20:.1f} MiB; the limit is {limits.file_bytes / 2**20:.0f} MiB")
    if not data:
        raise UploadError(f"{shown} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as probe:  # reads the header only
                width, height = probe.size
    except UnidentifiedImageError:
        raise UploadError(f"{shown} is not an image (accepted: {', '.join(FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own check (Image.MAX_IMAGE_PIXELS), for sizes beyond even its limit.
        raise UploadError(f"{shown} is too large: more than {limits.pixels:,} pixels") from None
    except Exception as e:  # noqa: BLE001 - a damaged header: Pillow raises many types
        raise UploadError(f"{shown} cannot be read as an image: {type(e).__name__}: {e}") from None
    if width * height > limits.pixels:
        raise UploadError(f"{shown} is {width}x{height} = {width * height:,} pixels; the limit is {limits.pixels:,}")
    if width < 1 or height < 1:
        raise UploadError(f"{shown} has no pixels ({width}x{height})")
    try:
        return load_rgb(data, background=background)
    except ValueError as e:  # ImageDecodeError: a truncated or damaged body
        raise UploadError(f"{shown} cannot be decoded: {str(e).split(': ', 1)[-1]}") from None
