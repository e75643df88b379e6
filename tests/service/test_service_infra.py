"""Health (Check and Watch), reflection, server info, bearer-token auth with tenants, queue limits."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from featureviz.client import Client
from featureviz.client import FeaturevizClientError
from featureviz.client import pb
from featureviz.v1 import featureviz_pb2_grpc as pb_grpc
from featureviz.server import Limits
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background
from featureviz.server.app import SERVICE_NAMES

CHANNEL = {"channel": {"layer": "/Relu_1", "channel": 3}}


def test_health_check_and_watch(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", *SERVICE_NAMES):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        stream = stub.Watch(health_pb2.HealthCheckRequest(service="featureviz.v1.JobService"), timeout=10)
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        stream.cancel()


def test_reflection_lists_and_describes_the_services(server):
    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {*SERVICE_NAMES, "grpc.health.v1.Health"} <= services
        descriptor = database.FindFileContainingSymbol("featureviz.v1.JobService")
        assert descriptor.package == "featureviz.v1"
        methods = {m.name for s in descriptor.service if s.name == "JobService" for m in s.method}
        assert methods == {"CreateJob", "WatchJob", "CreateAndWatchJob", "GetJob", "ListJobs", "CancelJob",
                           "ListAtlasUnits", "GetAtlasUnit"}


def test_server_info(client):
    info = client.info()
    assert info.api_version == "v1" and info.version
    assert info.limits.max_chunk_bytes == 1 << 20 and info.limits.max_image_side > 0
    assert info.device.kind in ("cpu", "cuda") and not info.auth_required and info.tenant == "default"
    assert "channel" in info.objective_kinds and "neuron_direction" in info.objective_kinds


def test_every_limit_is_published(client):
    """Each field of the server's Limits has its proto field and reaches clients with its value."""
    import dataclasses

    published = client.info().limits
    for field in dataclasses.fields(Limits):
        assert field.name in pb.Limits.DESCRIPTOR.fields_by_name, f"Limits.{field.name} is not in the proto"
        assert getattr(published, field.name) == pytest.approx(field.default), field.name


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    config = ServerConfig(tmp_path_factory.mktemp("secured"),
                          tokens={"tok-alice": "alice", "tok-bob": "bob", "tok-viewer": "alice"},
                          read_only={"tok-viewer"}, limits=Limits(max_queued_jobs_per_tenant=2))
    running = serve_in_background(config)
    yield running
    running.stop(grace=0)


def test_auth_rejects_missing_and_wrong_tokens_on_every_service(secured):
    for token in (None, "tok-mallory"):
        with Client(secured.address, token=token) as fv:
            for call in (fv.info, lambda: list(fv.models()), lambda: list(fv.jobs()),
                         lambda: fv.upload(b"onnx bytes"), lambda: list(fv.watch("x"))):
                with pytest.raises(FeaturevizClientError) as err:
                    call()
                assert err.value.code == "UNAUTHENTICATED" and err.value.reason == "UNAUTHENTICATED"
    with grpc.insecure_channel(secured.address) as channel:  # health stays open for probes
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tenants_see_only_their_own_models_and_jobs(secured, tiny_onnx):
    with Client(secured.address, token="tok-alice") as alice, Client(secured.address, token="tok-bob") as bob:
        assert alice.info().tenant == "alice" and alice.info().auth_required
        model = alice.upload(tiny_onnx)
        job = alice.submit(model.sha256, CHANNEL, steps=2, size=32)
        for call in (lambda: bob.model(model.sha256), lambda: list(bob.layers(model.sha256)),
                     lambda: bob.submit(model.sha256, CHANNEL), lambda: bob.job(job.id),
                     lambda: bob.cancel(job.id)):
            with pytest.raises(FeaturevizClientError) as err:
                call()
            assert err.value.code == "NOT_FOUND"
        assert list(bob.models()) == [] and list(bob.jobs()) == []
        # bob proves he has the bytes by sending them; the stored file is shared, not imported again
        sent = []
        mine = bob.upload(tiny_onnx, progress=lambda done, total: sent.append(done))
        assert sent and mine.sha256 == model.sha256 and mine.layer_count == model.layer_count
        assert alice.wait(job.id, timeout=120).state == pb.JOB_STATE_SUCCEEDED


def test_a_read_only_token_reads_its_tenant_and_changes_nothing(secured, tiny_onnx):
    with Client(secured.address, token="tok-alice") as alice, Client(secured.address, token="tok-viewer") as viewer:
        model = alice.upload(tiny_onnx)
        job = alice.wait(alice.submit(model.sha256, CHANNEL, steps=2, size=32).id, timeout=120)
        # reads: the viewer is alice's tenant
        assert viewer.info().tenant == "alice"
        assert viewer.model(model.sha256).sha256 == model.sha256
        assert [m.sha256 for m in viewer.models()] == [m.sha256 for m in alice.models()]
        assert len(list(viewer.layers(model.sha256))) == model.layer_count
        assert viewer.job(job.id).state == pb.JOB_STATE_SUCCEEDED
        assert any(e.HasField("result") for e in viewer.watch(job.id, timeout=60))
        # writes: PERMISSION_DENIED naming the RPC, on unary, client-streaming and server-streaming calls
        # (the same bytes again would be a read: the client finds them stored and sends nothing)
        writes = {"UploadModel": lambda: viewer.upload(b"bytes this tenant has not stored yet"),
                  "CreateJob": lambda: viewer.submit(model.sha256, CHANNEL, steps=2, size=32),
                  "CancelJob": lambda: viewer.cancel(job.id),
                  "DeleteModel": lambda: viewer.delete_model(model.sha256)}
        for rpc, call in writes.items():
            with pytest.raises(FeaturevizClientError) as err:
                call()
            assert err.value.code == "PERMISSION_DENIED", rpc
            assert err.value.reason == "READ_ONLY_TOKEN", rpc  # the one error map's details, from the interceptor
            assert "read-only" in err.value.message and rpc in err.value.message
        stub_call = grpc.insecure_channel(secured.address)
        try:
            stream = pb_grpc.JobServiceStub(stub_call).CreateAndWatchJob(
                pb.CreateAndWatchJobRequest(), metadata=[("authorization", "Bearer tok-viewer")], timeout=30)
            with pytest.raises(grpc.RpcError) as err:
                list(stream)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            stub_call.close()
        # nothing changed
        assert alice.model(model.sha256).sha256 == model.sha256
        assert [j.id for j in alice.jobs()].count(job.id) == 1 and len(list(alice.jobs())) == len(list(viewer.jobs()))


def test_a_retry_gets_its_job_even_when_the_queue_is_full_since(secured, tiny_onnx):
    """CreateJob looks a request id up only when the insert finds it taken or a check refuses the request: a retry
    once the tenant's queue is full (max_queued_jobs_per_tenant = 2 here) still answers with its job, a new request
    is refused, and the id with another objective is INVALID_ARGUMENT naming request_id."""
    with Client(secured.address, token="tok-bob") as bob:
        model = bob.upload(tiny_onnx)
        jobs = [bob.submit(model.sha256, CHANNEL, steps=10_000, size=32, request_id=f"full-{i}") for i in range(2)]
        try:
            with pytest.raises(FeaturevizClientError) as err:
                bob.submit(model.sha256, CHANNEL, steps=2, size=32, request_id="full-2")
            assert err.value.code == "RESOURCE_EXHAUSTED" and err.value.reason == "QUEUE_FULL"
            again = bob.submit(model.sha256, CHANNEL, steps=10_000, size=32, request_id="full-0")
            assert again.id == jobs[0].id and len(list(bob.jobs())) == 2
            with pytest.raises(FeaturevizClientError) as err:
                bob.submit(model.sha256, {"layer": {"layer": "/Relu"}}, request_id="full-1")
            assert err.value.code == "INVALID_ARGUMENT" and err.value.field_violations[0][0] == "request_id"
        finally:
            for job in jobs:
                bob.cancel(job.id)
        assert {bob.wait(job.id, timeout=120).state for job in jobs} == {pb.JOB_STATE_CANCELLED}


def test_token_table_syntax():
    from featureviz.errors import InvalidSpec
    from featureviz.server import parse_tokens

    text = "# tokens\ntok-a alice\ntok-b=bob read\ntok-c carol write  # comment\n"
    assert parse_tokens(text) == ({"tok-a": "alice", "tok-b": "bob", "tok-c": "carol"}, frozenset({"tok-b"}))
    assert parse_tokens("t1=alice,t2=bob read") == ({"t1": "alice", "t2": "bob"}, frozenset({"t2"}))
    for bad, needle in (("secret-token", "got 1 field"), ("secret-token alice admin", "scope must be read or write"),
                        ("secret-token alice read extra", "got 4 field")):
        with pytest.raises(InvalidSpec, match=needle) as err:
            parse_tokens(bad)
        assert "secret-token" not in str(err.value)  # the secret is never echoed
    with pytest.raises(InvalidSpec, match="read-only token"):
        ServerConfig("unused-store", tokens={"a": "alice"}, read_only={"b"})


def test_queue_limit_per_tenant(secured, tiny_onnx):
    with Client(secured.address, token="tok-alice") as alice:
        model = alice.upload(tiny_onnx)
        jobs = [alice.submit(model.sha256, CHANNEL, steps=5000, size=32) for _ in range(2)]
        with pytest.raises(FeaturevizClientError) as err:
            alice.submit(model.sha256, CHANNEL, steps=5000, size=32)
        assert err.value.code == "RESOURCE_EXHAUSTED" and err.value.reason == "QUEUE_FULL"
        assert err.value.retry_after and err.value.retry_after > 0
        for job in jobs:
            alice.cancel(job.id)
        assert all(alice.wait(j.id, timeout=120).state == pb.JOB_STATE_CANCELLED for j in jobs)


def test_non_loopback_without_auth_is_refused(tmp_path):
    from featureviz.errors import InvalidSpec

    with pytest.raises(InvalidSpec, match="without auth"):
        ServerConfig(tmp_path, host="0.0.0.0")
    assert ServerConfig(tmp_path, host="0.0.0.0", allow_insecure_remote=True).host == "0.0.0.0"


def test_tenants_are_served_round_robin(secured, tiny_onnx):
    with Client(secured.address, token="tok-alice") as alice, Client(secured.address, token="tok-bob") as bob:
        sha = alice.upload(tiny_onnx).sha256
        bob.upload(tiny_onnx)
        # a blocker as large as the worker's batch: alice holds the whole step, bob nothing
        blocker = alice.submit(sha, CHANNEL, steps=10_000, size=32, batch=alice.info().max_step_images)
        next(e for e in alice.watch(blocker.id, timeout=120) if e.HasField("progress"))  # alice is being served
        a1 = alice.submit(sha, CHANNEL, steps=2, size=32)
        b1 = bob.submit(sha, CHANNEL, steps=2, size=32)
        b2 = bob.submit(sha, CHANNEL, steps=2, size=32)
        alice.cancel(blocker.id)
        done = {"a1": alice.wait(a1.id, timeout=120), "b1": bob.wait(b1.id, timeout=120),
                "b2": bob.wait(b2.id, timeout=120)}
        order = sorted(done, key=lambda k: done[k].start_time.ToNanoseconds())
        # arrival order would be a1, b1, b2. Bob holds less than his share (half the step), so both his jobs are
        # granted at once and time-sliced beside the blocker (issue 21); alice's a1 waits: she holds more than hers
        assert order == ["b1", "b2", "a1"]


def test_tls_and_client_certificates(tmp_path, certs):
    config = ServerConfig(tmp_path, tls_cert=certs / "server.pem", tls_key=certs / "server.key",
                          tls_client_ca=certs / "ca.pem")
    with serve_in_background(config) as running:
        with Client(running.address, tls=certs / "ca.pem", client_cert=certs / "client.pem",
                    client_key=certs / "client.key") as fv:
            assert fv.info().api_version == "v1"
        for kwargs in ({}, {"tls": certs / "ca.pem"}):  # plaintext, or TLS without a client certificate
            # the refused handshake fails the call at once; a short deadline could expire first on a slow machine
            with Client(running.address, timeout=60, **kwargs) as fv:
                with pytest.raises(FeaturevizClientError) as err:
                    fv.info()
                assert err.value.code == "UNAVAILABLE"


def test_prometheus_metrics(tmp_path, tiny_onnx):
    import urllib.request

    with serve_in_background(ServerConfig(tmp_path, metrics_port=0)) as running, Client(running.address) as fv:
        model = fv.upload(tiny_onnx)
        fv.upload(tiny_onnx)
        with pytest.raises(FeaturevizClientError):
            fv.upload(b"not onnx")
        fv.wait(fv.submit(model.sha256, CHANNEL, steps=3, size=16).id, timeout=120)
        url = f"http://127.0.0.1:{running.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    lines = set(text.splitlines())
    assert 'featureviz_jobs_total{outcome="succeeded"} 1.0' in lines
    assert {'featureviz_uploads_total{outcome="stored"} 1.0', 'featureviz_uploads_total{outcome="rejected"} 1.0'} \
        <= lines
    assert "featureviz_step_seconds_count 3.0" in lines and "featureviz_models_loaded 1.0" in lines
    assert "featureviz_queue_depth 0.0" in lines


def test_graceful_stop_drains(tmp_path, tiny_onnx):
    import threading

    from featureviz.server.store import Store

    running = serve_in_background(ServerConfig(tmp_path, grace_seconds=5.0))
    with Client(running.address) as fv, grpc.insecure_channel(running.address) as channel:
        model = fv.upload(tiny_onnx)
        job = fv.submit(model.sha256, CHANNEL, steps=10_000, size=32)
        next(e for e in fv.watch(job.id, timeout=120) if e.HasField("progress"))
        stopper = threading.Thread(target=running.stop)
        stopper.start()
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        while health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == serving:
            pass  # the stop has begun when health says NOT_SERVING
        with pytest.raises(FeaturevizClientError) as err:
            fv.submit(model.sha256, CHANNEL, steps=2, size=16)
        assert err.value.code == "UNAVAILABLE"
        stopper.join()
    store = Store(tmp_path)
    try:  # the running job did not finish within the grace period: it waits for the next start
        assert store.get_job(job.id).state == pb.JOB_STATE_QUEUED
    finally:
        store.close()
