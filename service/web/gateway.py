"""The web explorer's HTTP side: an aiohttp app in the gRPC server's process and event loop.

    browser --HTTP JSON, SSE, PNG--> WebGateway --featureviz.client.AsyncClient, grpc.aio--> the servicers
                                      (private unix socket: the same interceptor, auth, limits, errors)

The gateway is a thin translation, not a second service: every request becomes the gRPC call(s) a client
would make, with the caller's bearer token in the metadata, so tenants, read-only tokens, limits, validation
and error codes are exactly the gRPC API's. It binds an extra insecure port on a unix socket in a 0700
temporary folder (reachable only by this user), so it works whatever the TCP port's host or TLS settings.

Auth: the page sends the token once (``POST api/login``); the gateway checks it with ``GetServerInfo`` and
keeps it in an HttpOnly, SameSite=Strict cookie, so images, downloads and the SSE stream carry it too. With
``--tls-cert`` the explorer serves HTTPS with the same certificate, and with ``--tls-client-ca`` it requires client
certificates signed by that CA, as the gRPC port does.
``Authorization: Bearer`` works as well (scripts). State-changing requests must carry the ``X-Featureviz``
header (a cross-site page cannot send it without a CORS preflight, which is never granted), and on a loopback
address the ``Host`` header must be a loopback name (a DNS-rebinding page cannot reach the API).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import ssl
import tempfile
import uuid
from collections import OrderedDict
from pathlib import Path

import grpc
from aiohttp import web

from featureviz.client import AsyncClient
from featureviz.client import FeaturevizClientError
from featureviz.client.client import MESSAGE_BYTES
from featureviz.client.convert import spec_to_proto
from featureviz.errors import FeaturevizError
from featureviz.errors import InvalidSpec
from featureviz.server.config import LOOPBACK_HOSTS
from featureviz.spec import parse_objective
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.web.payloads import cli_command
from featureviz.web.payloads import event_json
from featureviz.web.payloads import job_json
from featureviz.web.payloads import layer_json
from featureviz.web.payloads import model_json
from featureviz.web.payloads import spec_json

__all__ = ["WebGateway", "HTTP_STATUS", "COOKIE", "CSRF_HEADER"]

log = logging.getLogger("featureviz.web")

STATIC = Path(__file__).parent / "static"
COOKIE = "featureviz_token"
CSRF_HEADER = "X-Featureviz"
ECHO = 100  # characters of a caller's value echoed back in a message
DESCRIBED_KEPT = 4096  # jobs whose readable summary the jobs list remembers

# gRPC status code -> HTTP status (the JSON body keeps the gRPC code name, the reason and the field violations)
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409, "FAILED_PRECONDITION": 409,
    "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
_FEATUREVIZ_CODES = {"InvalidSpec": "INVALID_ARGUMENT", "ModelImportError": "INVALID_ARGUMENT",
                     "NotFound": "NOT_FOUND", "FailedPrecondition": "FAILED_PRECONDITION",
                     "ResourceExhausted": "RESOURCE_EXHAUSTED"}
_JOB_KEYS = ("model", "objective", "steps", "lr", "size", "batch", "seed", "param", "decay", "transforms",
             "preview_every", "preview_max_side", "request_id")
_SECURITY_HEADERS = {
    # everything comes from this origin: no CDN, works offline; previews are data: URLs
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= ECHO else text[:ECHO] + "…"


def _error(status: int, code: str, message: str, **details) -> web.Response:
    body = {"error": {"code": code, "message": message, **details}}
    return web.json_response(body, status=status)


class WebGateway:
    """The explorer's aiohttp app. ``WebGateway(config, grpc_server, grpc_port=P)`` before the gRPC server
    starts (it adds the private unix-socket port), then ``await start()`` -> the HTTP port, ``await stop()``.
    ``grpc_port`` only goes into the command lines the pages show."""

    def __init__(self, config, grpc_server: grpc.aio.Server, *, grpc_port: int = 0):
        self.config = config
        self.host = (config.http_host or config.host).strip("[]")
        self.loopback = (config.http_host or config.host) in LOOPBACK_HOSTS
        self.tls = config.tls_cert is not None
        self._folder = tempfile.mkdtemp(prefix="featureviz-web-")  # 0700: only this user reaches the socket
        self._target = f"unix:{self._folder}/grpc.sock"
        if grpc_server.add_insecure_port(self._target) == 0:
            shutil.rmtree(self._folder, ignore_errors=True)
            raise OSError(f"could not bind the explorer's gateway socket {self._target}")
        self.grpc_port = grpc_port
        self.port: int | None = None
        self._channel: grpc.aio.Channel | None = None
        self._runner: web.AppRunner | None = None
        self._streams: set[asyncio.Task] = set()
        self._class_names: list[str] | None = None
        self._described: OrderedDict[str, dict] = OrderedDict()  # job id -> summary, labels (display only)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    async def start(self) -> int:
        self._channel = grpc.aio.insecure_channel(self._target, options=[
            ("grpc.max_receive_message_length", MESSAGE_BYTES), ("grpc.max_send_message_length", MESSAGE_BYTES)])
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        try:
            site = web.TCPSite(self._runner, self.host, self.config.http_port, ssl_context=self._ssl_context())
            await site.start()
        except BaseException:  # e.g. the port is taken: leave nothing behind
            await self.stop()
            raise
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        for task in list(self._streams):  # SSE streams would otherwise hold the shutdown open
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._channel is not None:
            await self._channel.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        if self.config.tls_client_ca is not None:  # mTLS, as on the gRPC port: the browser shows its certificate
            context.load_verify_locations(cafile=str(self.config.tls_client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    # --------------------------------------------------------------------------------------------- the app

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard, self._errors], client_max_size=1 << 20)
        app.router.add_get("/", self.index)
        app.router.add_static("/static/", STATIC, append_version=False)
        api = [
            web.get("/api/info", self.info),
            web.post("/api/login", self.login),
            web.post("/api/logout", self.logout),
            web.get("/api/models", self.list_models),
            web.post("/api/models", self.upload_model),
            web.get("/api/models/{sha}", self.get_model),
            web.delete("/api/models/{sha}", self.delete_model),
            web.get("/api/models/{sha}/layers", self.list_layers),
            web.get("/api/classes", self.classes),
            web.get("/api/jobs", self.list_jobs),
            web.post("/api/jobs", self.create_job),
            web.get("/api/jobs/{id}", self.get_job),
            web.post("/api/jobs/{id}/cancel", self.cancel_job),
            web.get("/api/jobs/{id}/events", self.job_events),
            web.get("/api/jobs/{id}/images/{index:\\d+}.png", self.job_image),
            web.get("/api/jobs/{id}/spec.json", self.job_spec),
        ]
        app.router.add_routes(api)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        if self.loopback and request.url.host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
            return _error(403, "PERMISSION_DENIED", f"this explorer listens on a loopback address and answers only "
                                                    f"to loopback host names, not {_short(request.host)!r}")
        if request.method not in ("GET", "HEAD", "OPTIONS") and request.headers.get(CSRF_HEADER) != "1":
            return _error(403, "PERMISSION_DENIED", f"state-changing requests need the header '{CSRF_HEADER}: 1' "
                                                    "(the explorer's pages send it)")
        response = await handler(request)
        response.headers.update(_SECURITY_HEADERS)
        return response

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except FeaturevizClientError as err:
            return _error(HTTP_STATUS.get(err.code, 500), err.code, err.message, reason=err.reason,
                          field_violations=[list(v) for v in err.field_violations])
        except FeaturevizError as err:  # the gateway's own checks (request parsing) before any gRPC call
            code = _FEATUREVIZ_CODES.get(type(err).__name__, "INVALID_ARGUMENT")
            field = [[err.field, err.description]] if isinstance(err, InvalidSpec) else []
            return _error(HTTP_STATUS[code], code, str(err), reason=err.reason, field_violations=field)

    def _client(self, request: web.Request, token: str | None = None) -> AsyncClient:
        if token is None:
            header = request.headers.get("Authorization", "")
            token = header[len("Bearer "):].strip() if header.startswith("Bearer ") else request.cookies.get(COOKIE)
        return AsyncClient(self._target, token=token or None, channel=self._channel, timeout=60.0)

    # ------------------------------------------------------------------------------------------ the handlers

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def info(self, request: web.Request) -> web.Response:
        info = await self._client(request).info()
        return web.json_response(self._info_json(info))

    def _info_json(self, info: pb.ServerInfo) -> dict:
        limits = info.limits
        return {"version": info.version, "tenant": info.tenant, "auth_required": info.auth_required,
                "device": {"kind": info.device.kind, "name": info.device.name, "kernels": info.device.kernels},
                "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_image_side": limits.max_image_side,
                           "max_steps": limits.max_steps, "max_batch": limits.max_batch},
                "grpc_port": self.grpc_port, "tls": self.tls}

    async def login(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        token = body.get("token")
        if not isinstance(token, str) or not token.strip():
            raise InvalidSpec("token", "give the bearer token the server's operator gave you")
        try:
            info = await self._client(request, token=token.strip()).info()
        except FeaturevizClientError as err:
            if err.code != "UNAUTHENTICATED":
                raise
            return _error(401, "UNAUTHENTICATED", "the server refused this token; check it and try again")
        response = web.json_response(self._info_json(info))
        response.set_cookie(COOKIE, token.strip(), httponly=True, samesite="Strict", secure=self.tls, path="/")
        return response

    async def logout(self, request: web.Request) -> web.Response:
        response = web.json_response({})
        response.del_cookie(COOKIE, path="/")
        return response

    async def list_models(self, request: web.Request) -> web.Response:
        client = self._client(request)
        models = [model_json(m) async for m in client.models(page_size=1000)]
        for model in models:
            model["logits_channels"] = await _logits_channels(client, model)
        return web.json_response({"models": models})

    async def get_model(self, request: web.Request) -> web.Response:
        client = self._client(request)
        model = model_json(await client.model(request.match_info["sha"]))
        model["logits_channels"] = await _logits_channels(client, model)
        return web.json_response(model)

    async def delete_model(self, request: web.Request) -> web.Response:
        await self._client(request).delete_model(request.match_info["sha"])
        return web.json_response({})

    async def upload_model(self, request: web.Request) -> web.Response:
        """The request body is the ONNX file. The token is checked before any byte is read; the body is
        spooled to the private folder (at most the server's max_upload_bytes), then uploaded over gRPC."""
        client = self._client(request)
        limit = (await client.info()).limits.max_upload_bytes
        if request.content_length is not None and request.content_length > limit:
            return _error(413, "INVALID_ARGUMENT", f"{request.content_length} bytes; the server takes models of "
                                                   f"at most {limit} bytes")
        name = _short(request.query.get("name", ""))
        preprocess = _preprocess(request.query)
        fd, spool = tempfile.mkstemp(dir=self._folder, suffix=".onnx")
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                async for block in request.content.iter_chunked(1 << 20):
                    size += len(block)
                    if size > limit:
                        return _error(413, "INVALID_ARGUMENT", f"more than {limit} bytes; the server takes models "
                                                               f"of at most {limit} bytes")
                    await asyncio.to_thread(out.write, block)
            if size == 0:
                raise InvalidSpec("body", "the request body is empty; send the ONNX file's bytes")
            model = await client.upload(spool, name=name, preprocess=preprocess)
        finally:
            Path(spool).unlink(missing_ok=True)
        return web.json_response(model_json(model))

    async def list_layers(self, request: web.Request) -> web.Response:
        client = self._client(request)
        layers = [layer_json(layer) async for layer in client.layers(request.match_info["sha"], page_size=1000)]
        return web.json_response({"layers": layers})

    async def classes(self, request: web.Request) -> web.Response:
        await self._client(request).info()  # the same auth as every other page
        if self._class_names is None:
            from featureviz import zoo

            self._class_names = await asyncio.to_thread(zoo.imagenet_class_names)
        return web.json_response({"names": self._class_names}, headers={"Cache-Control": "private, max-age=3600"})

    async def list_jobs(self, request: web.Request) -> web.Response:
        client = self._client(request)
        names = {m.sha256: m.display_name async for m in client.models(page_size=1000)}
        jobs = []
        async for job in client.jobs(page_size=100):
            out = job_json(job)
            out["model_name"] = names.get(out["spec"]["model"], "")
            out.update(self._described.get(job.id, {}))  # the list carries the objective as capped text only
            jobs.append(out)
            if len(jobs) == 100:  # the newest hundred
                break
        return web.json_response({"jobs": jobs})

    def _describe(self, job: dict) -> dict:
        """Remember how a job with its whole spec reads (summary, image labels) for the jobs list."""
        if job["spec"].get("objective") is not None:
            self._described[job["id"]] = {key: job[key] for key in ("summary", "image_labels")}
            while len(self._described) > DESCRIBED_KEPT:
                self._described.popitem(last=False)
        return job

    async def create_job(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        unknown = sorted(set(body) - set(_JOB_KEYS))
        if unknown:
            raise InvalidSpec(_short(unknown[0]), f"unknown key; a job takes: {', '.join(_JOB_KEYS)}")
        objective = body.get("objective")
        if isinstance(objective, str):
            objective = parse_objective(objective)
        options = {key: body[key] for key in _JOB_KEYS[2:-1] if body.get(key) is not None}
        if isinstance(options.get("size"), list):
            options["size"] = tuple(options["size"])
        try:
            spec = spec_to_proto(str(body.get("model", "")), objective, **options)
        except (TypeError, ValueError) as exc:
            raise InvalidSpec("spec", f"a value has the wrong type: {_short(exc)}") from None
        request_id = body.get("request_id") or uuid.uuid4().hex
        job = await self._client(request).submit(spec.model, spec=spec, request_id=str(request_id))
        return web.json_response(self._describe(job_json(job)))

    async def get_job(self, request: web.Request) -> web.Response:
        client = self._client(request)
        job = await client.job(request.match_info["id"])
        out = self._describe(job_json(job))
        out["cli"] = await self._cli(client, request, job)
        return web.json_response(out)

    async def cancel_job(self, request: web.Request) -> web.Response:
        return web.json_response(job_json(await self._client(request).cancel(request.match_info["id"])))

    async def job_image(self, request: web.Request) -> web.Response:
        job = await self._client(request).job(request.match_info["id"])
        index = int(request.match_info["index"])
        for image in job.result.images:
            if image.index == index and image.png:
                disposition = "attachment" if request.query.get("download") else "inline"
                name = f"featureviz-{job.id[:12]}-{index}.png"
                return web.Response(body=image.png, content_type="image/png", headers={
                    "Content-Disposition": f'{disposition}; filename="{name}"',
                    "Cache-Control": "private, max-age=86400"})  # a finished job's images never change
        return _error(404, "NOT_FOUND", f"job {_short(job.id)} has no image {index} (yet); it is "
                                        f"{pb.JobState.Name(job.state).removeprefix('JOB_STATE_')}")

    async def job_spec(self, request: web.Request) -> web.Response:
        """Everything needed to reproduce a job: its spec (the engine's keyword arguments), its objective as
        command-line text and the ``featureviz render`` command."""
        client = self._client(request)
        job = await client.job(request.match_info["id"])
        out = job_json(job)
        body = {"job": job.id, "state": out["state"], "model": await self._model_ref(client, job),
                "spec": out["spec"], "objective_text": out["objective_text"],
                "cli": await self._cli(client, request, job)}
        if "result" in out:
            body["result"] = {key: value for key, value in out["result"].items() if key != "images"}
            body["result"]["images"] = [{k: v for k, v in image.items() if k != "url"}
                                        for image in out["result"]["images"]]
        return web.json_response(body, dumps=lambda obj: json.dumps(obj, indent=2), headers={
            "Content-Disposition": f'attachment; filename="featureviz-{job.id[:12]}.json"'})

    async def _model_ref(self, client: AsyncClient, job: pb.Job) -> dict:
        sha = job.spec.model.removeprefix("models/")
        try:
            model = await client.model(sha)
        except FeaturevizClientError:  # deleted since
            return {"sha256": sha, "display_name": ""}
        return {"sha256": sha, "display_name": model.display_name}

    async def _cli(self, client: AsyncClient, request: web.Request, job: pb.Job) -> str:
        model = await self._model_ref(client, job)
        name = model["display_name"]
        model_file = Path(name).name if name.lower().endswith(".onnx") else f"{model['sha256'][:12]}.onnx"
        host = request.url.host or "127.0.0.1"
        server = f"[{host}]:{self.grpc_port}" if ":" in host else f"{host}:{self.grpc_port}"
        return cli_command(spec_json(job.spec), model_file=model_file, server=server, tls=self.tls,
                           out=f"featureviz-{job.id[:12]}.png")

    async def job_events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events from WatchJob (with previews): ``id`` is the event's seq, so the browser's
        EventSource re-attaches where it left off (Last-Event-ID) after a dropped connection."""
        try:
            from_seq = int(request.headers.get("Last-Event-ID") or request.query.get("from_seq") or 0)
        except ValueError:
            raise InvalidSpec("from_seq", "must be an integer event sequence number") from None
        events = self._client(request).watch(request.match_info["id"], from_seq=from_seq, previews=True,
                                             reconnects=0)
        try:
            first = await anext(events)  # auth and NOT_FOUND answer as JSON errors, before the stream starts
        except BaseException:
            await events.aclose()
            raise
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no", **_SECURITY_HEADERS})
        await response.prepare(request)
        task = asyncio.current_task()
        self._streams.add(task)
        try:
            event = first
            while True:
                kind, data = event_json(event)
                if kind == "heartbeat":
                    await response.write(b": heartbeat\n\n")
                else:
                    seq = f"id: {event.seq}\n" if kind not in ("snapshot",) else ""
                    await response.write(f"{seq}event: {kind}\ndata: {json.dumps(data)}\n\n".encode())
                if kind == "result":
                    break
                event = await anext(events)
        except (ConnectionResetError, StopAsyncIteration):
            pass  # the page went away, or the watch ended
        except FeaturevizClientError as err:  # the watch broke mid-stream: tell the page, which re-attaches
            await _write_quietly(response, f"event: failure\ndata: {json.dumps({'code': err.code})}\n\n")
        finally:
            self._streams.discard(task)
            await events.aclose()
        return response


async def _logits_channels(client: AsyncClient, model: dict) -> int:
    """How many classes the model's logits have (0: no logits found): the classes page needs 1000."""
    name = model["logits_layer"]
    if not name:
        return 0
    async for layer in client.layers(model["sha256"], filter=name, page_size=100):
        if layer.name == name or name in layer.aliases:
            return layer.channels
    return 0


async def _write_quietly(response: web.StreamResponse, text: str) -> None:
    try:
        await response.write(text.encode())
    except ConnectionResetError:
        pass


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise InvalidSpec("body", "expected a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidSpec("body", f"expected a JSON object, got {_short(json.dumps(body))}")
    return body


def _preprocess(query) -> dict | None:
    """``?mean=R,G,B&std=R,G,B&bgr=1`` -> the upload's preprocess override (None: the importer's default)."""
    if not query.get("mean") and not query.get("std"):
        return None
    values = {}
    for key in ("mean", "std"):
        try:
            values[key] = [float(v) for v in query.get(key, "").split(",")]
        except ValueError:
            raise InvalidSpec(key, f"expected 1 or 3 comma-separated numbers, got {_short(query.get(key))!r}") \
                from None
    return {**values, "channel_order": "BGR" if query.get("bgr") in ("1", "true") else "RGB"}
