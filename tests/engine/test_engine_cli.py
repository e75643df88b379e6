"""``featureviz render`` end to end on the real model: JSON output, PNG files, errors as one line."""

import json

import pytest

from featureviz.cli import main

MID = "/_blocks.4/_swish/Clip"


@pytest.fixture(scope="module")
def model_path(lite0):
    from featureviz import zoo

    return str(zoo.efficientnet_lite0(dynamic_size=True))  # imported once by lite0: the CLI hits the cache


def test_render_json_and_one_png_per_image(model_path, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "viz.png"
    rc = main(["render", model_path, f"{MID}:5 - 0.05*tv", "--steps", "4", "--size", "48", "--batch", "2",
               "--seed", "3", "--mean", "0.498", "--std", "0.502", "--out", str(out), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["objective_start"]) == len(report["objective_end"]) == 2
    assert all(e > s for s, e in zip(report["objective_start"], report["objective_end"]))
    assert report["seconds_per_step"] >= 0 and report["steps"] == 4 and report["size"] == [48, 48]
    assert report["objective"] == f"{MID}:5 - 0.05*tv"
    assert report["files"] == [str(tmp_path / "viz_0.png"), str(tmp_path / "viz_1.png")]
    for path in report["files"]:
        with Image.open(path) as img:
            assert img.size == (48, 48) and img.mode == "RGB"


def test_render_threads_and_layout_in_json(model_path, tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        rc = main(["render", model_path, f"{MID}:5", "--steps", "2", "--size", "32", "--threads", "1",
                   "--device", "cpu", "--out", str(tmp_path / "t.png"), "--json"])
        assert rc == 0
        report = json.loads(capsys.readouterr().out)
        assert report["threads"] == 1 and torch.get_num_threads() == 1
        assert report["device"] == "cpu" and report["memory_format"] == "channels_last"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("argv, needle", [
    (["--threads", "0"], "must be a positive integer"),
    (["--threads", "2", "--server", "127.0.0.1:1"], "--threads applies to a local render"),
])
def test_render_threads_misuse_is_a_usage_error(model_path, tmp_path, capsys, argv, needle):
    try:
        rc = main(["render", model_path, f"{MID}:5", "--out", str(tmp_path / "t.png"), *argv])
    except SystemExit as exit:
        rc = exit.code
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_render_grid_and_init_image(model_path, tmp_path, capsys):
    from PIL import Image

    init = tmp_path / "start.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(init)
    out = tmp_path / "grid.png"
    rc = main(["render", model_path, "logit:1", "--steps", "1", "--lr", "1e-6", "--size", "32", "--batch", "3",
               "--transforms", "none", "--param", "pixel", "--init", str(init), "--grid", "--out", str(out)])
    assert rc == 0
    assert "image 2: objective" in capsys.readouterr().out
    with Image.open(out) as img:
        assert img.size == (2 * 34 + 2, 2 * 34 + 2)  # 2 x 2 grid of 32 px images, 2 px gaps
        assert img.getpixel((10, 10)) == pytest.approx((200, 30, 30), abs=2)  # started from the red image


@pytest.mark.parametrize("objective, needle", [
    ("nope:1", "objective.channel.layer: unknown layer 'nope'"),
    (f"{MID}:999", "channel 999 is out of range"),
    (f"{MID}:1 *", "at column"),
])
def test_bad_objectives_end_with_one_line(model_path, capsys, objective, needle):
    assert main(["render", model_path, objective, "--steps", "1", "--size", "32"]) == 1
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_diverging_render_fails_with_one_line_naming_the_step(model_path, tmp_path, capsys):
    out = tmp_path / "nan.png"
    assert main(["render", model_path, f"{MID}:3", "--steps", "10", "--size", "32", "--lr", "1e308",
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "diverged at step" in err and "lower learning rate" in err and err.count("\n") == 1
    assert not out.exists()  # no black image written as if it had worked


@pytest.mark.parametrize("form", ["plain", "after --", "options first"])
def test_a_negated_objective_works_in_the_positional_place(model_path, tmp_path, capsys, form):
    objective = f"-'{MID}:pre':3"  # the README's form: minimise a channel through its pre-activation
    options = ["--steps", "2", "--size", "32", "--json", "--out", str(tmp_path / "neg.png")]
    argv = {"plain": ["render", model_path, objective, *options],
            "after --": ["render", model_path, "--", objective, *options],
            "options first": ["render", *options, model_path, objective]}[form]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["objective"] == objective and report["steps"] == 2 and report["size"] == [32, 32]


def test_render_schedule_and_stop_at_plateau(model_path, tmp_path, capsys):
    """--schedule/--warmup reach the render; --stop-at-plateau stops a saturating objective and says when."""
    out = tmp_path / "sat.png"
    rc = main(["render", model_path, "l1", "--steps", "2000", "--size", "16", "--param", "pixel", "--transforms",
               "none", "--lr", "0.5", "--schedule", "cosine", "--warmup", "2", "--stop-at-plateau", "0.01",
               "--plateau-window", "8", "--out", str(out), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert 16 <= report["stopped_at"] < 2000 and report["steps"] == report["stopped_at"]
    rc = main(["render", model_path, "l1", "--steps", "2000", "--size", "16", "--param", "pixel", "--transforms",
               "none", "--lr", "0.5", "--stop-at-plateau", "0.01", "--plateau-window", "8", "--out", str(out)])
    assert rc == 0 and "stopped at a plateau after step" in capsys.readouterr().out
    assert main(["render", model_path, "l1", "--steps", "4", "--size", "16", "--warmup", "5"]) == 1
    err = capsys.readouterr().err
    assert "lr_warmup" in err and "[0, 4]" in err and err.count("\n") == 1
