"""The explorer's HTTP side without a browser: a real server with its explorer on loopback, called with urllib.

Auth is the gRPC API's (tokens, tenants, read-only tokens, the same refusal of a non-loopback address without
tokens); errors keep their gRPC code; job events stream as server-sent events that re-attach by seq; every job
reproduces through the `featureviz render` command the explorer shows; `featureviz serve --http-port` serves it.
"""

from __future__ import annotations

import json
import shlex
import signal
import ssl
import threading
import urllib.error
import urllib.request

import pytest
from support.serve import ServeProcess
from web_support import Http
from web_support import upload_path

from featureviz.cli import build_parser
from featureviz.cli import main
from featureviz.client import Client
from featureviz.errors import InvalidSpec
from featureviz.server import Limits
from featureviz.server import ServerConfig
from featureviz.server import serve_in_background
from featureviz.spec import parse_objective
from featureviz.web.payloads import image_labels
from featureviz.web.payloads import objective_summary
from featureviz.web.payloads import objective_text


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    config = ServerConfig(tmp_path_factory.mktemp("store"), tokens={"s3cret": "alice", "look": "alice",
                                                                     "other": "bob"},
                          read_only={"look"}, http_port=0, limits=Limits(max_upload_bytes=100_000))
    running = serve_in_background(config)
    yield running
    running.stop()


def _sse(base: str, path: str, headers: dict | None = None) -> list[tuple[str | None, str, dict]]:
    """Read a whole event stream (it ends after the result event) -> [(id, event, data)]."""
    request = urllib.request.Request(base + path, headers=headers or {})
    events, fields = [], {}
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for raw in response:
            line = raw.decode().rstrip("\n")
            if not line:
                if "event" in fields:
                    events.append((fields.get("id"), fields["event"], json.loads(fields["data"])))
                fields = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                fields[key] = value
    return events


# ---------------------------------------------------------------------------------------------------- auth


def test_login_refuses_a_wrong_token_and_sets_an_http_only_cookie_for_a_right_one(token_server):
    http = Http(token_server.http_url)
    status, body = http.json("GET", "api/models")
    assert status == 401 and body["error"]["code"] == "UNAUTHENTICATED"
    status, headers, raw = http.call("POST", "api/login", {"token": "wrong"})
    assert status == 401 and "Set-Cookie" not in headers
    assert json.loads(raw)["error"]["message"] == "the server refused this token; check it and try again"
    status, headers, raw = http.call("POST", "api/login", {"token": "s3cret"})
    assert status == 200 and json.loads(raw)["tenant"] == "alice"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    status, body = http.json("GET", "api/models", headers={"Cookie": cookie.split(";")[0]})
    assert status == 200 and body == {"models": []}


def test_tenants_and_read_only_tokens_are_the_grpc_apis(token_server, net_onnx):
    alice, reader, bob = (Http(token_server.http_url, token) for token in ("s3cret", "look", "other"))
    status, model = alice.json("POST", upload_path(net_onnx, "net.onnx"), net_onnx)
    assert status == 200 and model["name"] == "net.onnx"
    sha = model["sha256"]
    assert reader.json("GET", f"api/models/{sha}/layers")[0] == 200  # a read-only token browses
    status, body = reader.json("POST", "api/jobs", {"model": sha, "objective": "/conv1/Conv:0", "steps": 1})
    assert status == 403 and body["error"]["code"] == "PERMISSION_DENIED" and "read-only" in body["error"]["message"]
    status, body = reader.json("DELETE", f"api/models/{sha}")
    assert status == 403
    status, body = bob.json("GET", f"api/models/{sha}")  # another tenant does not see alice's model
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    status, body = alice.json("POST", "api/jobs", {"model": sha, "objective": "/conv1/Conv:0", "steps": 2,
                                                   "size": 16})
    assert status == 200
    assert bob.json("GET", f"api/jobs/{body['id']}")[0] == 404
    status, body = Http(token_server.http_url).json("POST", upload_path(net_onnx, "x.onnx"), net_onnx)
    assert status == 401  # refused before any byte of the body is stored


def test_upload_over_the_servers_limit_is_refused_with_413(token_server):
    big = b"\0" * 100_001
    status, body = Http(token_server.http_url, "s3cret").json("POST", upload_path(big, "big.onnx"), big)
    assert status == 413 and "at most 100000 bytes (max_upload_bytes)" in body["error"]["message"]


def test_state_changing_requests_need_the_explorers_header(http, model):
    status, body = http.json("DELETE", f"api/models/{model.sha256}", headers={"X-Featureviz": ""})
    assert status == 403 and "X-Featureviz: 1" in body["error"]["message"]
    assert http.json("GET", f"api/models/{model.sha256}")[0] == 200  # still there


def test_a_loopback_explorer_answers_only_to_loopback_host_names(http, web_server):
    status, body = http.json("GET", "api/models", headers={"Host": f"rebound.example:{web_server.http_port}"})
    assert status == 403 and "loopback" in body["error"]["message"]
    assert http.json("GET", "api/models", headers={"Host": f"localhost:{web_server.http_port}"})[0] == 200


def test_the_explorer_refuses_a_non_loopback_address_without_tokens_like_the_grpc_side(tmp_path):
    with pytest.raises(InvalidSpec, match="refusing to serve the web explorer on '0.0.0.0' without auth"):
        ServerConfig(tmp_path, http_port=0, http_host="0.0.0.0")
    ServerConfig(tmp_path, http_port=0, http_host="0.0.0.0", tokens={"t": "a"})
    ServerConfig(tmp_path, http_port=0, http_host="0.0.0.0", allow_insecure_remote=True)
    ServerConfig(tmp_path, http_port=0, http_host="0.0.0.0", tls_cert="c.pem", tls_key="k.pem", tls_client_ca="ca.pem")


def test_with_tls_the_explorer_serves_https_and_asks_for_client_certificates_as_grpc_does(tmp_path, certs):
    trusting = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with_cert = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with_cert.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
    tls = {"tls_cert": certs / "server.pem", "tls_key": certs / "server.key"}
    with serve_in_background(ServerConfig(tmp_path / "a", http_port=0, tls_client_ca=certs / "ca.pem", **tls)) as mtls:
        assert mtls.http_url.startswith("https://127.0.0.1:")
        info = json.loads(urllib.request.urlopen(mtls.http_url + "api/info", context=with_cert, timeout=60).read())
        assert info["tls"] is True and info["tenant"] == "default"
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):  # no client certificate
            urllib.request.urlopen(mtls.http_url + "api/info", context=trusting, timeout=60).read()
    with serve_in_background(ServerConfig(tmp_path / "b", http_port=0, tokens={"s3cret": "alice"}, **tls)) as tokens:
        request = urllib.request.Request(tokens.http_url + "api/login", data=b'{"token": "s3cret"}', method="POST",
                                         headers={"X-Featureviz": "1", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, context=trusting, timeout=60) as response:
            assert "Secure" in response.headers["Set-Cookie"]


# ------------------------------------------------------------------------------------------------- errors


def test_a_bad_upload_answers_the_import_error_and_stores_nothing(http):
    before = http.json("GET", "api/models")[1]["models"]
    bad = b"\x08\x07" + b"garbage" * 50
    status, body = http.json("POST", upload_path(bad, "bad.onnx"), bad)
    assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT" and body["error"]["reason"]
    assert http.json("GET", "api/models")[1]["models"] == before


def test_bad_job_requests_name_the_field(http, model):
    status, body = http.json("POST", "api/jobs", {"model": model.sha256, "objective": "nope:1", "steps": 2})
    assert status == 400 and body["error"]["field_violations"][0][0] == "spec.objective.channel.layer"
    status, body = http.json("POST", "api/jobs", {"model": model.sha256, "objective": "/conv1/Conv:0",
                                                  "steps": "many"})
    assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT"
    status, body = http.json("POST", "api/jobs", {"model": model.sha256, "objective": "/conv1/Conv:0",
                                                  "stepz" * 40: 1})
    assert status == 400 and "unknown key" in body["error"]["message"]
    assert len(body["error"]["field_violations"][0][0]) <= 101  # the caller's key is echoed capped
    status, body = http.json("POST", "api/jobs", {"model": model.sha256, "objective": "/conv1/Conv:99"})
    assert status == 400 and "channel" in body["error"]["message"]
    assert http.json("GET", "api/jobs/no-such-job")[0] == 404
    status, body = http.json("POST", "api/jobs", b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]["message"]


# ------------------------------------------------------------------------------------------------- events


def test_events_stream_previews_and_the_result_and_reattach_from_last_event_id(http, model):
    objective = {"sum": [{"batch": {"index": i, "objective": {"channel": {"layer": "/conv1/Conv", "channel": i}}}}
                         for i in range(2)]}
    status, job = http.json("POST", "api/jobs", {"model": model.sha256, "objective": objective, "batch": 2,
                                                 "steps": 6, "size": 16, "preview_every": 2})
    assert status == 200 and job["summary"] == "/conv1/Conv channels 0–1, one per image"
    events = _sse(http.base, f"api/jobs/{job['id']}/events")
    kinds = [kind for _, kind, _ in events]
    assert kinds[0] == "snapshot" and kinds[-1] == "result" and "progress" in kinds
    previews = [data for _, kind, data in events if kind == "preview"]
    assert previews and all(img["src"].startswith("data:image/png;base64,") for img in previews[0]["images"])
    result = events[-1][2]
    assert result["state"] == "SUCCEEDED"
    assert [img["url"] for img in result["result"]["images"]] == [f"api/jobs/{job['id']}/images/{i}.png"
                                                                  for i in range(2)]
    ids = [int(seq) for seq, kind, _ in events if seq is not None]
    assert ids == sorted(ids)

    middle = ids[len(ids) // 2]
    again = _sse(http.base, f"api/jobs/{job['id']}/events", {"Last-Event-ID": str(middle)})
    assert again[0][1] == "snapshot"
    assert [int(seq) for seq, _, _ in again[1:]] == [seq for seq in ids if seq > middle]

    status, headers, png = http.call("GET", f"api/jobs/{job['id']}/images/1.png?download=1")
    assert status == 200 and png.startswith(b"\x89PNG") and headers["Content-Disposition"].startswith("attachment")


def test_events_of_an_unknown_job_answer_404_before_streaming(http):
    status, headers, raw = http.call("GET", "api/jobs/nope/events")
    assert status == 404 and headers["Content-Type"].startswith("application/json")


def test_stopping_the_server_ends_open_event_streams(tmp_path, net_onnx):
    running = serve_in_background(ServerConfig(tmp_path, http_port=0, grace_seconds=0.5))
    try:
        with Client(running.address) as fv:
            sha = fv.upload(net_onnx).sha256
            job = fv.submit(sha, {"channel": {"layer": "/conv1/Conv", "channel": 0}}, steps=10_000, size=16)
        started, ended = threading.Event(), threading.Event()

        def read():
            with urllib.request.urlopen(f"{running.http_url}api/jobs/{job.id}/events", timeout=120) as response:
                response.readline()
                started.set()
                while response.readline():
                    pass
            ended.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert started.wait(60)
    finally:
        running.stop()
    reader.join(60)
    assert ended.is_set()


# ------------------------------------------------------------------------------------------------ reproduce


def test_the_command_shown_reproduces_the_job(http, model, web_server, net_onnx, tmp_path, capsys, monkeypatch):
    status, job = http.json("POST", "api/jobs", {"model": model.sha256, "objective": "/Relu_1:5", "steps": 3,
                                                 "size": 24, "seed": 7, "param": "maco", "transforms": "none"})
    assert status == 200
    _sse(http.base, f"api/jobs/{job['id']}/events")  # until it ends
    status, shown = http.json("GET", f"api/jobs/{job['id']}")
    words = shlex.split(shown["cli"])
    assert words[:3] == ["featureviz", "render", "explorer-net.onnx"]
    status, spec = http.json("GET", f"api/jobs/{job['id']}/spec.json")
    assert spec["cli"] == shown["cli"] and spec["model"]["display_name"] == "explorer-net.onnx"

    args = build_parser().parse_args(words[1:])
    assert parse_objective(args.objective) == {"channel": {"layer": "/Relu_1", "channel": 5}}
    assert args.server == web_server.address
    monkeypatch.chdir(tmp_path)
    (tmp_path / "explorer-net.onnx").write_bytes(net_onnx)
    assert main(words[1:]) == 0  # the same job again, on the same server
    capsys.readouterr()
    with Client(web_server.address) as fv:
        original = fv.job(job["id"]).spec
        again = fv.job(next(fv.jobs()).id).spec  # the list leaves the objective out
    assert again.model == original.model and again.objective == original.objective
    for key in ("steps", "batch", "seed", "param", "transforms", "size", "preprocess"):
        assert getattr(again, key) == getattr(original, key), key
    assert again.lr == 0.05 and not original.HasField("lr")  # the engine's default, which the CLI sets
    assert (tmp_path / f"featureviz-{job['id'][:12]}.png").exists()


def test_objective_texts_summaries_and_labels():
    channels = {"sum": [{"batch": {"index": i, "objective": {"channel": {"layer": "L", "channel": 3 + i}}}}
                        for i in range(3)]}
    assert objective_summary(channels) == "L channels 3–5, one per image"
    assert image_labels(channels, 3) == ["L:3", "L:4", "L:5"]
    classes = {"sum": [{"batch": {"index": 0, "objective": {"logit": {"index": 1}}}},
                       {"batch": {"index": 1, "objective": {"logit": {"index": 9}}}}]}
    assert objective_summary(classes) == "logit:1 | logit:9"
    assert objective_text(classes).startswith('{"sum":')  # no text syntax for per-image terms: the whole JSON
    assert parse_objective(objective_text(classes)) == classes
    assert objective_text({"channel": {"layer": "a:b", "channel": 2}}) == "'a:b':2"
    assert image_labels({"channel": {"layer": "L", "channel": 1}}, 2) == ["image 0", "image 1"]


# ---------------------------------------------------------------------------------------------------- serve


def test_serve_http_port_serves_the_explorer_next_to_grpc(tmp_path):
    server = ServeProcess(tmp_path / "store", "--http-port", "0")
    try:
        url = server.http_url
        assert url and url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=60) as response:
            page = response.read().decode()
        assert "<title>featureviz explorer</title>" in page and 'src="static/js/app.js"' in page
        with urllib.request.urlopen(url + "static/js/app.js", timeout=60) as response:
            assert "javascript" in response.headers["Content-Type"]
        info = json.loads(urllib.request.urlopen(url + "api/info", timeout=60).read())
        with Client(f"127.0.0.1:{info['grpc_port']}") as fv:
            assert fv.info().tenant == info["tenant"] == "default"
    finally:
        assert server.stop(signal.SIGTERM) == 0, "".join(server.lines)
