"""Bearer-token auth: an aio interceptor rejects calls without a known token, so servicers never see auth.

The tenant comes from the token (``ServerConfig.tokens``), never from a client-sent header. Health and
reflection stay open (load balancers and grpcurl probe them without credentials). With no tokens
configured every caller is the tenant ``default`` (the config refuses that on a non-loopback address).
A read-only token (``ServerConfig.read_only``) gets PERMISSION_DENIED on the RPCs in :data:`WRITE_METHODS`.
"""

from __future__ import annotations

import grpc

from featureviz.server.errors import PermissionDenied
from featureviz.server.errors import Unauthenticated
from featureviz.server.errors import abort
from featureviz.v1 import featureviz_pb2 as pb

__all__ = ["BearerAuthInterceptor", "TenantResolver", "DEFAULT_TENANT", "WRITE_METHODS"]

DEFAULT_TENANT = "default"
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _methods(service: str, *names: str) -> frozenset[str]:
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    return frozenset(f"/{descriptor.full_name}/{descriptor.methods_by_name[name].name}" for name in names)


# the RPCs that change state: a rename in the .proto fails here, at import, not silently at run time
WRITE_METHODS = (_methods("ModelService", "UploadModel", "DeleteModel")
                 | _methods("JobService", "CreateJob", "CreateAndWatchJob", "CancelJob"))


def _bearer(metadata) -> str | None:
    """The token of an ``authorization: Bearer TOKEN`` header; the scheme is case-insensitive (RFC 7235)."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class TenantResolver:
    """Maps a call to its tenant from the validated bearer token."""

    def __init__(self, tokens: dict[str, str], read_only: frozenset[str] = frozenset()):
        self._tokens = dict(tokens)
        self._read_only = frozenset(read_only)

    @property
    def required(self) -> bool:
        return bool(self._tokens)

    def tenant_of_metadata(self, metadata) -> str | None:
        if not self._tokens:
            return DEFAULT_TENANT
        return self._tokens.get(_bearer(metadata) or "")

    def may_write(self, metadata) -> bool:
        return _bearer(metadata) not in self._read_only

    def tenant(self, context: grpc.aio.ServicerContext) -> str:
        tenant = self.tenant_of_metadata(context.invocation_metadata())
        if tenant is None:  # the interceptor stops these first; kept for servers built without it
            raise Unauthenticated("missing or invalid bearer token")
        return tenant


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, resolver: TenantResolver):
        self._resolver = resolver

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not self._resolver.required or handler_call_details.method.startswith(_OPEN_PREFIXES):
            return handler
        metadata = handler_call_details.invocation_metadata
        if self._resolver.tenant_of_metadata(metadata) is None:
            return _denied(handler, Unauthenticated("missing or invalid bearer token; send 'authorization: Bearer "
                                                    "<token>'"))
        method = handler_call_details.method
        if method in WRITE_METHODS and not self._resolver.may_write(metadata):
            return _denied(handler, PermissionDenied(f"this token is read-only; {method.rsplit('/', 1)[-1]} changes "
                                                     "state and needs a read-write token", reason="READ_ONLY_TOKEN"))
        return handler


def _denied(handler: grpc.RpcMethodHandler, error: Exception) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that ends the call with ``error``'s status, through the one error
    map (:mod:`featureviz.server.errors`: code, ErrorInfo reason, capped message)."""

    async def abort_unary(request_or_iterator, context):
        await abort(context, error)

    async def abort_stream(request_or_iterator, context):
        await abort(context, error)
        yield  # pragma: no cover - makes this an async generator

    serdes = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **serdes)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort_unary, **serdes)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **serdes)
    return grpc.unary_unary_rpc_method_handler(abort_unary, **serdes)
