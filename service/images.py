"""Image headers and structure, read with the standard library alone: format, size and kind, before any decoding.

``image_info(data, max_side)`` reads a PNG, JPEG, GIF, BMP or WebP file's header (its size is checked against
``max_side`` first), then walks the file's structure far enough to tell a whole file from a truncated or corrupt
one without decoding pixels: PNG chunks with their CRCs and the IDAT stream inflated in bounded pieces to exactly
the size its header implies; JPEG segments up to the scan and its end marker; GIF blocks up to the trailer; BMP
pixel rows within the file; WebP's RIFF chunks within the file. The pixels are decoded later, where images are used
(the worker), which converts the kinds this module reports (grayscale, palette, 16_bit, alpha, cmyk) to RGB.

Nothing here allocates more than the file it is given plus a fixed buffer; no string from a file reaches a path.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

__all__ = ["ImageInfo", "SkipFile", "image_info", "FORMATS", "archive_kind"]

FORMATS = ("png", "jpeg", "gif", "bmp", "webp")
_INFLATE_PIECE = 1 << 20


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    converted: tuple[str, ...] = ()  # grayscale, palette, 16_bit, alpha, cmyk: converted to RGB when used


class SkipFile(Exception):
    """A file a dataset does not take: ``cause`` (not_an_image, corrupt, too_large, nested_archive, ...) and
    ``detail``, the problem in words."""

    def __init__(self, cause: str, detail: str):
        super().__init__(detail)
        self.cause = cause
        self.detail = detail


def _corrupt(fmt: str, what: str) -> SkipFile:
    return SkipFile("corrupt", f"a corrupt or truncated {fmt.upper()} file: {what}")


def archive_kind(data: bytes) -> str | None:
    """The archive or compressed format ``data`` starts with (zip, gzip, bzip2, xz, zstd, 7z, rar, tar), or None."""
    magics = ((b"PK\x03\x04", "zip"), (b"PK\x05\x06", "zip"), (b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"),
              (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"7z\xbc\xaf\x27\x1c", "7z"),
              (b"Rar!\x1a\x07", "rar"))
    for magic, kind in magics:
        if data.startswith(magic):
            return kind
    if len(data) >= 263 and data[257:262] == b"ustar":
        return "tar"
    return None


def image_info(data: bytes, max_side: int) -> ImageInfo:
    """-> the image's format, size and kinds to convert; raises :class:`SkipFile` for anything that is not a whole
    PNG, JPEG, GIF, BMP or WebP file, or whose side is over ``max_side`` (read from the header, nothing decoded)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(data, max_side)
    if data.startswith(b"\xff\xd8\xff"):
        return _jpeg(data, max_side)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return _gif(data, max_side)
    if data.startswith(b"BM") and len(data) >= 26:
        return _bmp(data, max_side)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data, max_side)
    kind = archive_kind(data)
    if kind is not None:
        raise SkipFile("nested_archive", f"a nested archive ({kind}); archives inside an archive are not unpacked")
    raise SkipFile("not_an_image", "not a PNG, JPEG, GIF, BMP or WebP file")


def _check_side(fmt: str, width: int, height: int, max_side: int) -> None:
    if width <= 0 or height <= 0:
        raise _corrupt(fmt, f"its header says {width}x{height}")
    if max(width, height) > max_side:
        raise SkipFile("too_large", f"{width}x{height} in its header, over the largest side of {max_side} "
                                    "(max_dataset_image_side); scale it down first")


# ------------------------------------------------------------------------------------------------------ PNG

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png(data: bytes, max_side: int) -> ImageInfo:
    if len(data) < 33 or data[12:16] != b"IHDR" or struct.unpack(">I", data[8:12])[0] != 13:
        raise _corrupt("png", "no IHDR chunk first")
    width, height, depth, color, compression, filtering, interlace = struct.unpack(">IIBBBBB", data[16:29])
    _check_side("png", width, height, max_side)
    if color not in _PNG_CHANNELS or depth not in _PNG_DEPTHS[color] or compression or filtering or interlace > 1:
        raise _corrupt("png", f"an invalid IHDR (colour type {color}, bit depth {depth})")
    expected = _png_raw_size(width, height, _PNG_CHANNELS[color] * depth, interlace)
    inflate, produced, pos, seen_idat, ended, palette = zlib.decompressobj(), 0, 8, False, False, False
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos: pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise _corrupt("png", f"chunk {kind!r} runs past the end of the file")
        body = data[pos + 8: pos + 8 + length]
        if zlib.crc32(kind + body) != struct.unpack(">I", data[end - 4: end])[0]:
            raise _corrupt("png", f"chunk {kind!r} fails its CRC")
        if kind == b"PLTE":
            palette = True
        elif kind == b"IDAT":
            seen_idat = True
            produced += _inflate(inflate, body, expected - produced)
        elif kind == b"IEND":
            ended = True
            break
        pos = end
    if not ended:
        raise _corrupt("png", "no IEND chunk (truncated)")
    if not seen_idat or color == 3 and not palette:
        raise _corrupt("png", "no image data" if not seen_idat else "a palette image without a palette")
    produced += _inflate(inflate, b"", expected - produced, flush=True)
    if produced != expected or not inflate.eof:
        raise _corrupt("png", f"its pixel data inflates to {produced} bytes, not the {expected} its header implies")
    kinds = []
    if color in (0, 4):
        kinds.append("grayscale")
    if color == 3:
        kinds.append("palette")
    if depth == 16:
        kinds.append("16_bit")
    if color in (4, 6):
        kinds.append("alpha")
    return ImageInfo("png", width, height, tuple(kinds))


def _png_raw_size(width: int, height: int, bits: int, interlace: int) -> int:
    def rows(w: int, h: int) -> int:
        return 0 if w == 0 or h == 0 else h * (1 + (w * bits + 7) // 8)

    if not interlace:
        return rows(width, height)
    return sum(rows((width - x0 + dx - 1) // dx if width > x0 else 0, (height - y0 + dy - 1) // dy if height > y0 else 0)
               for x0, y0, dx, dy in _ADAM7)


def _inflate(inflate, body: bytes, room: int, *, flush: bool = False) -> int:
    """Inflate ``body`` in bounded pieces, counting the bytes; more than ``room`` (what the header allows) is an
    error as soon as it appears, so a deflate bomb in an IDAT never grows past one piece."""
    produced = 0
    try:
        piece = inflate.decompress(body, _INFLATE_PIECE) if not flush else inflate.flush(_INFLATE_PIECE)
        while True:
            produced += len(piece)
            if produced > room:
                raise _corrupt("png", "its pixel data inflates to more bytes than its header implies")
            if not inflate.unconsumed_tail:
                break
            piece = inflate.decompress(inflate.unconsumed_tail, _INFLATE_PIECE)
    except zlib.error as exc:
        raise _corrupt("png", f"its pixel data does not inflate ({exc})") from None
    return produced


# ------------------------------------------------------------------------------------------------------ JPEG

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(data: bytes, max_side: int) -> ImageInfo:
    pos, size = 2, None
    while True:
        while pos < len(data) and data[pos] == 0xFF and pos + 1 < len(data) and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 4 > len(data) or data[pos] != 0xFF:
            raise _corrupt("jpeg", "a segment is cut off or malformed before the scan")
        marker = data[pos + 1]
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        length = struct.unpack(">H", data[pos + 2: pos + 4])[0]
        if length < 2 or pos + 2 + length > len(data):
            raise _corrupt("jpeg", "a segment runs past the end of the file")
        if marker in _SOF:
            if length < 8:
                raise _corrupt("jpeg", "a frame header too short")
            precision, height, width, components = struct.unpack(">BHHB", data[pos + 4: pos + 10])
            size = (width, height, components, precision)
            _check_side("jpeg", width, height, max_side)
        if marker == 0xDA:  # start of scan: the entropy-coded data follows, then (more scans and) the end marker
            break
        if marker == 0xD9:
            raise _corrupt("jpeg", "it ends before any scan")
        pos += 2 + length
    if size is None:
        raise _corrupt("jpeg", "no frame header before the scan")
    if data.rfind(b"\xff\xd9") < pos:
        raise _corrupt("jpeg", "no end-of-image marker after the scan (truncated)")
    width, height, components, precision = size
    kinds = (["grayscale"] if components == 1 else ["cmyk"] if components == 4 else []) + \
            (["16_bit"] if precision > 8 else [])
    if components not in (1, 3, 4):
        raise _corrupt("jpeg", f"{components} colour components")
    return ImageInfo("jpeg", width, height, tuple(kinds))


# ------------------------------------------------------------------------------------------------------ GIF

def _gif(data: bytes, max_side: int) -> ImageInfo:
    if len(data) < 13:
        raise _corrupt("gif", "the header is cut off")
    width, height, packed = struct.unpack("<HHB", data[6:11])
    _check_side("gif", width, height, max_side)
    pos = 13 + (3 * 2 ** ((packed & 7) + 1) if packed & 0x80 else 0)
    frames = 0
    while pos < len(data):
        block = data[pos]
        if block == 0x3B:
            if not frames:
                raise _corrupt("gif", "no image in it")
            return ImageInfo("gif", width, height, ("palette",))
        if block == 0x21:
            pos = _gif_sub_blocks(data, pos + 2)
        elif block == 0x2C:
            if pos + 10 > len(data):
                break
            fw, fh, fpacked = struct.unpack("<HHB", data[pos + 5: pos + 10])
            _check_side("gif", max(fw, 1), max(fh, 1), max_side)
            pos += 10 + (3 * 2 ** ((fpacked & 7) + 1) if fpacked & 0x80 else 0) + 1  # + LZW minimum code size
            pos = _gif_sub_blocks(data, pos)
            frames += 1
        else:
            raise _corrupt("gif", f"an unknown block 0x{block:02x}")
    raise _corrupt("gif", "no trailer (truncated)")


def _gif_sub_blocks(data: bytes, pos: int) -> int:
    while True:
        if pos >= len(data):
            raise _corrupt("gif", "a data block runs past the end of the file")
        size = data[pos]
        pos += 1 + size
        if size == 0:
            return pos


# ------------------------------------------------------------------------------------------------------ BMP

def _bmp(data: bytes, max_side: int) -> ImageInfo:
    offset, header = struct.unpack("<II", data[10:18])
    if header == 12:
        width, height, _, bits = struct.unpack("<HHHH", data[18:26])
        compression = 0
    elif header >= 40 and len(data) >= 14 + 40:
        width, height, _, bits, compression = struct.unpack("<iiHHI", data[18:34])
    else:
        raise _corrupt("bmp", f"an unknown header of {header} bytes")
    height = abs(height)
    _check_side("bmp", width, height, max_side)
    if bits not in (1, 4, 8, 16, 24, 32):
        raise _corrupt("bmp", f"{bits} bits per pixel")
    if compression in (0, 3, 6):  # uncompressed rows (bit fields too): they must all be in the file
        if offset + ((width * bits + 31) // 32 * 4) * height > len(data):
            raise _corrupt("bmp", "its pixel rows run past the end of the file (truncated)")
    elif compression in (1, 2):
        if offset >= len(data):
            raise _corrupt("bmp", "no pixel data")
    else:
        raise SkipFile("not_an_image", f"a BMP with compression {compression} (embedded JPEG or PNG) is not taken")
    kinds = ("palette",) if bits <= 8 else ("alpha",) if bits == 32 else ()
    return ImageInfo("bmp", width, height, kinds)


# ------------------------------------------------------------------------------------------------------ WebP

def _webp(data: bytes, max_side: int) -> ImageInfo:
    riff = struct.unpack("<I", data[4:8])[0]
    if riff + 8 > len(data) or riff < 4:
        raise _corrupt("webp", f"its RIFF header says {riff + 8} bytes, the file has {len(data)} (truncated)")
    pos, size, alpha = 12, None, False
    while pos + 8 <= riff + 8:
        kind, length = data[pos: pos + 4], struct.unpack("<I", data[pos + 4: pos + 8])[0]
        body = data[pos + 8: pos + 8 + length]
        if len(body) < length or pos + 8 + length > riff + 8:
            raise _corrupt("webp", f"chunk {kind!r} runs past the end of the file")
        if kind == b"VP8X" and length >= 10:
            alpha = bool(body[0] & 0x10)
            size = (int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1)
        elif kind == b"VP8 " and size is None:
            if length < 10 or body[3:6] != b"\x9d\x01\x2a":
                raise _corrupt("webp", "a lossy frame without its start code")
            w, h = struct.unpack("<HH", body[6:10])
            size = (w & 0x3FFF, h & 0x3FFF)
        elif kind == b"VP8L" and size is None:
            if length < 5 or body[0] != 0x2F:
                raise _corrupt("webp", "a lossless frame without its signature")
            bits = int.from_bytes(body[1:5], "little")
            size, alpha = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1), bool((bits >> 28) & 1)
        pos += 8 + length + (length & 1)
    if size is None:
        raise _corrupt("webp", "no image chunk")
    _check_side("webp", size[0], size[1], max_side)
    return ImageInfo("webp", size[0], size[1], ("alpha",) if alpha else ())
