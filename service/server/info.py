"""InfoService: version, published limits, the device, whether auth is on."""

from __future__ import annotations

from featureviz.client.convert import OBJECTIVE_KINDS
from featureviz.server.auth import TenantResolver
from featureviz.server.config import ServerConfig
from featureviz.server.errors import rpc_errors
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.v1 import featureviz_pb2_grpc as pb_grpc

__all__ = ["InfoServicer", "describe_device"]


def describe_device(requested: str | None) -> pb.Device:
    """The device the scheduler renders on (blocking: imports torch)."""
    import os

    import torch

    kind = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    kernels = os.environ.get("FEATUREVIZ_KERNELS", "auto")
    if kernels == "auto":
        kernels = "triton" if kind.startswith("cuda") else "torch"
    if kind.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(kind))
        return pb.Device(kind="cuda", name=props.name, memory_bytes=props.total_memory, kernels=kernels)
    threads = torch.get_num_threads()
    return pb.Device(kind="cpu", name=f"{os.cpu_count()} CPU cores, {threads} torch thread{'s' * (threads != 1)}",
                     kernels=kernels)


class InfoServicer(pb_grpc.InfoServiceServicer):
    def __init__(self, config: ServerConfig, auth: TenantResolver, device: pb.Device):
        from featureviz import __version__

        limits = config.limits
        self.auth = auth
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
            device=device,
            auth_required=auth.required,
            objective_kinds=list(OBJECTIVE_KINDS),
        )

    @rpc_errors
    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.ServerInfo:
        info = pb.ServerInfo()
        info.CopyFrom(self._info)
        info.tenant = self.auth.tenant(context)
        return info
