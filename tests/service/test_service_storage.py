"""What the disk and stalled clients can do to a real server: a stored model file damaged or lost (found on
import, restored by an upload of the same bytes), a damaged import-cache entry (never used), a full disk
(RESOURCE_EXHAUSTED, nothing left behind), abandoned partial uploads (capped per tenant, expired), a stalled
upload stream (ended after --upload-idle-timeout, its lock released)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import threading
import time

import grpc
import onnx
import pytest
from onnx import numpy_helper

from featureviz.client import Client
from featureviz.client import FeaturevizClientError
from featureviz.client import images
from featureviz.client import pb
from featureviz.server import Limits
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background
from support.serve import ServeProcess
from support.serve import serve_failure

CHANNEL = {"channel": {"layer": "/Relu_1", "channel": 5}}


def _conv_weights(onnx_bytes: bytes) -> bytes:
    """The raw float32 bytes of the model's first convolution weights (as they sit in the file)."""
    model = onnx.load_from_string(onnx_bytes)
    tensor = next(t for t in model.graph.initializer if len(t.dims) == 4)
    return numpy_helper.to_array(tensor).astype("<f4").tobytes()


def _zero(path, needle: bytes) -> None:
    data = path.read_bytes()
    offset = data.index(needle)
    path.write_bytes(data[:offset] + bytes(len(needle)) + data[offset + len(needle):])


def _model_file(store, sha: str):
    return store / "models" / sha[:2] / f"{sha}.onnx"


def _render(fv: Client, sha: str) -> pb.Job:
    return fv.wait(fv.submit(sha, CHANNEL, steps=3, size=32, seed=1).id, timeout=120)


def test_a_corrupt_model_file_is_refused_until_an_upload_restores_it(tmp_path, tiny_onnx):
    store = tmp_path / "store"
    with serve_in_background(ServerConfig(store)) as server, Client(server.address) as fv:
        sha = fv.upload(tiny_onnx).sha256
        reference = _render(fv, sha)
    _zero(_model_file(store, sha), _conv_weights(tiny_onnx))  # still a valid ONNX file, with wrong weights
    shutil.rmtree(store / "cache")
    with serve_in_background(ServerConfig(store)) as server, Client(server.address) as fv:
        for _ in range(2):  # unusable, and it stays so
            with pytest.raises(FeaturevizClientError) as err:
                fv.submit(sha, CHANNEL, steps=3, size=32, seed=1)
            assert err.value.code == "FAILED_PRECONDITION" and err.value.reason == "MODEL_CORRUPT"
            assert "corrupt" in err.value.message and "upload" in err.value.message
            model = fv.model(sha)
            assert model.state == pb.MODEL_STATE_FAILED and model.failure_reason == "MODEL_CORRUPT"
        assert not fv.upload_status(sha, len(tiny_onnx)).model_exists  # the client will send the bytes
        restored = fv.upload(tiny_onnx)
        assert not restored.deduplicated and restored.state == pb.MODEL_STATE_READY and not restored.failure_reason
        assert _model_file(store, sha).read_bytes() == tiny_onnx
        assert fv.model(sha).state == pb.MODEL_STATE_READY
        done = _render(fv, sha)
        assert done.state == pb.JOB_STATE_SUCCEEDED and images(done) == images(reference)


def test_a_missing_model_file_is_restored_by_an_upload_for_every_tenant(tmp_path, tiny_onnx):
    config = ServerConfig(tmp_path / "store", tokens={"tok-a": "alice", "tok-b": "bob"})
    with serve_in_background(config) as server:
        with Client(server.address, token="tok-a") as alice, Client(server.address, token="tok-b") as bob:
            sha = alice.upload(tiny_onnx).sha256
            bob.upload(tiny_onnx)
    _model_file(config.store_dir, sha).unlink()
    with serve_in_background(config) as server:
        with Client(server.address, token="tok-a") as alice, Client(server.address, token="tok-b") as bob:
            with pytest.raises(FeaturevizClientError) as err:
                alice.submit(sha, CHANNEL, steps=3, size=32)
            assert err.value.code == "FAILED_PRECONDITION" and err.value.reason == "MODEL_FILE_MISSING"
            assert {alice.model(sha).failure_reason, bob.model(sha).failure_reason} == {"MODEL_FILE_MISSING"}
            restored = bob.upload(tiny_onnx)  # bob holds the bytes: his upload restores the shared file
            assert not restored.deduplicated and restored.state == pb.MODEL_STATE_READY
            assert _model_file(config.store_dir, sha).read_bytes() == tiny_onnx
            assert alice.model(sha).state == pb.MODEL_STATE_READY
            assert _render(alice, sha).state == pb.JOB_STATE_SUCCEEDED
            assert alice.upload(tiny_onnx).deduplicated  # intact again: nothing is sent


def test_a_damaged_import_cache_entry_is_never_used(tmp_path, tiny_onnx):
    store = tmp_path / "store"
    with serve_in_background(ServerConfig(store)) as server, Client(server.address) as fv:
        sha = fv.upload(tiny_onnx).sha256
        reference = _render(fv, sha)
    entry = store / "cache" / f"{sha}.pt"
    _zero(entry, _conv_weights(tiny_onnx))  # the cached module's weights, zeroed in place
    with serve_in_background(ServerConfig(store)) as server, Client(server.address) as fv:
        done = _render(fv, sha)
        assert done.state == pb.JOB_STATE_SUCCEEDED and images(done) == images(reference)
    assert _conv_weights(tiny_onnx) in entry.read_bytes()  # the import rewrote the entry


# ------------------------------------------------------------------------------------------------ a full disk


@pytest.fixture()
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a disk that really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"the disk-full test needs a small tmpfs, and this machine does not let us mount one "
                    f"({(done.stderr or done.stdout).strip() or 'mount failed'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(path) -> None:
    """Write ``path`` until the file system is full."""
    block = bytes(64 * 1024)
    with open(path, "wb", buffering=0) as out:
        try:
            while True:
                out.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    with open(path, "ab", buffering=0) as out:  # the last partial block too
        try:
            while True:
                out.write(b"\0" * 512)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def test_a_full_disk_is_resource_exhausted_and_leaves_nothing_behind(small_disk, tiny_onnx, tiny_onnx_other):
    store = small_disk / "store"
    other_sha = hashlib.sha256(tiny_onnx_other).hexdigest()
    with serve_in_background(ServerConfig(store)) as server, Client(server.address) as fv:
        sha = fv.upload(tiny_onnx).sha256
        before = _render(fv, sha)
        _fill(small_disk / "filler")
        with pytest.raises(FeaturevizClientError) as err:
            fv.upload(tiny_onnx_other)
        assert err.value.code == "RESOURCE_EXHAUSTED" and err.value.reason == "DISK_FULL", err.value
        assert "disk is full" in err.value.message
        assert list((store / "uploads").iterdir()) == [] and not _model_file(store, other_sha).exists()
        with pytest.raises(FeaturevizClientError) as err:
            fv.submit(sha, CHANNEL, steps=3, size=32, seed=1)
        assert err.value.code == "RESOURCE_EXHAUSTED" and err.value.reason == "DISK_FULL", err.value
        (small_disk / "filler").unlink()
        # the server stayed up and lost nothing
        assert fv.upload(tiny_onnx_other).state == pb.MODEL_STATE_READY
        again = _render(fv, sha)
        assert again.state == pb.JOB_STATE_SUCCEEDED and images(again) == images(before)
        assert fv.job(before.id).state == pb.JOB_STATE_SUCCEEDED


# ------------------------------------------------------------------------------------------------ partial uploads


def _variant(onnx_bytes: bytes, text: str) -> bytes:
    model = onnx.load_from_string(onnx_bytes)
    model.doc_string = text
    return model.SerializeToString()


def _header(data: bytes) -> pb.UploadModelRequest:
    return pb.UploadModelRequest(header=pb.UploadHeader(sha256=hashlib.sha256(data).hexdigest(),
                                                        size_bytes=len(data)))


def _chunk(data: bytes, start: int, end: int, finish: bool = False) -> pb.UploadModelRequest:
    return pb.UploadModelRequest(chunk=pb.UploadChunk(write_offset=start, data=data[start:end], finish_write=finish))


class StalledUpload:
    """An upload stream that sends its header and first ``held`` bytes, then nothing until released."""

    def __init__(self, fv: Client, data: bytes, held: int = 1024, timeout: float = 120):
        self.release = threading.Event()
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()

        def messages():
            yield _header(data)
            yield _chunk(data, 0, held)
            self.release.wait()

        def call():
            try:
                fv._models.UploadModel(messages(), timeout=timeout, metadata=fv._metadata)
            except grpc.RpcError as err:
                self.error = err
            finally:
                self.ended.set()

        self.thread = threading.Thread(target=call, daemon=True)
        self.thread.start()
        sha = hashlib.sha256(data).hexdigest()
        while fv.upload_status(sha, len(data)).committed_bytes < held and not self.ended.is_set():
            time.sleep(0.02)  # waiting for a condition: the server has written the bytes


def test_partial_uploads_are_capped_per_tenant_and_expire(tmp_path, tiny_onnx):
    a, b, c, d = (_variant(tiny_onnx, name) for name in "abcd")
    size = len(a)
    limits = Limits(max_partial_upload_bytes=size + size // 2, partial_upload_ttl_seconds=3600)
    config = ServerConfig(tmp_path / "store", limits=limits, tokens={"tok-a": "alice", "tok-b": "bob"})
    uploads = config.store_dir / "uploads"
    with serve_in_background(config) as server:
        with Client(server.address, token="tok-a") as alice, Client(server.address, token="tok-b") as bob:
            published = alice.info().limits
            assert (published.max_partial_upload_bytes, published.partial_upload_ttl_seconds) == (size + size // 2,
                                                                                                  3600)
            # alice abandons an upload of a; bob abandons one of b, which is then older than the TTL
            for fv, data in ((alice, a), (bob, b)):
                with pytest.raises(grpc.RpcError) as err:
                    fv._models.UploadModel(iter([_header(data), _chunk(data, 0, 4096)]), timeout=60,
                                           metadata=fv._metadata)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # UPLOAD_INCOMPLETE: resumable
            assert len(list(uploads.iterdir())) == 2
            old = time.time() - 2 * 3600
            (bob_partial,) = [p for p in uploads.iterdir() if p.name.startswith(hashlib.sha256(b).hexdigest())]
            os.utime(bob_partial, (old, old))
            # alice uploads c: her idle partial of a would put her over the cap, so it goes; bob's expired one too
            assert alice.upload(c).state == pb.MODEL_STATE_READY
            assert list(uploads.iterdir()) == []
            # an upload in progress counts at its declared size: a second one does not fit beside it
            stalled = StalledUpload(alice, a)
            try:
                with pytest.raises(FeaturevizClientError) as err:
                    alice.upload(d)
                assert err.value.code == "RESOURCE_EXHAUSTED" and err.value.reason == "PARTIAL_UPLOADS_FULL"
                assert "max_partial_upload_bytes" in err.value.message
                assert bob.upload(d).state == pb.MODEL_STATE_READY  # the cap is per tenant
            finally:
                stalled.release.set()
                stalled.ended.wait(120)
            assert alice.upload(d).deduplicated is False  # the stalled stream ended: room again


def test_a_stalled_upload_is_ended_and_its_lock_released(tmp_path, tiny_onnx):
    server = ServeProcess(tmp_path / "store", "--upload-idle-timeout", "1")
    try:
        with Client(server.address) as fv:
            assert fv.info().limits.upload_idle_timeout_seconds == 1
            stalled = StalledUpload(fv, tiny_onnx)
            try:
                assert stalled.ended.wait(120)  # the server ends it: the client did not
                assert stalled.error.code() == grpc.StatusCode.ABORTED, stalled.error
                assert "upload_idle_timeout" in stalled.error.details()
                sent = []
                model = fv.upload(tiny_onnx, progress=lambda done, total: sent.append(done))
                assert model.state == pb.MODEL_STATE_READY and sent[0] > 1024  # resumed after the held bytes
            finally:
                stalled.release.set()
    finally:
        server.stop(signal.SIGTERM)


# ------------------------------------------------------------------------------------------------ the database


def test_a_corrupt_database_is_refused_at_start_naming_the_file_and_the_recovery(tmp_path, tiny_onnx):
    store = tmp_path / "store"
    with serve_in_background(ServerConfig(store)) as server, Client(server.address) as fv:
        sha = fv.upload(tiny_onnx).sha256
        for seed in range(3):
            fv.wait(fv.submit(sha, CHANNEL, steps=2, size=16, seed=seed).id, timeout=120)
    database = store / "featureviz.sqlite3"
    assert not (store / "featureviz.sqlite3-wal").exists()  # a clean stop checkpointed everything
    data = database.read_bytes()
    database.write_bytes(data[:-4096] + b"\xa5" * 4096)  # the last page overwritten
    code, text = serve_failure(store)
    assert code != 0, text
    assert "listening on" not in text and "Traceback" not in text, text
    assert str(database) in text and "damaged" in text and ".recover" in text, text
