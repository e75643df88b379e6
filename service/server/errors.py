"""gRPC statuses of featureviz errors, with google.rpc details: the status code of each error class is its name in
:data:`featureviz.errors.CODE_NAMES` (the one table, also the web gateway's and a failed job's), and this module
adds the details:

    every FeaturevizError    -> ErrorInfo(reason, domain="featureviz")
    InvalidSpec              -> + BadRequest(field_violations=[field, description])
    ResourceExhausted        -> + QuotaFailure, RetryInfo (5 s, or its retry_seconds)
    anything else            -> INTERNAL, traceback logged, never sent

Every text sent back is capped (:data:`featureviz.errors.MAX_TEXT_CHARS`): client values are quoted through
:func:`featureviz.errors.echo` (100 characters) where messages are built, and this map cuts whatever is
still too long, so an error always fits the default 8 KB metadata limit of a gRPC client.

Servicer methods are wrapped with :func:`rpc_errors`, so they only raise; admission errors become the RPC's
status. Errors while a job runs become a :class:`featureviz.v1.JobError` through
:func:`featureviz.errors.job_error`.
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

from featureviz.errors import Aborted
from featureviz.errors import FeaturevizError
from featureviz.errors import InvalidSpec
from featureviz.errors import PermissionDenied
from featureviz.errors import ResourceExhausted
from featureviz.errors import SignInThrottled
from featureviz.errors import Unauthenticated
from featureviz.errors import Unavailable
from featureviz.errors import cap
from featureviz.errors import code_name
from featureviz.errors import job_error

# the error classes and job_error live in featureviz.errors; re-exported for the servicers
__all__ = ["Unavailable", "Unauthenticated", "PermissionDenied", "Aborted", "SignInThrottled", "status_code",
           "to_status", "rpc_errors", "job_error", "abort", "cap", "DOMAIN"]

log = logging.getLogger("featureviz.server")
DOMAIN = "featureviz"


def status_code(exc: BaseException) -> grpc.StatusCode:
    return grpc.StatusCode[code_name(exc)]


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
