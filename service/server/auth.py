"""Bearer-token auth: an aio interceptor rejects calls without a known token, so servicers never see auth.

The tenant comes from the token (``ServerConfig.tokens``), never from a client-sent header. Health and
reflection stay open (load balancers and grpcurl probe them without credentials). With no tokens
configured every caller is the tenant ``default`` (the config refuses that on a non-loopback address).
A read-only token (``ServerConfig.read_only``) gets PERMISSION_DENIED on the RPCs in :data:`WRITE_METHODS`.
Failed sign-ins are throttled per client address (:class:`BearerAuthInterceptor`).
"""

from __future__ import annotations

import functools
import math

import grpc

from featureviz.ratelimit import FailureThrottle
from featureviz.ratelimit import client_address
from featureviz.server.errors import PermissionDenied
from featureviz.server.errors import SignInThrottled
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
                 | _methods("JobService", "CreateJob", "CreateAndWatchJob", "CancelJob")
                 | _methods("DatasetService", "UploadDataset", "DeleteDataset"))


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
    """Auth, and the failed sign-in throttle: a client address (not the web gateway's ``unix:`` socket, which
    throttles per HTTP client itself) that sent ``max_failed_per_minute`` missing or unknown tokens within a minute
    gets RESOURCE_EXHAUSTED (SIGN_IN_THROTTLED, with RetryInfo) for every call, a valid token too, until the oldest
    of those failures is a minute old. RESOURCE_EXHAUSTED rather than UNAUTHENTICATED: the token may be right, the
    address is over a rate (serving conventions: a quota, with the retry time); UNAUTHENTICATED would tell the
    holder of a valid token that it is wrong."""

    def __init__(self, resolver: TenantResolver, max_failed_per_minute: int = 20):
        self._resolver = resolver
        self._throttle = FailureThrottle(max_failed_per_minute)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not self._resolver.required or handler_call_details.method.startswith(_OPEN_PREFIXES):
            return handler
        metadata = handler_call_details.invocation_metadata
        method = handler_call_details.method
        error = None
        known = self._resolver.tenant_of_metadata(metadata) is not None
        if not known:
            error = Unauthenticated("missing or invalid bearer token; send 'authorization: Bearer <token>'")
        elif method in WRITE_METHODS and not self._resolver.may_write(metadata):
            error = PermissionDenied(f"this token is read-only; {method.rsplit('/', 1)[-1]} changes state and needs "
                                     "a read-write token", reason="READ_ONLY_TOKEN")
        if error is None and not len(self._throttle):  # no address is throttled: the call goes on as it is
            return handler
        return _guarded(handler, functools.partial(self._gate, error=error, failed=not known))

    async def _gate(self, context: grpc.aio.ServicerContext, *, error: Exception | None, failed: bool) -> None:
        """At the call (the peer is known only there): refuse a throttled address, count a failed sign-in, and
        end the call with ``error`` if there is one."""
        peer = client_address(context.peer() or "")
        if not peer.startswith(("unix:", "unix-abstract:")):  # the web gateway's socket: it throttles per HTTP client
            wait = self._throttle.retry_after(peer)
            if wait > 0:
                limit = self._throttle.max_per_minute
                error = SignInThrottled(f"too many failed sign-ins from this address: {limit} within a minute, the "
                                        f"limit (max_failed_auth_per_minute = {limit}); retry in {math.ceil(wait)} s",
                                        retry_seconds=wait)
            elif failed:
                self._throttle.failed(peer)
        if error is not None:
            await abort(context, error)


def _guarded(handler: grpc.RpcMethodHandler, gate) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that first awaits ``gate(context)`` (which may end the call with
    a status, through the one error map :mod:`featureviz.server.errors`), then runs ``handler``'s behaviour."""
    serdes = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    behavior = (handler.stream_stream or handler.stream_unary or handler.unary_stream or handler.unary_unary)

    async def unary(request_or_iterator, context):
        await gate(context)
        return await behavior(request_or_iterator, context)

    async def stream(request_or_iterator, context):
        await gate(context)
        result = behavior(request_or_iterator, context)
        if hasattr(result, "__aiter__"):
            try:
                async for item in result:
                    yield item
            finally:  # a cancelled call ends the servicer's stream now (its finally blocks free its slots)
                await result.aclose()
        else:  # a behaviour that writes with context.write
            await result

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, **serdes)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **serdes)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, **serdes)
    return grpc.unary_unary_rpc_method_handler(unary, **serdes)
