"""Quality figures: image statistics, class targets, the judge (rank and probability of the target class), the
small quality harness (2 classes, few steps, real judges) and the CLI's --judge and ``featureviz evaluate``."""

import json
import math

import pytest
import torch

from featureviz.engine.quality import class_targets
from featureviz.engine.quality import image_statistics
from featureviz.engine.quality import judge_images
from featureviz.engine.quality import summarize_scores
from featureviz.errors import InvalidSpec

LITE_PREPROCESS = ["--mean", "0.498", "--std", "0.502"]


# ----------------------------------------------------------------------------------------------- statistics


def _power_law_image(slope: float, size: int = 128, seed: int = 0) -> torch.Tensor:
    """Grey image whose radially averaged power spectrum falls as |f| ** slope (random phases)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.sqrt(torch.fft.fftfreq(size)[:, None] ** 2 + torch.fft.fftfreq(size)[None, :] ** 2)
    amplitude = f.clamp_min(1.0 / size) ** (slope / 2)
    phase = torch.rand(size, size, generator=g) * 2 * math.pi
    grey = torch.fft.ifft2(amplitude * torch.exp(1j * phase)).real
    grey = 0.5 + 0.15 * (grey - grey.mean()) / grey.std()
    return grey.clamp(0, 1).expand(1, 3, size, size)


@pytest.mark.parametrize("slope", [-3.0, -2.0, -1.0, 0.0])
def test_the_spectrum_slope_reads_back_the_slope_of_a_power_law(slope):
    measured = [image_statistics(_power_law_image(slope, seed=s))["spectrum_slope"][0] for s in range(3)]
    assert sum(measured) / 3 == pytest.approx(slope, abs=0.25)


def test_statistics_of_plain_images():
    grey = torch.full((1, 3, 32, 32), 0.5)
    red = torch.zeros(1, 3, 32, 32)
    red[:, 0] = 0.8
    stats = image_statistics(torch.cat([grey, red]))
    assert stats["mean"] == pytest.approx([0.5, 0.8 / 3], abs=1e-6)
    assert stats["contrast"] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert stats["saturation"] == pytest.approx([0.0, 1.0], abs=1e-6)
    noise = torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    flat = image_statistics(noise)
    # white noise: a flat spectrum, and |f| > 1/4 is 1 - pi/16 = 80% of the 2-D frequency square's area
    assert abs(sum(flat["spectrum_slope"]) / 4) < 0.3
    assert all(0.7 < h < 0.9 for h in flat["high_freq"])
    smooth = image_statistics(_power_law_image(-3.0))
    assert smooth["high_freq"][0] < 0.05


# ----------------------------------------------------------------------------------------------- class targets


def test_class_targets_follow_the_objective():
    assert class_targets({"logit": {"index": 3}}, 2) == [3, 3]
    assert class_targets({"prob": {"index": 7}}, 1) == [7]
    per_image = {"sum": [{"batch": {"index": 0, "objective": {"logit": {"index": 5}}}},
                         {"batch": {"index": 1, "objective": {"logit": {"index": 9}}}},
                         {"scale": {"factor": -0.05, "objective": {"tv": {}}}}]}
    assert class_targets(per_image, 3) == [5, 9, None]
    # lowering a class is no target; two raised classes are none either
    assert class_targets({"scale": {"factor": -1, "objective": {"logit": {"index": 2}}}}, 1) == [None]
    assert class_targets({"sum": [{"logit": {"index": 1}}, {"logit": {"index": 2}}]}, 1) == [None]
    assert class_targets({"sum": [{"logit": {"index": 1}}, {"scale": {"factor": -0.5, "objective":
                                                                      {"logit": {"index": 2}}}}]}, 1) == [1]
    # interpolation: the ends aim at one class each, the middle at both
    assert class_targets({"interpolate": {"a": {"logit": {"index": 1}}, "b": {"logit": {"index": 2}}}}, 3) == \
        [1, None, 2]
    assert class_targets({"channel": {"layer": "x", "channel": 1}}, 2) == [None, None]


# ----------------------------------------------------------------------------------------------- the judge


@pytest.fixture(scope="module")
def lite1():
    """EfficientNet-Lite1 (ImageNet, trained apart from Lite0; 240 x 240): a judge of Lite0's class images."""
    from featureviz import zoo
    from featureviz.importer import Preprocess
    from featureviz.importer import import_model

    try:
        path = zoo.efficientnet_lite(1)
    except Exception as exc:  # the demo extra is not installed
        pytest.skip(f"EfficientNet-Lite1 unavailable: {exc}")
    return import_model(path, preprocess=Preprocess(**zoo.EFFICIENTNET_LITE0_PREPROCESS))


def test_judge_reports_rank_and_probability_of_a_plain_forward(lite1):
    images = torch.rand(3, 3, 96, 80, generator=torch.Generator().manual_seed(0))
    scores = judge_images(lite1, images, [7, 400, None])
    # the same numbers from a plain forward: resize, preprocess, softmax
    x = torch.nn.functional.interpolate(images, size=(240, 240), mode="bilinear", antialias=True)
    with torch.no_grad():
        mean = torch.tensor(lite1.input_spec.preprocess.mean).view(1, 3, 1, 1)
        std = torch.tensor(lite1.input_spec.preprocess.std).view(1, 3, 1, 1)
        probs = lite1.module((x - mean) / std).softmax(-1)
    for i, target in enumerate([7, 400]):
        s = scores[i]
        assert s.target == target and s.probability == pytest.approx(float(probs[i, target]), rel=1e-4, abs=1e-7)
        assert s.rank == int((probs[i] > probs[i, target]).sum()) + 1
        assert [k for k, _ in s.top] == probs[i].topk(5).indices.tolist()
    assert scores[2].target is None and scores[2].rank is None and len(scores[2].top) == 5
    summary = summarize_scores(scores)
    assert summary["images"] == 2 and summary["top5"] == sum(s.rank <= 5 for s in scores[:2])


def test_judge_refuses_a_class_it_does_not_have(lite1):
    with pytest.raises(InvalidSpec, match="1000 classes"):
        judge_images(lite1, torch.rand(1, 3, 16, 16), [1000])


def test_the_small_quality_harness(lite0, lite1):
    """2 classes, 1 seed, 24 steps at 64 px on Lite0, judged by Lite1 and by Lite0 itself. The signal check: each
    image carries its own class more than the other image does, in the eyes of the model it was rendered on (a
    24-step render raises its class logit by far more than anything else moves). Lite1's ranks are only checked
    for range: they are what the benchmark measures, not a property of the mechanics."""
    from featureviz.engine.quality import evaluate_classes

    classes = [1, 281]
    report = evaluate_classes(lite0, {"self": lite0, "lite1": lite1}, classes, [0], steps=24, size=64, batch=2,
                              device="cpu")
    images = report["images"]
    assert images.shape == (2, 3, 64, 64)
    assert [(r["class"], r["seed"]) for r in report["records"]] == [(1, 0), (281, 0)]
    for record in report["records"]:
        for name in ("self", "lite1"):
            verdict = record["judges"][name]
            assert verdict["target"] == record["class"] and 1 <= verdict["rank"] <= 1000
            assert 0.0 <= verdict["probability"] <= 1.0 and len(verdict["top"]) == 5
        assert set(record["statistics"]) == {"mean", "contrast", "saturation", "spectrum_slope", "high_freq"}
        assert record["activation"] > 0
    for k in classes:  # p(class k | image rendered for k) > p(class k | the other image)
        own, other = (s.probability for s in judge_images(lite0, images, [k, k]))
        if k == classes[1]:
            own, other = other, own
        assert own > other
    summary = report["summary"]
    assert summary["judges"]["lite1"]["images"] == 2 and summary["activation"] > 0


# ----------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def paths(lite0, lite1):
    from featureviz import zoo

    return str(zoo.efficientnet_lite0(dynamic_size=True)), str(zoo.efficientnet_lite(1))


def test_render_with_a_judge(paths, tmp_path, capsys):
    from featureviz.cli import main

    model, judge = paths
    rc = main(["render", model, "logit:281", "--steps", "2", "--size", "48", "--batch", "2", *LITE_PREPROCESS,
               "--judge", judge, "--judge-mean", "0.498", "--judge-std", "0.502", "--out", str(tmp_path / "j.png"),
               "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert [v["target"] for v in report["judge"]] == [281, 281]
    assert all(1 <= v["rank"] <= 1000 and 0 <= v["probability"] <= 1 and len(v["top"]) == 5
               for v in report["judge"])
    rc = main(["render", model, "logit:281", "--steps", "1", "--size", "32", *LITE_PREPROCESS, "--judge", judge,
               "--out", str(tmp_path / "k.png")])
    assert rc == 0
    assert "judge: class 281 rank " in capsys.readouterr().out


def test_evaluate_command(paths, tmp_path, capsys):
    from featureviz.cli import main

    model, judge = paths
    rc = main(["evaluate", model, "--classes", "1,281", "--seeds", "0", "--steps", "2", "--size", "32",
               *LITE_PREPROCESS, "--judge", judge, "--judge-mean", "0.498", "--judge-std", "0.502",
               "--out", str(tmp_path / "imgs"), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    name = "efficientnet_lite1_opset17"
    assert [r["class"] for r in report["records"]] == [1, 281]
    assert report["summary"]["judges"][name]["images"] == 2
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["class1_seed0.png", "class281_seed0.png"]
    rc = main(["evaluate", model, "--classes", "1", "--steps", "1", "--size", "32", *LITE_PREPROCESS,
               "--judge", judge])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"{name}: top-1 " in out and "spectrum_slope" in out
    # the other stack renders other images from the same seed, and the report says which stack it was
    rc = main(["evaluate", model, "--classes", "1,281", "--seeds", "0", "--steps", "2", "--size", "32",
               *LITE_PREPROCESS, "--judge", judge, "--judge-mean", "0.498", "--judge-std", "0.502",
               "--transforms", "composed", "--out", str(tmp_path / "composed"), "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["transforms"] == "composed" and report["transforms"] == "standard"
    png = "class1_seed0.png"
    assert (tmp_path / "composed" / png).read_bytes() != (tmp_path / "imgs" / png).read_bytes()


def test_a_missing_judge_file_ends_with_one_line(paths, tmp_path, capsys):
    from featureviz.cli import main

    model, _ = paths
    assert main(["evaluate", model, "--classes", "1", "--steps", "1", "--size", "32", "--judge",
                 str(tmp_path / "missing.onnx")]) == 1
    assert "missing.onnx" in capsys.readouterr().err
