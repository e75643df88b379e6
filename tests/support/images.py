"""Real image files and hostile archives for the dataset tests: made with Pillow, the standard library's zipfile
and tarfile, and by hand where a real tool would refuse to write them (a 20000x20000 PNG header, links, devices)."""

from __future__ import annotations

import io
import stat
import struct
import tarfile
import zipfile
import zlib

__all__ = ["image_bytes", "noisy_png", "png_header_only", "zip_of", "tar_of", "tar_special", "zip_symlink", "gz_zeros_tar"]


def image_bytes(fmt: str = "png", size=(16, 12), mode: str = "RGB", color=(200, 30, 40), **save) -> bytes:
    from PIL import Image

    if mode in ("L", "P", "I;16") and isinstance(color, tuple):
        color = color[0]
    if mode == "RGBA" and isinstance(color, tuple) and len(color) == 3:
        color = (*color, 128)
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt.upper(), **save)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a few bytes of pixel data: what a decompression bomb looks like
    before anyone decodes it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def zip_of(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name) if name.endswith("/") else name, data)
    return buf.getvalue()


def zip_symlink(name: str, target: str, extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for member, data in (extra or {}).items():
            archive.writestr(member, data)
        info = zipfile.ZipInfo(name)
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, target)
    return buf.getvalue()


def tar_of(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tar_special(name: str, kind: bytes, extra: dict[str, bytes] | None = None, linkname: str = "") -> bytes:
    """A tar holding ``extra`` files and one member of tar type ``kind`` (tarfile.SYMTYPE, LNKTYPE, CHRTYPE, ...)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as archive:
        for member, data in (extra or {}).items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        info.devmajor, info.devminor = 1, 3
        archive.addfile(info)
    return buf.getvalue()


def gz_zeros_tar(name: str, size: int, extra: dict[str, bytes] | None = None) -> bytes:
    """A .tar.gz with a member of ``size`` zero bytes (it packs a thousandfold)."""
    return tar_of({**(extra or {}), name: bytes(size)}, mode="w:gz")


def noisy_png(side: int, seed: int) -> bytes:
    """A side x side RGB PNG of random pixels, stored uncompressed: about 3 * side**2 bytes that do not pack."""
    import random

    from PIL import Image

    buf = io.BytesIO()
    pixels = random.Random(seed).randbytes(side * side * 3)
    Image.frombytes("RGB", (side, side), pixels).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()
