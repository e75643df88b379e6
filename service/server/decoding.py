"""Requests protobuf cannot decode become INVALID_ARGUMENT, not UNKNOWN with a logged traceback.

grpc decodes a request before any servicer runs, so a message nested deeper than protobuf's decoder allows
(``Exceeded upb_DecodeOptions_MaxDepth``: about 50 levels of objectives) or malformed bytes would fail inside
grpc itself. This interceptor wraps every method's request deserializer: a failure yields a marker instead of
raising, and the method's behaviour answers the marker with the error (mapped in ``errors.py``), naming the
depth limit the server publishes.
"""

from __future__ import annotations

import inspect

import grpc

from featureviz.errors import InvalidSpec
from featureviz.server.errors import abort

__all__ = ["DecodeGuardInterceptor"]


class _Undecodable:
    """What a request that failed to decode becomes; the behaviour turns it into the error."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidSpec):
        self.error = error


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, max_objective_depth: int):
        self._depth = max_objective_depth
        # method -> (the handler the services answered, its guarded handler): made once per method, not per call
        # (the services answer the same handler object for a method every time; another object is guarded anew)
        self._made: dict[str, tuple[object, object]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        made = self._made.get(method)
        if made is not None and made[0] is handler:
            return made[1]
        guarded = _guarded(handler, method.rsplit("/", 1)[-1], self._depth)
        if len(self._made) < _METHODS_KEPT:  # the services' methods: a fixed, small set
            self._made[method] = (handler, guarded)
        return guarded


_METHODS_KEPT = 256


def _guarded(handler, method: str, depth: int):
    decode = handler.request_deserializer

    def deserialize(data: bytes):
        try:
            return decode(data)
        except Exception as exc:  # DecodeError, or whatever a decoder raises on bytes it cannot read
            if "MaxDepth" in str(exc) or "depth" in str(exc).lower():
                return _Undecodable(InvalidSpec(
                    "request", f"the {method} request nests messages deeper than protobuf can decode; objectives may "
                               f"nest at most {depth} levels (max_objective_depth)", reason="REQUEST_TOO_DEEP"))
            return _Undecodable(InvalidSpec("request", f"the {method} request is not a valid message "
                                                       f"({type(exc).__name__})", reason="MALFORMED_REQUEST"))

    if handler.request_streaming and handler.response_streaming:
        kind = "stream_stream"
    elif handler.request_streaming:
        kind = "stream_unary"
    elif handler.response_streaming:
        kind = "unary_stream"
    else:
        kind = "unary_unary"
    behaviour = getattr(handler, kind)
    asynchronous = inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)
    if not asynchronous or not hasattr(handler, "_replace"):
        return handler

    if handler.request_streaming:
        def requests(iterator, context):
            async def checked():
                async for request in iterator:
                    if isinstance(request, _Undecodable):
                        await abort(context, request.error)
                    yield request
            return checked()

        if inspect.isasyncgenfunction(behaviour):
            async def wrapped(iterator, context):
                async for reply in behaviour(requests(iterator, context), context):
                    yield reply
        else:
            async def wrapped(iterator, context):
                return await behaviour(requests(iterator, context), context)
    elif inspect.isasyncgenfunction(behaviour):
        async def wrapped(request, context):
            if isinstance(request, _Undecodable):
                await abort(context, request.error)
            async for reply in behaviour(request, context):
                yield reply
    else:
        async def wrapped(request, context):
            if isinstance(request, _Undecodable):
                await abort(context, request.error)
            return await behaviour(request, context)
    return handler._replace(request_deserializer=deserialize, **{kind: wrapped})
