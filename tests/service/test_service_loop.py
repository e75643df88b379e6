"""The server's event loop (``featureviz.server.loop``): uvloop's where it is installed (the server extra), asyncio's
on request (``FEATUREVIZ_EVENT_LOOP=asyncio``), and a clear refusal of an unknown value.

A real ``featureviz serve`` on asyncio's loop runs a job of the real tiny model (the rest of the suite's servers run
on the default loop: BackgroundServer takes the same choice); its startup line names its loop; an unknown value
stops ``featureviz serve`` before it listens, with one line naming the variable.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os

import pytest

from featureviz.client import Client
from featureviz.client import pb
from featureviz.errors import InvalidSpec
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background
from featureviz.server.loop import EVENT_LOOP_ENV
from featureviz.server.loop import loop_name
from featureviz.server.loop import new_event_loop
from featureviz.server.loop import run
from support.serve import ServeProcess
from support.serve import serve_failure

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None
DEFAULT = "uvloop" if HAS_UVLOOP else "asyncio"


@pytest.mark.parametrize("value, expected", [(None, DEFAULT), ("auto", DEFAULT), ("", DEFAULT),
                                             (" AsyncIO ", "asyncio"), ("uvloop", "uvloop")])
def test_the_loop_is_the_one_the_variable_names(monkeypatch, value, expected):
    if value == "uvloop" and not HAS_UVLOOP:
        pytest.skip("uvloop is not installed")
    if value is None:
        monkeypatch.delenv(EVENT_LOOP_ENV, raising=False)
    else:
        monkeypatch.setenv(EVENT_LOOP_ENV, value)
    loop = new_event_loop()
    try:
        assert loop_name(loop) == expected
        assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
    finally:
        loop.close()

    async def main():
        return loop_name(asyncio.get_running_loop())

    assert run(main()) == expected


def test_an_unknown_or_missing_loop_is_refused_with_the_variable_named(monkeypatch):
    monkeypatch.setenv(EVENT_LOOP_ENV, "tokio" * 20)
    with pytest.raises(InvalidSpec) as err:
        new_event_loop()
    assert err.value.field == EVENT_LOOP_ENV and "auto, uvloop, asyncio" in str(err.value)
    assert "tokio" * 8 + "'" in str(err.value)  # the value echoed, capped at 40 characters
    if not HAS_UVLOOP:
        monkeypatch.setenv(EVENT_LOOP_ENV, "uvloop")
        with pytest.raises(InvalidSpec, match="not installed"):
            new_event_loop()


def test_a_background_server_runs_on_the_default_loop(tmp_path, monkeypatch):
    monkeypatch.delenv(EVENT_LOOP_ENV, raising=False)
    with serve_in_background(ServerConfig(str(tmp_path / "store"), port=0)) as server:
        assert loop_name(server._loop) == DEFAULT


def test_serve_on_asyncio_s_loop_runs_a_job_and_says_which_loop(tmp_path, tiny_onnx):
    env = {**os.environ, EVENT_LOOP_ENV: "asyncio"}
    with ServeProcess(tmp_path / "store", "--max-step-images", "2", "--threads", "1", env=env) as server:
        assert any("listening on" in line and "event loop asyncio)" in line for line in server.lines), server.lines
        with Client(server.address, timeout=120) as fv:
            sha = fv.upload(tiny_onnx, name="tiny.onnx").sha256
            job = fv.run(sha, {"channel": {"layer": "/Relu_1", "channel": 3}}, steps=3, size=32, timeout=240)
        assert job.state == pb.JOB_STATE_SUCCEEDED and job.result.images[0].png.startswith(b"\x89PNG")
        assert server.stop() == 0


def test_serve_refuses_an_unknown_loop_before_it_listens(tmp_path):
    code, text = serve_failure(tmp_path / "store", env={**os.environ, EVENT_LOOP_ENV: "twisted"})
    assert code != 0 and "listening on" not in text and "Traceback" not in text, text
    assert f"{EVENT_LOOP_ENV}: must be one of auto, uvloop, asyncio, got 'twisted'" in text, text
