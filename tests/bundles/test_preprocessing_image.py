"""Image ops against independent computations (torch for resampling, a PNG encoder written
from the spec for decoding) on sklearn's bundled digits."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from sklearn.datasets import load_digits

from bundles.errors import PreprocessingError
from bundles.preprocessing import (
    Cast,
    CenterCrop,
    Clip,
    Decode,
    ExpandDims,
    Layout,
    Normalize,
    Pipeline,
    Reshape,
    Resize,
    Scale,
)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_digits().images  # (1797, 8, 8) float64 in 0..16


@pytest.fixture(scope="module")
def rgb_images() -> np.ndarray:
    """Digits turned into 8-bit RGB: each channel a different digit, so channels are distinguishable."""
    images = load_digits().images
    stacked = np.stack([images[0:30], images[30:60], images[60:90]], axis=-1)
    return np.clip(stacked * 16, 0, 255).astype(np.uint8)  # (30, 8, 8, 3)


# -- an independent PNG encoder (RFC 2083), used to check the decoder -------------------------------
def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _filter_row(ftype: int, row: bytes, prev: bytes, bpp: int) -> bytes:
    out = bytearray()
    for i, x in enumerate(row):
        a = row[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        pred = [0, a, b, (a + b) // 2, _paeth(a, b, c)][ftype]
        out.append((x - pred) % 256)
    return bytes(out)


def encode_png(
    image: np.ndarray, filters: list[int], *, interlace: int = 0, palette: bytes | None = None
) -> bytes:
    height, width = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    color = 3 if palette is not None else {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    depth = 16 if image.dtype == np.uint16 else 8
    raw_rows = [image[y].astype(">u2" if depth == 16 else np.uint8).tobytes() for y in range(height)]
    bpp = channels * depth // 8
    body = b""
    prev = bytes(len(raw_rows[0]))
    for y, row in enumerate(raw_rows):
        ftype = filters[y % len(filters)]
        body += bytes([ftype]) + _filter_row(ftype, row, prev, bpp)
        prev = row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace)
    extra = chunk(b"PLTE", palette) if palette is not None else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + extra
        + chunk(b"IDAT", zlib.compress(body))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("filters", [[0], [1], [2], [3], [4], [0, 1, 2, 3, 4]])
def test_png_decode_every_filter_rgb(rgb_images: np.ndarray, filters: list[int]) -> None:
    blobs = [encode_png(img, filters) for img in rgb_images[:5]]
    out = Decode().apply(blobs)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, rgb_images[:5])


def test_png_gray_rgba_16bit_and_palette(rgb_images: np.ndarray) -> None:
    gray = rgb_images[0, :, :, 0]
    np.testing.assert_array_equal(Decode().apply([encode_png(gray, [4])])[0, :, :, 0], gray)  # type: ignore[index]
    rgba = np.concatenate([rgb_images[1], np.full((8, 8, 1), 200, np.uint8)], axis=2)
    np.testing.assert_array_equal(Decode().apply([encode_png(rgba, [3, 4])])[0], rgba)  # type: ignore[index]
    deep = rgb_images[2].astype(np.uint16) * 257 + 3
    decoded = Decode().apply([encode_png(deep, [1, 4])])
    assert decoded.dtype == np.uint16  # type: ignore[union-attr]
    np.testing.assert_array_equal(decoded[0], deep)  # type: ignore[index]
    palette = bytes([0, 0, 0, 255, 0, 0, 0, 255, 0])
    index = (rgb_images[3, :, :, 0] % 3).astype(np.uint8)
    expected = np.frombuffer(palette, np.uint8).reshape(3, 3)[index]
    np.testing.assert_array_equal(Decode().apply([encode_png(index, [2], palette=palette)])[0], expected)  # type: ignore[index]


def test_png_channel_conversion_matches_pil_luma(rgb_images: np.ndarray) -> None:
    img = rgb_images[4]
    gray = Decode(channels=1).apply([encode_png(img, [0])])[0, :, :, 0]  # type: ignore[index]
    r, g, b = (img[:, :, i].astype(np.int64) for i in range(3))
    expected = (r * 299 + g * 587 + b * 114 + 500) // 1000  # PIL's documented formula, rounded
    assert np.abs(gray.astype(np.int64) - expected).max() <= 1
    rgba = Decode(channels=4).apply([encode_png(img[:, :, 0], [0])])[0]  # type: ignore[index]
    np.testing.assert_array_equal(rgba[:, :, :3], np.repeat(img[:, :, :1], 3, axis=2))
    assert (rgba[:, :, 3] == 255).all()


def test_png_corruption_refused(rgb_images: np.ndarray) -> None:
    blob = bytearray(encode_png(rgb_images[0], [4]))
    blob[40] ^= 0xFF
    with pytest.raises(PreprocessingError, match=r"image 0: .*CRC"):
        Decode().apply([bytes(blob)])
    with pytest.raises(PreprocessingError, match="interlaced"):
        Decode().apply([encode_png(rgb_images[0], [0], interlace=1)])
    with pytest.raises(PreprocessingError, match="IEND"):
        Decode().apply([encode_png(rgb_images[0], [0])[:-12]])
    with pytest.raises(PreprocessingError, match="size out of range"):
        Decode(max_pixels=32).apply([encode_png(rgb_images[0], [0])])
    with pytest.raises(PreprocessingError, match="unrecognised image format"):
        Decode().apply([b"GIF89a...."])


def test_pnm_and_npy_decode(rgb_images: np.ndarray) -> None:
    img = rgb_images[5]
    p6 = b"P6\n# a comment\n8 8\n255\n" + img.tobytes()
    p5 = b"P5 8 8 255\n" + img[:, :, 0].tobytes()
    p2 = b"P2\n8 8\n255\n" + " ".join(str(v) for v in img[:, :, 1].ravel()).encode()
    out = Decode(channels=3).apply([p6, p5, p2])
    assert isinstance(out, np.ndarray) and out.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(out[0], img)
    np.testing.assert_array_equal(out[1], np.repeat(img[:, :, :1], 3, axis=2))
    np.testing.assert_array_equal(out[2], np.repeat(img[:, :, 1:2], 3, axis=2))
    buf = io.BytesIO()
    np.save(buf, img.astype(">f4"))
    npy = Decode().apply([buf.getvalue()])
    assert npy.dtype == np.float32  # type: ignore[union-attr]
    np.testing.assert_array_equal(npy[0], img.astype(np.float32))  # type: ignore[index]


def test_jpeg_without_pillow_says_what_to_do() -> None:
    try:
        import PIL  # noqa: F401
    except ImportError:
        with pytest.raises(PreprocessingError, match="Pillow"):
            Decode().apply([b"\xff\xd8\xff\xe0" + bytes(100)])
    else:
        pytest.skip("Pillow installed: the missing-Pillow message cannot be shown")


def test_mixed_sizes_need_resize(rgb_images: np.ndarray) -> None:
    small = encode_png(rgb_images[0, :4, :6], [0])
    big = encode_png(rgb_images[1], [0])
    with pytest.raises(PreprocessingError, match="resize"):
        Pipeline([Decode(), Scale(multiply=2.0)]).transform([small, big])
    out = Pipeline([Decode(), Resize(size=(8, 8), method="nearest")]).transform([small, big])["input"]
    assert out.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(out[1], rgb_images[1])


@pytest.mark.parametrize("size", [(16, 16), (5, 3), (8, 8), (13, 21)])
def test_resize_matches_torch(rgb_images: np.ndarray, size: tuple[int, int]) -> None:
    torch = pytest.importorskip("torch")
    batch = rgb_images[:6]
    nchw = torch.from_numpy(batch.astype(np.float32)).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(nchw, size=size, mode="bilinear", align_corners=False)
    ours = Resize(size=size).apply(batch)
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-3)
    ref_n = torch.nn.functional.interpolate(nchw, size=size, mode="nearest-exact")
    np.testing.assert_array_equal(
        Resize(size=size, method="nearest").apply(batch), ref_n.permute(0, 2, 3, 1).numpy().astype(np.uint8)
    )


def test_nearest_upsample_by_two_is_repeat(rgb_images: np.ndarray) -> None:
    out = Resize(size=(16, 16), method="nearest").apply(rgb_images)
    np.testing.assert_array_equal(out, rgb_images.repeat(2, axis=1).repeat(2, axis=2))


def test_center_crop_takes_the_middle() -> None:
    ys, xs = np.meshgrid(np.arange(11), np.arange(9), indexing="ij")
    coords = np.stack([ys, xs], axis=-1)[None].astype(np.int32)  # (1, 11, 9, 2): pixel = its own (y, x)
    out = CenterCrop(size=(4, 4)).apply(coords)
    assert out[0, 0, 0].tolist() == [3, 2]  # ((11-4)//2, (9-4)//2)
    assert out[0, -1, -1].tolist() == [6, 5]
    with pytest.raises(PreprocessingError, match="add a resize"):
        CenterCrop(size=(12, 4)).apply(coords)


def test_scale_normalize_layout_on_digits(digits: np.ndarray, rgb_images: np.ndarray) -> None:
    scaled = Scale(multiply=1 / 16).apply(digits[:, :, :, None])
    np.testing.assert_allclose(scaled, digits[:, :, :, None] / 16.0, rtol=1e-6)
    mean, std = (10.0, 20.0, 30.0), (2.0, 4.0, 8.0)
    norm = Normalize(mean=mean, std=std).apply(rgb_images)
    for c in range(3):
        np.testing.assert_allclose(norm[..., c], (rgb_images[..., c] - mean[c]) / std[c], rtol=1e-6)
    chw = Layout(source="NHWC", target="NCHW").apply(rgb_images)
    assert chw.shape == (30, 3, 8, 8)  # type: ignore[union-attr]
    assert chw[7, 2, 3, 5] == rgb_images[7, 3, 5, 2]  # type: ignore[index]
    norm_chw = Normalize(mean=mean, std=std, axis=1).apply(chw)
    np.testing.assert_allclose(norm_chw, np.transpose(norm, (0, 3, 1, 2)), rtol=1e-6)
    back = Layout(source="NCHW", target="NHWC").apply(chw)
    np.testing.assert_array_equal(back, rgb_images)


def test_digits_pipeline_end_to_end(digits: np.ndarray) -> None:
    p = Pipeline([Scale(multiply=1 / 16), ExpandDims(axis=-1)], output="input")
    feats = p.transform(digits)
    assert p.input_kind == "image"
    assert feats["input"].shape == (1797, 8, 8, 1) and feats["input"].dtype == np.float32
    np.testing.assert_allclose(feats["input"][..., 0], digits / 16, rtol=1e-6)
    flat = Pipeline([Reshape(shape=(64,)), Cast(dtype="float32")]).transform(digits)["input"]
    np.testing.assert_array_equal(flat, load_digits().data.astype(np.float32))


def test_cast_and_clip_refuse_silent_wrap(digits: np.ndarray) -> None:
    with pytest.raises(PreprocessingError, match="out of range for int8"):
        Cast(dtype="int8").apply(digits * 100)
    bad = digits[:2].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(PreprocessingError, match="impute"):
        Cast(dtype="int32").apply(bad)
    clipped = Pipeline([Clip(min=2.0, max=10.0), Cast(dtype="uint8")]).transform(digits)["input"]
    np.testing.assert_array_equal(clipped, np.minimum(np.maximum(digits, 2), 10).astype(np.uint8))


def test_bad_image_inputs_say_what_was_expected() -> None:
    p = Pipeline([Decode(), Resize(size=(4, 4))])
    with pytest.raises(PreprocessingError, match=r"expected.*found: str|found: str"):
        p.transform("not a batch")
    with pytest.raises(PreprocessingError, match="shape"):
        p.transform(np.zeros((4, 4)))
    with pytest.raises(PreprocessingError, match="numeric"):
        p.transform(np.array([[["a"]]]))
    with pytest.raises(PreprocessingError, match=r"item 1 is not bytes|non-empty list"):
        Decode().apply([b"x", 3])
    with pytest.raises(PreprocessingError, match="size"):
        Resize(size=(0, 4))
