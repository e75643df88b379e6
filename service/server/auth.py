"""Bearer-token auth: an aio interceptor rejects calls without a known token, so servicers never see auth.

The tenant comes from the token (``ServerConfig.tokens``), never from a client-sent header. Health and
reflection stay open (load balancers and grpcurl probe them without credentials). With no tokens
configured every caller is the tenant ``default`` (the config refuses that on a non-loopback address).
"""

from __future__ import annotations

import grpc

from featureviz.server.errors import Unauthenticated

__all__ = ["BearerAuthInterceptor", "TenantResolver", "DEFAULT_TENANT"]

DEFAULT_TENANT = "default"
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return None


class TenantResolver:
    """Maps a call to its tenant from the validated bearer token."""

    def __init__(self, tokens: dict[str, str]):
        self._tokens = dict(tokens)

    @property
    def required(self) -> bool:
        return bool(self._tokens)

    def tenant_of_metadata(self, metadata) -> str | None:
        if not self._tokens:
            return DEFAULT_TENANT
        return self._tokens.get(_bearer(metadata) or "")

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
        if self._resolver.tenant_of_metadata(handler_call_details.invocation_metadata) is not None:
            return handler
        return _denied(handler, "missing or invalid bearer token; send 'authorization: Bearer <token>'")


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with UNAUTHENTICATED."""

    async def abort_unary(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    serdes = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **serdes)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort_unary, **serdes)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **serdes)
    return grpc.unary_unary_rpc_method_handler(abort_unary, **serdes)
