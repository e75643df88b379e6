"""Protocol details a careful client relies on, against a real server: the Bearer scheme in any case, the size
error naming the real limits, a from_seq past the end, DeleteModel with unfinished jobs (refused), reflection
under grpc.reflection.v1 as well as v1alpha, and a SIGTERM that ends the server within --grace."""

from __future__ import annotations

import signal
import threading

import grpc
import pytest
from google.protobuf import descriptor_pb2

from featureviz.client import Client
from featureviz.client import FeaturevizClientError
from featureviz.client import pb
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background
from featureviz.server.app import SERVICE_NAMES
from featureviz.v1 import featureviz_pb2_grpc as pb_grpc
from support.serve import ServeProcess

CHANNEL = {"channel": {"layer": "/Relu_1", "channel": 3}}


def test_the_bearer_scheme_is_case_insensitive(tmp_path):
    with serve_in_background(ServerConfig(tmp_path, tokens={"tok-a": "alice"})) as server, \
            grpc.insecure_channel(server.address) as channel:
        info = pb_grpc.InfoServiceStub(channel).GetServerInfo
        for header in ("Bearer tok-a", "bearer tok-a", "BEARER tok-a", "bEaReR  tok-a "):
            reply = info(pb.GetServerInfoRequest(), metadata=[("authorization", header)], timeout=30)
            assert reply.tenant == "alice", header
        for header in ("Basic tok-a", "Bearer", "Bearertok-a", "Bearer tok-b"):
            with pytest.raises(grpc.RpcError) as err:
                info(pb.GetServerInfoRequest(), metadata=[("authorization", header)], timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, header


def test_the_size_error_states_the_real_limits(client, tiny_model):
    limits = client.info().limits
    assert (limits.min_image_side, limits.max_image_side) == (8, 1024)
    for size in (4, 2000, (16, 1025)):
        with pytest.raises(FeaturevizClientError) as err:
            client.submit(tiny_model.sha256, CHANNEL, steps=1, size=size)
        assert err.value.code == "INVALID_ARGUMENT" and err.value.field_violations[0][0] == "spec.size"
        assert "8 to 1024" in err.value.message and "4096" not in err.value.message, err.value.message


def test_a_from_seq_past_the_end_is_answered_with_the_real_seq(client, tiny_model):
    done = client.wait(client.submit(tiny_model.sha256, CHANNEL, steps=2, size=16).id, timeout=120)
    assert done.last_seq > 0
    events = list(client.watch(done.id, from_seq=1_000_000_000, timeout=60))
    assert [e.WhichOneof("event") for e in events] == ["snapshot", "result"]
    assert [e.seq for e in events] == [done.last_seq, done.last_seq]
    assert events[0].snapshot.last_seq == events[1].result.last_seq == done.last_seq
    # a running job: the client's number does not hide the events that follow
    running = client.submit(tiny_model.sha256, CHANNEL, steps=5000, size=32)
    try:
        stream = client.watch(running.id, from_seq=1_000_000_000, timeout=120)
        first = next(stream)
        assert first.HasField("snapshot") and first.seq < 1_000_000_000
        following = next(e for e in stream if not e.HasField("heartbeat"))
        assert first.seq < following.seq < 1_000_000_000
        stream.close()
    finally:
        client.cancel(running.id)
    assert client.wait(running.id, timeout=120).state == pb.JOB_STATE_CANCELLED


def test_delete_model_is_refused_while_its_jobs_are_queued_or_running(client, server, tiny_onnx):
    import onnx

    model = onnx.load_from_string(tiny_onnx)
    model.doc_string = "in use"
    uploaded = client.upload(model.SerializeToString())
    blocker = client.submit(uploaded.sha256, CHANNEL, steps=5000, size=32)
    queued = client.submit(uploaded.sha256, CHANNEL, steps=2, size=32)
    with pytest.raises(FeaturevizClientError) as err:
        client.delete_model(uploaded.sha256)
    assert err.value.code == "FAILED_PRECONDITION" and err.value.reason == "MODEL_IN_USE"
    assert f"jobs/{blocker.id}" in err.value.message and f"jobs/{queued.id}" in err.value.message
    assert client.model(uploaded.sha256).state == pb.MODEL_STATE_READY  # nothing was deleted
    for job in (queued, blocker):
        client.cancel(job.id)
    assert {client.wait(j.id, timeout=120).state for j in (queued, blocker)} == {pb.JOB_STATE_CANCELLED}
    client.delete_model(uploaded.sha256)
    with pytest.raises(FeaturevizClientError) as err:
        client.model(uploaded.sha256)
    assert err.value.code == "NOT_FOUND"


def _reflect(channel, version: str, request: dict):
    from grpc_reflection.v1alpha import reflection_pb2

    call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    (reply,) = list(call(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=30))
    return reply


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_v1_and_v1alpha(server, version):
    with grpc.insecure_channel(server.address) as channel:
        listed = {s.name for s in _reflect(channel, version, {"list_services": ""}).list_services_response.service}
        assert {*SERVICE_NAMES, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"} <= listed
        for symbol, package in (("featureviz.v1.JobService", "featureviz.v1"),
                                ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1")):
            reply = _reflect(channel, version, {"file_containing_symbol": symbol})
            assert reply.HasField("file_descriptor_response"), reply
            files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                     for b in reply.file_descriptor_response.file_descriptor_proto]
            assert package in {f.package for f in files}


def test_sigterm_with_a_job_in_flight_ends_within_the_grace(tmp_path, tiny_onnx):
    """The running job and the open calls share the --grace deadline: a watch stream is ended (UNAVAILABLE, to
    re-attach) when the job is re-queued, not kept open for another grace period (heartbeats every 0.1 s would
    show it)."""
    server = ServeProcess(tmp_path / "store", "--grace", "2", "--heartbeat", "0.1")
    events, ended = [], threading.Event()
    try:
        with Client(server.address) as fv:
            job = fv.submit(fv.upload(tiny_onnx).sha256, CHANNEL, steps=10_000, size=32)

            def watch():
                try:
                    for event in fv.watch(job.id, timeout=120):
                        events.append(event.WhichOneof("event"))
                except FeaturevizClientError as err:
                    events.append(err.code)
                finally:
                    ended.set()

            threading.Thread(target=watch, daemon=True).start()
            while "progress" not in events and not ended.is_set():
                ended.wait(0.05)  # until the job runs
            signalled = len(events)  # the events the watcher had before the signal
            assert server.stop(signal.SIGTERM) == 0
            assert ended.wait(60)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    # The stream ends within the one --grace deadline (2 s: at most ~20 heartbeats of 0.1 s after the signal);
    # before the fix it stayed open for another grace (~40). A loaded machine only delays heartbeats, so it can
    # lower this count, never raise it: the bound holds on any machine without timing anything.
    after = events[signalled:]
    assert after.count("heartbeat") <= 30, after
    assert after[-1] == "UNAVAILABLE", after  # ended by the server, to re-attach after the restart
    assert "featureviz serve: stopped\n" in server.lines
