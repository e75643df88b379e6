"""Assemble the server: servicers, auth, health (Check and Watch) and reflection on one port.

    server, port = create_server(config)      # inside a running event loop; binds the port
    await server.start()                      # scheduler re-queues unfinished jobs, health SERVING
    ...
    await server.stop(grace=5)                # NOT_SERVING, new jobs UNAVAILABLE, running job finishes or re-queues

For embedding (the demo, tests): ``serve_in_background(config)`` runs all of it on its own event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc
from grpc_health.v1 import health
from grpc_health.v1 import health_pb2
from grpc_health.v1 import health_pb2_grpc

from featureviz.server.auth import BearerAuthInterceptor
from featureviz.server.auth import TenantResolver
from featureviz.server.config import ServerConfig
from featureviz.server.datasets import DatasetServicer
from featureviz.server.decoding import DecodeGuardInterceptor
from featureviz.server.info import InfoServicer
from featureviz.server.metrics import Metrics
from featureviz.server.jobs import JobServicer
from featureviz.server.loop import new_event_loop
from featureviz.server.models import ModelServicer
from featureviz.server.reflection import enable_reflection
from featureviz.server.scheduler import Scheduler
from featureviz.server.store import Store
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.v1 import featureviz_pb2_grpc as pb_grpc
from featureviz.worker import WorkerConfig
from featureviz.worker import local_worker

__all__ = ["FeaturevizServer", "create_server", "serve_in_background", "BackgroundServer", "SERVICE_NAMES"]

log = logging.getLogger("featureviz.server")

SERVICE_NAMES = tuple(pb.DESCRIPTOR.services_by_name[name].full_name
                      for name in ("ModelService", "JobService", "InfoService", "DatasetService"))


class FeaturevizServer:
    """The grpc.aio server plus the scheduler and store it owns."""

    def __init__(self, config: ServerConfig, grpc_server: grpc.aio.Server, store: Store, scheduler: Scheduler,
                 health_servicer: health.aio.HealthServicer, metrics: Metrics | None, web=None):
        self.config = config
        self.grpc_server = grpc_server
        self.store = store
        self.scheduler = scheduler
        self.health = health_servicer
        self.metrics = metrics
        self.metrics_port: int | None = None
        self.web = web  # featureviz.web.WebGateway when config.http_port is set
        self.jobs: JobServicer | None = None  # drained on stop
        self.http_port: int | None = None

    async def start(self) -> None:
        raise_descriptor_limit()  # open connections, gRPC, SQLite and model files share the process's descriptors
        if self.web is not None:  # first: a port in use fails the start before anything else runs
            self.http_port = await self.web.start()
        if self.metrics is not None:
            self.metrics_port = self.metrics.serve(self.config.host, self.config.metrics_port)
        self.scheduler.start()
        await self.grpc_server.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Stop within ``grace`` seconds (plus the render step in flight): the running job and the open calls
        (watch streams) share one deadline."""
        grace = self.config.grace_seconds if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.web is not None:
            await self.web.stop()
        self.scheduler.stop_accepting()  # before health says NOT_SERVING: no job is admitted after that
        await self.health.enter_graceful_shutdown()
        await asyncio.to_thread(self.scheduler.stop, grace)  # running job: finish or back to QUEUED
        if self.jobs is not None:  # watch streams: UNAVAILABLE now, not at the end of another grace period
            await self.jobs.drain(max(1.0, deadline - loop.time()))
        await self.grpc_server.stop(max(0.0, deadline - loop.time()))  # what is left of the grace, not another
        if self.metrics is not None:
            self.metrics.stop()
        self.store.close()

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


def raise_descriptor_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (the explorer keeps a reserve of it for the store)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError) as exc:  # not POSIX, or not allowed: keep the limit there is
        log.warning("could not raise the file descriptor limit: %s", exc)


def _worker_limits(config: ServerConfig) -> dict:
    """The Limits a worker applies itself (WorkerConfig keywords)."""
    limits = config.limits
    return dict(max_image_side=limits.max_image_side, max_dataset_image_side=limits.max_dataset_image_side,
                time_slice_steps=limits.time_slice_steps,
                max_job_memory_bytes=limits.max_job_memory_bytes, max_atlas_units=limits.max_atlas_units)


def create_server(config: ServerConfig, worker=None) -> tuple[FeaturevizServer, int]:
    """Build the server and bind ``config.host:config.port`` (0: a free port). Call inside a running loop.

    ``worker``: a ``featureviz.worker.api.Worker``; by default an in-process one (``featureviz.worker.local``,
    which imports torch) on ``config.device`` with ``config.max_step_images``, or the same in a child process with
    ``config.worker_process`` (``featureviz.worker.process``), or Ray actors with ``config.ray``."""
    loop = asyncio.get_running_loop()
    store = Store(config.store_dir)
    if worker is None and config.ray is not None:  # workers as Ray actors (featureviz[ray])
        from featureviz.worker.ray_pool import ray_pool

        worker = ray_pool(config.ray, WorkerConfig(device=config.device, max_step_images=config.max_step_images,
                                                   progress_interval=config.progress_interval,
                                                   max_progress_rate=config.max_progress_rate, threads=config.threads,
                                                   models_kept=config.model_cache_size,
                                                   **_worker_limits(config)),
                          model_source=store.read_model_file, workers=config.workers,
                          max_attempts=config.ray_max_attempts, timeout=config.ray_timeout_seconds)
    if worker is None:
        local = WorkerConfig(device=config.device, max_step_images=config.max_step_images,
                             progress_interval=config.progress_interval, max_progress_rate=config.max_progress_rate,
                             threads=config.threads, cache_dir=str(store.root / "cache"),
                             models_kept=config.model_cache_size,
                             **_worker_limits(config))
        if config.worker_process:  # the same worker in a child process (imports no torch here)
            from featureviz.worker.process import ProcessWorker

            worker = ProcessWorker(local, model_source=store.read_model_file, max_attempts=config.ray_max_attempts)
        else:
            worker = local_worker(local, model_source=store.read_model_file)  # bytes checked against their sha256
    scheduler = Scheduler(store, worker, loop=loop, finished_logs_kept=config.finished_logs_kept,
                          index_chunk_images=config.index_chunk_images,
                          max_indexes_per_tenant=config.limits.max_indexes_per_tenant)
    scheduler.max_match_k = config.limits.max_match_k  # exemplar matching (re-queued jobs' match terms)
    metrics = None
    if config.metrics_port is not None:
        def worker_info():
            return worker.info()

        metrics = Metrics(queue_depth=scheduler.queued, models_loaded=lambda: len(worker_info().models),
                          memory_allocated=lambda: worker_info().memory_allocated_bytes, workers=worker.workers)
        scheduler.metrics = metrics
    auth = TenantResolver(config.tokens, config.read_only)
    server = grpc.aio.server(
        interceptors=[BearerAuthInterceptor(auth, config.limits.max_failed_auth_per_minute),
                      DecodeGuardInterceptor(config.limits.max_objective_depth)],
        options=[("grpc.max_receive_message_length", config.limits.max_message_bytes),
                 ("grpc.max_send_message_length", config.limits.max_reply_bytes)],
    )
    models = ModelServicer(config, store, scheduler, auth, metrics)
    pb_grpc.add_ModelServiceServicer_to_server(models, server)
    pb_grpc.add_DatasetServiceServicer_to_server(DatasetServicer(config, store, auth, models), server)
    jobs = JobServicer(config, scheduler, auth)
    pb_grpc.add_JobServiceServicer_to_server(jobs, server)
    pb_grpc.add_InfoServiceServicer_to_server(InfoServicer(config, auth, worker), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, (*SERVICE_NAMES, health.SERVICE_NAME))  # grpc.reflection.v1 and v1alpha
    host = f"[{config.host}]" if ":" in config.host and not config.host.startswith("[") else config.host
    credentials = config.server_credentials()
    if credentials is None:
        port = server.add_insecure_port(f"{host}:{config.port}")
    else:
        port = server.add_secure_port(f"{host}:{config.port}", credentials)
    if port == 0:
        raise OSError(f"could not bind {config.host}:{config.port}")
    web = None
    if config.http_port is not None:  # the web explorer: a gateway over this server's gRPC API
        from featureviz.web import WebGateway

        web = WebGateway(config, server, grpc_port=port)
    running = FeaturevizServer(config, server, store, scheduler, health_servicer, metrics, web)
    running.jobs = jobs
    return running, port


class BackgroundServer:
    """A server on its own event loop thread. ``address`` is ``host:port``; ``stop()`` blocks until done.
    ``worker``: as for :func:`create_server` (tests pass a scripted one)."""

    def __init__(self, config: ServerConfig, worker=None):
        self.config = config
        self.worker = worker
        self.port = 0
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._loop = new_event_loop()  # uvloop's where installed, as featureviz serve's
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: FeaturevizServer | None = None
        self._thread = threading.Thread(target=self._run, name="featureviz-server", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def http_url(self) -> str | None:
        """The web explorer's address (``http://host:port/``), None without ``config.http_port``."""
        return None if self._server is None or self._server.web is None else self._server.web.url

    def start(self) -> "BackgroundServer":
        if self._thread.is_alive():
            return self
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._server, self.port = create_server(self.config, self.worker)
        await self._server.start()
        self.metrics_port = self._server.metrics_port
        self.http_port = self._server.http_port

    def stop(self, grace: float | None = None) -> None:
        if self._server is None or not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop)
        future.result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_background(config: ServerConfig, worker=None) -> BackgroundServer:
    """Start a server on a background thread and return once it listens. ``worker``: as for :func:`create_server`
    (None: the in-process one)."""
    return BackgroundServer(config, worker).start()
