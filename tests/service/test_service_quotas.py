"""Fairness and abuse limits of one tenant against a real server on loopback (issue 21): the learning rate's range,
an upload's preprocessing checked with the job's rule before any byte is stored, storage quotas (models and bytes
per tenant), concurrent upload streams and watch streams per tenant, previews coalesced for a slow reader, failed
sign-ins throttled per client address (the web gateway's unix socket exempt), and ``serve --ray ADDRESS`` that
gives up on an address that does not answer."""

from __future__ import annotations

import hashlib
import math
import socket
import threading

import grpc
import onnx
import pytest

from featureviz.client import Client
from featureviz.client import FeaturevizClientError
from featureviz.client import from_rpc_error
from featureviz.client import pb
from featureviz.server import Limits
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background
from featureviz.v1 import featureviz_pb2_grpc as pb_grpc
from support.serve import serve_failure

CHANNEL = {"channel": {"layer": "/Relu_1", "channel": 5}}


def _variant(onnx_bytes: bytes, text: str) -> bytes:
    """The same model in other bytes (another sha256)."""
    model = onnx.load_from_string(onnx_bytes)
    model.doc_string = text
    return model.SerializeToString()


def _header(data: bytes, **preprocess) -> pb.UploadModelRequest:
    header = pb.UploadHeader(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    if preprocess:
        header.preprocess.CopyFrom(pb.Preprocess(**preprocess))
    return pb.UploadModelRequest(header=header)


def _chunk(data: bytes, start: int, end: int, finish: bool = False) -> pb.UploadModelRequest:
    return pb.UploadModelRequest(chunk=pb.UploadChunk(write_offset=start, data=data[start:end], finish_write=finish))


def _raw_upload(fv: Client, messages) -> FeaturevizClientError:
    """An UploadModel stream of ``messages`` that the server refuses -> the client's error."""
    with pytest.raises(grpc.RpcError) as err:
        fv._models.UploadModel(iter(messages), timeout=60, metadata=fv._metadata)
    return from_rpc_error(err.value)


# --------------------------------------------------------------------------------------------------------- lr (item 12)


def test_lr_out_of_its_published_range_is_invalid_argument(client, tiny_model):
    limits = client.info().limits
    assert (limits.min_lr, limits.max_lr) == (Limits().min_lr, Limits().max_lr) == (1e-6, 10.0)
    for lr in (1e30, 10.5, float("nan"), float("inf"), -1.0, 0.0, 1e-9):
        with pytest.raises(FeaturevizClientError) as err:
            client.submit(tiny_model.sha256, CHANNEL, steps=1, size=32, lr=lr)
        assert err.value.code == "INVALID_ARGUMENT", (lr, err.value)
        assert err.value.field_violations[0][0] == "spec.lr", err.value.field_violations
        assert "min_lr" in err.value.message and "max_lr" in err.value.message and "1e-06 to 10" in err.value.message
        assert repr(lr) in err.value.message  # the value itself
    job = client.wait(client.submit(tiny_model.sha256, CHANNEL, steps=1, size=32, lr=10.0).id, timeout=120)
    assert job.state == pb.JOB_STATE_SUCCEEDED  # the bound itself is allowed


# -------------------------------------------------------------------------------------------------- preprocess (item 7)


def test_an_upload_preprocess_is_checked_with_the_jobs_rule_before_any_byte_is_stored(server, client,
                                                                                      tiny_onnx, tiny_model):
    data = _variant(tiny_onnx, "preprocess")
    uploads = server.config.store_dir / "uploads"
    bad = {
        "header.preprocess.mean[0]": dict(mean=[math.nan, math.inf, 1.0], std=[1.0, 1.0, 1.0]),
        "header.preprocess.std[0]": dict(mean=[0.5, 0.5, 0.5], std=[0.0, 0.0, 0.0]),
        "header.preprocess.std[2]": dict(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, -1.0]),
        "header.preprocess": dict(mean=[0.5], std=[]),  # half a preprocess
        "header.preprocess.channel_order": dict(mean=[0.5], std=[0.5], channel_order="GRB"),
    }
    for field, preprocess in bad.items():
        # the header alone: the answer comes before any chunk is sent
        error = _raw_upload(client, [_header(data, **preprocess)])
        assert (error.code, error.field_violations[0][0]) == ("INVALID_ARGUMENT", field), error
        assert list(uploads.iterdir()) == []
    with pytest.raises(FeaturevizClientError) as err:
        client.upload(data, preprocess={"mean": [0.5] * 3, "std": [0.0] * 3})
    assert err.value.field_violations[0][0] == "header.preprocess.std[0]" and "got 0.0" in err.value.message
    sha = hashlib.sha256(data).hexdigest()
    assert sha not in {m.sha256 for m in client.models()} and list(uploads.iterdir()) == []
    # the same rule refuses the same values in a job, with the job's field path
    for preprocess, field in (({"mean": [math.nan] * 3, "std": [1.0] * 3}, "spec.preprocess.mean[0]"),
                              ({"mean": [0.5] * 3, "std": [0.0] * 3}, "spec.preprocess.std[0]")):
        with pytest.raises(FeaturevizClientError) as err:
            client.submit(tiny_model.sha256, CHANNEL, steps=1, size=32, preprocess=preprocess)
        assert (err.value.code, err.value.field_violations[0][0]) == ("INVALID_ARGUMENT", field), err.value
    # a sound preprocess is stored and used
    model = client.upload(data, preprocess={"mean": [0.5] * 3, "std": [0.25] * 3})
    assert model.state == pb.MODEL_STATE_READY and list(model.input_spec.preprocess.std) == [0.25] * 3
    client.delete_model(model.sha256)


# ----------------------------------------------------------------------------------------------- storage quota (item 8)


def test_models_and_bytes_are_capped_per_tenant_and_deleting_frees_quota(tmp_path, tiny_onnx):
    a, b, c, d = (_variant(tiny_onnx, name) for name in "abcd")
    size = max(map(len, (a, b, c, d)))
    limits = Limits(max_models_per_tenant=2, max_model_bytes_per_tenant=3 * size)
    config = ServerConfig(tmp_path / "store", limits=limits, tokens={"tok-a": "alice", "tok-b": "bob"})
    uploads = config.store_dir / "uploads"
    with serve_in_background(config) as server, Client(server.address, token="tok-a") as alice, \
            Client(server.address, token="tok-b") as bob:
        published = alice.info().limits
        assert (published.max_models_per_tenant, published.max_model_bytes_per_tenant) == (2, 3 * size)
        alice.upload(a)
        alice.upload(b)
        # the third model: refused at the header, from its declared size, before any byte is written
        error = _raw_upload(alice, [_header(c)])
        assert (error.code, error.reason) == ("RESOURCE_EXHAUSTED", "MODEL_QUOTA"), error
        assert "max_models_per_tenant" in error.message and "2" in error.message
        assert list(uploads.iterdir()) == []
        with pytest.raises(FeaturevizClientError) as err:
            alice.upload(c)
        assert err.value.reason == "MODEL_QUOTA"
        assert alice.upload(a).deduplicated  # a model the tenant holds is not counted twice
        sha_a = hashlib.sha256(a).hexdigest()
        (config.store_dir / "models" / sha_a[:2] / f"{sha_a}.onnx").unlink()  # ... nor when its upload restores it
        restored = alice.upload(a)
        assert not restored.deduplicated and alice.model(sha_a).state == pb.MODEL_STATE_READY
        assert bob.upload(c).state == pb.MODEL_STATE_READY  # the quota is per tenant
        alice.delete_model(sha_a)  # deleting frees quota
        assert alice.upload(c).state == pb.MODEL_STATE_READY
        assert sorted(m.sha256 for m in alice.models()) == sorted(hashlib.sha256(x).hexdigest() for x in (b, c))
    # bytes: the same models under a bytes quota of 1.5 models
    limits = Limits(max_models_per_tenant=10, max_model_bytes_per_tenant=size + size // 2)
    with serve_in_background(config.replace(store_dir=tmp_path / "store2", limits=limits)) as server, \
            Client(server.address, token="tok-a") as alice:
        alice.upload(a)
        error = _raw_upload(alice, [_header(b)])
        assert (error.code, error.reason) == ("RESOURCE_EXHAUSTED", "STORAGE_QUOTA"), error
        assert "max_model_bytes_per_tenant" in error.message and str(size + size // 2) in error.message
        alice.delete_model(hashlib.sha256(a).hexdigest())
        assert alice.upload(b).state == pb.MODEL_STATE_READY


# ---------------------------------------------------------------------------------------------- upload streams (item 3)


class OpenUpload:
    """An upload stream that sends its header and first bytes, then nothing until released."""

    def __init__(self, fv: Client, data: bytes):
        self.release = threading.Event()
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        self.sent = threading.Event()

        def messages():
            yield _header(data)
            yield _chunk(data, 0, 1024)
            self.release.wait()

        def call():
            try:
                fv._models.UploadModel(messages(), timeout=120, metadata=fv._metadata)
            except grpc.RpcError as err:
                self.error = err
            finally:
                self.ended.set()

        threading.Thread(target=call, daemon=True).start()
        sha = hashlib.sha256(data).hexdigest()
        while fv.upload_status(sha, len(data)).committed_bytes < 1024 and not self.ended.is_set():
            self.ended.wait(0.02)  # waiting for a condition: the server has the stream and its first bytes

    def close(self) -> None:
        self.release.set()
        assert self.ended.wait(120)


def test_concurrent_upload_streams_are_capped_per_tenant(tmp_path, tiny_onnx):
    a, b, c = (_variant(tiny_onnx, name) for name in "abc")
    config = ServerConfig(tmp_path / "store", limits=Limits(max_concurrent_uploads_per_tenant=2),
                          tokens={"tok-a": "alice", "tok-b": "bob"})
    with serve_in_background(config) as server, Client(server.address, token="tok-a") as alice, \
            Client(server.address, token="tok-b") as bob:
        assert alice.info().limits.max_concurrent_uploads_per_tenant == 2
        first, second = OpenUpload(alice, a), OpenUpload(alice, b)
        try:
            with pytest.raises(FeaturevizClientError) as err:
                alice.upload(c)
            assert (err.value.code, err.value.reason) == ("RESOURCE_EXHAUSTED", "TOO_MANY_UPLOADS"), err.value
            assert "max_concurrent_uploads_per_tenant" in err.value.message and "2" in err.value.message
            assert bob.upload(c).state == pb.MODEL_STATE_READY  # per tenant
        finally:
            first.close()
            second.close()
        assert alice.upload(c).deduplicated is False  # the streams ended: their slots are free


# ----------------------------------------------------------------------------------------------- watch streams (item 6)


def _open_watch(stub, job_id: str):
    stream = stub.WatchJob(pb.WatchJobRequest(job=job_id), timeout=120)
    assert next(stream).HasField("snapshot")  # the server holds the stream now
    return stream


def test_watch_streams_are_capped_per_tenant(tmp_path, tiny_onnx):
    config = ServerConfig(tmp_path / "store", limits=Limits(max_watches_per_tenant=2), heartbeat_seconds=0.5)
    with serve_in_background(config) as server, Client(server.address, timeout=60) as fv:
        assert fv.info().limits.max_watches_per_tenant == 2
        sha = fv.upload(tiny_onnx).sha256
        job = fv.submit(sha, CHANNEL, steps=10_000, size=32)  # runs until cancelled
        streams = [_open_watch(fv._jobs, job.id) for _ in range(2)]
        try:
            with pytest.raises(FeaturevizClientError) as err:
                next(fv.watch(job.id))
            assert (err.value.code, err.value.reason) == ("RESOURCE_EXHAUSTED", "TOO_MANY_WATCHES"), err.value
            assert "max_watches_per_tenant" in err.value.message and "2" in err.value.message
            jobs_before = len(list(fv.jobs()))
            with pytest.raises(FeaturevizClientError) as err:  # CreateAndWatchJob counts, refused before the job
                next(fv.create_and_watch(sha, CHANNEL, steps=1, size=32))
            assert err.value.reason == "TOO_MANY_WATCHES"
            assert len(list(fv.jobs())) == jobs_before
        finally:
            for stream in streams:
                stream.cancel()
        # the closed streams free their slots (the server sees the cancel soon after: wait for it, bounded)
        for attempt in range(600):
            try:
                assert next(fv.watch(job.id)).HasField("snapshot")
                break
            except FeaturevizClientError as err:
                assert err.reason == "TOO_MANY_WATCHES" and attempt < 599, err
                threading.Event().wait(0.05)
        fv.cancel(job.id)


def test_a_slow_reader_gets_the_newest_preview_and_every_other_event(client, tiny_model):
    """A reader that does not read while the job runs: the server stops at HTTP/2 flow control, and when the
    reader catches up the previews logged meanwhile are coalesced to the newest; progress, state and the result
    are all there (compared with a watch of the same job without previews)."""
    steps = 60
    job = client.submit(tiny_model.sha256, CHANNEL, steps=steps, size=128, batch=4, seed=3, preview_every=1,
                        preview_max_side=128)
    # a channel whose receive window stays small (no BDP growth): a few previews fill it
    options = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(client.address, options=options) as channel:
        stream = pb_grpc.JobServiceStub(channel).WatchJob(
            pb.WatchJobRequest(job=job.id, include_previews=True), timeout=300)
        assert next(stream).HasField("snapshot")
        finished = client.wait(job.id, timeout=300)  # the slow reader reads nothing until the job has finished
        assert finished.state == pb.JOB_STATE_SUCCEEDED
        slow = list(stream)
    full = [e for e in client.watch(job.id, timeout=120)
            if not e.HasField("heartbeat") and not e.HasField("snapshot")]
    previews = [e.preview.step for e in slow if e.HasField("preview")]
    others = [e.seq for e in slow if not e.HasField("preview") and not e.HasField("heartbeat")]
    assert others == [e.seq for e in full]  # progress, state changes and the result: none dropped
    assert previews and previews[-1] == steps  # the newest preview arrives
    assert len(previews) < steps // 2, previews  # older unsent ones were dropped
    assert previews == sorted(previews)
    # re-attaching by seq still works: from the middle, the rest of the log (previews logged before are replayed)
    middle = full[len(full) // 2].seq
    again = [e for e in client.watch(job.id, from_seq=middle, previews=True, timeout=120)
             if not e.HasField("heartbeat") and not e.HasField("snapshot")]
    assert [e.seq for e in again if not e.HasField("preview")] == [e.seq for e in full if e.seq > middle]
    assert again[-1].HasField("result")


# --------------------------------------------------------------------------------------------------- sign-ins (item 11)


def test_failed_sign_ins_are_throttled_per_address_but_not_for_the_web_gateways_socket(tmp_path):
    config = ServerConfig(tmp_path / "store", tokens={"good": "alice"}, limits=Limits(max_failed_auth_per_minute=3),
                          http_port=0)
    with serve_in_background(config) as server:
        with Client(server.address, token="wrong") as guesser, Client(server.address, token="good") as owner:
            assert owner.info().limits.max_failed_auth_per_minute == 3
            for _ in range(3):
                with pytest.raises(FeaturevizClientError) as err:
                    guesser.info()
                assert err.value.code == "UNAUTHENTICATED"
            for fv in (guesser, owner):  # the address is throttled: a valid token too, until the window passes
                with pytest.raises(FeaturevizClientError) as err:
                    fv.info()
                assert (err.value.code, err.value.reason) == ("RESOURCE_EXHAUSTED", "SIGN_IN_THROTTLED"), err.value
                assert "max_failed_auth_per_minute" in err.value.message and "retry in" in err.value.message
                assert 0 < err.value.retry_after <= 60
            with pytest.raises(FeaturevizClientError) as err:  # streaming calls too
                next(owner.watch("0123456789abcdef"))
            assert err.value.reason == "SIGN_IN_THROTTLED"
        # the web gateway's private unix socket: its failures are not counted, it is never throttled
        target = server._server.web._target
        assert target.startswith("unix:")
        with Client(target, token="wrong") as web_guesser, Client(target, token="good") as web_user:
            for _ in range(6):
                with pytest.raises(FeaturevizClientError) as err:
                    web_guesser.info()
                assert err.value.code == "UNAUTHENTICATED"
            assert web_user.info().limits.max_failed_auth_per_minute == 3


# ------------------------------------------------------------------------------------------------- serve --ray (item 9)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_ray(tmp_path, address: str, *extra: str) -> tuple[int, str]:
    return serve_failure(tmp_path / "s", "--ray", address, *extra)


def test_serve_ray_with_an_address_that_does_not_answer_exits_with_one_line(tmp_path):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{_closed_port()}"
    code, stderr = _serve_ray(tmp_path, address)  # Ray's own ray.init would retry for minutes
    ours = [line for line in stderr.splitlines() if line.startswith("featureviz serve")]
    assert code == 1 and len(ours) == 1, stderr
    assert address in ours[0] and "30 s (--ray-timeout)" in ours[0], ours
    # a port that accepts connections but is not Ray: ray.init is given --ray-timeout, then serve exits
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        code, stderr = _serve_ray(tmp_path, address, "--ray-timeout", "3")
    ours = [line for line in stderr.splitlines() if line.startswith("featureviz serve")]
    assert code == 1 and len(ours) == 1, stderr
    assert address in ours[0] and "3 s (--ray-timeout)" in ours[0], ours
