"""Inline images of requests: data: URLs only (the server never fetches), header probe before any decode."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from mmrole.data.images import ImageError, open_image_bytes
from mmrole.serving.errors import bad_request
from mmrole.serving.settings import RequestLimits

ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
REQUEST_IMAGE = "<request>"  # Sample.image of an image that came in the request body


def decode_image_url(url: Any, limits: RequestLimits, param: str) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URL. Remote URLs are refused: the server never fetches."""
    if isinstance(url, dict):  # {"url": ...} as in OpenAI image_url parts
        url = url.get("url")
        param = f"{param}.url"
    if not isinstance(url, str) or not url:
        raise bad_request(param, f"'{param}' must be a data: URL string", "wrong_type")
    scheme = url[:12].lower()
    if scheme.startswith(("http://", "https://", "ftp://", "file:")):
        raise bad_request(
            param,
            f"'{param}': remote image URLs are not fetched; send the image inline as a "
            "data:image/<type>;base64,... URL",
            "remote_url_not_allowed",
        )
    if not scheme.startswith("data:"):
        raise bad_request(param, f"'{param}' must be a data:image/<type>;base64,... URL", "invalid_image_url")
    head, sep, payload = url.partition(",")
    if not sep:
        raise bad_request(param, f"'{param}': data URL has no ',' before the payload", "invalid_image_url")
    media = [p.strip().lower() for p in head[5:].split(";")]
    if "base64" not in media[1:]:
        raise bad_request(param, f"'{param}': data URL must be base64-encoded (';base64,')", "invalid_image_url")
    if media[0] and not media[0].startswith("image/"):
        raise bad_request(param, f"'{param}': media type {media[0]!r} is not an image", "invalid_image_url")
    if len(payload) > 4 * (limits.max_image_bytes // 3 + 1) + 1024:  # checked before decoding (whitespace slack)
        raise bad_request(param, f"'{param}': image exceeds {limits.max_image_bytes} bytes", "image_too_large")
    if any(c in payload for c in " \n\r\t"):  # base64 wrapped over lines (MIME style)
        payload = "".join(payload.split())
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(param, f"'{param}': payload is not valid base64", "invalid_base64")
    if not data:
        raise bad_request(param, f"'{param}': image is empty (0 bytes)", "empty_image")
    if len(data) > limits.max_image_bytes:
        raise bad_request(
            param,
            f"'{param}': image is {len(data)} bytes, above the cap of {limits.max_image_bytes}",
            "image_too_large",
        )
    return data


def probe_image(data: bytes, limits: RequestLimits, param: str) -> tuple[int, int, str]:
    """(width, height, format) from the image header, checked against the limits; decodes no pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = (im.format or "").upper(), im.size
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, DecompressionBombError, ...)
        raise bad_request(param, f"'{param}': not a readable image ({type(e).__name__})", "invalid_image")
    if fmt not in ALLOWED_IMAGE_FORMATS:
        raise bad_request(
            param,
            f"'{param}': image format {fmt or '?'} not accepted; use one of {ALLOWED_IMAGE_FORMATS}",
            "invalid_image",
        )
    if w < 1 or h < 1:
        raise bad_request(param, f"'{param}': image has no pixels ({w}x{h})", "invalid_image")
    if w > limits.max_image_side or h > limits.max_image_side or w * h > limits.max_image_pixels:
        raise bad_request(
            param,
            f"'{param}': image is {w}x{h}; the caps are {limits.max_image_side} px a side and "
            f"{limits.max_image_pixels} pixels",
            "image_too_large",
        )
    if max(w, h) / min(w, h) > limits.max_aspect_ratio:
        raise bad_request(
            param, f"'{param}': image aspect ratio {w}x{h} exceeds {limits.max_aspect_ratio:g}:1", "invalid_image"
        )
    return w, h, fmt


def decode_image(data: bytes, limits: RequestLimits, param: str):
    """Full decode to RGB (after :func:`probe_image`); corrupt or truncated data -> 400."""
    try:
        return open_image_bytes(data, param, limits.max_image_pixels)
    except ImageError as e:
        raise bad_request(param, f"'{param}': {str(e)[:200]}", "invalid_image")
