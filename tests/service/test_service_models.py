"""ModelService against a real server: chunked, resumable and deduplicated uploads, every way an upload can
be wrong (nothing is left behind), the paged layer catalog, get/list/delete."""

from __future__ import annotations

import hashlib
import time

import grpc
import onnx
import pytest

from featureviz.client import Client
from featureviz.client import FeaturevizClientError
from featureviz.client import pb

CHUNK = 1024


def _store(server):
    return server.config.store_dir


def _leftovers(server, sha: str) -> list[str]:
    """Files an upload of ``sha`` left in the store."""
    store = _store(server)
    return [str(p) for p in (store / "uploads").iterdir()] + [str(p) for p in (store / "models").rglob(f"{sha}*")]


def _raw_upload(fv: Client, messages):
    return fv._models.UploadModel(iter(messages))


def _header(data: bytes, **overrides) -> pb.UploadModelRequest:
    fields = {"sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data), "display_name": "x.onnx"}
    fields.update(overrides)
    return pb.UploadModelRequest(header=pb.UploadHeader(**fields))


def _chunks(data: bytes, start: int = 0, size: int = CHUNK, finish: bool = True):
    return [pb.UploadModelRequest(chunk=pb.UploadChunk(write_offset=i, data=data[i: i + size],
                                                       finish_write=finish and i + size >= len(data)))
            for i in range(start, len(data), size)]


def test_chunked_upload_then_catalog(client, tiny_onnx_other, server):
    sent = []
    model = client.upload(tiny_onnx_other, name="tiny-other.onnx", chunk_size=CHUNK,
                          progress=lambda done, total: sent.append(done))
    sha = hashlib.sha256(tiny_onnx_other).hexdigest()
    assert len(sent) == -(-len(tiny_onnx_other) // CHUNK) > 3  # really chunked
    assert model.name == f"models/{sha}" and model.state == pb.MODEL_STATE_READY and not model.deduplicated
    assert model.size_bytes == len(tiny_onnx_other) and model.display_name == "tiny-other.onnx"
    assert model.check.passed and model.check.max_rel_err < 1e-3
    assert model.logits_layer and model.layer_count == len(list(client.layers(sha)))
    stored = _store(server) / "models" / sha[:2] / f"{sha}.onnx"
    assert stored.read_bytes() == tiny_onnx_other
    assert client.model(sha) == client.model(f"models/{sha}")
    assert sha in [m.sha256 for m in client.models()]


def test_duplicate_upload_is_deduplicated_without_resending(client, tiny_model, tiny_onnx):
    sent = []
    again = client.upload(tiny_onnx, progress=lambda done, total: sent.append(done))
    assert again.deduplicated and again.sha256 == tiny_model.sha256 and sent == []
    # a client that streams anyway gets the stored model back
    reply = _raw_upload(client, [_header(tiny_onnx), *_chunks(tiny_onnx)])
    assert reply.deduplicated and reply.sha256 == tiny_model.sha256


def _expect(call, code: str, reason: str | None = None, field: str | None = None) -> FeaturevizClientError:
    from featureviz.client import from_rpc_error

    try:
        call()
    except grpc.RpcError as err:
        error = from_rpc_error(err)
    except FeaturevizClientError as err:
        error = err
    else:
        raise AssertionError(f"expected {code}")
    assert error.code == code, error
    if reason is not None:
        assert error.reason == reason, error
    if field is not None:
        assert [f for f, _ in error.field_violations] == [field], error
    return error


def test_digest_mismatch_is_rejected_and_leaves_nothing(client, server, tiny_onnx):
    data = tiny_onnx[:-1] + bytes([tiny_onnx[-1] ^ 1])
    wrong = hashlib.sha256(tiny_onnx + b"x").hexdigest()
    error = _expect(lambda: _raw_upload(client, [_header(data, sha256=wrong), *_chunks(data)]),
                    "INVALID_ARGUMENT", "DIGEST_MISMATCH", "header.sha256")
    assert hashlib.sha256(data).hexdigest() in error.message
    assert _leftovers(server, wrong) == []


@pytest.mark.parametrize("declared_delta", [-100, +100])
def test_size_mismatch_is_rejected_and_leaves_nothing(client, server, tiny_onnx, declared_delta):
    data = tiny_onnx + b"\0" * 7  # other bytes than any stored model
    sha = hashlib.sha256(data).hexdigest()
    _expect(lambda: _raw_upload(client, [_header(data, size_bytes=len(data) + declared_delta), *_chunks(data)]),
            "INVALID_ARGUMENT", "SIZE_MISMATCH", "header.size_bytes")
    assert _leftovers(server, sha) == []


def test_corrupt_onnx_is_rejected_and_leaves_nothing(client, server):
    data = b"this is not an onnx file" * 100
    sha = hashlib.sha256(data).hexdigest()
    error = _expect(lambda: client.upload(data, chunk_size=CHUNK), "INVALID_ARGUMENT")
    assert error.reason in ("NOT_ONNX", "INVALID_MODEL") and error.message
    assert _leftovers(server, sha) == []
    _expect(lambda: client.model(sha), "NOT_FOUND", "MODEL_NOT_FOUND")


def test_external_data_reference_is_rejected(client, server, tiny_onnx, tmp_path):
    model = onnx.load_from_string(tiny_onnx)
    onnx.save_model(model, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    external = onnx.load(tmp_path / "ext.onnx", load_external_data=False)
    for tensor in external.graph.initializer:  # point outside any upload (path traversal, onnx/onnx#3991)
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../../etc/passwd"
    data = external.SerializeToString()
    error = _expect(lambda: client.upload(data), "INVALID_ARGUMENT", "EXTERNAL_DATA")
    assert "external" in error.message.lower()
    assert _leftovers(server, hashlib.sha256(data).hexdigest()) == []


def test_header_must_come_first_and_be_sane(client, tiny_onnx):
    _expect(lambda: _raw_upload(client, _chunks(tiny_onnx)), "INVALID_ARGUMENT", field="header")
    _expect(lambda: _raw_upload(client, [_header(tiny_onnx, sha256="abc")]), "INVALID_ARGUMENT",
            field="header.sha256")
    _expect(lambda: _raw_upload(client, [_header(tiny_onnx, size_bytes=0)]), "INVALID_ARGUMENT",
            field="header.size_bytes")


def test_broken_upload_resumes_from_what_the_server_holds(client, server, tiny_onnx):
    model = onnx.load_from_string(tiny_onnx)
    model.doc_string = "resumed upload"
    data = model.SerializeToString()
    sha = hashlib.sha256(data).hexdigest()

    def breaking():
        yield _header(data)
        yield from _chunks(data)[:2]  # no finish_write
        # wait until the server has written them: a condition polled, no clock (pytest-timeout ends a hang)
        while client.upload_status(sha, len(data)).committed_bytes < 2 * CHUNK:
            time.sleep(0.05)
        raise ConnectionError("network gone")

    with pytest.raises(grpc.RpcError):
        client._models.UploadModel(breaking())
    assert client.upload_status(sha, len(data)).committed_bytes == 2 * CHUNK
    # a stream that ends cleanly but without finish_write is resumable too
    _expect(lambda: _raw_upload(client, [_header(data), *_chunks(data, finish=False)[2:3]]),
            "FAILED_PRECONDITION", "UPLOAD_INCOMPLETE")
    assert client.upload_status(sha, len(data)).committed_bytes == 3 * CHUNK

    # an offset the server does not hold is refused with the offset to resume from
    _expect(lambda: _raw_upload(client, [_header(data), *_chunks(data, start=4 * CHUNK)]),
            "FAILED_PRECONDITION", "WRITE_OFFSET_MISMATCH")

    sent = []
    resumed = client.upload(data, chunk_size=CHUNK, progress=lambda done, total: sent.append(done))
    assert sent[0] == 4 * CHUNK  # the first three chunks were not sent again
    assert resumed.sha256 == sha and resumed.state == pb.MODEL_STATE_READY
    assert list((_store(server) / "uploads").iterdir()) == []


def test_layer_catalog_pages(client, tiny_model):
    sha = tiny_model.sha256
    everything = list(client.layers(sha))
    assert [layer.depth for layer in everything] == sorted(layer.depth for layer in everything)
    first = client._call(client._models.ListLayers, pb.ListLayersRequest(model=sha, page_size=2))
    assert len(first.layers) == 2 and first.total_size == len(everything) and first.next_page_token
    paged = list(client.layers(sha, page_size=2))
    assert [layer.name for layer in paged] == [layer.name for layer in everything]
    spatial = list(client.layers(sha, spatial_only=True, page_size=1))
    assert spatial and all(layer.spatial and len(layer.shape) == 4 and layer.layout == "NCHW" for layer in spatial)
    assert {layer.layout for layer in everything if len(layer.shape) == 2} <= {"NC"}
    assert len(spatial) < len(everything)
    convs = list(client.layers(sha, filter="conv"))
    assert convs and all("conv" in (layer.name + layer.op_type).lower() for layer in convs)
    # a token is bound to its query
    _expect(lambda: client._call(client._models.ListLayers, pb.ListLayersRequest(
        model=sha, page_size=2, page_token=first.next_page_token, filter="conv")), "INVALID_ARGUMENT",
        field="page_token")
    _expect(lambda: list(client.layers("0" * 64)), "NOT_FOUND")


def test_delete_model(client, server, tiny_onnx):
    model = onnx.load_from_string(tiny_onnx)
    model.doc_string = "to delete"
    data = model.SerializeToString()
    uploaded = client.upload(data)
    path = _store(server) / "models" / uploaded.sha256[:2] / f"{uploaded.sha256}.onnx"
    assert path.exists()
    client.delete_model(uploaded.name)
    assert not path.exists()
    _expect(lambda: client.model(uploaded.sha256), "NOT_FOUND")
    _expect(lambda: client.delete_model(uploaded.sha256), "NOT_FOUND")


def test_async_client_resumes_and_pages_as_the_sync_one(client, server, tiny_onnx):
    """AsyncClient shares the upload (featureviz.client.upload.Upload) and the paging with Client."""
    import asyncio

    from featureviz.client import AsyncClient

    model = onnx.load_from_string(tiny_onnx)
    model.doc_string = "async resumed upload"
    data = model.SerializeToString()
    sha = hashlib.sha256(data).hexdigest()
    _expect(lambda: _raw_upload(client, [_header(data), *_chunks(data, finish=False)[:2]]),
            "FAILED_PRECONDITION", "UPLOAD_INCOMPLETE")
    assert client.upload_status(sha, len(data)).committed_bytes == 2 * CHUNK

    async def scenario():
        async with AsyncClient(server.address) as fv:
            sent = []
            uploaded = await fv.upload(data, chunk_size=CHUNK, progress=lambda done, total: sent.append(done))
            layers = [layer.name async for layer in fv.layers(sha, page_size=2)]
            models = [m.sha256 async for m in fv.models(page_size=1)]
            again = await fv.upload(data)
            return sent, uploaded, layers, models, again

    sent, uploaded, layers, models, again = asyncio.run(scenario())
    assert sent[0] == 3 * CHUNK  # the first two chunks were not sent again
    assert uploaded.sha256 == sha and uploaded.state == pb.MODEL_STATE_READY and not uploaded.deduplicated
    assert layers == [layer.name for layer in client.layers(sha)]
    assert models == [m.sha256 for m in client.models()] and sha in models
    assert again.deduplicated
    client.delete_model(sha)
