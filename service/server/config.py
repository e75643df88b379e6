"""Server configuration: where the store lives, the limits published to clients, and the bearer tokens."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from featureviz.errors import InvalidSpec
from featureviz.hosts import LOOPBACK_HOSTS

__all__ = ["Limits", "ServerConfig", "parse_tokens", "LOOPBACK_HOSTS"]

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Published through InfoService.GetServerInfo; requests over a limit are rejected before any compute."""

    max_upload_bytes: int = 1024 * MiB
    max_chunk_bytes: int = 1 * MiB
    max_image_side: int = 1024
    # imports: refused from the file's shapes before any conversion work (featureviz.importer.limits)
    max_model_nodes: int = 20_000
    max_activation_bytes: int = 4 << 30  # every tensor of one image at the model's default size
    max_steps: int = 10_000
    max_images_per_job: int = 64  # a job's batch at most (published also as the deprecated Limits.max_batch)
    max_queued_jobs_per_tenant: int = 32
    # requests: uploads are chunked, so they stay small; replies: a finished job carries its PNG batch
    max_message_bytes: int = 8 * MiB
    max_reply_bytes: int = 64 * MiB
    max_page_size: int = 1000
    default_page_size: int = 100
    # an objective is a tree: nodes cost compute every step, and deep nesting overflows decoders
    max_objective_nodes: int = 512
    max_objective_depth: int = 16
    min_image_side: int = 8  # the engine's smallest render side
    # unfinished uploads kept for resuming: bytes per tenant, and how long one may wait for its next chunk
    max_partial_upload_bytes: int = 2048 * MiB
    partial_upload_ttl_seconds: int = 24 * 3600
    # fairness: a tenant's queued + running work in images x steps (64 images x 10,000 steps fits once), and the
    # steps a running job takes before it yields its place to a waiting job (state kept: same bytes as alone)
    max_image_steps_per_tenant: int = 640_000
    time_slice_steps: int = 64
    max_job_memory_bytes: int = 8 << 30  # a job's estimated working memory (CPU or GPU) above this is refused
    # storage per tenant
    max_models_per_tenant: int = 64
    max_model_bytes_per_tenant: int = 8192 * MiB
    max_watches_per_tenant: int = 64  # open WatchJob / CreateAndWatchJob streams (the explorer's SSE too)
    min_lr: float = 1e-6
    max_lr: float = 10.0
    max_failed_auth_per_minute: int = 20  # per client address, gRPC and HTTP
    max_concurrent_uploads_per_tenant: int = 4
    # the web explorer's HTTP side
    http_header_timeout_seconds: float = 10.0
    max_http_connections_per_client: int = 64
    http_body_idle_timeout_seconds: float = 30.0
    session_ttl_seconds: int = 12 * 3600
    # the import of an upload runs in a separate process (featureviz.importer.isolated): its bounds
    import_timeout_seconds: float = 600.0
    import_memory_bytes: int = 16 << 30
    max_model_name_chars: int = 4096  # featureviz.importer.names.MAX_NAME_CHARS (a test checks they agree)
    # datasets (featureviz.datasets): per set, from the header and the archive's directory, then on the bytes
    # actually unpacked; an image over the side or byte limit is skipped (the report names it), not the set
    max_dataset_images: int = 20_000
    max_dataset_bytes: int = 2048 * MiB
    max_dataset_image_side: int = 8192  # read from the header, before any decoding
    max_dataset_image_bytes: int = 64 * MiB
    max_archive_members: int = 50_000  # entries of a zip or tar, directories included
    max_compression_ratio: int = 200  # unpacked / packed bytes, per zip member and per archive
    max_datasets_per_tenant: int = 64
    # exemplar indexes (the exemplar_index job, featureviz.engine.exemplars): examples kept per channel and order,
    # images per forward of the pass, and finished indexes a tenant keeps (the least recently used go first)
    max_exemplar_k: int = 100  # also featureviz.engine.exemplars.MAX_K, the engine's own bound
    max_index_batch: int = 256
    max_indexes_per_tenant: int = 64
    # atlases (the atlas job): units (layers x channels) of one atlas, and a tenant's unfinished atlases
    max_atlas_units: int = 50_000
    max_atlases_per_tenant: int = 4
    # learned priors (issue 25: JobSpec.prior_dataset, the prior:DATASET term): a set needs this many images
    # (featureviz.engine.priors.MIN_IMAGES is the engine's own floor; a server may ask for more, not fewer)
    min_prior_images: int = 8
    # --- generator (issue 25): a generator's latent vector (JobSpec.generator), at most this long
    max_latent_size: int = 4096
    # exemplar matching (the objective's match terms): examples per term at most
    max_match_k: int = 16
    max_atlas_diversity: int = 8  # AtlasSpec.diversity: images of one unit's diversity set (one batch render)


@dataclass
class ServerConfig:
    """Everything ``create_server`` needs. ``tokens`` maps a bearer token to its tenant; empty: no auth.
    ``read_only``: tokens among them that may read (get, list, watch, layers, info) but not upload, submit,
    cancel or delete."""

    store_dir: str | os.PathLike
    host: str = "127.0.0.1"
    port: int = 0
    tokens: dict[str, str] = field(default_factory=dict)
    read_only: frozenset[str] = frozenset()
    allow_insecure_remote: bool = False  # listen on a non-loopback address without auth
    limits: Limits = field(default_factory=Limits)
    heartbeat_seconds: float = 10.0
    device: str | None = None  # "cuda", "cpu" or None (cuda when available)
    max_step_images: int | None = None  # most images in one device step (None: the device's default; 1: one job
    # at a time)
    progress_interval: float = 0.25  # at most one progress event per job every so many seconds, plus the last step
    max_progress_rate: float = 256.0  # ... and at most so many a second from a worker over all its jobs (0: no bound)
    threads: int | None = None  # torch CPU threads of the worker (None: torch's default)
    grace_seconds: float = 5.0  # on stop: how long a running job may finish before it is re-queued
    tls_cert: str | os.PathLike | None = None  # PEM certificate chain: serve TLS instead of plaintext
    tls_key: str | os.PathLike | None = None  # PEM private key of tls_cert
    tls_client_ca: str | os.PathLike | None = None  # PEM CA: require client certificates signed by it (mTLS)
    metrics_port: int | None = None  # Prometheus /metrics on this port (0: a free one; None: off), same host
    model_cache_size: int = 4  # imported models kept in memory
    finished_logs_kept: int = 256  # event logs of finished jobs kept in memory for re-attaching watchers
    upload_idle_timeout_seconds: float = 60.0  # an upload stream silent this long is ended and its lock released
    http_port: int | None = None  # the web explorer (featureviz.web) on this port (0: a free one; None: off)
    http_host: str | None = None  # its address (None: the same as host)
    ray: str | None = None  # workers as Ray actors: "auto" (a local Ray on loopback) or a cluster ADDRESS; None: embedded
    workers: int | None = None  # with ray: that many CPU worker actors (None: one per GPU of the cluster)
    ray_max_attempts: int = 3  # with ray or worker_process: a job whose worker dies this many times ends FAILED
    # (WORKER_LOST)
    worker_process: bool = False  # the local worker in a child process (featureviz.worker.process): the device loop
    # off the server's GIL; False: in the server's process
    ray_timeout_seconds: float = 30.0  # with ray ADDRESS: joining the cluster takes at most this long, else error
    index_chunk_images: int = 256  # an index pass saves its state after every so many images (rounded up to a
    # multiple of its batch): what a killed pass resumes from

    def __post_init__(self) -> None:
        self.store_dir = Path(self.store_dir)
        self.read_only = frozenset(self.read_only)
        unknown = sorted(self.read_only - set(self.tokens))
        if unknown:
            raise InvalidSpec("read_only", f"{len(unknown)} read-only token(s) are not among the tokens")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidSpec("tls_key", "give both the TLS certificate and its private key, or neither")
        if not self.ray_timeout_seconds > 0:
            raise InvalidSpec("ray_timeout", f"must be > 0 seconds, got {self.ray_timeout_seconds}")
        if self.worker_process and self.ray is not None:
            raise InvalidSpec("worker_process", "the workers are either Ray actors (ray) or one child process "
                                                "(worker_process), not both")
        if not self.index_chunk_images >= 1:
            raise InvalidSpec("index_chunk_images", f"must be >= 1, got {self.index_chunk_images}")
        if not self.upload_idle_timeout_seconds > 0:
            raise InvalidSpec("upload_idle_timeout", f"must be > 0 seconds, got {self.upload_idle_timeout_seconds}")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidSpec("tls_client_ca", "client certificates (mTLS) need TLS: give tls_cert and tls_key")
        authenticated = bool(self.tokens) or self.tls_client_ca is not None
        if not authenticated and self.host not in LOOPBACK_HOSTS and not self.allow_insecure_remote:
            raise InvalidSpec(
                "host",
                f"refusing to listen on {self.host!r} without auth; give bearer tokens "
                "(--token-file or FEATUREVIZ_TOKENS) or client certificates (--tls-client-ca), "
                "or pass --allow-insecure-remote",
            )
        if self.http_port is not None:
            self._check_http(authenticated)

    def _check_http(self, authenticated: bool) -> None:
        """The web explorer has the gRPC side's auth (tokens; client certificates over HTTPS), so the same rule
        holds for its own address."""
        host = self.http_host or self.host
        if not authenticated and host not in LOOPBACK_HOSTS and not self.allow_insecure_remote:
            raise InvalidSpec("http_host", f"refusing to serve the web explorer on {host!r} without auth; give "
                                           "bearer tokens (--token-file or FEATUREVIZ_TOKENS) or client certificates "
                                           "(--tls-client-ca), or pass --allow-insecure-remote")

    def server_credentials(self):
        """grpc.ServerCredentials for TLS (mTLS with ``tls_client_ca``), or None for plaintext."""
        if self.tls_cert is None:
            return None
        import grpc

        def read(path) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise InvalidSpec("tls", f"cannot read {path}: {exc.strerror}") from exc

        client_ca = read(self.tls_client_ca) if self.tls_client_ca is not None else None
        return grpc.ssl_server_credentials([(read(self.tls_key), read(self.tls_cert))],
                                           root_certificates=client_ca, require_client_auth=client_ca is not None)

    def replace(self, **changes) -> "ServerConfig":
        return dataclasses.replace(self, **changes)


SCOPES = ("write", "read")  # write (the default) may also read


def parse_tokens(text: str) -> tuple[dict[str, str], frozenset[str]]:
    """Token table -> ({token: tenant}, read-only tokens).

    ``"tok1=tenant-a,tok2=tenant-b read"`` or one ``TOKEN TENANT [SCOPE]`` / ``TOKEN=TENANT [SCOPE]`` per line;
    SCOPE is ``write`` (the default: everything) or ``read`` (get, list, watch, layers and info only). The
    secret itself never appears in an error message.
    """
    tokens: dict[str, str] = {}
    read_only: set[str] = set()
    for number, raw in enumerate(text.replace(",", "\n").splitlines(), 1):
        item = raw.split("#", 1)[0].strip()
        if not item:
            continue
        fields = item.replace("=", " ", 1).split()
        if len(fields) not in (2, 3):
            raise InvalidSpec("tokens", f"entry {number}: expected 'TOKEN TENANT [read|write]' or "
                                        f"'TOKEN=TENANT [read|write]', got {len(fields)} field(s)")
        token, tenant, scope = fields[0], fields[1], fields[2] if len(fields) == 3 else "write"
        if scope not in SCOPES:
            raise InvalidSpec("tokens", f"entry {number} (tenant {tenant!r}): scope must be read or write, "
                                        f"got {scope!r}")
        tokens[token] = tenant
        read_only.discard(token)
        if scope == "read":
            read_only.add(token)
    return tokens, frozenset(read_only)
