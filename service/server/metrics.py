"""Prometheus metrics (text format over HTTP on ``--metrics-port``): jobs by outcome, queue and run seconds,
step seconds, images per device step, device step seconds, uploads by outcome, queue depth, models in memory,
CUDA memory (the last two as the worker reports them); per worker (label ``worker``): device steps, their images,
active slots, models held, whether it is up. One registry per server, so
several servers in one process (tests, the demo) do not share counters."""

from __future__ import annotations

__all__ = ["Metrics"]

_SECONDS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
_IMAGES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_STEP_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, *, queue_depth, models_loaded, memory_allocated=lambda: 0.0, workers=lambda: []):
        from prometheus_client import CollectorRegistry
        from prometheus_client import Counter
        from prometheus_client import Gauge
        from prometheus_client import Histogram

        self.registry = registry = CollectorRegistry()
        self.jobs = Counter("featureviz_jobs", "Jobs that ended, by outcome (succeeded, failed, cancelled, "
                                               "requeued on shutdown)", ["outcome"], registry=registry)
        self.failures = Counter("featureviz_job_failures", "Failed jobs by reason", ["reason"], registry=registry)
        self.uploads = Counter("featureviz_uploads", "Model uploads by outcome (stored, deduplicated, rejected)",
                               ["outcome"], registry=registry)
        self.queue_seconds = Histogram("featureviz_job_queue_seconds", "Seconds from create to start",
                                       buckets=_SECONDS, registry=registry)
        self.run_seconds = Histogram("featureviz_job_run_seconds", "Seconds a job ran", buckets=_SECONDS,
                                     registry=registry)
        self.step_seconds = Histogram("featureviz_step_seconds", "Seconds per optimisation step",
                                      buckets=_STEP_SECONDS, registry=registry)
        self.batch_images = Histogram("featureviz_batch_images", "Images in one device step (all its jobs)",
                                      buckets=_IMAGES, registry=registry)
        self.device_step_seconds = Histogram("featureviz_device_step_seconds", "Seconds of one device step (one "
                                             "forward and backward of a batch)", buckets=_STEP_SECONDS,
                                             registry=registry)
        self.atlas_units = Counter("featureviz_atlas_units", "Atlas units finished, by source (rendered; cached: "
                                   "served from the unit store, by an atlas or an interactive job)", ["source"],
                                   registry=registry)
        self.worker_steps = Counter("featureviz_worker_device_steps", "Device steps run, per worker", ["worker"],
                                    registry=registry)
        self.worker_images = Counter("featureviz_worker_step_images", "Images in the device steps, per worker",
                                     ["worker"], registry=registry)
        registry.register(_WorkerCollector(workers))
        registry.register(_PhaseCollector())
        Gauge("featureviz_queue_depth", "Jobs waiting for the device", registry=registry).set_function(queue_depth)
        Gauge("featureviz_models_loaded", "Imported models held in memory",
              registry=registry).set_function(models_loaded)
        Gauge("featureviz_cuda_memory_allocated_bytes", "torch.cuda.memory_allocated() of the worker (0 without "
              "CUDA)", registry=registry).set_function(memory_allocated)
        self._http = None

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (``/metrics``) on its own thread; returns the bound port."""
        from prometheus_client import start_http_server

        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None



class _WorkerCollector:
    """Gauges per worker (``workers()`` -> pb.WorkerInfo list), read at each scrape."""

    def __init__(self, workers):
        self._workers = workers

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        slots = GaugeMetricFamily("featureviz_worker_active_slots", "Jobs in the worker's device steps now",
                                  labels=["worker", "node"])
        models = GaugeMetricFamily("featureviz_worker_models", "Models the worker holds in memory",
                                   labels=["worker", "node"])
        up = GaugeMetricFamily("featureviz_worker_up", "1 when the worker answers (0 while a Ray actor restarts)",
                               labels=["worker", "node"])
        try:
            workers = list(self._workers())
        except Exception:  # a scrape must not fail because a worker is away
            workers = []
        for info in workers:
            labels = [info.id or "local", info.node]
            slots.add_metric(labels, info.active_slots)
            models.add_metric(labels, len(info.models))
            up.add_metric(labels, 1.0 if info.up else 0.0)
        return [slots, models, up]


class _PhaseCollector:
    """The cost counters (:mod:`featureviz.phases`, on with ``FEATUREVIZ_PHASES=1``): seconds and entries per
    phase of the server's (and the in-process worker's) work outside the device steps."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        from featureviz import phases

        if not phases.enabled:
            return []
        seconds = CounterMetricFamily("featureviz_phase_seconds", "Self time of each phase of the server's work "
                                      "(FEATUREVIZ_PHASES=1)", labels=["phase"])
        entries = CounterMetricFamily("featureviz_phase_entries", "Times each phase was entered", labels=["phase"])
        for name, (secs, count) in phases.snapshot().items():
            seconds.add_metric([name], secs)
            entries.add_metric([name], count)
        return [seconds, entries]
