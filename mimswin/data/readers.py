"""Files -> C x H x W tensors in their own dtype and units (the pixel contract of `pixels.py`), for every source.

Formats: anything PIL reads (8/16-bit gray, RGB, RGBA, palette, CMYK, 32-bit float), TIFF through `tifffile` (any
number of bands, planar or interleaved, its own axes say which; PIL takes over for codecs tifffile lacks without
`imagecodecs`), and `.npy` arrays (2-D, or 3-D laid out as `data.layout` says); held in memory (a data set's column):
encoded bytes, PIL images and arrays. Channels are matched to `data.channels` without guessing: equal counts pass, a
one-channel image is repeated for three channels (RGB presets keep working on gray data), an alpha band beyond the
wanted count is composited over white; anything else is a `SampleError` that sources skip and count.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import tifffile
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

from mimswin.data.device_crop import Encoded
from mimswin.data.pixels import SampleError, native_tensor

PIL_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm"}
TIFF_EXTENSIONS = {".tif", ".tiff"}
ARRAY_EXTENSIONS = {".npy"}
IMAGE_EXTENSIONS = PIL_EXTENSIONS | TIFF_EXTENSIONS | ARRAY_EXTENSIONS
ALPHA_MODES = ("RGBA", "LA", "PA")
TIFF_ALPHA = (1, 2)  # tifffile EXTRASAMPLE: ASSOCALPHA, UNASSALPHA
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END, JPEG_END_WINDOW = b"\xff\xd9", 1024  # the end-of-image marker, looked for near the end (padding may follow)
JPEG_MODES = {"L": 1, "RGB": 3}
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, either byte order
NPY_MAGIC = b"\x93NUMPY"
# The first bytes of the formats read here, to tell a damaged image from a file that is no image at all.
SIGNATURES = ((JPEG_MAGIC, "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
              *((magic, "TIFF") for magic in TIFF_MAGIC))


@dataclass(frozen=True)
class ReadSpec:
    """What the run reads: `channels` per image (None: as the file has them), the layout of 3-D `.npy` arrays
    (`auto`: the end axis whose length is `channels` when only one is, else the axis smaller than both others), and
    whether gray / RGB JPEGs stay undecoded for the device (`defer_jpeg`, `data.decode: device`)."""

    channels: Optional[int] = 3
    layout: str = "auto"
    defer_jpeg: bool = False


def pil_array(image: Image.Image) -> Tuple[np.ndarray, bool]:
    """(H x W or H x W x C array in the image's own depth, whether its last band is alpha)."""
    mode = image.mode
    if mode == "1":
        image, mode = image.convert("L"), "L"
    elif mode == "P":
        mode = "RGBA" if "transparency" in image.info else "RGB"
        image = image.convert(mode)
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image, mode = image.convert("RGB"), "RGB"
    elif mode not in ("L", "LA", "RGB", "RGBA", "F") and not mode.startswith("I"):
        image = image.convert("RGBA" if mode.endswith("A") else "RGB")
        mode = image.mode
    array = np.asarray(image)
    if mode == "I":  # 32-bit integer: PIL's mode for some 16-bit files; kept when the values fit 16 bits
        if array.min() < 0 or array.max() > 65535:
            raise SampleError("unsupported pixels", "32-bit integer pixels beyond the 16-bit range")
        array = array.astype(np.uint16)
    return array, mode in ALPHA_MODES


def array_chw(array: np.ndarray, layout: str, channels: Optional[int] = None) -> np.ndarray:
    """A 2-D or 3-D array as C x H x W; `layout` hwc / chw, or auto: the end axis of length `channels` when only one
    end has it, else the axis smaller than both others; an array that fits neither way is `ambiguous layout`."""
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3:
        raise SampleError("unsupported pixels", f"a {array.ndim}-D array {tuple(array.shape)} (read: 2-D or 3-D)")
    if layout == "auto":
        first, last = array.shape[0] == channels, array.shape[2] == channels
        if first == last:
            first, last = array.shape[0] < min(array.shape[1:]), array.shape[2] < min(array.shape[:2])
        if first == last:
            raise SampleError("ambiguous layout", f"array of shape {tuple(array.shape)}: set data.layout=hwc or chw")
        layout = "chw" if first else "hwc"
    return array if layout == "chw" else array.transpose(2, 0, 1)


def read_tiff(data: bytes) -> Tuple[np.ndarray, bool]:
    """(C x H x W array, last band is alpha) of a TIFF's first series, its axes telling planar from interleaved."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        series = tif.series[0]
        array, axes = series.asarray(), series.axes
        alpha = any(int(e) in TIFF_ALPHA for e in (tif.pages[0].extrasamples or ()))
    if array.ndim == 3 and axes.endswith("S"):
        return array.transpose(2, 0, 1), alpha
    if array.ndim in (2, 3):
        return (array[None] if array.ndim == 2 else array), alpha
    raise SampleError("unsupported pixels", f"a TIFF of {array.ndim} axes ({axes}, shape {tuple(array.shape)})")


def jpeg_header(data: bytes) -> Optional[Tuple[int, int, int]]:
    """(channels, height, width) of a gray or RGB JPEG, from its header alone; None for any other file (CMYK JPEGs,
    other formats, a header PIL cannot parse)."""
    if not data.startswith(JPEG_MAGIC):
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode, (width, height) = image.mode, image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError):
        return None
    return (JPEG_MODES[mode], height, width) if mode in JPEG_MODES else None


def read_jpeg(data: bytes, channels: int) -> Optional[np.ndarray]:
    """A gray or RGB JPEG decoded by torchvision's libjpeg-turbo (the same pixels as PIL's, without PIL's copy into a
    C x H x W layout: the array is a C x H x W view of the decoder's H x W x C buffer); None when torchvision refuses
    it (PIL then reads it as before)."""
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                           mode=ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB).numpy()
    except RuntimeError:
        return None


def image_format(data: bytes) -> Optional[str]:
    """The image format a file's first bytes announce, or None."""
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in SIGNATURES if data.startswith(magic)), None)


def unreadable(data: bytes, err: Exception) -> str:
    """What a file PIL cannot read is, said without the in-memory object PIL names for a file it does not recognise:
    a truncated or damaged image of the format its first bytes announce, with PIL's reason; or not an image, its
    first bytes shown (an HTML page, a Git LFS pointer)."""
    kind, unrecognised = image_format(data), isinstance(err, UnidentifiedImageError)
    if kind is None:
        return f"not an image: {len(data)} bytes starting {data[:16]!r}" if unrecognised else str(err)
    return f"a truncated or damaged {kind} ({len(data)} bytes): {'its header cannot be read' if unrecognised else err}"


def decode(data: bytes, ext: str, layout: str = "auto", channels: Optional[int] = None) -> Tuple[np.ndarray, bool]:
    """(C x H x W array in the file's own dtype, last band is alpha) of a file's bytes, by extension."""
    ext = ext.lower() if ext.startswith(".") else f".{ext.lower()}"
    if not data:
        raise SampleError("unreadable image", "empty file (0 bytes)")
    header = jpeg_header(data)
    if header is not None:
        array = read_jpeg(data, header[0])
        if array is not None:
            return array, False
    if ext in ARRAY_EXTENSIONS:
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise SampleError("unreadable image", f"not a readable .npy array ({err})") from None
        return array_chw(array, layout, channels), False
    if ext in TIFF_EXTENSIONS:
        try:
            return read_tiff(data)
        except SampleError:
            raise
        except Exception as err:  # noqa: BLE001 - tifffile's many decode errors; PIL may still read the file
            tiff_error = err
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            array, alpha = pil_array(image)
    except UnidentifiedImageError as err:
        raise SampleError("unreadable image", unreadable(data, err)) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as err:
        tiff_hint = f"{tiff_error} (pip install imagecodecs for its codec)" if ext in TIFF_EXTENSIONS else None
        hint = tiff_hint or unreadable(data, err)
        raise SampleError("unreadable image", hint) from None
    return (array.transpose(2, 0, 1) if array.ndim == 3 else array[None]), alpha


def over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Colour bands C x H x W composited over white by the alpha band, in the colour's own dtype."""
    if np.issubdtype(color.dtype, np.integer):
        top = float(np.iinfo(color.dtype).max)
        a = alpha.astype(np.float32) / top
        return np.clip(np.rint(color * a + top * (1 - a)), 0, top).astype(color.dtype)
    a = np.clip(alpha.astype(np.float32), 0.0, 1.0)
    return (color * a + (1 - a)).astype(color.dtype)


def match_channels(array: np.ndarray, alpha: bool, channels: Optional[int]) -> np.ndarray:
    """The image with `channels` bands, or `SampleError`: equal counts pass; an alpha band beyond them is composited
    over white; one channel is repeated for three."""
    count = array.shape[0]
    if channels is None or count == channels:
        return array
    if alpha and count - 1 in (channels, 1):
        array, count = over_white(array[:-1], array[-1:]), count - 1
    if count == 1 and channels == 3:
        array, count = np.repeat(array, 3, axis=0), 3
    if count != channels:
        raise SampleError("wrong channels", f"{count} channel(s), data.channels={channels}")
    return array


def channels_found(detail: str) -> Optional[Tuple[int, int]]:
    """(channels found, channels wanted) of a "wrong channels" skip, read back from the detail `match_channels`
    writes."""
    match = re.match(r"(\d+) channel\(s\), data\.channels=(\d+)", detail)
    return (int(match.group(1)), int(match.group(2))) if match else None


def finish(array: np.ndarray, alpha: bool, spec: ReadSpec) -> torch.Tensor:
    """A C x H x W array -> tensor of a native dtype with `spec.channels` bands; or `SampleError`."""
    if min(array.shape[1:]) < 1:
        raise SampleError("unsupported pixels", f"an empty image of shape {tuple(array.shape)}")
    return native_tensor(match_channels(array, alpha, spec.channels))


def read_bytes(data: bytes, ext: str, spec: ReadSpec) -> Union[torch.Tensor, Encoded]:
    """A file's bytes -> C x H x W tensor in its own dtype, channels matched to `spec`; or `SampleError`. With
    `spec.defer_jpeg`, a gray or RGB JPEG that decodes to `spec.channels` comes back `Encoded` instead."""
    if spec.defer_jpeg and JPEG_END in data[-JPEG_END_WINDOW:]:  # a truncated file is decoded here, and skipped
        header = jpeg_header(data)
        if header is not None and (header[0] == spec.channels or (header[0], spec.channels) == (1, 3)):
            return Encoded(torch.frombuffer(bytearray(data), dtype=torch.uint8), spec.channels, *header[1:])
    return finish(*decode(data, ext, spec.layout, spec.channels), spec)


def sniff_extension(data: bytes) -> str:
    """The extension that routes bytes of unknown name to their reader: .tif (tifffile: any band count), .npy, else
    '' (PIL tells the format from the bytes)."""
    if data[:4] in TIFF_MAGIC:
        return ".tif"
    return ".npy" if data.startswith(NPY_MAGIC) else ""


def read_image(value: object, spec: ReadSpec, dtype: Optional[np.dtype] = None) -> Union[torch.Tensor, Encoded]:
    """An image held in memory (a data set's column) -> as `read_bytes` gives it: encoded bytes (their format sniffed),
    a PIL image, or an array (2-D, or 3-D laid out as `spec.layout` says; nested lists as `dtype`)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return read_bytes(bytes(value), sniff_extension(bytes(value)), spec)
    if isinstance(value, Image.Image):
        array, alpha = pil_array(value)
        return finish(array.transpose(2, 0, 1) if array.ndim == 3 else array[None], alpha, spec)
    if value is None:
        raise SampleError("no image")
    array = np.asarray(value, dtype=dtype)
    return finish(array_chw(array, spec.layout, spec.channels), False, spec)


def read_path(path: Path, spec: ReadSpec) -> Union[torch.Tensor, Encoded]:
    """`read_bytes` of a file on disk (an unreadable file is a `SampleError` too)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise SampleError("unreadable image", err.strerror or str(err)) from None
    return read_bytes(data, Path(path).suffix, spec)
