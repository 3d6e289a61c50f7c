"""Encoded image bytes -> 8-bit RGB, the same pixels as DALI's CPU decoder (``fn.decoders.image``,
``output_type=RGB``), for every format the shards may hold. Used by the Pillow loader, the shard
validation and the evaluation data, so all of them see what the DALI loader sees.

Where Pillow's plain ``convert("RGB")`` differs from DALI, and what is done instead:

- 16-bit grey PNG (Pillow mode ``I;16`` / ``I``): Pillow clips the values to 0..255, so an ordinary
  16-bit image comes out near-white. DALI scales: ``round(v / 257)``; so do we.
- EXIF orientation (JPEG): DALI applies it, Pillow does not; we do (``ImageOps.exif_transpose``).
- 16-bit colour PNG: Pillow keeps the high byte (``v >> 8``), DALI rounds; they differ by at most 1
  in some pixels (Pillow has no 48-bit mode to do better).

Everything else (8-bit RGB / L / LA / RGBA / P with or without transparency, 1-bit, CMYK and grey
JPEG) already agrees exactly: alpha is dropped, not composited, by both.
"""
from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image, ImageOps

FORMATS = ("JPEG", "PNG")            # what the shards may hold (shards.IMAGE_EXTS)
ORIENTATION = 0x0112                 # the EXIF tag
SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def jpeg_header_ok(data: bytes) -> bool:
    """The JPEG's marker segments up to the start of scan are well formed (each ``FF xx`` with a
    marker byte and a length inside the file). libjpeg (Pillow) tolerates some broken ones that DALI's
    parser refuses ("Invalid marker"), which would stop the whole DALI pipeline; such a file counts as
    a corrupt image for both loaders."""
    n = len(data)
    if data[:2] != b"\xff\xd8":
        return False
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        while i + 1 < n and data[i + 1] == 0xFF:             # fill bytes
            i += 1
        marker = data[i + 1]
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:        # markers without a length
            i += 2
            continue
        if marker < 0xC0 or marker in (0xD8, 0xD9):         # not a marker, or SOI / EOI before the scan
            return False
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2 or i + 2 + length > n:
            return False
        if marker == 0xDA:                                   # start of scan: the header is complete
            return True
        i += 2 + length
    return False


def png_chunks_ok(data: bytes) -> bool:
    """The PNG's chunks up to IEND lie inside the file and every critical chunk (IHDR, PLTE, IDAT...)
    has a correct CRC. Pillow does not check these CRCs and decodes damaged data; DALI refuses it
    (and stops the pipeline), so such a file is a corrupt image for both loaders."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    i, n = 8, len(data)
    while i + 12 <= n:
        length = int.from_bytes(data[i:i + 4], "big")
        kind = data[i + 4:i + 8]
        end = i + 8 + length
        if end + 4 > n:
            return False
        critical = not kind[0] & 0x20                       # upper-case first letter
        if critical and zlib.crc32(data[i + 4:end]) != int.from_bytes(data[end:end + 4], "big"):
            return False
        if kind == b"IEND":
            return True
        i = end + 4
    return False


def container_ok(fmt: str, data: bytes) -> bool:
    """The checks DALI's parsers make and Pillow's do not (``jpeg_header_ok``, ``png_chunks_ok``)."""
    return jpeg_header_ok(data) if fmt == "JPEG" else png_chunks_ok(data) if fmt == "PNG" else False


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB with DALI's conversions (module docstring)."""
    if img.getexif().get(ORIENTATION, 1) != 1:             # (exif_transpose copies even when upright)
        img = ImageOps.exif_transpose(img)
    if img.mode in SIXTEEN_BIT_GREY:
        v = np.asarray(img, dtype=np.int64)
        grey = np.clip((v + 128) // 257, 0, 255).astype(np.uint8)       # round(v / 257) without floats
        return Image.fromarray(grey, "L").convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def reduced_jpeg_draft(img: Image.Image, min_side: int) -> None:
    """Let a large JPEG decode at 1/2, 1/4 or 1/8 scale while its shorter side stays >= ``min_side``
    (much faster; the crops keep about their output resolution, ``augment.min_decode_side``)."""
    if img.format != "JPEG" or min_side <= 0:
        return
    short = min(img.width, img.height)
    factor = 1
    while factor < 8 and short // (factor * 2) >= min_side:
        factor *= 2
    if factor > 1:
        img.draft("RGB", (img.width // factor, img.height // factor))


def decoded_size(data: bytes, min_side: int = 0) -> tuple[int, int]:
    """``decode_rgb(data, min_side).size`` from the header alone, without decoding the pixels: the
    size after a reduced-scale JPEG decode and after the EXIF rotation (the DALI loader draws its
    crop boxes on it, as the Pillow loader does on the decoded image)."""
    img = Image.open(io.BytesIO(data))
    if img.format not in FORMATS:
        raise ValueError(f"image format {img.format}: allowed {list(FORMATS)}")
    reduced_jpeg_draft(img, min_side)
    width, height = img.size
    if img.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8):     # the rotations by a quarter turn
        width, height = height, width
    return width, height


def decode_rgb(data: bytes, min_side: int = 0) -> Image.Image:
    """Decode JPEG/PNG bytes to 8-bit RGB (``min_side`` > 0: a reduced-scale JPEG decode is allowed).
    Raises ``ValueError`` for another format, and whatever Pillow raises for a broken file."""
    img = Image.open(io.BytesIO(data))
    if img.format not in FORMATS:
        raise ValueError(f"image format {img.format}: allowed {list(FORMATS)}")
    if not container_ok(img.format, data):
        raise ValueError(f"malformed {img.format} file ("
                         + ("marker segments)" if img.format == "JPEG" else "chunk lengths or CRCs)"))
    reduced_jpeg_draft(img, min_side)
    return to_rgb(img)
