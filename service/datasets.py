"""Unpack and check an uploaded image set: a zip, a tar (plain, gzip, bzip2, xz) or single files. Standard library
only (no torch, numpy or PIL): the server calls :func:`unpack` in a thread.

    unpacked = unpack(path, "zip", staging_dir, DatasetLimits.from_limits(config.limits))
    unpacked.images     # [StagedImage(name, sha256, size, info, path)], sorted by name, one per distinct content
    unpacked.report     # Report: images, files, skipped per cause (10 names each), converted kinds, formats
    unpacked.id         # sha256 of the sorted image sha256 hex digests, joined by newlines

Every uploaded byte is hostile. A member name never becomes a path: images are written to ``staging`` under their
sha256. The whole upload is refused (:class:`featureviz.errors.InvalidSpec`, one line naming the member, the limit
and the fix) for ``..`` or absolute names, symbolic and hard links, device files and FIFOs, a zip bomb (by the
sizes the archive declares, by the bytes it really unpacks to, and by the compression ratio), too many members,
images or bytes, a corrupt archive, and a set with no image. Single files that are not images, corrupt or truncated
images, images over the side or byte limits, nested archives and duplicates are skipped, counted and named in the
report. The caller removes ``staging`` whatever happens.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import io
import lzma
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from featureviz.errors import InvalidSpec
from featureviz.errors import echo
from featureviz.images import ImageInfo
from featureviz.images import SkipFile
from featureviz.images import archive_kind
from featureviz.images import image_info

__all__ = ["DatasetLimits", "StagedImage", "Report", "Unpacked", "unpack", "check_member_name", "dataset_id",
           "SKIP_CAUSES", "CONVERTED_KINDS", "NAMES_PER_CAUSE", "KINDS"]

KINDS = ("zip", "tar", "files")
SKIP_CAUSES = ("not_an_image", "corrupt", "too_large", "nested_archive", "duplicate", "encrypted")
CONVERTED_KINDS = ("grayscale", "palette", "16_bit", "alpha", "cmyk")
NAMES_PER_CAUSE = 10
MAX_NAME_CHARS = 1024
RATIO_FLOOR = 1 << 20  # below this many unpacked bytes, no ratio is a bomb (a few zero-padded tar headers)
_CD_ENTRY_BYTES = 46 + MAX_NAME_CHARS + 256  # a central directory entry at most, with a name we accept
_PIECE = 1 << 20


@dataclass(frozen=True)
class DatasetLimits:
    max_images: int
    max_bytes: int
    max_image_side: int
    max_image_bytes: int
    max_members: int
    max_ratio: int

    @classmethod
    def from_limits(cls, limits) -> "DatasetLimits":
        """From the server's published ``Limits`` (featureviz.server.config) or anything with the same fields."""
        return cls(limits.max_dataset_images, limits.max_dataset_bytes, limits.max_dataset_image_side,
                   limits.max_dataset_image_bytes, limits.max_archive_members, limits.max_compression_ratio)


@dataclass(frozen=True)
class StagedImage:
    name: str
    sha256: str
    size: int
    info: ImageInfo
    path: Path


@dataclass
class Report:
    images: int = 0
    files: int = 0
    skipped: dict[str, list] = field(default_factory=dict)  # cause -> [count, names, first detail]
    converted: dict[str, list] = field(default_factory=dict)  # kind -> [count, names]
    formats: dict[str, int] = field(default_factory=dict)

    def skip(self, cause: str, name: str, detail: str) -> None:
        entry = self.skipped.setdefault(cause, [0, [], detail])
        entry[0] += 1
        if len(entry[1]) < NAMES_PER_CAUSE:
            entry[1].append(name)

    def convert(self, kind: str, name: str) -> None:
        entry = self.converted.setdefault(kind, [0, []])
        entry[0] += 1
        if len(entry[1]) < NAMES_PER_CAUSE:
            entry[1].append(name)

    @property
    def skipped_count(self) -> int:
        return sum(entry[0] for entry in self.skipped.values())

    def summary(self) -> str:
        """One line: '3 images; skipped 2 (not_an_image 1: a.txt; corrupt 1: b.png)'."""
        parts = [f"{cause} {count}: {', '.join(echo(n, 60) for n in names[:3])}"
                 for cause, (count, names, _) in self.skipped.items()]
        return f"{self.images} image(s) of {self.files} file(s)" + (f"; skipped {'; '.join(parts)}" if parts else "")


def dataset_id(hashes) -> str:
    """The set's id: sha256 of its images' sha256 hex digests, sorted, joined by newlines."""
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


@dataclass
class Unpacked:
    images: list[StagedImage]
    report: Report

    @property
    def id(self) -> str:
        return dataset_id(image.sha256 for image in self.images)

    @property
    def size_bytes(self) -> int:
        return sum(image.size for image in self.images)


def check_member_name(name: str) -> str:
    """A member's name -> its normalized relative form ('a/b.png'; '' for the archive's root). A name that is
    absolute, climbs out with '..', holds a NUL or is over MAX_NAME_CHARS refuses the whole upload."""
    if len(name) > MAX_NAME_CHARS:
        raise _unsafe(name, f"a name of {len(name)} characters, over {MAX_NAME_CHARS}")
    if "\0" in name:
        raise _unsafe(name, "a NUL character in its name")
    text = name.replace("\\", "/")
    if text.startswith("/") or (len(text) >= 2 and text[1] == ":" and text[0].isalpha()):
        raise _unsafe(name, "an absolute name")
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _unsafe(name, "'..' in its name, which points outside the archive")
    return "/".join(parts)


def _unsafe(name: str, what: str) -> InvalidSpec:
    return InvalidSpec("archive", f"member {echo(name)} has {what}; refused, nothing was stored: pack the images "
                                  "with relative names", reason="UNSAFE_MEMBER")


def _bomb(what: str) -> InvalidSpec:
    return InvalidSpec("archive", f"{what}; refused as a zip bomb, nothing was stored", reason="ZIP_BOMB")


class _Collector:
    """Takes the members one by one: checks, hashes, stages; keeps the report."""

    def __init__(self, staging: Path, limits: DatasetLimits):
        self.staging, self.limits = staging, limits
        self.report = Report()
        self.by_sha: dict[str, StagedImage] = {}
        self.members = 0

    def member(self, name: str) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise InvalidSpec("archive", f"more than {self.limits.max_members} members (max_archive_members); "
                                         "split the set", reason="TOO_MANY_MEMBERS")

    def too_large(self, name: str, size: int) -> None:
        self.report.files += 1
        self.report.skip("too_large", name, f"{size} bytes, over {self.limits.max_image_bytes} "
                                            "(max_dataset_image_bytes)")

    def take(self, name: str, data: bytes) -> None:
        self.report.files += 1
        try:
            info = image_info(data, self.limits.max_image_side)
        except SkipFile as skip:
            self.report.skip(skip.cause, name, skip.detail)
            return
        sha = hashlib.sha256(data).hexdigest()
        if sha in self.by_sha:
            self.report.skip("duplicate", name, f"the same bytes as {echo(self.by_sha[sha].name, 60)}")
            return
        if len(self.by_sha) >= self.limits.max_images:
            raise InvalidSpec("archive", f"more than {self.limits.max_images} images (max_dataset_images); split "
                                         "the set", reason="TOO_MANY_IMAGES")
        path = self.staging / sha
        path.write_bytes(data)
        self.by_sha[sha] = StagedImage(name, sha, len(data), info, path)

    def result(self) -> Unpacked:
        images = sorted(self.by_sha.values(), key=lambda image: (image.name, image.sha256))
        report = self.report
        report.images = len(images)
        for image in images:
            report.formats[image.info.format] = report.formats.get(image.info.format, 0) + 1
            for kind in image.info.converted:
                report.convert(kind, image.name)
        if not images:
            raise InvalidSpec("archive", f"the upload holds no image ({report.summary()}); a dataset needs at least "
                                         "one PNG, JPEG, GIF, BMP or WebP image", reason="EMPTY_DATASET")
        return Unpacked(images, report)


def unpack(source: Path, kind: str, staging: Path, limits: DatasetLimits,
           files: list[tuple[str, int, str]] | None = None) -> Unpacked:
    """Check and stage the images of ``source`` (a zip, a tar, or with ``kind`` 'files' the ``files`` (name, size,
    sha256) one after another). Raises InvalidSpec for an upload refused as a whole."""
    staging.mkdir(parents=True, exist_ok=True)
    collector = _Collector(staging, limits)
    if kind == "zip":
        _zip(source, collector, limits)
    elif kind == "tar":
        _tar(source, collector, limits)
    elif kind == "files":
        _files(source, collector, limits, files or [])
    else:
        raise InvalidSpec("header.kind", f"expected one of {', '.join(KINDS)}, got {echo(kind)}")
    return collector.result()


# ------------------------------------------------------------------------------------------------------ zip

def _zip_entries(source: Path) -> tuple[int, int]:
    """(entries, central directory bytes) from the end record, read before zipfile loads the directory."""
    with open(source, "rb") as f:
        f.seek(0, io.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - (65535 + 22)))
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + 22 > len(tail):
            raise InvalidSpec("archive", "not a zip file (no end of central directory record), nothing was stored; send a zip, a tar, "
                                         "or single files", reason="CORRUPT_ARCHIVE")
        entries, cd_size = struct.unpack("<HI", tail[at + 10: at + 16])
        if entries == 0xFFFF or cd_size == 0xFFFFFFFF:  # zip64: the locator just before the end record
            locator = tail[at - 20: at] if at >= 20 else b""
            if locator[:4] == b"PK\x06\x07":
                f.seek(struct.unpack("<Q", locator[8:16])[0])
                record = f.read(56)
                if record[:4] == b"PK\x06\x06" and len(record) == 56:
                    entries, cd_size = struct.unpack("<QQ", record[32:48])
    return entries, cd_size


def _zip(source: Path, collector: _Collector, limits: DatasetLimits) -> None:
    entries, cd_size = _zip_entries(source)
    if entries > limits.max_members or cd_size > limits.max_members * _CD_ENTRY_BYTES:
        raise InvalidSpec("archive", f"the zip declares {entries} members, over {limits.max_members} "
                                     "(max_archive_members); split the set", reason="TOO_MANY_MEMBERS")
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:
        raise InvalidSpec("archive", f"a corrupt zip ({exc}); nothing was stored", reason="CORRUPT_ARCHIVE") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.max_members:
            raise InvalidSpec("archive", f"{len(infos)} members, over {limits.max_members} (max_archive_members); "
                                         "split the set", reason="TOO_MANY_MEMBERS")
        declared = 0
        for info in infos:  # every name and type first: a hostile member refuses the upload before any byte is read
            check_member_name(info.filename)
            mode = info.external_attr >> 16
            if info.create_system == 3 and mode:
                if stat.S_ISLNK(mode):
                    raise InvalidSpec("archive", f"member {echo(info.filename)} is a symbolic link; links are refused, "
                                                 "nothing was stored: pack the files themselves",
                                      reason="LINK_MEMBER")
                if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # 0: a plain file
                    raise InvalidSpec("archive", f"member {echo(info.filename)} is a device file, FIFO or socket; "
                                                 "refused, nothing was stored", reason="SPECIAL_MEMBER")
            if info.is_dir():
                continue
            declared += info.file_size
            if info.file_size > RATIO_FLOOR and info.file_size > limits.max_ratio * max(info.compress_size, 1):
                raise _bomb(f"member {echo(info.filename)} declares {info.file_size} bytes packed into "
                            f"{info.compress_size}, a ratio over {limits.max_ratio} (max_compression_ratio)")
        if declared > limits.max_bytes:
            raise InvalidSpec("archive", f"the zip declares {declared} unpacked bytes, over {limits.max_bytes} "
                                         "(max_dataset_bytes); split the set", reason="DATASET_TOO_LARGE")
        unpacked = 0
        for info in infos:
            if info.is_dir():
                continue
            name = check_member_name(info.filename)
            collector.member(name)
            if info.flag_bits & 0x1:
                collector.report.files += 1
                collector.report.skip("encrypted", name, "an encrypted member")
                continue
            if info.file_size > limits.max_image_bytes:
                collector.too_large(name, info.file_size)
                continue
            data = _read_zip_member(archive, info, name, limits)
            unpacked += len(data)
            if unpacked > limits.max_bytes:
                raise InvalidSpec("archive", f"the zip unpacks to more than {limits.max_bytes} bytes "
                                             "(max_dataset_bytes); split the set", reason="DATASET_TOO_LARGE")
            collector.take(name, data)


def _read_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, limits: DatasetLimits) -> bytes:
    """The member's bytes, read in pieces: more than it declares is a bomb (checked before the next piece)."""
    pieces, got = [], 0
    try:
        with archive.open(info) as member:
            while piece := member.read(_PIECE):
                got += len(piece)
                if got > info.file_size:
                    raise _bomb(f"member {echo(name)} unpacks to more than the {info.file_size} bytes it declares")
                pieces.append(piece)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise InvalidSpec("archive", f"member {echo(name)} of the zip is corrupt ({exc}); nothing was stored",
                          reason="CORRUPT_ARCHIVE") from None
    data = b"".join(pieces)
    if len(data) > RATIO_FLOOR and len(data) > limits.max_ratio * max(info.compress_size, 1):
        raise _bomb(f"member {echo(name)} unpacks {info.compress_size} bytes into {len(data)}, a ratio over "
                    f"{limits.max_ratio} (max_compression_ratio)")
    return data


# ------------------------------------------------------------------------------------------------------ tar

class _Counting(io.RawIOBase):
    """A read-only stream that counts the bytes read through it."""

    def __init__(self, inner):
        self.inner, self.count = inner, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.inner.read(len(buffer))
        buffer[: len(data)] = data
        self.count += len(data)
        return len(data)


def _tar(source: Path, collector: _Collector, limits: DatasetLimits) -> None:
    with open(source, "rb") as raw_file:
        head = raw_file.read(6)
        raw_file.seek(0)
        raw = _Counting(raw_file)
        if head.startswith(b"\x1f\x8b"):
            opened = gzip.GzipFile(fileobj=raw, mode="rb")
        elif head.startswith(b"BZh"):
            opened = bz2.BZ2File(raw)
        elif head.startswith(b"\xfd7zXZ\x00"):
            opened = lzma.LZMAFile(raw)
        else:
            opened = raw
        unpacked = _Counting(opened)
        try:
            _tar_members(tarfile.open(fileobj=unpacked, mode="r|"), collector, limits, raw, unpacked)
        except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error, ValueError) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise  # the server's disk, not the archive
            raise InvalidSpec("archive", f"a corrupt or truncated tar ({type(exc).__name__}: {exc}); nothing was "
                                         "stored", reason="CORRUPT_ARCHIVE") from None


def _tar_members(archive: tarfile.TarFile, collector: _Collector, limits: DatasetLimits, raw: _Counting,
                 unpacked: _Counting) -> None:
    declared = 0
    for member in archive:
        collector.member(member.name)
        name = check_member_name(member.name)
        if member.issym() or member.islnk():
            raise InvalidSpec("archive", f"member {echo(member.name)} is a {'symbolic' if member.issym() else 'hard'} "
                                         "link; links are refused, nothing was stored: pack the files themselves",
                              reason="LINK_MEMBER")
        if member.ischr() or member.isblk() or member.isfifo():
            raise InvalidSpec("archive", f"member {echo(member.name)} is a device file or FIFO; refused, nothing was "
                                         "stored", reason="SPECIAL_MEMBER")
        if member.isdir():
            continue
        if not member.isreg():
            raise InvalidSpec("archive", f"member {echo(member.name)} is of an unknown tar type "
                                         f"{echo(member.type)}; refused, nothing was stored", reason="SPECIAL_MEMBER")
        declared += member.size  # the stream reads through every member: the sum is bounded before reading it
        if declared > limits.max_bytes:
            raise InvalidSpec("archive", f"the tar declares more than {limits.max_bytes} unpacked bytes "
                                         "(max_dataset_bytes); split the set", reason="DATASET_TOO_LARGE")
        if member.size > limits.max_image_bytes:
            collector.too_large(name, member.size)
        else:
            stream = archive.extractfile(member)
            data = stream.read(limits.max_image_bytes + 1) if stream is not None else b""
            collector.take(name, data)
        _check_ratio(raw, unpacked, limits)
    _check_ratio(raw, unpacked, limits)


def _check_ratio(raw: _Counting, unpacked: _Counting, limits: DatasetLimits) -> None:
    if unpacked is raw:
        return
    if unpacked.count > RATIO_FLOOR and unpacked.count > limits.max_ratio * max(raw.count, 1):
        raise _bomb(f"the tar unpacks {raw.count} bytes into {unpacked.count}, a ratio over {limits.max_ratio} "
                    "(max_compression_ratio)")


# ------------------------------------------------------------------------------------------------------ files

def _files(source: Path, collector: _Collector, limits: DatasetLimits, files: list[tuple[str, int, str]]) -> None:
    with open(source, "rb") as f:
        for index, (raw_name, size, sha) in enumerate(files):
            name = check_member_name(raw_name)
            collector.member(name)
            if size > limits.max_image_bytes:
                f.seek(size, io.SEEK_CUR)
                collector.too_large(name, size)
                continue
            data = f.read(size)
            if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
                raise InvalidSpec(f"header.files[{index}].sha256", f"file {echo(raw_name)} hashes to "
                                  f"{hashlib.sha256(data).hexdigest()}, not the declared {echo(sha)}; nothing was "
                                  "stored", reason="DIGEST_MISMATCH")
            collector.take(name, data)
