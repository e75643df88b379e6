"""What a hostile (or careless) client can send, against a real server on loopback with default gRPC clients:
long strings are never echoed in full, objectives are bounded in size and depth, requests protobuf cannot decode
are INVALID_ARGUMENT (no traceback logged), init images are checked at their header, list replies stay small."""

from __future__ import annotations

import io
import logging

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from featureviz.client import Client
from featureviz.client import FeaturevizClientError
from featureviz.client import pb
from featureviz.v1 import featureviz_pb2_grpc as pb_grpc

TV = pb.Objective(tv=pb.TotalVariationObjective())
ECHO_BOUND = 300  # every message and detail text: far below what a 20 kB echo would make


@pytest.fixture()
def channel(server):
    with grpc.insecure_channel(server.address) as ch:  # a default client: 4 MB replies, 8/16 KB metadata
        yield ch


def _status(call):
    """Run ``call``; -> (code, message, [every text of the google.rpc details])."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    status = rpc_status.from_call(err.value)
    texts = []
    for detail in status.details if status is not None else ():
        for kind in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo, error_details_pb2.QuotaFailure):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                texts.append(str(message))
    return err.value.code(), err.value.details(), texts


def _assert_capped(code, message, texts, expected):
    assert code == expected, (code, message[:300])
    assert len(message) < ECHO_BOUND and "\u2026" in message, message
    assert texts and all(len(text) < 2 * ECHO_BOUND for text in texts), texts


def test_long_strings_are_echoed_capped_in_messages_and_details(channel, tiny_model):
    jobs, models = pb_grpc.JobServiceStub(channel), pb_grpc.ModelServiceStub(channel)
    long = "j" * 20_000
    _assert_capped(*_status(lambda: jobs.GetJob(pb.GetJobRequest(job=long), timeout=30)), grpc.StatusCode.NOT_FOUND)
    _assert_capped(*_status(lambda: jobs.CancelJob(pb.CancelJobRequest(job=long), timeout=30)),
                   grpc.StatusCode.NOT_FOUND)
    _assert_capped(*_status(lambda: models.GetModel(pb.GetModelRequest(model=long), timeout=30)),
                   grpc.StatusCode.INVALID_ARGUMENT)
    _assert_capped(*_status(lambda: models.ListLayers(pb.ListLayersRequest(model=long), timeout=30)),
                   grpc.StatusCode.INVALID_ARGUMENT)
    sha = tiny_model.sha256
    specs = {
        "model": pb.JobSpec(model=long, objective=TV),
        "layer": pb.JobSpec(model=sha, objective=pb.Objective(layer=pb.LayerObjective(layer="L" * 20_000))),
        "mean": pb.JobSpec(model=sha, objective=TV, preprocess=pb.Preprocess(mean=[0.5] * 1000, std=[0.2] * 3)),
    }
    for name, spec in specs.items():
        code, message, texts = _status(lambda: jobs.CreateJob(pb.CreateJobRequest(spec=spec), timeout=30))
        _assert_capped(code, message, texts, grpc.StatusCode.INVALID_ARGUMENT)
        assert ("20000 characters" if name != "mean" else "1000 values") in message  # says how long it was
    # a request id reused for another objective
    jobs.CreateJob(pb.CreateJobRequest(spec=pb.JobSpec(model=sha, objective=TV, steps=1), request_id="r" * 20_000),
                   timeout=30)
    other = pb.JobSpec(model=sha, objective=pb.Objective(l2=pb.ConstantObjective()), steps=1)
    _assert_capped(*_status(lambda: jobs.CreateJob(pb.CreateJobRequest(spec=other, request_id="r" * 20_000),
                                                   timeout=30)), grpc.StatusCode.INVALID_ARGUMENT)


def _sum(terms: int) -> pb.Objective:
    channel = pb.Objective(channel=pb.ChannelObjective(layer="/Relu_1", channel=1))
    return pb.Objective(sum=pb.SumObjective(terms=[channel] * terms))


def _nested(levels: int) -> pb.Objective:
    objective = pb.Objective(channel=pb.ChannelObjective(layer="/Relu_1", channel=1))
    for _ in range(levels - 1):
        objective = pb.Objective(scale=pb.ScaleObjective(factor=1.0, objective=objective))
    return objective


def test_objective_size_and_depth_are_limited_and_published(client, tiny_model):
    limits = client.info().limits
    assert limits.max_objective_nodes == 512 and limits.max_objective_depth == 16
    sha = tiny_model.sha256
    with pytest.raises(FeaturevizClientError) as err:
        client.submit(sha, _sum(limits.max_objective_nodes), steps=1, size=16)  # 512 terms + the sum itself
    assert err.value.code == "INVALID_ARGUMENT" and err.value.reason == "OBJECTIVE_TOO_LARGE"
    assert "max_objective_nodes" in err.value.message and "512" in err.value.message
    with pytest.raises(FeaturevizClientError) as err:
        client.submit(sha, _nested(limits.max_objective_depth + 1), steps=1, size=16)
    assert err.value.code == "INVALID_ARGUMENT" and err.value.reason == "OBJECTIVE_TOO_DEEP"
    assert "max_objective_depth" in err.value.message and "16" in err.value.message
    # at the limits exactly, the jobs run
    for objective in (_sum(limits.max_objective_nodes - 1), _nested(limits.max_objective_depth)):
        done = client.wait(client.submit(sha, objective, steps=1, size=16).id, timeout=120)
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.error


def _noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def test_list_jobs_returns_summaries_and_get_job_the_spec(server, client, tiny_model):
    big = _noise_png(1024)  # 3 MB: two such jobs in one page were over a default client's 4 MB reply limit
    objective = _sum(400)
    ids = [client.submit(tiny_model.sha256, objective, steps=1, size=16, init_image=big, param="pixel").id
           for _ in range(2)]
    for job_id in ids:
        assert client.wait(job_id, timeout=120).state == pb.JOB_STATE_SUCCEEDED
    with grpc.insecure_channel(server.address) as channel:  # default limits
        reply = pb_grpc.JobServiceStub(channel).ListJobs(pb.ListJobsRequest(page_size=5), timeout=30)
    assert reply.ByteSize() < 64 * 1024
    listed = {job.id: job for job in reply.jobs}
    for job_id in ids:
        summary = listed[job_id]
        assert not summary.spec.HasField("objective") and not summary.spec.init_image
        assert summary.spec.model == tiny_model.sha256 and summary.spec.steps == 1
        assert summary.objective_text.startswith("/Relu_1:1 + /Relu_1:1 + ") and len(summary.objective_text) <= 200
        full = client.job(job_id)
        assert full.spec.objective == objective and full.spec.init_image == big and not full.objective_text


def _varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


def _field(tag: bytes, body: bytes) -> bytes:
    return tag + _varint(len(body)) + body


def _deep_create_job(sha: str, levels: int) -> bytes:
    """A CreateJobRequest whose objective nests ``levels`` scales: built by hand, because the Python protobuf
    library itself refuses to parse (and so to copy) such a message."""
    objective = _field(b"\x6a", b"")  # tv
    for _ in range(levels):
        objective = _field(b"\x82\x01", _field(b"\x12", objective))  # Objective.scale(16) -> ScaleObjective.objective(2)
    spec = _field(b"\x0a", sha.encode()) + _field(b"\x12", objective)
    return _field(b"\x0a", spec)


def test_requests_too_deep_to_decode_are_invalid_argument_without_a_traceback(channel, tiny_model, caplog):
    create = channel.unary_unary("/featureviz.v1.JobService/CreateJob", request_serializer=lambda b: b,
                                 response_deserializer=pb.Job.FromString)
    with caplog.at_level(logging.WARNING):
        for levels in (60, 200):
            with pytest.raises(grpc.RpcError) as err:
                create(_deep_create_job(tiny_model.sha256, levels), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert "max_objective_depth" in err.value.details() and "16" in err.value.details()
        # a stream: an upload whose second message is not a message at all
        upload = channel.stream_unary("/featureviz.v1.ModelService/UploadModel", request_serializer=lambda b: b,
                                      response_deserializer=pb.Model.FromString)
        header = pb.UploadModelRequest(header=pb.UploadHeader(sha256="a" * 64, size_bytes=10)).SerializeToString()
        with pytest.raises(grpc.RpcError) as err:
            upload(iter([header, b"\xff\xff\xff\xff"]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert client_still_works(channel)


def client_still_works(channel) -> bool:
    return pb_grpc.InfoServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=30).api_version == "v1"


def _png_declaring(width: int, height: int) -> bytes:
    """A valid PNG of ``width`` x ``height`` black pixels: small on the wire (it compresses), huge decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * (3 * width)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_init_image_size_is_refused_from_its_header(client, tiny_model):
    limit = client.info().limits.max_image_side
    huge = _png_declaring(12_000, 12_000)
    assert len(huge) < 1 << 20 and Image.open(io.BytesIO(huge)).size == (12_000, 12_000)
    with pytest.raises(FeaturevizClientError) as err:
        client.submit(tiny_model.sha256, {"tv": {}}, steps=1, size=16, init_image=huge)
    assert err.value.code == "INVALID_ARGUMENT" and err.value.reason == "IMAGE_TOO_LARGE"
    assert err.value.field_violations[0][0] == "spec.init_image"
    assert "12000x12000" in err.value.message and str(limit) in err.value.message
    for junk in (b"not an image", _png_declaring(64, 64)[:60]):  # not an image; a truncated PNG
        with pytest.raises(FeaturevizClientError) as err:
            client.submit(tiny_model.sha256, {"tv": {}}, steps=1, size=16, init_image=junk)
        assert err.value.code == "INVALID_ARGUMENT" and err.value.field_violations[0][0] == "spec.init_image"
        assert " at 0x" not in err.value.message and "<" not in err.value.message, err.value.message
    ok = client.submit(tiny_model.sha256, {"tv": {}}, steps=1, size=16, init_image=_png_declaring(limit, 8))
    assert client.wait(ok.id, timeout=120).state == pb.JOB_STATE_SUCCEEDED
