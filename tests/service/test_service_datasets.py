"""DatasetService on a real server on loopback: uploads of folders, archives and files with their reports; hostile
archives refused with nothing kept; limits named; tenant isolation; deduplication; resume; delete refused while a job
uses the set; a full disk; the CLI against a real ``featureviz serve``."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import time

import grpc
import pytest

from featureviz.client import Client
from featureviz.client import FeaturevizClientError
from featureviz.client import pb
from featureviz.server import Limits
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background
from support.images import gz_zeros_tar
from support.images import image_bytes
from support.images import noisy_png
from support.images import png_header_only
from support.images import tar_of
from support.images import tar_special
from support.images import zip_of
from support.images import zip_symlink

CHUNK = 1024
GOOD = {"a.png": image_bytes("png", (40, 30), color=(1, 2, 3)), "b.jpg": image_bytes("jpeg", (50, 20)),
        "c.png": image_bytes("png", (8, 8), "P", color=3)}


def _nothing_left(store) -> None:
    assert list((store / "uploads").iterdir()) == []
    assert list((store / "staging").iterdir()) == []


def _image_files(store) -> set[str]:
    return {path.name for path in (store / "images").glob("*/*")}


def _folder(tmp_path, members: dict[str, bytes]):
    for name, data in members.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return tmp_path


def test_folder_upload_reports_and_lists(client, server, tmp_path):
    folder = _folder(tmp_path / "set", {**GOOD, "sub/notes.txt": b"hello", "sub/cut.png": GOOD["a.png"][:-25],
                                        "huge.png": png_header_only(20000, 20000)})
    sent = []
    dataset = client.upload_dataset(folder, chunk_size=CHUNK, progress=lambda done, total: sent.append(done))
    assert sent[-1] == sum(len(p.read_bytes()) for p in folder.rglob("*") if p.is_file())
    shas = sorted(hashlib.sha256(data).hexdigest() for data in GOOD.values())
    assert dataset.id == hashlib.sha256("\n".join(shas).encode()).hexdigest() and dataset.name == f"datasets/{dataset.id}"
    assert dataset.display_name == "set" and dataset.image_count == 3 and not dataset.deduplicated
    report = dataset.report
    assert (report.images, report.files, report.skipped) == (3, 6, 3)
    causes = {entry.cause: (entry.count, list(entry.names)) for entry in report.skipped_by_cause}
    assert causes == {"not_an_image": (1, ["sub/notes.txt"]), "corrupt": (1, ["sub/cut.png"]),
                      "too_large": (1, ["huge.png"])}
    too_large = next(e for e in report.skipped_by_cause if e.cause == "too_large")
    assert "20000x20000" in too_large.detail and "max_dataset_image_side" in too_large.detail
    assert {(c.kind, c.count, tuple(c.names)) for c in report.converted} == {("palette", 1, ("c.png",))}
    assert dict(report.formats) == {"png": 2, "jpeg": 1}
    assert client.dataset(dataset.id) == dataset and client.dataset(dataset.name) == dataset
    assert dataset.id in [d.id for d in client.datasets()]
    images = list(client.dataset_images(dataset.id, page_size=2))  # two pages
    assert [(i.name, i.format, i.width, i.height) for i in images] == [("a.png", "png", 40, 30),
                                                                        ("b.jpg", "jpeg", 50, 20),
                                                                        ("c.png", "png", 8, 8)]
    store = server.config.store_dir
    assert {i.sha256 for i in images} <= _image_files(store)
    for image in images:  # each stored once, by its content
        assert hashlib.sha256((store / "images" / image.sha256[:2] / image.sha256).read_bytes()).hexdigest() \
            == image.sha256
    _nothing_left(store)
    again = client.upload_dataset(_folder(tmp_path / "other", {"x/" + n: d for n, d in GOOD.items()}))
    assert again.id == dataset.id and again.deduplicated


def _refused(client, server, data: bytes, code: str, reason: str) -> str:
    store = server.config.store_dir
    before, listed = _image_files(store), [d.id for d in client.datasets()]
    with pytest.raises(FeaturevizClientError) as err:
        client.upload_dataset(data)
    assert (err.value.code, err.value.reason) == (code, reason), err.value
    assert "\n" not in err.value.message
    _nothing_left(store)
    assert _image_files(store) == before and [d.id for d in client.datasets()] == listed
    return err.value.message


FRESH = {"fresh.png": image_bytes("png", (9, 9), color=(90, 91, 92))}


@pytest.mark.parametrize("data,reason", [
    (zip_of({**FRESH, "../evil.png": GOOD["a.png"]}), "UNSAFE_MEMBER"),
    (zip_of({**FRESH, "/etc/evil.png": GOOD["a.png"]}), "UNSAFE_MEMBER"),
    (tar_of({**FRESH, "../../evil.png": GOOD["a.png"]}), "UNSAFE_MEMBER"),
    (tar_of({**FRESH, "/abs.png": GOOD["a.png"]}, mode="w:gz"), "UNSAFE_MEMBER"),
    (zip_symlink("link.png", "/etc/passwd", FRESH), "LINK_MEMBER"),
    (tar_special("link.png", tarfile.SYMTYPE, FRESH, linkname="/etc/passwd"), "LINK_MEMBER"),
    (tar_special("hard.png", tarfile.LNKTYPE, FRESH, linkname="fresh.png"), "LINK_MEMBER"),
    (tar_special("dev/null", tarfile.CHRTYPE, FRESH), "SPECIAL_MEMBER"),
    (zip_of({**FRESH, "zeros.png": bytes(8 << 20)}), "ZIP_BOMB"),
    (gz_zeros_tar("zeros.png", 8 << 20, FRESH), "ZIP_BOMB"),
    (zip_of({"inner.zip": zip_of(FRESH), "notes.txt": b"x"}), "EMPTY_DATASET"),
    (zip_of(FRESH)[:-30], "CORRUPT_ARCHIVE"),
], ids=["zip-dotdot", "zip-absolute", "tar-dotdot", "tgz-absolute", "zip-symlink", "tar-symlink", "tar-hardlink",
        "tar-device", "zip-bomb", "tgz-bomb", "nested-only", "truncated-zip"])
def test_hostile_archives_are_refused_and_leave_nothing(client, server, data, reason):
    message = _refused(client, server, data, "INVALID_ARGUMENT", reason)
    assert "nothing was stored" in message or "no image" in message


def test_a_nested_archive_is_skipped_and_named(client):
    dataset = client.upload_dataset(zip_of({**FRESH, "deeper/inner.tar": tar_of(GOOD)}))
    assert dataset.image_count == 1
    assert [(e.cause, list(e.names)) for e in dataset.report.skipped_by_cause] == [("nested_archive",
                                                                                    ["deeper/inner.tar"])]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    limits = Limits(max_dataset_images=2, max_dataset_bytes=64 << 10, max_archive_members=4,
                    max_datasets_per_tenant=1, max_dataset_image_side=32)
    with serve_in_background(ServerConfig(tmp_path_factory.mktemp("small"), limits=limits)) as running:
        yield running


def test_limits_are_enforced_and_named(small):
    store = small.config.store_dir
    with Client(small.address) as fv:
        published = fv.info().limits
        assert (published.max_dataset_images, published.max_datasets_per_tenant) == (2, 1)
        cases = [
            (zip_of({f"{i}.png": image_bytes(color=(i, 0, 0)) for i in range(3)}), "INVALID_ARGUMENT",
             "TOO_MANY_IMAGES", "max_dataset_images"),
            (zip_of({f"{i}.txt": b"%d" % i for i in range(6)}), "INVALID_ARGUMENT", "TOO_MANY_MEMBERS",
             "max_archive_members"),
            (tar_of({"big.png": bytes(100 << 10)}), "INVALID_ARGUMENT", "DATASET_TOO_LARGE", "max_dataset_bytes"),
        ]
        for data, code, reason, limit in cases:
            with pytest.raises(FeaturevizClientError) as err:
                fv.upload_dataset(data)
            assert (err.value.code, err.value.reason) == (code, reason) and limit in err.value.message, err.value
            _nothing_left(store)
        wide = fv.upload_dataset(zip_of({"ok.png": image_bytes(size=(32, 8)), "wide.png": image_bytes(size=(33, 8))}))
        assert [(e.cause, list(e.names)) for e in wide.report.skipped_by_cause] == [("too_large", ["wide.png"])]
        with pytest.raises(FeaturevizClientError) as err:  # the tenant holds one set, the limit
            fv.upload_dataset(zip_of({"other.png": image_bytes(color=(5, 5, 5))}))
        assert (err.value.code, err.value.reason) == ("RESOURCE_EXHAUSTED", "DATASET_QUOTA")
        assert "max_datasets_per_tenant" in err.value.message
        _nothing_left(store)
        fv.delete_dataset(wide.id)
        assert fv.upload_dataset(zip_of({"other.png": image_bytes(color=(5, 5, 5))})).image_count == 1


def test_tenants_are_isolated_and_images_stored_once(tmp_path):
    config = ServerConfig(tmp_path / "store", tokens={"tok-a": "alice", "tok-b": "bob"})
    store = tmp_path / "store"
    with serve_in_background(config) as server, Client(server.address, token="tok-a") as alice, \
            Client(server.address, token="tok-b") as bob:
        mine = alice.upload_dataset(zip_of(GOOD))
        for call in (lambda: bob.dataset(mine.id), lambda: list(bob.dataset_images(mine.id)),
                     lambda: bob.delete_dataset(mine.id)):
            with pytest.raises(FeaturevizClientError) as err:
                call()
            assert err.value.code == "NOT_FOUND" and err.value.reason == "DATASET_NOT_FOUND"
        assert list(bob.datasets()) == []
        files = _image_files(store)
        assert len(files) == 3
        theirs = bob.upload_dataset(tar_of({"dir/" + n: d for n, d in GOOD.items()}, mode="w:xz"))
        assert theirs.id == mine.id and not theirs.deduplicated  # new for bob, the same set
        assert _image_files(store) == files  # stored once
        assert [i.name for i in bob.dataset_images(theirs.id)] == ["dir/a.png", "dir/b.jpg", "dir/c.png"]
        assert [i.name for i in alice.dataset_images(mine.id)] == ["a.png", "b.jpg", "c.png"]
        alice.delete_dataset(mine.id)
        assert _image_files(store) == files  # bob still holds them
        assert bob.dataset(theirs.id).image_count == 3
        bob.delete_dataset(theirs.id)
        assert _image_files(store) == set()


def test_broken_upload_resumes(client, server):
    data = zip_of({f"r{i}.png": noisy_png(20, i) for i in range(4)}, compression=0)
    assert len(data) > 4 * CHUNK
    sha = hashlib.sha256(data).hexdigest()
    header = pb.DatasetUploadHeader(sha256=sha, size_bytes=len(data), kind=pb.DATASET_SOURCE_KIND_ZIP)

    def breaking():
        yield pb.UploadDatasetRequest(header=header)
        for offset in (0, CHUNK):
            yield pb.UploadDatasetRequest(chunk=pb.UploadChunk(write_offset=offset, data=data[offset: offset + CHUNK]))
        while client.dataset_upload_status(sha, len(data)).committed_bytes < 2 * CHUNK:
            time.sleep(0.05)  # a condition polled, no clock (pytest-timeout ends a hang)
        raise ConnectionError("network gone")

    with pytest.raises(grpc.RpcError):
        client._datasets.UploadDataset(breaking())
    assert client.dataset_upload_status(sha, len(data)).committed_bytes == 2 * CHUNK
    sent = []
    dataset = client.upload_dataset(data, chunk_size=CHUNK, progress=lambda done, total: sent.append(done))
    assert sent[0] == 3 * CHUNK and dataset.image_count == 4  # the first two chunks were not sent again
    _nothing_left(server.config.store_dir)


def test_bad_headers_are_refused(client):
    data = zip_of(FRESH)
    sha = hashlib.sha256(data).hexdigest()
    cases = [
        (pb.DatasetUploadHeader(sha256=sha, size_bytes=len(data)), "header.kind"),
        (pb.DatasetUploadHeader(sha256="nope", size_bytes=len(data), kind=1), "header.sha256"),
        (pb.DatasetUploadHeader(sha256=sha, size_bytes=0, kind=1), "header.size_bytes"),
        (pb.DatasetUploadHeader(sha256=sha, size_bytes=len(data), kind=3), "header.files"),
        (pb.DatasetUploadHeader(sha256=sha, size_bytes=len(data), kind=3, files=[
            pb.DatasetFile(name="../x.png", size_bytes=len(data), sha256=sha)]), "archive"),
        (pb.DatasetUploadHeader(sha256=sha, size_bytes=len(data), kind=3, files=[
            pb.DatasetFile(name="x.png", size_bytes=1, sha256=sha)]), "header.files"),
    ]
    for header, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            client._datasets.UploadDataset(iter([pb.UploadDatasetRequest(header=header)]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field), \
            err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # the whole stream's digest
        client._datasets.UploadDataset(iter([
            pb.UploadDatasetRequest(header=pb.DatasetUploadHeader(sha256="0" * 64, size_bytes=len(data), kind=1)),
            pb.UploadDatasetRequest(chunk=pb.UploadChunk(data=data, finish_write=True))]))
    assert "DIGEST" in str(err.value.trailing_metadata()) or "hash to" in err.value.details()


def test_deleting_a_dataset_a_job_uses_is_refused(client, server):
    dataset = client.upload_dataset(zip_of({"job.png": image_bytes(color=(7, 7, 7))}))
    store = server._server.store  # no job kind reads datasets yet: the index job will insert rows like this one
    row, _ = store.create_job("default", "", pb.JobSpec(model="0" * 64), "0" * 64, dataset=dataset.id)
    with pytest.raises(FeaturevizClientError) as err:
        client.delete_dataset(dataset.id)
    assert (err.value.code, err.value.reason) == ("FAILED_PRECONDITION", "DATASET_IN_USE")
    assert f"jobs/{row.id}" in err.value.message
    store.finish_job(row.id, pb.JOB_STATE_CANCELLED)
    client.delete_dataset(dataset.id)
    with pytest.raises(FeaturevizClientError) as err:
        client.dataset(dataset.id)
    assert err.value.code == "NOT_FOUND"


@pytest.fixture()
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"needs a small tmpfs ({(done.stderr or done.stdout).strip() or 'mount failed'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_resource_exhausted_and_leaves_nothing(small_disk):
    store = small_disk / "store"
    # images that do not pack: the upload (2.4 MB) fits the 4 MB disk, its unpacked copy beside it does not
    data = zip_of({f"n{i}.png": noisy_png(300, i) for i in range(9)}, compression=0)
    assert 2 << 20 < len(data) < 3 << 20
    with serve_in_background(ServerConfig(store)) as server, Client(server.address) as fv:
        with pytest.raises(FeaturevizClientError) as err:
            fv.upload_dataset(data)
        assert (err.value.code, err.value.reason) == ("RESOURCE_EXHAUSTED", "DISK_FULL"), err.value
        _nothing_left(store)
        assert _image_files(store) == set() and list(fv.datasets()) == []
        small = fv.upload_dataset(zip_of(FRESH))  # the server stayed up
        assert small.image_count == 1


def test_cli_upload_list_images_delete(tmp_path):
    from support.serve import ServeProcess

    folder = _folder(tmp_path / "pics", {**GOOD, "readme.txt": b"hi"})
    server = ServeProcess(tmp_path / "store")
    try:
        def cli(*args):
            return subprocess.run([sys.executable, "-m", "featureviz", "datasets", *args, "--server", server.address],
                                  capture_output=True, text=True, timeout=300)

        up = cli("upload", str(folder), "--name", "pictures")
        assert up.returncode == 0, up.stderr
        ident = up.stdout.split()[0].removeprefix("datasets/")
        assert "3 images" in up.stdout and "skipped 1 not_an_image: readme.txt" in up.stdout, up.stdout
        assert "converted to RGB when used: c.png" in up.stdout
        listed = cli("list")
        assert listed.returncode == 0 and ident in listed.stdout and "pictures" in listed.stdout
        images = cli("images", ident)
        assert [line.split()[-1] for line in images.stdout.splitlines()] == ["a.png", "b.jpg", "(palette)"]
        bad = tmp_path / "bad.zip"
        bad.write_bytes(zip_of({**GOOD, "../x.png": GOOD["a.png"]}))
        refused = cli("upload", str(bad))
        errors = [line for line in refused.stderr.splitlines() if "error" in line]  # after the progress bar
        assert refused.returncode == 1 and len(errors) == 1 and "UNSAFE_MEMBER" in errors[0], refused.stderr
        assert "Traceback" not in refused.stderr
        assert cli("delete", ident).returncode == 0
        assert ident not in cli("list").stdout
    finally:
        server.stop()
