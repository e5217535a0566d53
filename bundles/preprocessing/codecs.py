"""Image decoders in NumPy and the standard library, so a Pi needs no imaging package.

Supported: PNG (8-bit gray / gray+alpha / RGB / RGBA / palette and 16-bit non-palette,
non-interlaced), binary and ASCII PGM/PPM (P2/P3/P5/P6), NPY (``allow_pickle=False``).
JPEG only when Pillow is importable. Every decoder returns an ``(H, W, C)`` array and
bounds what it allocates (``max_pixels``, a capped ``zlib`` output) so a hostile file
cannot exhaust memory.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

from bundles.errors import PreprocessingError

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _err(message: str, **kw: object) -> PreprocessingError:
    return PreprocessingError(f"op 'decode': {message}", **kw)  # type: ignore[arg-type]


def _check_size(height: int, width: int, max_pixels: int) -> None:
    if height < 1 or width < 1 or height * width > max_pixels:
        raise _err("image size out of range", expected=f"1..{max_pixels} pixels", found=f"{height}x{width}")


def sniff(data: bytes) -> str:
    """Name the container format from the first bytes."""
    if data.startswith(_PNG_SIG):
        return "png"
    if data[:2] in (b"P2", b"P3", b"P5", b"P6"):
        return "pnm"
    if data.startswith(b"\x93NUMPY"):
        return "npy"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    raise _err("unrecognised image format", expected="PNG, PGM/PPM, NPY or JPEG", found=repr(data[:8]))


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    kind = sniff(data)
    if kind == "png":
        return decode_png(data, max_pixels)
    if kind == "pnm":
        return decode_pnm(data, max_pixels)
    if kind == "npy":
        return decode_npy(data, max_pixels)
    return decode_jpeg(data, max_pixels)


def _unfilter(raw: bytes, height: int, width: int, bpp: int) -> np.ndarray:
    """Undo PNG per-row filters (RFC 2083 section 6). Returns (height, width*bpp) uint8."""
    stride = width * bpp
    if len(raw) < height * (stride + 1):
        raise _err("PNG image data is truncated", expected=height * (stride + 1), found=len(raw))
    rows = np.frombuffer(raw, dtype=np.uint8, count=height * (stride + 1)).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        ftype = int(rows[y, 0])
        line = rows[y, 1:]
        if ftype == 0:
            cur = line.copy()
        elif ftype == 1:  # Sub: running sum modulo 256 within each byte lane
            lanes = line.reshape(width, bpp).astype(np.uint64)
            cur = (np.cumsum(lanes, axis=0) % 256).astype(np.uint8).reshape(stride)
        elif ftype == 2:  # Up
            cur = line + prev
        elif ftype in (3, 4):
            cur = np.frombuffer(_unfilter_sequential(ftype, line.tobytes(), prev.tobytes(), bpp), np.uint8)
        else:
            raise _err(f"PNG row {y} has unknown filter type {ftype}", expected="0..4")
        out[y] = cur
        prev = out[y]
    return out


def _unfilter_sequential(ftype: int, line: bytes, prev: bytes, bpp: int) -> bytes:
    """Average and Paeth depend on the byte just decoded; plain Python beats NumPy scalars here."""
    cur = bytearray(len(line))
    for i, x in enumerate(line):
        a = cur[i - bpp] if i >= bpp else 0
        b = prev[i]
        if ftype == 3:
            cur[i] = (x + ((a + b) >> 1)) & 0xFF
        else:
            c = prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            cur[i] = (x + pred) & 0xFF
    return bytes(cur)


def decode_png(data: bytes, max_pixels: int) -> np.ndarray:
    pos, header, palette = 8, b"", None
    chunks: list[bytes] = []
    while True:
        if pos + 8 > len(data):
            raise _err("PNG ends before its IEND chunk")
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        crc = data[pos + 8 + length : pos + 12 + length]
        if len(body) != length or len(crc) != 4:
            raise _err(f"PNG chunk {ctype!r} is truncated")
        if zlib.crc32(ctype + body) != struct.unpack(">I", crc)[0]:
            raise _err(f"PNG chunk {ctype!r} fails its CRC check (corrupt file)")
        pos += 12 + length
        if ctype == b"IHDR":
            header = body
        elif ctype == b"PLTE":
            palette = body
        elif ctype == b"IDAT":
            chunks.append(body)
        elif ctype == b"IEND":
            break
    if len(header) != 13:
        raise _err("PNG has no valid IHDR chunk")
    width, height, depth, color, _comp, _filt, interlace = struct.unpack(">IIBBBBB", header)
    if color not in _PNG_CHANNELS:
        raise _err("unsupported PNG color type", expected=sorted(_PNG_CHANNELS), found=color)
    if depth not in ((8,) if color == 3 else (8, 16)):
        raise _err("unsupported PNG bit depth", expected="8 (or 16 for non-palette)", found=depth)
    if interlace != 0:
        raise _err("interlaced PNG is not supported; re-save it without interlacing")
    _check_size(height, width, max_pixels)
    channels = _PNG_CHANNELS[color]
    bpp = channels * depth // 8
    expected = height * (width * bpp + 1)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(b"".join(chunks), expected)
    except zlib.error as exc:
        raise _err(f"PNG image data does not inflate: {exc}") from None
    pixels = _unfilter(raw, height, width, bpp)
    image: np.ndarray
    if depth == 16:
        image = pixels.view(">u2").astype(np.uint16).reshape(height, width, channels)
    else:
        image = pixels.reshape(height, width, channels)
    if color == 3:
        if palette is None or len(palette) % 3:
            raise _err("palette PNG lacks a valid PLTE chunk")
        table = np.frombuffer(palette, np.uint8).reshape(-1, 3)
        index = image[:, :, 0]
        if int(index.max()) >= len(table):
            raise _err("palette index out of range", expected=f"< {len(table)}", found=int(index.max()))
        image = table[index]
    return image


def _pnm_tokens(data: bytes, count: int) -> tuple[list[int], int]:
    """Read ``count`` whitespace-separated integers after the magic, skipping # comments."""
    values: list[int] = []
    pos = 2
    while len(values) < count:
        while pos < len(data) and data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            while pos < len(data) and data[pos : pos + 1] not in (b"\n", b"\r"):
                pos += 1
            continue
        start = pos
        while pos < len(data) and data[pos : pos + 1].isdigit():
            pos += 1
        if start == pos or pos - start > 9:
            raise _err("PGM/PPM header is malformed")
        values.append(int(data[start:pos]))
    return values, pos


def decode_pnm(data: bytes, max_pixels: int) -> np.ndarray:
    magic = data[:2]
    channels = 3 if magic in (b"P3", b"P6") else 1
    (width, height, maxval), pos = _pnm_tokens(data, 3)
    _check_size(height, width, max_pixels)
    if not 1 <= maxval <= 65535:
        raise _err("PGM/PPM maxval out of range", expected="1..65535", found=maxval)
    dtype = np.uint8 if maxval < 256 else np.dtype(">u2")
    count = height * width * channels
    if magic in (b"P5", b"P6"):
        body = data[pos + 1 :]
        size = count * np.dtype(dtype).itemsize
        if len(body) < size:
            raise _err("PGM/PPM pixel data is truncated", expected=size, found=len(body))
        flat = np.frombuffer(body, dtype=dtype, count=count)
    else:
        words = data[pos:].split()
        if len(words) < count or not all(w.isdigit() and len(w) <= 5 for w in words[:count]):
            raise _err("ASCII PGM/PPM pixel data is truncated or malformed")
        flat = np.array([int(w) for w in words[:count]], dtype=np.int64)
    if int(flat.max()) > maxval:
        raise _err("PGM/PPM sample above maxval", expected=f"<= {maxval}", found=int(flat.max()))
    out_dtype = np.uint8 if maxval < 256 else np.uint16
    return flat.astype(out_dtype).reshape(height, width, channels)


def decode_npy(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise _err(f"NPY image does not load: {exc}") from None
    if not isinstance(array, np.ndarray) or array.ndim not in (2, 3) or array.dtype.kind not in "buif":
        raise _err(
            "NPY image must be a numeric (H, W) or (H, W, C) array",
            found=f"{getattr(array, 'dtype', '?')} {getattr(array, 'shape', '?')}",
        )
    _check_size(array.shape[0], array.shape[1], max_pixels)
    if array.ndim == 3 and not 1 <= array.shape[2] <= 4:
        raise _err("NPY image channel count", expected="1..4", found=array.shape[2])
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    array = np.asarray(array, dtype=array.dtype.newbyteorder("="))
    return array if array.ndim == 3 else array[:, :, None]


def decode_jpeg(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise _err(
            "JPEG decoding needs Pillow, which is not installed on this machine: "
            "`pip install pillow`, or send PNG/PGM/PPM/NPY images"
        ) from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            _check_size(height, width, max_pixels)
            array = np.asarray(img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode))
    except PreprocessingError:
        raise
    except Exception as exc:  # Pillow raises many types for corrupt files; translate once, here.
        raise _err(f"JPEG does not decode: {exc}") from None
    return array if array.ndim == 3 else array[:, :, None]
