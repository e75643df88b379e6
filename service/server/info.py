"""InfoService: version, published limits, the job options (featureviz.options), the device, the worker (images per
step, models held, active slots), whether auth is on. Deprecated wire fields (``DEPRECATED_LIMITS``, the
``max_batch`` of ServerInfo and WorkerInfo) are filled here, from their replacements, for clients that read them."""

from __future__ import annotations

import dataclasses

from featureviz.codec import OBJECTIVE_KINDS
from featureviz.options import job_options
from featureviz.server.auth import TenantResolver
from featureviz.server.config import ServerConfig
from featureviz.server.errors import rpc_errors
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.v1 import featureviz_pb2_grpc as pb_grpc

__all__ = ["InfoServicer", "published_limits", "DEPRECATED_LIMITS", "with_deprecated_fields"]

# a deprecated pb.Limits field -> the field that replaced it (published with the same value)
DEPRECATED_LIMITS = {"max_batch": "max_images_per_job"}


def published_limits(limits, **extra) -> pb.Limits:
    """Every field of :class:`~featureviz.server.config.Limits` that the proto's ``Limits`` declares, by name (a
    limit added to both is published without touching this), plus ``extra`` values kept elsewhere in the config,
    and each deprecated field with its replacement's value."""
    declared = set(pb.Limits.DESCRIPTOR.fields_by_name)
    values = {f.name: getattr(limits, f.name) for f in dataclasses.fields(limits) if f.name in declared}
    values.update({old: values[new] for old, new in DEPRECATED_LIMITS.items() if new in values})
    return pb.Limits(**values, **extra)


def with_deprecated_fields(info: pb.WorkerInfo) -> pb.WorkerInfo:
    """``info`` with its deprecated ``max_batch`` filled from ``max_step_images`` (for clients that read the old
    name)."""
    info.max_batch = info.max_step_images
    return info


class InfoServicer(pb_grpc.InfoServiceServicer):
    def __init__(self, config: ServerConfig, auth: TenantResolver, worker):
        from featureviz import __version__

        self.auth = auth
        self.worker = worker
        self._info = pb.ServerInfo(
            version=__version__,
            api_version="v1",
            limits=published_limits(config.limits, upload_idle_timeout_seconds=config.upload_idle_timeout_seconds),
            device=worker.device(),
            max_step_images=worker.max_step_images,
            max_batch=worker.max_step_images,  # deprecated: the same value, for clients that read the old name
            progress_interval_seconds=config.progress_interval,
            max_progress_rate=config.max_progress_rate,
            auth_required=auth.required,
            objective_kinds=list(OBJECTIVE_KINDS),
            job_options=job_options(config.limits),  # every JobSpec option with this server's bounds
        )

    @rpc_errors
    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.ServerInfo:
        info = pb.ServerInfo()
        info.CopyFrom(self._info)
        info.tenant = self.auth.tenant(context)
        info.worker.CopyFrom(with_deprecated_fields(self.worker.info()))
        info.workers.extend(with_deprecated_fields(w) for w in self.worker.workers())
        return info
