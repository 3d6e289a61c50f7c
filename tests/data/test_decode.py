"""The Pillow path (training loader and evaluation) gives the same pixels as DALI's CPU decoder for
every image format the shards may hold."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fasttips.data.decode import decode_rgb, decoded_size

H, W = 24, 32


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png48(rgb16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", rgb16.shape[1], rgb16.shape[0], 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def formats(seed: int) -> dict[str, tuple[bytes, int]]:
    """name -> (encoded bytes, largest allowed pixel difference from DALI)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    grey16 = rng.integers(0, 65536, (H, W)).astype(np.uint16)
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6                                        # EXIF orientation: rotate 90° clockwise
    return {
        "png_rgb": (_save(Image.fromarray(rgb), "PNG"), 0),
        "png_l": (_save(Image.fromarray(rgb[..., 0]), "PNG"), 0),
        "png_la": (_save(Image.fromarray(rgb[..., :2].copy(), "LA"), "PNG"), 0),
        "png_rgba": (_save(Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"), "PNG"), 0),
        "png_p": (_save(Image.fromarray(rgb).quantize(16), "PNG"), 0),
        "png_p_transparent": (_save(Image.fromarray(rgb).quantize(16), "PNG", transparency=3), 0),
        "png_1bit": (_save(Image.fromarray(rgb[..., 0] > 128), "PNG"), 0),
        "png_grey16": (_save(Image.fromarray(grey16), "PNG"), 0),
        "png_rgb16": (_png48(rng.integers(0, 65536, (H, W, 3)).astype(np.uint16)), 1),   # see decode.py
        "jpeg_rgb": (_save(Image.fromarray(rgb), "JPEG", quality=95), 1),
        "jpeg_grey": (_save(Image.fromarray(rgb[..., 0]), "JPEG", quality=95), 1),
        "jpeg_cmyk": (_save(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), 1),
        "jpeg_exif_rotated": (_save(rotated, "JPEG", quality=95, exif=exif.tobytes()), 1),
    }


def dali_decode(encoded: list[bytes]) -> list[np.ndarray]:
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(encoded), num_threads=1, device_id=None)
    def pipe():
        data = fn.external_source(source=lambda: [np.frombuffer(e, np.uint8) for e in encoded], batch=True)
        return fn.decoders.image(data, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.array(out[i]) for i in range(len(encoded))]


def test_pillow_path_matches_dali_pixel_for_pixel(seed):
    cases = formats(seed)
    reference = dali_decode([data for data, _ in cases.values()])
    for (name, (data, tolerance)), want in zip(cases.items(), reference):
        got = np.asarray(decode_rgb(data))
        assert got.shape == want.shape, f"{name}: {got.shape} vs DALI {want.shape}"
        diff = np.abs(got.astype(int) - want.astype(int)).max()
        assert diff <= tolerance, f"{name}: pixels differ from DALI's by up to {diff} (seed {seed})"


@pytest.mark.parametrize("min_side", [0, 20, 60])
def test_decoded_size_is_the_decoded_images_size_without_decoding(seed, min_side):
    """The DALI loader draws its crop boxes on ``decoded_size``: it must be the size the Pillow
    loader decodes to, after a reduced-scale JPEG decode and the EXIF rotation."""
    rng = np.random.default_rng(seed)
    big = rng.integers(0, 256, (150, 260, 3), dtype=np.uint8)
    rotated = Image.fromarray(big)
    exif = rotated.getexif()
    exif[0x0112] = 8                                        # EXIF orientation: rotate 90° counter-clockwise
    cases = {name: data for name, (data, _) in formats(seed).items()}
    cases["jpeg_large"] = _save(Image.fromarray(big), "JPEG", quality=90)
    cases["jpeg_large_odd"] = _save(Image.fromarray(big[:149, :257]), "JPEG", quality=90)
    cases["jpeg_large_rotated"] = _save(rotated, "JPEG", quality=90, exif=exif.tobytes())
    for name, data in cases.items():
        assert decoded_size(data, min_side) == decode_rgb(data, min_side).size, (name, min_side)
    assert decoded_size(cases["jpeg_large_rotated"]) == (150, 260)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, H * W).reshape(H, W).astype(np.uint16)
    got = np.asarray(decode_rgb(_save(Image.fromarray(ramp), "PNG")))
    assert abs(got.mean() - 127.5) < 1 and got.min() == 0 and got.max() == 255


def test_eval_images_use_the_same_decoder(tmp_path):
    from fasttips.data.shards import ShardWriter
    from fasttips.eval.data import load_eval_set

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    with ShardWriter(tmp_path, samples_per_shard=8) as w:
        w.write("grey16", _save(Image.fromarray(ramp), "PNG"), "png", {"alt": "a grey ramp"})
    ev = load_eval_set(None, path=str(tmp_path), n_images=1, size=64)
    assert abs(float(ev.images.mean()) - 0.5) < 0.02           # TIPS pixels in [0, 1]; near-white before


def test_other_formats_are_refused():
    with pytest.raises(ValueError, match="format GIF"):
        decode_rgb(_save(Image.fromarray(np.zeros((4, 4), np.uint8)), "GIF"))


def _broken_marker_jpeg(seed: int) -> bytes:
    """A JPEG whose first Huffman-table segment lost its 0xFF: libjpeg skips to the next marker and
    decodes it, DALI's parser refuses it ("Invalid marker")."""
    rng = np.random.default_rng(seed)
    data = bytearray(_save(Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)), "JPEG"))
    data[data.index(b"\xff\xc4")] = 0x1A
    return bytes(data)


def test_a_jpeg_with_a_broken_marker_is_corrupt_for_both_loaders(seed):
    from fasttips.data.shards import image_is_valid

    data = _broken_marker_jpeg(seed)
    Image.open(io.BytesIO(data)).convert("RGB")             # Pillow alone would accept it
    with pytest.raises(Exception):
        dali_decode([data])                                 # ... and DALI stops on it
    assert not image_is_valid(data)                          # so the index leaves it out
    with pytest.raises(ValueError, match="malformed JPEG"):
        decode_rgb(data)


def test_a_png_with_a_bad_crc_is_corrupt_for_both_loaders(seed):
    from fasttips.data.shards import image_is_valid

    rng = np.random.default_rng(seed)
    data = bytearray(_save(Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)), "PNG"))
    idat = data.index(b"IDAT")
    crc_at = idat + 4 + int.from_bytes(data[idat - 4:idat], "big")
    data[crc_at] ^= 0x55                                     # the image data's CRC no longer matches
    data = bytes(data)
    Image.open(io.BytesIO(data)).convert("RGB")             # Pillow alone would accept it
    with pytest.raises(Exception):
        dali_decode([data])                                 # ... and DALI stops on it
    assert not image_is_valid(data)
    with pytest.raises(ValueError, match="malformed PNG"):
        decode_rgb(data)
