"""The one mapping from featureviz errors to gRPC status codes with google.rpc details.

    FeaturevizError          -> its code below, + ErrorInfo(reason, domain="featureviz")
     +-- InvalidSpec         -> INVALID_ARGUMENT   + BadRequest(field_violations=[field, description])
     +-- ModelImportError    -> INVALID_ARGUMENT
     +-- NotFound            -> NOT_FOUND
     +-- FailedPrecondition  -> FAILED_PRECONDITION
     +-- ResourceExhausted   -> RESOURCE_EXHAUSTED + QuotaFailure, RetryInfo (5 s, or its retry_seconds)
     |    +-- SignInThrottled   (too many failed sign-ins from one address: the auth interceptor)
     +-- Cancelled           -> CANCELLED
     +-- Unavailable         -> UNAVAILABLE        (server draining)
     +-- Unauthenticated     -> UNAUTHENTICATED    (no or an unknown bearer token: the auth interceptor)
     +-- PermissionDenied    -> PERMISSION_DENIED  (a read-only token on a state-changing RPC: the auth interceptor)
     +-- Aborted             -> ABORTED            (an upload stream idle too long: resume)
    anything else            -> INTERNAL, traceback logged, never sent

Every text sent back is capped (:data:`MAX_TEXT_CHARS`): client values are quoted through
:func:`featureviz.errors.echo` (100 characters) where messages are built, and this map cuts whatever is
still too long, so an error always fits the default 8 KB metadata limit of a gRPC client.

Servicer methods are wrapped with :func:`rpc_errors`, so they only raise; admission errors become the RPC's
status. Errors while a job runs become a :class:`featureviz.v1.JobError` through :func:`job_error`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2
from google.rpc import error_details_pb2
from google.rpc import status_pb2
from grpc_status import rpc_status

from featureviz.errors import Cancelled
from featureviz.errors import FailedPrecondition
from featureviz.errors import FeaturevizError
from featureviz.errors import InvalidSpec
from featureviz.errors import ModelImportError
from featureviz.errors import NotFound
from featureviz.errors import ResourceExhausted
from featureviz.v1 import featureviz_pb2 as pb

__all__ = ["Unavailable", "Unauthenticated", "PermissionDenied", "Aborted", "SignInThrottled", "status_code",
           "to_status", "rpc_errors", "job_error", "abort", "cap", "DOMAIN"]

log = logging.getLogger("featureviz.server")
DOMAIN = "featureviz"
MAX_TEXT_CHARS = 1000  # a status message or a detail's description, at most


def cap(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis (the safety net behind ``echo``)."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


class Unavailable(FeaturevizError):
    reason = "UNAVAILABLE"


class Unauthenticated(FeaturevizError):
    reason = "UNAUTHENTICATED"


class PermissionDenied(FeaturevizError):
    """A known caller whose token does not allow this RPC."""

    reason = "PERMISSION_DENIED"


class SignInThrottled(ResourceExhausted):
    """Too many failed sign-ins from one client address: refused until ``retry_seconds`` pass (RetryInfo)."""

    reason = "SIGN_IN_THROTTLED"

    def __init__(self, message: str, *, retry_seconds: float):
        super().__init__(message)
        self.retry_seconds = retry_seconds


class Aborted(FeaturevizError):
    """The server ended the call (an upload stream idle too long); the client may retry or resume."""

    reason = "ABORTED"


_CODES: list[tuple[type[FeaturevizError], grpc.StatusCode]] = [
    (InvalidSpec, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelImportError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Aborted, grpc.StatusCode.ABORTED),
]


def status_code(exc: BaseException) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def to_status(exc: BaseException) -> grpc.Status:
    """A grpc.Status carrying google.rpc details in the ``grpc-status-details-bin`` trailer."""
    code = status_code(exc)
    if isinstance(exc, FeaturevizError):
        message, reason = cap(exc.message), exc.reason
    else:
        message, reason = "internal error; the server log has the details", "INTERNAL_ERROR"
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    _pack(status, error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    if isinstance(exc, InvalidSpec):
        violation = error_details_pb2.BadRequest.FieldViolation(field=cap(exc.field, 200),
                                                              description=cap(exc.description))
        _pack(status, error_details_pb2.BadRequest(field_violations=[violation]))
    if isinstance(exc, ResourceExhausted):
        _pack(status, error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=reason, description=message)]))
        retry = math.ceil(getattr(exc, "retry_seconds", 5))
        _pack(status, error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=retry)))
    return rpc_status.to_status(status)


def _pack(status: status_pb2.Status, detail) -> None:
    status.details.add().Pack(detail)


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str):
    if not isinstance(exc, FeaturevizError):
        log.exception("%s failed", method, exc_info=exc)
    await abort(context, exc)


async def abort(context: grpc.aio.ServicerContext, exc: BaseException):
    """End the call with ``exc``'s status (raises grpc.aio.AbortError)."""
    status = to_status(exc)
    await context.abort(status.code, status.details, status.trailing_metadata)


def rpc_errors(method):
    """Decorate an async servicer method (unary or streaming) so errors become statuses, in one place."""
    name = method.__qualname__
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, name)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, name)
    return unary


def job_error(exc: BaseException) -> pb.JobError:
    """The error a failed job carries. CUDA out-of-memory becomes RESOURCE_EXHAUSTED / GPU_OOM."""
    if _is_oom(exc):
        first = str(exc).splitlines()[0] if str(exc) else ""
        return pb.JobError(code="RESOURCE_EXHAUSTED", reason="GPU_OOM",
                           message=cap(f"the device ran out of memory: {first}; use a smaller size or batch"))
    if isinstance(exc, FeaturevizError):
        field = exc.field if isinstance(exc, InvalidSpec) else ""
        return pb.JobError(code=status_code(exc).name, reason=exc.reason, message=cap(exc.message),
                           field=cap(field, 200))
    return pb.JobError(code="INTERNAL", reason="INTERNAL_ERROR",
                       message=f"internal error ({type(exc).__name__}); the server log has the traceback")


def _is_oom(exc: BaseException) -> bool:
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
