"""Images out: tensors in [0, 1] -> PNG bytes, a grid of a batch, files on disk."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from featureviz.outputs import GRID_PAD
from featureviz.outputs import grid_layout
from featureviz.outputs import output_paths

__all__ = ["to_uint8", "png_bytes", "encode_png", "grid", "save_images", "load_image", "decode_image", "image_size",
           "MAX_DECODE_SIDE"]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (1, H, W) float in [0, 1] -> (H, W, 3) or (H, W) uint8 array (rounded, clipped)."""
    if image.dim() != 3:
        raise ValueError(f"image must be (C, H, W), got {tuple(image.shape)}")
    array = (image.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return array[0] if array.shape[0] == 1 else np.ascontiguousarray(array.transpose(1, 2, 0))


def png_bytes(image: torch.Tensor, *, max_side: int | None = None) -> bytes:
    """PNG file bytes of one (C, H, W) image in [0, 1], downscaled (Lanczos) to fit ``max_side`` if given."""
    array = to_uint8(image)
    if max_side and max(array.shape[:2]) > max_side:
        from PIL import Image

        pil = Image.fromarray(array)
        pil.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        array = np.asarray(pil)
    return encode_png(array)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_png(array: np.ndarray, *, level: int = 6) -> bytes:
    """An (H, W, 3) or (H, W) uint8 array -> the bytes of an 8-bit RGB or grey PNG (no interlace, no metadata).

    Every row is stored with the Up filter (the row above subtracted, in whole numpy arrays) and deflated at
    zlib ``level`` in one call: about half of Pillow's encoding time at every size (its per-row adaptive
    filtering and Python plumbing dominate small images), files about 1% larger (bench/RESULTS.md, issue 26,
    "Seventh pass"). Any PNG decoder reads it."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3) \
            or 0 in array.shape:
        raise ValueError(f"expected an (H, W, 3) or (H, W) uint8 array, got {array.dtype} {array.shape}")
    height, width = array.shape[:2]
    rows = np.ascontiguousarray(array).reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 2  # Up; the first row's "above" is zeros: the row itself
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as the filter is defined
    header = struct.pack(">IIBBBBB", width, height, 8, 2 if array.ndim == 3 else 0, 0, 0, 0)
    return b"".join((_PNG_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", zlib.compress(filtered, level)),
                     _chunk(b"IEND", b"")))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def grid(images: torch.Tensor, *, columns: int | None = None, pad: int = GRID_PAD, value: float = 1.0) -> torch.Tensor:
    """(B, C, H, W) -> one (C, H', W') image laid out by :func:`featureviz.outputs.grid_layout`: rows of
    ``columns`` images (default: about square), ``pad`` pixels of ``value`` between them."""
    b, c, h, w = images.shape
    size, places = grid_layout(b, h, w, columns=columns, pad=pad)
    out = torch.full((c, *size), value, dtype=images.dtype)
    for image, (top, left) in zip(images, places):
        out[:, top:top + h, left:left + w] = image.detach().cpu()
    return out


def save_images(images: torch.Tensor, out: str | os.PathLike, *, as_grid: bool = False) -> list[Path]:
    """Write a batch as PNG files (:func:`featureviz.outputs.output_paths`): ``out`` itself for one image or a
    grid, else ``stem_0.png``, ``stem_1.png`` ... Returns the paths written."""
    paths = output_paths(out, images.shape[0], as_grid=as_grid)
    if len(paths) == 1:
        paths[0].write_bytes(png_bytes(grid(images) if images.shape[0] > 1 else images[0]))
        return paths
    for path, image in zip(paths, images):
        path.write_bytes(png_bytes(image))
    return paths


# the largest side decode_image accepts unless told a smaller one (a server tells its Limits.max_image_side)
MAX_DECODE_SIDE = 4096
IMAGE_FORMATS = ("PNG", "JPEG")


def image_size(data: bytes, *, field: str = "init_image",
               formats: tuple[str, ...] | None = IMAGE_FORMATS) -> tuple[int, int]:
    """(width, height) of PNG or JPEG bytes (or ``formats``), read from the header: no pixel is decoded."""
    with _open(data, field, formats) as img:
        return img.size


def decode_image(data: bytes, size: tuple[int, int] | None = None, *, max_side: int = MAX_DECODE_SIDE,
                 field: str = "init_image", formats: tuple[str, ...] | None = IMAGE_FORMATS,
                 resample: str = "bicubic") -> torch.Tensor:
    """PNG or JPEG bytes -> a (3, H, W) float tensor in [0, 1], resized to ``size`` = (H, W) if given
    (``resample``: ``bicubic`` or ``bilinear``, Pillow's filters).

    The size is read from the header and checked against ``max_side`` before any pixel is decoded, so a small
    file that declares a huge image costs nothing. Errors are :class:`InvalidSpec` on ``field``. ``formats``:
    the formats accepted (None: any Pillow reads)."""
    from PIL import Image

    from featureviz.errors import InvalidSpec

    with _open(data, field, formats) as img:
        width, height = img.size
        if max(width, height) > max_side:
            raise InvalidSpec(field, f"the image is {width}x{height} pixels; the largest side allowed is {max_side}",
                              reason="IMAGE_TOO_LARGE")
        try:
            img.load()
            rgb = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
            raise InvalidSpec(field, f"the {img.format} image could not be decoded ({type(exc).__name__}: truncated "
                                     "or corrupt data)") from None
    if size is not None and rgb.size != (size[1], size[0]):
        rgb = rgb.resize((size[1], size[0]), {"bicubic": Image.Resampling.BICUBIC,
                                              "bilinear": Image.Resampling.BILINEAR}[resample])
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def _open(data: bytes, field: str, formats: tuple[str, ...] | None = IMAGE_FORMATS):
    """PIL's lazy open (header only); InvalidSpec naming the problem, never an object repr."""
    from PIL import Image
    from PIL import UnidentifiedImageError

    from featureviz.errors import InvalidSpec

    if not data:
        raise InvalidSpec(field, "the image is empty; send PNG or JPEG bytes")
    try:
        img = Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        wanted = " or ".join(formats) if formats else "an image"
        raise InvalidSpec(field, f"not a {wanted} image ({len(data)} bytes in no format it reads)") from None
    except Image.DecompressionBombError as exc:
        raise InvalidSpec(field, f"the image is too large to open ({exc}); the largest side allowed is at most "
                                 f"{MAX_DECODE_SIDE}", reason="IMAGE_TOO_LARGE") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidSpec(field, f"the image header could not be read ({type(exc).__name__}: truncated or corrupt "
                                 "data)") from None
    return img


def load_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A PNG or JPEG file as a (3, H, W) float tensor in [0, 1], resized (bicubic) to ``size`` = (H, W) if given."""
    from featureviz.errors import InvalidSpec

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidSpec("init_image", f"cannot read image {str(path)!r}: {exc.strerror or exc}") from exc
    return decode_image(data, size, formats=None)
