"""Safe image loading: paths stay inside the images root, pixel counts are capped, errors name the file."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Union

from PIL import Image

# Decompression-bomb guard: images above this many pixels are refused (about 8K x 8K).
DEFAULT_MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """An image that cannot be used: outside the root, missing, corrupt or too large."""


def resolve_image_path(images_root: Union[str, Path], rel_path: str) -> Path:
    """The absolute path of ``rel_path`` under ``images_root``; refuses paths that escape the root."""
    if not rel_path or not isinstance(rel_path, str):
        raise ImageError(f"empty image path under {images_root}")
    root = Path(images_root).resolve()
    if Path(rel_path).is_absolute():
        raise ImageError(f"image path {rel_path!r} is absolute; it must be relative to {root}")
    full = (root / rel_path).resolve()
    if full != root and root not in full.parents:
        raise ImageError(f"image path {rel_path!r} escapes the images root {root}")
    return full


def open_image_bytes(data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to RGB, checking the pixel count from the header before decoding."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{name}: {w}x{h} = {w * h} pixels exceeds the cap of {max_pixels}")
            im.load()
            return im.convert("RGB")
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e


def load_image(
    images_root: Union[str, Path], rel_path: str, max_pixels: int = DEFAULT_MAX_PIXELS, data: Optional[bytes] = None
) -> Image.Image:
    """Load ``rel_path`` (relative to ``images_root``) as an RGB image, or decode ``data`` when given."""
    if data is not None:
        return open_image_bytes(data, rel_path, max_pixels)
    path = resolve_image_path(images_root, rel_path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    return open_image_bytes(path.read_bytes(), str(path), max_pixels)


def probe_image(path: Union[str, Path], max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Verify an image file decodes; returns (width, height). Raises ImageError naming the file."""
    im = open_image_bytes(Path(path).read_bytes(), str(path), max_pixels)
    return im.size
