"""featureviz.images and featureviz.datasets on real files and crafted archives, without a server: the header
reader on every format and its truncations, and each hostile archive refused or skipped with one line."""

from __future__ import annotations

import hashlib
import tarfile
import zipfile

import pytest

from featureviz.datasets import DatasetLimits
from featureviz.datasets import check_member_name
from featureviz.datasets import dataset_id
from featureviz.datasets import unpack
from featureviz.errors import InvalidSpec
from featureviz.images import SkipFile
from featureviz.images import image_info
from support.images import gz_zeros_tar
from support.images import image_bytes
from support.images import png_header_only
from support.images import tar_of
from support.images import tar_special
from support.images import zip_of
from support.images import zip_symlink

LIMITS = DatasetLimits(max_images=100, max_bytes=64 << 20, max_image_side=4096, max_image_bytes=16 << 20,
                       max_members=200, max_ratio=200)


@pytest.mark.parametrize("fmt,mode,save,kinds", [
    ("png", "RGB", {}, ()),
    ("png", "L", {}, ("grayscale",)),
    ("png", "P", {}, ("palette",)),
    ("png", "RGBA", {}, ("alpha",)),
    ("png", "I;16", {}, ("grayscale", "16_bit")),
    ("png", "RGB", {"interlace": 1}, ()),  # Adam7: the inflated size of seven passes
    ("jpeg", "RGB", {}, ()),
    ("jpeg", "L", {}, ("grayscale",)),
    ("jpeg", "CMYK", {}, ("cmyk",)),
    ("jpeg", "RGB", {"progressive": True}, ()),
    ("gif", "RGB", {}, ("palette",)),
    ("bmp", "RGB", {}, ()),
    ("bmp", "P", {}, ("palette",)),
    ("webp", "RGB", {}, ()),
    ("webp", "RGBA", {"lossless": True}, ("alpha",)),
])
def test_headers_of_real_files(fmt, mode, save, kinds):
    data = image_bytes(fmt, (37, 21), mode, **save)
    info = image_info(data, 4096)
    assert (info.format, info.width, info.height, info.converted) == (fmt, 37, 21, kinds)


@pytest.mark.parametrize("fmt,save", [("png", {}), ("jpeg", {}), ("gif", {}), ("bmp", {}), ("webp", {}),
                                      ("webp", {"lossless": True})])
def test_truncated_files_are_corrupt(fmt, save):
    from PIL import Image

    data = image_bytes(fmt, (64, 48), "RGB", color=(10, 200, 30), **save)
    cut = data[: len(data) * 2 // 3]
    with pytest.raises(SkipFile) as skip:
        image_info(cut, 4096)
    assert skip.value.cause == "corrupt" and fmt.upper() in skip.value.detail, skip.value.detail
    with pytest.raises(Exception):  # Pillow agrees that the file is not whole
        Image.open(__import__("io").BytesIO(cut)).load()


def test_png_with_a_flipped_byte_fails_its_crc():
    data = bytearray(image_bytes("png", (20, 20)))
    data[-20] ^= 0xFF  # inside IDAT
    with pytest.raises(SkipFile, match="CRC") as skip:
        image_info(bytes(data), 4096)
    assert skip.value.cause == "corrupt"


def test_a_20000_pixel_header_is_too_large_before_any_decoding():
    with pytest.raises(SkipFile) as skip:
        image_info(png_header_only(20000, 20000), 4096)
    assert skip.value.cause == "too_large"
    assert "20000x20000" in skip.value.detail and "max_dataset_image_side" in skip.value.detail


def test_non_images_and_nested_archives_are_told_apart():
    with pytest.raises(SkipFile) as skip:
        image_info(b"just some text", 4096)
    assert skip.value.cause == "not_an_image"
    with pytest.raises(SkipFile) as skip:
        image_info(zip_of({"a.png": image_bytes()}), 4096)
    assert skip.value.cause == "nested_archive"


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/etc/evil.png", "C:\\evil.png",
                                  "..\\evil.png", "a\0b.png", "x" * 2000])
def test_hostile_member_names_are_refused(name):
    with pytest.raises(InvalidSpec) as err:
        check_member_name(name)
    assert err.value.reason == "UNSAFE_MEMBER" and "nothing was stored" in err.value.message
    assert len(err.value.message) < 400  # the name is echoed, capped


def test_relative_names_are_normalized():
    assert check_member_name("./a//b\\c.png") == "a/b/c.png"
    assert check_member_name("dir/") == "dir"


def _unpack(tmp_path, data: bytes, kind: str, limits=LIMITS, files=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = tmp_path / "upload"
    source.write_bytes(data)
    staging = tmp_path / "staging"
    return unpack(source, kind, staging, limits, files), staging


def _refused(tmp_path, data: bytes, kind: str, reason: str, limits=LIMITS) -> str:
    with pytest.raises(InvalidSpec) as err:
        _unpack(tmp_path, data, kind, limits)
    assert err.value.reason == reason, err.value
    return err.value.message


GOOD = {"good/a.png": image_bytes("png", color=(1, 2, 3)), "good/b.jpg": image_bytes("jpeg", color=(9, 9, 9))}


def test_a_zip_with_every_kind_of_file(tmp_path):
    members = {**GOOD, "notes.txt": b"hello", "bad.png": GOOD["good/a.png"][:-30], "inner.zip": zip_of(GOOD),
               "huge.png": png_header_only(20000, 20000), "again.png": GOOD["good/a.png"], "empty/": b"",
               "gray.png": image_bytes("png", mode="L", color=77)}
    unpacked, staging = _unpack(tmp_path, zip_of(members), "zip")
    report = unpacked.report
    assert [image.name for image in unpacked.images] == ["good/a.png", "good/b.jpg", "gray.png"]
    assert report.images == 3 and report.files == 8 and report.skipped_count == 5
    assert {cause: (count, names) for cause, (count, names, _) in report.skipped.items()} == {
        "not_an_image": (1, ["notes.txt"]), "corrupt": (1, ["bad.png"]), "nested_archive": (1, ["inner.zip"]),
        "too_large": (1, ["huge.png"]), "duplicate": (1, ["again.png"])}
    assert report.converted == {"grayscale": [1, ["gray.png"]]}
    assert report.formats == {"png": 2, "jpeg": 1}
    shas = sorted(hashlib.sha256(members[n]).hexdigest() for n in ("good/a.png", "good/b.jpg", "gray.png"))
    assert unpacked.id == dataset_id(shas) and sorted(p.name for p in staging.iterdir()) == shas


def test_the_same_images_in_a_tar_under_other_names_are_the_same_set(tmp_path):
    a, _ = _unpack(tmp_path / "a", zip_of(GOOD), "zip")
    b, _ = _unpack(tmp_path / "b", tar_of({"x.png": GOOD["good/a.png"], "y/z.jpg": GOOD["good/b.jpg"]},
                                          mode="w:bz2"), "tar")
    assert a.id == b.id


def test_names_per_cause_stop_at_ten(tmp_path):
    members = {**GOOD, **{f"t{i:02d}.txt": b"x%d" % i for i in range(25)}}
    unpacked, _ = _unpack(tmp_path, zip_of(members), "zip")
    count, names, _ = unpacked.report.skipped["not_an_image"]
    assert count == 25 and names == [f"t{i:02d}.txt" for i in range(10)]


@pytest.mark.parametrize("name", ["../evil.png", "/abs/evil.png"])
def test_traversal_in_zip_and_tar_refuses_the_upload(tmp_path, name):
    message = _refused(tmp_path, zip_of({**GOOD, name: GOOD["good/a.png"]}), "zip", "UNSAFE_MEMBER")
    assert repr(name) in message
    assert not list((tmp_path / "staging").glob("*"))  # a zip's names are all checked before any byte is staged
    # a tar streams: what came before is staged, and the server removes the staging folder (test_service_datasets)
    message = _refused(tmp_path, tar_of({**GOOD, name: GOOD["good/a.png"]}), "tar", "UNSAFE_MEMBER")
    assert repr(name) in message


@pytest.mark.parametrize("data,kind,reason", [
    (zip_symlink("link.png", "/etc/passwd", GOOD), "zip", "LINK_MEMBER"),
    (tar_special("link.png", tarfile.SYMTYPE, GOOD, linkname="/etc/passwd"), "tar", "LINK_MEMBER"),
    (tar_special("hard.png", tarfile.LNKTYPE, GOOD, linkname="good/a.png"), "tar", "LINK_MEMBER"),
    (tar_special("null", tarfile.CHRTYPE, GOOD), "tar", "SPECIAL_MEMBER"),
    (tar_special("disk", tarfile.BLKTYPE, GOOD), "tar", "SPECIAL_MEMBER"),
    (tar_special("pipe", tarfile.FIFOTYPE, GOOD), "tar", "SPECIAL_MEMBER"),
], ids=["zip-symlink", "tar-symlink", "tar-hardlink", "tar-chr", "tar-blk", "tar-fifo"])
def test_links_and_devices_refuse_the_upload(tmp_path, data, kind, reason):
    message = _refused(tmp_path, data, kind, reason)
    assert "nothing was stored" in message


def test_zip_bomb_by_declared_ratio(tmp_path):
    message = _refused(tmp_path, zip_of({**GOOD, "zeros.png": bytes(8 << 20)}), "zip", "ZIP_BOMB")
    assert "max_compression_ratio" in message and "zeros.png" in message


def test_zip_bomb_by_declared_size(tmp_path):
    limits = DatasetLimits(**{**LIMITS.__dict__, "max_bytes": 1 << 20, "max_ratio": 10**6})
    message = _refused(tmp_path, zip_of({**GOOD, "zeros.png": bytes(2 << 20)}), "zip", "DATASET_TOO_LARGE", limits)
    assert "max_dataset_bytes" in message and "declares" in message


def test_a_zip_that_lies_about_its_sizes_is_refused(tmp_path):
    """Sizes patched smaller in both headers: the bytes actually unpacked never pass the declared size."""
    import struct

    data = bytearray(zip_of({**GOOD, "zeros.png": bytes(4 << 20)}))
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.rfind(signature)  # the last member's local header and central directory entry
        data[at + offset: at + offset + 4] = struct.pack("<I", 1000)
    _refused(tmp_path, bytes(data), "zip", "CORRUPT_ARCHIVE")


def test_tar_gz_bomb_by_actual_ratio(tmp_path):
    message = _refused(tmp_path, gz_zeros_tar("zeros.bin", 8 << 20, GOOD), "tar", "ZIP_BOMB")
    assert "max_compression_ratio" in message


def test_tar_declared_bytes_over_the_limit(tmp_path):
    limits = DatasetLimits(**{**LIMITS.__dict__, "max_bytes": 1 << 20})
    message = _refused(tmp_path, tar_of({**GOOD, "big.bin": bytes(2 << 20)}), "tar", "DATASET_TOO_LARGE", limits)
    assert "max_dataset_bytes" in message


def test_members_and_images_over_their_limits(tmp_path):
    few = DatasetLimits(**{**LIMITS.__dict__, "max_members": 3, "max_images": 2})
    many_files = {f"{i}.txt": b"%d" % i for i in range(5)}
    assert "max_archive_members" in _refused(tmp_path, zip_of(many_files), "zip", "TOO_MANY_MEMBERS", few)
    assert "max_archive_members" in _refused(tmp_path, tar_of(many_files), "tar", "TOO_MANY_MEMBERS", few)
    images = {f"{i}.png": image_bytes(color=(i, 0, 0)) for i in range(3)}
    assert "max_dataset_images" in _refused(tmp_path, zip_of(images), "zip", "TOO_MANY_IMAGES", few)


def test_a_set_with_no_image_is_refused(tmp_path):
    message = _refused(tmp_path, zip_of({"a.txt": b"a", "b.png": b"\x89PNG\r\n\x1a\nbroken"}), "zip",
                       "EMPTY_DATASET")
    assert "not_an_image 1" in message and "corrupt 1" in message


def test_not_an_archive_and_truncated_archives(tmp_path):
    _refused(tmp_path, b"not a zip at all", "zip", "CORRUPT_ARCHIVE")
    _refused(tmp_path, zip_of(GOOD)[:-30], "zip", "CORRUPT_ARCHIVE")
    _refused(tmp_path, tar_of(GOOD, mode="w:gz")[:-40], "tar", "CORRUPT_ARCHIVE")


def test_single_files_are_checked_against_their_digests(tmp_path):
    a, b = GOOD["good/a.png"], GOOD["good/b.jpg"]
    files = [("a.png", len(a), hashlib.sha256(a).hexdigest()), ("sub/b.jpg", len(b), hashlib.sha256(b).hexdigest())]
    unpacked, _ = _unpack(tmp_path, a + b, "files", files=files)
    assert [image.name for image in unpacked.images] == ["a.png", "sub/b.jpg"]
    files[1] = ("sub/b.jpg", len(b), "0" * 64)
    with pytest.raises(InvalidSpec) as err:
        _unpack(tmp_path, a + b, "files", files=files)
    assert err.value.reason == "DIGEST_MISMATCH" and err.value.field == "header.files[1].sha256"


def test_png_whose_pixel_data_is_short_of_its_header_is_corrupt():
    """Every chunk whole and its CRC right, but IDAT holds 10 rows of the 20 its header declares."""
    import zlib

    from support.images import _chunk

    ihdr = __import__("struct").pack(">IIBBBBB", 20, 20, 8, 2, 0, 0, 0)
    rows = b"".join(b"\0" + bytes(60) for _ in range(10))
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))
    with pytest.raises(SkipFile, match="not the 1220") as skip:
        image_info(data, 4096)
    assert skip.value.cause == "corrupt"
