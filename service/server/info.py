"""InfoService: version, published limits, the job options (featureviz.options), the device, the worker (max batch, models held, active slots), whether
auth is on."""

from __future__ import annotations

import dataclasses

from featureviz.codec import OBJECTIVE_KINDS
from featureviz.options import job_options
from featureviz.server.auth import TenantResolver
from featureviz.server.config import ServerConfig
from featureviz.server.errors import rpc_errors
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.v1 import featureviz_pb2_grpc as pb_grpc

__all__ = ["InfoServicer", "published_limits"]


def published_limits(limits, **extra) -> pb.Limits:
    """Every field of :class:`~featureviz.server.config.Limits` that the proto's ``Limits`` declares, by name (a
    limit added to both is published without touching this), plus ``extra`` values kept elsewhere in the config."""
    declared = set(pb.Limits.DESCRIPTOR.fields_by_name)
    values = {f.name: getattr(limits, f.name) for f in dataclasses.fields(limits) if f.name in declared}
    return pb.Limits(**values, **extra)


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
            max_batch=worker.max_batch,
            progress_interval_seconds=config.progress_interval,
            auth_required=auth.required,
            objective_kinds=list(OBJECTIVE_KINDS),
            job_options=job_options(config.limits),  # every JobSpec option with this server's bounds
        )

    @rpc_errors
    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.ServerInfo:
        info = pb.ServerInfo()
        info.CopyFrom(self._info)
        info.tenant = self.auth.tenant(context)
        info.worker.CopyFrom(self.worker.info())
        info.workers.extend(self.worker.workers())
        return info
