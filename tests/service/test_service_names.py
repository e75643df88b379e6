"""Issue 22 item 6: names with one meaning each, and the old wire names kept for existing clients.

``max_batch`` meant images per job (``Limits``) and images per device step (``ServerInfo``, ``WorkerInfo``,
``featureviz serve --max-batch``). The new names are ``Limits.max_images_per_job`` and ``max_step_images``; the old
proto fields are deprecated and still carry the same values, and ``--max-batch`` is an alias of
``--max-step-images``."""

from __future__ import annotations

import json
import signal
import urllib.request

from featureviz.cli import _subparsers
from featureviz.cli import build_parser
from featureviz.cli.serve import _config
from featureviz.client import Client
from featureviz.server import Limits
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background
from featureviz.v1 import featureviz_pb2 as pb
from support.serve import ServeProcess


def test_the_deprecated_fields_still_carry_the_values_of_their_replacements(tmp_path):
    config = ServerConfig(tmp_path, max_step_images=3, limits=Limits(max_images_per_job=5), http_port=0)
    with serve_in_background(config) as running, Client(running.address, timeout=60) as fv:
        info = fv.info()
        web_info = json.loads(urllib.request.urlopen(running.http_url + "api/info", timeout=60).read())
    assert info.limits.max_images_per_job == 5 and info.limits.max_batch == 5  # an old client reads max_batch
    assert info.max_step_images == 3 and info.max_batch == 3
    assert info.worker.max_step_images == 3 and info.worker.max_batch == 3
    assert [(w.max_step_images, w.max_batch) for w in info.workers] == [(3, 3)]
    assert web_info["limits"]["max_images_per_job"] == 5 and web_info["limits"]["max_batch"] == 5
    for message, name in ((pb.Limits, "max_batch"), (pb.ServerInfo, "max_batch"), (pb.WorkerInfo, "max_batch")):
        assert message.DESCRIPTOR.fields_by_name[name].GetOptions().deprecated, f"{message.__name__}.{name}"


def test_serve_takes_max_step_images_and_its_deprecated_alias_max_batch(tmp_path):
    parser = build_parser()
    for flag in ("--max-step-images", "--max-batch"):
        args = parser.parse_args(["serve", "--store", str(tmp_path), flag, "2"])
        assert _config(args).max_step_images == 2, flag
    alias = next(a for a in _subparsers(parser)["serve"]._actions if "--max-batch" in a.option_strings)
    assert "deprecated" in alias.help and "--max-step-images" in alias.help
    # the alias through a real `featureviz serve`: the server steps at most that many images
    server = ServeProcess(tmp_path / "store", "--max-batch", "2")
    try:
        with Client(server.address, timeout=60) as fv:
            assert fv.info().max_step_images == 2
    finally:
        assert server.stop(signal.SIGTERM) == 0
