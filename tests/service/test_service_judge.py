"""A job with a judge: another uploaded classifier scores each class image (rank of the target, its probability)."""

from __future__ import annotations

import pytest

from featureviz.client import pb
from featureviz.codec import judge_score_from_proto
from featureviz.client import FeaturevizClientError


def five_classes_onnx() -> bytes:
    """A classifier with 5 classes (a judge that lacks most classes)."""
    torch = pytest.importorskip("torch")
    from support.models import TinyNet
    from support.models import export_onnx

    torch.manual_seed(0)
    return export_onnx(TinyNet(classes=5))


@pytest.fixture(scope="module")
def judge_model(server, tiny_onnx_other):
    from featureviz.client import Client

    with Client(server.address) as fv:
        return fv.upload(tiny_onnx_other, name="judge.onnx")


def test_each_class_image_gets_the_judges_rank_and_probability(client, tiny_model, judge_model):
    objective = {"sum": [{"batch": {"index": 0, "objective": {"logit": {"index": 3}}}},
                         {"batch": {"index": 1, "objective": {"logit": {"index": 7}}}}]}
    job = client.submit(tiny_model.sha256, objective, steps=3, size=32, batch=2,
                        judge={"model": judge_model.sha256, "preprocess": {"mean": [0.5], "std": [0.25]}})
    assert job.spec.judge.model == judge_model.sha256
    done = client.wait(job.id, timeout=120)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    images = sorted(done.result.images, key=lambda image: image.index)
    for image, target in zip(images, [3, 7]):
        verdict = judge_score_from_proto(image.judge)
        assert verdict["target"] == target and 1 <= verdict["rank"] <= 10
        assert 0.0 <= verdict["probability"] <= 1.0
        top = [k for k, _ in verdict["top"]]
        assert len(top) == 5 and len(set(top)) == 5
        probs = [p for _, p in verdict["top"]]
        assert probs == sorted(probs, reverse=True)
        if verdict["rank"] <= 5:
            assert top[verdict["rank"] - 1] == target
        else:
            assert verdict["probability"] <= probs[-1]
    # a job without a judge has none
    plain = client.wait(client.submit(tiny_model.sha256, {"logit": {"index": 3}}, steps=1, size=32).id, timeout=120)
    assert not plain.result.images[0].HasField("judge")


def test_a_judge_the_tenant_does_not_have_is_not_found(client, tiny_model):
    with pytest.raises(FeaturevizClientError) as err:
        client.submit(tiny_model.sha256, {"logit": {"index": 3}}, steps=1, judge="0" * 64)
    assert err.value.code == "NOT_FOUND"


def test_a_judge_without_the_target_class_is_refused_before_any_compute(client, tiny_model):
    small = client.upload(five_classes_onnx(), name="five.onnx")
    with pytest.raises(FeaturevizClientError) as err:
        client.submit(tiny_model.sha256, {"logit": {"index": 7}}, steps=1, judge=small.sha256)
    assert err.value.code == "INVALID_ARGUMENT"
    assert "spec.judge" in str(err.value) and "5 classes" in str(err.value)
    with pytest.raises(FeaturevizClientError) as err:
        client.submit(tiny_model.sha256, {"logit": {"index": 3}}, steps=1, judge="not a sha")
    assert err.value.code == "INVALID_ARGUMENT" and "spec.judge.model" in str(err.value)
