"""The model's memory layout: channels_last on the CPU when it is safe, NCHW otherwise (featureviz.engine.layout)."""

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from featureviz.engine import RenderSpec  # noqa: E402
from featureviz.engine import layout  # noqa: E402
from featureviz.engine import render  # noqa: E402

LAYER = "/_blocks.4/_swish_1/Clip"


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.Conv2d(8, 8, 3, stride=2, groups=8)

    def forward(self, x):
        return {"out": torch.relu(self.pool(torch.relu(self.conv(x))))}


class ViewsNCHW(ConvNet):
    """Flattens with ``.view``, which needs NCHW-contiguous strides: channels_last makes it raise."""

    def forward(self, x):
        y = self.conv(x)
        return {"out": y.view(y.shape[0], -1)}


class ReordersByStrides(ConvNet):
    """Reads raw storage order (as some hand-written converters do): runs under channels_last, but wrongly."""

    def forward(self, x):
        y = self.conv(x)
        return {"out": torch.as_strided(y, (y.numel(),), (1,))}


def _all_in(module, fmt):
    return all(p.is_contiguous(memory_format=fmt) for p in module.parameters() if p.dim() == 4)


def test_choose_follows_device_request_and_environment(monkeypatch):
    monkeypatch.delenv("FEATUREVIZ_MEMORY_FORMAT", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    conv, mlp = ConvNet(), nn.Linear(4, 4)
    assert layout.choose("auto", cpu, conv) == "channels_last"
    assert layout.choose(None, cpu, conv) == "channels_last"
    assert layout.choose("auto", cuda, conv) == "contiguous"
    assert layout.choose("channels_last", cuda, conv) == "channels_last"
    assert layout.choose("auto", cpu, mlp) == "contiguous"  # nothing 4-D to gain on
    assert layout.choose("contiguous", cpu, conv) == "contiguous"
    assert layout.choose("auto", cpu, None) == "contiguous"  # image regularizers only: no model
    monkeypatch.setenv("FEATUREVIZ_MEMORY_FORMAT", "contiguous")
    assert layout.choose("auto", cpu, conv) == "contiguous"
    assert layout.choose("channels_last", cpu, conv) == "channels_last"  # an explicit request wins
    monkeypatch.setenv("FEATUREVIZ_MEMORY_FORMAT", "nhwc")
    with pytest.raises(ValueError, match="nhwc"):
        layout.choose("auto", cpu, conv)


def test_adopt_converts_a_safe_module_and_keeps_its_values():
    torch.manual_seed(0)
    net, probe = ConvNet().eval(), torch.rand(2, 3, 17, 17)
    before = net(probe)["out"]
    assert layout.adopt(net, probe) == "channels_last"
    assert _all_in(net, torch.channels_last) and not net.conv.weight.is_contiguous()
    after = net(probe.contiguous(memory_format=torch.channels_last))["out"]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [ViewsNCHW, ReordersByStrides])
def test_adopt_puts_back_a_module_that_breaks_or_changes_under_channels_last(cls):
    torch.manual_seed(0)
    net, probe = cls().eval(), torch.rand(2, 3, 9, 9)
    before = net(probe)["out"]
    assert layout.adopt(net, probe) == "contiguous"
    assert _all_in(net, torch.contiguous_format)
    torch.testing.assert_close(net(probe)["out"], before)


def test_adopt_checks_again_when_the_shared_weights_are_already_nhwc():
    # two truncations of one model share their weights: the first converts them, the second has an unsafe op
    torch.manual_seed(0)
    safe, probe = ConvNet().eval(), torch.rand(2, 3, 9, 9)
    assert layout.adopt(safe, probe) == "channels_last"
    unsafe = ViewsNCHW().eval()
    unsafe.conv = safe.conv
    assert layout.adopt(unsafe, probe) == "contiguous"
    assert unsafe(probe)["out"].shape == (2, 8 * 9 * 9)


def test_prepare_contiguous_undoes_an_earlier_conversion_of_shared_weights(monkeypatch):
    monkeypatch.delenv("FEATUREVIZ_MEMORY_FORMAT", raising=False)
    net, probe = ConvNet().eval(), torch.rand(2, 3, 9, 9)
    cpu = torch.device("cpu")
    assert layout.prepare(net, "auto", cpu, lambda: probe) == "channels_last"
    assert _all_in(net, torch.channels_last) and not net.conv.weight.is_contiguous()
    assert layout.prepare(net, "contiguous", cpu, lambda: 1 / 0) == "contiguous"  # no probe needed
    assert _all_in(net, torch.contiguous_format)
    assert layout.prepare(None, "auto", cpu, lambda: 1 / 0) == "contiguous"


def test_render_runs_the_real_model_channels_last_on_cpu_with_the_same_step(lite0, monkeypatch, first_step,
                                                                           close_in_norm):
    # the same first step (forward with its random transforms, and the gradient) in both layouts; later steps are
    # not compared: Adam makes rounding-level differences grow into different images (see tests/conftest.py)
    monkeypatch.delenv("FEATUREVIZ_MEMORY_FORMAT", raising=False)
    objective = {"channel": {"layer": LAYER, "channel": 3}}
    steps = {fmt: first_step(lite0, RenderSpec(objective=objective, size=48, batch=2, seed=1, device="cpu",
                                               memory_format=fmt))
             for fmt in ("auto", "contiguous")}
    (values_nhwc, grads_nhwc), (values_nchw, grads_nchw) = steps["auto"], steps["contiguous"]
    torch.testing.assert_close(values_nhwc, values_nchw, rtol=1e-4, atol=1e-6)
    close_in_norm(grads_nhwc, grads_nchw, rtol=1e-3)
    results = {fmt: render(lite0, RenderSpec(objective=objective, steps=2, size=48, seed=1, device="cpu",
                                             memory_format=fmt)) for fmt in ("auto", "contiguous")}
    assert results["auto"].memory_format == "channels_last" and results["contiguous"].memory_format == "contiguous"
    a, b = results["auto"], results["contiguous"]
    assert a.objective_start == pytest.approx(b.objective_start, rel=1e-4, abs=1e-5)  # the same forward


def test_render_refuses_an_unknown_memory_format(lite0):
    from featureviz.errors import InvalidSpec

    with pytest.raises(InvalidSpec, match="memory_format"):
        render(lite0, RenderSpec(objective={"channel": {"layer": LAYER, "channel": 0}}, steps=1, size=32,
                                 memory_format="nhwc"))
