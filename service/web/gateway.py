"""The web explorer's HTTP side: an aiohttp app in the gRPC server's process and event loop.

    browser --HTTP JSON, SSE, PNG--> WebGateway --featureviz.client.AsyncClient, grpc.aio--> the servicers
                                      (private unix socket: the same interceptor, auth, limits, errors)

The gateway is a thin translation, not a second service: every request becomes the gRPC call(s) a client
would make, with the caller's bearer token in the metadata, so tenants, read-only tokens, limits, validation
and error codes are exactly the gRPC API's. It binds an extra insecure port on a unix socket in a 0700
temporary folder (reachable only by this user), so it works whatever the TCP port's host or TLS settings.

Auth: the page sends the token once (``POST api/login``); the gateway checks it with ``GetServerInfo`` and answers
with a random session id (``sessions.Sessions``) in an HttpOnly, SameSite=Strict cookie (``__Host-featureviz``,
Secure, over TLS), so images, downloads and the SSE stream carry it too; the token stays in the gateway's memory,
logout deletes the session. ``Authorization: Bearer`` works as well (scripts). With ``--tls-cert`` the explorer
serves HTTPS with the same certificate, and with ``--tls-client-ca`` it requires client certificates signed by that
CA, as the gRPC port does. State-changing requests must carry the ``X-Featureviz`` header (a cross-site page cannot
send it without a CORS preflight, which is never granted), and on a loopback address the ``Host`` header must be a
loopback name (a DNS-rebinding page cannot reach the API). A client address with ``max_failed_auth_per_minute``
failed sign-ins (a refused token, an unknown session) is answered 429 for a while.

Limits (the server's ``Limits``): ``http_header_timeout_seconds`` for a request's header, ``max_http_connections_per
_client`` open connections per address (``connections.ConnectionGuard``), ``http_body_idle_timeout_seconds`` of
silence in a request body, ``session_ttl_seconds``. Uploads stream the body straight into ``UploadModel`` (no
temporary file), after the token's write scope and the declared size were checked.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import shutil
import ssl
import tempfile
import uuid
from collections import OrderedDict
from pathlib import Path

import grpc
from aiohttp import web
from google.protobuf import json_format

from featureviz.client import AsyncClient
from featureviz.client import FeaturevizClientError
from featureviz.client.client import MESSAGE_BYTES
from featureviz.codec import preprocess_to_proto
from featureviz.codec import spec_to_proto
from featureviz.client.errors import from_rpc_error
from featureviz.client.exemplars import ORDERS
from featureviz.errors import FeaturevizError
from featureviz.errors import InvalidSpec
from featureviz.errors import code_name
from featureviz.errors import echo
from featureviz.hosts import LOOPBACK_HOSTS
from featureviz.options import ATLAS
from featureviz.options import BY_NAME
from featureviz.options import EXEMPLAR_INDEX
from featureviz.options import OPTIONS
from featureviz.options import offered
from featureviz.ratelimit import FailureThrottle
from featureviz.spec import parse_objective
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.v1 import featureviz_pb2_grpc as pb_grpc
from featureviz.web.connections import AcceptErrorLog
from featureviz.web.connections import BadRequestLog
from featureviz.web.connections import ConnectionGuard
from featureviz.client.atlas import atlas_job_spec
from featureviz.web.payloads import ATLAS_VARIANTS
from featureviz.web.payloads import atlas_options_json
from featureviz.web.payloads import atlas_progress_json
from featureviz.web.payloads import atlas_unit_cli
from featureviz.web.payloads import atlas_unit_json
from featureviz.web.payloads import cli_command
from featureviz.web.payloads import dataset_json
from featureviz.web.payloads import event_json
from featureviz.web.payloads import exemplars_json
from featureviz.web.payloads import json_text
from featureviz.web.payloads import job_json
from featureviz.web.payloads import layer_json
from featureviz.web.payloads import model_json
from featureviz.web.payloads import spec_json
from featureviz.web.payloads import state_name
from featureviz.web.sessions import Sessions

__all__ = ["WebGateway", "HTTP_STATUS", "COOKIE", "TLS_COOKIE", "CSRF_HEADER", "UPLOAD_IDLE_STATUS"]

log = logging.getLogger("featureviz.web")

STATIC = Path(__file__).parent / "static"
COOKIE = "featureviz_session"  # plain HTTP: browsers refuse the __Host- prefix without Secure
TLS_COOKIE = "__Host-featureviz"  # HTTPS: Secure, Path=/, no Domain, so no other host or plain page can set it
CSRF_HEADER = "X-Featureviz"
ECHO = 100  # characters of a caller's value echoed back in a message
DESCRIBED_KEPT = 4096  # jobs whose readable summary the jobs list remembers
JSON_BODY_BYTES = 1 << 20  # a JSON request body (login, a job) is at most this
JSON_DEPTH = 64  # ... and nested at most this deep (objectives are at most max_objective_depth = 16)
INT64_MAX = (1 << 63) - 1
UPLOAD_IDLE_STATUS = 408
_SHA256 = re.compile(r"[0-9a-f]{64}")
MANIFEST_BYTES = 16 << 20  # a files upload's JSON list of its files (max_archive_members entries) is at most this
_DATASET_KINDS = {"zip": pb.DATASET_SOURCE_KIND_ZIP, "tar": pb.DATASET_SOURCE_KIND_TAR,
                  "files": pb.DATASET_SOURCE_KIND_FILES}
# set on a request that carried a token or a session (aiohttp >= 3.14 wants typed keys; older ones take a string)
_CREDENTIALS = (web.RequestKey("featureviz_credentials", bool) if hasattr(web, "RequestKey")
                else "featureviz_credentials")

# gRPC status code -> HTTP status (the JSON body keeps the gRPC code name, the reason and the field violations)
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409, "FAILED_PRECONDITION": 409,
    "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
# a job's JSON keys: the model, the objective, the job options the web offers (their declaration,
# featureviz.options) and the request id
_JOB_OPTIONS = tuple(option.name for option in offered("web"))
_JOB_KEYS = ("model", "objective", *_JOB_OPTIONS, "request_id")
# POST api/exemplars/index: the model, the set, the layers, the parts of the exemplar_index option and the other
# options an index job takes (their declaration, featureviz.options: size)
_INDEX_PARTS = tuple(part.name for part in BY_NAME["exemplar_index"].parts)
_INDEX_OPTIONS = tuple(option.name for option in OPTIONS if EXEMPLAR_INDEX in option.kinds
                       and option.type in ("int", "size"))
_INDEX_KEYS = ("model", "dataset", "layers", *_INDEX_PARTS, *_INDEX_OPTIONS)
# POST api/atlases: the model, the selection (AtlasSpec) and the render options an atlas's units take
_ATLAS_SELECT = ("layers", "op_types", "min_depth", "max_depth", "channels")
_ATLAS_RENDER = tuple(option.name for option in OPTIONS if ATLAS in option.kinds and option.name != "atlas"
                      and option.type in ("int", "float", "bool", "choice", "size"))
_ATLAS_KEYS = ("model", *_ATLAS_SELECT, "dataset", "negative", "diversity", *_ATLAS_RENDER, "request_id")
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


def _base64(value, field: str) -> bytes:
    """A JSON string of base64 -> its bytes, or InvalidSpec naming the field."""
    try:
        if not isinstance(value, str):
            raise ValueError
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise InvalidSpec(field, "must be a base64 string of PNG or JPEG bytes") from None


def _json(data, *, status: int = 200, headers: dict | None = None, indent: int | None = None) -> web.Response:
    """Every JSON answer: strict JSON through ``payloads.json_text`` (no NaN or Infinity, ever)."""
    return web.Response(text=json_text(data, indent=indent), status=status, content_type="application/json",
                        headers=headers)


def _error(status: int, code: str, message: str, *, headers: dict | None = None, **details) -> web.Response:
    return _json({"error": {"code": code, "message": message, **details}}, status=status, headers=headers)


class _BodyIdle(Exception):
    """A request body sent nothing for http_body_idle_timeout_seconds."""


class WebGateway:
    """The explorer's aiohttp app. ``WebGateway(config, grpc_server, grpc_port=P)`` before the gRPC server
    starts (it adds the private unix-socket port), then ``await start()`` -> the HTTP port, ``await stop()``.
    ``grpc_port`` only goes into the command lines the pages show."""

    def __init__(self, config, grpc_server: grpc.aio.Server, *, grpc_port: int = 0):
        self.config = config
        self.limits = config.limits
        self.host = (config.http_host or config.host).strip("[]")
        self.loopback = (config.http_host or config.host) in LOOPBACK_HOSTS
        self.tls = config.tls_cert is not None
        self.cookie = TLS_COOKIE if self.tls else COOKIE
        self._folder = tempfile.mkdtemp(prefix="featureviz-web-")  # 0700: only this user reaches the socket
        self._target = f"unix:{self._folder}/grpc.sock"
        if grpc_server.add_insecure_port(self._target) == 0:
            shutil.rmtree(self._folder, ignore_errors=True)
            raise OSError(f"could not bind the explorer's gateway socket {self._target}")
        self.grpc_port = grpc_port
        self.port: int | None = None
        self.sessions = Sessions(self.limits.session_ttl_seconds)
        self.throttle = FailureThrottle(self.limits.max_failed_auth_per_minute)
        self.connections: ConnectionGuard | None = None
        self._channel: grpc.aio.Channel | None = None
        self._models: pb_grpc.ModelServiceStub | None = None
        self._datasets: pb_grpc.DatasetServiceStub | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._accept_log: AcceptErrorLog | None = None
        self._bad_requests = BadRequestLog()
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
        self._models = pb_grpc.ModelServiceStub(self._channel)
        self._datasets = pb_grpc.DatasetServiceStub(self._channel)
        # aiohttp's keep-alive timer runs from a connection's start and after each response, and closes the
        # connection when no whole request header came by then: that is the header-read timeout
        header_timeout = self.limits.http_header_timeout_seconds
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0,
                                     keepalive_timeout=header_timeout)
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        try:
            self.connections = ConnectionGuard(self.limits.max_http_connections_per_client)
            ssl_context = self._ssl_context()
            self._listener = await loop.create_server(
                self.connections.factory(self._runner.server), self.host, self.config.http_port, ssl=ssl_context,
                ssl_handshake_timeout=header_timeout if ssl_context is not None else None, backlog=128)
        except BaseException:  # e.g. the port is taken: leave nothing behind
            await self.stop()
            raise
        self._accept_log = AcceptErrorLog(loop).install()
        logging.getLogger("aiohttp.server").addFilter(self._bad_requests)
        self.port = self._listener.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()  # no new connections
        for task in list(self._streams):  # SSE streams would otherwise hold the shutdown open
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()  # closes the open connections
        if self._accept_log is not None:
            self._accept_log.uninstall()
        logging.getLogger("aiohttp.server").removeFilter(self._bad_requests)
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
        app = web.Application(middlewares=[self._guard, self._errors], client_max_size=JSON_BODY_BYTES)
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
            web.get("/api/datasets", self.list_datasets),
            web.post("/api/datasets", self.upload_dataset),
            web.get("/api/datasets/{id}", self.get_dataset),
            web.delete("/api/datasets/{id}", self.delete_dataset),
            web.get("/api/datasets/{id}/images/{image:[0-9a-f]{64}}.png", self.dataset_image),
            web.get("/api/exemplars", self.exemplars),
            web.post("/api/exemplars/index", self.index_exemplars),
            web.get("/api/classes", self.classes),
            web.get("/api/jobs", self.list_jobs),
            web.post("/api/jobs", self.create_job),
            web.get("/api/jobs/{id}", self.get_job),
            web.post("/api/jobs/{id}/cancel", self.cancel_job),
            web.get("/api/jobs/{id}/events", self.job_events),
            web.get("/api/jobs/{id}/images/{index:\\d{1,9}}.png", self.job_image),
            web.get("/api/jobs/{id}/spec.json", self.job_spec),
            web.get("/api/atlases", self.list_atlases),
            web.post("/api/atlases", self.create_atlas),
            web.get("/api/atlases/{id}", self.get_atlas),
            web.get("/api/atlases/{id}/units", self.atlas_units),
            web.get("/api/atlases/{id}/units/{index:\\d{1,9}}", self.atlas_unit),
            web.get("/api/atlases/{id}/units/{index:\\d{1,9}}.png", self.atlas_unit_image),
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
        if request.path.startswith("/api/"):
            wait = self.throttle.retry_after(_client_address(request))
            if wait > 0:
                limit = self.throttle.max_per_minute
                return _error(429, "RESOURCE_EXHAUSTED", f"too many failed sign-ins from this address: more than "
                              f"{limit} a minute (max_failed_auth_per_minute); try again in {math.ceil(wait)} s",
                              reason="AUTH_THROTTLED", headers={"Retry-After": str(math.ceil(wait))})
        response = await handler(request)
        response.headers.update(_SECURITY_HEADERS)
        if request.body_exists and not request.content.at_eof():  # answered before the body (a refused upload):
            response.force_close()  # close instead of reading the rest to reuse the connection
        return response

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except FeaturevizClientError as err:
            if err.code == "UNAUTHENTICATED" and request.get(_CREDENTIALS):  # a token or session was refused
                self.throttle.failed(_client_address(request))
            retry = {"Retry-After": str(max(1, math.ceil(err.retry_after)))} if err.retry_after else None
            return _error(HTTP_STATUS.get(err.code, 500), err.code, err.message, reason=err.reason, headers=retry,
                          field_violations=[list(v) for v in err.field_violations])
        except FeaturevizError as err:  # the gateway's own checks (request parsing) before any gRPC call
            code = code_name(err)
            field = [[err.field, err.description]] if isinstance(err, InvalidSpec) else []
            return _error(HTTP_STATUS.get(code, 500), code, str(err), reason=err.reason, field_violations=field)
        except web.HTTPException as exc:  # aiohttp's own answers (no such route, method): JSON under api/ too
            if exc.status < 400 or not request.path.startswith("/api/"):
                raise
            code = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}.get(exc.status, "INVALID_ARGUMENT")
            return _error(exc.status, code, f"{request.method} {_short(request.path)}: {exc.reason}")

    def _token(self, request: web.Request) -> str | None:
        """The caller's bearer token: the ``Authorization: Bearer`` header, else the session cookie's (an unknown
        or expired session is refused: the cookie never holds a token itself)."""
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            request[_CREDENTIALS] = True
            return header[len("Bearer "):].strip() or None
        session = request.cookies.get(self.cookie)
        if session is None or not self.config.tokens:  # no tokens: no sign-in, a stale cookie does not matter
            return None
        request[_CREDENTIALS] = True
        token = self.sessions.token(session)
        if token is None:
            raise FeaturevizClientError("UNAUTHENTICATED", "this sign-in session expired or was signed out "
                                                           f"(sessions last {self.sessions.ttl:g} s, "
                                                           "session_ttl_seconds); sign in again")
        return token

    def _client(self, request: web.Request, token: str | None = None) -> AsyncClient:
        if token is None:
            token = self._token(request)
        return AsyncClient(self._target, token=token or None, channel=self._channel, timeout=60.0)

    # ------------------------------------------------------------------------------------------ the handlers

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def info(self, request: web.Request) -> web.Response:
        info = await self._client(request).info()
        return _json(self._info_json(info))

    def _info_json(self, info: pb.ServerInfo) -> dict:
        limits = info.limits
        return {"version": info.version, "tenant": info.tenant, "auth_required": info.auth_required,
                "device": {"kind": info.device.kind, "name": info.device.name, "kernels": info.device.kernels},
                "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_image_side": limits.max_image_side,
                           "max_steps": limits.max_steps, "max_images_per_job": limits.max_images_per_job,
                           "max_batch": limits.max_images_per_job,  # deprecated: max_images_per_job
                           "max_dataset_bytes": limits.max_dataset_bytes,
                           "max_dataset_images": limits.max_dataset_images},
                # the job options as the server declares them (ServerInfo.job_options): the form's choices, ranges
                "options": {option.name: json_format.MessageToDict(option, preserving_proto_field_name=True)
                            for option in info.job_options},
                "grpc_port": self.grpc_port, "tls": self.tls}

    async def login(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        token = body.get("token")
        if not isinstance(token, str) or not token.strip():
            raise InvalidSpec("token", "give the bearer token the server's operator gave you")
        try:
            info = await self._client(request, token=token.strip()).info()
        except FeaturevizClientError as err:
            if err.code != "UNAUTHENTICATED":
                raise
            self.throttle.failed(_client_address(request))
            return _error(401, "UNAUTHENTICATED", "the server refused this token; check it and try again")
        old = request.cookies.get(self.cookie)
        if old is not None:  # a new sign-in replaces the session this browser had
            self.sessions.delete(old)
        response = _json(self._info_json(info))
        if self.config.tokens:
            response.set_cookie(self.cookie, self.sessions.create(token.strip()), httponly=True, samesite="Strict",
                                secure=self.tls, path="/", max_age=int(self.sessions.ttl))
        return response

    async def logout(self, request: web.Request) -> web.Response:
        session = request.cookies.get(self.cookie)
        if session is not None:
            self.sessions.delete(session)  # the cookie's value is worthless from now on, wherever a copy is
        response = _json({})
        response.del_cookie(self.cookie, path="/", secure=self.tls, httponly=True, samesite="Strict")
        return response

    async def list_models(self, request: web.Request) -> web.Response:
        client = self._client(request)
        models = [model_json(m) async for m in client.models(page_size=1000)]
        for model in models:
            model["logits_channels"] = await _logits_channels(client, model)
        return _json({"models": models})

    async def get_model(self, request: web.Request) -> web.Response:
        client = self._client(request)
        model = model_json(await client.model(request.match_info["sha"]))
        model["logits_channels"] = await _logits_channels(client, model)
        return _json(model)

    async def delete_model(self, request: web.Request) -> web.Response:
        await self._client(request).delete_model(request.match_info["sha"])
        return _json({})

    async def list_datasets(self, request: web.Request) -> web.Response:
        """The tenant's sets, each with its whole report (the names too: GetDataset's; at most
        max_datasets_per_tenant sets)."""
        client = self._client(request)
        listed = [dataset async for dataset in client.datasets(page_size=1000)]
        return _json({"datasets": [dataset_json(await client.dataset(d.id)) for d in listed]})

    async def get_dataset(self, request: web.Request) -> web.Response:
        return _json(dataset_json(await self._client(request).dataset(request.match_info["id"])))

    async def delete_dataset(self, request: web.Request) -> web.Response:
        await self._client(request).delete_dataset(request.match_info["id"])
        return _json({})

    async def dataset_image(self, request: web.Request) -> web.Response:
        """One image of a set as PNG (GetDatasetImage): ``?box=x0,y0,x1,y1`` crops it (the file's pixels, end
        exclusive), ``?max_side=`` downscales it (0 or none: max_image_side)."""
        box = _ints(request.query["box"], "box", 4) if request.query.get("box") else None
        max_side = _ints(request.query.get("max_side", "0"), "max_side", 1)[0]
        png = await self._client(request).dataset_image(request.match_info["id"], request.match_info["image"],
                                                        box=box, max_side=max_side)
        return web.Response(body=png, content_type="image/png",
                            headers={"Cache-Control": "private, max-age=86400"})  # stored by content: never changes

    async def exemplars(self, request: web.Request) -> web.Response:
        """One channel's dataset examples (GetExemplars): ``?model=&dataset=&layer=&channel=&order=max|mean|min&k=``;
        each with the URLs of its crop and of its whole image (``api/datasets/<id>/images/<sha256>.png``) and its
        box as fractions of the image, to draw on the whole image."""
        query = request.query
        order = query.get("order", "max")
        if order not in ORDERS:
            raise InvalidSpec("order", f"order must be one of {', '.join(ORDERS)}, got {echo(order)}")
        channel = _ints(query.get("channel", ""), "channel", 1)[0]
        k = _ints(query.get("k", "9"), "k", 1)[0]
        response = await self._client(request).exemplars(query.get("model", ""), query.get("dataset", ""),
                                                         query.get("layer", ""), channel, order=order, k=k)
        return _json(exemplars_json(response, query.get("dataset", "").strip().removeprefix("datasets/").lower()))

    async def index_exemplars(self, request: web.Request) -> web.Response:
        """Run the exemplar index job (``JobSpec.exemplar_index``) for a model and a set: ``{"model", "dataset",
        "layers": [...], "k", "batch_size", "size"}`` (all but model and dataset optional) -> the job; follow it
        with ``api/jobs/<id>/events`` (progress: images done of the set's)."""
        body = await self._json_body(request)
        unknown = sorted(set(body) - set(_INDEX_KEYS))
        if unknown:
            raise InvalidSpec(_short(unknown[0]), f"unknown key; an index job takes: {', '.join(_INDEX_KEYS)}")
        layers = body.get("layers") or []
        if isinstance(layers, str):
            layers = [layers]
        if not isinstance(layers, list) or not all(isinstance(layer, str) for layer in layers):
            raise InvalidSpec("layers", "expected a list of layer names")
        options = {key: body[key] for key in (*_INDEX_PARTS, *_INDEX_OPTIONS) if body.get(key) is not None}
        for key, value in options.items():
            values = value if key == "size" and isinstance(value, list) and len(value) == 2 else [value]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise InvalidSpec(key, f"expected an integer{' or [height, width]' if key == 'size' else ''}, got "
                                       f"{echo(json.dumps(value))}")
        job = await self._client(request).index_exemplars(str(body.get("model", "")), str(body.get("dataset", "")),
                                                          layers, **options)
        return _json(job_json(job))

    async def upload_model(self, request: web.Request) -> web.Response:
        """The request body is the ONNX file, ``?sha256=`` its digest (the page computes it), ``?name=`` and the
        preprocessing (``?mean=&std=&bgr=``) optional. Checked and streamed as every upload (``_upload_checks``,
        ``_upload_stream``); a model the server holds already answers at once."""
        checked = await self._upload_checks(request, "a model", "max_upload_bytes")
        if isinstance(checked, web.Response):
            return checked
        token, metadata, limits, size, sha = checked
        header = pb.UploadHeader(sha256=sha, size_bytes=size, display_name=_short(request.query.get("name", "")))
        preprocess = _preprocess(request.query)
        if preprocess is not None:
            header.preprocess.CopyFrom(preprocess_to_proto(preprocess))
        status = await self._grpc(self._models.GetUpload(pb.GetUploadRequest(sha256=sha, size_bytes=size),
                                                         metadata=metadata, timeout=60.0))
        if status.model_exists:  # the server holds these bytes: nothing to send
            model = await self._client(request, token).model(sha)
            model.deduplicated = True
            return _json(model_json(model))
        model = await self._upload_stream(request, self._models.UploadModel(metadata=metadata),
                                          pb.UploadModelRequest, pb.UploadModelRequest(header=header),
                                          status.committed_bytes, size, limits)
        return model if isinstance(model, web.Response) else _json(model_json(model))

    async def upload_dataset(self, request: web.Request) -> web.Response:
        """An image set: ``?kind=zip|tar`` and the body is the archive, or ``?kind=files&manifest=N`` and the body is
        N bytes of a JSON list of the files (``[{"name", "size", "sha256"}, ...]``, in stream order) followed by the
        files' bytes one after another. ``?sha256=`` is the digest of the stream after the manifest (the archive,
        or the files' bytes), ``?name=`` the set's display name. Checked and streamed as a model upload (the size
        bound is max_dataset_bytes), into UploadDataset; the answer is the stored set with its report."""
        kind = _DATASET_KINDS.get(request.query.get("kind", ""))
        if kind is None:
            raise InvalidSpec("kind", f"give the upload's kind in ?kind=: zip, tar or files, got "
                                      f"{echo(request.query.get('kind', ''))}")
        manifest = 0
        if kind == pb.DATASET_SOURCE_KIND_FILES:
            text = request.query.get("manifest", "")
            if not text.isdigit() or not 0 < int(text) <= MANIFEST_BYTES:
                raise InvalidSpec("manifest", f"give the size of the files' JSON list that starts the body in "
                                              f"?manifest=, 1 to {MANIFEST_BYTES} bytes, got {echo(text)}")
            manifest = int(text)
        checked = await self._upload_checks(request, "a dataset", "max_dataset_bytes", prefix=manifest)
        if isinstance(checked, web.Response):
            return checked
        token, metadata, limits, size, sha = checked
        header = pb.DatasetUploadHeader(sha256=sha, size_bytes=size, kind=kind,
                                        display_name=_short(request.query.get("name", "")))
        if manifest:
            header.files.extend(await self._manifest(request, manifest))
        status = await self._grpc(self._datasets.GetDatasetUpload(
            pb.GetDatasetUploadRequest(sha256=sha, size_bytes=size), metadata=metadata, timeout=60.0))
        dataset = await self._upload_stream(request, self._datasets.UploadDataset(metadata=metadata),
                                            pb.UploadDatasetRequest, pb.UploadDatasetRequest(header=header),
                                            status.committed_bytes, size, limits)
        return dataset if isinstance(dataset, web.Response) else _json(dataset_json(dataset))

    async def _upload_checks(self, request: web.Request, what: str, limit: str, *, prefix: int = 0):
        """What every upload checks before any byte of its body is read: the token (401), its write scope (403),
        the declared size (411 without one, 413 over the ``limit`` field of Limits; ``prefix`` bytes of the body
        come before the stream and do not count) and the stream's digest in ``?sha256=``. -> (token, gRPC
        metadata, limits, stream size, sha256), or the error response."""
        token = self._token(request)
        limits = (await self._client(request, token).info()).limits
        if token is not None and token in self.config.read_only:
            return _error(403, "PERMISSION_DENIED", f"this token is read-only; uploading {what} changes state and "
                                                    "needs a read-write token", reason="READ_ONLY_TOKEN")
        if request.content_length is None:
            return _error(411, "INVALID_ARGUMENT", "an upload needs a Content-Length header (the file's size); "
                                                   "a chunked body is not taken")
        size, most = request.content_length - prefix, getattr(limits, limit)
        if size > most:
            return _error(413, "INVALID_ARGUMENT", f"{size} bytes; the server takes {what} of at most {most} bytes "
                                                   f"({limit})")
        if size <= 0:
            raise InvalidSpec("body", f"the request body holds no bytes to upload; send {what}'s bytes")
        sha = request.query.get("sha256", "").strip().lower()
        if not _SHA256.fullmatch(sha):
            raise InvalidSpec("sha256", f"give the file's SHA-256 as 64 hex digits in ?sha256=, got "
                                        f"{echo(request.query.get('sha256', ''))} (the explorer's page computes it)")
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        return token, metadata, limits, size, sha

    async def _manifest(self, request: web.Request, size: int) -> list[pb.DatasetFile]:
        """The files' JSON list that starts a files upload's body: exactly ``size`` bytes, each read bounded by
        http_body_idle_timeout_seconds. The server checks the names, sizes and digests against the stream."""
        raw = bytearray()
        try:
            while len(raw) < size:
                block = await self._body_read(request, size - len(raw))
                if not block:
                    raise InvalidSpec("manifest", f"the body ended inside its {size}-byte files list")
                raw += block
        except _BodyIdle:
            raise InvalidSpec("body", f"the body sent nothing for {self.limits.http_body_idle_timeout_seconds:g} s "
                                      "(http_body_idle_timeout_seconds)") from None
        try:
            items = json.loads(bytes(raw))
        except (ValueError, UnicodeDecodeError, RecursionError):
            items = None
        if not isinstance(items, list) or not items:
            raise InvalidSpec("manifest", "the body must start with a JSON list of the files: "
                                          '[{"name": ..., "size": ..., "sha256": ...}, ...]')
        files = []
        for index, item in enumerate(items):
            ok = (isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("sha256"), str)
                  and isinstance(item.get("size"), int) and not isinstance(item.get("size"), bool))
            if not ok:
                raise InvalidSpec(f"manifest[{index}]", f"expected {{\"name\": str, \"size\": int, \"sha256\": "
                                                        f"str}}, got {echo(json.dumps(item))}")
            files.append(pb.DatasetFile(name=item["name"], size_bytes=item["size"], sha256=item["sha256"]))
        return files

    async def _upload_stream(self, request: web.Request, call, message, first, committed: int, size: int, limits):
        """Stream the rest of the body into a client-streaming upload ``call`` (UploadModel, UploadDataset) whose
        requests are ``message``: ``first`` (the header), then chunks of at most max_chunk_bytes from
        ``committed`` (what the server holds of an earlier, broken upload of the same bytes). -> the server's
        answer, or the 408 response of a body silent for http_body_idle_timeout_seconds (nothing kept)."""
        try:
            return await self._stream_upload(request, call, message, first, size, committed,
                                              min(limits.max_chunk_bytes, MESSAGE_BYTES // 2))
        except _BodyIdle:
            idle = self.limits.http_body_idle_timeout_seconds
            response = _error(UPLOAD_IDLE_STATUS, "DEADLINE_EXCEEDED", f"the upload's body sent nothing for {idle:g} s "
                              "(http_body_idle_timeout_seconds); nothing was kept, send the file again")
            response.force_close()
            return response
        finally:
            call.cancel()  # no-op once answered

    async def _stream_upload(self, request: web.Request, call, message, first, size: int, committed: int,
                             chunk: int):
        """``first``, then the body's bytes from ``committed`` in chunks of at most ``chunk``; the last with
        finish_write. A body that ends short or goes silent ends the stream with finish_write, so the server keeps
        nothing."""
        read, buffer = 0, bytearray()
        offset = committed
        try:
            await call.write(first)
            while read < size:
                block = await self._body_block(request)
                if not block:
                    break
                skip = max(0, min(len(block), committed - read))  # the server holds these already
                read += len(block)
                buffer += block[skip:]
                while len(buffer) >= chunk:
                    data, buffer = bytes(buffer[:chunk]), buffer[chunk:]
                    await call.write(_chunk(message, offset, data, offset + len(data) >= size))
                    offset += len(data)
            if read != size:
                await _abandon(call, message, offset)
                raise InvalidSpec("body", f"the body ended after {read} of the {size} bytes its Content-Length "
                                          "declares; nothing was kept")
            if buffer or offset < size or committed == size:
                await call.write(_chunk(message, offset, bytes(buffer), True))
            await call.done_writing()
            return await call
        except _BodyIdle:
            await _abandon(call, message, offset)
            raise
        except (grpc.RpcError, asyncio.InvalidStateError):  # the server answered early (a limit, a quota)
            try:
                await call
            except grpc.RpcError as err:
                raise from_rpc_error(err) from None
            raise

    async def _body_read(self, request: web.Request, most: int) -> bytes:
        """At most ``most`` bytes of the request body (b"" at its end), or _BodyIdle after
        http_body_idle_timeout_seconds of silence."""
        try:
            return await asyncio.wait_for(request.content.read(most), self.limits.http_body_idle_timeout_seconds)
        except TimeoutError:
            raise _BodyIdle() from None

    async def _body_block(self, request: web.Request) -> bytes:
        """The next bytes of the request body (b"" at its end), or _BodyIdle after http_body_idle_timeout_seconds
        of silence."""
        try:
            return await asyncio.wait_for(request.content.readany(), self.limits.http_body_idle_timeout_seconds)
        except TimeoutError:
            raise _BodyIdle() from None

    async def _json_body(self, request: web.Request) -> dict:
        """A JSON object body: at most JSON_BODY_BYTES, nested at most JSON_DEPTH deep, strict JSON (no NaN or
        Infinity), each read bounded by http_body_idle_timeout_seconds."""
        if request.content_length is not None and request.content_length > JSON_BODY_BYTES:
            raise InvalidSpec("body", f"{request.content_length} bytes; a JSON body is at most {JSON_BODY_BYTES}")
        raw = bytearray()
        try:
            while block := await self._body_block(request):
                raw += block
                if len(raw) > JSON_BODY_BYTES:
                    raise InvalidSpec("body", f"more than {JSON_BODY_BYTES} bytes; a JSON body is at most "
                                              f"{JSON_BODY_BYTES}")
        except _BodyIdle:
            raise InvalidSpec("body", f"the body sent nothing for {self.limits.http_body_idle_timeout_seconds:g} s "
                                      "(http_body_idle_timeout_seconds)") from None
        return _parse_json_object(bytes(raw))

    async def _grpc(self, call):
        try:
            return await call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def list_layers(self, request: web.Request) -> web.Response:
        client = self._client(request)
        layers = [layer_json(layer) async for layer in client.layers(request.match_info["sha"], page_size=1000)]
        return _json({"layers": layers})

    async def classes(self, request: web.Request) -> web.Response:
        await self._client(request).info()  # the same auth as every other page
        if self._class_names is None:
            from featureviz import zoo

            self._class_names = await asyncio.to_thread(zoo.imagenet_class_names)
        return _json({"names": self._class_names}, headers={"Cache-Control": "private, max-age=3600"})

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
        return _json({"jobs": jobs})

    def _describe(self, job: dict) -> dict:
        """Remember how a job with its whole spec reads (summary, image labels) for the jobs list."""
        if job["spec"].get("objective") is not None:
            self._described[job["id"]] = {key: job[key] for key in ("summary", "image_labels")}
            while len(self._described) > DESCRIBED_KEPT:
                self._described.popitem(last=False)
        return job

    async def create_job(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        unknown = sorted(set(body) - set(_JOB_KEYS))
        if unknown:
            raise InvalidSpec(_short(unknown[0]), f"unknown key; a job takes: {', '.join(_JOB_KEYS)}")
        objective = body.get("objective")
        if isinstance(objective, str):
            objective = parse_objective(objective)
        options = {key: body[key] for key in _JOB_OPTIONS if body.get(key) is not None}
        if "init_image" in options:  # JSON carries bytes as base64
            options["init_image"] = _base64(options["init_image"], "spec.init_image")
        try:
            spec = spec_to_proto(str(body.get("model", "")), objective, **options)
        except (TypeError, ValueError) as exc:
            raise InvalidSpec("spec", f"a value has the wrong type: {_short(exc)}") from None
        request_id = body.get("request_id") or uuid.uuid4().hex
        job = await self._client(request).submit(spec.model, spec=spec, request_id=str(request_id))
        return _json(self._describe(job_json(job)))

    async def get_job(self, request: web.Request) -> web.Response:
        client = self._client(request)
        job = await client.job(request.match_info["id"])
        out = self._describe(job_json(job))
        out["cli"] = await self._cli(client, request, job)
        return _json(out)

    async def cancel_job(self, request: web.Request) -> web.Response:
        return _json(job_json(await self._client(request).cancel(request.match_info["id"])))

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
        return _json(body, indent=2, headers={
            "Content-Disposition": f'attachment; filename="featureviz-{job.id[:12]}.json"'})

    # ------------------------------------------------------------------------------------------ atlases
    # Every call runs with the caller's token: ListAtlasUnits / GetAtlasUnit answer NOT_FOUND for another
    # tenant's atlas, so the gateway adds no check of its own and can miss none.

    async def list_atlases(self, request: web.Request) -> web.Response:
        """The tenant's atlas jobs (the newest 100), each with its options and progress."""
        client = self._client(request)
        names = {m.sha256: m.display_name async for m in client.models(page_size=1000)}
        atlases = []
        async for job in client.jobs(page_size=100):
            if not job.spec.HasField("atlas"):
                continue
            atlases.append(await self._atlas_json(client, job, names))
            if len(atlases) == 100:
                break
        return _json({"atlases": atlases})

    async def _atlas_json(self, client: AsyncClient, job: pb.Job, names: dict | None = None) -> dict:
        page = await client.atlas_page(job.id, page_size=1)
        sha = job.spec.model.removeprefix("models/")
        if names is None:
            names = {sha: (await self._model_ref(client, job))["display_name"]}
        return {"id": job.id, "state": state_name(job.state), "model": sha, "model_name": names.get(sha, ""),
                "create_time": job.create_time.ToJsonString() if job.HasField("create_time") else None,
                "end_time": job.end_time.ToJsonString() if job.HasField("end_time") else None,
                "options": atlas_options_json(job.spec), "progress": atlas_progress_json(page.progress),
                "error": job.error.message or None}

    async def create_atlas(self, request: web.Request) -> web.Response:
        """Start an atlas: ``{"model", "layers": [...], "op_types": [...], "min_depth", "max_depth", "channels",
        "dataset", "negative", "diversity", and the render options}`` (all but model optional)."""
        body = await self._json_body(request)
        unknown = sorted(set(body) - set(_ATLAS_KEYS))
        if unknown:
            raise InvalidSpec(_short(unknown[0]), f"unknown key; an atlas takes: {', '.join(_ATLAS_KEYS)}")
        select = {key: body[key] for key in _ATLAS_SELECT if body.get(key) not in (None, "", [])}
        for key in ("layers", "op_types"):
            if isinstance(select.get(key), str):
                select[key] = [name.strip() for name in select[key].split(",") if name.strip()]
        options = {key: body[key] for key in _ATLAS_RENDER if body.get(key) not in (None, "")}
        try:
            spec = atlas_job_spec(str(body.get("model", "")), **select, **options)
            if body.get("dataset"):
                spec.atlas.dataset = str(body["dataset"])
            if body.get("negative"):
                spec.atlas.negative = bool(body["negative"])
            if body.get("diversity"):
                spec.atlas.diversity = int(body["diversity"])
        except (TypeError, ValueError) as exc:
            raise InvalidSpec("spec", f"a value has the wrong type: {_short(exc)}") from None
        client = self._client(request)
        job = await client.submit(spec.model, spec=spec, request_id=str(body.get("request_id") or uuid.uuid4().hex))
        return _json(await self._atlas_json(client, job))

    async def get_atlas(self, request: web.Request) -> web.Response:
        client = self._client(request)
        job = await client.job(request.match_info["id"])
        if not job.spec.HasField("atlas"):
            return _error(404, "NOT_FOUND", f"job {_short(job.id)} is not an atlas")
        return _json(await self._atlas_json(client, job))

    async def atlas_units(self, request: web.Request) -> web.Response:
        """One page of an atlas's units (ListAtlasUnits): ``?layer=&page_size=&page_token=``, with the progress."""
        page_size = _ints(request.query.get("page_size", "0"), "page_size", 1)[0]
        page = await self._client(request).atlas_page(request.match_info["id"], layer=request.query.get("layer", ""),
                                                      page_size=page_size,
                                                      page_token=request.query.get("page_token", ""))
        return _json({"units": [atlas_unit_json(unit) for unit in page.units],
                      "next_page_token": page.next_page_token, "progress": atlas_progress_json(page.progress)})

    async def atlas_unit(self, request: web.Request) -> web.Response:
        """One unit (GetAtlasUnit's record) with the ``featureviz render`` command that renders it again."""
        client = self._client(request)
        job = await client.job(request.match_info["id"])
        image = await client.atlas_unit_image(job.id, int(request.match_info["index"]))
        model = await self._model_ref(client, job)
        name = model["display_name"]
        model_file = Path(name).name if name.lower().endswith(".onnx") else f"{model['sha256'][:12]}.onnx"
        host = request.url.host or "127.0.0.1"
        server = f"[{host}]:{self.grpc_port}" if ":" in host else f"{host}:{self.grpc_port}"
        out = atlas_unit_json(image.unit)
        out["cli"] = atlas_unit_cli(job.spec, image.unit, model_file=model_file, server=server, tls=self.tls)
        out["model"] = model["sha256"]
        out["dataset"] = job.spec.atlas.dataset
        return _json(out)

    async def atlas_unit_image(self, request: web.Request) -> web.Response:
        """A finished unit's PNG: ``?variant=render|negative|diversity&image=K`` (K: the diversity image)."""
        variant = request.query.get("variant", "render")
        if variant not in ATLAS_VARIANTS:
            raise InvalidSpec("variant", f"variant must be one of {', '.join(ATLAS_VARIANTS)}, got {echo(variant)}")
        image = _ints(request.query.get("image", "0"), "image", 1)[0]
        unit = await self._client(request).atlas_unit_image(request.match_info["id"], int(request.match_info["index"]),
                                                            variant=ATLAS_VARIANTS[variant], image=image)
        return web.Response(body=unit.png, content_type="image/png",
                            headers={"Cache-Control": "private, max-age=86400"})  # a stored unit never changes

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
        EventSource re-attaches where it left off (Last-Event-ID) after a dropped connection. A page that reads
        slower than the job renders gets the latest preview and progress, not a backlog of old ones."""
        from_seq = _from_seq(request.headers.get("Last-Event-ID") or request.query.get("from_seq") or "0")
        events = self._client(request).watch(request.match_info["id"], from_seq=from_seq, previews=True,
                                             reconnects=0)
        try:
            first = await anext(events)  # auth, NOT_FOUND and the watch cap answer as JSON errors, before the stream
        except BaseException:
            await events.aclose()
            raise
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no", **_SECURITY_HEADERS})
        await response.prepare(request)
        task = asyncio.current_task()
        self._streams.add(task)
        relay = _Relay(events, first)
        try:
            await relay.run(response)
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self._streams.discard(task)
            await relay.close()
        return response


class _Relay:
    """One SSE stream: a task reads the watch as fast as the server sends, into a short list the writer sends as
    fast as the page reads; a newer preview (progress, heartbeat) replaces an unsent older one, so a slow page
    gets the latest image and the memory per stream stays a few events."""

    _COALESCED = ("preview", "progress", "heartbeat")

    def __init__(self, events, first: pb.JobEvent):
        self._events = events
        self._pending: list[pb.JobEvent] = [first]
        self._more = asyncio.Event()
        self._ended = first.WhichOneof("event") == "result"
        self._failure: FeaturevizClientError | None = None
        self._reader: asyncio.Task | None = None if self._ended else asyncio.create_task(self._read())
        self.dropped = 0

    async def _read(self) -> None:
        try:
            async for event in self._events:
                kind = event.WhichOneof("event") or "heartbeat"
                if kind in self._COALESCED:
                    kept = [e for e in self._pending if (e.WhichOneof("event") or "heartbeat") != kind]
                    self.dropped += len(self._pending) - len(kept)
                    self._pending = kept
                self._pending.append(event)
                self._more.set()
                if kind == "result":
                    break
        except FeaturevizClientError as err:  # the watch broke mid-stream: the page is told, and re-attaches
            self._failure = err
        finally:
            self._ended = True
            self._more.set()

    async def run(self, response: web.StreamResponse) -> None:
        while True:
            while self._pending:
                event = self._pending.pop(0)
                kind, data = event_json(event)
                if kind == "heartbeat":
                    await response.write(b": heartbeat\n\n")
                    continue
                seq = f"id: {event.seq}\n" if kind != "snapshot" else ""
                await response.write(f"{seq}event: {kind}\ndata: {json_text(data)}\n\n".encode())
                if kind == "result":
                    return
            if self._ended:
                break
            self._more.clear()
            await self._more.wait()
        if self._failure is not None:
            await _write_quietly(response, f"event: failure\ndata: {json_text({'code': self._failure.code})}\n\n")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        await self._events.aclose()


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


def _parse_json_object(raw: bytes) -> dict:
    def reject(constant: str):
        raise ValueError(f"{constant} is not JSON")

    try:
        body = json.loads(raw, parse_constant=reject)
    except RecursionError:
        raise InvalidSpec("body", f"the JSON is nested too deeply; at most {JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidSpec("body", f"expected a JSON object (strict JSON: no NaN or Infinity): {_short(exc)}") from None
    if not isinstance(body, dict):
        raise InvalidSpec("body", f"expected a JSON object, got {_short(json.dumps(body))}")
    if _depth(body) > JSON_DEPTH:
        raise InvalidSpec("body", f"the JSON is nested too deeply; at most {JSON_DEPTH} levels")
    return body


def _depth(value) -> int:
    """How deeply lists and objects nest in ``value`` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= JSON_DEPTH:
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _ints(text: str, field: str, count: int) -> list[int]:
    """``count`` comma-separated non-negative integers (a box, a channel, k), or InvalidSpec naming the field."""
    parts = text.split(",")
    if len(parts) != count or not all(p.strip().isdigit() and len(p.strip()) <= 9 for p in parts):
        raise InvalidSpec(field, f"expected {count} comma-separated non-negative integer{'s' if count > 1 else ''}, "
                                 f"got {echo(text)}")
    return [int(p) for p in parts]


def _from_seq(text: str) -> int:
    """``from_seq`` / ``Last-Event-ID``: an event sequence number, 0 to 2^63-1."""
    text = text.strip()
    if not text.isdigit() or len(text) > 19 or int(text) > INT64_MAX:
        raise InvalidSpec("from_seq", f"must be an event sequence number from 0 to {INT64_MAX}, got "
                                      f"{echo(text)}")
    return int(text)


def _client_address(request: web.Request) -> str:
    return request.remote or "unknown"


def _chunk(message, offset: int, data: bytes, finish: bool):
    """An upload's chunk as ``message`` (UploadModelRequest, UploadDatasetRequest: both a header or a chunk)."""
    return message(chunk=pb.UploadChunk(write_offset=offset, data=data, finish_write=finish))


async def _abandon(call, message, offset: int) -> None:
    """End an upload stream so the server keeps nothing: finish_write short of the size is its SIZE_MISMATCH."""
    async def finish():
        await call.write(_chunk(message, offset, b"", True))
        await call.done_writing()
        await call

    try:
        await asyncio.wait_for(finish(), 10.0)
    except (grpc.RpcError, asyncio.InvalidStateError, TimeoutError):
        pass


def _preprocess(query) -> dict | None:
    """``?mean=R,G,B&std=R,G,B&bgr=1`` -> the upload's preprocess override (None: the importer's default)."""
    if not query.get("mean") and not query.get("std"):
        return None
    values = {}
    for key in ("mean", "std"):
        try:
            values[key] = [float(v) for v in query.get(key, "").split(",")]
        except ValueError:
            values[key] = [math.nan]
        if not all(math.isfinite(v) for v in values[key]):
            raise InvalidSpec(key, f"expected 1 or 3 comma-separated finite numbers, got {echo(query.get(key, ''))}")
    return {**values, "channel_order": "BGR" if query.get("bgr") in ("1", "true") else "RGB"}
