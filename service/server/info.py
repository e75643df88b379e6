"""InfoService: version, published limits, the device, the worker (max batch, models held, active slots), whether
auth is on."""

from __future__ import annotations

from featureviz.client.convert import OBJECTIVE_KINDS
from featureviz.server.auth import TenantResolver
from featureviz.server.config import ServerConfig
from featureviz.server.errors import rpc_errors
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.v1 import featureviz_pb2_grpc as pb_grpc

__all__ = ["InfoServicer"]


class InfoServicer(pb_grpc.InfoServiceServicer):
    def __init__(self, config: ServerConfig, auth: TenantResolver, worker):
        from featureviz import __version__

        limits = config.limits
        self.auth = auth
        self.worker = worker
        self._info = pb.ServerInfo(
            version=__version__,
            api_version="v1",
            limits=pb.Limits(
                max_upload_bytes=limits.max_upload_bytes, max_chunk_bytes=limits.max_chunk_bytes,
                max_image_side=limits.max_image_side, max_steps=limits.max_steps, max_batch=limits.max_batch,
                max_queued_jobs_per_tenant=limits.max_queued_jobs_per_tenant,
                max_message_bytes=limits.max_message_bytes, max_objective_nodes=limits.max_objective_nodes,
                max_objective_depth=limits.max_objective_depth, min_image_side=limits.min_image_side,
                max_partial_upload_bytes=limits.max_partial_upload_bytes,
                partial_upload_ttl_seconds=limits.partial_upload_ttl_seconds,
                upload_idle_timeout_seconds=config.upload_idle_timeout_seconds,
                max_model_nodes=limits.max_model_nodes, max_activation_bytes=limits.max_activation_bytes,
            ),
            device=worker.device(),
            max_batch=worker.max_batch,
            progress_interval_seconds=config.progress_interval,
            auth_required=auth.required,
            objective_kinds=list(OBJECTIVE_KINDS),
        )

    @rpc_errors
    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.ServerInfo:
        info = pb.ServerInfo()
        info.CopyFrom(self._info)
        info.tenant = self.auth.tenant(context)
        info.worker.CopyFrom(self.worker.info())
        info.workers.extend(self.worker.workers())
        return info
