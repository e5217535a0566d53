"""Image ops: decode, resize, center_crop, normalize, layout.

An image batch is an ``(N, H, W, C)`` array, or, right after ``decode`` of images of
different sizes, a list of ``(H, W, C)`` arrays that ``resize`` or ``center_crop``
bring to one size. Resampling uses half-pixel centres (``align_corners=False``), the
convention of PyTorch ``interpolate``, TensorFlow 2 ``image.resize`` (no antialias) and
OpenCV, so a model trained with any of them sees the same pixels here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from bundles.errors import PreprocessingError
from bundles.preprocessing import _params as P
from bundles.preprocessing.base import Op, register
from bundles.preprocessing.codecs import decode_image

IMAGE = frozenset({"image"})
ImageBatch = np.ndarray | list[np.ndarray]


def check_numeric(op: str, array: np.ndarray) -> None:
    if array.dtype.kind not in "buif":
        raise PreprocessingError(
            f"op {op!r}: image data must be numeric", expected="bool/int/float dtype", found=str(array.dtype)
        )


def image_batch(op: str, value: object, *, ragged: bool) -> ImageBatch:
    """Accept an (N, H, W, C) array, or (when ``ragged``) a list of (H, W, C) arrays."""
    if isinstance(value, np.ndarray):
        if value.ndim != 4 or value.shape[0] == 0:
            raise PreprocessingError(
                f"op {op!r}: expected a non-empty image batch of shape (N, H, W, C); "
                "add a decode step (or expand_dims) first",
                found=f"shape {value.shape}",
            )
        check_numeric(op, value)
        return value
    if (
        ragged
        and isinstance(value, list)
        and value
        and all(isinstance(v, np.ndarray) and v.ndim == 3 for v in value)
    ):
        for v in value:
            check_numeric(op, v)
        return value
    what = "a list of images of different sizes" if isinstance(value, list) else type(value).__name__
    hint = (
        "; images differ in size: add a resize or center_crop step first" if isinstance(value, list) else ""
    )
    raise PreprocessingError(f"op {op!r}: expected an (N, H, W, C) image array{hint}", found=what)


def _convert_channels(image: np.ndarray, channels: int | None) -> np.ndarray:
    have = image.shape[2]
    if channels is None or have == channels:
        return image
    if not 1 <= have <= 4:
        raise PreprocessingError(
            "op 'decode': cannot convert channels",
            expected="images with 1..4 channels",
            found=f"{have} channels",
        )
    if have in (2, 4):  # drop alpha first
        image, have = image[:, :, : have - 1], have - 1
    if channels == 1 and have == 3:
        # ITU-R 601-2 luma; integer images use PIL's fixed-point weights and rounding.
        if image.dtype.kind in "ui":
            weights = np.array([19595, 38470, 7471], dtype=np.int64)
            luma = (image.astype(np.int64) @ weights + 0x8000) >> 16
        else:
            luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return luma.astype(image.dtype)[:, :, None]
    if channels in (3, 4) and have == 1:
        image, have = np.repeat(image, 3, axis=2), 3
    if channels == 4 and have == 3:
        kind = image.dtype.kind
        opaque = np.iinfo(image.dtype).max if kind in "ui" else (True if kind == "b" else 1.0)
        return np.concatenate([image, np.full((*image.shape[:2], 1), opaque, image.dtype)], axis=2)
    return image


@register
@dataclass(frozen=True)
class Decode(Op):
    """Encoded bytes (PNG, PGM/PPM, NPY, JPEG with Pillow) or an (N, H, W[, C]) array -> NHWC.

    ``channels`` converts to 1 (luma), 3 (RGB) or 4 (RGBA); None keeps what each image has.
    Images of one size are stacked into one array, otherwise a list is passed on.
    """

    name: ClassVar[str] = "decode"
    version: ClassVar[int] = 1
    since: ClassVar[str] = "0.1.0"
    kinds: ClassVar[frozenset[str]] = IMAGE

    channels: int | None = None
    max_pixels: int = 4096 * 4096

    def __post_init__(self) -> None:
        if self.channels is not None and P.as_int(self.name, "channels", self.channels) not in (1, 3, 4):
            raise P.fail(self.name, "channels", "null, 1, 3 or 4", self.channels)
        P.as_int(self.name, "max_pixels", self.max_pixels, 1, 1 << 28)

    def apply(self, value: object) -> object:
        if isinstance(value, np.ndarray):
            if value.ndim == 3:
                value = value[..., None]
            batch = image_batch(self.name, value, ragged=False)
            assert isinstance(batch, np.ndarray)
            if self.channels is None or batch.shape[3] == self.channels:
                return batch
            return np.stack([_convert_channels(img, self.channels) for img in batch])
        if not isinstance(value, (list, tuple)) or not value:
            raise PreprocessingError(
                "op 'decode': expected a non-empty list of encoded images (bytes) or an (N, H, W[, C]) array",
                found=type(value).__name__ if value is not None else "None",
            )
        for i, item in enumerate(value):
            if not isinstance(item, (bytes, bytearray, memoryview)):
                raise PreprocessingError(
                    f"op 'decode': item {i} is not bytes",
                    expected="encoded image bytes",
                    found=type(item).__name__,
                )
        images = []
        for i, item in enumerate(value):
            try:
                images.append(_convert_channels(decode_image(bytes(item), self.max_pixels), self.channels))
            except PreprocessingError as exc:
                detail = exc.message.removeprefix("op 'decode': ")
                raise PreprocessingError(
                    f"op 'decode': image {i}: {detail}", expected=exc.expected, found=exc.found
                ) from None
        if len({(img.shape, img.dtype) for img in images}) == 1:
            return np.stack(images)
        return images


def _source_index(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel bilinear taps: lower index, upper index, weight of the upper one."""
    scale = size_in / size_out
    src = np.maximum((np.arange(size_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    return low, high, (src - low).astype(np.float32)


def resize_image(image: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    """Resize one (H, W, C) image. Nearest keeps the dtype; bilinear returns float32."""
    h, w = image.shape[:2]
    if method == "nearest":
        rows = np.minimum(np.floor((np.arange(height) + 0.5) * (h / height)).astype(np.int64), h - 1)
        cols = np.minimum(np.floor((np.arange(width) + 0.5) * (w / width)).astype(np.int64), w - 1)
        picked: np.ndarray = image[rows][:, cols]
        return picked
    data = image.astype(np.float32)
    y0, y1, wy = _source_index(h, height)
    x0, x1, wx = _source_index(w, width)
    wy = wy[:, None, None]
    rows = data[y0] * (1 - wy) + data[y1] * wy
    wx = wx[None, :, None]
    out: np.ndarray = rows[:, x0] * (1 - wx) + rows[:, x1] * wx
    return out


@register
@dataclass(frozen=True)
class Resize(Op):
    """Resize every image to ``size = [height, width]`` (nearest or bilinear)."""

    name: ClassVar[str] = "resize"
    version: ClassVar[int] = 1
    since: ClassVar[str] = "0.1.0"
    kinds: ClassVar[frozenset[str]] = IMAGE

    size: tuple[int, ...]
    method: str = "bilinear"

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "size", P.as_int_tuple(self.name, "size", self.size, length=2, lo=1, hi=P.MAX_SIDE)
        )
        P.as_choice(self.name, "method", self.method, ("nearest", "bilinear"))

    def apply(self, value: object) -> object:
        batch = image_batch(self.name, value, ragged=True)
        height, width = self.size
        out = [resize_image(img, height, width, self.method) for img in batch]
        return np.stack(out)


@register
@dataclass(frozen=True)
class CenterCrop(Op):
    """Cut the central ``size = [height, width]`` window; offsets round down ((H - h) // 2)."""

    name: ClassVar[str] = "center_crop"
    version: ClassVar[int] = 1
    since: ClassVar[str] = "0.1.0"
    kinds: ClassVar[frozenset[str]] = IMAGE

    size: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "size", P.as_int_tuple(self.name, "size", self.size, length=2, lo=1, hi=P.MAX_SIDE)
        )

    def apply(self, value: object) -> object:
        batch = image_batch(self.name, value, ragged=True)
        height, width = self.size
        out = []
        for img in batch:
            h, w = img.shape[:2]
            if h < height or w < width:
                raise PreprocessingError(
                    "op 'center_crop': image smaller than the crop; add a resize step before it",
                    expected=f"at least {height}x{width}",
                    found=f"{h}x{w}",
                )
            top, left = (h - height) // 2, (w - width) // 2
            out.append(img[top : top + height, left : left + width])
        return np.stack(out)


@register
@dataclass(frozen=True)
class Normalize(Op):
    """``(x - mean[c]) / std[c]`` per channel along ``axis``, in float32."""

    name: ClassVar[str] = "normalize"
    version: ClassVar[int] = 1
    since: ClassVar[str] = "0.1.0"
    kinds: ClassVar[frozenset[str]] = IMAGE

    mean: tuple[float, ...]
    std: tuple[float, ...]
    axis: int = -1

    def __post_init__(self) -> None:
        mean = P.as_float_tuple(self.name, "mean", self.mean)
        std = P.as_float_tuple(self.name, "std", self.std)
        if len(mean) != len(std):
            raise P.fail(self.name, "std", f"as many values as mean ({len(mean)})", self.std)
        if any(s == 0.0 for s in std):
            raise P.fail(self.name, "std", "non-zero values", self.std)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        P.as_int(self.name, "axis", self.axis, -8, 7)

    def apply(self, value: object) -> object:
        batch = image_batch(self.name, value, ragged=False)
        assert isinstance(batch, np.ndarray)
        if not -batch.ndim < self.axis < batch.ndim or self.axis in (0, -batch.ndim):
            raise PreprocessingError(
                "op 'normalize': axis is not a channel axis of the batch",
                expected=f"1..{batch.ndim - 1}",
                found=self.axis,
            )
        channels = batch.shape[self.axis]
        if len(self.mean) not in (1, channels):
            raise PreprocessingError(
                "op 'normalize': mean/std length does not match the channel count",
                expected=f"1 or {channels}",
                found=len(self.mean),
            )
        shape = [1] * batch.ndim
        shape[self.axis] = len(self.mean)
        mean = np.asarray(self.mean, np.float32).reshape(shape)
        std = np.asarray(self.std, np.float32).reshape(shape)
        return (batch.astype(np.float32) - mean) / std


@register
@dataclass(frozen=True)
class Layout(Op):
    """Permute axes by letters, e.g. ``source="NHWC", target="NCHW"``. The batch axis N stays first."""

    name: ClassVar[str] = "layout"
    version: ClassVar[int] = 1
    since: ClassVar[str] = "0.1.0"
    kinds: ClassVar[frozenset[str]] = IMAGE

    source: str = "NHWC"
    target: str = "NCHW"

    def __post_init__(self) -> None:
        for param in ("source", "target"):
            text = P.as_str(self.name, param, getattr(self, param), max_len=8)
            if not text.startswith("N") or len(set(text)) != len(text) or not text.isalpha():
                raise P.fail(self.name, param, "distinct axis letters starting with N, e.g. NHWC", text)
        if sorted(self.source) != sorted(self.target):
            raise P.fail(self.name, "target", f"a permutation of {self.source!r}", self.target)

    def apply(self, value: object) -> object:
        if not isinstance(value, np.ndarray) or value.ndim != len(self.source) or value.shape[0] == 0:
            raise PreprocessingError(
                f"op 'layout': expected a non-empty {len(self.source)}-D array laid out as {self.source}",
                found=f"shape {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__,
            )
        return np.ascontiguousarray(np.transpose(value, [self.source.index(a) for a in self.target]))
